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

Registration (adapters/registry.py has the why): burn the next version number in the manifest,
copy the files into that version's folder, validate it on a LoRA replica (told the content
fingerprint it must find), commit. A registration interrupted anywhere (the client disconnects,
the request is cancelled, validation fails) is cleaned up by a task that outlives the
cancellation: the number stays burnt (``abandoned`` / ``refused``) and its files are deleted,
so ``id@v<n>`` never names two contents. Manifest writes are conditional, so this router needs
no lock across the (slow) copy and validation; registrations of one adapter ID on this router
run one at a time, other IDs in parallel. A lost race with another router is a 409.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serve_app.adapters.backends import open_store
from serve_app.adapters.config import StoreConfig
from serve_app.adapters.fetch import progress_callback
from serve_app.adapters.ids import validate_adapter_id
from serve_app.adapters.registry import AdapterRegistry, Manifest, ManifestWatcher, is_versioned_name, mux_id
from serve_app.errors import (
    AdapterNotFoundError,
    AdapterStoreUnavailableError,
    InvalidAdapterError,
    ServeAppError,
    unwrap,
)

_STORE_SILENT = "the adapter store has not answered since this router started; retry later"

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
        self._id_locks: dict[str, asyncio.Lock] = {}  # one registration / delete per adapter ID at a time
        self._cleanups: set[asyncio.Future] = set()  # cleanups of interrupted registrations (strong refs)
        self._last_error_log = 0.0
        # The snapshot: read now, then every registry_refresh_s on the watcher's daemon thread.
        self._watcher = ManifestWatcher(
            self.registry, config.registry_refresh_s, self._take_snapshot, writes=lambda: self._writes,
            on_error=lambda e: self._log_error("cannot read the adapter registry", e), also=self._refresh_listing)
        self._watcher.poll()
        self._watcher.start_thread("adapter-registry")

    # ---- the snapshot ------------------------------------------------------------------------

    def _take_snapshot(self, manifest: Manifest) -> None:
        self._manifest = manifest

    def _refresh_listing(self) -> None:
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

    def close(self) -> None:
        self._watcher.stop()

    def _snapshot(self) -> Manifest:
        if self._manifest is None:
            raise AdapterStoreUnavailableError(_STORE_SILENT)
        return self._manifest

    def _in_store(self, adapter_id: str) -> bool:
        """Whether the store has a hand-placed folder (version 0) for this ID."""
        if self.store.is_local:
            return self.store.exists(adapter_id)  # a stat: fresh on every request
        if self._listing is None:
            raise AdapterStoreUnavailableError(_STORE_SILENT)
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
    async def _writing(self, adapter_id: str):
        """One write per adapter ID at a time on this router (across routers: conditional writes)."""
        lock = self._id_locks.setdefault(adapter_id, asyncio.Lock())  # a few bytes per ID ever written here
        async with lock:
            yield

    def _publish(self, manifest: Manifest | None) -> None:
        if manifest is None:
            return
        self._writes += 1
        self._manifest = manifest

    async def _end_registration(self, adapter_id: str, version: int, inflight: list[asyncio.Future],
                                reason: str, refused: bool) -> None:
        """Burn ``version`` for good (abandoned / refused) and delete its files, after whatever
        thread of the registration is still running (a copy, a commit) has finished."""
        for fut in inflight:
            with contextlib.suppress(BaseException):
                await fut
        try:
            self._publish(await asyncio.to_thread(self.registry.abandon, adapter_id, version, reason, refused=refused))
        except Exception as e:  # the number stays burnt (staging); the next commit of this ID prunes it
            logger.warning("adapter %s: could not mark version %d as ended (%s)", adapter_id, version,
                           getattr(e, "message", e))

    async def register_adapter(self, adapter_id: str, uri: str, warm: bool = True) -> dict[str, Any]:
        """Copy ``uri`` into a new immutable version, validate it on a LoRA replica, make it current."""
        validate_adapter_id(adapter_id)
        if self.lora is None:
            raise ServeAppError("no LoRA deployment to validate the adapter with")
        t0 = time.perf_counter()
        self.registry.precheck(adapter_id, uri)  # bad input is refused before a number is burnt
        async with self._writing(adapter_id):
            version, manifest = await asyncio.to_thread(self.registry.reserve, adapter_id, uri)
            self._publish(manifest)
            previous = manifest.current(adapter_id)

            def progress(name, size):
                return progress_callback(f"{uri.rstrip('/')}/{name}", size, self.config.progress_min_bytes)

            inflight: list[asyncio.Future] = []

            def start(fn, *args, **kwargs) -> asyncio.Future:
                fut = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
                inflight.append(fut)
                return fut

            try:
                info = await asyncio.shield(start(self.registry.stage, adapter_id, version, uri, progress=progress))
                report = await self.lora.validate_adapter.remote(adapter_id, version, info["fingerprint"])
                info = {**info, "rank": report["rank"], "nbytes": report["nbytes"], "warnings": report["warnings"]}
                manifest = await asyncio.shield(start(self.registry.commit, adapter_id, version, info))
            except BaseException as e:
                err = unwrap(e) if isinstance(e, Exception) else e
                refused = isinstance(err, InvalidAdapterError)
                if refused:
                    reason = err.message  # replicas remember that this version was refused
                elif isinstance(e, asyncio.CancelledError):
                    reason = "registration interrupted (the request was cancelled or the client disconnected)"
                else:
                    reason = f"registration interrupted ({type(err).__name__}: {getattr(err, 'message', err)})"
                cleanup = asyncio.ensure_future(self._end_registration(adapter_id, version, inflight, reason, refused))
                self._cleanups.add(cleanup)
                cleanup.add_done_callback(self._cleanups.discard)
                try:
                    await asyncio.shield(cleanup)
                except asyncio.CancelledError:
                    pass  # cancelled again: the cleanup runs on by itself
                if isinstance(e, Exception):
                    raise err from None
                raise
            self._publish(manifest)
        mux = mux_id(adapter_id, version)
        logger.info("adapter %s: version %d registered from %s (was %s)", adapter_id, version, uri, previous)
        warmed = None
        if warm:
            try:
                warmed = await self.lora.options(multiplexed_model_id=mux).warm.remote()
            except Exception as e:  # the version is current; the first request will load it instead
                warmed = {"error": str(getattr(unwrap(e), "message", e))}
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
        async with self._writing(adapter_id):
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
            raise unwrap(e) from None
