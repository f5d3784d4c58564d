"""HTTP benchmark on the shared workload W1: the deployed app (Ray Serve + OpenAI API) vs the engine offline.

One process, one machine state, the same prompts, in two phases:

1. **engine offline**: a ``LoRAEngine`` in this process runs the W1 batch with
   ``generate_batch`` for the three mixes (base only, 8 adapters round-robin, Zipf(1.1) over
   the 8 adapters), like ``engine_bench``; it is then shut down so it takes no CPU from phase 2;
2. **HTTP**: Ray (2 CPUs) + Serve on a free port on 127.0.0.1, ``build_app`` with the demo (W1)
   assets, and the same requests sent all at once with ``httpx.AsyncClient`` to
   ``/v1/completions`` (token-ID prompts, ``temperature 0``, ``ignore_eos``), each mix, plus a
   streaming run of the round-robin mix (TTFT and tokens/s).

Every row is warmed up once and timed ``reps`` times, interleaved per repetition, median
reported. Target: HTTP round-robin (8 adapters) tokens/s >= 0.85 x the engine's offline tokens/s.
Every reply's text must equal the engine's decoded output for the same request (same prompt,
same adapter); a row with any other text (a wrong adapter, none, a broken stream) is INVALID.

    python -m benchmarks.http_bench            # full: 64 requests x 64 tokens, 3 reps
    python -m benchmarks.http_bench --quick    # smoke run: 16 requests x 16 tokens, 1 rep
    python -m benchmarks.http_bench --json out.json
"""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 turns token auth on for local clusters; before any ray import

import argparse
import asyncio
import gc
import json
import logging
import math
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from benchmarks.engine_bench import (
    SEED,
    ZIPF_S,
    CpuMeter,
    environment,
    fmt_ratio,
    fmt_tps,
    loadavg,
    make_prompts,
    quiet_libraries,
    ratio,
    zipf_assignment,
)
from benchmarks.verify import INVALID, TextAgreement, gate

TARGET_RR_VS_ENGINE = 0.85  # HTTP 8-adapter (round-robin) tokens/s >= 0.85 x engine offline tokens/s
APP_NAME = "http-bench"
BASE_NAME = "base"


@dataclass(frozen=True)
class Shape:
    n_requests: int
    prompt_len: int
    new_tokens: int
    reps: int


FULL = Shape(n_requests=64, prompt_len=32, new_tokens=64, reps=3)
QUICK = Shape(n_requests=16, prompt_len=32, new_tokens=16, reps=1)

MIXES = ("base", "rr", "zipf")
LABELS = {
    "base": "base only",
    "rr": "8 adapters round-robin",
    "zipf": "Zipf(1.1) over 8 adapters",
    "rr_stream": "round-robin, streaming",
}


# ---- small helpers (merged_bench imports these too) ------------------------------------------


def percentile(xs: list[float], q: float) -> float | None:
    """q-th percentile with linear interpolation (numpy's default); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:,.0f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_ray() -> None:
    for name in ("ray", "ray.serve", "ray.data", "ray.tune", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)


def start_ray(num_cpus: int = 2) -> None:
    """A private local Ray instance (never an existing cluster), quiet."""
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}},
    )
    quiet_ray()


def start_serve() -> tuple[int, str]:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    quiet_ray()
    return port, f"http://127.0.0.1:{port}"


def wait_http(url: str, timeout: float = 120.0) -> None:
    """Poll GET url until 200: serve.run returns when replicas are up; the proxy may lag."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=5, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f}s")
        time.sleep(0.2)


def stop_ray() -> None:
    """Shut down only what start_ray/start_serve started in this process."""
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    except Exception as e:  # pragma: no cover - best effort teardown
        print(f"(serve.shutdown: {type(e).__name__}: {e})")
    finally:
        ray.shutdown()


@dataclass
class Reply:
    model: str
    status: int  # HTTP status; 0 = transport error; 599 = error event inside a 200 stream
    latency: float  # seconds from send to the last byte
    completion_tokens: int
    served_by: str | None
    ttft: float | None = None  # streaming: seconds to the first chunk with choices
    error: str | None = None
    text: str | None = None  # the completion's text (streaming: the deltas joined)


def client(max_connections: int = 256):
    import httpx

    return httpx.AsyncClient(
        timeout=httpx.Timeout(600.0, connect=30.0),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        trust_env=False,  # 127.0.0.1 directly, never through a proxy from the environment
    )


