"""The versioned multiplexed deployment: the skeleton both engine deployments share.

The LoRA deployment (lora.py: adapters in one engine's pool) and the merged one (merged.py: one
whole engine per merged copy) both serve Serve multiplexed models named ``<id>@v<n>``
(adapters/registry.py; ``<id>`` alone is a folder put in the store by hand, version 0). A
version never changes, so an update or a delete is a question of which versions a replica still
holds, and both deployments answer it the same way, here:

* loading ``id@v<n>`` retires this replica's older versions of ``id`` (``_older_versions``);
* a ``ManifestWatcher`` (adapters/registry.py) reads the manifest at the replica's first call,
  then every ``store.registry_refresh_s``, and ``apply_manifest`` retires what it makes old or
  deleted (``refresh_registry``: the same at once, for the router's delete and for operators);
* a request already running finishes on the version it holds: retiring drops the version from
  Serve's LRU and the replica's caches, and its memory goes after its last request.

A deployment says what it holds and how one version goes:

    _held_versions()                every version this replica holds (default: Serve's LRU)
    _stale_versions(manifest, now)  [(mux, reason)]: what ``manifest`` says to retire now
    async _retire(mux, reason)      drop one version; True if this replica held it
    async _submit(req)              start one request: a RequestStream (ChannelMixin's too)
    _background_loops()             its own background tasks beside the watcher
    _close()                        what ``__del__`` frees besides the background tasks

Serve has no public API to list or unload a replica's multiplexed models; deployments/
multiplex.py reaches into its wrapper, and only ``_models`` and ``_drop_loaded`` here call it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, AsyncIterator, Awaitable, Callable

from ray import serve

from serve_app.adapters.config import StoreConfig
from serve_app.adapters.registry import AdapterRegistry, Manifest, ManifestWatcher, parse_mux_id
from serve_app.api.wire import GenerateRequest, RequestOutput
from serve_app.deployments.multiplex import announce_change, loaded_models

logger = logging.getLogger("ray.serve")


class VersionedMixin:
    """Versions, the manifest watcher, background tasks and the request entry points of an
    engine deployment (see the module docstring for what the deployment supplies)."""

    registry: AdapterRegistry
    store_config: StoreConfig
    _load_fn: Callable[[str], Awaitable[Any]]
    _manifest: Manifest | None  # the last manifest applied (None until the first read)
    _reconciler: asyncio.Task | None  # the watcher's task

    def _versioned(self, load: Callable[[str], Awaitable[Any]], max_models: int, *, serving: str):
        """Call from ``__init__`` once ``registry`` and ``store_config`` are set: returns ``load``
        under Serve's multiplexing, an LRU of ``max_models``. ``serving``: what the watcher's
        warning says keeps serving while the store does not answer."""
        self._manifest = None
        self._reconciler = None
        self._watcher = ManifestWatcher(self.registry, self.store_config.registry_refresh_s, self.apply_manifest,
                                        serving=serving, log=logger)
        # A closure, not a bound method: Serve stores its LRU on the decorated callable.
        self._load_fn = load
        return serve.multiplexed(max_num_models_per_replica=max_models)(load)

    # ---- versions ----------------------------------------------------------------------------

    def _models(self) -> OrderedDict:
        """Serve's LRU of this replica's loaded models (multiplexed ID -> model)."""
        return loaded_models(self._load_fn)

    def _drop_loaded(self, mux: str) -> Any:
        """Take ``mux`` out of Serve's LRU now instead of at its next eviction, and tell Serve's
        routers; the model (the caller frees it), or None if it was not loaded."""
        model = self._models().pop(mux, None)
        if model is not None:
            announce_change(self._load_fn)
        return model

    def _held_versions(self) -> list[str]:
        return list(self._models())

    def _older_versions(self, mux: str) -> list[str]:
        """The versions of ``mux``'s adapter older than it that this replica holds."""
        adapter_id, version = parse_mux_id(mux)
        older = []
        for other in self._held_versions():
            oid, ov = parse_mux_id(other)
            if oid == adapter_id and ov < version:
                older.append(other)
        return older

    async def _retire_older(self, mux: str) -> None:
        for other in self._older_versions(mux):
            await self._retire(other, f"replaced by {mux}")

    async def _retire(self, mux: str, reason: str) -> bool:
        raise NotImplementedError

    def _stale_versions(self, manifest: Manifest, now: float) -> list[tuple[str, str]]:
        raise NotImplementedError

    async def apply_manifest(self, manifest: Manifest, now: float | None = None) -> list[str]:
        """Retire what this manifest makes old or deleted; the versions retired."""
        self._manifest = manifest
        now = time.monotonic() if now is None else now
        retired = []
        for mux, reason in self._stale_versions(manifest, now):
            if await self._retire(mux, reason):
                retired.append(mux)
        return retired

    async def refresh_registry(self) -> list[str]:
        """Re-read the manifest now and retire what it makes old or deleted (tests, operators)."""
        return await self.apply_manifest(await asyncio.to_thread(self.registry.read))

    # ---- background tasks --------------------------------------------------------------------

    def _background_loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """Attribute name -> the loop that task runs. Started on the replica's first call (the
        event loop is Serve's), restarted if one ended."""
        return {"_reconciler": self._watcher.run}

    def _start_background(self) -> None:
        for name, run in self._background_loops().items():
            task = getattr(self, name, None)
            if task is None or task.done():
                setattr(self, name, asyncio.get_running_loop().create_task(run()))

    # ---- requests ----------------------------------------------------------------------------

    async def _submit(self, req: GenerateRequest):
        raise NotImplementedError

    async def generate(self, req: GenerateRequest) -> RequestOutput:
        return await (await self._submit(req)).collect()

    async def generate_stream(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        async for out in (await self._submit(req)).chunks():
            yield out

    # ---- end ---------------------------------------------------------------------------------

    def _close(self) -> None:
        """What the replica frees at its end besides the background tasks."""

    def __del__(self):
        for task in [v for v in vars(self).values() if isinstance(v, asyncio.Task)]:
            task.cancel()
        self._close()
