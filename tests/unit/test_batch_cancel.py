"""A batch's first error cancels its siblings in the engine, and the tenant's lease waits for them.

Issue 25: ``prompt: [bad prompt, 63 long prompts]`` got its 400 at once, the tenant's
concurrency lease was released, and the 63 siblings kept generating: one tenant could fill every
replica's queue. Here the real router (ingress, limits, streams) talks to the real replica code
(``LoRADeployment.generate`` / ``generate_stream`` / ``generate_channeled`` + ``channel``) over an
in-process stand-in for Ray Serve's handle calls, which keeps the two Serve 2.60 rules that matter:
a call runs in its own task on the "replica"; cancelling the task that *awaits* a response does
not reach the replica, only the response's ``cancel()`` does (``ray.cancel`` of the replica's
task), and awaiting it afterwards returns once that task has ended. The engine is a fake through
the ``EngineAPI`` protocol that makes one token per ``STEP_S`` and records aborts.
"""

from __future__ import annotations

import asyncio
import time
import types

import pytest
from fastapi.testclient import TestClient
from ray import serve
from ray.serve.exceptions import RequestCancelledError

from serve_app import metrics
from serve_app.api.protocol import CompletionRequest
from serve_app.api.wire import RequestOutput, TokenLogprob
from serve_app.deployments.lora import LoRADeployment
from serve_app.engine.api import EngineAPI
from serve_app.engine.engine import RequestStream
from serve_app.errors import InvalidRequestError
from serve_app.router import ingress
from serve_app.router.auth import Authenticator
from serve_app.router.limits import LimitsConfig, TenantLimiter
from serve_app.router.streams import ChannelHub

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
BAD = 9  # a prompt holding this token fails at submit, as the engine's own checks fail one
STEP_S = 0.01  # one token per step
FIRST_TOKEN_S = 0.2  # the bad prompt's error is back long before any sibling's first token
LONG = 400  # max_tokens of the siblings: 4 s of generating if nobody cancels them


class _Metric:
    def inc(self, *a, **k):
        pass

    observe = set = inc


class FakeEngine:
    """An ``EngineAPI``: requests yield one token per STEP_S, after FIRST_TOKEN_S; ``abort`` (what
    ``RequestStream.close`` calls when the replica's task ends early) stops one at once."""

    def __init__(self):
        self.config = types.SimpleNamespace(max_adapter_bytes=1 << 30, max_lora_rank=64)
        self.tokenizer = lambda text, **_: {"input_ids": [1] * max(1, len(text.split()))}  # chat prompts
        self.base_shape = None
        self.dtype = None
        self.requests: list = []  # every request submitted, in order

    # ---- requests
    def submit(self, prompt, params, adapter=None, request_id=None, *, tenant=None, cache_salt=None):
        seed_fails = params.seed is not None and params.seed % 1000 == BAD  # chat: one choice of n fails
        if (isinstance(prompt, list) and BAD in prompt) or seed_fails:
            raise InvalidRequestError(f"prompt token id {BAD} is refused by this replica")
        stream = RequestStream(self.abort)
        req = types.SimpleNamespace(id=request_id, prompt=prompt, tenant=tenant, cache_salt=cache_salt, tokens=0,
                                    aborted=False, finished=False, aborted_at=None)
        stream.req = req
        self.requests.append(req)
        asyncio.get_running_loop().create_task(self._produce(stream, req, params))
        return stream

    async def _produce(self, stream, req, params):
        await asyncio.sleep(FIRST_TOKEN_S)
        while not req.aborted and req.tokens < params.max_tokens:
            req.tokens += 1
            done = req.tokens == params.max_tokens
            lp = None if params.logprobs is None else [TokenLogprob("x", 5, -1.0, [("x", 5, -1.0)] * params.logprobs)]
            stream.queue.put_nowait(RequestOutput(req.id or "r", "x", [5], done, "length" if done else None,
                                                  prompt_tokens=len(req.prompt) if isinstance(req.prompt, list) else 1,
                                                  completion_tokens=req.tokens, logprobs=lp))
            req.finished = done
            await asyncio.sleep(STEP_S)

    def abort(self, req) -> None:
        if not req.aborted and not req.finished:
            req.aborted = True
            req.aborted_at = time.monotonic()

    async def compile_grammar(self, schema: str, tenant: str | None = None) -> None:
        pass

    def warm_grammars(self) -> None:
        pass

    def live(self) -> list:
        """Requests still generating: neither finished nor aborted."""
        return [r for r in self.requests if not r.finished and not r.aborted]

    # ---- the rest of the protocol: not used by these requests
    def add_adapter(self, weights):
        raise NotImplementedError

    def pin_adapter(self, adapter):
        raise NotImplementedError

    def unpin_adapter(self, adapter):
        raise NotImplementedError

    def remove_adapter(self, adapter):
        raise NotImplementedError

    def resident_adapters(self):
        return []

    def run_in_engine(self, fn, *args):
        return fn(*args)

    async def run_in_engine_async(self, fn, *args):
        return fn(*args)

    def stats(self):
        return {"running": len(self.live())}

    def is_alive(self):
        return True

    def drain(self, timeout=60.0):
        return True

    def shutdown(self):
        pass


