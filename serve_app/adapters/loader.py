"""The one adapter pipeline of a replica: store -> disk -> RAM -> parse, one validation policy.

Tiers, from the bottom: the store (adapters/store.py, a backend from backends.py), the node's
disk cache (fetch.py, remote stores only), then, for the LoRA replica, ``RamCache`` of parsed,
validated weights in host RAM, so an adapter evicted from the device comes back with one copy:
no disk, no parsing. Both deployments read through ``AdapterLoader``: the LoRA replica for
parsed weights (``weights``), the merged replica for a local folder to merge
(``with_local_copy``), with the same validation settings (fetch.validation_settings).

What it adds to a fetch, for the LoRA replica:
* one fetch + parse per adapter version at a time, however many requests ask (``_fetching``);
* a hand-off of prefetched weights to the load that follows, even when the RAM tier cannot
  keep them (``_handoff``, bounded);
* remembered refusals: a refused version costs one download and one parse, not one per request
  (``refused``; a hand-placed version-0 folder is retried after ``_INVALID_V0_TTL_S``, as it may
  be fixed in place).

adapters/ never imports the engine: the engine's two parse halves (``parse_config``: the
tenant's JSON, pure Python, on a worker thread; ``load_tensors``: torch work) and its
``run_in_engine`` (the tensor half runs on the engine thread) are passed in as callables, as
Ray's LoraModelLoader takes its loader.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable, TypeVar

from serve_app.adapters.config import StoreConfig
from serve_app.adapters.fetch import Fetched, adapter_pipeline
from serve_app.adapters.ids import validate_adapter_id
from serve_app.adapters.ram_cache import RamCache
from serve_app.adapters.registry import parse_mux_id
from serve_app.errors import AdapterNotFoundError, InvalidAdapterError

logger = logging.getLogger("ray.serve")

T = TypeVar("T")

_HANDOFF_MAX = 16  # prefetched adapters waiting for Serve's load lock (when the RAM tier can't hold them)
_INVALID_MAX = 1024  # refused adapters remembered per replica
_INVALID_V0_TTL_S = 10.0  # a hand-placed folder may be fixed in place; a version never changes


def _no_event(event: str, tier: str) -> None:
    pass


class AdapterLoader:
    """One replica's adapter pipeline. ``parse_config(mux, path) -> spec`` and
    ``load_tensors(spec, path) -> weights`` (run through ``run_in_engine``) are needed only for
    ``weights``; ``on_event(event, tier)`` counts hits, misses and evictions per tier."""

    def __init__(
        self,
        adapters_uri: str,
        scfg: StoreConfig,
        *,
        parse_config: Callable[[str, str], Any] | None = None,
        load_tensors: Callable[[Any, str], Any] | None = None,
        run_in_engine: Callable[..., Any] | None = None,
        ram_tier: bool = True,
        on_event: Callable[[str, str], None] | None = None,
    ):
        self._on_event = on_event or _no_event
        self.store, self.registry, self.fetcher = adapter_pipeline(
            adapters_uri, scfg, on_disk_evict=lambda key: self._on_event("eviction", "disk"), on_event=self._on_event)
        self.ram = RamCache(scfg.ram_cache_bytes if ram_tier else 0,
                            on_evict=lambda key: self._on_event("eviction", "ram"))
        self._parse_config = parse_config
        self._load_tensors = load_tensors
        self._run_in_engine = run_in_engine
        self._fetching: dict[str, asyncio.Task] = {}
        self._handoff: OrderedDict[str, tuple[Any, str, float, str | None]] = OrderedDict()  # weights, tier, t0, fingerprint
        self._invalid: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @property
    def refused(self) -> list[str]:
        """The versions this replica refused and remembers (oldest first)."""
        return list(self._invalid)

    def holds(self, mux: str) -> bool:
        """Whether parsed weights for ``mux`` wait here (hand-off or RAM): a load needs no fetch."""
        return mux in self._handoff or mux in self.ram

    def cached(self) -> list[str]:
        """Every version with parsed weights here (RAM first, then the hand-off)."""
        return list(dict.fromkeys([*self.ram.keys(), *self._handoff]))

    def forget(self, mux: str) -> None:
        """Drop ``mux``'s parsed copies (a retired version)."""
        self.ram.pop(mux)
        self._handoff.pop(mux, None)

    def handed_over(self, mux: str) -> None:
        """The weights were used by something other than a load (a validation): a later load is a
        RAM hit, not a hand-off."""
        self._handoff.pop(mux, None)

    async def with_local_copy(self, adapter_id: str, version: int, use: Callable[[str], Awaitable[T]],
                              fingerprint: str | None = None) -> tuple[T, Fetched]:
        """``await use(local folder)`` on a fetched copy of one version; fetched again once if the
        disk cache evicted the folder in between (a tiny cap)."""
        for attempt in range(2):
            fetched = await asyncio.to_thread(self.fetcher.fetch, adapter_id, version, fingerprint)
            try:
                return await use(fetched.path), fetched
            except AdapterNotFoundError:
                # The disk cache evicted the folder between fetch and use: fetch again.
                if self.store.is_local or attempt == 1:
                    raise
        raise AssertionError("unreachable")

    async def weights(self, mux: str, fingerprint: str | None = None) -> tuple[Any, str, float]:
        """(parsed weights, the tier they came from, when the load started): handoff, RAM, or a
        fetch + parse shared by every concurrent caller of the same ``mux``.

        Handoff and RAM copies carry the content fingerprint they were parsed from; for a
        registered version, a copy whose fingerprint is not the registry's (``fingerprint``, or
        the manifest's) is discarded and fetched again: ``id@v<n>`` names one content."""
        t0 = time.perf_counter()
        adapter_id, version = parse_mux_id(mux)
        expected = fingerprint
        if expected is None and version > 0:
            expected = await asyncio.to_thread(self.fetcher.expected_fingerprint, adapter_id, version)

        def current(fp: str) -> bool:
            if not expected or fp == expected:
                return True
            logger.warning("adapter %s: a cached copy holds content %s, the registry recorded %s; fetching it "
                           "again", mux, fp or "(unknown)", expected)
            return False

        handed = self._handoff.pop(mux, None)
        if handed is not None and t0 - handed[2] < 60 and current(handed[3]):
            return handed[:3]
        cached = self.ram.get(mux)
        if cached is not None:
            if current(cached[1]):
                self._on_event("hit", "ram")
                return cached[0], "ram", t0
            self.ram.pop(mux)
        self._on_event("miss", "ram")
        refused = self._invalid.get(mux)
        if refused is not None:
            message, when = refused
            if parse_mux_id(mux)[1] > 0 or time.monotonic() - when < _INVALID_V0_TTL_S:
                raise InvalidAdapterError(message)
            del self._invalid[mux]
        task = self._fetching.get(mux)
        if task is None:
            task = asyncio.ensure_future(self._fetch_parse(mux, expected))
            self._fetching[mux] = task
            task.add_done_callback(lambda _t, m=mux: self._fetching.pop(m, None))
        weights, tier, fp = await asyncio.shield(task)
        if expected and fp != expected:  # joined a fetch of other content: fetch what the registry names
            weights, tier, fp = await self._fetch_parse(mux, expected)
        return weights, tier, t0

    async def _fetch_parse(self, mux: str, fingerprint: str | None = None) -> tuple[Any, str, str]:
        """(weights, tier, content fingerprint); the fetcher refuses files that are not ``fingerprint``."""
        t0 = time.perf_counter()
        adapter_id, version = parse_mux_id(mux)
        validate_adapter_id(adapter_id)
        t1 = t0

        async def parse(path: str):
            nonlocal t1
            t1 = time.perf_counter()
            spec = await asyncio.to_thread(self._parse_config, mux, path)
            return await asyncio.to_thread(self._run_in_engine, self._load_tensors, spec, path)

        try:
            weights, fetched = await self.with_local_copy(adapter_id, version, parse, fingerprint)
        except InvalidAdapterError as e:
            # Remembered, so a hostile adapter costs one download and one parse, not one per request.
            self._invalid[mux] = (e.message, time.monotonic())
            while len(self._invalid) > _INVALID_MAX:
                self._invalid.popitem(last=False)
            logger.warning("refused adapter %s: %s", mux, e.message)
            raise
        logger.info("fetched %s from %s in %.3fs, parsed in %.3fs (%d bytes)", mux, fetched.tier,
                    fetched.seconds, time.perf_counter() - t1, weights.nbytes)
        self.ram.put(mux, (weights, fetched.fingerprint), weights.nbytes)
        # For the load that follows (even if the RAM tier could not keep it), with its true
        # source tier and start time for the load-latency metric.
        self._handoff[mux] = (weights, fetched.tier, t0, fetched.fingerprint)
        while len(self._handoff) > _HANDOFF_MAX:
            self._handoff.popitem(last=False)
        return weights, fetched.tier, fetched.fingerprint
