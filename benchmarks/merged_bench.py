"""Merged hot-tenant path benchmark: a hot tenant on the merged path vs the LoRA path vs the bare base.

Two parts, one process:

A. **Engine level** (in-process, no Ray; far less noisy than HTTP). The same batch -- 16
   concurrent requests of tenant-0 (W1 demo assets), 32-token prompts, 64 new tokens, greedy --
   on four engines, interleaved per repetition:

   * merged: ``build_merged_engine(EngineConfig(model=base), "tenant-0", path)`` (tenant-0 folded
     into the weights, DeepSpeed ``init_inference`` without kernels on CPU, no LoRA layers);
   * LoRA: ``LoRAEngine`` with tenant-0 loaded, requests on tenant-0;
   * base through the LoRA engine: the same engine, adapter ``None``;
   * bare base: ``LoRAEngine`` with ``lora_target_modules=()`` (no LoRA layers: the merged
     engine's code path on the unmodified weights).

   Per-request latency p50/p99 (submit to last token, all submitted at once) and tokens/s, plus
   one request at a time. Every run's greedy tokens are checked against fp32 PEFT (tenant-0) or
   transformers ``generate`` (base); a row that differs (beyond the documented EOS tie) is
   INVALID. On CPU the merged and bare engines run the same graph (no kernels), so merged p50 /
   bare p50 is reported as "CPU: wrapper overhead" with its spread across reps, not as a speed
   target; the merged path's speed targets are deepspeed_cuda_bench's (CUDA).

B. **Skewed workload over HTTP**. Ray (2 CPUs) + Serve on 127.0.0.1 with three apps on the
   same demo assets (100 rank-8 adapters): the merged path (``merged: true``, policy
   ``hot_tenants: [tenant-0]``, ``dynamic: false``), and the LoRA path only (``merged: false``)
   with torch_threads 1 and with 2 (the merged app runs two engines of one thread each, so the
   2-thread LoRA app is the equal-compute baseline). 128 requests, half tenant-0 and half
   Zipf(1.1) over tenant-1..tenant-99, at most 32 in flight, 32 new tokens each. Reported per
   app: tokens/s, p50/p99 overall and for tenant-0 and the others, the share of replies with
   ``x-served-by: merged``, adapter loads (LRU misses) during the timed runs. Every reply's
   text must equal an in-process ``LoRAEngine``'s output for the same tenant and prompt (merged
   replies included: greedy output equals the LoRA path's); otherwise the app's row is INVALID.

    python -m benchmarks.merged_bench            # full, a few minutes on 2 cores
    python -m benchmarks.merged_bench --quick    # smoke run
    python -m benchmarks.merged_bench --json out.json
"""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "disabled"  # before any ray import

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import threading
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
from benchmarks.http_bench import (
    bad_replies,
    check_texts,
    client,
    fmt_ms,
    percentile,
    run_requests,
    start_ray,
    start_serve,
    stop_ray,
    wait_http,
)
from benchmarks.verify import INVALID, Agreement, TextAgreement, compare_tokens, gate

HOT = "tenant-0"


@dataclass(frozen=True)
class Shape:
    # part A (engine)
    batch: int
    prompt_len: int
    new_tokens: int
    singles: int  # requests timed one at a time per rep
    engine_reps: int
    # part B (HTTP)
    num_adapters: int
    http_requests: int
    concurrency: int
    http_new_tokens: int
    http_reps: int
    lru: int


FULL = Shape(batch=16, prompt_len=32, new_tokens=64, singles=4, engine_reps=5,
             num_adapters=100, http_requests=128, concurrency=32, http_new_tokens=32, http_reps=3, lru=32)
QUICK = Shape(batch=8, prompt_len=32, new_tokens=16, singles=2, engine_reps=1,  # a smoke run (CI)
              num_adapters=16, http_requests=16, concurrency=8, http_new_tokens=16, http_reps=1, lru=8)


# ---- part A: engines in-process ---------------------------------------------------------------


