"""The multiplexed LoRA deployment: one engine per replica, adapters keyed by tenant ID.

Ray Serve's multiplexing routes each adapter ID to replicas that already hold it and keeps an
LRU of ``max_adapters_per_replica`` per replica. Its "model" here is a small handle on the
engine's resident adapter; eviction calls the handle's ``__del__``, which only retires the
adapter: the engine frees its memory when the last request using it finishes.

All tenants share the engine's batching loop; nothing here serializes requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from ray import serve

from serve_app import metrics
from serve_app.adapters.local import LocalAdapterStore
from serve_app.config import AppConfig
from serve_app.engine.engine import LoRAEngine, RequestOutput, RequestStream, merge_outputs
from serve_app.engine.lora_manager import AdapterNotResidentError, ResidentAdapter
from serve_app.engine.sampling import SamplingParams

logger = logging.getLogger("ray.serve")


@dataclass
class GenerateRequest:
    """What the router sends a replica: one prompt (text, token IDs or chat messages)."""

    params: SamplingParams
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None  # chat: rendered with the replica's tokenizer
    request_id: str | None = None


def render_prompt(tokenizer, req: GenerateRequest) -> str | list[int]:
    """The engine's prompt: text or token IDs as given, or a chat rendered to token IDs."""
    if req.messages is None:
        return req.prompt
    from serve_app.api.protocol import render_chat

    text = render_chat(tokenizer, req.messages)
    # A chat template writes its own BOS; the plain default needs the tokenizer's.
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


class _LoadedAdapter:
    """The multiplexed model object. Serve calls __del__ on LRU eviction."""

    def __init__(self, engine: LoRAEngine, resident: ResidentAdapter, on_evict):
        self.engine = engine
        self.resident = resident
        self._on_evict = on_evict
        self.fresh = True  # the first request to see it caused the load: a cache miss

    def __del__(self):
        if not self.resident.retired:
            self.engine.unload_adapter(self.resident)
            self._on_evict(self.resident.adapter_id)


class LoRADeployment:
    def __init__(self, app_config: dict):
        cfg = AppConfig.model_validate(app_config)
        base, adapters_dir = cfg.resolve_paths()
        self.engine = LoRAEngine(cfg.engine_config(base))
        self.store = LocalAdapterStore(adapters_dir)
        self.loads = 0
        self.evictions = 0

        async def load_adapter(adapter_id: str) -> _LoadedAdapter:
            path = self.store.local_path(adapter_id)
            t0 = time.perf_counter()
            resident = await asyncio.to_thread(self.engine.load_adapter, adapter_id, path)
            metrics.ADAPTER_LOAD.observe(time.perf_counter() - t0, tags={"tier": "disk"})
            self.loads += 1
            logger.info("loaded adapter %s (%d bytes)", adapter_id, resident.nbytes)
            return _LoadedAdapter(self.engine, resident, self._evicted)

        # A closure, not a bound method: Serve stores its LRU on the decorated callable.
        self._get_adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load_adapter)

    def _evicted(self, adapter_id: str) -> None:
        self.evictions += 1
        metrics.ADAPTER_CACHE.inc(tags={"event": "eviction", "tier": "device"})
        logger.info("evicted adapter %s (LRU); its memory is freed once its requests finish", adapter_id)

    async def _submit(self, req: GenerateRequest) -> RequestStream:
        adapter_id = serve.get_multiplexed_model_id()
        prompt = render_prompt(self.engine.tokenizer, req)
        for attempt in range(3):
            resident = None
            if adapter_id:
                loaded = await self._get_adapter(adapter_id)
                resident = loaded.resident
                metrics.ADAPTER_CACHE.inc(tags={"event": "miss" if loaded.fresh else "hit", "tier": "device"})
                loaded.fresh = False
            try:
                return self.engine.submit(prompt, req.params, resident, req.request_id)
            except AdapterNotResidentError:
                # Evicted (and freed) between the LRU lookup and the pin: load it again.
                if attempt == 2:
                    raise

    async def generate(self, req: GenerateRequest) -> RequestOutput:
        stream = await self._submit(req)
        try:
            return merge_outputs([out async for out in stream])
        finally:
            stream.close()

    async def generate_stream(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        stream = await self._submit(req)
        try:
            async for out in stream:
                # Whatever else is already queued goes in the same chunk: fewer Ray messages
                # when the consumer is slower than the engine.
                yield merge_outputs([out, *stream.drain_nowait()])
        finally:
            stream.close()

    async def stats(self) -> dict:
        return {**self.engine.stats(), "adapter_loads": self.loads, "adapter_evictions": self.evictions,
                "resident_adapters": self.engine.lora.resident_ids()}

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError("engine loop thread died")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
