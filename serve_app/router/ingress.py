"""The HTTP ingress: OpenAI-compatible routes, and the same API for Python handle callers.

Parse and validate, resolve ``model`` (or the ``serve_multiplexed_model_id`` header) to the
base model or a tenant adapter, forward to the LoRA deployment with
``handle.options(multiplexed_model_id=...)``, and turn results and errors into OpenAI's
shapes. Every response names the path that served it in ``x-served-by``.

Python callers (another Ray app) use ``serve.get_app_handle(app)`` and call ``completions``,
``completions_stream``, ``chat``, ``chat_stream`` or ``models`` with the same request and
response types as HTTP.

No ``from __future__ import annotations`` here: FastAPI must see the routes' real types
after Serve rewrites the methods' signatures.
"""


import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import json
import logging
import time
from typing import AsyncIterator, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import metrics
from serve_app.adapters.ids import validate_adapter_id
from serve_app.api import sse
from serve_app.api.errors import error_body, error_status, http_error_body, retry_after_header, validation_error_body
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
    ModelCard,
    ModelList,
    UsageInfo,
    random_id,
)
from serve_app.api.wire import GenerateRequest, RequestOutput
from serve_app.config import AppConfig
from serve_app.router.auth import Authenticator, AuthMiddleware, principal_of
from serve_app.router.streams import ChannelHub, StreamOutput, settle
from serve_app.router.limits import (
    BodySizeLimitMiddleware,
    Lease,
    TenantLimiter,
    check_unicode,
)
from serve_app.errors import AdapterNotFoundError, ServeAppError, unwrap
from serve_app.router.admin import AdapterAdmin, RegisterAdapterRequest

logger = logging.getLogger("ray.serve")

MODEL_HEADER = "serve_multiplexed_model_id"
SERVED_BY = "x-served-by"

ROUTER_REPLICA = "x-router-replica"

app = FastAPI(title="serve-app: multi-tenant LoRA inference", version="0.1.0")

# The edge checks run before any route parses a body. Router.__init__ fills _EDGE (one Router
# per replica process); until then AuthMiddleware answers 503. Added last = runs first: auth
# (401 / admin 403), then the body size (413).
_EDGE: dict = {"auth": None, "max_body_bytes": None}
app.add_middleware(BodySizeLimitMiddleware, max_bytes=lambda: _EDGE["max_body_bytes"])
app.add_middleware(AuthMiddleware, authenticator=lambda: _EDGE["auth"])


class RouterReplicaHeader:
    """Pure ASGI: every response names the router replica that answered it (``x-router-replica``,
    Serve's replica ID), so operators and tests can tell replicas apart. Computed once per process."""

    _value: bytes | None = None

    def __init__(self, app):
        self.app = app

    @classmethod
    def value(cls) -> bytes:
        if cls._value is None:
            try:
                rid = serve.get_replica_context().replica_id
                cls._value = str(getattr(rid, "unique_id", rid)).encode("latin-1", "replace")
            except Exception:  # outside a replica (unit tests): no ID to give
                cls._value = b"unknown"
        return cls._value

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", ()), (ROUTER_REPLICA.encode(), self.value())]}
            await send(msg)

        return await self.app(scope, receive, send_with_header)


app.add_middleware(RouterReplicaHeader)  # outermost: also on 401 / 413 answers


REPLICA_RETRIES = 1  # retries of a request whose replica died before it sent anything
# A response carrying more logprob entries than this is built and JSON-encoded on a worker thread
# (one choice at a time), not on the event loop: ~1 us per entry, so this is ~20 ms of the loop.
LARGE_RESPONSE_ENTRIES = 20_000
_build_pool: concurrent.futures.ThreadPoolExecutor | None = None


def freeze_startup_objects() -> None:
    """Take every object alive now (Ray, FastAPI, pydantic's schemas: ~130k in a router) out of
    the cyclic collector's reach (``gc.freeze``). A full collection walks every tracked object
    with the GIL held, wherever it runs; the allocations of a large response trigger them, and on
    benchmarks/response_stall.py one held the event loop for ~300 ms (~40 ms once frozen).
    Frozen objects are never collected: fine for what a process holds from its start."""
    gc.collect()
    gc.freeze()


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


