"""Adapter store benchmark: load latency per tier, and the scale workload W2 over S3.

Part A (in this process, no Ray): one W1 adapter (tenant-0, rank 8 on q/k/v/o) made ready to
serve from each tier -- S3 (moto's server on 127.0.0.1, a separate process) -> disk cache ->
RAM -> device -- against PEFT's ``PeftModel.load_adapter`` of the same folder from local disk.
The device hit is the product's own lookup (``engine.lora.acquire`` + ``release`` on a resident
adapter, what every request does). The disk-cache row reads a file the S3 row wrote just before,
so it is an OS page-cache hit and says so; a second disk row first drops that file from the page
cache (fsync + POSIX_FADV_DONTNEED, best effort: a VM's host cache may still serve it).

Part B (Ray Serve, 2 CPUs, over HTTP): W2 of design/WORKLOAD.md -- 1000 tenant adapters (rank 8,
W1's base) in S3, Zipf(1.1) traffic, an adapter LRU of 32 per LoRA replica -- against an
"all-hit" app whose LRU holds every tenant (warmed up first). Reports tokens/s relative to
all-hit (target >= 0.80), hit rates per tier, and the replica's load latency per tier. Every
reply's text must equal an in-process ``LoRAEngine``'s output for the same tenant and prompt;
otherwise the verdict is INVALID (a wrong adapter, or none, would otherwise count).

    python -m benchmarks.store_bench              # full: part A 20 reps; W2 1000 tenants, 3 reps
    python -m benchmarks.store_bench --quick      # smoke run (16 tenants, LRU 4, 1 rep; about a minute on 2 cores)
    python -m benchmarks.store_bench --part a     # only part A (or b)
    python -m benchmarks.store_bench --json out.json
"""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "disabled"  # before any ray import

import argparse
import asyncio
import concurrent.futures
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.engine_bench import (
    SEED,
    ZIPF_S,
    environment,
    fmt_ratio,
    fmt_tps,
    loadavg,
    make_prompts,
    quiet_libraries,
    ratio,
    zipf_assignment,
)
from benchmarks.http_bench import free_port, start_ray, start_serve, stop_ray, wait_http
from benchmarks.verify import INVALID, TextAgreement, gate

TARGET_W2_VS_ALL_HIT = 0.80
BUCKET = "store-bench"
KEY = SECRET = "bench"


@dataclass(frozen=True)
class Shape:
    reps_a: int
    tenants: int
    lru: int
    requests: int
    prompt_len: int
    max_tokens: int
    concurrency: int
    reps_b: int


FULL = Shape(reps_a=20, tenants=1000, lru=32, requests=512, prompt_len=32, max_tokens=32, concurrency=64, reps_b=3)
QUICK = Shape(reps_a=2, tenants=16, lru=4, requests=32, prompt_len=16, max_tokens=8, concurrency=8, reps_b=1)  # smoke (CI)


# ---- a local S3 (moto's server, in its own process so it takes no GIL from the client) -------------


class MotoProcess:
    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import socket

        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto server did not start")
                time.sleep(0.1)
        self.client().create_bucket(Bucket=BUCKET)

    @property
    def storage_options(self) -> dict:
        return {"key": KEY, "secret": SECRET,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY,
                            aws_secret_access_key=SECRET, region_name="us-east-1")

    def upload(self, folders: dict[str, Path], prefix: str) -> float:
        """Upload adapter folders (id -> folder) under prefix/<id>/; returns seconds."""
        t0 = time.perf_counter()
        client = self.client()

        def one(item):
            aid, folder = item
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                client.upload_file(str(folder / name), BUCKET, f"{prefix}/{aid}/{name}")

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, folders.items()))
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---- part A: load latency per tier ------------------------------------------------------------------


