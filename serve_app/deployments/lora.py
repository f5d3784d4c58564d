"""The multiplexed LoRA deployment: one engine per replica, adapters keyed by ``id@version``.

Ray Serve's multiplexing routes each multiplexed model ID to replicas that already hold it and
keeps an LRU of ``max_adapters_per_replica`` per replica. The router sends ``<id>@v<n>`` for a
registered version (``<id>`` alone for a folder put in the store by hand, version 0), so an
update is a new multiplexed model (adapters/registry.py). Its "model" here is a small handle on
the engine's resident adapter; eviction calls the handle's ``__del__``, which only retires the
adapter: the engine frees its memory when the last request using it finishes.

Tiers, top to bottom, each checked before the next:
  device  the engine's pool (Serve's LRU of resident adapters)
  ram     parsed, validated ``LoRAWeights`` in host RAM (``store.ram_cache_bytes``), so an
          evicted adapter comes back with one copy: no disk, no parsing
  disk    the node's disk cache of a remote store, or the local store folder itself
  s3      the store (adapters/fetch.py downloads into the disk cache)
The device tier is here; the tiers below it are adapters/loader.py (one pipeline for both
deployments: fetch de-duplication, the prefetch hand-off, remembered refusals). Downloading
and parsing happen before Serve's one-load-at-a-time lock is taken, so a slow
download of one tenant does not hold up another tenant's load; parsing runs on the loader's
parse thread (numpy, no torch kernel), and only the copy into the pool runs on the engine thread
(engine.run_in_engine), like every torch operation of the replica.

Versions (deployments/versioned.py, the skeleton shared with the merged deployment): loading
``id@v2`` retires older versions of ``id`` on this replica at once; every ``registry_refresh_s``
the replica re-reads the manifest and retires versions that are no longer current or were
deleted (device slots, RAM copies). Requests already running finish on the version they pinned.

All tenants share the engine's batching loop; nothing here serializes requests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import defaultdict

from ray import serve

from serve_app import metrics
from serve_app.adapters.fetch import validation_settings
from serve_app.adapters.loader import AdapterLoader
from serve_app.adapters.registry import Manifest, mux_id, parse_mux_id
from serve_app.api.wire import GenerateRequest, render_prompt
from serve_app.deployments.channel import ChannelMixin
from serve_app.deployments.config import LoRADeploymentConfig
from serve_app.deployments.versioned import VersionedMixin
from serve_app.engine.api import EngineAPI
from serve_app.engine.engine import LoRAEngine, RequestStream
from serve_app.engine.lora.manager import AdapterNotResidentError, ResidentAdapter
from serve_app.engine.lora.weights import LoRAWeights, load_adapter_tensors, parse_adapter_config
from serve_app.errors import InvalidRequestError

logger = logging.getLogger("ray.serve")


class _LoadedAdapter:
    """The multiplexed model object. Serve calls __del__ on LRU eviction.

    Serve runs one load at a time per replica, under a lock. So that a burst of misses does not
    queue one engine step per load, the load returns as soon as the copy into the pool is
    *queued* on the engine thread; requests ``pin()`` it outside the lock, and every copy
    queued meanwhile runs at the same step boundary.

    Eviction (or retirement) may come before the copy is done, while requests wait for it: the
    unload is then deferred until every waiting request has pinned the adapter, so none of them
    fails; the rows are freed when the last of them finishes.
    """

    def __init__(self, engine: EngineAPI, pending: asyncio.Future, on_evict, tier: str):
        self.engine = engine
        self.resident: ResidentAdapter | None = None
        self.tier = tier  # where it was loaded from
        self.fresh = True  # the first request to see it caused the load: a cache miss
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._gone = False  # evicted or retired (possibly before the copy finished)
        self._unloaded = False
        self._waiters = 0  # requests between asking for it and pinning it
        self._pending = pending
        pending.add_done_callback(self._installed)

    def _installed(self, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        with self._lock:
            self.resident = fut.result()
        self._maybe_unload()

    def _maybe_unload(self) -> None:
        with self._lock:
            if not self._gone or self.resident is None or self._waiters or self._unloaded:
                return
            self._unloaded = True
        self.engine.remove_adapter(self.resident)

    async def pin(self) -> ResidentAdapter:
        """Wait for the copy, then pin it for one request (release with engine.unpin_adapter)."""
        self._waiters += 1
        try:
            resident = await asyncio.shield(self._pending)
            return self.engine.pin_adapter(resident)
        finally:
            self._waiters -= 1
            self._maybe_unload()

    def _drop(self) -> bool:
        with self._lock:
            if self._gone:
                return False
            self._gone = True
        self._maybe_unload()
        return True

    def retire(self) -> None:
        """Unload because a newer version exists or the adapter was deleted (not an LRU eviction)."""
        self._drop()

    def __del__(self):
        if self._drop():
            self._on_evict(self.resident.adapter_id if self.resident is not None else "(loading)")


class LoRADeployment(VersionedMixin, ChannelMixin):
    def __init__(self, config: LoRADeploymentConfig | dict):
        """``config``: what build_app binds (``AppConfig.lora_deployment_config``), or a dict of
        build_app's args (a test or script building one replica)."""
        cfg = config if isinstance(config, LoRADeploymentConfig) else LoRADeploymentConfig.from_args(config)
        base, adapters_uri = cfg.resolve_paths()
        self.engine: EngineAPI = LoRAEngine(cfg.engine_config(base))
        self.engine.warm_grammars()  # response_format's compile workers start now, not at the first schema
        self.store_config = scfg = cfg.store
        # An adapter is parsed in two halves, both on the loader's parse thread, never the
        # engine's: its config (a tenant's JSON: pure Python) and its tensors (numpy, no torch
        # kernel, bounded by max_adapter_bytes and max_safetensors_header_bytes). The engine
        # thread only copies the validated weights into the pool (add_adapter below).
        checks = validation_settings(scfg, self.engine.config.max_adapter_bytes)  # the merged path's too
        self._parse_config = functools.partial(
            parse_adapter_config,
            base=self.engine.base_shape,
            max_rank=self.engine.config.max_lora_rank,
            base_mismatch=checks["base_mismatch"],
            base_aliases=checks["base_aliases"],
        )
        self._load_tensors = functools.partial(
            load_adapter_tensors,
            base=self.engine.base_shape,
            max_rank=self.engine.config.max_lora_rank,
            dtype=self.engine.dtype,
            max_bytes=checks["max_bytes"],
            max_header_bytes=scfg.max_safetensors_header_bytes,
        )
        # The one adapter pipeline (store -> disk -> RAM -> parse); the engine's parse halves are
        # handed in, so adapters/ never imports the engine.
        self.loader = AdapterLoader(
            adapters_uri, scfg, parse_config=self._parse_config, load_tensors=self._load_tensors,
            on_event=self._event)
        self.store, self.registry, self.fetcher, self.ram = (
            self.loader.store, self.loader.registry, self.loader.fetcher, self.loader.ram)
        self.loads = 0
        self.evictions = 0
        self.retired_versions = 0
        self.loads_by_tier: dict[str, int] = defaultdict(int)
        self.load_seconds_by_tier: dict[str, float] = defaultdict(float)

        async def load_adapter(mux: str) -> _LoadedAdapter:
            weights, tier, t0 = await self._weights(mux)  # a RAM or prefetch hit: no wait here
            pending = asyncio.ensure_future(self.engine.run_in_engine_async(self.engine.add_adapter, weights))

            def installed(fut: asyncio.Future) -> None:
                if fut.cancelled() or fut.exception() is not None:
                    return
                dt = time.perf_counter() - t0
                metrics.ADAPTER_LOAD.observe(dt, tags={"tier": tier})
                self.loads += 1
                self.loads_by_tier[tier] += 1
                self.load_seconds_by_tier[tier] += dt
                logger.info("loaded adapter %s from %s in %.3fs (%d bytes)", mux, tier, dt, fut.result().nbytes)
                for old in self._older_versions(mux):  # _retire_older, synchronously: in this callback
                    self._unload(old, f"replaced by {mux}")

            pending.add_done_callback(installed)
            return _LoadedAdapter(self.engine, pending, self._evicted, tier)

        self._get_adapter = self._versioned(load_adapter, cfg.max_adapters_per_replica,
                                            serving="loaded adapters keep serving")

    # ---- tiers below the device ------------------------------------------------------------------

    def _event(self, event: str, tier: str) -> None:
        metrics.ADAPTER_CACHE.inc(tags={"event": event, "tier": tier})

    async def _weights(self, mux: str, fingerprint: str | None = None) -> tuple[LoRAWeights, str, float]:
        """(parsed weights, their tier, when the load started): adapters/loader.py."""
        return await self.loader.weights(mux, fingerprint)

    async def _prefetch(self, mux: str) -> None:
        """Download + parse outside Serve's load lock; the load then only copies into the pool."""
        if mux in self._models() or self.loader.holds(mux):
            return
        await self._weights(mux)

    # ---- versions --------------------------------------------------------------------------------

    def _held_versions(self) -> list[str]:
        """On the device (Serve's LRU), in RAM or handed off by a prefetch."""
        return list(dict.fromkeys([*self._models(), *self.loader.cached()]))

    def _stale_versions(self, manifest: Manifest, now: float) -> list[tuple[str, str]]:
        return [(m, "deleted" if manifest.is_deleted(parse_mux_id(m)[0]) else "no longer current")
                for m in self._held_versions() if manifest.is_stale(m)]

    def _unload(self, mux: str, reason: str) -> bool:
        """Retire one version now, synchronously: out of Serve's LRU and the RAM tier; its rows
        are freed once its requests finish. True if this replica held it."""
        held = self.loader.holds(mux)
        self.loader.forget(mux)
        loaded = self._drop_loaded(mux)
        if loaded is None:
            return held
        loaded.retire()
        self.retired_versions += 1
        logger.info("retired adapter %s (%s); its memory is freed once its requests finish", mux, reason)
        return True

    async def _retire(self, mux: str, reason: str) -> bool:
        return self._unload(mux, reason)

    def _background_loops(self) -> dict:
        return {**super()._background_loops(), "_kv_metrics": self._kv_metrics_loop}

    async def _kv_metrics_loop(self, period: float = 5.0) -> None:
        """Export the KV pool's state (blocks, preemptions, prefix hit rate per adapter)."""
        while True:
            try:
                kv = self.engine.stats().get("kv")
                if kv:
                    for state, key in (("used", "used_blocks"), ("free", "free_blocks"), ("cached", "cached_blocks")):
                        metrics.KV_BLOCKS.set(kv[key], tags={"state": state})
                    metrics.KV_PREEMPTIONS.set(kv["preemptions"])
                    for adapter, rate in kv["prefix_hit_rate_by_adapter"].items():
                        metrics.PREFIX_HIT_RATE.set(rate, tags={"adapter": adapter})
            except Exception:
                logger.exception("exporting KV metrics failed")
            await asyncio.sleep(period)

    # ---- requests --------------------------------------------------------------------------------

    def _evicted(self, adapter_id: str) -> None:
        self.evictions += 1
        self._event("eviction", "device")
        logger.info("evicted adapter %s (LRU); its memory is freed once its requests finish", adapter_id)

    async def _loaded(self, mux: str) -> tuple[_LoadedAdapter, ResidentAdapter]:
        """The version ``mux``, loaded if needed, and pinned for one request (see _submit)."""
        if mux not in self._models():
            await self._prefetch(mux)
        loaded = await self._get_adapter(mux)
        try:
            return loaded, await loaded.pin()
        except Exception:
            # The copy failed, or its rows are already freed: drop the broken entry so that the
            # next attempt (the caller retries AdapterNotResidentError) loads it afresh.
            models = self._models()
            if models.get(mux) is loaded:
                del models[mux]
                loaded.retire()
            raise

    async def _submit(self, req: GenerateRequest) -> RequestStream:
        self._start_background()
        mux = serve.get_multiplexed_model_id()
        prompt = render_prompt(self.engine.tokenizer, req)
        if req.params.json_schema is not None:  # compiled off the event loop, before submit
            await self.engine.compile_grammar(req.params.json_schema, req.tenant)
        for attempt in range(3):
            pinned = None
            try:
                if mux:
                    loaded, pinned = await self._loaded(mux)
                    self._event("miss" if loaded.fresh else "hit", "device")
                    loaded.fresh = False
                return self.engine.submit(prompt, req.params, pinned, req.request_id, tenant=req.tenant,
                                          cache_salt=req.cache_salt)
            except AdapterNotResidentError:
                # Evicted or retired (and freed) between the lookup and the pin: load it again.
                if attempt == 2:
                    raise
            finally:
                # Pinned twice on purpose. ``_loaded`` returns the version pinned: a request
                # that waited for the copy holds it from the moment the wait ends, so an eviction
                # or retire meanwhile (whose deferred unload runs as the last waiter leaves
                # ``pin``) cannot free its rows before ``submit``, which takes the request's
                # own pin (the engine's add_request). Handing this pin over instead would need
                # an engine API that adopts a pin; two refcount steps under the pool's lock cost
                # well under a microsecond, so the EngineAPI stays as it is.
                if pinned is not None:
                    self.engine.unpin_adapter(pinned)  # the request holds its own pin now

    # ---- lifecycle (called by the router's admin API) ----------------------------------------------

    async def validate_adapter(self, adapter_id: str, version: int, fingerprint: str | None = None) -> dict:
        """Fetch and fully validate one version (it stays in the RAM tier): the router's check
        before it makes a new version current. Raises InvalidAdapterError with the reason.
        ``fingerprint``: the content the router staged (a copy of other content is not used)."""
        self._start_background()
        mux = mux_id(adapter_id, version)
        weights, tier, t0 = await self._weights(mux, fingerprint)
        self.loader.handed_over(mux)  # not a load: a later load is a RAM hit
        return {"rank": weights.rank, "nbytes": weights.nbytes, "raw_bytes": weights.raw_bytes,
                "warnings": list(weights.warnings), "tier": tier, "seconds": time.perf_counter() - t0}

    async def warm(self) -> dict:
        """Load this request's multiplexed adapter into device memory (prefetch)."""
        self._start_background()
        mux = serve.get_multiplexed_model_id()
        if not mux:
            raise InvalidRequestError("warm needs a multiplexed_model_id (the adapter to load)")
        t0 = time.perf_counter()
        loaded, resident = await self._loaded(mux)
        self.engine.unpin_adapter(resident)
        tier = loaded.tier if loaded.fresh else "device"
        self._event("miss" if loaded.fresh else "hit", "device")
        loaded.fresh = False
        ctx = serve.get_replica_context()
        return {"adapter": mux, "replica": getattr(ctx.replica_id, "unique_id", str(ctx.replica_id)),
                "nbytes": resident.nbytes, "seconds": time.perf_counter() - t0, "loaded_from": tier}

    async def stats(self) -> dict:
        self._start_background()
        return {
            **self.engine.stats(),
            "adapter_loads": self.loads,
            "adapter_evictions": self.evictions,
            "retired_versions": self.retired_versions,
            "resident_adapters": self.engine.resident_adapters(),
            "loads_by_tier": dict(self.loads_by_tier),
            "load_seconds_by_tier": dict(self.load_seconds_by_tier),
            "ram": self.ram.stats(),
            "disk": None if self.fetcher.disk is None else {
                "downloads": self.fetcher.downloads, "hits": self.fetcher.disk_hits,
                "bytes": self.fetcher.disk.total_bytes(), "max_bytes": self.fetcher.disk.max_bytes,
            },
            "refused": self.loader.refused,
        }

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError("engine loop thread died")

    def _close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
