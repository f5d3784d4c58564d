"""A local S3-compatible server for tests (moto's server mode on 127.0.0.1), and upload helpers.

The server runs in the test process; Ray replicas reach it over 127.0.0.1 with the storage
options from ``S3Server.storage_options``. ``stop()`` + ``start()`` on the same port keeps the
buckets (moto's state lives in this process), which is how tests take the store down and back.

Two additions over moto's ThreadedMotoServer: a conditional PUT (``If-Match`` / ``If-None-Match``)
is checked and applied under one lock, as S3 does atomically (moto's threads would otherwise
let two racing writers both pass the check); and ``manifest_put_delay_s`` slows every PUT of a
``manifest.json`` key, so tests can make two routers' registry writes overlap for certain.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KEY = SECRET = "testing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(server: "S3Server"):
    """A ThreadedMotoServer whose WSGI app applies S3's atomicity and the test delay."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    conditional = threading.Lock()

    class _Server(ThreadedMotoServer):
        def start(self) -> None:  # binds here, so a busy port raises OSError to the caller
            app = DomainDispatcherApplication(create_backend_app)

            def wrapped(environ, start_response):
                is_put = environ.get("REQUEST_METHOD") == "PUT"
                if is_put and server.manifest_put_delay_s and environ.get("PATH_INFO", "").endswith("/manifest.json"):
                    time.sleep(server.manifest_put_delay_s)
                if is_put and ("HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ):
                    with conditional:
                        return list(app(environ, start_response))
                return app(environ, start_response)

            self._server = make_server(self._ip_address, self._port, wrapped, True, request_handler=MotoRequestHandler)
            self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
            self._thread.start()

    s = _Server(ip_address="127.0.0.1", port=server.port, verbose=False)
    s.start()
    return s


@dataclass
class S3Server:
    port: int = field(default_factory=free_port)
    _server: object = None
    manifest_put_delay_s: float = 0.0  # see the module docstring

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict:
        return {
            "key": KEY,
            "secret": SECRET,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            # A stopped server must fail fast: no botocore retry loop in tests.
            "config_kwargs": {"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 1}},
        }

    def start(self) -> "S3Server":
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        for _ in range(50):  # the port may linger for a moment after a stop
            try:
                self._server = _start_moto(self)
                break
            except OSError:
                time.sleep(0.1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"moto server did not start on port {self.port}")

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                            region_name="us-east-1")

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def upload_dir(self, local: str | Path, bucket: str, prefix: str) -> None:
        c = self.client()
        for p in sorted(Path(local).iterdir()):
            if p.is_file():
                c.upload_file(str(p), bucket, f"{prefix.strip('/')}/{p.name}")

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)