# ---- an in-process Ray Serve: a call is a task on the "replica" ------------------------------------


class FakeResponse:
    """``DeploymentResponse``: awaiting it in a task that gets cancelled leaves the call running;
    ``cancel()`` cancels the replica's task, and awaiting then raises RequestCancelledError once
    that task has ended."""

    def __init__(self, coro, log: list):
        self._task = asyncio.get_running_loop().create_task(coro)
        self._cancelled = False
        log.append(self)

    def cancel(self):
        self._cancelled = True
        self._task.cancel()

    def __await__(self):
        return self._result().__await__()

    async def _result(self):
        try:
            return await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if self._task.cancelled() and self._cancelled:
                raise RequestCancelledError("r") from None
            raise


class FakeResponseGenerator:
    """``DeploymentResponseGenerator``: the replica's generator runs ahead in its own task."""

    _END = object()

    def __init__(self, agen, log: list):
        self._q: asyncio.Queue = asyncio.Queue()
        self._cancelled = False

        async def pump():
            try:
                async for item in agen:
                    self._q.put_nowait(item)
            except asyncio.CancelledError:
                self._q.put_nowait(RequestCancelledError("r"))
            except Exception as e:
                self._q.put_nowait(e)
            finally:
                await agen.aclose()
                self._q.put_nowait(self._END)

        self._task = asyncio.get_running_loop().create_task(pump())
        log.append(self)

    def cancel(self):
        self._cancelled = True
        self._task.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._q.get()
        if item is self._END:
            self._q.put_nowait(self._END)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class FakeHandle:
    def __init__(self, replica, stream=False, log=None):
        self.replica, self.stream = replica, stream
        self.log = [] if log is None else log

    def options(self, stream=None, multiplexed_model_id=None, **_):
        return FakeHandle(self.replica, self.stream if stream is None else stream, self.log)

    def __getattr__(self, name):
        method = getattr(self.replica, name)

        def remote(*args):
            if self.stream:
                return FakeResponseGenerator(method(*args), self.log)
            return FakeResponse(method(*args), self.log)

        return types.SimpleNamespace(remote=remote)


def _replica(engine) -> LoRADeployment:
    dep = object.__new__(LoRADeployment)  # the real request path, none of the adapter machinery
    dep.engine = engine
    dep._start_background = lambda: None
    dep._replica_unique_id = lambda: "replica-1"
    return dep


