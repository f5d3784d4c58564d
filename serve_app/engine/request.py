"""A request inside the engine, and what a caller holds on to while it runs.

``Request`` is the engine's state of one request: its tokens, its KV block table (kept by the
scheduler's KV manager, kv_cache.py), its text assembler, and one ``status``. The scheduler
moves it WAITING -> RUNNING (admitted: it holds KV blocks) and back to WAITING (preempted: its
blocks are freed and it is recomputed when readmitted); FINISHED is final (its last output is
out). ``aborted`` is a request from outside (any thread) that the scheduler acts on at its next
step; it is not a state of its own.

``RequestStream`` is the async iterator a caller gets from ``submit``; it holds the engine's
``abort`` (a callable), not the engine, so nothing here imports engine.py.

The engine's errors live here too: every module of the step (engine, output processor, static
batches) may end a request with one.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable

from serve_app.api.wire import RequestOutput, TokenLogprob
from serve_app.errors import ServeAppError

if TYPE_CHECKING:
    import torch

    from serve_app.api.sampling_params import SamplingParams
    from serve_app.engine.detokenizer import TextAssembler
    from serve_app.engine.lora.manager import ResidentAdapter
    from serve_app.engine.structured import RowGrammar


class EngineError(ServeAppError):
    status_code = 500
    error_type = "internal_error"
    code = "engine_error"


class NonFiniteOutputError(EngineError):
    """A row's logits came out NaN or inf: the adapter (or base) it ran with overflowed."""

    code = "non_finite_output"


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued: new, or preempted (holds no blocks)
    RUNNING = "running"  # admitted: holds KV blocks and is scheduled each step (static batches: in the batch)
    FINISHED = "finished"  # its last output is out; holds nothing


@dataclass
class Completion:
    """A whole finished request (the sync API's result)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: ResidentAdapter | None
    sink: Callable[[RequestOutput], None] | tuple[asyncio.AbstractEventLoop, asyncio.Queue]
    assembler: TextAssembler
    stop_ids: frozenset[int]
    generator: torch.Generator | None = None
    tenant: str | None = None  # fair-admission key; None: the adapter ID
    # prefix-cache key: ((adapter id@vN, load id) or None for the base, salt); see kv_cache.cache_key
    cache_key: tuple | None = None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens (prompt, then output) whose KV is in ``blocks``
    blocks: list[int] = field(default_factory=list)  # block table
    nodes: list[int] = field(default_factory=list)  # prefix-cache keys of its full blocks, in order
    status: RequestStatus = RequestStatus.WAITING
    aborted: bool = False  # asked to stop (any thread); the scheduler finishes it at its next step
    preemptions: int = 0
    arrival: float = field(default_factory=time.monotonic)
    grammar: RowGrammar | None = None  # structured output: the matcher, on the request (survives a re-run)
    # echo + logprobs: the prompt's own logprobs, filled as its chunks pass (the first entry has
    # none); kept across a preemption, so a re-run only adds the positions still missing
    prompt_lp: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def scores_prompt(self) -> bool:
        """Whether it still needs logprobs of prompt positions (echo + logprobs)."""
        return self.prompt_lp is not None and len(self.prompt_lp) < len(self.prompt_ids)

    def tokens(self, a: int, b: int) -> list[int]:
        """Tokens ``a:b`` of prompt + output, without building the whole list."""
        p = len(self.prompt_ids)
        if b <= p:
            return self.prompt_ids[a:b]
        if a >= p:
            return self.output_ids[a - p : b - p]
        return self.prompt_ids[a:] + self.output_ids[: b - p]


class RequestStream:
    """Async iterator over one request's outputs. ``close()`` aborts it if unfinished.

    ``abort``: the engine's ``abort(request)`` (``LoRAEngine.submit`` passes it)."""

    def __init__(self, abort: Callable[[Request], None]):
        self.abort = abort
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.req: Request | None = None
        self.finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        return self._take(await self.queue.get())

    def drain_nowait(self) -> list[RequestOutput]:
        """Outputs already waiting, without blocking: lets a caller send several steps as one chunk."""
        outs = []
        while not self.finished and not self.queue.empty():
            outs.append(self._take(self.queue.get_nowait()))
        return outs

    def _take(self, out: RequestOutput) -> RequestOutput:
        if out.error is not None:
            self.finished = True
            raise out.error
        self.finished = out.finished
        return out

    def close(self) -> None:
        if not self.finished and self.req is not None:
            self.finished = True
            self.abort(self.req)

    async def collect(self) -> RequestOutput:
        """The whole request as one output; aborts it if the caller goes away first."""
        try:
            return merge_outputs([out async for out in self])
        finally:
            self.close()

    async def chunks(self) -> AsyncIterator[RequestOutput]:
        """Outputs as they come, with whatever else is already queued folded into the same
        chunk: fewer messages downstream when the consumer is slower than the engine."""
        try:
            async for out in self:
                yield merge_outputs([out, *self.drain_nowait()])
        finally:
            self.close()


def merge_outputs(outs: list[RequestOutput]) -> RequestOutput:
    """Fold consecutive outputs of one request into one (text and tokens concatenated)."""
    last = outs[-1]
    if len(outs) == 1:
        return last
    return RequestOutput(
        prompt_text=outs[0].prompt_text,
        prompt_logprobs=outs[0].prompt_logprobs,
        request_id=last.request_id,
        text="".join(o.text for o in outs),
        token_ids=[t for o in outs for t in o.token_ids],
        finished=last.finished,
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        logprobs=None if all(o.logprobs is None for o in outs) else [lp for o in outs for lp in (o.logprobs or [])],
    )