def timed_batch(engine, prompts: list[list[int]], adapter, sp) -> tuple[float, list[float], list[list[int]]]:
    """Submit all prompts at once; (wall s, per-request latency s, tokens per request)."""
    n = len(prompts)
    done = threading.Semaphore(0)
    finish: list[float | None] = [None] * n
    toks: list[list[int]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def sink_for(i):
        def sink(out):
            toks[i].extend(out.token_ids)
            if out.finished or out.error is not None:
                finish[i] = time.perf_counter()
                if out.error is not None:
                    errors.append(out.error)
                done.release()
        return sink

    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(p, sp, adapter, sink_for(i))
    for _ in range(n):
        done.acquire()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    bad = [len(t) for t in toks if len(t) != sp.max_tokens]
    if bad:
        raise RuntimeError(f"engine returned {bad[0]} tokens for a request, expected {sp.max_tokens}")
    return wall, [f - t0 for f in finish], toks


@dataclass
class EngineRow:
    key: str
    label: str
    engine: object
    adapter: str | None
    walls: list[float] = field(default_factory=list)
    lat: list[float] = field(default_factory=list)  # batch: every request of every timed rep
    single_lat: list[float] = field(default_factory=list)
    tokens: int = 0
    others: list[float] = field(default_factory=list)
    runs: list[list[list[int]]] = field(default_factory=list)  # tokens of every run, warm-up included
    rep_p50: list[float] = field(default_factory=list)  # batch p50 latency of each timed rep

    @property
    def tps(self) -> float | None:
        return self.tokens / statistics.median(self.walls) if self.walls else None


def part_a(shape: Shape, meter: CpuMeter, t_start: float) -> dict:
    from serve_app.config import EngineConfig
    from serve_app.demo import build_demo_assets
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.merge import build_merged_engine
    from serve_app.engine.sampling import SamplingParams

    assets = build_demo_assets()  # W1: tenant-0 is rank 8 on q/k/v/o_proj
    base = str(assets.base)
    path = str(assets.adapter_path(HOT))
    cfg = EngineConfig(model=base, torch_threads=2, max_num_seqs=max(64, shape.batch))
    print(f"part A: engines in-process on {assets.root.name} (torch_threads 2): {shape.batch} concurrent requests "
          f"of {HOT}, {shape.prompt_len}-token prompts, {shape.new_tokens} new tokens, greedy; then "
          f"{shape.singles} requests one at a time; {shape.engine_reps} reps after a warm-up, interleaved")
    t0 = time.perf_counter()
    merged = build_merged_engine(cfg, HOT, path)
    t_merge = time.perf_counter() - t0
    lora = LoRAEngine(cfg)
    lora.load_adapter(HOT, path)
    bare = LoRAEngine(cfg.model_copy(update={"lora_target_modules": ()}))
    engines = [merged, lora, bare]
    eos_ids = lora.eos_ids
    try:
        rows = [
            EngineRow("merged", f"merged ({HOT} folded in)", merged, None),
            EngineRow("lora", f"LoRA path ({HOT})", lora, HOT),
            EngineRow("base_lora_engine", "base via the LoRA engine (no adapter)", lora, None),
            EngineRow("bare_base", "bare base (no LoRA layers)", bare, None),
        ]
        prompts = make_prompts(shape.batch, shape.prompt_len, lora.vocab_size, SEED + 3)
        sp = SamplingParams(max_tokens=shape.new_tokens, temperature=0.0, ignore_eos=True)
        for rep in range(shape.engine_reps + 1):
            order = rows if rep % 2 == 0 else rows[::-1]  # alternate the order, too
            for row in order:
                gc.collect()
                s0 = meter.snap()
                wall, lat, toks = timed_batch(row.engine, prompts, row.adapter, sp)
                share = meter.others_share(s0, meter.snap())
                singles = [timed_batch(row.engine, [prompts[i % len(prompts)]], row.adapter, sp)[0]
                           for i in range(shape.singles)]
                row.runs.append(toks)
                if rep == 0:
                    continue
                row.walls.append(wall)
                row.rep_p50.append(percentile(lat, 50))
                row.lat.extend(lat)
                row.single_lat.extend(singles)
                row.tokens = sum(len(t) for t in toks)
                if share is not None:
                    row.others.append(share)
            print(f"  engines {'warm-up' if rep == 0 else f'rep {rep}/{shape.engine_reps}'} done "
                  f"({time.perf_counter() - t_start:.0f}s, loadavg {loadavg()})", flush=True)
    finally:
        for e in engines:
            e.shutdown()
        del engines, merged, lora, bare
        gc.collect()

    # Independent references, untimed: fp32 PEFT for tenant-0, transformers generate for the base.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    pad_id = hf.generation_config.pad_token_id
    ids_t = torch.tensor(prompts, dtype=torch.long)
    kw = dict(attention_mask=torch.ones_like(ids_t), max_new_tokens=shape.new_tokens,
              min_new_tokens=shape.new_tokens, do_sample=False, pad_token_id=3 if pad_id is None else pad_id)
    with torch.inference_mode():
        ref_base = hf.generate(input_ids=ids_t, **kw)[:, shape.prompt_len:].tolist()
        ref_hot = PeftModel.from_pretrained(hf, path).eval().generate(input_ids=ids_t, **kw)[:, shape.prompt_len:].tolist()
    del hf
    refs = {"merged": ref_hot, "lora": ref_hot, "base_lora_engine": ref_base, "bare_base": ref_base}
    eos = frozenset(eos_ids)

    def check(r: EngineRow) -> Agreement:
        runs = [compare_tokens(run, refs[r.key], eos_ids=eos) for run in r.runs] or [compare_tokens(None, None)]
        return min(runs, key=lambda ag: (ag.ok, -len(ag.bad), ag.identical))

    by = {r.key: r for r in rows}
    checked = {r.key: check(r) for r in rows}
    print()
    print(f"A. Engine level: {shape.batch} concurrent requests x {shape.new_tokens} tokens (latency = submit to last "
          f"token, over {shape.engine_reps} reps x {shape.batch} requests; tok/s = median rep); one at a time: "
          f"{shape.singles} x {shape.engine_reps} requests")
    print(f"  {'row':<40} {'tok/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'p50 vs bare':>12} {'1-at-a-time p50 ms':>19} "
          f"{'others':>7}")
    ref = by["bare_base"]
    out = {}
    for r in rows:
        p50, p99 = percentile(r.lat, 50), percentile(r.lat, 99)
        s50 = percentile(r.single_lat, 50)
        others = f"{max(r.others):.0%}" if r.others else "-"
        print(f"  {r.label:<40} {fmt_tps(r.tps):>7} {fmt_ms(p50):>8} {fmt_ms(p99):>8} "
              f"{fmt_ratio(ratio(p50, percentile(ref.lat, 50)), 3):>12} {fmt_ms(s50):>19} {others:>7}")
        out[r.key] = {"label": r.label, "tokens_per_s": r.tps, "p50_s": p50, "p99_s": p99,
                      "single_p50_s": s50, "single_p99_s": percentile(r.single_lat, 99),
                      "walls_s": r.walls, "latencies_s": r.lat, "single_latencies_s": r.single_lat,
                      "others_cpu_share": r.others}
    worst = max((x for r in rows for x in r.others), default=None)
    if worst is not None and worst > 0.10:
        print(f"  WARNING: other processes took up to {worst:.0%} of the CPUs during timed runs; re-run on an idle "
              "machine.")
    print(f"  tokens checked, every run (tolerated: a first divergence at EOS, which generate suppresses); "
          f"merged engine built in {t_merge:.1f}s:")
    for r in rows:
        ref_name = f"fp32 PEFT {HOT}" if refs[r.key] is ref_hot else "transformers generate (base)"
        print(f"    {r.label + ' vs ' + ref_name + ':':<72} {checked[r.key].summary()}")
    same = sum(a == b for a, b in zip(by["merged"].runs[0], by["lora"].runs[0]))
    m50, b50 = out["merged"]["p50_s"], out["bare_base"]["p50_s"]
    ratios = {
        "merged_p50_vs_bare_base_p50": ratio(m50, b50),
        "merged_p50_vs_base_lora_engine_p50": ratio(m50, out["base_lora_engine"]["p50_s"]),
        "merged_p50_vs_lora_p50": ratio(m50, out["lora"]["p50_s"]),
        "merged_p99_vs_lora_p99": ratio(out["merged"]["p99_s"], out["lora"]["p99_s"]),
        "merged_tps_vs_lora_tps": ratio(out["merged"]["tokens_per_s"], out["lora"]["tokens_per_s"]),
        "merged_tps_vs_bare_base_tps": ratio(out["merged"]["tokens_per_s"], out["bare_base"]["tokens_per_s"]),
        "lora_p50_vs_bare_base_p50": ratio(out["lora"]["p50_s"], b50),
    }
    print("  ratios: " + "; ".join(f"{k} {fmt_ratio(v, 3)}" for k, v in ratios.items()))
    per_rep = [m / b for m, b in zip(by["merged"].rep_p50, by["bare_base"].rep_p50) if m and b]
    valid = checked["merged"].ok and checked["bare_base"].ok
    overhead = {"value": ratios["merged_p50_vs_bare_base_p50"], "per_rep": per_rep,
                "spread": [min(per_rep), max(per_rep)] if per_rep else None,
                "verdict": gate("info", valid)}
    return {"rows": out, "ratios": ratios, "sanity_identical_rows_merged_vs_lora": same, "merge_build_s": t_merge,
            "checks": {k: ag.to_json() for k, ag in checked.items()}, "wrapper_overhead": overhead,
            "assets": str(assets.root)}


# ---- part B: skewed workload over HTTP --------------------------------------------------------


def skewed_workload(shape: Shape, ids: list[str], seed: int) -> list[str]:
    """Half the requests HOT, the rest Zipf(1.1) over the other tenants, shuffled (fixed seed)."""
    n = shape.http_requests
    n_hot = n // 2
    others = zipf_assignment(n - n_hot, [a for a in ids if a != HOT], ZIPF_S, seed)
    models = [HOT] * n_hot + others
    random.Random(seed + 1).shuffle(models)
    return models


@dataclass
class AppRow:
    key: str
    label: str
    prefix: str
    walls: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    lat_all: list[float] = field(default_factory=list)
    lat_hot: list[float] = field(default_factory=list)
    lat_others: list[float] = field(default_factory=list)
    merged_all: int = 0
    merged_hot: int = 0
    n_all: int = 0
    n_hot: int = 0
    loads: list[int] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    texts: TextAgreement = field(default_factory=TextAgreement)

    @property
    def tps(self) -> float | None:
        if not self.walls:
            return None
        return statistics.median(t / w for t, w in zip(self.tokens, self.walls))


def reference_texts(assets, models: list[str], prompts: list[list[int]], new_tokens: int) -> list[str]:
    """Each request's text from a LoRAEngine in this process (before Ray starts): the reference
    every HTTP reply must equal, whichever path served it."""
    from serve_app.config import EngineConfig
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    engine = LoRAEngine(EngineConfig(model=str(assets.base), torch_threads=2, max_num_seqs=64))
    try:
        for m in sorted(set(models)):
            engine.load_adapter(m, str(assets.adapter_path(m)))
        sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        texts = [c.text for c in engine.generate_batch([(p, sp, m) for m, p in zip(models, prompts)])]
    finally:
        engine.shutdown()
    print(f"  reference texts: {len(texts)} requests through an in-process LoRAEngine in "
          f"{time.perf_counter() - t0:.1f}s")
    return texts


def part_b(shape: Shape, t_start: float) -> dict:
    from ray import serve

    from serve_app.app import build_app
    from serve_app.demo import MARKER, build_demo_assets

    # Rank 8 for every tenant (W2's adapters), so tenant-0 is the same rank-8 adapter as in W1.
    t0 = time.perf_counter()
    assets = build_demo_assets(num_adapters=shape.num_adapters, ranks=[8])
    t_build = time.perf_counter() - t0
    hit = t_build < 1.0  # a cache hit only checks for the folder's MARKER file
    assert (assets.root / MARKER).exists()
    print()
    print(f"part B: {shape.num_adapters} rank-8 demo adapters at {assets.root.name} "
          f"({'cache hit' if hit else f'built in {t_build:.1f}s'})")
    ids = list(assets.adapter_ids)
    models = skewed_workload(shape, ids, SEED + 11)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(assets.base)).vocab_size
    prompts = make_prompts(len(models), 32, vocab, SEED + 12)
    n_hot = sum(m == HOT for m in models)
    print(f"  workload: {len(models)} requests ({n_hot} {HOT}, {len(models) - n_hot} Zipf({ZIPF_S}) over "
          f"{len(set(models) - {HOT})} distinct of tenant-1..{len(ids) - 1}), 32-token prompts, "
          f"{shape.http_new_tokens} new tokens, greedy, ignore_eos, at most {shape.concurrency} in flight; "
          f"LRU {shape.lru} adapters per LoRA replica")

    want = reference_texts(assets, models, prompts, shape.http_new_tokens)

    common = {"base_model": str(assets.base), "adapters": str(assets.adapters_dir),
              "max_adapters_per_replica": shape.lru, "router_num_cpus": 0.1}
    apps = {
        "merged": (f"merged path ({HOT} hot), 1 thread each", "/merged", {
            **common, "merged": True, "policy": {"hot_tenants": [HOT], "dynamic": False},
            "merged_tenants_per_replica": 1, "lora_num_cpus": 0.5, "merged_num_cpus": 0.5, "torch_threads": 1}),
        "lora": ("LoRA path only, 1 thread", "/lora", {**common, "lora_num_cpus": 0.3, "torch_threads": 1}),
        "lora2t": ("LoRA path only, 2 threads", "/lora2t", {**common, "lora_num_cpus": 0.4, "torch_threads": 2}),
    }
    rows = {k: AppRow(k, label, prefix) for k, (label, prefix, _) in apps.items()}
    print("  apps (one Ray instance, num_cpus=2; CPU reservations sum to 2.0):")
    for k, (label, prefix, args) in apps.items():
        shown = {a: v for a, v in args.items() if a not in ("base_model", "adapters")}
        print(f"    {prefix:<8} {label}: {shown}")

    t_ray = time.perf_counter()
    merged_state: dict = {}
    start_ray(2)
    try:
        _, url = start_serve()
        for k, (label, prefix, args) in apps.items():
            serve.run(build_app(args), name=f"bench-{k}", route_prefix=prefix)
        for row in rows.values():
            wait_http(url + row.prefix + "/health")
        print(f"  apps up in {time.perf_counter() - t_ray:.0f}s")
        stats_handles = {k: serve.get_deployment_handle("LoRADeployment", app_name=f"bench-{k}") for k in apps}

        async def http_phase():
            nonlocal merged_state
            async with client() as c:
                # The promoter starts with the router's first request; the hot tenant's merged copy
                # is then built in the background while LoRA serves it. Wait until it is ready.
                murl = url + rows["merged"].prefix
                t_wait = time.perf_counter()
                r0 = await run_requests(c, murl, [(HOT, prompts[0])], shape.http_new_tokens)
                state = None
                while time.perf_counter() - t_wait < 180:
                    state = (await c.get(murl + "/admin/merged")).json()
                    st = state.get("tenants", {}).get(HOT, {}).get("state")
                    if st in ("ready", "failed"):
                        break
                    await asyncio.sleep(0.25)
                merged_state = state or {}
                st = merged_state.get("tenants", {}).get(HOT, {})
                print(f"  {HOT} on the merged path: state {st.get('state')!r} after "
                      f"{time.perf_counter() - t_wait:.1f}s" + (f" ({st.get('reason')})" if st.get("reason") else "")
                      + f"; first request status {r0[1][0].status}")
                await asyncio.sleep(1.0)  # one more policy sync for the router
                reqs = list(zip(models, prompts))
                for rep in range(shape.http_reps + 1):
                    keys = list(rows)
                    keys = keys[rep % len(keys):] + keys[: rep % len(keys)]  # rotate the order per rep
                    for k in keys:
                        row = rows[k]
                        before = await stats_handles[k].stats.remote()
                        wall, replies = await run_requests(c, url + row.prefix, reqs, shape.http_new_tokens,
                                                           concurrency=shape.concurrency)
                        after = await stats_handles[k].stats.remote()
                        bad = bad_replies(replies, shape.http_new_tokens)
                        check_texts(row.texts, f"{'warm-up' if rep == 0 else f'rep {rep}'} {k}", replies, want)
                        if rep == 0:
                            row.bad.extend(f"warm-up {b}" for b in bad)
                            continue
                        row.bad.extend(bad)
                        row.walls.append(wall)
                        row.tokens.append(sum(r.completion_tokens for r in replies))
                        row.loads.append(after["adapter_loads"] - before["adapter_loads"])
                        for r in replies:
                            if r.status != 200:
                                continue
                            row.lat_all.append(r.latency)
                            (row.lat_hot if r.model == HOT else row.lat_others).append(r.latency)
                            row.n_all += 1
                            row.n_hot += r.model == HOT
                            if r.served_by == "merged":
                                row.merged_all += 1
                                row.merged_hot += r.model == HOT
                    print(f"  http {'warm-up' if rep == 0 else f'rep {rep}/{shape.http_reps}'} done "
                          f"({time.perf_counter() - t_start:.0f}s, loadavg {loadavg()})", flush=True)
                merged_state = (await c.get(murl + "/admin/merged")).json()

        asyncio.run(http_phase())
    finally:
        stop_ray()

    print()
    print(f"B. Skewed workload over HTTP: {len(models)} requests x {shape.http_new_tokens} tokens, "
          f"{shape.concurrency} in flight; tok/s median of {shape.http_reps} reps after a warm-up, latencies over "
          "all timed reps")
    print(f"  {'app':<36} {'tok/s':>7} {'p50 ms':>7} {'p99 ms':>7} {HOT + ' p50':>12} {HOT + ' p99':>12} "
          f"{'others p50':>10} {'others p99':>10} {'merged share all/' + HOT:>24} {'loads/rep':>9}")
    out = {}
    for k, r in rows.items():
        share_all = r.merged_all / r.n_all if r.n_all else None
        share_hot = r.merged_hot / r.n_hot if r.n_hot else None
        sh = "-" if share_all is None else f"{share_all:.0%} / {share_hot:.0%}"
        loads = "-" if not r.loads else f"{statistics.median(r.loads):g}"
        note = f"  {len(r.bad)} BAD replies" if r.bad else ""
        if not r.texts.ok:
            note += "  INVALID (texts differ)"
        print(f"  {r.label:<36} {fmt_tps(r.tps):>7} {fmt_ms(percentile(r.lat_all, 50)):>7} "
              f"{fmt_ms(percentile(r.lat_all, 99)):>7} {fmt_ms(percentile(r.lat_hot, 50)):>12} "
              f"{fmt_ms(percentile(r.lat_hot, 99)):>12} {fmt_ms(percentile(r.lat_others, 50)):>10} "
              f"{fmt_ms(percentile(r.lat_others, 99)):>10} {sh:>24} {loads:>9}{note}")
        out[k] = {
            "label": r.label, "args": {a: v for a, v in apps[k][2].items() if a not in ("base_model", "adapters")},
            "tokens_per_s": r.tps, "walls_s": r.walls, "tokens": r.tokens,
            "p50_s": percentile(r.lat_all, 50), "p99_s": percentile(r.lat_all, 99),
            "hot_p50_s": percentile(r.lat_hot, 50), "hot_p99_s": percentile(r.lat_hot, 99),
            "others_p50_s": percentile(r.lat_others, 50), "others_p99_s": percentile(r.lat_others, 99),
            "merged_share_all": share_all, "merged_share_hot": share_hot, "adapter_loads_per_rep": r.loads,
            "bad": r.bad[:20], "n_bad": len(r.bad), "texts": r.texts.to_json(),
            "verdict": gate("info", r.texts.ok, not r.bad),
        }
    n_bad = sum(len(r.bad) for r in rows.values())
    print(f"  replies checked: every one 200 with {shape.http_new_tokens} completion tokens: "
          + ("yes" if n_bad == 0 else f"NO, {n_bad} bad, e.g. {next(b for r in rows.values() for b in r.bad)}"))
    for k, r in rows.items():
        print(f"  text check, {r.label}: {r.texts.summary()}")
    texts_ok = all(r.texts.ok for r in rows.values())
    m, lo, l2 = out["merged"], out["lora"], out["lora2t"]
    ratios = {
        "merged_vs_lora_tps": ratio(m["tokens_per_s"], lo["tokens_per_s"]),
        "merged_vs_lora2t_tps": ratio(m["tokens_per_s"], l2["tokens_per_s"]),
        "merged_vs_lora_hot_p50": ratio(m["hot_p50_s"], lo["hot_p50_s"]),
        "merged_vs_lora_hot_p99": ratio(m["hot_p99_s"], lo["hot_p99_s"]),
        "merged_vs_lora2t_hot_p50": ratio(m["hot_p50_s"], l2["hot_p50_s"]),
        "merged_vs_lora_p50": ratio(m["p50_s"], lo["p50_s"]),
        "merged_vs_lora_p99": ratio(m["p99_s"], lo["p99_s"]),
    }
    print("  ratios (merged app / LoRA-only app): " + "; ".join(f"{k} {fmt_ratio(v, 3)}" for k, v in ratios.items()))
    counters = merged_state.get("counters")
    if counters is not None:
        print(f"  /admin/merged at the end: {HOT} {merged_state.get('tenants', {}).get(HOT, {}).get('state')!r}, "
              f"counters {counters}")
    return {"rows": out, "ratios": ratios, "texts_ok": texts_ok, "assets": str(assets.root), "assets_build_s": t_build,
            "assets_cache_hit": hit, "workload_models": models, "merged_state": merged_state}


