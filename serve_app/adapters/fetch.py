"""Make a local folder for one adapter version: read in place (local store) or via the disk cache.

Tiers, from the bottom: the store (a folder: tier "disk"; s3://: tier "s3") -> the node's disk
cache (remote stores only) -> (the replica's RAM tier and device slots live in
deployments/lora.py, which owns the engine).

* A registered version (``v >= 1``) is immutable, and the registry records its content
  fingerprint: a disk-cache hit is checked against it (the manifest as read at most
  ``registry_refresh_s`` ago) and a copy of other content is discarded and fetched again; a
  download that does not match it is refused (422) before it is published. When the store does
  not answer, cached versions keep serving unchecked.
* Version 0 (a folder put in the store by hand) may be replaced in place: a disk-cache hit is
  checked against the store's ETag/size when the store answers, and used as is when it does not.

Before any byte is downloaded, the listing is checked: both files present, no pickle, weights
under ``max_adapter_bytes`` (store.check_adapter_files). Large downloads log their progress.
Errors name the adapter and version, never the store URI or a local path (those are logged).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from serve_app.adapters.backends import open_store
from serve_app.adapters.config import StoreConfig
from serve_app.adapters.disk_cache import DiskCache
from serve_app.adapters.registry import AdapterRegistry
from serve_app.adapters.store import (
    ADAPTER_FILES,
    AdapterStore,
    check_adapter_files,
    content_fingerprint,
)
from serve_app.adapters.store import fingerprint as fingerprint_listing
from serve_app.errors import AdapterStoreUnavailableError, InvalidAdapterError

logger = logging.getLogger(__name__)


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "serve_app_adapter_cache")


def progress_callback(label: str, size: int, min_bytes: int, *, every_s: float = 2.0, log=None):
    """An fsspec Callback logging a download's percent, bytes and rate (None below min_bytes)."""
    if size < min_bytes:
        return None
    from fsspec.callbacks import Callback

    log = log or logger.info

    class _Progress(Callback):
        def __init__(self):
            super().__init__(size=size)
            self.t0 = time.monotonic()
            self.last_t = self.t0
            self.last_pct = -100.0

        def call(self, *args, **kwargs):
            now = time.monotonic()
            total = self.size or size
            pct = 100.0 * self.value / total if total else 100.0
            if self.value >= total or pct - self.last_pct >= 10 or now - self.last_t >= every_s:
                rate = self.value / max(now - self.t0, 1e-6)
                log("downloading %s: %.0f%% (%.1f / %.1f MB, %.1f MB/s)", label, pct, self.value / 1e6,
                    total / 1e6, rate / 1e6)
                self.last_t, self.last_pct = now, pct

    return _Progress()


@dataclass(frozen=True)
class Fetched:
    path: str  # local folder with adapter_config.json + adapter_model.safetensors
    tier: str  # where the bytes came from: "disk" (local store or disk cache) or the store's tier ("s3")
    seconds: float
    nbytes: int = 0
    fingerprint: str = ""  # store.content_fingerprint of the files at ``path``


