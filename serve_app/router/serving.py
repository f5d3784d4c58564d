"""OpenAI's API <-> the engine's: completions and chat, whole or streamed.

As vLLM's serving_completion.py / serving_chat.py: an OpenAI request becomes one
``GenerateRequest`` per sequence (prompts x n; best_of's candidates), forwarded (router/forward.py),
and their ``RequestOutput``s become OpenAI's response or its stream of chunks: choices in OpenAI's
order (prompt i's choice j at i * n + j), best_of's ranking, echo (the client's own prompt text,
or the engine's decoding of token IDs, with the prompt's logprobs first), usage, one stream
merged from a batch's streams.

What a request resolves to is decided once, in a ``ResolvedRequest``: the model name (the model
header, else the body's ``model``), the tenant it counts for, its sampling parameters per
sequence, and, when the router counted its prompt's tokens (router/admission.py), their IDs,
which go to the replica instead of the text (it does not tokenize again).

A response with more logprob entries than ``LARGE_RESPONSE_ENTRIES`` is built and JSON-encoded
on a worker thread, not on the event loop.

A mixin of the Router (router/ingress.py), over ``Forwarder``; it also reads the router's
``default_max_tokens``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import anyio
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve_app import metrics
from serve_app.api import sse
from serve_app.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    UsageInfo,
    random_id,
)
from serve_app.api.sampling_params import SamplingParams
from serve_app.api.wire import GenerateRequest, RequestOutput
from serve_app.errors import unwrap
from serve_app.router.forward import Forwarder, all_settled
from serve_app.router.middleware import SERVED_BY, error_response

logger = logging.getLogger("ray.serve")

# A response carrying more logprob entries than this is built and JSON-encoded on a worker thread
# (one choice at a time), not on the event loop: ~1 us per entry, so this is ~20 ms of the loop.
LARGE_RESPONSE_ENTRIES = 20_000
_build_pool: concurrent.futures.ThreadPoolExecutor | None = None


@dataclass(frozen=True, slots=True)
class ResolvedRequest:
    """An OpenAI request's decisions, made once: at admission for HTTP (router/admission.py), by
    the handle method for a Python caller."""

    model: str  # the name asked for: the model header, else the body's ``model``; responses echo it
    tenant: str  # who it counts for: the API key's tenant, else ``model`` (limits, fair admission, merged slots)
    params: SamplingParams  # as the request asks (what admission checks)
    choices: list[SamplingParams]  # one per sequence of a prompt: n, or best_of's candidates; seed + j each
    prompt_ids: list[list[int]] | None = None  # each prompt's token IDs as the router counted them: sent instead
    cache_salt: str | None = None  # the caller's prefix-cache salt (auth.TenantPrincipal.cache_salt)

    @classmethod
    def of(cls, request: CompletionRequest | ChatCompletionRequest, default_max_tokens: int, *, model: str,
           tenant: str | None = None, prompt_ids: list[list[int]] | None = None,
           cache_salt: str | None = None) -> "ResolvedRequest":
        params = request.to_sampling_params(default_max_tokens)
        ranked = params
        if request.sequences > request.n and params.logprobs is None:
            ranked = dataclasses.replace(params, logprobs=0)  # best_of ranks by cumulative logprob: the engine reports them
        return cls(model, tenant or model, params, request.choice_params(ranked), prompt_ids, cache_salt)

    def generate_requests(self, request: CompletionRequest | ChatCompletionRequest) -> list[GenerateRequest]:
        """One engine request per sequence, prompt i's choice j at i * len(choices) + j (OpenAI's
        order). The prompt: its token IDs when the router counted them, else as the client sent it
        (text, token IDs, or chat messages, which the replica renders)."""
        if self.prompt_ids is not None:
            prompts = [{"prompt": ids} for ids in self.prompt_ids]
        elif isinstance(request, ChatCompletionRequest):
            prompts = [{"messages": [m.model_dump() for m in request.messages]}]
        else:
            prompts = [{"prompt": p} for p in request.prompts()]
        return [GenerateRequest(params=cp, tenant=self.tenant, cache_salt=self.cache_salt, **prompt)
                for prompt in prompts for cp in self.choices]


class OpenAIServing(Forwarder):
    """Completions and chat, each returning (serving path, response or chunk stream)."""

    def _resolved(self, request, header: str | None = None, tenant: str | None = None) -> ResolvedRequest:
        """A Python handle caller's request: trusted, not limited, its prompt sent as given."""
        return ResolvedRequest.of(request, self.default_max_tokens, model=header or request.model, tenant=tenant)

    async def _completions(self, request: CompletionRequest, rr: ResolvedRequest) -> tuple[str, CompletionResponse]:
        adapter_id, path = self._resolve(rr.model, tenant=rr.tenant)
        k, n = request.sequences, request.n
        prompts = request.prompts()  # the client's own: echo sends its text back as given
        t0 = time.perf_counter()
        outs = await all_settled([self._generate(adapter_id, path, r) for r in rr.generate_requests(request)])
        metrics.LATENCY.observe(time.perf_counter() - t0, tags={"path": path})

        def build() -> CompletionResponse:
            kept = []  # (prompt, output) of each returned choice
            for pi, p in enumerate(prompts):
                group = outs[pi * k : (pi + 1) * k]
                if k > n:  # best_of: the n most likely sequences, best first
                    group = sorted(group, key=lambda o: -sum(e.logprob for e in o.logprobs or []))[:n]
                kept += [(p, o) for o in group]
            strip = request.logprobs is None  # logprobs the client did not ask for (best_of's ranking)
            return CompletionResponse(
                model=rr.model,
                choices=[
                    CompletionResponseChoice(
                        index=i, text=_echoed(request, p, o) + o.text, finish_reason=o.finish_reason,
                        logprobs=None if strip or o.logprobs is None else CompletionLogprobs.of(_echo_logprobs(request, o)),
                    )
                    for i, (p, o) in enumerate(kept)
                ],
                # Usage counts every sequence generated, best_of's discarded ones too.
                usage=UsageInfo.of(sum(o.prompt_tokens for o in outs), sum(o.completion_tokens for o in outs)),
            )

        return path, (await _off_loop(build) if _logprob_entries(outs) > LARGE_RESPONSE_ENTRIES else build())

    def _completions_stream(self, request: CompletionRequest, rr: ResolvedRequest):
        adapter_id, path = self._resolve(rr.model, tenant=rr.tenant)
        per_prompt = len(rr.choices)
        cid = random_id("cmpl")

        async def chunks() -> AsyncIterator[CompletionStreamResponse]:
            usage = [0, 0]
            prompts = request.prompts()
            streams = [self._generate_stream(adapter_id, path, r) for r in rr.generate_requests(request)]
            sent: dict[int, int] = {}  # choice -> characters sent (logprobs' text_offset)
            seen: set[int] = set()  # choices whose first output arrived (echo rides on it)
            async with contextlib.aclosing(_merge(streams)) as merged:  # closed with this stream
                async for i, out in merged:
                    first = i not in seen
                    seen.add(i)
                    text = (_echoed(request, prompts[i // per_prompt], out) if first else "") + out.text
                    if text or out.finished or out.logprobs or (first and request.echo):
                        entries = _echo_logprobs(request, out) if first else out.logprobs
                        lp = None if entries is None else CompletionLogprobs.of(entries, sent.get(i, 0))
                        sent[i] = sent.get(i, 0) + len(text)
                        yield CompletionStreamResponse(
                            id=cid, model=rr.model,
                            choices=[CompletionResponseStreamChoice(index=i, text=text, finish_reason=out.finish_reason,
                                                                    logprobs=lp)],
                        )
                    if out.finished:
                        usage[0] += out.prompt_tokens
                        usage[1] += out.completion_tokens
            if request.include_usage:
                yield CompletionStreamResponse(id=cid, model=rr.model, choices=[], usage=UsageInfo.of(*usage))

        return path, chunks()

    async def _chat(self, request: ChatCompletionRequest, rr: ResolvedRequest) -> tuple[str, ChatCompletionResponse]:
        adapter_id, path = self._resolve(rr.model, tenant=rr.tenant)
        t0 = time.perf_counter()
        outs = await all_settled([self._generate(adapter_id, path, r) for r in rr.generate_requests(request)])
        metrics.LATENCY.observe(time.perf_counter() - t0, tags={"path": path})

        def build() -> ChatCompletionResponse:
            return ChatCompletionResponse(
                model=rr.model,
                choices=[
                    ChatCompletionResponseChoice(
                        index=j, message=ChatResponseMessage(content=out.text), finish_reason=out.finish_reason,
                        logprobs=None if out.logprobs is None else ChatLogprobs.of(out.logprobs),
                    )
                    for j, out in enumerate(outs)
                ],
                usage=UsageInfo.of(outs[0].prompt_tokens * len(outs), sum(o.completion_tokens for o in outs)),
            )

        return path, (await _off_loop(build) if _logprob_entries(outs) > LARGE_RESPONSE_ENTRIES else build())

    def _chat_stream(self, request: ChatCompletionRequest, rr: ResolvedRequest):
        adapter_id, path = self._resolve(rr.model, tenant=rr.tenant)
        gen_requests = rr.generate_requests(request)
        cid = random_id("chatcmpl")

        def chunk(j: int, delta: DeltaMessage, finish_reason=None, logprobs=None) -> ChatCompletionStreamResponse:
            return ChatCompletionStreamResponse(
                id=cid, model=rr.model,
                choices=[ChatCompletionResponseStreamChoice(
                    index=j, delta=delta, finish_reason=finish_reason,
                    logprobs=None if logprobs is None else ChatLogprobs.of(logprobs),
                )],
            )

        async def chunks() -> AsyncIterator[ChatCompletionStreamResponse]:
            started: set[int] = set()
            usage = [0, 0]
            streams = [self._generate_stream(adapter_id, path, r) for r in gen_requests]
            async with contextlib.aclosing(_merge(streams)) as merged:  # closed with this stream
                async for j, out in merged:
                    if j not in started:
                        # OpenAI's first chunk of a choice carries the role; sent once it is accepted.
                        yield chunk(j, DeltaMessage(role="assistant", content=""))
                        started.add(j)
                    # A step whose text the detokenizer holds back (half a UTF-8 character) still sends its logprobs.
                    body = bool(out.text) or (bool(out.logprobs) and not out.finished)
                    if body:
                        yield chunk(j, DeltaMessage(content=out.text), logprobs=out.logprobs)
                    if out.finished:
                        yield chunk(j, DeltaMessage(), out.finish_reason, logprobs=None if body else out.logprobs)
                        usage[0] += out.prompt_tokens
                        usage[1] += out.completion_tokens
            if request.include_usage:
                yield ChatCompletionStreamResponse(id=cid, model=rr.model, choices=[], usage=UsageInfo.of(*usage))

        return path, chunks()


# --------------------------------------------------------------------------- assembly helpers


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several prompts' streams as their chunks arrive, tagged with the prompt index.

    The first error is raised after every other stream has been cancelled and has settled (each
    one's request aborted on its replica: streams.settle), and so is the end of a merge the
    consumer closes early; the tenant's lease (``Lease.guard``) is released only after that.
    """
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, s):
        try:
            async for out in s:
                await queue.put((i, out))
        except BaseException as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _echoed(request: CompletionRequest, prompt, out) -> str:
    """echo: the prompt text to put before a choice's first output (the client's own string, or the
    engine's decoding of token IDs); "" without echo."""
    if not request.echo:
        return ""
    return prompt if isinstance(prompt, str) else (out.prompt_text or "")


def _echo_logprobs(request: CompletionRequest, out) -> list | None:
    """A first output's logprob entries, the prompt's first with echo."""
    if out.logprobs is None:
        return None
    return [*(out.prompt_logprobs or []), *out.logprobs] if request.echo else out.logprobs


# --------------------------------------------------------------------------- HTTP answers


async def json_response(resp, path: str):
    """The HTTP answer of a whole (non-streamed) response; a large one is encoded off the loop."""
    headers = {SERVED_BY: path}
    if _response_entries(resp) <= LARGE_RESPONSE_ENTRIES:
        return JSONResponse(resp.model_dump(), headers=headers)
    return Response(await _off_loop(_encode, resp), media_type="application/json", headers=headers)


async def sse_response(chunks: AsyncIterator, path: str = "lora"):
    """Wait for the first chunk before answering 200, so early errors keep their status code."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    except Exception as e:
        return error_response(e, path)

    async def events():
        try:
            if first is not None:
                yield sse.encode_event(first)
            async for c in chunks:
                yield sse.encode_event(c)
        except Exception as e:  # after the 200: report in-band, as vLLM does
            e = unwrap(e)
            logger.warning("stream failed after it started: %r", e)
            yield sse.encode_error(e)
        finally:
            # Shielded: a client that went away cancels this scope, and closing the chunks
            # cancels the batch's requests on their replicas and waits for them (the lease
            # is released after that), which must not be cut short by that cancellation.
            with anyio.CancelScope(shield=True):
                await chunks.aclose()
        yield sse.DONE

    return StreamingResponse(
        events(), media_type=sse.MEDIA_TYPE, headers={**sse.HEADERS, SERVED_BY: path}
    )


async def _off_loop(fn: Callable, *args):
    """``fn(*args)`` on the router's response-building threads: a dedicated pool, so that large
    responses queue behind each other, never behind (or in front of) the default executor's
    prompt tokenizing. The loop keeps serving other requests meanwhile (the worker gives up the
    GIL every switch interval, and each pydantic-core call it makes covers one choice)."""
    global _build_pool
    if _build_pool is None:
        _build_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="response-build")
    return await asyncio.get_running_loop().run_in_executor(_build_pool, fn, *args)


def _logprob_entries(outs) -> int:
    """Logprob entries the engine outputs ``outs`` carry (positions x (alternatives + 1)), cheaply."""
    total = 0
    for o in outs:
        for entries in (o.logprobs, o.prompt_logprobs):
            if entries:
                top = entries[-1].top
                total += len(entries) * (1 + (len(top) if top else 0))
    return total


def _response_entries(resp) -> int:
    """Logprob entries of a built response (completions or chat), cheaply."""
    total = 0
    for c in resp.choices:
        lp = c.logprobs
        if lp is None:
            continue
        if hasattr(lp, "content"):  # chat
            if lp.content:
                total += len(lp.content) * (1 + len(lp.content[-1].top_logprobs))
        elif lp.tokens:
            top = lp.top_logprobs[-1]
            total += len(lp.tokens) * (1 + (len(top) if top else 0))
    return total


def _encode(resp) -> bytes:
    """``resp`` as JSON bytes, the same document as ``JSONResponse(resp.model_dump())``, built one
    choice at a time (each pydantic-core call holds the GIL for one choice's data only)."""
    head = resp.model_dump(exclude={"choices"})
    parts = []
    for name in type(resp).model_fields:
        if name == "choices":
            value = b"[" + b",".join(c.model_dump_json().encode() for c in resp.choices) + b"]"
        else:
            value = json.dumps(head[name], ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        parts.append(json.dumps(name).encode() + b":" + value)
    return b"{" + b",".join(parts) + b"}"