async def _json_response(resp, path: str):
    """The HTTP answer of a whole (non-streamed) response; a large one is encoded off the loop."""
    headers = {SERVED_BY: path}
    if _response_entries(resp) <= LARGE_RESPONSE_ENTRIES:
        return JSONResponse(resp.model_dump(), headers=headers)
    return Response(await _off_loop(_encode, resp), media_type="application/json", headers=headers)


async def _all_settled(coros: list) -> list:
    """Run a batch's engine requests (prompts x n, best_of candidates, chat's n) together; their
    results in order.

    The first failure cancels the others and is raised only once every one of them has settled:
    each cancelled ``_generate`` cancels its call on its replica and waits for it to end there
    (streams.settle), so the tenant's lease, held around this, is not free while any of the
    batch still generates. Without this, a batch ``[bad prompt, 63 long prompts]`` got its 400 at
    once and left 63 sequences running outside the tenant's concurrency cap. The same holds when
    this task is cancelled (the client went away).
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
    failed = [t for t in tasks if not t.cancelled() and t.exception() is not None]  # each one retrieved
    if failed:
        raise next((t for t in failed if t in done), failed[0]).exception()  # the one that failed first
    return [t.result() for t in tasks]


def _replica_died(exc: BaseException) -> bool:
    from ray import exceptions as rex

    return isinstance(exc, (rex.ActorDiedError, rex.ActorUnavailableError))


def error_response(exc: BaseException, path: str = "lora", *, redact: bool = True) -> JSONResponse:
    """The OpenAI-shaped error answer. ``redact`` (every route but /admin): store URIs and local
    paths are taken out of the message (they stay in the server log), as tenants get it."""
    exc = unwrap(exc)
    status = error_status(exc)
    body = error_body(exc, redact=redact)
    if status >= 500:
        logger.error("request failed: %r", exc, exc_info=exc)
    elif redact and isinstance(exc, ServeAppError) and body["error"]["message"] != exc.message:
        logger.info("request refused (%d): %s", status, exc.message)
    return JSONResponse(body, status_code=status, headers={SERVED_BY: path, **retry_after_header(exc)})


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse(validation_error_body(exc), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """Unknown route (404), wrong method (405), undecodable body (400): OpenAI's shape, not {"detail"}."""
    return JSONResponse(
        http_error_body(exc.status_code, exc.detail), status_code=exc.status_code, headers=getattr(exc, "headers", None)
    )


async def _respond(impl, body, header: str | None, stream: bool, lease: Lease):
    """Run a completion implementation and answer over HTTP, errors in OpenAI's shape.

    ``lease`` (the tenant's concurrency slot) is held until the response ends: the whole
    call, or the whole stream. Its tenant is also the engine's fair-admission key.
    """
    try:
        if stream:
            path, chunks = impl(body, header, lease.tenant)
            return await _sse_response(lease.guard(chunks), path)
        async with lease:
            path, resp = await impl(body, header, lease.tenant)
    except Exception as e:
        lease.release()
        return error_response(e)
    return await _json_response(resp, path)


@app.exception_handler(Exception)
async def _any_error(request: Request, exc: Exception):
    return error_response(exc)


async def _sse_response(chunks: AsyncIterator, path: str = "lora"):
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


