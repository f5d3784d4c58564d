"""The router's half of channeled streaming (deployments/channel.py has the replica's half).

``ChannelHub.stream(handle, req)`` streams one request: it sends ``generate_channeled``, reads
the ``Accepted`` item (the request's first text, and the replica it runs on), makes sure this
router has a channel open to that replica, then yields the text the channel delivers for the
request and finally the request's ``Final``. One channel per (deployment, replica) serves all
of this router's requests there.

Deltas are coalesced by time on the way out: the first text goes at once, later text at most
every ``interval()`` (whatever arrived meanwhile goes as one chunk). Each chunk the router
sends the client is one more Serve message router -> proxy (about 2 ms of CPU between the two,
benchmarks/stream_profile.py), so the interval grows with the number of open streams to keep
this router within ``chunks_per_s``: one stream gets every engine step's text, 64 streams on a
small box get a few chunks a second each, and streaming stays at the engine's speed.

Order and completeness: the channel numbers each request's deltas; the ``Final`` says how many
the channel took (``last_seq``); the rest ride in ``Final.text``. The stream ends only after the
mailbox holds delta ``last_seq``, so no text is lost or reordered; if the channel died with
deltas in flight, the request fails with an error instead of silently missing text.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator

from serve_app.api.wire import Accepted, Final, Hello, RequestOutput
from serve_app.errors import ServeAppError

logger = logging.getLogger("ray.serve")

OPEN_TIMEOUT_S = 10.0  # a channel that does not say Hello by then is given up (requests still finish)
SETTLE_TIMEOUT_S = 30.0  # how long a cancelled call may take to end on its replica before the router stops waiting
MAX_INTERVAL_S = 1.0  # however many streams are open, each gets a chunk at least this often
LOST_WAIT_S = 30.0  # how long a finished request waits for channel deltas it was promised


class StreamLostError(ServeAppError):
    status_code = 502
    error_type = "internal_error"
    code = "stream_lost"


async def settle(call, pending: asyncio.Future | None = None, timeout: float = SETTLE_TIMEOUT_S) -> bool:
    """Cancel a Serve call on its replica and wait until it has ended there.

    ``call``: a ``DeploymentResponse`` (awaitable) or ``DeploymentResponseGenerator`` (async
    iterator). Cancelling the asyncio task that awaits one does not reach the replica (Ray Serve
    2.60's ``__await__`` / ``__anext__`` only turn that into a local CancelledError); its
    ``cancel()`` does: it ``ray.cancel``s the replica's task, whose ``finally`` aborts the engine
    request (deployments/lora.py ``collect`` / ``chunks``, channel.py). Awaiting the call after
    that returns once the replica's task has ended (RequestCancelledError, or its result if it
    finished first), so a caller that holds a tenant's lease across ``settle`` frees the slot
    only when the replica has let go. ``pending``: an ``__anext__`` of the call already in
    flight, awaited instead of starting a new one. Returns whether the call ended within
    ``timeout`` (a replica that never answers must not hold the lease for ever).
    """
    try:
        call.cancel()
    except Exception as e:  # best effort: the replica's own end of the request still finishes it
        logger.warning("cancelling a request on its replica failed: %r", e)

    async def ended() -> None:
        try:
            if pending is not None:
                await pending
            if hasattr(call, "__anext__"):
                while True:
                    await call.__anext__()
            else:
                await call
        except (Exception, asyncio.CancelledError):  # cancelled, finished, failed: all mean it ended
            pass

    try:
        await asyncio.wait_for(ended(), timeout)
        return True
    except asyncio.TimeoutError:
        logger.warning("a cancelled request did not end on its replica within %.0f s; no longer waiting", timeout)
        return False


class _Mailbox:
    __slots__ = ("parts", "seq", "event", "lost", "orphaned")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.seq = 0  # last delta received
        self.event = asyncio.Event()
        self.lost = False  # a delta never arrived: the text has a hole
        self.orphaned = False  # its channel ended: what it did not deliver comes in the Final, or never

    def take(self) -> str:
        text = "".join(self.parts)
        self.parts.clear()
        self.event.clear()
        return text


class ChannelHub:
    """One per router replica: its channels to engine replicas and its requests' mailboxes."""

    def __init__(self, interval_s: float = 0.0, key: str | None = None, chunks_per_s: float | None = None):
        self.key = key or f"router-{uuid.uuid4().hex[:12]}"
        self.interval_s = interval_s
        self.chunks_per_s = chunks_per_s  # this router's budget of chunks to clients, all streams together
        self._mail: dict[str, _Mailbox] = {}
        self._on: dict[str, set[str]] = {}  # channel -> request IDs waiting on it
        self._channels: dict[tuple[str, str], asyncio.Task] = {}  # (deployment, replica) -> reader
        self.channel_messages = 0
        self.channels_opened = 0

    # ---- channels ----------------------------------------------------------------------------

    def _ensure_channel(self, handle, deployment: str, replica: str) -> tuple[str, str]:
        ch = (deployment, replica)
        if ch not in self._channels:
            self._channels[ch] = asyncio.get_running_loop().create_task(self._read(handle, ch))
        return ch

    async def _read(self, handle, ch: tuple[str, str]) -> None:
        deployment, replica = ch
        call = handle.options(stream=True, multiplexed_model_id="").channel.remote(self.key, replica)
        try:
            hello = await asyncio.wait_for(call.__anext__(), timeout=OPEN_TIMEOUT_S)
            if not isinstance(hello, Hello):
                raise RuntimeError(f"channel to {deployment} replica {replica} answered {type(hello).__name__}")
            self.channels_opened += 1
            async for batch in call:
                self.channel_messages += 1
                for rid, first, last, text in batch:
                    mb = self._mail.get(rid)
                    if mb is None:
                        continue  # finished or gone: its Final told it what to expect
                    if first != mb.seq + 1:  # a message of this channel went missing: never skip text
                        mb.lost = True
                    else:
                        mb.parts.append(text)
                        mb.seq = last
                    mb.event.set()
        except (StopAsyncIteration, asyncio.TimeoutError):
            pass  # ended (idle, superseded, wrong replica) or never reached it
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the replica died or the call failed: its requests fail on their own calls
            logger.warning("stream channel to %s replica %s ended: %r", deployment, replica, e)
        finally:
            if self._channels.get(ch) is asyncio.current_task():
                del self._channels[ch]
            try:
                call.cancel()
            except Exception:
                pass
            for rid in self._on.pop(f"{deployment}/{replica}", ()):
                mb = self._mail.get(rid)
                if mb is not None:
                    mb.orphaned = True
                    mb.event.set()

    # ---- one request ---------------------------------------------------------------------------

    async def stream(self, handle, deployment: str, req) -> AsyncIterator[RequestOutput]:
        """Stream one request through ``handle`` (already bound to its multiplexed model): its
        outputs, text only (a channel carries no token IDs or logprobs: ``token_ids`` is empty)."""
        rid = req.request_id
        mb = self._mail[rid] = _Mailbox()
        call = handle.options(stream=True).generate_channeled.remote(req, self.key)
        final_next: asyncio.Future | None = None
        done = False  # the Final arrived
        ended = False  # the call ended on the replica (its Final or its error came back)
        on = None
        try:
            try:
                first = await call.__anext__()  # errors before the first output raise here
            except Exception:
                ended = True
                raise
            if isinstance(first, Final):
                done = True
                yield RequestOutput(rid, first.text, [], True, first.finish_reason, first.prompt_tokens, first.completion_tokens)
                return
            assert isinstance(first, Accepted), type(first)
            on = f"{deployment}/{first.replica}"

            attaches = [0]

            def attach() -> None:
                # (Re)open the channel: one that ended (idle, superseded) while this request was
                # starting leaves its text in the replica's outbox for the next channel. A few
                # tries per request; past them its text comes in its Final (or, if the channel
                # took some, the request fails rather than miss it).
                mb.orphaned = False
                if attaches[0] >= 3:
                    return
                attaches[0] += 1
                self._ensure_channel(handle, deployment, first.replica)
                self._on.setdefault(on, set()).add(rid)

            attach()
            yield RequestOutput(rid, first.text, [], completion_tokens=first.tokens)
            last_sent = time.monotonic()
            final_next = asyncio.ensure_future(call.__anext__())
            final: Final | None = None
            while final is None:
                if not mb.event.is_set():
                    arrived = asyncio.ensure_future(mb.event.wait())
                    try:
                        await asyncio.wait((final_next, arrived), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        arrived.cancel()
                if mb.lost:
                    raise StreamLostError("the stream's text was lost in transit (its channel broke); retry")
                if mb.orphaned:
                    attach()
                if final_next.done():
                    ended = True
                    try:
                        final = final_next.result()  # a replica error raises here
                    except StopAsyncIteration:
                        raise StreamLostError("the replica ended the stream without its last output; retry") from None
                    break
                wait = self.interval() - (time.monotonic() - last_sent)
                if wait > 0:  # coalesce: let more text arrive, unless the request ends first
                    await asyncio.wait((final_next,), timeout=wait)
                    if final_next.done():
                        continue
                if mb.parts:
                    yield RequestOutput(rid, mb.take(), [])
                    last_sent = time.monotonic()
                else:
                    mb.event.clear()
            # The channel may still carry deltas up to final.last_seq: wait for them, in order.
            deadline = time.monotonic() + LOST_WAIT_S
            while mb.seq < final.last_seq and not mb.lost and time.monotonic() < deadline:
                if mb.orphaned:  # the replica is alive (it sent the Final): a new channel brings the rest
                    if attaches[0] >= 3:
                        break
                    attach()
                mb.event.clear()
                try:
                    await asyncio.wait_for(mb.event.wait(), timeout=max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
            if mb.seq < final.last_seq or mb.lost:
                raise StreamLostError(
                    f"the stream's text was lost in transit (got {mb.seq} of {final.last_seq} deltas); retry")
            done = True
            yield RequestOutput(rid, mb.take() + final.text, [], True, final.finish_reason,
                                final.prompt_tokens, final.completion_tokens)
        finally:
            self._mail.pop(rid, None)
            if on is not None:
                waiting = self._on.get(on)
                if waiting is not None:
                    waiting.discard(rid)
            if not done and not ended:
                # The client went away, a sibling of a batch failed, or the text was lost: abort
                # on the replica, and return only once it has (the tenant's lease waits for this).
                await settle(call, final_next if final_next is not None and not final_next.done() else None)

    def interval(self) -> float:
        """Seconds between a stream's chunks: ``interval_s``, or longer when this router's streams
        together would send more than ``chunks_per_s`` (each chunk costs the router and the proxy
        a Serve message; the budget keeps that cost flat however many streams are open)."""
        if not self.chunks_per_s:
            return self.interval_s
        return max(self.interval_s, min(MAX_INTERVAL_S, len(self._mail) / self.chunks_per_s))

    def stats(self) -> dict:
        return {"channels": len(self._channels), "channels_opened": self.channels_opened,
                "channel_messages": self.channel_messages, "streams": len(self._mail)}

    def close(self) -> None:
        for t in list(self._channels.values()):
            t.cancel()
