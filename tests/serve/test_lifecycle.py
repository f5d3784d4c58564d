"""Adapters from S3 (moto's server on 127.0.0.1), bad adapters, updates under load, delete, store down.

A second app, ``lifecycle-app`` at ``/lc``, on the session's Ray (tests/serve/conftest.py), reads
its adapters from ``s3://lifecycle/adapters``: the six session tenants, hand-placed (version 0),
plus every broken kind from tests/bad_adapters.py. References are plain PEFT on the same files
(``refs``); a version registered from tenant-k's files must match tenant-k's reference.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest
from ray import serve

from tests.bad_adapters import BAD_CASES, MAX_ADAPTER_BYTES, MAX_RANK, make_bad_adapters
from tests.moto_s3 import S3Server

pytestmark = pytest.mark.serve

APP, PREFIX, BUCKET = "lifecycle-app", "/lc", "lifecycle"
CMPL = f"{PREFIX}/v1/completions"
ADMIN = f"{PREFIX}/admin/adapters"
PROMPT = "The quick brown fox jumps over"
REFRESH_S = 0.5
TIMEOUT = httpx.Timeout(120.0)


def greedy(model: str, n: int, prompt: str = PROMPT) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}


def stats() -> dict:
    return serve.get_deployment_handle("LoRADeployment", app_name=APP).stats.remote().result(timeout_s=60)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, f"{r.status_code}: {r.text}"
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"], err
    return err


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lc(serve_env, serve_assets, s3, tmp_path_factory):
    """lifecycle-app over S3; yields an HTTP client on the session proxy."""
    from serve_app.app import build_app

    for aid in serve_assets.adapter_ids:
        s3.upload_dir(serve_assets.adapter_path(aid), BUCKET, f"adapters/{aid}")
        s3.upload_dir(serve_assets.adapter_path(aid), BUCKET, f"uploads/{aid}")  # sources for updates
    s3.upload_dir(serve_assets.adapter_path("tenant-4"), BUCKET, "adapters/cold-1")  # never loaded until store-down
    bad = make_bad_adapters(serve_assets.adapter_path("tenant-0"), tmp_path_factory.mktemp("bad"))
    for name, path in bad.items():
        s3.upload_dir(path, BUCKET, f"adapters/{name}")
        s3.upload_dir(path, BUCKET, f"uploads/{name}")
    app = build_app({
        "base_model": str(serve_assets.base),
        "adapters": f"s3://{BUCKET}/adapters",
        "max_adapters_per_replica": 3,
        "max_lora_rank": MAX_RANK,
        "lora_num_cpus": 0.5,
        "router_num_cpus": 0.1,
        "torch_threads": 1,
        "store": {
            "storage_options": s3.storage_options,
            "disk_cache_dir": str(tmp_path_factory.mktemp("disk-cache")),
            "ram_cache_bytes": 64 << 20,
            "max_adapter_bytes": MAX_ADAPTER_BYTES,
            "base_model_mismatch": "refuse",
            "registry_refresh_s": REFRESH_S,
            "list_refresh_s": 1.0,
        },
    })
    serve.run(app, name=APP, route_prefix=PREFIX)
    try:
        with httpx.Client(base_url=serve_env.url, timeout=TIMEOUT) as client:
            wait_for(lambda: client.get(f"{PREFIX}/health").status_code == 200, 60, "lifecycle-app over HTTP")
            yield client
    finally:
        serve.delete(APP)


# ---- 1. S3 round trip ------------------------------------------------------------------------------


def test_s3_round_trip_through_every_tier(lc, serve_env, refs):
    n = 8
    tenants = serve_env.assets.adapter_ids
    for model in tenants:  # 6 tenants through a device LRU of 3
        r = lc.post(CMPL, json=greedy(model, n))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == refs.text(model, PROMPT, n), model
    s = stats()
    assert s["loads_by_tier"].get("s3", 0) >= len(tenants), s["loads_by_tier"]
    assert s["disk"]["downloads"] >= len(tenants) and s["disk"]["bytes"] > 0, s["disk"]
    assert s["adapter_evictions"] >= len(tenants) - 3, s
    # Evicted from the device, still parsed in RAM: coming back skips S3, disk and parsing.
    for model in tenants[:3]:
        r = lc.post(CMPL, json=greedy(model, n))
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == refs.text(model, PROMPT, n), r.text
    s2 = stats()
    assert s2["loads_by_tier"].get("ram", 0) >= 3, s2["loads_by_tier"]
    assert s2["disk"]["downloads"] == s["disk"]["downloads"], "an adapter in RAM was downloaded again"
    assert s2["ram"]["hits"] >= 3

    models = [m["id"] for m in lc.get(f"{PREFIX}/v1/models").json()["data"]]
    assert set(tenants) <= set(models) and "cold-1" in models
    listed = {a["id"]: a for a in lc.get(ADMIN).json()["data"]}
    assert listed["tenant-0"]["version"] == 0 and listed["tenant-0"]["origin"] == "store"


# ---- 2. every bad adapter: its status and message, while good tenants keep matching ----------------


def test_bad_adapters_are_refused_and_good_tenants_keep_serving(lc, serve_env, refs):
    n = 6
    good = ["tenant-1", "tenant-3", "tenant-5"]
    jobs = [(name, greedy(name, n)) for name in BAD_CASES] + [(g, greedy(g, n)) for g in good * 4]
    jobs += [("no-such-tenant", greedy("no-such-tenant", n)), ("a/b", greedy("a/b", n)),
             ("x" * 129, greedy("x" * 129, n)), ("tenant-1@v1", greedy("tenant-1@v1", n))]

    async def run():
        async with httpx.AsyncClient(base_url=serve_env.url, timeout=TIMEOUT) as client:
            # Bad ones first and twice (the second time from the replica's memory of the refusal),
            # good ones interleaved.
            return await asyncio.gather(*(client.post(CMPL, json=body) for _, body in jobs + jobs[:len(BAD_CASES)]))

    results = asyncio.run(run())
    for (name, _), r in zip(jobs + jobs[:len(BAD_CASES)], results):
        if name in BAD_CASES:
            status, pattern = BAD_CASES[name]
            err = error_of(r, status)
            assert err["code"] == "invalid_adapter" and err["type"] == "invalid_request_error", err
            assert re.search(pattern, err["message"]), (name, err["message"])
        elif name in good:
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == refs.text(name, PROMPT, n), name
        elif name in ("no-such-tenant", "tenant-1@v1"):
            assert error_of(r, 404)["code"] == "model_not_found"
        else:
            assert error_of(r, 400)["code"] == "invalid_model"

    s = stats()
    assert set(BAD_CASES) <= set(s["refused"]), s  # remembered: one download + parse per bad adapter
    assert not any(k.startswith("bad-") for k in s["resident_adapters"] + s["ram"]["keys"]), s
    assert s["running"] == 0 and s["lora"]["retired_pinned"] == 0, s

    # The same files through the admin API: 422 with the message, nothing registered.
    for name in ("bad-nan", "bad-base", "bad-pickle", "bad-shape"):
        r = lc.post(ADMIN, json={"adapter_id": "tenant-5", "uri": f"s3://{BUCKET}/uploads/{name}"})
        status, pattern = BAD_CASES[name]
        err = error_of(r, status)
        assert re.search(pattern.replace(f"'{name}", "'tenant-5"), err["message"]), err["message"]
    r = lc.post(ADMIN, json={"adapter_id": "tenant-5", "uri": f"s3://{BUCKET}/uploads/nothing-here"})
    assert "nothing at s3://lifecycle/uploads/nothing-here" in error_of(r, 422)["message"]
    r = lc.post(ADMIN, json={"adapter_id": "tenant-5", "uri": 7})
    error_of(r, 400)
    listed = {a["id"]: a for a in lc.get(ADMIN).json()["data"]}
    assert listed["tenant-5"]["version"] == 0  # still the original
    assert all(v.get("refused") for v in listed["tenant-5"]["versions"]), listed["tenant-5"]
    r = lc.post(CMPL, json=greedy("tenant-5", n))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == refs.text("tenant-5", PROMPT, n)


# ---- 3. update under load ---------------------------------------------------------------------------


def test_update_under_load_is_atomic(lc, serve_env, refs):
    """>= 100 requests to tenant-0 in flight the whole time its adapter is replaced by tenant-2's files.

    A closed loop: 110 workers each send a request, and the next as soon as it returns, from
    before the update starts until after it returned; a quarter of them stream.
    """
    import json

    n, workers, tenant = 8, 110, "tenant-0"
    old, new = refs.text(tenant, PROMPT, n), refs.text("tenant-2", PROMPT, n)
    assert old != new
    r = lc.post(CMPL, json=greedy(tenant, n))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == old
    results = []  # (status, text, start, first token or None, end)
    stop = asyncio.Event()

    async def one(client, stream: bool):
        t0 = time.monotonic()
        body = greedy(tenant, n)
        if stream:
            first, text = None, []
            async with client.stream("POST", CMPL, json={**body, "stream": True}) as resp:
                if resp.status_code != 200:
                    return ("error", f"{resp.status_code} {(await resp.aread())[:300]!r}", t0, None, time.monotonic())
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        payload = json.loads(line[6:])
                        if "error" in payload:
                            return ("error", str(payload), t0, first, time.monotonic())
                        for c in payload["choices"]:
                            if c["text"] and first is None:
                                first = time.monotonic()
                            text.append(c["text"])
            return ("ok", "".join(text), t0, first, time.monotonic())
        resp = await client.post(CMPL, json=body)
        if resp.status_code != 200:
            return ("error", f"{resp.status_code} {resp.text[:300]}", t0, None, time.monotonic())
        return ("ok", resp.json()["choices"][0]["text"], t0, None, time.monotonic())

    async def worker(client, i):
        for _ in range(200):  # bounded; stops when told
            if stop.is_set():
                return
            try:
                results.append(await one(client, stream=i % 4 == 0))
            except Exception as e:  # transport errors count as failures too
                results.append(("error", repr(e), 0.0, None, time.monotonic()))

    async def run():
        limits = httpx.Limits(max_connections=workers + 8, max_keepalive_connections=workers + 8)
        async with httpx.AsyncClient(base_url=serve_env.url, timeout=TIMEOUT, limits=limits) as client:
            tasks = [asyncio.create_task(worker(client, i)) for i in range(workers)]
            for _ in range(600):  # the load is running: every worker has finished a request
                if len(results) >= workers:
                    break
                await asyncio.sleep(0.1)
            t_reg = time.monotonic()
            reg = await client.post(ADMIN, json={"adapter_id": tenant, "uri": f"s3://{BUCKET}/uploads/tenant-2"})
            t_done = time.monotonic()
            for _ in range(600):  # and keeps running on the new version
                if sum(w[2] > t_done for w in results) >= workers:
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*tasks)
            return reg, t_reg, t_done

    reg, t_reg, t_done = asyncio.run(run())
    assert reg.status_code == 200, reg.text
    body = reg.json()
    assert body["version"] == 1 and body["previous_version"] == 0 and body["multiplexed_model_id"] == "tenant-0@v1"

    errors = [w for w in results if w[0] != "ok"]
    assert not errors, f"{len(errors)} of {len(results)} requests failed during the update, e.g. {errors[:3]}"
    mixed = [w[1] for w in results if w[1] not in (old, new)]
    assert not mixed, f"{len(mixed)} outputs are neither the old nor the new adapter's, e.g. {mixed[:2]}"
    in_flight = sum(w[2] < t_done < w[4] for w in results)
    assert in_flight >= 100, f"only {in_flight} requests were in flight when the update returned"
    before = [w for w in results if w[4] < t_reg]
    assert before and all(w[1] == old for w in before), "a request that ended before the update got the new version"
    # A request whose first token came before the update began finished on the old version.
    early = [w for w in results if w[3] is not None and w[3] < t_reg]
    assert early and all(w[1] == old for w in early), "a request that started on the old version changed mid-stream"
    # Every request sent after the update returned used the new version (same router: no delay).
    later = [w[1] for w in results if w[2] > t_done]
    assert later and later == [new] * len(later), f"{sum(t != new for t in later)} of {len(later)} late requests were old"
    print(f"update under load: {len(results)} requests, {in_flight} in flight at the switch, "
          f"register took {t_done - t_reg:.2f}s, {sum(w[1] == new for w in results)} on the new version")

    # The old version's memory is freed on the replica (within the propagation bound).
    def freed():
        s = stats()
        return s if (tenant not in s["resident_adapters"] and tenant not in s["ram"]["keys"]
                     and s["lora"]["retired_pinned"] == 0 and s["running"] == 0) else None

    s = wait_for(freed, 10 * REFRESH_S + 5, "the old version to be freed")
    assert "tenant-0@v1" in s["resident_adapters"], s["resident_adapters"]
    listed = {a["id"]: a for a in lc.get(ADMIN).json()["data"]}
    assert listed[tenant]["version"] == 1 and listed[tenant]["origin"] == "registry"
    assert listed[tenant]["versions"][0]["source"] == f"s3://{BUCKET}/uploads/tenant-2"


# ---- 4. delete ------------------------------------------------------------------------------------


def test_delete_makes_404_and_frees_memory(lc, serve_env, refs):
    n, tenant = 6, "tenant-2"
    warm = lc.post(f"{ADMIN}/{tenant}/warm")
    assert warm.status_code == 200, warm.text
    nbytes = warm.json()["nbytes"]
    before = stats()
    assert tenant in before["resident_adapters"] and tenant in before["ram"]["keys"], before

    r = lc.delete(f"{ADMIN}/{tenant}")
    assert r.status_code == 200 and r.json()["deleted"] is True and r.json()["previous_version"] == 0, r.text
    err = error_of(lc.post(CMPL, json=greedy(tenant, n)), 404)
    assert "was deleted" in err["message"]
    assert tenant not in [m["id"] for m in lc.get(f"{PREFIX}/v1/models").json()["data"]]
    assert tenant not in [a["id"] for a in lc.get(ADMIN).json()["data"]]
    error_of(lc.delete(f"{ADMIN}/{tenant}"), 404)
    error_of(lc.post(f"{ADMIN}/{tenant}/warm"), 404)

    def freed():
        s = stats()
        return s if tenant not in s["resident_adapters"] and tenant not in s["ram"]["keys"] else None

    after = wait_for(freed, 10 * REFRESH_S + 5, "the deleted adapter's memory to be freed")
    assert after["lora"]["bytes_used"] <= before["lora"]["bytes_used"] - nbytes, (before["lora"], after["lora"], nbytes)
    assert after["lora"]["retired_pinned"] == 0

    # Registered again (through the Python handle): a new version, served again.
    h = serve.get_app_handle(APP)
    out = h.register_adapter.remote(tenant, f"s3://{BUCKET}/uploads/tenant-3").result(timeout_s=120)
    assert out["version"] == 1 and out["previous_version"] is None
    assert any(a["id"] == tenant for a in h.list_adapters.remote().result(timeout_s=60)["data"])
    r = lc.post(CMPL, json=greedy(tenant, n))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == refs.text("tenant-3", PROMPT, n)


# ---- 5. store down ------------------------------------------------------------------------------


def test_store_down_uncached_503_cached_keep_serving_then_recovery(lc, s3, refs):
    n = 6
    cached = {"tenant-0": "tenant-2", "tenant-1": "tenant-1", "tenant-3": "tenant-3"}  # model -> reference
    for model, ref in cached.items():
        r = lc.post(CMPL, json=greedy(model, n))
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == refs.text(ref, PROMPT, n), r.text
    s3.stop()
    try:
        err = error_of(lc.post(CMPL, json=greedy("cold-1", n)), 503)
        assert err["code"] == "adapter_store_unavailable" and "unreachable" in err["message"], err
        for _ in range(2):  # still serving after the routers' and replicas' refreshes failed
            for model, ref in cached.items():
                r = lc.post(CMPL, json=greedy(model, n))
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == refs.text(ref, PROMPT, n)
            time.sleep(2 * REFRESH_S)
        assert error_of(lc.get(ADMIN), 503)["code"] == "adapter_store_unavailable"
        r = lc.post(ADMIN, json={"adapter_id": "tenant-1", "uri": f"s3://{BUCKET}/uploads/tenant-4"})
        assert error_of(r, 503)["code"] == "adapter_store_unavailable"
    finally:
        s3.start()
    r = lc.post(CMPL, json=greedy("cold-1", n))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == refs.text("tenant-4", PROMPT, n)
    s = stats()
    assert s["running"] == 0 and s["lora"]["retired_pinned"] == 0


# ---- 6. registry integrity (issue 10): non-float weights, a version never names two contents ----------


def test_fp8_weights_through_admin_are_a_422(lc, s3, serve_env, tmp_path, refs):
    """fp8 (or any non-float) tensors: registration answers 422 naming the tensor, never a 500."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "fp8"
    shutil.copytree(serve_env.assets.adapter_path("tenant-1"), src)
    tensors = load_file(src / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, src / "adapter_model.safetensors")
    s3.upload_dir(src, BUCKET, "uploads/bad-fp8")
    r = lc.post(ADMIN, json={"adapter_id": "tenant-1", "uri": f"s3://{BUCKET}/uploads/bad-fp8"})
    err = error_of(r, 422)
    assert err["code"] == "invalid_adapter" and "float8_e4m3fn" in err["message"] and key[:40] in err["message"], err
    assert "s3://" not in err["message"].replace(f"s3://{BUCKET}/uploads/bad-fp8", ""), err  # only the admin's own URI
    r = lc.post(CMPL, json=greedy("tenant-1", 6))  # the tenant keeps its version
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == refs.text("tenant-1", PROMPT, 6), r.text