def part_a(shape: Shape, s3: MotoProcess, work: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from serve_app.adapters.config import StoreConfig
    from serve_app.adapters.fetch import AdapterFetcher
    from serve_app.adapters.registry import AdapterRegistry
    from serve_app.adapters.backends import open_store
    from serve_app.config import EngineConfig
    from serve_app.demo import build_demo_assets
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.lora.weights import load_lora_weights

    assets = build_demo_assets()  # W1
    aid = "tenant-0"
    folder = assets.adapter_path(aid)
    s3.upload({aid: folder}, "part-a")
    cfg = StoreConfig(storage_options=s3.storage_options, disk_cache_dir=str(work / "cache-a"))
    store = open_store(f"s3://{BUCKET}/part-a", cfg)
    # A registered version (immutable): a disk-cache hit needs no store call. (A hand-placed
    # version 0 costs one extra LIST per disk hit, to notice in-place replacement.)
    registry = AdapterRegistry(store, cfg)
    registry.commit(aid, 1, registry.stage(aid, 1, f"s3://{BUCKET}/part-a/{aid}"))
    fetcher = AdapterFetcher(store, cfg)
    key = fetcher._key(registry.version_rel(aid, 1))
    engine = LoRAEngine(EngineConfig(model=str(assets.base), torch_threads=2))
    parse = functools.partial(load_lora_weights, base=engine.base_shape, max_rank=engine.config.max_lora_rank,
                              dtype=engine.dtype)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(assets.base), dtype=torch.float32).eval(), str(folder),
        adapter_name="resident")
    # A resident copy under its own ID (loading tenant-0 again below retires only tenant-0's own
    # version), plus 31 more, as in a full LRU of 32.
    resident = f"resident-{aid}"
    engine.load_adapter(resident, str(folder))
    for i in range(31):
        engine.load_adapter(f"resident-{i}", str(folder))
    cached_folder: list[str] = []

    def drop_page_cache(folder_path: str) -> None:
        for name in os.listdir(folder_path):
            fd = os.open(os.path.join(folder_path, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def ready_from(tier: str, weights=None) -> float:
        if tier == "s3":
            fetcher.disk.remove(key)
        if tier == "disk_cold" and cached_folder:
            drop_page_cache(cached_folder[0])
        t0 = time.perf_counter()
        if tier in ("s3", "disk", "disk_cold"):
            fetched = fetcher.fetch(aid, 1)
            assert fetched.tier == ("s3" if tier == "s3" else "disk"), fetched
            cached_folder[:] = [fetched.path]
            weights = engine.run_in_engine(parse, aid, fetched.path)
        res = engine.run_in_engine(engine.lora.add, weights)
        dt = time.perf_counter() - t0
        engine.unload_adapter(res)
        return dt

    def device_hit() -> float:
        """The product's lookup on a resident adapter: what add_request does for a device hit."""
        t0 = time.perf_counter()
        res = engine.lora.acquire(resident)
        engine.lora.release(res)
        dt = time.perf_counter() - t0
        assert res.adapter_id == resident and not res.retired, res
        return dt

    def peft_load(i: int) -> float:
        t0 = time.perf_counter()
        peft_model.load_adapter(str(folder), adapter_name=f"a{i}")
        dt = time.perf_counter() - t0
        peft_model.delete_adapter(f"a{i}")
        return dt

    weights = engine.run_in_engine(parse, aid, str(folder))
    tiers = ("s3", "disk", "disk_cold", "ram", "device", "peft")
    times: dict[str, list[float]] = {k: [] for k in tiers}
    bytes_before = engine.lora.stats()["bytes_used"]
    for rep in range(shape.reps_a + 1):  # rep 0: warm-up, dropped
        sample = {"s3": ready_from("s3"), "disk": ready_from("disk"), "disk_cold": ready_from("disk_cold"),
                  "ram": ready_from("ram", weights), "device": device_hit(), "peft": peft_load(rep)}
        if rep:
            for k, v in sample.items():
                times[k].append(v)
    assert engine.lora.stats()["bytes_used"] == bytes_before, "a load leaked pool rows"
    engine.shutdown()
    meds = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    labels = {"s3": "S3 -> device (download, parse, copy)",
              "disk": "disk cache -> device (page-cache hit: just written)",
              "disk_cold": "disk cache -> device (page cache dropped)",
              "ram": "RAM -> device (copy into the pool)",
              "device": "device hit (lora.acquire + release)",
              "peft": "PEFT load_adapter (local folder)"}
    print(f"\nPart A: one W1 adapter ({aid}@v1, {(folder / 'adapter_model.safetensors').stat().st_size:,} bytes) "
          f"made ready to serve; median of {shape.reps_a} after a warm-up")
    print(f"{'tier':<52} {'median ms':>10} {'p90 ms':>8} {'vs PEFT':>8}")
    for k in tiers:
        r = ratio(meds[k], meds["peft"])
        rows.append({"tier": k, "median_s": meds[k], "p90_s": pct(times[k], 0.9), "vs_peft": r})
        print(f"{labels[k]:<52} {meds[k] * 1e3:>10.3f} {pct(times[k], 0.9) * 1e3:>8.3f} {fmt_ratio(r):>8}")
    print("(the page-cache-hit row reads a file written moments before; the dropped row is best effort: "
          "fsync + POSIX_FADV_DONTNEED on that file, a VM's host cache may still serve it)")
    return {"adapter": aid, "rows": rows, "times": times}


# ---- part B: W2 -----------------------------------------------------------------------------------


async def run_pass(url: str, prefix: str, jobs: list[tuple[str, list[int]]], max_tokens: int,
                   concurrency: int, want: list[str] | None = None) -> dict:
    """One closed-loop pass; each 200 reply's text is checked against ``want[i]`` (the engine's)."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    tokens, errors, lat = 0, [], []
    texts = TextAgreement()

    async def one(client, i, model, prompt):
        nonlocal tokens
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{prefix}/v1/completions", json={
                    "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True})
            except httpx.HTTPError as e:
                errors.append(f"{model}: {type(e).__name__}")
                return
            lat.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors.append(f"{model}: {r.status_code} {r.text[:200]}")
                return
            obj = r.json()
            n = obj["usage"]["completion_tokens"]
            if n != max_tokens:
                errors.append(f"{model}: {n} tokens")
            tokens += n
            texts.add(f"#{i} {model}", (obj.get("choices") or [{}])[0].get("text"), None if want is None else want[i])

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits, trust_env=False) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, i, m, p) for i, (m, p) in enumerate(jobs)))
        wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall": wall, "tps": tokens / wall, "errors": errors, "texts": texts,
            "p50": statistics.median(lat) if lat else None, "p99": pct(lat, 0.99) if lat else None}


def lora_stats(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("LoRADeployment", app_name=app).stats.remote().result(timeout_s=120)


def tier_delta(before: dict, after: dict, requests: int) -> dict:
    loads = after["adapter_loads"] - before["adapter_loads"]
    by_tier = {t: after["loads_by_tier"].get(t, 0) - before["loads_by_tier"].get(t, 0)
               for t in ("ram", "disk", "s3")}
    secs = {t: after["load_seconds_by_tier"].get(t, 0.0) - before["load_seconds_by_tier"].get(t, 0.0)
            for t in ("ram", "disk", "s3")}
    below_ram = by_tier["disk"] + by_tier["s3"]
    return {
        "requests": requests,
        "device_loads": loads,
        "device_hit_rate": (requests - loads) / requests if requests else None,
        "loads_by_tier": by_tier,
        "ram_hit_rate": by_tier["ram"] / loads if loads else None,  # of device misses
        "disk_hit_rate": by_tier["disk"] / below_ram if below_ram else None,  # of RAM misses
        "mean_load_ms": {t: 1e3 * secs[t] / by_tier[t] for t in by_tier if by_tier[t]},
    }


def fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def reference_texts(assets, jobs: list[tuple[str, list[int]]], max_tokens: int) -> list[str]:
    """Each job's text from a LoRAEngine in this process with the same adapter files (before Ray
    starts): the reference every reply must equal."""
    from serve_app.config import EngineConfig
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    engine = LoRAEngine(EngineConfig(model=str(assets.base), torch_threads=2, max_num_seqs=64))
    try:
        for m in sorted({m for m, _ in jobs}):
            engine.load_adapter(m, str(assets.adapter_path(m)))
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        texts = [c.text for c in engine.generate_batch([(p, sp, m) for m, p in jobs])]
    finally:
        engine.shutdown()
    print(f"reference texts: {len(texts)} requests through an in-process LoRAEngine in {time.perf_counter() - t0:.1f}s")
    return texts


def part_b(shape: Shape, s3: MotoProcess, work: Path) -> dict:
    from ray import serve

    from serve_app.app import build_app
    from serve_app.demo import build_demo_assets

    t0 = time.perf_counter()
    assets = build_demo_assets(num_adapters=shape.tenants, ranks=[8])  # W1's base, every tenant rank 8
    t_build = time.perf_counter() - t0
    upload_s = s3.upload({a: assets.adapter_path(a) for a in assets.adapter_ids}, "w2")
    print(f"\nPart B: W2, {shape.tenants} tenants (rank 8) in s3://{BUCKET}/w2 (assets {t_build:.0f}s, "
          f"upload {upload_s:.0f}s)")
    vocab = 8192
    prompts = make_prompts(shape.requests, shape.prompt_len, vocab, SEED)
    tenants = zipf_assignment(shape.requests, assets.adapter_ids, ZIPF_S, SEED + 7)
    jobs = list(zip(tenants, prompts))
    distinct = len(set(tenants))
    print(f"workload: {shape.requests} requests, Zipf({ZIPF_S}) -> {distinct} distinct tenants, "
          f"{shape.prompt_len}-token prompts, {shape.max_tokens} new tokens, {shape.concurrency} in flight; "
          f"LoRA replica LRU {shape.lru}")

    want = reference_texts(assets, jobs, shape.max_tokens)
    start_ray(2)
    port, url = start_serve()
    common = {"base_model": str(assets.base), "adapters": f"s3://{BUCKET}/w2", "lora_num_cpus": 0.8,
              "router_num_cpus": 0.1, "torch_threads": 2, "max_num_seqs": 64}
    try:
        apps = {
            "w2": {**common, "max_adapters_per_replica": shape.lru,
                   "store": {"storage_options": s3.storage_options, "disk_cache_dir": str(work / "cache-w2")}},
            "allhit": {**common, "max_adapters_per_replica": max(shape.tenants, 1),
                       "store": {"storage_options": s3.storage_options, "disk_cache_dir": str(work / "cache-all")}},
        }
        for name, args in apps.items():
            serve.run(build_app(args), name=name, route_prefix=f"/{name}")
            wait_http(f"{url}/{name}/health")

        texts_all: dict[str, list[TextAgreement]] = {"allhit": [], "w2": []}

        def timed(app: str) -> dict:
            before = lora_stats(app)
            res = asyncio.run(run_pass(url, f"/{app}", jobs, shape.max_tokens, shape.concurrency, want))
            texts_all[app].append(res["texts"])
            res["loadavg"] = loadavg()
            res["tiers"] = tier_delta(before, lora_stats(app), shape.requests)
            if res["errors"]:
                print(f"  {app}: {len(res['errors'])} bad replies, e.g. {res['errors'][:2]}")
            return res

        warm = timed("allhit")  # loads every tenant of the workload; all resident afterwards
        print(f"all-hit warm-up: {warm['tiers']['device_loads']} loads")
        cold = timed("w2")  # empty disk cache, empty RAM: every first touch comes from S3
        runs: dict[str, list[dict]] = {"allhit": [], "w2": []}
        for rep in range(shape.reps_b):
            for app in (("allhit", "w2") if rep % 2 == 0 else ("w2", "allhit")):
                runs[app].append(timed(app))
    finally:
        stop_ray()

    def med(app):
        rs = sorted(runs[app], key=lambda r: r["tps"])
        return rs[len(rs) // 2]

    allhit, w2 = med("allhit"), med("w2")
    r_steady, r_cold = ratio(w2["tps"], allhit["tps"]), ratio(cold["tps"], allhit["tps"])
    print(f"\n{'run':<34} {'tok/s':>8} {'vs all-hit':>10} {'p50 ms':>8} {'p99 ms':>8} {'dev hit':>8} "
          f"{'RAM hit':>8} {'disk hit':>8} {'loads ram/disk/s3':>18}")
    for label, r, rr in (("all-hit (LRU holds every tenant)", allhit, 1.0), ("W2 steady (LRU, warm tiers)", w2, r_steady),
                         ("W2 cold (first pass, from S3)", cold, r_cold)):
        t = r["tiers"]
        lbt = t["loads_by_tier"]
        print(f"{label:<34} {fmt_tps(r['tps']):>8} {fmt_ratio(rr):>10} {r['p50'] * 1e3:>8.0f} {r['p99'] * 1e3:>8.0f} "
              f"{fmt_rate(t['device_hit_rate']):>8} {fmt_rate(t['ram_hit_rate']):>8} {fmt_rate(t['disk_hit_rate']):>8} "
              f"{lbt['ram']:>6}/{lbt['disk']}/{lbt['s3']:<6}")
    lat = {**cold["tiers"]["mean_load_ms"], **w2["tiers"]["mean_load_ms"]}
    print("replica load latency per source tier (mean, ms, request -> resident; from the cold and steady runs): "
          + ", ".join(f"{t} {v:.1f}" for t, v in sorted(lat.items())))
    bad = sum(len(r["errors"]) for rs in runs.values() for r in rs) + len(cold["errors"])
    texts_ok = {}
    for app, checks in texts_all.items():
        total = TextAgreement(checked=sum(t.checked for t in checks), equal=sum(t.equal for t in checks),
                              mismatches=[m for t in checks for m in t.mismatches])
        texts_ok[app] = total.to_json()
        print(f"text check, {app} (every pass, warm-up and cold included): {total.summary()}")
    verdict = "PASS" if r_steady is not None and r_steady >= TARGET_W2_VS_ALL_HIT and not bad else "MISS"
    verdict = gate(verdict, *(t["ok"] for t in texts_ok.values()))
    print(f"Target: W2 steady tok/s >= {TARGET_W2_VS_ALL_HIT:.2f}x all-hit: {fmt_ratio(r_steady)} {verdict}"
          + (f" ({bad} bad replies)" if bad else "")
          + ("  (reply texts differ from the engine's)" if verdict == INVALID else ""))
    for r in (*runs["allhit"], *runs["w2"], cold, warm):
        if isinstance(r["texts"], TextAgreement):
            r["texts"] = r["texts"].to_json()
    return {"shape": asdict(shape), "distinct_tenants": distinct, "allhit": allhit, "w2_steady": w2, "w2_cold": cold,
            "runs": runs, "ratio_steady": r_steady, "ratio_cold": r_cold, "texts": texts_ok, "verdict": verdict}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shrunk smoke run (16 tenants, LRU 4, 1 rep)")
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    quiet_libraries()
    env = environment()
    print(f"store_bench ({'quick' if args.quick else 'full'}): loadavg {loadavg()}, {env['cpu_count']} CPUs, "
          f"torch {env['torch']}, peft {env['peft']}")
    out: dict = {"environment": env, "quick": args.quick}
    work = Path(tempfile.mkdtemp(prefix="store_bench_"))
    s3 = MotoProcess()
    try:
        if args.part in ("a", "all"):
            out["part_a"] = part_a(shape, s3, work)
        if args.part in ("b", "all"):
            out["part_b"] = part_b(shape, s3, work)
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"loadavg at the end: {loadavg()} (the Ray replicas and moto are this run's; more is other load)")
    if args.quick:
        print("(--quick: a smoke test, not results)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
