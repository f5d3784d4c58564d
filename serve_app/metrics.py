"""Metric objects, defined once. Exported by Ray (Prometheus names get a ``ray_`` prefix).

Created on first use: ``ray.serve.metrics`` objects need a Ray worker, and this module is
also imported by code that runs without one (unit tests, the benchmarks).

Label sets that name adapters must not grow without end (every adapter, every version ever
served, a tenant registering adapters in a loop). Ray's metrics API cannot remove a label set
(``ray.util.metrics`` has no remove or clear, 2.60), so:

* a gauge series disappears by itself once nobody sets it: the worker exports a gauge's values
  once and forgets them, and Ray's agent drops a value not re-reported within two export
  periods (``metrics_report_interval_ms``, 10 s: 20 s; tests/serve/test_metrics.py checks it).
  The per-version prefix hit-rate gauge is set from the engine's ``PrefixStats``, so retiring
  a version is ``PrefixStats.forget``; its series then ages out;
* counters and histograms are cumulative in Ray's agent and never drop a series, so per process
  at most ``MAX_LABEL_VALUES`` distinct values of a ``bounded`` label (``adapter``) get their
  own series; later ones are counted under ``OTHER``. A gauge value unset for ``GAUGE_IDLE_S``
  (long after the agent dropped it) gives its place back.
"""

from __future__ import annotations

import threading
import time
from functools import cached_property

_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_LOAD_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


# Distinct values of a bounded label (e.g. adapter IDs) one process exports per metric.
MAX_LABEL_VALUES = 512
OTHER = "_other"  # what the values past MAX_LABEL_VALUES are counted under
# A gauge label value not set for this long frees its place (Ray's agent dropped its series
# after two export periods, 20 s by default).
GAUGE_IDLE_S = 120.0


class _Lazy:
    def __init__(
        self,
        kind: str,
        name: str,
        description: str,
        tag_keys: tuple[str, ...] = (),
        boundaries=None,
        *,
        bounded: tuple[str, ...] = (),
    ):
        self._args = (kind, name, description, tag_keys, boundaries)
        self._bounded = bounded  # tag keys whose distinct values are capped (MAX_LABEL_VALUES)
        self._seen: dict[tuple, float] = {}  # their values with a series of their own -> last use
        self._lock = threading.Lock()
        self._next_sweep = 0.0
        self.clock = time.monotonic  # tests drive time by hand

    @cached_property
    def _metric(self):
        from ray.serve import metrics

        kind, name, description, tag_keys, boundaries = self._args
        if kind == "histogram":
            return metrics.Histogram(name, description, boundaries=boundaries, tag_keys=tag_keys or None)
        return getattr(metrics, kind.capitalize())(name, description, tag_keys=tag_keys or None)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._metric.inc(value, tags=self._bound(tags))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._metric.observe(value, tags=self._bound(tags))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._metric.set(value, tags=self._bound(tags))

    def _bound(self, tags: dict[str, str] | None) -> dict[str, str] | None:
        """``tags``, or with the bounded labels replaced by ``OTHER`` once their values are full."""
        if not self._bounded or not tags:
            return tags
        key = tuple(tags.get(k) for k in self._bounded)
        now = self.clock()
        with self._lock:
            if key in self._seen:
                self._seen[key] = now
                return tags
            if len(self._seen) >= MAX_LABEL_VALUES and self._args[0] == "gauge" and now >= self._next_sweep:
                self._next_sweep = now + 1.0  # a full table is swept at most once a second
                for k in [k for k, last in self._seen.items() if now - last > GAUGE_IDLE_S]:
                    del self._seen[k]
            if len(self._seen) < MAX_LABEL_VALUES:
                self._seen[key] = now
                return tags
        return {**tags, **dict.fromkeys(self._bounded, OTHER)}


# Router
REQUESTS = _Lazy(
    "counter", "serve_app_requests", "Requests per adapter and serving path (adapters past a process's first 512: _other).", ("adapter", "path"), bounded=("adapter",)
)
GENERATED_TOKENS = _Lazy(
    "counter", "serve_app_generated_tokens", "Generated tokens per adapter (adapters past a process's first 512: _other).", ("adapter",), bounded=("adapter",)
)
TTFT = _Lazy("histogram", "serve_app_ttft_seconds", "Time to first streamed token.", ("path",), _LATENCY_BUCKETS)
LATENCY = _Lazy("histogram", "serve_app_latency_seconds", "Request latency, end to end.", ("path",), _LATENCY_BUCKETS)
ROUTER_PATH = _Lazy("counter", "serve_app_router_path", "Router decisions per path.", ("path",))
PROMOTIONS = _Lazy("counter", "serve_app_promotions", "Tenants promoted to the merged path.")
DEMOTIONS = _Lazy("counter", "serve_app_demotions", "Tenants demoted to the LoRA path.")
# LoRA replicas
ADAPTER_CACHE = _Lazy(
    "counter", "serve_app_adapter_cache_events", "Adapter cache hits, misses and evictions per tier.", ("event", "tier")
)
ADAPTER_LOAD = _Lazy(
    "histogram", "serve_app_adapter_load_seconds", "Adapter load latency per source tier.", ("tier",), _LOAD_BUCKETS
)
KV_BLOCKS = _Lazy(
    "gauge", "serve_app_kv_blocks", "KV-cache blocks of a LoRA replica per state: used, free, cached.", ("state",)
)
KV_PREEMPTIONS = _Lazy(
    "gauge", "serve_app_kv_preemptions", "Sequences preempted for lack of KV blocks since the replica started."
)
PREFIX_HIT_RATE = _Lazy(
    "gauge", "serve_app_prefix_cache_hit_rate",
    "Prompt tokens found in the prefix cache / looked up, per adapter version (id@vN).",
    ("adapter",), bounded=("adapter",),
)