def test_a_stale_cached_copy_never_answers_a_new_registration(lc, s3, serve_env, refs):
    """The state an interrupted registration left before the fix: ``reg-race@v1``'s folder staged
    with tenant-4's files and validated, so the replica's RAM tier holds them, while the manifest
    never recorded v1. A registration of other files (tenant-5's) that gets number 1 must be
    served with those files: caches are checked against the content fingerprint the registry
    recorded, not trusted by name."""
    from serve_app.adapters.config import StoreConfig
    from serve_app.adapters.registry import AdapterRegistry
    from serve_app.adapters.backends import open_store

    n, aid = 8, "reg-race"
    assert refs.text("tenant-4", PROMPT, n) != refs.text("tenant-5", PROMPT, n)
    cfg = StoreConfig(storage_options=s3.storage_options)
    reg = AdapterRegistry(open_store(f"s3://{BUCKET}/adapters", cfg), cfg)
    version = reg.read().next_version(aid)
    reg.stage(aid, version, f"s3://{BUCKET}/uploads/tenant-4")
    lora = serve.get_deployment_handle("LoRADeployment", app_name=APP)
    lora.validate_adapter.remote(aid, version).result(timeout_s=120)
    assert f"{aid}@v{version}" in stats()["ram"]["keys"]

    r = lc.post(ADMIN, json={"adapter_id": aid, "uri": f"s3://{BUCKET}/uploads/tenant-5"})
    assert r.status_code == 200, r.text
    body = r.json()
    for _ in range(3):
        out = lc.post(CMPL, json=greedy(aid, n))
        assert out.status_code == 200, out.text
        assert out.json()["choices"][0]["text"] == refs.text("tenant-5", PROMPT, n), (
            f"{aid}@v{body['version']} was answered with the stale cached copy (tenant-4's weights)")
    listed = {a["id"]: a for a in lc.get(ADMIN).json()["data"]}[aid]
    numbers = [v["version"] for v in listed["versions"]]
    assert len(numbers) == len(set(numbers)) and listed["version"] == body["version"], listed
