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
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

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
    def __init__(self, lora: DeploymentHandle, app_config: dict):
        cfg = AppConfig.model_validate(app_config)
        _, adapters_dir = cfg.resolve_paths()
        self.lora = lora
        self.store = LocalAdapterStore(adapters_dir)
        self.base_model_name = cfg.base_model_name
        self.default_max_tokens = cfg.default_max_tokens

    # ---- resolution and forwarding -------------------------------------------------------------

    def _resolve(self, model: str, header: str | None = None) -> str | None:
        """The adapter ID a request targets, or None for the base model."""
        name = header or model
        if name == self.base_model_name:
            return None
        validate_adapter_id(name)
        if not self.store.exists(name):
            raise AdapterNotFoundError(
                f"model '{name}' does not exist; GET /v1/models lists the base model and the adapters"
            )
        return name

    def _handle(self, adapter_id: str | None, stream: bool) -> DeploymentHandle:
        h = self.lora
        if adapter_id is not None:
            h = h.options(multiplexed_model_id=adapter_id)
        return h.options(stream=True) if stream else h

    async def _generate(self, adapter_id: str | None, req: GenerateRequest) -> RequestOutput:
        try:
            return await self._handle(adapter_id, stream=False).generate.remote(req)
        except Exception as e:
            raise unwrap(e) from None

    async def _generate_stream(self, adapter_id: str | None, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self._handle(adapter_id, stream=True).generate_stream.remote(req):
                yield out
        except Exception as e:
            raise unwrap(e) from None

    # ---- Python API (also used by the HTTP routes) --------------------------------------------

    async def models(self) -> ModelList:
        cards = [ModelCard(id=self.base_model_name, owned_by="serve-app")]
        cards += [ModelCard(id=a, owned_by="tenant", parent=self.base_model_name) for a in self.store.list_ids()]
        return ModelList(data=cards)

    async def completions(self, request: CompletionRequest, header_model: str | None = None) -> CompletionResponse:
        adapter_id = self._resolve(request.model, header_model)
        params = request.to_sampling_params(self.default_max_tokens)
        outs = await asyncio.gather(
            *(self._generate(adapter_id, GenerateRequest(params=params, prompt=p)) for p in request.prompts())
        )
        return CompletionResponse(
            model=request.model if header_model is None else header_model,
            choices=[
                CompletionResponseChoice(index=i, text=o.text, finish_reason=o.finish_reason)
                for i, o in enumerate(outs)
            ],
            usage=UsageInfo.of(sum(o.prompt_tokens for o in outs), sum(o.completion_tokens for o in outs)),
        )

    async def completions_stream(
        self, request: CompletionRequest, header_model: str | None = None
    ) -> AsyncIterator[CompletionStreamResponse]:
        adapter_id = self._resolve(request.model, header_model)
        params = request.to_sampling_params(self.default_max_tokens)
        model = request.model if header_model is None else header_model
        cid = random_id("cmpl")
        usage = [0, 0]
        streams = [
            self._generate_stream(adapter_id, GenerateRequest(params=params, prompt=p)) for p in request.prompts()
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

    def _chat_request(self, request: ChatCompletionRequest) -> GenerateRequest:
        return GenerateRequest(
            params=request.to_sampling_params(self.default_max_tokens),
            messages=[m.model_dump() for m in request.messages],
        )

    async def chat(self, request: ChatCompletionRequest, header_model: str | None = None) -> ChatCompletionResponse:
        adapter_id = self._resolve(request.model, header_model)
        out = await self._generate(adapter_id, self._chat_request(request))
        return ChatCompletionResponse(
            model=request.model if header_model is None else header_model,
            choices=[
                ChatCompletionResponseChoice(
                    index=0, message=ChatResponseMessage(content=out.text), finish_reason=out.finish_reason
                )
            ],
            usage=UsageInfo.of(out.prompt_tokens, out.completion_tokens),
        )

    async def chat_stream(
        self, request: ChatCompletionRequest, header_model: str | None = None
    ) -> AsyncIterator[ChatCompletionStreamResponse]:
        adapter_id = self._resolve(request.model, header_model)
        model = request.model if header_model is None else header_model
        cid = random_id("chatcmpl")

        def chunk(delta: DeltaMessage, finish_reason=None) -> ChatCompletionStreamResponse:
            return ChatCompletionStreamResponse(
                id=cid, model=model,
                choices=[ChatCompletionResponseStreamChoice(index=0, delta=delta, finish_reason=finish_reason)],
            )

        first = True
        async for out in self._generate_stream(adapter_id, self._chat_request(request)):
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
                        id=cid, model=model, choices=[], usage=UsageInfo.of(out.prompt_tokens, out.completion_tokens)
                    )

    # ---- HTTP routes ----------------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/v1/models")
    async def http_models(self):
        return JSONResponse((await self.models()).model_dump())

    @app.post("/v1/completions")
    async def http_completions(self, body: CompletionRequest, raw: Request):
        header = raw.headers.get(MODEL_HEADER)
        if body.stream:
            return await _sse_response(self.completions_stream(body, header))
        try:
            resp = await self.completions(body, header)
        except Exception as e:
            return error_response(e)
        return JSONResponse(resp.model_dump(), headers={SERVED_BY: "lora"})

    @app.post("/v1/chat/completions")
    async def http_chat(self, body: ChatCompletionRequest, raw: Request):
        header = raw.headers.get(MODEL_HEADER)
        if body.stream:
            return await _sse_response(self.chat_stream(body, header))
        try:
            resp = await self.chat(body, header)
        except Exception as e:
            return error_response(e)
        return JSONResponse(resp.model_dump(), headers={SERVED_BY: "lora"})
