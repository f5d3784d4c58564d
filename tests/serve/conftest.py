"""One real Ray instance and one deployed ``lora-app`` for the whole serve test session.

The app runs the TINY-shaped demo model (tests/helpers.py) with 6 tenant adapters and an
adapter LRU of 2 per replica, so every test that touches more than two tenants also
exercises eviction. References come from plain PEFT on the same files, cached per
(model, prompt) for the session.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60's token auth is on by default

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from serve_app.demo import DemoAssets, build_demo_assets
from tests.helpers import TINY, peft_model, reference_greedy

APP_NAME = "lora-app"
BASE_NAME = "base"
NUM_ADAPTERS = 6
LRU_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeEnv:
    url: str  # http://127.0.0.1:<port>
    assets: DemoAssets
    app_name: str = APP_NAME
    base_name: str = BASE_NAME
    lru_size: int = LRU_SIZE

    @property
    def models(self) -> list[str]:
        """Every servable model: the base, then each tenant adapter."""
        return [self.base_name, *self.assets.adapter_ids]


@pytest.fixture(scope="session")
def serve_assets(tmp_path_factory) -> DemoAssets:
    return build_demo_assets(tmp_path_factory.mktemp("serve-demo"), **{**TINY, "num_adapters": NUM_ADAPTERS})


@pytest.fixture(scope="session")
def serve_env(serve_assets):
    import httpx
    import ray
    from ray import serve

    from serve_app.app import build_app

    repo_root = str(Path(__file__).resolve().parents[2])
    # Replicas of the test-defined deployment (test_serve_app.Caller) import it by module name.
    pythonpath = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address="local",  # a private cluster, never one another session started
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_AUTH_MODE": "disabled"}},
    )
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            {
                "base_model": str(serve_assets.base),
                "adapters": str(serve_assets.adapters_dir),
                "base_model_name": BASE_NAME,
                "max_adapters_per_replica": LRU_SIZE,
                "lora_num_cpus": 0.5,
                "router_num_cpus": 0.25,
                "torch_threads": 1,
            }
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # serve.run returns once replicas are up; the proxy may lag a moment
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("lora-app did not become reachable over HTTP")
            time.sleep(0.2)
        yield ServeEnv(url=url, assets=serve_assets)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


class References:
    """Plain-PEFT greedy tokens per (model, prompt token IDs), computed once per session."""

    def __init__(self, assets: DemoAssets, base_name: str):
        from transformers import AutoTokenizer

        self.assets = assets
        self.base_name = base_name
        self.tokenizer = AutoTokenizer.from_pretrained(str(assets.base))
        self._models: dict[str, object] = {}
        self._tokens: dict[tuple[str, tuple[int, ...]], list[int]] = {}

    def _model(self, model: str):
        if model not in self._models:
            adapter = None if model == self.base_name else self.assets.adapter_path(model)
            self._models[model] = peft_model(self.assets.base, adapter)
        return self._models[model]

    def prompt_ids(self, prompt: str) -> list[int]:
        """What the server tokenizes a completion prompt to (default special tokens: BOS)."""
        return self.tokenizer(prompt)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The TINY tokenizer has no chat template: the server's plain 'role: content' format."""
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.tokenizer(text)["input_ids"]

    def tokens(self, model: str, prompt_ids: list[int], n: int) -> list[int]:
        # Greedy: a shorter reference is a prefix of a longer one, so keep the longest.
        key = (model, tuple(prompt_ids))
        have = self._tokens.get(key)
        if have is None or len(have) < n:
            have = reference_greedy(self._model(model), list(prompt_ids), n)
            self._tokens[key] = have
        return have[:n]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def text(self, model: str, prompt: str | list[int], n: int) -> str:
        ids = prompt if isinstance(prompt, list) else self.prompt_ids(prompt)
        return self.decode(self.tokens(model, ids, n))

    def chat_text(self, model: str, messages: list[dict], n: int) -> str:
        return self.decode(self.tokens(model, self.chat_ids(messages), n))


@pytest.fixture(scope="session")
def refs(serve_assets) -> References:
    return References(serve_assets, BASE_NAME)
