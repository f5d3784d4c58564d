"""Metric objects, defined once. Exported by Ray (Prometheus names get a ``ray_`` prefix).

Created on first use: ``ray.serve.metrics`` objects need a Ray worker, and this module is
also imported by code that runs without one (unit tests, the benchmarks).
"""

from __future__ import annotations

from functools import cached_property

_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_LOAD_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class _Lazy:
    def __init__(self, kind: str, name: str, description: str, tag_keys: tuple[str, ...] = (), boundaries=None):
        self._args = (kind, name, description, tag_keys, boundaries)

    @cached_property
    def _metric(self):
        from ray.serve import metrics

        kind, name, description, tag_keys, boundaries = self._args
        if kind == "histogram":
            return metrics.Histogram(name, description, boundaries=boundaries, tag_keys=tag_keys or None)
        return getattr(metrics, kind.capitalize())(name, description, tag_keys=tag_keys or None)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._metric.inc(value, tags=tags)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._metric.observe(value, tags=tags)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._metric.set(value, tags=tags)


# Router
REQUESTS = _Lazy("counter", "serve_app_requests", "Requests per adapter and serving path.", ("adapter", "path"))
GENERATED_TOKENS = _Lazy("counter", "serve_app_generated_tokens", "Generated tokens per adapter.", ("adapter",))
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
    "gauge", "serve_app_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up, per adapter.",
    ("adapter",),
)
