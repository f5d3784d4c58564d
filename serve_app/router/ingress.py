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
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import metrics
from serve_app.adapters.ids import validate_adapter_id
from serve_app.adapters.local import LocalAdapterStore
from serve_app.api import sse
from serve_app.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    UsageInfo,
    error_body,
    error_status,
    random_id,
    validation_error_body,
)
from serve_app.config import AppConfig
from serve_app.deployments.lora import GenerateRequest
from serve_app.engine.engine import RequestOutput
from serve_app.errors import AdapterNotFoundError, EngineOverloadedError, ServeAppError

logger = logging.getLogger("ray.serve")

MODEL_HEADER = "serve_multiplexed_model_id"
SERVED_BY = "x-served-by"

app = FastAPI(title="serve-app: multi-tenant LoRA inference", version="0.1.0")


def unwrap(exc: BaseException) -> BaseException:
    """The client-facing exception inside Ray's wrappers (RayTaskError keeps it as .cause)."""
    from ray import exceptions as rex

    seen = 0
    while isinstance(exc, rex.RayTaskError) and getattr(exc, "cause", None) is not None and seen < 8:
        exc, seen = exc.cause, seen + 1
    if isinstance(exc, ServeAppError):
        return exc
    if isinstance(exc, (rex.ActorDiedError, rex.ActorUnavailableError)) or type(exc).__name__ == "BackPressureError":
        return EngineOverloadedError(f"a LoRA replica is unavailable ({type(exc).__name__}); retry shortly")
    return exc


def error_response(exc: BaseException, path: str = "lora") -> JSONResponse:
    exc = unwrap(exc)
    status = error_status(exc)
    if status >= 500:
        logger.error("request failed: %r", exc, exc_info=exc)
    return JSONResponse(error_body(exc), status_code=status, headers={SERVED_BY: path})


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse(validation_error_body(exc), status_code=400)


async def _respond(impl, body, header: str | None, stream: bool):
    """Run a completion implementation and answer over HTTP, errors in OpenAI's shape."""
    try:
        if stream:
            path, chunks = impl(body, header)
            return await _sse_response(chunks, path)
        path, resp = await impl(body, header)
    except Exception as e:
        return error_response(e)
    return JSONResponse(resp.model_dump(), headers={SERVED_BY: path})


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
            await chunks.aclose()
        yield sse.DONE

    return StreamingResponse(
        events(), media_type=sse.MEDIA_TYPE, headers={**sse.HEADERS, SERVED_BY: path}
    )


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several prompts' streams as their chunks arrive, tagged with the prompt index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
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


