"""Channeled streaming (deployments/channel.py + router/streams.py) on the real engine, no Ray.

The transport between the two halves is an in-process stand-in for a Serve streaming call: it
runs the replica's generator in its own task, ahead of the reader, as Serve does, and cancels
that task on ``cancel()``. Everything else is the product code: the engine, the replica's
outbox, the router's hub, its coalescing and its ordering rules.
"""

from __future__ import annotations

import asyncio
import time
import random

import pytest

from serve_app.config import EngineConfig
from serve_app.deployments.channel import ChannelMixin, Outbox
from serve_app.deployments.lora import GenerateRequest
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.sampling import SamplingParams
from serve_app.router.streams import ChannelHub, StreamLostError

REPLICA = "replica-1"


def test_outbox_numbers_takes_and_hands_the_rest_to_the_final():
    box = Outbox()
    box.open("a")
    box.open("b")
    box.put("a", "x")
    box.put("b", "1")
    box.put("a", "y")
    box.put("a", "")  # empty deltas are not numbered
    assert box.take() == [("a", 1, 2, "xy"), ("b", 1, 1, "1")]
    assert box.take() == []
    box.put("a", "z")
    assert box.close("a") == (2, "z")  # the channel took 1..2; "z" rides in the Final
    assert box.close("a") == (0, "")
    box.put("a", "late")  # after close: dropped, never delivered to anyone
    assert box.take() == []
    assert len(box) == 1


class _Call:
    """A Serve streaming call in one process: the replica's generator runs in its own task."""

    def __init__(self, agen):
        self._q: asyncio.Queue = asyncio.Queue()
        self._end = object()
        self.cancelled = False

        async def pump():
            try:
                async for item in agen:
                    await self._q.put(item)
            except BaseException as e:  # noqa: BLE001 - delivered to the reader
                await self._q.put(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
            finally:
                await agen.aclose()
            await self._q.put(self._end)

        self._task = asyncio.get_running_loop().create_task(pump())

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._q.get()
        if item is self._end:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True
        self._task.cancel()


class _Method:
    def __init__(self, handle, name):
        self.handle, self.name = handle, name

    def remote(self, *args):
        call = _Call(getattr(self.handle.replica, self.name)(*args))
        self.handle.calls.setdefault(self.name, []).append(call)
        return call


class _Handle:
    def __init__(self, replica):
        self.replica = replica
        self.calls: dict[str, list[_Call]] = {}

    def options(self, **_):
        return self

    def __getattr__(self, name):
        return _Method(self, name)


class _Replica(ChannelMixin):
    """A replica over the real engine; channel batches can be dropped to simulate a lost message."""

    def __init__(self, engine, replica_id=REPLICA):
        self.engine = engine
        self.replica_id = replica_id
        self.drop_batches = 0
        self.batches = 0

    def _replica_unique_id(self):
        return self.replica_id

    async def _submit(self, req):
        return self.engine.submit(req.prompt, req.params, None, req.request_id)

    async def channel(self, key, replica):
        async for item in super().channel(key, replica):
            if isinstance(item, list):
                self.batches += 1
                if self.drop_batches:
                    self.drop_batches -= 1
                    continue  # taken from the outbox, never delivered
            yield item


@pytest.fixture(scope="module")
def engine(tiny_assets):
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_num_seqs=16))
    yield eng
    eng.shutdown()


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, 500) for _ in range(rng.randrange(3, 12))] for _ in range(n)]


def _req(i, prompt, max_tokens=24):
    return GenerateRequest(params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                           prompt=prompt, request_id=f"r{i}")


async def _run(hub, handle, reqs, stamps=None):
    loop = asyncio.get_running_loop()

    async def one(req):
        outs = []
        async for o in hub.stream(handle, "lora", req):
            outs.append(o)
            if stamps is not None:
                stamps.setdefault(req.request_id, []).append((loop.time(), o.finished))
        return outs

    return await asyncio.gather(*(one(r) for r in reqs))


