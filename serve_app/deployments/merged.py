"""The merged deployment: hot tenants served from weights with one adapter version merged in.

Multiplexed by ``<id>@v<n>`` like the LoRA deployment (``<id>`` alone for a hand-placed folder,
version 0), and each "model" is a whole engine over a merged copy of the base (one per replica
by default), so a hot tenant runs at the bare base model's speed. A version is immutable, so a
copy keyed by it can never hold another owner's or an older upload's weights: an update or a
delete + re-register is a new multiplexed ID. Building one takes seconds; the router keeps the
tenant on the LoRA path until ``warm`` has returned here, so nobody waits for it.

The copy is built through the LoRA path's adapter pipeline (adapters/loader.py ``AdapterLoader``: local store
or S3 via fsspec, registry versions, the node's disk cache) and validated with the same store
settings (``validation_settings``: ``max_adapter_bytes``, ``base_model_mismatch``,
``base_model_aliases``) before PEFT reads anything (engine/merge.py).

Retiring copies (their memory is freed once the requests running on them finish; the versions
skeleton is deployments/versioned.py, shared with the LoRA deployment):
  * loading ``id@v<n>`` retires this replica's older versions of ``id`` first (the policy only
    asks for a new version once it no longer routes the old one), so they never compete with
    other tenants' copies for a slot;
  * every ``registry_refresh_s`` the replica re-reads the manifest: a copy of a deleted adapter
    is retired at once and a deleted adapter is not loaded again (404); a copy of a version that
    is no longer current is retired once it has been stale for ``stale_grace_s`` (two refresh
    periods plus two policy syncs), the time every router needs to resolve the new version, so
    a router that has not seen the update yet does not make this replica rebuild the old one;
  * ``unload`` (the promoter: demotion, or a version replaced).

Propagation bound (no request is answered from a version older than the one the LoRA path
serves, beyond it): a router sends a request here only when the version it resolved is the one
the tenant's ready copy holds (router/promoter.py), the same version its LoRA path would use.
So the merged path lags an update exactly as the LoRA path does: by at most
``registry_refresh_s`` plus one manifest read (router/admin.py), zero on the router replica
that made the update. A deleted tenant gets 404 from the router within the same bound, and its
copy is retired here within ``registry_refresh_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from serve_app.adapters.fetch import validation_settings
from serve_app.adapters.ids import validate_adapter_id
from serve_app.adapters.loader import AdapterLoader
from serve_app.adapters.registry import Manifest, mux_id, parse_mux_id
from serve_app.api.wire import GenerateRequest, render_prompt
from serve_app.deployments.channel import ChannelMixin
from serve_app.deployments.config import MergedDeploymentConfig
from serve_app.deployments.versioned import VersionedMixin
from serve_app.engine.api import EngineAPI
from serve_app.engine.engine import RequestStream
from serve_app.engine.merge import build_merged_engine
from serve_app.errors import AdapterNotFoundError, InvalidRequestError

logger = logging.getLogger("ray.serve")

POLICY_SYNC_S = 0.5  # router/promoter.py's default interval


def stale_copies(loaded: list[str], manifest: Manifest, stale_since: dict[str, float], now: float,
                 grace_s: float) -> list[tuple[str, str]]:
    """(mux, reason) of the loaded copies to retire now; updates ``stale_since`` in place.

    Deleted adapters at once; versions no longer current once stale for ``grace_s``."""
    out = []
    for mux in loaded:
        adapter_id, _ = parse_mux_id(mux)
        if manifest.is_deleted(adapter_id):
            out.append((mux, "deleted"))
        elif manifest.is_stale(mux):
            since = stale_since.setdefault(mux, now)
            if now - since >= grace_s:
                out.append((mux, f"no longer current (v{manifest.current(adapter_id)} is)"))
        else:
            stale_since.pop(mux, None)
    for mux in [m for m in stale_since if m not in loaded]:
        del stale_since[mux]
    return out


class _MergedModel:
    """The multiplexed object; Serve calls __del__ on LRU eviction."""

    def __init__(self, mux: str, engine: EngineAPI):
        self.mux = mux
        self.engine = engine

    def __del__(self):
        engine, self.engine = self.engine, None
        if engine is not None:
            # Evicted while requests may still run on it: let them finish first.
            engine.drain(timeout=120)
            engine.shutdown()


class MergedDeployment(VersionedMixin, ChannelMixin):
    def __init__(self, config: MergedDeploymentConfig | dict):
        """``config``: what build_app binds (``AppConfig.merged_deployment_config``), or a dict of
        build_app's args (a test or script building one replica)."""
        cfg = config if isinstance(config, MergedDeploymentConfig) else MergedDeploymentConfig.from_args(config)
        self.base_path, adapters_uri = cfg.resolve_paths()
        self.engine_config = cfg.engine_config(self.base_path)
        self.kernel_inject = cfg.merged_kernel_inject
        self.store_config = scfg = cfg.store
        self.loader = AdapterLoader(adapters_uri, scfg, ram_tier=False)  # the LoRA path's pipeline, no RAM tier
        self.store, self.registry, self.fetcher = self.loader.store, self.loader.registry, self.loader.fetcher
        self.validation = validation_settings(scfg, self.engine_config.max_adapter_bytes)
        self.stale_grace_s = 2 * scfg.registry_refresh_s + 2 * POLICY_SYNC_S
        self._stale_since: dict[str, float] = {}
        self.retired: list[str] = []  # most recent last (stats)

        async def load(mux: str) -> _MergedModel:
            adapter_id, version = parse_mux_id(mux)
            validate_adapter_id(adapter_id)
            if self._manifest is not None and self._manifest.is_deleted(adapter_id):
                raise AdapterNotFoundError(f"model '{adapter_id}' was deleted; register it again with POST /admin/adapters")
            t0 = time.perf_counter()

            async def merge(path: str) -> EngineAPI:
                return await asyncio.to_thread(
                    build_merged_engine, self.engine_config, mux, path,
                    kernel_inject=self.kernel_inject, **self.validation,
                )

            engine, fetched = await self.loader.with_local_copy(adapter_id, version, merge)
            logger.info("merged adapter %s (from %s) into the base in %.1fs", mux, fetched.tier,
                        time.perf_counter() - t0)
            return _MergedModel(mux, engine)

        self._get_model = self._versioned(load, cfg.merged_tenants_per_replica, serving="merged copies keep serving")

    # ---- copies ------------------------------------------------------------------------------

    async def _retire(self, mux: str, reason: str) -> bool:
        """Drop one copy now instead of at the next LRU eviction (``_drop_loaded``: if Serve's
        layout changes, it is freed at the next eviction); its engine drains in a worker thread."""
        model = self._drop_loaded(mux)
        if model is None:
            return False
        self._stale_since.pop(mux, None)
        self.retired = [*self.retired[-31:], mux]
        logger.info("retiring merged copy %s (%s); freed once its requests finish", mux, reason)
        await asyncio.to_thread(model.__del__)
        return True

    def _stale_versions(self, manifest: Manifest, now: float) -> list[tuple[str, str]]:
        """Deleted: now; no longer current: once stale for ``stale_grace_s`` (``stale_copies``)."""
        return stale_copies(list(self._models()), manifest, self._stale_since, now, self.stale_grace_s)

    async def _engine(self) -> EngineAPI:
        self._start_background()
        mux = serve.get_multiplexed_model_id()
        if not mux:
            raise InvalidRequestError("the merged deployment serves adapters only; call it with multiplexed_model_id")
        if mux not in self._models():
            await self._retire_older(mux)
        return (await self._get_model(mux)).engine

    # ---- called by the router's promoter -------------------------------------------------------

    async def resolve(self, adapter_id: str) -> str:
        """The multiplexed ID of ``adapter_id``'s current version, read from the store now
        (a static hot tenant is promoted before any router resolved it). 404 if deleted."""
        validate_adapter_id(adapter_id)
        manifest = await asyncio.to_thread(self.registry.read)
        current = manifest.current(adapter_id)
        if current is None:
            raise AdapterNotFoundError(f"model '{adapter_id}' was deleted; register it again with POST /admin/adapters")
        return mux_id(adapter_id, current)

    async def warm(self) -> str:
        """Build (or find) the merged copy for this request's ``<id>@v<n>``; returns when ready."""
        await self._engine()
        return serve.get_multiplexed_model_id()

    async def unload(self, adapter_id: str, version: int | None = None) -> list[str]:
        """Drop ``adapter_id``'s copy of ``version`` (None: every version) on this replica now."""
        out = []
        for mux in list(self._models()):
            aid, v = parse_mux_id(mux)
            if aid == adapter_id and (version is None or v == version) and await self._retire(mux, "unloaded"):
                out.append(mux)
        return out

    async def stats(self) -> dict:
        self._start_background()
        return {"loaded": list(self._models()), "retired": list(self.retired),
                "stale_since": dict(self._stale_since), "stale_grace_s": self.stale_grace_s}

    # ---- requests ------------------------------------------------------------------------------

    async def _submit(self, req: GenerateRequest) -> RequestStream:
        engine = await self._engine()
        if req.params.json_schema is not None:  # compiled off the event loop, before submit
            await engine.compile_grammar(req.params.json_schema, req.tenant)
        return engine.submit(render_prompt(engine.tokenizer, req), req.params, None, req.request_id)
