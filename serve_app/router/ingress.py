"""The HTTP ingress: OpenAI-compatible routes, and the same API for Python handle callers.

The Router deployment is this module's routes and handle methods over four layers, one file
each, along the request's way (as vLLM's api_server.py over its serving_*.py):

* router/middleware.py: the ASGI edge (replica header, API key, body size) and the error answers;
* router/admission.py: may this caller send this request now (403, 400, 429 + a lease);
* router/serving.py: OpenAI's requests -> engine requests, engine outputs -> OpenAI's responses;
* router/forward.py: the model name -> its current version and path (merged or LoRA) -> the
  replica, with retries and cancellation.

Every response names the path that served it in ``x-served-by``. Python callers (another Ray
app) use ``serve.get_app_handle(app)`` and call ``completions``, ``completions_stream``,
``chat``, ``chat_stream`` or ``models`` with the same request and response types as HTTP; they
are trusted: no API key, no limits.

No ``from __future__ import annotations`` here: FastAPI must see the routes' real types
after Serve rewrites the methods' signatures.
"""


import asyncio
import gc
import logging
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    ModelCard,
    ModelList,
)
from serve_app.router import middleware
from serve_app.router.admin import AdapterAdmin, RegisterAdapterRequest
from serve_app.router.admission import Admission
from serve_app.router.auth import Authenticator, principal_of
from serve_app.router.config import RouterConfig
from serve_app.router.limits import TenantLimiter
from serve_app.router.middleware import error_response
from serve_app.router.serving import OpenAIServing, json_response, sse_response
from serve_app.router.streams import ChannelHub

logger = logging.getLogger("ray.serve")

MODEL_HEADER = "serve_multiplexed_model_id"

app = FastAPI(title="serve-app: multi-tenant LoRA inference", version="0.1.0")
# The edge checks run before any route parses a body; Router.__init__ fills _EDGE (one Router
# per replica process), until then the auth layer answers 503.
_EDGE = middleware.install(app)


def freeze_startup_objects() -> None:
    """Take every object alive now (Ray, FastAPI, pydantic's schemas: ~130k in a router) out of
    the cyclic collector's reach (``gc.freeze``). A full collection walks every tracked object
    with the GIL held, wherever it runs; the allocations of a large response trigger them, and on
    benchmarks/response_stall.py one held the event loop for ~300 ms (~40 ms once frozen).
    Frozen objects are never collected: fine for what a process holds from its start."""
    gc.collect()
    gc.freeze()


async def _for_operator(call: Awaitable[dict]) -> JSONResponse:
    """An /admin route's answer: the result, or the error with its full message (operators call
    these, not tenants: nothing is redacted)."""
    try:
        return JSONResponse(await call)
    except Exception as e:
        return error_response(e, redact=False)


@serve.ingress(app)
class Router(Admission, OpenAIServing):
    def __init__(self, lora: DeploymentHandle, merged: DeploymentHandle | None, config: RouterConfig):
        cfg = config
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
            from serve_app.router.path_policy import POLICY_ACTOR_NAME, get_or_create_policy_actor
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

    # ---- the API, for Python handles (trusted: no key, no limits) -------------------------------

    async def models(self) -> ModelList:
        cards = [ModelCard(id=self.base_model_name, owned_by="serve-app")]
        cards += [ModelCard(id=a, owned_by="tenant", parent=self.base_model_name) for a in self.admin.model_ids()]
        return ModelList(data=cards)

    async def completions(self, request: CompletionRequest, header_model: str | None = None) -> CompletionResponse:
        return (await self._completions(request, self._resolved(request, header_model)))[1]

    async def completions_stream(
        self, request: CompletionRequest, header_model: str | None = None
    ) -> AsyncIterator[CompletionStreamResponse]:
        _, chunks = self._completions_stream(request, self._resolved(request, header_model))
        async for chunk in chunks:
            yield chunk

    async def chat(self, request: ChatCompletionRequest, header_model: str | None = None) -> ChatCompletionResponse:
        return (await self._chat(request, self._resolved(request, header_model)))[1]

    async def chat_stream(
        self, request: ChatCompletionRequest, header_model: str | None = None
    ) -> AsyncIterator[ChatCompletionStreamResponse]:
        _, chunks = self._chat_stream(request, self._resolved(request, header_model))
        async for chunk in chunks:
            yield chunk

    async def merged_state(self) -> dict:
        """The path policy's view: merged tenants and their state (warming, ready, failed...)."""
        if self.promoter is None:
            return {"enabled": False}
        return {"enabled": True, **(await self.promoter.actor.snapshot.remote())}

    # ---- adapter lifecycle (router/admin.py) ------------------------------------------------------

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

    @app.post("/v1/completions")
    async def http_completions(self, body: CompletionRequest, raw: Request):
        return await self._answer(raw, body, self._completions_stream if body.stream else self._completions)

    @app.post("/v1/chat/completions")
    async def http_chat(self, body: ChatCompletionRequest, raw: Request):
        return await self._answer(raw, body, self._chat_stream if body.stream else self._chat)

    async def _answer(self, raw: Request, body, impl: Callable):
        """Admit ``body``, run ``impl`` (serving.py) and answer over HTTP, errors in OpenAI's shape.

        The lease (the tenant's concurrency slot) is held until the response ends: the whole
        call, or the whole stream."""
        try:
            lease, resolved = await self._admit(raw, body, raw.headers.get(MODEL_HEADER))
        except Exception as e:
            return error_response(e)
        try:
            if body.stream:
                path, chunks = impl(body, resolved)
                return await sse_response(lease.guard(chunks), path)
            async with lease:
                path, resp = await impl(body, resolved)
        except Exception as e:
            lease.release()
            return error_response(e)
        return await json_response(resp, path)

    @app.get("/admin/merged")
    async def http_merged_state(self):
        return JSONResponse(await self.merged_state())

    @app.get("/admin/adapters")
    async def http_list_adapters(self):
        return await _for_operator(self.list_adapters())

    @app.post("/admin/adapters")
    async def http_register_adapter(self, body: RegisterAdapterRequest):
        return await _for_operator(self.register_adapter(body.adapter_id, body.uri, body.warm))

    @app.delete("/admin/adapters/{adapter_id}")
    async def http_delete_adapter(self, adapter_id: str):
        return await _for_operator(self.delete_adapter(adapter_id))

    @app.post("/admin/adapters/{adapter_id}/warm")
    async def http_warm_adapter(self, adapter_id: str):
        return await _for_operator(self.warm_adapter(adapter_id))
