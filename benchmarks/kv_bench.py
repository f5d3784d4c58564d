"""KV memory and the prefix cache, measured on the engine (W1's model and adapters, fp32, CPU).

    python -m benchmarks.kv_bench [--quick]

Three sections, each against a figure from the same run:

1. **Memory per live token** on a mixed-length workload: prompt lengths log-uniform over
   32..2,048 tokens (most short, a few long, as a SaaS's traffic is), 16 new tokens each,
   submitted at once into a pool of 64 x 512 tokens (the KV memory of the dense cache's usual
   size). Sampled every step: tokens the held blocks can hold / tokens with KV in them.
2. **Concurrent sequences at that memory**: the most sequences running at once, against what the
   dense per-slot cache this replaced could run in the same bytes: it reserved every slot for
   the longest sequence (``capacity`` doubled to it), so it held memory / longest slots.
   (Computed, not run: the dense code is gone; ``benchmarks/ab_engine.py`` runs old trees.)
3. **Prefix cache**: 8 tenants (one adapter each), each with its own 512-token system prompt;
   one request per tenant warms the cache, then 64 requests (system prompt + a 32-token
   question, 32 new tokens, 8 per tenant) arrive at once. TTFT p50 and tok/s, with the prefix
   cache and without (a fresh engine each, same requests, same order); outputs must be equal.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import threading
import time

from benchmarks.prefill_stall_bench import w1_assets


def engine(assets, **kw):
    from serve_app.config import EngineConfig
    from serve_app.engine.engine import LoRAEngine

    eng = LoRAEngine(EngineConfig(model=str(assets.base), max_lora_rank=16, torch_threads=2, max_model_len=2048, **kw))
    for a in assets.adapter_ids:
        eng.load_adapter(a, str(assets.adapters_dir / a))
    return eng


def memory_section(assets, n: int) -> None:
    from serve_app.engine.model_runner import ModelRunner
    from serve_app.engine.sampling import SamplingParams

    rng = random.Random(0)
    lens = [int(math.exp(rng.uniform(math.log(32), math.log(2048)))) for _ in range(n)]
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(assets.base)
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    eng = engine(assets, max_num_seqs=256, max_num_batched_tokens=2048, kv_cache_memory_bytes=64 * 512 * per_token)
    try:
        pool = eng.scheduler.kv.pool
        assert per_token == ModelRunner.bytes_per_token(eng.model, eng.dtype)
        mem_tokens = pool.num_blocks * pool.block_size
        ratios, peak = [], 0
        real = eng.runner.step

        def step(rows, nd, lora):
            nonlocal peak
            out = real(rows, nd, lora)
            running = [r for r in eng.scheduler.running if r.blocks]
            live = sum(r.num_computed for r in running) + sum(len(r.tokens) for r in rows)
            held = sum(len(r.blocks) for r in running) * pool.block_size
            if live:
                ratios.append(held / live)
            peak = max(peak, len(running))
            return out

        eng.runner.step = step
        sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        eng.generate_batch([([rng.randrange(4, 8192) for _ in range(ln)], sp, None) for ln in lens])
        dt = time.perf_counter() - t0
        kv = eng.stats()["kv"]
    finally:
        eng.shutdown()
    longest = max(lens) + 16
    dense_slots = mem_tokens // (2 ** math.ceil(math.log2(longest)) if longest > 256 else 256)
    print(f"1-2. {n} prompts, log-uniform 32..2048 tokens (mean {statistics.mean(lens):.0f}, longest {max(lens)}), "
          f"16 new each; pool {pool.num_blocks} blocks x {pool.block_size} = {mem_tokens} tokens "
          f"({mem_tokens * per_token / 2**20:.0f} MiB); {dt:.1f} s, {kv['preemptions']} preemptions")
    print(f"  KV held / live tokens: mean {statistics.mean(ratios):.3f}, max {max(ratios):.3f} "
          f"(target <= 1.15)  {'PASS' if max(ratios) <= 1.15 else 'MISS'}")
    print(f"  concurrent sequences: paged {peak}, dense per-slot cache in the same memory {dense_slots} "
          f"(capacity {mem_tokens // max(dense_slots, 1)} per slot): {peak / max(dense_slots, 1):.1f}x "
          f"(target >= 3x)  {'PASS' if peak >= 3 * dense_slots else 'MISS'}")


def prefix_section(assets, per_tenant: int) -> None:
    from serve_app.engine.sampling import SamplingParams

    rng = random.Random(1)
    ids = assets.adapter_ids
    systems = {a: [rng.randrange(4, 8192) for _ in range(512)] for a in ids}
    questions = [(ids[i % len(ids)], [rng.randrange(4, 8192) for _ in range(32)]) for i in range(per_tenant * len(ids))]
    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    rows = {}
    for cache in (False, True):
        eng = engine(assets, max_num_seqs=64, enable_prefix_caching=cache)
        try:
            warm = [(systems[a] + [rng.randrange(4, 8192) for _ in range(32)], sp, a) for a in ids]
            eng.generate_batch(warm)
            first, done = {}, threading.Semaphore(0)
            tokens = {}

            def sink_for(i, t_sub):
                def sink(out):
                    if i not in first and out.token_ids:
                        first[i] = time.perf_counter() - t_sub
                    tokens.setdefault(i, []).extend(out.token_ids)
                    if out.finished or out.error is not None:
                        done.release()
                return sink

            hits0 = eng.stats()["kv"]["prefix_hit_tokens"]
            t0 = time.perf_counter()
            for i, (a, q) in enumerate(questions):
                eng.add_request(systems[a] + q, sp, a, sink_for(i, time.perf_counter()))
            for _ in questions:
                done.acquire()
            dt = time.perf_counter() - t0
            hit = eng.stats()["kv"]["prefix_hit_tokens"] - hits0
        finally:
            eng.shutdown()
        rows[cache] = (statistics.median(first.values()), sum(map(len, tokens.values())) / dt, hit, tokens)
    same = rows[False][3] == rows[True][3]
    print(f"3. prefix cache: {len(ids)} tenants x 512-token system prompt, {len(questions)} requests "
          f"(+32-token question, 32 new) at once after one warm-up request per tenant")
    print(f"  {'':>10} {'TTFT p50 ms':>12} {'tok/s':>8} {'prefix hit tokens':>18}")
    for cache in (False, True):
        ttft, tps, hit, _ = rows[cache]
        print(f"  {'cache on' if cache else 'cache off':>10} {ttft * 1e3:>12,.0f} {tps:>8,.0f} {hit:>18,}")
    r_ttft, r_tps = rows[False][0] / rows[True][0], rows[True][1] / rows[False][1]
    print(f"  TTFT p50 {r_ttft:.1f}x lower (target >= 3x) {'PASS' if r_ttft >= 3 else 'MISS'}; "
          f"tok/s {r_tps:.2f}x (target >= 1.5x) {'PASS' if r_tps >= 1.5 else 'MISS'}; "
          f"outputs {'equal' if same else 'DIFFER (INVALID)'}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests (smoke run, CI): 12 mixed, 1 per tenant")
    a = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    assets = w1_assets()
    print("== kv_bench: W1 model (fp32, 2 threads), paged KV, block_size 16")
    memory_section(assets, 12 if a.quick else 160)
    prefix_section(assets, 1 if a.quick else 8)


if __name__ == "__main__":
    main()
