"""The merged hot-tenant path on real Ray: static hot tenants, promotion under a burst, demotion,
two routers agreeing, a failed merge that leaves the tenant on the LoRA path, and an update and
a delete of a merged tenant (the merged copy follows the registry's versions).

A second application ("merged-app", route prefix /m) runs beside the session's lora-app, with
two router replicas and a policy with short windows so the test runs in seconds.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter

import httpx
import pytest

pytestmark = pytest.mark.serve

APP = "merged-app"
HOT = "tenant-1"
BURSTY = "tenant-2"
BROKEN = "tenant-bad"  # finite factors whose product overflows: refused by the validation both paths share
PROMPT = "the quick brown"
N = 8
REFRESH_S = 1.0  # store.registry_refresh_s (the default): the propagation bound of an update


@pytest.fixture(scope="module")
def merged_app(serve_env, tmp_path_factory):
    from ray import serve
    from safetensors.torch import load_file, save_file

    from serve_app.app import build_app

    adapters = tmp_path_factory.mktemp("merged-adapters")
    for aid in serve_env.assets.adapter_ids:
        shutil.copytree(serve_env.assets.adapter_path(aid), adapters / aid)
    shutil.copytree(serve_env.assets.adapter_path("tenant-0"), adapters / BROKEN)
    tensors = load_file(adapters / BROKEN / "adapter_model.safetensors")
    save_file({k: v * 1e30 for k, v in tensors.items()}, adapters / BROKEN / "adapter_model.safetensors")

    app = build_app({
        "base_model": str(serve_env.assets.base),
        "adapters": str(adapters),
        "base_model_name": serve_env.base_name,
        "merged": True,
        "policy": {
            "hot_tenants": [HOT, BROKEN],
            "promote_rps": 4.0, "demote_rps": 1.0, "window_s": 1.5, "rate_window_s": 1.0,
            "cooldown_s": 1.0, "max_merged_tenants": 1,
        },
        "merged_tenants_per_replica": 3,
        "lora_num_cpus": 0.25, "merged_num_cpus": 0.25, "router_num_cpus": 0.1, "router_replicas": 2,
        "torch_threads": 1,
    })
    serve.run(app, name=APP, route_prefix="/m")
    yield serve_env.url + "/m"
    serve.delete(APP)


def _complete(client: httpx.Client, url: str, model: str) -> httpx.Response:
    return client.post(url + "/v1/completions", json={
        "model": model, "prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": True,
    })


def _replica(r: httpx.Response) -> str:
    rid = r.headers.get("x-router-replica")
    assert rid and rid != "unknown", f"no router replica named in {dict(r.headers)}"
    return rid


def _merged_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("MergedDeployment", app_name=APP).stats.remote().result(timeout_s=60)


def _wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_static_hot_tenant_is_served_merged_with_the_reference_output(merged_app, refs):
    expected = refs.text(HOT, PROMPT, N)
    with httpx.Client(timeout=60) as c:
        def served_merged():
            r = _complete(c, merged_app, HOT)
            assert r.status_code == 200, r.text
            # Before the merged copy is ready the LoRA path serves: same output either way.
            assert r.json()["choices"][0]["text"] == expected
            return r.headers["x-served-by"] == "merged"

        _wait_for(served_merged, 90, f"{HOT} to be served merged")
        # Ready now. Each router learns it at its next policy sync (every 0.5 s); after that,
        # every request, whichever of the two routers takes it, goes to the merged copy. Both
        # router replicas must be seen answering from it (the proxy picks one per request).
        time.sleep(1.5)
        replicas: set[str] = set()
        for _ in range(60):
            r = _complete(c, merged_app, HOT)
            assert r.headers["x-served-by"] == "merged" and r.json()["choices"][0]["text"] == expected
            replicas.add(_replica(r))
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, f"only router replica(s) {replicas} answered 60 requests"
        # Streaming takes the same path and gives the same text.
        with c.stream("POST", merged_app + "/v1/completions", json={
            "model": HOT, "prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": True, "stream": True,
        }) as r:
            assert r.headers["x-served-by"] == "merged"
            body = r.read().decode()
        import json

        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in body.splitlines()
                       if line.startswith("data: {"))
        assert text == expected
        # The base model and other tenants stay on the LoRA path.
        assert _complete(c, merged_app, "tenant-3").headers["x-served-by"] == "lora"
        assert _complete(c, merged_app, "base").headers["x-served-by"] == "lora"


def test_failed_merge_keeps_the_tenant_on_lora_and_says_why(merged_app):
    with httpx.Client(timeout=60) as c:
        def failed():
            state = c.get(merged_app + "/admin/merged").json()
            return state["tenants"].get(BROKEN, {}).get("state") == "failed" and state

        state = _wait_for(failed, 90, f"the merge of {BROKEN} to fail")
        reason = state["tenants"][BROKEN]["reason"]
        # The overflow check (the bound after scaling) or PEFT's safe merge (non-finite) says why.
        assert BROKEN in reason and ("non-finite" in reason or "exceeds" in reason), reason
        r = _complete(c, merged_app, BROKEN)
        assert r.headers["x-served-by"] == "lora"


def test_burst_promotes_without_failures_then_demotes(merged_app, refs):
    expected = refs.text(BURSTY, PROMPT, N)
    seen: list[tuple[float, str, str]] = []  # (sent, seconds after the start; path; router replica)
    t_start = time.monotonic()

    async def burst(seconds_max: float):
        async with httpx.AsyncClient(timeout=60) as c:
            deadline = time.monotonic() + seconds_max
            flipped_at = None
            while time.monotonic() < deadline:
                sent = time.monotonic() - t_start
                batch = await asyncio.gather(*(c.post(merged_app + "/v1/completions", json={
                    "model": BURSTY, "prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": True,
                }) for _ in range(4)))
                for r in batch:
                    assert r.status_code == 200, r.text  # zero failed requests during the switch
                    assert r.json()["choices"][0]["text"] == expected
                    seen.append((sent, r.headers["x-served-by"], _replica(r)))
                if flipped_at is None and any(path == "merged" for _, path, _ in seen):
                    flipped_at = time.monotonic()
                # Keep the rate up after the flip: both routers must agree from then on.
                if flipped_at is not None and time.monotonic() - flipped_at > 3.5:
                    return
                await asyncio.sleep(0.1)

    asyncio.run(burst(90))
    state = httpx.get(merged_app + "/admin/merged", timeout=30).json()
    paths = [path for _, path, _ in seen]
    assert paths[0] == "lora" and "merged" in paths, (seen, state)
    # Once promoted, each router learns it at its next policy sync (every 0.5 s); a request sent
    # after every router had time for a sync or two never goes back to LoRA during the burst.
    first_merged = min(sent for sent, path, _ in seen if path == "merged")
    late_lora = [(round(sent, 2), rid) for sent, path, rid in seen if path == "lora" and sent > first_merged + 1.5]
    assert not late_lora, (f"sent on the LoRA path more than 1.5 s after the first merged answer "
                           f"(at {first_merged:.2f} s): {late_lora}; all: {seen}; {state}")

    with httpx.Client(timeout=60) as c:
        # Traffic stops: below demote_rps for window_s, the tenant goes back to the LoRA path.
        def demoted():
            state = c.get(merged_app + "/admin/merged").json()
            return BURSTY not in state["tenants"] or state["tenants"][BURSTY]["state"] not in ("ready", "warming")

        _wait_for(demoted, 60, f"{BURSTY} to be demoted")
        time.sleep(1.5)  # routers pick the change up at their next policy sync (0.5 s)
        r = _complete(c, merged_app, BURSTY)
        assert r.headers["x-served-by"] == "lora" and r.json()["choices"][0]["text"] == expected
        state = c.get(merged_app + "/admin/merged").json()
        assert state["counters"]["promotions"] >= 1 and state["counters"]["demotions"] >= 1, state


def test_update_and_delete_of_a_merged_tenant(merged_app, serve_env, refs):
    """Re-registering a hot tenant serves the new files (LoRA path first, then merged again, from
    both routers); deleting it gives 404 and retires its merged copy."""
    new_src = "tenant-4"
    old, new = refs.text(HOT, PROMPT, N), refs.text(new_src, PROMPT, N)
    assert old != new
    with httpx.Client(timeout=120) as c:
        _wait_for(lambda: _complete(c, merged_app, HOT).headers["x-served-by"] == "merged", 90,
                  f"{HOT} to be served merged")
        r = c.post(merged_app + "/admin/adapters",
                   json={"adapter_id": HOT, "uri": str(serve_env.assets.adapter_path(new_src))})
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        registered_at = time.monotonic()
        mux = f"{HOT}@v{version}"

        seen = []  # (seconds since the update, text, path, router replica)
        merged_new: set[str] = set()
        deadline = registered_at + 120
        while len(merged_new) < 2 and time.monotonic() < deadline:
            r = _complete(c, merged_app, HOT)
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["text"]
            assert text in (old, new), text  # one version or the other, never a mix
            seen.append((time.monotonic() - registered_at, text, r.headers["x-served-by"], _replica(r)))
            if text == new and r.headers["x-served-by"] == "merged":
                merged_new.add(_replica(r))
        summary = Counter(("new" if t == new else "old", p) for _, t, p, _ in seen)
        assert len(merged_new) == 2, (
            f"the new version was not served merged by both routers in {len(seen)} requests: {dict(summary)}, "
            f"last: {seen[-3:]}")
        # Beyond the propagation bound (plus one manifest read), nobody is served the old files.
        late_old = [s for s in seen if s[0] > REFRESH_S + 1.0 and s[1] == old]
        assert not late_old, f"old weights served after the update: {late_old}"
        assert any(p == "lora" and t == new for _, t, p, _ in seen), "expected LoRA (new) while the copy warmed"
        _wait_for(lambda: HOT not in _merged_stats()["loaded"], 30, f"the merged copy of {HOT} v0 to be retired")
        assert mux in _merged_stats()["loaded"]
        state = c.get(merged_app + "/admin/merged").json()["tenants"][HOT]
        assert state["state"] == "ready" and state["version"] == version, state

        r = c.delete(merged_app + f"/admin/adapters/{HOT}")
        assert r.status_code == 200, r.text
        time.sleep(REFRESH_S + 1.0)
        gone: set[str] = set()
        for _ in range(60):
            r = _complete(c, merged_app, HOT)
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"], r.text
            gone.add(_replica(r))
            if len(gone) == 2:
                break
        assert len(gone) == 2, f"only router replica(s) {gone} answered after the delete"
        _wait_for(lambda: mux not in _merged_stats()["loaded"], 30, f"the merged copy {mux} to be retired")