class AdapterFetcher:
    def __init__(
        self,
        store: AdapterStore,
        config: StoreConfig | None = None,
        *,
        disk_cache: DiskCache | None = None,
        on_event: Callable[[str, str], None] | None = None,
    ):
        """``on_event(event, tier)``: "hit" / "miss" of the disk cache (metrics hook)."""
        self.store = store
        self.config = config or StoreConfig()
        self.registry = AdapterRegistry(store, self.config)
        if disk_cache is None and not store.is_local:
            disk_cache = DiskCache(self.config.disk_cache_dir or default_cache_dir(), self.config.disk_cache_bytes)
        self.disk = disk_cache
        self.on_event = on_event or (lambda event, tier: None)
        self.downloads = 0
        self.disk_hits = 0

    def _key(self, rel: str) -> str:
        return f"{self.store.uri}|{rel}"

    def expected_fingerprint(self, adapter_id: str, version: int) -> str | None:
        """The content fingerprint the registry records for this version (None: unknown)."""
        return self.registry.fingerprint_of(adapter_id, version)

    @staticmethod
    def _label(adapter_id: str, version: int) -> str:
        return f"adapter '{adapter_id}'" + (f" version {version}" if version else "")

    def _mismatch(self, adapter_id: str, version: int, got: str, expected: str, where: str) -> InvalidAdapterError:
        logger.error("%s: the files at %s have content %s, the registry recorded %s", self._label(adapter_id, version),
                     where, got, expected)
        return InvalidAdapterError(
            f"{self._label(adapter_id, version)}: the stored files do not match what was registered (their "
            "content fingerprint differs from the registry's); register it again"
        )

    def fetch(self, adapter_id: str, version: int, fingerprint: str | None = None) -> Fetched:
        """A local folder holding this version's two files.

        ``fingerprint``: the content the caller expects (the router passes it while validating a
        staged version); default: what the registry recorded, looked up for ``version >= 1``.
        """
        t0 = time.perf_counter()
        rel = self.registry.version_rel(adapter_id, version)
        where = self.registry.version_uri(adapter_id, version)  # for the log only
        label = "the adapter store" if version == 0 else f"version {version} in the adapter store"
        max_bytes = self.config.max_adapter_bytes
        expected = fingerprint if fingerprint or version == 0 else self.expected_fingerprint(adapter_id, version)
        if self.store.is_local:
            files = self.store.list_files(rel)
            check_adapter_files(adapter_id, files, label, max_bytes=max_bytes)
            path = self.store.local_dir(rel)
            content = content_fingerprint(path)
            if expected and content != expected:
                raise self._mismatch(adapter_id, version, content, expected, where)
            return Fetched(path, "disk", time.perf_counter() - t0, sum(files[n].size for n in ADAPTER_FILES), content)

        key = self._key(rel)
        hit = self.disk.get(key)
        if hit is not None and version > 0:
            if not expected or hit.content == expected:
                return self._hit(hit, t0)
            logger.warning("disk cache: %s holds content %s, the registry recorded %s; discarding it",
                           where, hit.content or "(unknown)", expected)
            self.disk.remove(key)
            hit = None
        try:
            files = self.store.list_files(rel)
        except AdapterStoreUnavailableError:
            if hit is not None:
                logger.warning("adapter store unreachable; serving %s from the disk cache (may be stale)", where)
                return self._hit(hit, t0)
            raise
        check_adapter_files(adapter_id, files, label, max_bytes=max_bytes)
        fp = fingerprint_of_listing = fingerprint_listing(files)
        if hit is not None and hit.fingerprint == fp:
            return self._hit(hit, t0)
        self.on_event("miss", "disk")

        def fill(tmp: Path) -> None:
            for name in ADAPTER_FILES:
                cb = progress_callback(f"{where}/{name}", files[name].size, self.config.progress_min_bytes)
                self.store.get_file(f"{rel}/{name}", str(tmp / name), callback=cb)
                got = (tmp / name).stat().st_size
                if got != files[name].size:
                    logger.warning("download of %s/%s was cut short (%d of %d bytes)", where, name, got,
                                   files[name].size)
                    raise AdapterStoreUnavailableError(
                        f"the download of {self._label(adapter_id, version)} ({name}) was cut short "
                        f"({got} of {files[name].size} bytes); retry"
                    )

        def check(content: str) -> None:
            if expected and content != expected:
                raise self._mismatch(adapter_id, version, content, expected, where)

        try:
            entry = self.disk.put(key, fill, fingerprint=fingerprint_of_listing, check=check)
        except OSError as e:  # the node's disk (full, read-only ...), not the tenant's fault
            logger.error("disk cache %s: cannot store %s (%s)", self.disk.root, where, e)
            raise AdapterStoreUnavailableError(
                f"{self._label(adapter_id, version)} cannot be cached on this node's disk right now "
                f"({type(e).__name__}); retry later"
            ) from None
        self.downloads += 1
        dt = time.perf_counter() - t0
        logger.info("downloaded %s (%d bytes) in %.2fs", where, entry.nbytes, dt)
        return Fetched(entry.path, self.store.tier, dt, entry.nbytes, entry.content)

    def _hit(self, hit, t0: float) -> Fetched:
        self.disk_hits += 1
        self.on_event("hit", "disk")
        return Fetched(hit.path, "disk", time.perf_counter() - t0, hit.nbytes, hit.content)


def adapter_pipeline(adapters_uri: str, scfg: StoreConfig, *, on_disk_evict=None, on_event=None
                     ) -> tuple[AdapterStore, AdapterRegistry, AdapterFetcher]:
    """(store, registry, fetcher) for ``adapters_uri``: the one adapter pipeline both deployments
    (LoRA and merged) read through -- a disk cache below remote stores, versions from the registry."""
    store = open_store(adapters_uri, scfg)
    registry = AdapterRegistry(store, scfg)
    disk = None
    if not store.is_local:
        disk = DiskCache(scfg.disk_cache_dir or default_cache_dir(), scfg.disk_cache_bytes, on_evict=on_disk_evict)
    return store, registry, AdapterFetcher(store, scfg, disk_cache=disk, on_event=on_event)


def validation_settings(scfg: StoreConfig, engine_max_adapter_bytes: int) -> dict[str, Any]:
    """The adapter validation keyword arguments both paths use (load_lora_weights / merge)."""
    return {
        "max_bytes": min(scfg.max_adapter_bytes, engine_max_adapter_bytes),
        "base_mismatch": scfg.base_model_mismatch,
        "base_aliases": tuple(scfg.base_model_aliases),
    }