@pytest.fixture
def batch_router(monkeypatch):
    """(TestClient, router, engine, releases): releases records, at each lease release, how many
    of the engine's requests were still generating."""
    for name in ("REQUESTS", "ROUTER_PATH", "LATENCY", "TTFT", "GENERATED_TOKENS"):
        monkeypatch.setattr(metrics, name, _Metric())
    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: "")
    engine = FakeEngine()
    assert isinstance(engine, EngineAPI)
    router = object.__new__(ingress.Router.__mro__[1])
    router.auth = Authenticator(enabled=False)
    cfg = LimitsConfig(max_concurrent_requests=4)
    router.limiter = TenantLimiter.from_config(cfg, max_num_seqs=8)
    router.lora = FakeHandle(_replica(engine))
    router.merged = None
    router.admin = types.SimpleNamespace(resolve=lambda n: f"{n}@v1", model_ids=lambda: [])
    router.base_model_name = "base"
    router.default_max_tokens = 4
    router.promoter = None
    router.streams = ChannelHub(key="router-1")
    router._handles = {}
    releases: list[int] = []
    release = router.limiter._release

    def recording_release(tenant, n):
        releases.append(len(engine.live()))
        release(tenant, n)

    monkeypatch.setattr(router.limiter, "_release", recording_release)
    monkeypatch.setitem(ingress._EDGE, "auth", router.auth)
    monkeypatch.setitem(ingress._EDGE, "max_body_bytes", cfg.max_body_bytes)
    monkeypatch.setattr(serve, "get_replica_context",
                        lambda: types.SimpleNamespace(servable_object=router, replica_id="replica-1"))
    with TestClient(ingress.app, raise_server_exceptions=False) as client:
        yield client, router, engine, releases


BATCH = [[BAD, 1, 2], [1] * 8, [2] * 8, [3] * 8]


@pytest.mark.parametrize("form", ["whole", "stream", "stream_logprobs"])
def test_a_failing_prompt_cancels_its_siblings_and_the_lease_waits_for_them(batch_router, form):
    client, router, engine, releases = batch_router
    body = {"model": "base", "prompt": BATCH, "max_tokens": LONG, "ignore_eos": True,
            "stream": form != "whole", **({"logprobs": 1} if form == "stream_logprobs" else {})}
    t0 = time.monotonic()
    r = client.post(CMPL, json=body)
    assert r.status_code == 400, r.text
    assert f"token id {BAD}" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < LONG * STEP_S / 2  # not after the siblings ran to the end
    assert len(engine.requests) == 3
    # The siblings were aborted in the engine by the time the lease was released: when it was,
    # none of them was still generating, and none of them got to max_tokens.
    assert releases == [0], releases
    assert all(r.aborted and r.tokens < LONG for r in engine.requests), [(r.aborted, r.tokens) for r in engine.requests]
    assert router.limiter.active("base") == 0
    # Every call reached the replica's cancel (ray.cancel), not only the router's own task.
    calls = [c for c in router.lora.log if isinstance(c, (FakeResponse, FakeResponseGenerator))]
    assert sum(c._cancelled for c in calls) >= 3, [c._cancelled for c in calls]
    # The tenant's slots are free again: a full batch is admitted at once, and served.
    r = client.post(CMPL, json={**body, "prompt": BATCH[1:] + [[4] * 8], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_chat_n_first_error_cancels_the_other_choices(batch_router):
    client, router, engine, releases = batch_router
    # Choice j samples with seed + j: the second choice's seed is the one the fake engine refuses.
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "n": 4, "seed": 1000 + BAD - 1,
            "max_tokens": LONG, "temperature": 1.0}
    r = client.post(CHAT, json=body)
    assert r.status_code == 400, r.text
    assert releases == [0] and len(engine.requests) == 3 and all(r.aborted for r in engine.requests)


def test_closing_a_batch_stream_early_aborts_every_request_before_the_lease_is_free(batch_router):
    client, router, engine, releases = batch_router

    async def main():
        lease = router.limiter.admit("base", [8, 8, 8], LONG)
        request = CompletionRequest(model="base", prompt=BATCH[1:], max_tokens=LONG, ignore_eos=True, stream=True)
        _, chunks = router._completions_stream(request, router._resolved(request, None, "base"))
        guarded = lease.guard(chunks)
        await guarded.__anext__()  # the first chunk arrived: all three are generating
        assert len(engine.live()) == 3
        await guarded.aclose()  # the client went away
        return lease

    lease = asyncio.run(main())
    assert lease.released and releases == [0]
    assert all(r.aborted for r in engine.requests)


def test_a_successful_batch_is_unchanged(batch_router):
    client, router, engine, releases = batch_router
    r = client.post(CMPL, json={"model": "base", "prompt": BATCH[1:], "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == ["xxx"] * 3
    assert releases == [0] and not any(r.aborted for r in engine.requests)
