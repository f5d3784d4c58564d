"""Where a many-adapter LoRA run spends its time beyond the base model's (issue 16).

W3 (SmolLM2-135M) or W1, the lora_mix_bench batch (64 prompts x 32 tokens, ``--new`` tokens,
greedy, all in flight), run once with no adapter and once with 64 distinct rank-16 q/k/v/o
adapters on a forced path. Each run's steps are timed by kind (prefill: the step carries a
prompt; decode: one token per row), the process's minor page faults are counted (a fresh
allocation's first touch costs several microseconds per 4 KB page in this VM), and the torch profiler on the engine thread groups ops by
name and input shapes; the table lists the ops whose self time grew most over the base run.

    python -m benchmarks.lora_profile                       # W3, bmm, 32 new tokens
    python -m benchmarks.lora_profile --workload w1 --path auto --new 64
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.engine_bench import make_prompts, quiet_libraries
from benchmarks.lora_mix_bench import ATTN, w3_adapters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=["w1", "w3"], default="w3")
    ap.add_argument("--path", default="bmm")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--distinct", type=int, default=64)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--lora-first", action="store_true", help="profile the LoRA run before the base run")
    args = ap.parse_args()
    quiet_libraries()
    torch.set_num_threads(2)
    from serve_app.config import EngineConfig
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.sampling import SamplingParams

    n = 64
    if args.workload == "w3":
        base_dir, folders = w3_adapters(16, "attn")
        ids = [f"t{i}" for i in range(n)]
        where = {a: str(folders[i % len(folders)]) for i, a in enumerate(ids)}
    else:
        from serve_app.demo import build_demo_assets

        assets = build_demo_assets(num_adapters=n, ranks=[16], target_modules=[ATTN])
        base_dir, ids = assets.base, assets.adapter_ids
        where = {a: str(assets.adapter_path(a)) for a in ids}
    eng = LoRAEngine(EngineConfig(model=str(base_dir), max_num_seqs=n, max_lora_rank=64))
    steps: dict[str, list[float]] = {}
    orig = eng._forward

    def timed(sched, num_decode):
        t = time.perf_counter()
        orig(sched, num_decode)
        steps.setdefault("decode" if num_decode == len(sched) else "prefill", []).append(time.perf_counter() - t)

    eng._forward = timed
    plans: list[tuple[int, int]] = []
    orig_plan = eng.runner.attn.decode_plan

    def plan(rows):
        out = orig_plan(rows)
        plans.append((out[0], len({b for r in rows for b in r.blocks[: r.start // eng.runner.block_size + 1]})))
        return out

    eng.runner.attn.decode_plan = plan
    try:
        for a in ids:
            eng.load_adapter(a, where[a])
        prompts = make_prompts(n, 32, eng.vocab_size, 1234)
        sp = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
        mixes = {"base": [None] * n, "lora": [ids[i % args.distinct] for i in range(n)]}
        if args.lora_first:
            mixes = {"lora": mixes["lora"], "base": mixes["base"]}
        eng.lora.path = args.path
        for mix in mixes.values():  # warm-up (the stacks are built here, not in the profile)
            eng.generate_batch([(p, sp, a) for p, a in zip(prompts, mix)])
        tables, walls, kinds, paths, blocks, faults = {}, {}, {}, {}, {}, {}
        for name, mix in mixes.items():
            gc.collect()
            steps.clear()
            eng.runner.decode_paths.update(dict.fromkeys(eng.runner.decode_paths, 0))
            plans.clear()
            p = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            eng.run_in_engine(p.__enter__)
            f0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            eng.generate_batch([(q, sp, a) for q, a in zip(prompts, mix)])
            walls[name] = time.perf_counter() - t0
            f1 = resource.getrusage(resource.RUSAGE_SELF)
            faults[name] = f1.ru_minflt - f0.ru_minflt
            eng.run_in_engine(p.__exit__, None, None, None)
            paths[name] = dict(eng.runner.decode_paths)
            blocks[name] = (sum(m for m, _ in plans) / max(1, len(plans)), sum(d for _, d in plans) / max(1, len(plans)))
            kinds[name] = {k: (len(v), sum(v)) for k, v in steps.items()}
            tables[name] = {(e.key, str(e.input_shapes)): (e.count, e.self_cpu_time_total / 1e6)
                            for e in p.key_averages(group_by_input_shape=True)}
    finally:
        eng.shutdown()
    print(f"== lora_profile: {args.workload}, 64 x 32-token prompts, {args.new} new, {args.distinct} distinct, "
          f"path {args.path} (profiled, so slower than the benchmarks)")
    for name in mixes:
        ks = "  ".join(f"{k}: {c} steps {s:.2f} s ({s / c * 1e3:.1f} ms/step)" for k, (c, s) in sorted(kinds[name].items()))
        print(f"   {name:>4}: {walls[name]:.2f} s   {ks}   page faults {faults[name]:,}")
        print(f"         decode attention: {paths[name]}, score rows per step {blocks[name][0]:.0f} for {blocks[name][1]:.0f} blocks read")
    keys = set(tables["base"]) | set(tables["lora"])
    diff = sorted(keys, key=lambda k: tables["lora"].get(k, (0, 0))[1] - tables["base"].get(k, (0, 0))[1], reverse=True)
    extra = walls["lora"] - walls["base"]
    print(f"\n   ops by self time added over the base run (lora - base = {extra:.2f} s wall)")
    print(f"   {'lora s':>7} {'base s':>7} {'+s':>6} {'calls':>6}  op  shapes")
    for k in diff[: args.top] + diff[-8:]:
        lc, ls = tables["lora"].get(k, (0, 0.0))
        bc, bs = tables["base"].get(k, (0, 0.0))
        print(f"   {ls:7.3f} {bs:7.3f} {ls - bs:+6.3f} {lc:6d}  {k[0]}  {k[1][:110]}")


if __name__ == "__main__":
    main()