@pytest.mark.parametrize("interval", [0.0, 0.03])
def test_streams_equal_full_text_and_share_channel_messages(engine, interval):
    ps = _prompts(12)
    want = [c.text for c in engine.generate_batch([(p, SamplingParams(max_tokens=24, temperature=0.0,
                                                                    ignore_eos=True), None) for p in ps])]
    replica = _Replica(engine)
    sizes = []
    put = replica._outbox("k").__class__.take

    def take(box):
        batch = put(box)
        if batch:
            sizes.append(len(batch))
        return batch

    handle = _Handle(replica)
    hub = ChannelHub(interval_s=interval, key="k")
    stamps: dict = {}
    replica._outbox("k").take = take.__get__(replica._outbox("k"))
    results = asyncio.run(_run(hub, handle, [_req(i, p) for i, p in enumerate(ps)], stamps))
    for outs, w in zip(results, want):
        assert "".join(o.text for o in outs) == w
        assert outs[-1].finished and outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 24
        assert not any(o.finished for o in outs[:-1])
    assert len(handle.calls["channel"]) == 1  # one channel for every request on the replica
    # Several requests' text share one channel message (one per engine step, not one per request).
    assert sizes and max(sizes) >= 4 and len(sizes) < sum(sizes), sizes
    if interval:  # coalesced: chunks before the last are at least `interval` apart
        for rid, ts in stamps.items():
            mids = [t for t, fin in ts if not fin]
            gaps = [b - a for a, b in zip(mids, mids[1:])]
            assert all(g >= interval * 0.9 for g in gaps), (rid, gaps)


def test_text_rides_in_the_final_when_no_channel_reaches_the_replica(engine):
    ps = _prompts(4, seed=1)
    want = [c.text for c in engine.generate_batch([(p, SamplingParams(max_tokens=16, temperature=0.0,
                                                                    ignore_eos=True), None) for p in ps])]

    class Elsewhere(_Replica):  # the channel lands on another replica: it ends without Hello
        async def channel(self, key, replica):
            async for item in ChannelMixin.channel(self, key, "some-other-replica"):
                yield item

    hub = ChannelHub()
    results = asyncio.run(_run(hub, _Handle(Elsewhere(engine)), [_req(i, p, 16) for i, p in enumerate(ps)]))
    assert ["".join(o.text for o in outs) for outs in results] == want


def test_a_lost_channel_message_fails_the_request_instead_of_dropping_text(engine):
    replica = _Replica(engine)
    replica.drop_batches = 1
    hub = ChannelHub()

    async def main():
        return [o async for o in hub.stream(_Handle(replica), "lora", _req(0, _prompts(1, seed=2)[0], 32))]

    with pytest.raises(StreamLostError, match="lost in transit"):
        asyncio.run(main())


def test_client_going_away_aborts_only_its_request(engine):
    replica = _Replica(engine)
    handle = _Handle(replica)
    hub = ChannelHub()
    ps = _prompts(2, seed=3)
    want = engine.generate_batch([(ps[1], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True), None)])[0].text

    async def main():
        quitter = hub.stream(handle, "lora", _req(0, ps[0], 200))
        stayer = asyncio.ensure_future(_run(hub, handle, [_req(1, ps[1], 200)]))
        await quitter.__anext__()
        await quitter.__anext__()
        await quitter.aclose()  # the client disconnected
        await asyncio.sleep(0.2)
        mine = handle.calls["generate_channeled"][0]
        assert mine.cancelled
        stats = engine.stats()
        return await stayer, stats

    (outs,), stats = asyncio.run(main())
    assert "".join(o.text for o in outs) == want  # the other tenant's stream is whole
    # The aborted row leaves the running set at the engine's next step, not at once.
    deadline = time.monotonic() + 10
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["running"] == 0


def test_request_router_pins_a_channel_to_the_replica_it_names():
    from types import SimpleNamespace as NS

    from serve_app.deployments.routing import EngineRequestRouter, pinned_replica

    def replica(uid):
        return NS(replica_id=NS(unique_id=uid))

    def pending(method, *args):
        return NS(metadata=NS(call_method=method, multiplexed_model_id=""), args=list(args), kwargs={})

    router = EngineRequestRouter.__new__(EngineRequestRouter)  # choose_replicas' pinned branch needs no state
    a, b = replica("a"), replica("b")
    assert asyncio.run(router.choose_replicas([a, b], pending("channel", "key", "b"))) == [[b]]
    # Gone: routed anywhere (never left pending, where it would hold a routing task); refused there.
    assert asyncio.run(router.choose_replicas([a], pending("channel", "key", "b"))) == [[a]]
    assert pinned_replica(pending("generate_channeled", "req", "b")) is None