def run(shape: Shape, json_out: str | None, part: str = "all") -> dict:
    quiet_libraries()
    t_start = time.perf_counter()
    env = environment()
    print("== merged_bench: the merged hot-tenant path" + (" (--quick: shrunk, smoke run only)" if shape != FULL else ""))
    print(f"env: python {env['python']}, torch {env['torch']}, cpu_count {env['cpu_count']}, "
          f"affinity {env['cpu_affinity']}, loadavg {env['loadavg_start']}")
    meter = CpuMeter()
    a = part_a(shape, meter, t_start) if part in ("a", "all") else None
    b = part_b(shape, t_start) if part in ("b", "all") else None

    print()
    if a is not None:
        o = a["wrapper_overhead"]
        spread = "-" if not o["spread"] else f"{o['spread'][0]:.3f}..{o['spread'][1]:.3f}x"
        print(f"CPU: wrapper overhead (no kernels on CPU: the merged and bare engines run the same graph), merged p50 / "
              f"bare base p50, batch of {shape.batch}: {fmt_ratio(o['value'], 3)} (per rep {spread}; vs base "
              f"through the LoRA engine {fmt_ratio(a['ratios']['merged_p50_vs_base_lora_engine_p50'], 3)}) "
              + ("INVALID (outputs differ, see the token checks)" if o["verdict"] == INVALID else
                 "-- no speed target here: the merged path's speed targets are deepspeed_cuda_bench's (CUDA)"))
    if b is not None:
        print("HTTP replies (part B): " + ("every text equals the engine's" if b["texts_ok"] else
                                           "INVALID: some texts differ from the engine's (see above)"))
    if shape != FULL:
        print("(--quick: shrunk workload, few repetitions; figures are a smoke test, not results)")
    elapsed = time.perf_counter() - t_start
    env["loadavg_end"] = loadavg()
    print(f"\ntotal {elapsed:.0f}s; loadavg at start {env['loadavg_start']}, at end {env['loadavg_end']}")
    result = {
        "benchmark": "merged" if shape == FULL else "merged-quick",
        "shape": asdict(shape),
        "seed": SEED,
        "env": env,
        "engine": a,
        "http_skewed": b,
        "wrapper_overhead": None if a is None else a["wrapper_overhead"],
        "elapsed_s": elapsed,
    }
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {json_out}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.merged_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shrunk smoke run")
    parser.add_argument("--part", choices=["a", "b", "all"], default="all", help="run only part A or B (default all)")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    run(QUICK if args.quick else FULL, args.json, args.part)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
