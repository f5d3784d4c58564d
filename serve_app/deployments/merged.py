"""The merged deployment: hot tenants served from weights with their adapter merged in.

Multiplexed by adapter ID like the LoRA deployment, but each "model" is a whole engine over a
merged copy of the base (one per replica by default), so a hot tenant runs at the bare base
model's speed. Building one takes seconds; the router keeps the tenant on the LoRA path until
``warm`` has returned here, so nobody waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from ray import serve

from serve_app.adapters.local import LocalAdapterStore
from serve_app.config import AppConfig
from serve_app.deployments.lora import GenerateRequest, render_prompt
from serve_app.engine.engine import LoRAEngine, RequestOutput, RequestStream
from serve_app.engine.merge import build_merged_engine

logger = logging.getLogger("ray.serve")


class _MergedModel:
    """The multiplexed object; Serve calls __del__ on LRU eviction."""

    def __init__(self, adapter_id: str, engine: LoRAEngine):
        self.adapter_id = adapter_id
        self.engine = engine

    def __del__(self):
        engine, self.engine = self.engine, None
        if engine is not None:
            # Evicted while requests may still run on it: let them finish first.
            engine.drain(timeout=120)
            engine.shutdown()


class MergedDeployment:
    def __init__(self, app_config: dict):
        cfg = AppConfig.model_validate(app_config)
        self.base_path, adapters_dir = cfg.resolve_paths()
        self.engine_config = cfg.engine_config(self.base_path, num_cpus=cfg.merged_num_cpus)
        self.kernel_inject = cfg.merged_kernel_inject
        self.store = LocalAdapterStore(adapters_dir)

        async def load(adapter_id: str) -> _MergedModel:
            path = self.store.local_path(adapter_id)
            t0 = time.perf_counter()
            engine = await asyncio.to_thread(
                build_merged_engine, self.engine_config, adapter_id, path, kernel_inject=self.kernel_inject
            )
            logger.info("merged adapter %s into the base in %.1fs", adapter_id, time.perf_counter() - t0)
            return _MergedModel(adapter_id, engine)

        self._load_fn = load
        self._get_model = serve.multiplexed(max_num_models_per_replica=cfg.merged_tenants_per_replica)(load)

    async def _engine(self) -> LoRAEngine:
        adapter_id = serve.get_multiplexed_model_id()
        if not adapter_id:
            raise ValueError("the merged deployment serves adapters only; call it with multiplexed_model_id")
        return (await self._get_model(adapter_id)).engine

    async def warm(self) -> str:
        """Build (or find) the merged copy for this request's adapter; returns when it is ready."""
        await self._engine()
        return serve.get_multiplexed_model_id()

    async def unload(self, adapter_id: str) -> bool:
        """Drop a demoted tenant's merged copy now instead of at the next LRU eviction.

        Serve has no public unload for multiplexed models; this reaches into its wrapper (Ray
        2.4x-2.60 layout) and degrades to "freed at the next eviction" if that layout changes.
        """
        wrapper = getattr(self._load_fn, "__serve_multiplex_wrapper", None)
        models = getattr(wrapper, "models", None)
        if models is None or adapter_id not in models:
            return False
        model = models.pop(adapter_id)
        wrapper._push_multiplexed_replica_info = True
        await asyncio.to_thread(model.__del__)
        logger.info("unloaded merged copy of %s (demoted)", adapter_id)
        return True

    async def _submit(self, req: GenerateRequest) -> RequestStream:
        engine = await self._engine()
        return engine.submit(render_prompt(engine.tokenizer, req), req.params, None, req.request_id)

    async def generate(self, req: GenerateRequest) -> RequestOutput:
        return await (await self._submit(req)).collect()

    async def generate_stream(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        async for out in (await self._submit(req)).chunks():
            yield out
