"""A store behind any fsspec URI: ``s3://bucket/prefix`` (s3fs), ``gs://``, ``memory://`` ...

Layout as the local store: ``<root>/<adapter_id>/adapter_config.json`` + weights, and the
version registry under ``<root>/.registry/``. Folders are never read in place: fetch.py
downloads the two adapter files into the node's disk cache.

Every call maps the backend's errors to ours: a missing key is "not found"; anything else the
client or the network raises (connection refused, timeout, access denied, missing
credentials) is ``AdapterStoreUnavailableError`` -- HTTP 503, and loaded or cached adapters
keep serving. Listings are never served from fsspec's listing cache, so a new or deleted folder
is seen at once. Those messages reach tenants: they say what failed and the exception's type,
never the bucket, the key or the endpoint (all logged here instead).

Conditional writes on S3: ``read_versioned`` is one GET returning the body and its ETag
together; ``write_if`` is a PUT with ``If-Match: <etag>`` (or ``If-None-Match: *`` to create),
so two routers updating the manifest at once cannot both succeed (HTTP 412 / 409 from S3 ->
WriteConflictError). Other fsspec backends have no conditional PUT here: their write_if
compares, then writes (logged once as not atomic across writers).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from typing import Any

from serve_app.adapters.ids import is_valid_id, validate_adapter_id
from serve_app.adapters.store import FileInfo, WriteConflictError
from serve_app.errors import AdapterNotFoundError, AdapterStoreUnavailableError, ServeAppError

logger = logging.getLogger(__name__)
_last_warning: dict[str, float] = {}


def _conflict_status(e: BaseException) -> int | None:
    """412 / 409 when ``e`` (or what s3fs translated it from) is S3 refusing a conditional write."""
    for err in (e, e.__cause__, e.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            code = (response.get("Error") or {}).get("Code")
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return int(status or 412)
    return 412 if isinstance(e, FileExistsError) else None


def _s3_defaults(options: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    opts = dict(options)
    # A dead endpoint must become a 503 in seconds, not after botocore's minute of retries.
    opts.setdefault(
        "config_kwargs",
        {"connect_timeout": timeout_s, "read_timeout": timeout_s, "retries": {"max_attempts": 2, "mode": "standard"}},
    )
    return opts


class FsspecAdapterStore:
    is_local = False

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, *, timeout_s: float = 10.0):
        import fsspec

        self.uri = uri.rstrip("/")
        protocol = uri.split("://", 1)[0].lower()
        self.tier = "s3" if protocol in ("s3", "s3a") else "remote"
        opts = dict(storage_options or {})
        if self.tier == "s3":
            opts = _s3_defaults(opts, timeout_s)
        opts.setdefault("use_listings_cache", False)
        opts.setdefault("skip_instance_cache", True)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.uri, **opts)
        except ImportError as e:
            raise ValueError(f"adapter store {uri}: the fsspec backend for {protocol}:// is not installed ({e}); "
                             f"for s3:// run pip install s3fs") from None
        self.root = root.rstrip("/")

    def __repr__(self) -> str:
        return f"FsspecAdapterStore({self.uri!r})"

    @contextlib.contextmanager
    def _io(self, what: str):
        try:
            yield
        except (ServeAppError, FileNotFoundError, ValueError):
            raise
        except Exception as e:  # connection refused, timeouts, access denied, no credentials ...
            kind = what.split(" ", 1)[0]
            now = time.monotonic()
            if now - _last_warning.get(f"{self.uri}:{kind}", -1e9) >= 30:
                _last_warning[f"{self.uri}:{kind}"] = now
                logger.warning("adapter store %s: %s failed: %s: %s", self.uri, what, type(e).__name__, e)
            raise AdapterStoreUnavailableError(
                f"the adapter store is unreachable ({kind} failed: {type(e).__name__}); adapters already "
                "loaded or cached keep serving; retry later"
            ) from None

    def _path(self, rel: str) -> str:
        parts = [p for p in rel.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ValueError(f"invalid store path {rel!r}")
        return "/".join([self.root, *parts]) if parts else self.root

    def _fresh(self, path: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    # ---- adapters at the root --------------------------------------------------------------

    def list_ids(self) -> list[str]:
        with self._io("list"):
            self._fresh(self.root)
            try:
                entries = self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                return []
        names = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"}
        return sorted(n for n in names if is_valid_id(n))

    def exists(self, adapter_id: str) -> bool:
        return bool(self.list_files(validate_adapter_id(adapter_id)))

    def local_path(self, adapter_id: str) -> str:
        raise NotImplementedError("a URI store has no local folders; use adapters.fetch.AdapterFetcher")

    # ---- generic file access (relative paths) ----------------------------------------------

    def list_files(self, rel: str) -> dict[str, FileInfo]:
        path = self._path(rel)
        with self._io(f"list {rel}"):
            self._fresh(path)
            try:
                entries = self.fs.ls(path, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                return {}
        out = {}
        for e in entries:
            if e.get("type") != "file":
                continue
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            tag = e.get("ETag") or e.get("etag") or e.get("md5") or e.get("LastModified") or e.get("mtime") or ""
            out[name] = FileInfo(size=int(e.get("size") or 0), tag=str(tag))
        return out

    def local_dir(self, rel: str) -> str:
        raise NotImplementedError("a URI store has no local folders")

    def read_bytes(self, rel: str) -> bytes | None:
        with self._io(f"read {rel}"):
            try:
                return self.fs.cat_file(self._path(rel))
            except FileNotFoundError:
                return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        # One PUT: object stores replace an object atomically for readers.
        with self._io(f"write {rel}"):
            self.fs.pipe_file(self._path(rel), data)

    # ---- conditional writes (the registry manifest) --------------------------------------------

    @property
    def _is_s3(self) -> bool:
        return self.tier == "s3" and hasattr(self.fs, "_call_s3")

    def read_versioned(self, rel: str) -> tuple[bytes | None, str | None]:
        if not self._is_s3:
            data = self.read_bytes(rel)
            return data, None if data is None else hashlib.sha256(data).hexdigest()
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self._path(rel))

        async def get():
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await resp["Body"].read(), resp.get("ETag")
            finally:
                resp["Body"].close()

        with self._io(f"read {rel}"):
            try:
                return sync(self.fs.loop, get)
            except FileNotFoundError:
                return None, None

    def write_if(self, rel: str, data: bytes, expected: str | None) -> str | None:
        name = rel.rsplit("/", 1)[-1]
        if not self._is_s3:
            if not _last_warning.get(f"nonatomic:{self.uri}"):
                _last_warning[f"nonatomic:{self.uri}"] = time.monotonic()
                logger.warning("adapter store %s: this backend has no conditional PUT here; registry writes from "
                               "several routers at once are not atomic (use s3:// or one admin router)", self.uri)
            if self.read_versioned(rel)[1] != expected:
                raise WriteConflictError(f"{name} was changed by another writer since it was read; retry the request")
            self.write_bytes(rel, data)
            return hashlib.sha256(data).hexdigest()
        bucket, key, _ = self.fs.split_path(self._path(rel))
        cond = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            with self._io(f"write {rel}"):
                try:
                    out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
                except Exception as e:
                    if _conflict_status(e) is None:
                        raise
                    raise WriteConflictError(
                        f"{name} was changed by another writer since it was read; retry the request") from None
        finally:
            self._fresh(self._path(rel))
        return (out or {}).get("ETag")

    def get_file(self, rel: str, local_path: str, callback=None) -> None:
        with self._io(f"download {rel}"):
            try:
                if callback is None:
                    self.fs.get_file(self._path(rel), local_path)
                else:
                    self.fs.get_file(self._path(rel), local_path, callback=callback)
            except FileNotFoundError:
                logger.info("adapter store: %s/%s does not exist", self.uri, rel)
                raise AdapterNotFoundError(f"{rel.rsplit('/', 1)[-1]} of an adapter is not in the adapter store") from None

    def put_file(self, local_path: str, rel: str) -> None:
        with self._io(f"upload {rel}"):
            self.fs.put_file(local_path, self._path(rel))

    def delete_tree(self, rel: str) -> None:
        path = self._path(rel)
        if path == self.root:
            raise ValueError("refusing to delete the store root")
        with self._io(f"delete {rel}"):
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass
            self._fresh(path)

    @contextlib.contextmanager
    def lock(self, rel: str):
        # Object stores have no lock; the registry checks its manifest generation instead.
        yield
