"""Adapter lifecycle for the router: resolve tenant -> ``id@v<n>``, and the admin operations.

The router's HTTP routes and Python handle methods (ingress.py) call into ``AdapterAdmin``:

  GET    /admin/adapters               list_adapters()            adapters, current versions, history
  POST   /admin/adapters               register_adapter(id, uri)  copy uri into a new version, validate
                                                                  it on a LoRA replica, make it current
  DELETE /admin/adapters/{id}          delete_adapter(id)         404 from then on; memory freed
  POST   /admin/adapters/{id}/warm     warm_adapter(id)           load into a LoRA replica now

Resolution reads a snapshot of the store's manifest, refreshed every ``registry_refresh_s`` by a
background thread (and at once by this replica's own writes), so a request never waits on the
store for it. Propagation: another router replica's update is used here within
``registry_refresh_s`` plus one manifest read; LoRA replicas retire old or deleted versions on
the same period. An update is atomic per request: a request resolves to exactly one version,
and the replica pins that version's memory until the request ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serve_app.adapters.config import StoreConfig
from serve_app.adapters.fetch import progress_callback
from serve_app.adapters.ids import validate_adapter_id
from serve_app.adapters.registry import AdapterRegistry, Manifest, is_versioned_name, mux_id
from serve_app.adapters.store import open_store
from serve_app.errors import (
    AdapterNotFoundError,
    AdapterStoreUnavailableError,
    InvalidAdapterError,
    ServeAppError,
)

logger = logging.getLogger("ray.serve")


class RegisterAdapterRequest(BaseModel):
    """Body of POST /admin/adapters."""

    model_config = ConfigDict(extra="forbid")

    adapter_id: str = Field(description="The tenant's adapter ID (the `model` clients send).")
    uri: str = Field(
        min_length=1,
        description="Folder holding adapter_config.json + adapter_model.safetensors: a local path on the "
        "router's machine, file://, or an fsspec URI (s3://bucket/key/) read with store.storage_options.",
    )
    warm: bool = Field(default=True, description="Load the new version into a LoRA replica before answering.")


def _unwrap(exc: BaseException) -> BaseException:
    from serve_app.router.ingress import unwrap

    return unwrap(exc)


class AdapterAdmin:
    def __init__(self, store_uri: str, config: StoreConfig, lora=None):
        self.config = config
        self.store = open_store(store_uri, config)
        self.registry = AdapterRegistry(self.store, config)
        self.lora = lora
        self._manifest: Manifest | None = None
        self._listing: set[str] | None = None  # URI stores: folder names at the root
        self._listing_at = 0.0
        self._writes = 0  # bumped by every write here; a refresh started before one is dropped
        self._write_lock: asyncio.Lock | None = None
        self._last_error_log = 0.0
        self._stop = threading.Event()
        self._refresh()
        self._thread = threading.Thread(target=self._refresher, name="adapter-registry", daemon=True)
        self._thread.start()

    # ---- the snapshot ------------------------------------------------------------------------

    def _refresh(self) -> None:
        writes = self._writes
        try:
            manifest = self.registry.read()
            if writes == self._writes:
                self._manifest = manifest
        except Exception as e:
            self._log_error("cannot read the adapter registry", e)
        if not self.store.is_local and time.monotonic() - self._listing_at >= self.config.list_refresh_s:
            try:
                self._listing = set(self.store.list_ids())
                self._listing_at = time.monotonic()
            except Exception as e:
                self._log_error("cannot list the adapter store", e)

    def _log_error(self, what: str, e: Exception) -> None:
        if time.monotonic() - self._last_error_log > 30:
            logger.warning("%s (%s); serving from the last snapshot", what, e)
            self._last_error_log = time.monotonic()

    def _refresher(self) -> None:
        while not self._stop.wait(self.config.registry_refresh_s):
            self._refresh()

    def close(self) -> None:
        self._stop.set()

    def _snapshot(self) -> Manifest:
        if self._manifest is None:
            raise AdapterStoreUnavailableError(
                f"the adapter store {self.store.uri} has not answered since this router started; retry later"
            )
        return self._manifest

    def _in_store(self, adapter_id: str) -> bool:
        """Whether the store has a hand-placed folder (version 0) for this ID."""
        if self.store.is_local:
            return self.store.exists(adapter_id)  # a stat: fresh on every request
        if self._listing is None:
            raise AdapterStoreUnavailableError(
                f"the adapter store {self.store.uri} has not answered since this router started; retry later"
            )
        return adapter_id in self._listing

    def resolve(self, name: str) -> str:
        """The multiplexed model ID new requests for tenant ``name`` use (404 / 503 otherwise)."""
        validate_adapter_id(name)
        if is_versioned_name(name):
            raise AdapterNotFoundError(
                f"model '{name}' does not exist: the server picks the version; send the adapter ID without '@v<n>'"
            )
        manifest = self._snapshot()
        current = manifest.current(name)
        if current is None:
            raise AdapterNotFoundError(f"model '{name}' was deleted; register it again with POST /admin/adapters")
        if current > 0:
            return mux_id(name, current)
        if self._in_store(name):
            return name
        raise AdapterNotFoundError(
            f"model '{name}' does not exist; GET /v1/models lists the base model and the adapters"
        )

    def model_ids(self) -> list[str]:
        manifest = self._manifest or Manifest()
        if self.store.is_local:
            in_store = set(self.store.list_ids())
        else:
            in_store = set(self._listing or ())
        return sorted((in_store - set(manifest.deleted_ids())) | set(manifest.registered_ids()))

    # ---- admin operations ----------------------------------------------------------------------

    async def list_adapters(self) -> dict[str, Any]:
        manifest = await asyncio.to_thread(self.registry.read)
        self._manifest = manifest
        in_store = set(await asyncio.to_thread(self.store.list_ids))
        if not self.store.is_local:
            self._listing, self._listing_at = in_store, time.monotonic()
        data = []
        for adapter_id in sorted(in_store | set(manifest.adapters)):
            current = manifest.current(adapter_id)
            if current is None or (current == 0 and adapter_id not in in_store):
                continue
            entry = manifest.entry(adapter_id) or {}
            versions = [{"version": int(v), **info} for v, info in sorted(
                (entry.get("versions") or {}).items(), key=lambda kv: int(kv[0]))]
            data.append({
                "id": adapter_id,
                "version": current,
                "multiplexed_model_id": mux_id(adapter_id, current),
                "origin": "registry" if current > 0 else "store",
                "versions": versions,
            })
        return {"object": "list", "data": data, "generation": manifest.generation,
                "propagation_s": self.config.registry_refresh_s}

    @contextlib.asynccontextmanager
    async def _writing(self):
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        async with self._write_lock:
            stack = contextlib.ExitStack()
            await asyncio.to_thread(stack.enter_context, self.registry.lock())
            try:
                yield
            finally:
                await asyncio.to_thread(stack.close)

    def _publish(self, manifest: Manifest) -> None:
        self._writes += 1
        self._manifest = manifest

    async def register_adapter(self, adapter_id: str, uri: str, warm: bool = True) -> dict[str, Any]:
        """Copy ``uri`` into a new immutable version, validate it on a LoRA replica, make it current."""
        validate_adapter_id(adapter_id)
        if self.lora is None:
            raise ServeAppError("no LoRA deployment to validate the adapter with")
        t0 = time.perf_counter()
        async with self._writing():
            manifest = await asyncio.to_thread(self.registry.read)
            previous = manifest.current(adapter_id)
            version = manifest.next_version(adapter_id)

            def progress(name, size):
                return progress_callback(f"{uri.rstrip('/')}/{name}", size, self.config.progress_min_bytes)

            info = await asyncio.to_thread(self.registry.stage, adapter_id, version, uri, progress=progress)
            try:
                report = await self.lora.validate_adapter.remote(adapter_id, version)
            except Exception as e:
                err = _unwrap(e)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.registry.discard, adapter_id, version)
                if isinstance(err, InvalidAdapterError):
                    # The number is burnt: replicas remember that this version was refused.
                    with contextlib.suppress(Exception):
                        self._publish(await asyncio.to_thread(
                            self.registry.record_failure, adapter_id, version, info, err.message))
                raise err from None
            info = {**info, "rank": report["rank"], "nbytes": report["nbytes"], "warnings": report["warnings"]}
            self._publish(await asyncio.to_thread(self.registry.commit, adapter_id, version, info))
        mux = mux_id(adapter_id, version)
        logger.info("adapter %s: version %d registered from %s (was %s)", adapter_id, version, uri, previous)
        warmed = None
        if warm:
            try:
                warmed = await self.lora.options(multiplexed_model_id=mux).warm.remote()
            except Exception as e:  # the version is current; the first request will load it instead
                warmed = {"error": str(getattr(_unwrap(e), "message", e))}
        return {
            "id": adapter_id,
            "version": version,
            "previous_version": previous,
            "multiplexed_model_id": mux,
            "warnings": report["warnings"],
            "warm": warmed,
            "seconds": time.perf_counter() - t0,
            "propagation_s": self.config.registry_refresh_s,
        }

    async def delete_adapter(self, adapter_id: str) -> dict[str, Any]:
        validate_adapter_id(adapter_id)
        async with self._writing():
            in_store = await asyncio.to_thread(self.store.exists, adapter_id)
            manifest, previous = await asyncio.to_thread(self.registry.delete, adapter_id, in_store=in_store)
            self._publish(manifest)
        logger.info("adapter %s deleted (was version %s)", adapter_id, previous)
        if self.lora is not None:
            # One replica frees it now; every replica does within registry_refresh_s.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.lora.refresh_registry.remote(), timeout=10)
        return {"id": adapter_id, "deleted": True, "previous_version": previous,
                "propagation_s": self.config.registry_refresh_s}

    async def warm_adapter(self, adapter_id: str) -> dict[str, Any]:
        mux = self.resolve(adapter_id)
        if self.lora is None:
            raise ServeAppError("no LoRA deployment to warm")
        try:
            return await self.lora.options(multiplexed_model_id=mux).warm.remote()
        except Exception as e:
            raise _unwrap(e) from None
