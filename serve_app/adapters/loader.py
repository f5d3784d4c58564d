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

* a file that vanishes between the fetch and the end of the parse (the node's disk cache evicted
  the folder, a hand-placed folder was replaced) is a miss: fetched again, up to
  ``_VANISHED_RETRIES`` times, then a 503 to retry; never a remembered refusal. Only refusals
  about the content (its config, shapes, values, size) are remembered.

Threads: fetches (store and registry reads, downloads) run on this loader's own small executor,
parses (config, then tensors: numpy, no torch kernel) on another with one thread -- never on the
engine thread, whose stall would be every tenant's decode stall, and never on asyncio's default
executor, which other work (structured-output compiles) can fill. The deployment copies the
parsed weights into the pool on the engine thread; that copy is all the engine thread does.

adapters/ never imports the engine: the engine's two parse halves (``parse_config``: the
tenant's JSON; ``load_tensors``: the tensors) are passed in as callables, as Ray's
LoraModelLoader takes its loader.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, TypeVar

from serve_app.adapters.config import StoreConfig
from serve_app.adapters.fetch import Fetched, adapter_pipeline
from serve_app.adapters.ids import validate_adapter_id
from serve_app.adapters.peft_files import MissingAdapterFileError
from serve_app.adapters.ram_cache import RamCache
from serve_app.adapters.registry import parse_mux_id
from serve_app.errors import AdapterNotFoundError, AdapterStoreUnavailableError, InvalidAdapterError

logger = logging.getLogger("ray.serve")

T = TypeVar("T")

_HANDOFF_MAX = 16  # prefetched adapters waiting for Serve's load lock (when the RAM tier can't hold them)
_INVALID_MAX = 1024  # refused adapters remembered per replica
_INVALID_V0_TTL_S = 10.0  # a hand-placed folder may be fixed in place; a version never changes
_VANISHED_RETRIES = 3  # fetches again after the local copy vanished during a use (then a 503)
_FETCH_THREADS = 4  # concurrent store reads / downloads per replica
_PARSE_THREADS = 1  # parses at a time: CPU work beside the engine's threads (2-core replicas)


def _no_event(event: str, tier: str) -> None:
    pass


class AdapterLoader:
    """One replica's adapter pipeline. ``parse_config(mux, path) -> spec`` and
    ``load_tensors(spec, path) -> weights`` (both on the parse thread: neither may need the
    engine thread) are needed only for ``weights``; ``on_event(event, tier)`` counts hits,
    misses and evictions per tier."""

    def __init__(
        self,
        adapters_uri: str,
        scfg: StoreConfig,
        *,
        parse_config: Callable[[str, str], Any] | None = None,
        load_tensors: Callable[[Any, str], Any] | None = None,
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
        # Threads start on first use; both pools are this replica's own (see the module docstring).
        self._fetch_pool = ThreadPoolExecutor(_FETCH_THREADS, thread_name_prefix="adapter-fetch")
        self._parse_pool = ThreadPoolExecutor(_PARSE_THREADS, thread_name_prefix="adapter-parse")
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

    async def _in(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    async def fetch(self, adapter_id: str, version: int, fingerprint: str | None = None) -> Fetched:
        """``fetcher.fetch`` on the fetch threads."""
        return await self._in(self._fetch_pool, self.fetcher.fetch, adapter_id, version, fingerprint)

    async def with_local_copy(self, adapter_id: str, version: int, use: Callable[[str], Awaitable[T]],
                              fingerprint: str | None = None) -> tuple[T, Fetched]:
        """``await use(local folder)`` on a fetched copy of one version.

        The fetch saw both files listed, so a folder or file missing during ``use`` (or the
        fetch's own read of a local folder) means the copy vanished under it -- the node's disk
        cache evicted it for another adapter, a hand-placed folder was replaced -- not that the
        adapter lacks it: fetched again, up to ``_VANISHED_RETRIES`` times, then a 503 (retry)."""
        label = f"adapter '{adapter_id}'" + (f" version {version}" if version else "")
        for attempt in range(1 + _VANISHED_RETRIES):
            try:
                fetched = await self.fetch(adapter_id, version, fingerprint)
            except FileNotFoundError as e:  # a local folder changed while it was fingerprinted
                vanished = e
            else:
                try:
                    return await use(fetched.path), fetched
                except (AdapterNotFoundError, MissingAdapterFileError, FileNotFoundError) as e:
                    vanished = e
            why = getattr(vanished, "message", None) or type(vanished).__name__
            if attempt < _VANISHED_RETRIES:
                logger.warning("%s: its local copy vanished while it was read (%s); fetching it again (%d of %d)",
                               label, why, attempt + 1, _VANISHED_RETRIES)
        logger.error("%s: its local copy vanished while it was read, %d times in a row (last: %s)", label,
                     1 + _VANISHED_RETRIES, why)
        if self.store.is_local:
            raise AdapterStoreUnavailableError(
                f"{label}: its folder in the adapter store changed while it was read, {1 + _VANISHED_RETRIES} "
                "times in a row (is it being replaced?); retry once it is in place")
        raise AdapterStoreUnavailableError(
            f"{label}: its local copy was removed while it was read, {1 + _VANISHED_RETRIES} times in a row (this "
            "node's adapter disk cache is evicting it for other adapters); retry, and if it persists raise "
            "store.disk_cache_bytes"
        )

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
            expected = await self._in(self._fetch_pool, self.fetcher.expected_fingerprint, adapter_id, version)

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

        def parse_both(path: str):
            return self._load_tensors(self._parse_config(mux, path), path)

        async def parse(path: str):
            nonlocal t1
            t1 = time.perf_counter()
            return await self._in(self._parse_pool, parse_both, path)

        try:
            weights, fetched = await self.with_local_copy(adapter_id, version, parse, fingerprint)
        except MissingAdapterFileError:  # with_local_copy turns these into fetches; never remembered
            raise
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