@serve.ingress(app)
class Router:
    def __init__(self, lora: DeploymentHandle, merged: DeploymentHandle | None, app_config: dict):
        cfg = AppConfig.model_validate(app_config)
        base_path, adapters_dir = cfg.resolve_paths()
        self.auth = Authenticator.from_config(cfg.auth)  # logs a warning when auth is off
        # Prompts per request are capped at max_num_seqs even without a limits config.
        self.limiter = TenantLimiter.from_config(cfg.limits, tokenizer_path=base_path, max_num_seqs=cfg.max_num_seqs)
        self.limiter.vocab_size  # read now (config.json), not on the first request's event loop turn
        _EDGE.update(auth=self.auth, max_body_bytes=cfg.limits.max_body_bytes)
        self.lora = lora
        self.merged = merged
        self.streams = ChannelHub(cfg.stream_interval_ms / 1000, chunks_per_s=cfg.stream_chunks_per_s)  # one channel per engine replica
        self._handles: dict[tuple[str, str | None, bool], DeploymentHandle] = {}
        self.admin = AdapterAdmin(adapters_dir, cfg.store, lora)  # tenant -> id@version, lifecycle API
        self.base_model_name = cfg.base_model_name
        self.default_max_tokens = cfg.default_max_tokens
        self.promoter = None
        if merged is not None:
            from serve_app.router.policy import POLICY_ACTOR_NAME, get_or_create_policy_actor
            from serve_app.router.promoter import Promoter

            # One policy per application, shared by all its router replicas.
            app_name = serve.get_replica_context().app_name
            actor = get_or_create_policy_actor(cfg.policy, name=f"{POLICY_ACTOR_NAME}:{app_name}")
            self.promoter = Promoter(actor, merged)
            # Start syncing now, so static hot tenants are merged before their first request.
            try:
                self.promoter.start(asyncio.get_running_loop())
            except RuntimeError:  # constructed outside the replica's loop: starts on first request
                pass
        freeze_startup_objects()

    # ---- HTTP admission: the caller may use this model (403), within its limits (400 / 429) ---------

    async def _admit(self, raw: Request, body, header: str | None) -> Lease:
        name = header or body.model
        adapter_id = None if name == self.base_model_name else name
        principal = principal_of(raw, self.auth)  # 401 if the middleware left no caller: never admin
        check_unicode(body, name)  # a lone surrogate would fail in the tokenizer (or in an echo) as a 500
        # Before the adapter is looked up: the answer must not depend on whether it exists.
        self.auth.authorize(principal, adapter_id)
        # Token IDs outside the vocabulary: 400 here, before any prompt of the batch reaches a replica.
        self.limiter.check_token_ids(body)  # (400 first if it holds more than max_num_seqs prompts)
        counts = await self.limiter.count_prompts(body)
        if body.sequences > 1:  # every choice (best_of: candidate) is its own sequence: against the same limits
            counts = [c for c in counts for _ in range(body.sequences)]
            self.limiter.check_prompt_count(len(counts))
        params = body.to_sampling_params(self.default_max_tokens)
        max_tokens = params.max_tokens
        # The response's size (logprob entries), before anything is generated.
        self.limiter.check_response_size(counts, max_tokens, params.logprobs, params.echo)
        # The lease's tenant keys the limits and the engine's fair admission (GenerateRequest.tenant):
        # the API key's tenant, so its adapters and its base-model requests share one share; with
        # auth off, each model is its own "tenant".
        return self.limiter.admit(principal.tenant or name, counts, max_tokens)

    # ---- resolution and forwarding -------------------------------------------------------------

    def _resolve(self, model: str, header: str | None = None, tenant: str | None = None) -> tuple[str | None, str]:
        """(multiplexed model ID or None for the base model, serving path 'lora' | 'merged').

        On both paths the ID is the tenant's current version, ``<id>@v<n>`` (router/admin.py): the
        merged path serves it only if its ready copy holds exactly that version (router/promoter.py).
        ``tenant`` (the lease's: the API key's tenant, or the model with auth off) owns the request's
        count toward the path policy's merged slots, which are capped per owner.
        """
        name = header or model
        versioned = None
        if name == self.base_model_name:
            adapter_id = None
        else:
            validate_adapter_id(name)
            versioned = self.admin.resolve(name)  # 404 unknown or deleted, 503 store unreachable
            adapter_id = name
        path = (self.promoter.path_for(adapter_id, versioned, owner=tenant or name)
                if self.promoter is not None and adapter_id else "lora")
        metrics.ROUTER_PATH.inc(tags={"path": path})
        metrics.REQUESTS.inc(tags={"adapter": adapter_id or self.base_model_name, "path": path})
        return versioned, path

    def _handle(self, adapter_id: str | None, path: str, stream: bool) -> DeploymentHandle:
        """The deployment's handle configured for this adapter, cached: ``options()`` builds a new
        handle (and its routing state) on every call, per request, as Ray's LLM router notes too."""
        key = (path, adapter_id, stream)
        h = self._handles.get(key)
        if h is None:
            h = self.merged if path == "merged" else self.lora
            if adapter_id is not None:
                h = h.options(multiplexed_model_id=adapter_id)
            h = h.options(stream=True) if stream else h
            if len(self._handles) >= 4096:  # one per (path, adapter version) in use: bounded anyway
                self._handles.pop(next(iter(self._handles)))
            self._handles[key] = h
        return h

    async def _generate(self, adapter_id: str | None, path: str, req: GenerateRequest) -> RequestOutput:
        for attempt in range(REPLICA_RETRIES + 1):
            call = self._handle(adapter_id, path, stream=False).generate.remote(req)
            try:
                out = await call
                break
            except asyncio.CancelledError:
                # A sibling in the batch failed, or the client went away. Cancelling the task
                # that awaits a DeploymentResponse does not reach the replica: cancel() does.
                # Return (the lease is released) only once the replica has let go of it.
                await settle(call)
                raise
            except Exception as e:
                # Nothing has reached the client yet, so a request whose replica died under it
                # (killed, OOM) is retried on a live one instead of being lost.
                if attempt < REPLICA_RETRIES and _replica_died(e):
                    logger.warning("a %s replica died under a request; retrying it on another replica", path)
                    continue
                raise unwrap(e) from None
        metrics.GENERATED_TOKENS.inc(out.completion_tokens, tags={"adapter": adapter_id or self.base_model_name})
        return out

    async def _generate_stream(
        self, adapter_id: str | None, path: str, req: GenerateRequest
    ) -> AsyncIterator[StreamOutput]:
        t0 = time.perf_counter()
        req.request_id = req.request_id or random_id("req")  # the channel's key for this request's text
        first = True
        try:
            for attempt in range(REPLICA_RETRIES + 1):
                try:
                    if req.params.logprobs is not None or req.params.echo:  # per-token data / the prompt echoed:
                        # the request's own stream, not a channel (text only)
                        source = self._direct_stream(adapter_id, path, req)
                    else:
                        source = self.streams.stream(self._handle(adapter_id, path, stream=False), path, req)
                    # aclosing: a consumer that closes this stream early (a sibling failed, the
                    # client left) closes the source too, at once, which aborts it on its replica;
                    # an abandoned generator would only be closed whenever it is collected.
                    async with contextlib.aclosing(source):
                        async for out in source:
                            if first:
                                metrics.TTFT.observe(time.perf_counter() - t0, tags={"path": path})
                                first = False
                            if out.finished:
                                metrics.GENERATED_TOKENS.inc(
                                    out.completion_tokens, tags={"adapter": adapter_id or self.base_model_name}
                                )
                            yield out
                    break
                except Exception as e:
                    # Only a stream that has sent nothing is retried: a started one would repeat text.
                    if first and attempt < REPLICA_RETRIES and _replica_died(e):
                        logger.warning("a %s replica died before a stream started; retrying it", path)
                        continue
                    raise
        except Exception as e:
            raise unwrap(e) from None
        finally:
            metrics.LATENCY.observe(time.perf_counter() - t0, tags={"path": path})

    async def _direct_stream(self, adapter_id: str | None, path: str, req: GenerateRequest) -> AsyncIterator[StreamOutput]:
        """One Serve message per engine step's output: for requests that need each token's data
        (logprobs), which the channels (text only) do not carry."""
        call = self._handle(adapter_id, path, stream=True).generate_stream.remote(req)
        ended = False  # the call ended on the replica: its last output or its error came back
        try:
            async for out in call:
                ended = out.finished
                yield StreamOutput(out.text, out.finished, out.finish_reason, out.prompt_tokens,
                                   out.completion_tokens, out.logprobs, out.prompt_text, out.prompt_logprobs)
            ended = True
        except Exception:
            ended = True
            raise
        finally:
            if not ended:  # closed early (a sibling failed, the client left): abort it on the replica
                await settle(call)

    # ---- the API, for HTTP routes and Python handles alike --------------------------------------

    async def models(self) -> ModelList:
        cards = [ModelCard(id=self.base_model_name, owned_by="serve-app")]
        cards += [ModelCard(id=a, owned_by="tenant", parent=self.base_model_name) for a in self.admin.model_ids()]
        return ModelList(data=cards)

    async def completions(self, request: CompletionRequest, header_model: str | None = None) -> CompletionResponse:
        return (await self._completions(request, header_model))[1]

    async def completions_stream(
        self, request: CompletionRequest, header_model: str | None = None
    ) -> AsyncIterator[CompletionStreamResponse]:
        _, chunks = self._completions_stream(request, header_model)
        async for chunk in chunks:
            yield chunk

    async def chat(self, request: ChatCompletionRequest, header_model: str | None = None) -> ChatCompletionResponse:
        return (await self._chat(request, header_model))[1]

    async def chat_stream(
        self, request: ChatCompletionRequest, header_model: str | None = None
    ) -> AsyncIterator[ChatCompletionStreamResponse]:
        _, chunks = self._chat_stream(request, header_model)
        async for chunk in chunks:
            yield chunk

    async def merged_state(self) -> dict:
        """The path policy's view: merged tenants and their state (warming, ready, failed...)."""
        if self.promoter is None:
            return {"enabled": False}
        return {"enabled": True, **(await self.promoter.actor.snapshot.remote())}

    # ---- adapter lifecycle (router/admin.py): Python handle methods and, below, HTTP routes -------

    async def list_adapters(self) -> dict:
        """Adapters with their current version and history."""
        return await self.admin.list_adapters()

    async def register_adapter(self, adapter_id: str, uri: str, warm: bool = True) -> dict:
        """Register or update a tenant's adapter from a URI: a new version, validated, then current."""
        return await self.admin.register_adapter(adapter_id, uri, warm)

    async def delete_adapter(self, adapter_id: str) -> dict:
        """Delete a tenant's adapter: 404 from then on, its memory freed on every replica."""
        return await self.admin.delete_adapter(adapter_id)

    async def warm_adapter(self, adapter_id: str) -> dict:
        """Load a tenant's current version into a LoRA replica now."""
        return await self.admin.warm_adapter(adapter_id)

    @app.get("/admin/adapters")
    async def http_list_adapters(self):
        try:
            return JSONResponse(await self.list_adapters())
        except Exception as e:
            return error_response(e, redact=False)  # operators: full messages

    @app.post("/admin/adapters")
    async def http_register_adapter(self, body: RegisterAdapterRequest):
        try:
            return JSONResponse(await self.register_adapter(body.adapter_id, body.uri, body.warm))
        except Exception as e:
            return error_response(e, redact=False)  # operators: full messages

    @app.delete("/admin/adapters/{adapter_id}")
    async def http_delete_adapter(self, adapter_id: str):
        try:
            return JSONResponse(await self.delete_adapter(adapter_id))
        except Exception as e:
            return error_response(e, redact=False)  # operators: full messages

    @app.post("/admin/adapters/{adapter_id}/warm")
    async def http_warm_adapter(self, adapter_id: str):
        try:
            return JSONResponse(await self.warm_adapter(adapter_id))
        except Exception as e:
            return error_response(e, redact=False)  # operators: full messages

    # ---- implementations: each returns the serving path with the result ---------------------------

    async def _completions(
        self, request: CompletionRequest, header: str | None, tenant: str | None = None
    ) -> tuple[str, CompletionResponse]:
        adapter_id, path = self._resolve(request.model, header, tenant)
        params = request.to_sampling_params(self.default_max_tokens)
        k, n = request.sequences, request.n
        if k > n and params.logprobs is None:  # best_of ranks by cumulative logprob: the engine reports them
            params = dataclasses.replace(params, logprobs=0)
        choices = request.choice_params(params)
        tenant = tenant or header or request.model
        prompts = request.prompts()
        t0 = time.perf_counter()
        outs = await _all_settled([  # choice index = prompt index * n + j, as OpenAI orders them
            self._generate(adapter_id, path, GenerateRequest(params=cp, prompt=p, tenant=tenant))
            for p in prompts for cp in choices
        ])
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
                model=header or request.model,
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

    def _completions_stream(self, request: CompletionRequest, header: str | None, tenant: str | None = None):
        adapter_id, path = self._resolve(request.model, header, tenant)
        choices = request.choice_params(request.to_sampling_params(self.default_max_tokens))
        model = header or request.model
        tenant = tenant or model
        cid = random_id("cmpl")

        async def chunks() -> AsyncIterator[CompletionStreamResponse]:
            usage = [0, 0]
            prompts = request.prompts()
            streams = [
                self._generate_stream(adapter_id, path, GenerateRequest(params=cp, prompt=p, tenant=tenant))
                for p in prompts for cp in choices
            ]
            sent: dict[int, int] = {}  # choice -> characters sent (logprobs' text_offset)
            seen: set[int] = set()  # choices whose first output arrived (echo rides on it)
            async with contextlib.aclosing(_merge(streams)) as merged:  # closed with this stream
                async for i, out in merged:
                    first = i not in seen
                    seen.add(i)
                    text = (_echoed(request, prompts[i // len(choices)], out) if first else "") + out.text
                    if text or out.finished or out.logprobs or (first and request.echo):
                        entries = _echo_logprobs(request, out) if first else out.logprobs
                        lp = None if entries is None else CompletionLogprobs.of(entries, sent.get(i, 0))
                        sent[i] = sent.get(i, 0) + len(text)
                        yield CompletionStreamResponse(
                            id=cid, model=model,
                            choices=[CompletionResponseStreamChoice(index=i, text=text, finish_reason=out.finish_reason,
                                                                    logprobs=lp)],
                        )
                    if out.finished:
                        usage[0] += out.prompt_tokens
                        usage[1] += out.completion_tokens
            if request.include_usage:
                yield CompletionStreamResponse(id=cid, model=model, choices=[], usage=UsageInfo.of(*usage))

        return path, chunks()

    def _chat_requests(self, request: ChatCompletionRequest, tenant: str) -> list[GenerateRequest]:
        """One engine request per choice (``n``)."""
        messages = [m.model_dump() for m in request.messages]
        return [GenerateRequest(params=cp, messages=messages, tenant=tenant)
                for cp in request.choice_params(request.to_sampling_params(self.default_max_tokens))]

    async def _chat(
        self, request: ChatCompletionRequest, header: str | None, tenant: str | None = None
    ) -> tuple[str, ChatCompletionResponse]:
        adapter_id, path = self._resolve(request.model, header, tenant)
        t0 = time.perf_counter()
        outs = await _all_settled([self._generate(adapter_id, path, r)
                                   for r in self._chat_requests(request, tenant or header or request.model)])
        metrics.LATENCY.observe(time.perf_counter() - t0, tags={"path": path})

        def build() -> ChatCompletionResponse:
            return ChatCompletionResponse(
                model=header or request.model,
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

    def _chat_stream(self, request: ChatCompletionRequest, header: str | None, tenant: str | None = None):
        adapter_id, path = self._resolve(request.model, header, tenant)
        model = header or request.model
        gen_requests = self._chat_requests(request, tenant or model)
        cid = random_id("chatcmpl")

        def chunk(j: int, delta: DeltaMessage, finish_reason=None, logprobs=None) -> ChatCompletionStreamResponse:
            return ChatCompletionStreamResponse(
                id=cid, model=model,
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
                yield ChatCompletionStreamResponse(id=cid, model=model, choices=[], usage=UsageInfo.of(*usage))

        return path, chunks()

    # ---- HTTP routes ----------------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/v1/models")
    async def http_models(self, raw: Request):
        # A tenant sees the models its key may use, never other tenants' adapter IDs.
        models = await self.models()
        principal = principal_of(raw, self.auth)
        models.data = [m for m in models.data if principal.may_use(None if m.id == self.base_model_name else m.id)]
        return JSONResponse(models.model_dump())

    @app.get("/admin/merged")
    async def http_merged_state(self):
        return JSONResponse(await self.merged_state())

    @app.post("/v1/completions")
    async def http_completions(self, body: CompletionRequest, raw: Request):
        header = raw.headers.get(MODEL_HEADER)
        try:
            lease = await self._admit(raw, body, header)
        except Exception as e:
            return error_response(e)
        return await _respond(self._completions_stream if body.stream else self._completions,
                              body, header, body.stream, lease)

    @app.post("/v1/chat/completions")
    async def http_chat(self, body: ChatCompletionRequest, raw: Request):
        header = raw.headers.get(MODEL_HEADER)
        try:
            lease = await self._admit(raw, body, header)
        except Exception as e:
            return error_response(e)
        return await _respond(self._chat_stream if body.stream else self._chat,
                              body, header, body.stream, lease)