@serve.ingress(app)
class Router:
    def __init__(self, lora: DeploymentHandle, merged: DeploymentHandle | None, app_config: dict):
        cfg = AppConfig.model_validate(app_config)
        _, adapters_dir = cfg.resolve_paths()
        self.lora = lora
        self.merged = merged
        self.store = LocalAdapterStore(adapters_dir)
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

    # ---- resolution and forwarding -------------------------------------------------------------

    def _resolve(self, model: str, header: str | None = None) -> tuple[str | None, str]:
        """(adapter ID or None for the base model, serving path 'lora' | 'merged')."""
        name = header or model
        if name == self.base_model_name:
            adapter_id = None
        else:
            validate_adapter_id(name)
            if not self.store.exists(name):
                raise AdapterNotFoundError(
                    f"model '{name}' does not exist; GET /v1/models lists the base model and the adapters"
                )
            adapter_id = name
        path = self.promoter.path_for(adapter_id) if self.promoter is not None and adapter_id else "lora"
        metrics.ROUTER_PATH.inc(tags={"path": path})
        metrics.REQUESTS.inc(tags={"adapter": adapter_id or self.base_model_name, "path": path})
        return adapter_id, path

    def _handle(self, adapter_id: str | None, path: str, stream: bool) -> DeploymentHandle:
        h = self.merged if path == "merged" else self.lora
        if adapter_id is not None:
            h = h.options(multiplexed_model_id=adapter_id)
        return h.options(stream=True) if stream else h

    async def _generate(self, adapter_id: str | None, path: str, req: GenerateRequest) -> RequestOutput:
        try:
            out = await self._handle(adapter_id, path, stream=False).generate.remote(req)
        except Exception as e:
            raise unwrap(e) from None
        metrics.GENERATED_TOKENS.inc(out.completion_tokens, tags={"adapter": adapter_id or self.base_model_name})
        return out

    async def _generate_stream(
        self, adapter_id: str | None, path: str, req: GenerateRequest
    ) -> AsyncIterator[RequestOutput]:
        t0 = time.perf_counter()
        first = True
        try:
            async for out in self._handle(adapter_id, path, stream=True).generate_stream.remote(req):
                if first:
                    metrics.TTFT.observe(time.perf_counter() - t0, tags={"path": path})
                    first = False
                if out.finished:
                    metrics.GENERATED_TOKENS.inc(
                        out.completion_tokens, tags={"adapter": adapter_id or self.base_model_name}
                    )
                yield out
        except Exception as e:
            raise unwrap(e) from None
        finally:
            metrics.LATENCY.observe(time.perf_counter() - t0, tags={"path": path})

    # ---- the API, for HTTP routes and Python handles alike --------------------------------------

    async def models(self) -> ModelList:
        cards = [ModelCard(id=self.base_model_name, owned_by="serve-app")]
        cards += [ModelCard(id=a, owned_by="tenant", parent=self.base_model_name) for a in self.store.list_ids()]
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

    # ---- implementations: each returns the serving path with the result ---------------------------

    async def _completions(self, request: CompletionRequest, header: str | None) -> tuple[str, CompletionResponse]:
        adapter_id, path = self._resolve(request.model, header)
        params = request.to_sampling_params(self.default_max_tokens)
        t0 = time.perf_counter()
        outs = await asyncio.gather(
            *(self._generate(adapter_id, path, GenerateRequest(params=params, prompt=p)) for p in request.prompts())
        )
        metrics.LATENCY.observe(time.perf_counter() - t0, tags={"path": path})
        return path, CompletionResponse(
            model=header or request.model,
            choices=[
                CompletionResponseChoice(index=i, text=o.text, finish_reason=o.finish_reason)
                for i, o in enumerate(outs)
            ],
            usage=UsageInfo.of(sum(o.prompt_tokens for o in outs), sum(o.completion_tokens for o in outs)),
        )

    def _completions_stream(self, request: CompletionRequest, header: str | None):
        adapter_id, path = self._resolve(request.model, header)
        params = request.to_sampling_params(self.default_max_tokens)
        model = header or request.model
        cid = random_id("cmpl")

        async def chunks() -> AsyncIterator[CompletionStreamResponse]:
            usage = [0, 0]
            streams = [
                self._generate_stream(adapter_id, path, GenerateRequest(params=params, prompt=p))
                for p in request.prompts()
            ]
            async for i, out in _merge(streams):
                if out.text or out.finished:
                    yield CompletionStreamResponse(
                        id=cid, model=model,
                        choices=[CompletionResponseStreamChoice(index=i, text=out.text, finish_reason=out.finish_reason)],
                    )
                if out.finished:
                    usage[0] += out.prompt_tokens
                    usage[1] += out.completion_tokens
            if request.include_usage:
                yield CompletionStreamResponse(id=cid, model=model, choices=[], usage=UsageInfo.of(*usage))

        return path, chunks()

    def _chat_request(self, request: ChatCompletionRequest) -> GenerateRequest:
        return GenerateRequest(
            params=request.to_sampling_params(self.default_max_tokens),
            messages=[m.model_dump() for m in request.messages],
        )

    async def _chat(self, request: ChatCompletionRequest, header: str | None) -> tuple[str, ChatCompletionResponse]:
        adapter_id, path = self._resolve(request.model, header)
        t0 = time.perf_counter()
        out = await self._generate(adapter_id, path, self._chat_request(request))
        metrics.LATENCY.observe(time.perf_counter() - t0, tags={"path": path})
        return path, ChatCompletionResponse(
            model=header or request.model,
            choices=[
                ChatCompletionResponseChoice(
                    index=0, message=ChatResponseMessage(content=out.text), finish_reason=out.finish_reason
                )
            ],
            usage=UsageInfo.of(out.prompt_tokens, out.completion_tokens),
        )

    def _chat_stream(self, request: ChatCompletionRequest, header: str | None):
        adapter_id, path = self._resolve(request.model, header)
        gen_request = self._chat_request(request)
        model = header or request.model
        cid = random_id("chatcmpl")

        def chunk(delta: DeltaMessage, finish_reason=None) -> ChatCompletionStreamResponse:
            return ChatCompletionStreamResponse(
                id=cid, model=model,
                choices=[ChatCompletionResponseStreamChoice(index=0, delta=delta, finish_reason=finish_reason)],
            )

        async def chunks() -> AsyncIterator[ChatCompletionStreamResponse]:
            first = True
            async for out in self._generate_stream(adapter_id, path, gen_request):
                if first:
                    # OpenAI's first chunk carries the role; sent once the request is accepted.
                    yield chunk(DeltaMessage(role="assistant", content=""))
                    first = False
                if out.text:
                    yield chunk(DeltaMessage(content=out.text))
                if out.finished:
                    yield chunk(DeltaMessage(), out.finish_reason)
                    if request.include_usage:
                        yield ChatCompletionStreamResponse(
                            id=cid, model=model, choices=[],
                            usage=UsageInfo.of(out.prompt_tokens, out.completion_tokens),
                        )

        return path, chunks()

    # ---- HTTP routes ----------------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/v1/models")
    async def http_models(self):
        return JSONResponse((await self.models()).model_dump())

    @app.get("/admin/merged")
    async def http_merged_state(self):
        return JSONResponse(await self.merged_state())

    @app.post("/v1/completions")
    async def http_completions(self, body: CompletionRequest, raw: Request):
        return await _respond(self._completions_stream if body.stream else self._completions,
                              body, raw.headers.get(MODEL_HEADER), body.stream)

    @app.post("/v1/chat/completions")
    async def http_chat(self, body: ChatCompletionRequest, raw: Request):
        return await _respond(self._chat_stream if body.stream else self._chat,
                              body, raw.headers.get(MODEL_HEADER), body.stream)
