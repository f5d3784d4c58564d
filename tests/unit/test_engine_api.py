"""The engine API (engine/api.py): both engines satisfy it, and deployments/ use nothing else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from serve_app.engine.api import EngineAPI
from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.static_batch import GenerateEngine

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "serve_app" / "deployments"
MEMBERS = set(EngineAPI.__annotations__) | {
    name for name, value in vars(EngineAPI).items() if callable(value) and not name.startswith("_")
}
METHODS = MEMBERS - set(EngineAPI.__annotations__)


def test_the_api_names_what_the_deployments_need():
    assert {"add_adapter", "pin_adapter", "unpin_adapter", "remove_adapter", "submit", "stats", "shutdown"} <= METHODS


@pytest.mark.parametrize("cls", [LoRAEngine, GenerateEngine])
def test_both_engines_have_every_method(cls):
    assert not [m for m in METHODS if not callable(getattr(cls, m, None))]


def test_a_lora_engine_is_an_engine_api(tiny_assets):
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_num_seqs=4))
    try:
        assert isinstance(eng, EngineAPI)
        assert eng.resident_adapters() == []
    finally:
        eng.shutdown()


def test_deployments_use_only_the_engine_api():
    """``<x>.engine.<name>`` and ``engine.<name>`` in deployments/*.py name API members only."""
    bad = []
    for path in sorted(DEPLOYMENTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            v = node.value
            on_engine = (isinstance(v, ast.Name) and v.id == "engine") or (
                isinstance(v, ast.Attribute) and v.attr == "engine")
            if on_engine and node.attr not in MEMBERS:
                bad.append(f"{path.name}:{node.lineno} engine.{node.attr}")
    assert not bad, "deployments reach past the engine API:\n" + "\n".join(bad)


def test_run_in_engine_async_holds_no_default_executor_worker(tiny_assets):
    """The adapter pool copy waits for the engine thread; it must not pin a worker of the
    default executor that adapter fetches and registry reads share (issue 25)."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_num_seqs=4))
    release = threading.Event()

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        blocked = asyncio.ensure_future(asyncio.to_thread(release.wait))  # the one default worker, busy
        await asyncio.sleep(0.05)
        value = await asyncio.wait_for(eng.run_in_engine_async(lambda: threading.current_thread().name), timeout=10)
        release.set()
        await blocked
        return value

    try:
        assert asyncio.run(main()) == "lora-engine"
    finally:
        release.set()
        eng.shutdown()