async def post_completion(c, url: str, model: str, prompt, max_tokens: int, *, stream: bool = False) -> Reply:
    """One /v1/completions request; errors come back as a Reply, never raised."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await c.post(url + "/v1/completions", json=body)
            lat = time.perf_counter() - t0
            served = r.headers.get("x-served-by")
            if r.status_code != 200:
                return Reply(model, r.status_code, lat, 0, served, error=r.text[:300])
            obj = r.json()
            usage = obj.get("usage") or {}
            choices = obj.get("choices") or [{}]
            return Reply(model, 200, lat, int(usage.get("completion_tokens", 0)), served,
                         text=choices[0].get("text"))
        body.update(stream=True, stream_options={"include_usage": True})
        ttft, tokens, err, parts = None, 0, None, []
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            served = r.headers.get("x-served-by")
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return Reply(model, r.status_code, time.perf_counter() - t0, 0, served, error=text[:300])
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    err = json.dumps(obj["error"])[:300]
                if obj.get("choices"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(obj["choices"][0].get("text") or "")
                if obj.get("usage"):
                    tokens = int(obj["usage"].get("completion_tokens", 0))
        return Reply(model, 200 if err is None else 599, time.perf_counter() - t0, tokens, served, ttft, err,
                     text="".join(parts))
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return Reply(model, 0, time.perf_counter() - t0, 0, None, error=f"{type(e).__name__}: {e}"[:300])


async def run_requests(
    c, url: str, requests: list[tuple[str, object]], max_tokens: int, *, stream: bool = False,
    concurrency: int | None = None,
) -> tuple[float, list[Reply]]:
    """Send ``requests`` ((model, prompt) pairs): all at once, or at most ``concurrency`` in flight
    (in order, a new one as soon as one finishes). Returns (wall seconds, replies in order)."""
    sem = asyncio.Semaphore(concurrency) if concurrency else None

    async def one(model, prompt):
        if sem is None:
            return await post_completion(c, url, model, prompt, max_tokens, stream=stream)
        async with sem:
            return await post_completion(c, url, model, prompt, max_tokens, stream=stream)

    t0 = time.perf_counter()
    replies = await asyncio.gather(*(one(m, p) for m, p in requests))
    return time.perf_counter() - t0, list(replies)


def check_texts(check: TextAgreement, label: str, replies: list[Reply], want: list[str | None]) -> None:
    """Add each 200 reply's text vs the engine's text for the same request (non-200s are counted
    as bad replies by ``bad_replies``)."""
    for i, (r, w) in enumerate(zip(replies, want)):
        if r.status == 200:
            check.add(f"{label} #{i} {r.model}", r.text, w)


def bad_replies(replies: list[Reply], new_tokens: int) -> list[str]:
    """Why each reply that is not a 200 with exactly ``new_tokens`` completion tokens is bad."""
    out = []
    for i, r in enumerate(replies):
        if r.status != 200:
            out.append(f"#{i} {r.model}: status {r.status}: {r.error}")
        elif r.completion_tokens != new_tokens:
            out.append(f"#{i} {r.model}: {r.completion_tokens} completion tokens, expected {new_tokens}")
    return out


# ---- the benchmark ----------------------------------------------------------------------------


@dataclass
class HttpRow:
    key: str
    walls: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # every request of every timed rep
    ttfts: list[float] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    texts: TextAgreement = field(default_factory=TextAgreement)

    @property
    def tps(self) -> float | None:
        if not self.walls:
            return None
        return statistics.median(t / w for t, w in zip(self.tokens, self.walls))


def engine_offline(assets, ids, prompts, mixes, shape: Shape, meter: CpuMeter, t_start: float) -> dict:
    import torch

    from serve_app.config import EngineConfig
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.sampling import SamplingParams

    engine = LoRAEngine(EngineConfig(model=str(assets.base), max_num_seqs=max(64, shape.n_requests), torch_threads=2))
    try:
        for a in ids:
            engine.load_adapter(a, str(assets.adapter_path(a)))
        sp = SamplingParams(max_tokens=shape.new_tokens, temperature=0.0, ignore_eos=True)
        res = {m: {"times": [], "tokens": 0, "others": [], "texts": None} for m in MIXES}
        for rep in range(shape.reps + 1):
            for mix in MIXES:
                adapters = [None if m == BASE_NAME else m for m in mixes[mix]]
                gc.collect()
                s0 = meter.snap()
                t0 = time.perf_counter()
                comps = engine.generate_batch([(p, sp, a) for p, a in zip(prompts, adapters)])
                dt = time.perf_counter() - t0
                share = meter.others_share(s0, meter.snap())
                bad = [len(c.token_ids) for c in comps if len(c.token_ids) != shape.new_tokens]
                if bad:
                    raise RuntimeError(f"engine returned {bad[0]} tokens for a request, expected {shape.new_tokens}")
                texts = [c.text for c in comps]
                if res[mix]["texts"] is None:
                    res[mix]["texts"] = texts  # the reference for the HTTP replies
                elif texts != res[mix]["texts"]:
                    raise RuntimeError(f"the engine's own outputs for mix {mix!r} changed between runs: no reference")
                if rep > 0:
                    res[mix]["times"].append(dt)
                    res[mix]["tokens"] = sum(len(c.token_ids) for c in comps)
                    if share is not None:
                        res[mix]["others"].append(share)
            print(f"  engine {'warm-up' if rep == 0 else f'rep {rep}/{shape.reps}'} done "
                  f"({time.perf_counter() - t_start:.0f}s, loadavg {loadavg()})", flush=True)
        env_threads = torch.get_num_threads()
    finally:
        engine.shutdown()
        del engine
        gc.collect()
    for m in MIXES:
        r = res[m]
        r["tps"] = r["tokens"] / statistics.median(r["times"])
    res["torch_threads"] = env_threads
    return res


def run(shape: Shape, json_out: str | None) -> dict:
    quiet_libraries()
    t_start = time.perf_counter()

    from serve_app.demo import build_demo_assets

    env = environment()
    assets = build_demo_assets()  # W1's base and 8 adapters, cached (the app's replicas find the same folder)
    ids = list(assets.adapter_ids)
    n, plen, new = shape.n_requests, shape.prompt_len, shape.new_tokens

    print("== http_bench: shared workload W1 over HTTP vs the engine offline"
          + (" (--quick: shrunk, smoke run only)" if shape != FULL else ""))
    print(f"env: python {env['python']}, torch {env['torch']}, cpu_count {env['cpu_count']}, "
          f"affinity {env['cpu_affinity']}, loadavg {env['loadavg_start']}")
    print(f"assets: {assets.root}")

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(assets.base)).vocab_size
    prompts = make_prompts(n, plen, vocab, SEED)
    mixes = {
        "base": [BASE_NAME] * n,
        "rr": [ids[i % len(ids)] for i in range(n)],
        "zipf": zipf_assignment(n, ids, ZIPF_S, SEED + 1),
    }
    print(f"workload: {n} prompts x {plen} tokens (seed {SEED}), {new} new tokens each, greedy, ignore_eos, "
          f"all {n} in flight; mixes: base only, round-robin over {len(ids)} adapters, Zipf({ZIPF_S})")

    # ---- phase 1: the engine offline ----
    meter = CpuMeter()
    print("phase 1: engine offline (LoRAEngine in this process, generate_batch, torch_threads 2)")
    eng = engine_offline(assets, ids, prompts, mixes, shape, meter, t_start)

    # ---- phase 2: HTTP ----
    app_args = {
        "base_model": "demo",
        "lora_num_cpus": 1.0,
        "router_num_cpus": 0.25,
        "torch_threads": 2,
        "max_adapters_per_replica": 8,
        "base_model_name": BASE_NAME,
    }
    print(f"phase 2: Ray (num_cpus=2) + Serve on 127.0.0.1, build_app({app_args})")
    rows = {k: HttpRow(k) for k in (*MIXES, "rr_stream")}
    import ray  # noqa: F401  (after RAY_AUTH_MODE is set)
    from ray import serve

    from serve_app.app import build_app

    t_ray = time.perf_counter()
    start_ray(2)
    try:
        _, url = start_serve()
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
        wait_http(url + "/health")
        print(f"  app up at {url} in {time.perf_counter() - t_ray:.0f}s")

        async def http_phase():
            async with client() as c:
                for rep in range(shape.reps + 1):
                    for key in rows:
                        mix = "rr" if key == "rr_stream" else key
                        reqs = list(zip(mixes[mix], prompts))
                        wall, replies = await run_requests(c, url, reqs, new, stream=key == "rr_stream")
                        row = rows[key]
                        bad = bad_replies(replies, new)
                        check_texts(row.texts, f"{'warm-up' if rep == 0 else f'rep {rep}'} {key}", replies,
                                    eng[mix]["texts"])
                        if rep == 0:
                            if bad:  # warm-up failures are reported, not timed
                                row.bad.extend(f"warm-up {b}" for b in bad)
                            continue
                        row.bad.extend(bad)
                        row.walls.append(wall)
                        row.tokens.append(sum(r.completion_tokens for r in replies))
                        row.latencies.extend(r.latency for r in replies if r.status == 200)
                        row.ttfts.extend(r.ttft for r in replies if r.ttft is not None)
                    print(f"  http {'warm-up' if rep == 0 else f'rep {rep}/{shape.reps}'} done "
                          f"({time.perf_counter() - t_start:.0f}s, loadavg {loadavg()})", flush=True)

        asyncio.run(http_phase())
    finally:
        stop_ray()

    # ---- report ----
    print()
    print(f"Generated tokens/s, median of {shape.reps} after a warm-up; latency per request over all timed reps "
          f"({n} requests x {new} tokens in flight at once)")
    hdr = f"  {'mix':<28} {'engine tok/s':>12} {'HTTP tok/s':>11} {'HTTP/engine':>12} {'p50 ms':>8} {'p99 ms':>8}  note"
    print(hdr)
    results = {}
    for key, row in rows.items():
        eng_key = "rr" if key == "rr_stream" else key
        e_tps = eng[eng_key]["tps"]
        r = ratio(row.tps, e_tps)
        p50, p99 = percentile(row.latencies, 50), percentile(row.latencies, 99)
        note = ""
        if key == "rr_stream":
            note = f"TTFT p50 {fmt_ms(percentile(row.ttfts, 50))} ms, p99 {fmt_ms(percentile(row.ttfts, 99))} ms; vs engine rr"
        if row.bad:
            note += f"  {len(row.bad)} BAD replies"
        if not row.texts.ok:
            note += f"  INVALID: {row.texts.checked - row.texts.equal} texts differ from the engine's"
        print(f"  {LABELS[key]:<28} {fmt_tps(e_tps):>12} {fmt_tps(row.tps):>11} {fmt_ratio(r, 3):>12} "
              f"{fmt_ms(p50):>8} {fmt_ms(p99):>8}  {note}")
        results[key] = {
            "label": LABELS[key], "engine_tokens_per_s": e_tps, "http_tokens_per_s": row.tps, "ratio": r,
            "p50_s": p50, "p99_s": p99, "ttft_p50_s": percentile(row.ttfts, 50), "ttft_p99_s": percentile(row.ttfts, 99),
            "walls_s": row.walls, "tokens": row.tokens, "bad": row.bad[:20], "n_bad": len(row.bad),
            "engine_times_s": eng[eng_key]["times"], "texts": row.texts.to_json(),
        }
    worst = max((x for m in MIXES for x in eng[m]["others"]), default=None)
    if worst is not None and worst > 0.10:
        print(f"  WARNING: other processes took up to {worst:.0%} of the CPUs during the engine's timed runs; "
              "the figures are contaminated (check `uptime`).")
    n_bad = sum(len(r.bad) for r in rows.values())
    print(f"  replies checked: every one 200 with {new} completion tokens: "
          + ("yes" if n_bad == 0 else f"NO, {n_bad} bad, e.g. {next(b for r in rows.values() for b in r.bad)}"))

    for key, row in rows.items():
        print(f"  text check, {LABELS[key]}: {row.texts.summary()}")
    value = results["rr"]["ratio"]
    verdict = "n/a" if value is None else ("PASS" if value >= TARGET_RR_VS_ENGINE and n_bad == 0 else "MISS")
    verdict = gate(verdict, rows["rr"].texts.ok)
    print()
    print(f"Target: HTTP 8-adapter (round-robin) tok/s >= {TARGET_RR_VS_ENGINE:.2f}x engine offline tok/s: "
          f"{fmt_ratio(value, 3)} {verdict}" + ("  (reply texts differ from the engine's)" if verdict == INVALID else ""))
    if shape != FULL:
        print("(--quick: shrunk workload, one repetition; figures are a smoke test, not W1 results)")
    elapsed = time.perf_counter() - t_start
    env["loadavg_end"] = loadavg()
    print(f"\ntotal {elapsed:.0f}s; loadavg at start {env['loadavg_start']}, at end {env['loadavg_end']}")

    result = {
        "workload": "W1-http" if shape == FULL else "W1-http-quick",
        "shape": asdict(shape),
        "seed": SEED,
        "zipf_s": ZIPF_S,
        "app_args": app_args,
        "env": env,
        "assets": str(assets.root),
        "engine": {m: {k: eng[m][k] for k in ("tps", "times", "tokens", "others")} for m in MIXES},
        "rows": results,
        "target": {"value": value, "threshold": TARGET_RR_VS_ENGINE, "verdict": verdict,
                   "texts_checked": rows["rr"].texts.ok},
        "elapsed_s": elapsed,
    }
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {json_out}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shrunk smoke run (16 requests, 16 new tokens, 1 rep)")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    run(QUICK if args.quick else FULL, args.json)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
