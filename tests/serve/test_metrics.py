"""The app's metrics reach Ray's Prometheus export: requests per adapter and path, tokens,
latency and TTFT histograms, adapter cache events and load latency, router decisions."""

import time

import httpx
import pytest

pytestmark = pytest.mark.serve

WANTED = [
    'ray_serve_app_requests_total{',
    'ray_serve_app_generated_tokens_total{',
    'ray_serve_app_latency_seconds_bucket{',
    'ray_serve_app_ttft_seconds_bucket{',
    'ray_serve_app_router_path_total{',
    'ray_serve_app_adapter_cache_events_total{',
    'ray_serve_app_adapter_load_seconds_bucket{',
]


def test_metrics_are_exported(serve_env):
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    with httpx.Client(timeout=60) as c:
        for model in ("tenant-4", "tenant-5", "base"):
            body = {"model": model, "prompt": "metrics please", "max_tokens": 4, "temperature": 0}
            assert c.post(serve_env.url + "/v1/completions", json=body).status_code == 200
            with c.stream("POST", serve_env.url + "/v1/completions", json={**body, "stream": True}) as r:
                r.read()
        deadline = time.monotonic() + 90  # Ray flushes metrics every few seconds
        text, missing = "", WANTED
        while time.monotonic() < deadline:
            text = c.get(f"http://127.0.0.1:{port}/metrics").text
            missing = [m for m in WANTED if m not in text]
            if not missing:
                break
            time.sleep(2)
    assert not missing, f"not exported after 90 s: {missing}"
    requests = [line for line in text.splitlines() if line.startswith("ray_serve_app_requests_total{")]
    assert any('adapter="tenant-4"' in line and 'path="lora"' in line for line in requests), requests
