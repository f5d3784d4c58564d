"""Streaming through one channel per (router replica, engine replica), not one message per token.

Ray Serve streams a handle call's results as one Ray message per yielded item, and each message
costs about a millisecond of CPU on each side (the core worker's report and read path, not our
code: benchmarks/stream_profile.py). Yielding every request's every token on its own stream
made streaming cost ~3x the engine's throughput on two cores. So a replica sends each request
its first and last output on the request's own call, and everything in between on a
*channel*: one long-lived streaming call per router replica, which yields, once per engine step,
the text deltas of all of that router's requests on this replica as one message.

    router                                  replica
    ------                                  -------
    submit(req, key) ── streaming call ──▶  Accepted(replica, first text)   # TTFT, not delayed
                                            ... deltas into Outbox[key] ...
    channel(key, replica) ◀── one call ───  [(request_id, seqs, text), ...]  # once per step, all requests
                                            Final(last_seq, rest of text, usage)

* The request's own call still decides its fate: cancelling it (client gone) aborts the request
  and nothing else, and its errors keep their status codes. The channel carries only text.
* Nothing waits for the channel: a delta no channel has taken when its request finishes rides
  in that request's ``Final``; ``Final.last_seq`` tells the router how many deltas the channel
  took, so the router emits them all, in order, before the end (router/streams.py).
* ``Outbox`` is bounded by the requests in flight; a request's entries leave it when the
  channel takes them or the request finishes.

Pure Python on purpose (the router imports these types; no torch).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from serve_app.api.wire import Accepted, Final, Hello

CHANNEL_IDLE_S = 2.0  # a channel with no request in flight ends after this long (the router reopens it on demand): never holds up a replica's graceful shutdown


@dataclass
class _Pending:
    seq: int = 0  # deltas put
    taken: int = 0  # deltas the channel took
    parts: list[str] = field(default_factory=list)  # deltas taken+1 .. seq


class Outbox:
    """One router's deltas on this replica, waiting for that router's channel."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}
        self._ready: list[str] = []  # request IDs with untaken parts, in arrival order
        self.event = asyncio.Event()
        self.generation = 0  # bumps when a newer channel attaches: the older one ends
        self.idle_since: float | None = None

    def open(self, request_id: str) -> None:
        self._pending[request_id] = _Pending()

    def put(self, request_id: str, text: str) -> None:
        p = self._pending.get(request_id)
        if p is None or not text:
            return
        if not p.parts:
            self._ready.append(request_id)
        p.seq += 1
        p.parts.append(text)
        self.event.set()

    def take(self) -> list[tuple[str, int, int, str]]:
        """Every request's untaken text as one entry each: (request_id, first seq, last seq, text)."""
        batch = []
        for rid in self._ready:
            p = self._pending.get(rid)
            if p is None or not p.parts:
                continue
            batch.append((rid, p.taken + 1, p.seq, "".join(p.parts)))
            p.parts.clear()
            p.taken = p.seq
        self._ready.clear()
        self.event.clear()
        return batch

    def close(self, request_id: str) -> tuple[int, str]:
        """(last seq the channel took, the untaken text) for a finishing request; forgets it."""
        p = self._pending.pop(request_id, None)
        if not self._pending:
            self.event.set()  # wake the channel: with nothing in flight it may end (CHANNEL_IDLE_S)
        if p is None:
            return 0, ""
        return p.taken, "".join(p.parts)

    def __len__(self) -> int:
        return len(self._pending)


class ChannelMixin:
    """Channeled streaming for a deployment with ``async _submit(req) -> RequestStream``.

    Both engine deployments (LoRA and merged) use it; ``_replica_unique_id`` names this replica.
    """

    _outboxes: dict[str, Outbox]

    def _outbox(self, key: str) -> Outbox:
        boxes = self.__dict__.setdefault("_outboxes", {})
        box = boxes.get(key)
        if box is None:
            box = boxes[key] = Outbox()
        return box

    @staticmethod
    def _replica_unique_id() -> str:
        from ray import serve

        rid = serve.get_replica_context().replica_id
        return getattr(rid, "unique_id", str(rid))

    async def generate_channeled(self, req, channel: str):
        """One request: ``Accepted`` (with its first text), then ``Final``; deltas go to the channel.

        Errors before the first output raise here, before anything is sent, so the router can
        still answer with their status code; a later error raises on this call as well."""
        stream = await self._submit(req)  # type: ignore[attr-defined]
        box = self._outbox(channel)
        rid = req.request_id
        box.open(rid)
        try:
            first = await stream.__anext__()
            if first.finished:
                box.close(rid)
                yield Final(0, first.text, first.finish_reason, first.prompt_tokens, first.completion_tokens)
                return
            yield Accepted(self._replica_unique_id(), first.text, len(first.token_ids))
            async for out in stream:
                if out.finished:
                    last_seq, rest = box.close(rid)
                    yield Final(last_seq, rest + out.text, out.finish_reason, out.prompt_tokens, out.completion_tokens)
                    return
                for extra in stream.drain_nowait():  # several steps queued: one entry
                    if extra.finished:
                        last_seq, rest = box.close(rid)
                        yield Final(last_seq, rest + out.text + extra.text, extra.finish_reason,
                                    extra.prompt_tokens, extra.completion_tokens)
                        return
                    out.text += extra.text
                box.put(rid, out.text)
        finally:
            box.close(rid)
            stream.close()  # aborts the request if it did not finish (client gone, error)

    async def channel(self, key: str, replica: str):
        """The router ``key``'s channel on this replica: batches of (request_id, first seq, last seq, text).

        ``replica`` is the replica the router meant to reach (its request router pins the call);
        anywhere else the call ends at once with no ``Hello``. A newer channel for the same key
        supersedes this one; with nothing to carry for ``CHANNEL_IDLE_S`` it ends."""
        me = self._replica_unique_id()
        if replica != me:
            return
        box = self._outbox(key)
        box.generation += 1
        generation = box.generation
        yield Hello(me)
        while box.generation == generation:
            try:
                await asyncio.wait_for(box.event.wait(), timeout=CHANNEL_IDLE_S if not len(box) else None)
            except asyncio.TimeoutError:
                if not len(box):
                    return
                continue
            if box.generation != generation:
                return
            batch = box.take()
            if batch:
                yield batch
