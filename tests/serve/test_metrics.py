"""The app's metrics reach Ray's Prometheus export with the values the traffic implies.

Names come from the metric objects in serve_app/metrics.py (Ray prefixes ``ray_``, a counter
is exported as ``<name>_total``, a histogram as ``_bucket``/``_count``/``_sum``), so a renamed
or new metric cannot slip past a hard-coded list. Values are checked, not presence: a counter
incremented by 0 would be exported too.
"""

import re
import time

import httpx
import pytest

from serve_app import metrics

pytestmark = pytest.mark.serve

# Promotions and demotions need the merged path's policy with rate-based promotion, which this
# session's lora-app does not run; they are checked to be charted (test_cluster_manifests.py).
NOT_DRIVEN_HERE = {metrics.PROMOTIONS, metrics.DEMOTIONS}

_LINE = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def app_metrics() -> dict[str, "metrics._Lazy"]:
    """Every metric object serve_app/metrics.py defines, by its Python name."""
    return {k: v for k, v in vars(metrics).items() if isinstance(v, metrics._Lazy)}


def exported_name(m, suffix: str = "") -> str:
    kind, name = m._args[0], m._args[1]
    if kind == "counter":
        return f"ray_{name}_total"
    if kind == "histogram":
        return f"ray_{name}_{suffix or 'count'}"
    return f"ray_{name}"


def parse(text: str) -> list[tuple[str, dict, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = _LINE.match(line)
        if m:
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def total(samples, name: str, **labels) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def test_app_metric_objects_are_all_covered():
    """This module checks every metric the app defines (or says why not)."""
    objs = app_metrics()
    assert objs and set(objs.values()) >= NOT_DRIVEN_HERE
    assert len({m._args[1] for m in objs.values()}) == len(objs), "two metric objects share a name"
    assert set(objs) - {k for k, v in objs.items() if v in NOT_DRIVEN_HERE} == set(EXPECTED), (
        "a metric was added or removed in serve_app/metrics.py: give it an expected value here")


N_TOKENS = 4
# Per metric object: (labels to sum over, the least value the traffic below implies on its own).
EXPECTED = {
    "REQUESTS": ({"adapter": "tenant-4", "path": "lora"}, 2),
    "GENERATED_TOKENS": ({"adapter": "tenant-4"}, 2 * N_TOKENS),
    "TTFT": ({"path": "lora"}, 3),  # one stream per model (count of observations)
    "LATENCY": ({"path": "lora"}, 6),
    "ROUTER_PATH": ({"path": "lora"}, 6),
    "ADAPTER_CACHE": ({}, 1),  # tenant-4/-5 each hit or missed the adapter cache at least once
    "ADAPTER_LOAD": ({}, 1),  # at least one load of the session (count of observations)
    "KV_BLOCKS": ({"state": "free"}, 1),  # gauges, set every 5 s by the LoRA replica
    "KV_PREEMPTIONS": ({}, 0),  # none is implied: checked to be exported, below
    "PREFIX_HIT_RATE": ({}, 0.01),  # the streamed request repeats the prompt: its full blocks hit
}


def test_metrics_are_exported_with_values(serve_env):
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    objs = app_metrics()
    with httpx.Client(timeout=60) as c:
        for model in ("tenant-4", "tenant-5", "base"):
            body = {"model": model, "prompt": "metrics please, " * 12, "max_tokens": N_TOKENS, "temperature": 0,
                    "ignore_eos": True}
            r = c.post(serve_env.url + "/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == N_TOKENS, r.text
            with c.stream("POST", serve_env.url + "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                r.read()
        deadline = time.monotonic() + 90  # Ray flushes metrics every few seconds
        while True:
            samples = parse(c.get(f"http://127.0.0.1:{port}/metrics").text)
            got = {key: total(samples, exported_name(objs[key]), **labels) for key, (labels, _) in EXPECTED.items()}
            short = {k: (got[k], least) for k, (_, least) in EXPECTED.items() if got[k] < least}
            present = any(n == exported_name(metrics.KV_PREEMPTIONS) for n, _, _ in samples)
            if (not short and present) or time.monotonic() > deadline:
                break
            time.sleep(2)
    assert not short, f"metrics below what the traffic implies after 90 s (got, least): {short}"
    assert present, "serve_app_kv_preemptions is not exported"
    # Histograms carry buckets whose +Inf bucket equals the count.
    for key in ("TTFT", "LATENCY", "ADAPTER_LOAD"):
        labels = EXPECTED[key][0]
        inf = total(samples, exported_name(objs[key], "bucket"), le="+Inf", **labels)
        assert inf == got[key], (key, inf, got[key])
    # The lora path's request counter splits by adapter: tenant-5 and base are counted too.
    for model in ("tenant-5", "base"):
        assert total(samples, exported_name(metrics.REQUESTS), adapter=model, path="lora") >= 2, model


def test_a_gauge_series_nobody_sets_any_more_leaves_the_export(serve_env):
    """What retiring a version's label series stands on (serve_app/metrics.py): Ray's metrics API
    cannot remove a label set, but a gauge value that is no longer set leaves the agent's export
    after two export periods, while one still set stays. So the per-version prefix hit-rate
    series goes once PrefixStats.forget stops the replica from setting it."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    name = exported_name(metrics.PREFIX_HIT_RATE)

    @ray.remote(num_cpus=0)
    class Setter:  # a live process, like a replica: its series cannot go by the process dying
        def set(self, adapter: str, value: float) -> None:
            metrics.PREFIX_HIT_RATE.set(value, tags={"adapter": adapter})

    setter = Setter.remote()
    retired, kept = "probe-retired@v1", "probe-kept@v1"

    def exported() -> set[str]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        return {lab.get("adapter") for n, lab, _ in parse(text) if n == name}

    try:
        ray.get(setter.set.remote(retired, 0.25))
        t0 = time.monotonic()
        appeared = gone = None
        while time.monotonic() - t0 < 120:
            ray.get(setter.set.remote(kept, 0.5))
            labels = exported()
            if appeared is None and retired in labels:
                appeared = time.monotonic() - t0
            if appeared is not None and retired not in labels and kept in labels:
                gone = time.monotonic() - t0
                break
            time.sleep(2)
        assert appeared is not None, "the probe gauge was never exported"
        assert gone is not None, f"a gauge nobody set for {time.monotonic() - t0:.0f} s is still exported"
    finally:
        ray.kill(setter)
