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


def bench_config(rank: int, targets: str, n: int, plen: int, new: int, reps: int, distincts: list[int]) -> None:
    from serve_app.config import EngineConfig
    from serve_app.demo import build_demo_assets
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.sampling import SamplingParams

    assets = build_demo_assets(num_adapters=max(distincts), ranks=[rank], target_modules=[ATTN if targets == "attn" else ALL])
    engine = LoRAEngine(EngineConfig(model=str(assets.base), max_num_seqs=max(64, n), max_lora_rank=max(64, rank)))
    try:
        ids = assets.adapter_ids
        for a in ids:
            engine.load_adapter(a, str(assets.adapter_path(a)))
        prompts = make_prompts(n, plen, engine.vocab_size, 1234)
        sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        rows = [("base", 0, "masked")] + [(p, d, p) for d in distincts if d for p in PATHS]
        times: dict[tuple, list[float]] = {}
        tokens: dict[tuple, list] = {}
        chosen: dict[tuple, dict] = {}
        for rep in range(reps + 1):
            for label, d, path in rows:
                mix = [None] * n if d == 0 else [ids[i % d] for i in range(n)]
                engine.lora.path = path
                engine.lora.path_steps.clear()
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
        print(f"   {'distinct':>8} | " + " | ".join(f"{p:>16}" for p in PATHS) + " | auto's steps")
        for d in distincts:
            if d == 0:
                continue
            cells = []
            for p in PATHS:
                tps = total / statistics.median(times[(p, d)])
                ok = tokens[(p, d)] == tokens[("masked", d)]
                cells.append(f"{tps:>6,.0f} {tps / base_tps:4.2f}x{'' if ok else ' INVALID'}")
            steps = ", ".join(f"{k}:{v}" for k, v in sorted(chosen[("auto", d)].items()))
            target = TARGETS.get(d) if (rank, targets) == (16, "attn") else None
            verdict = ""
            if target is not None:
                best = total / statistics.median(times[("auto", d)]) / base_tps
                verdict = f"  target auto >= {target:.2f}x: {'PASS' if best >= target else 'MISS'}"
            print(f"   {d:>8} | " + " | ".join(f"{c:>16}" for c in cells) + f" | {steps}{verdict}")
    finally:
        engine.shutdown()


# ---- calibration of cost.py ---------------------------------------------------------------------


def calibrate() -> None:
    """Time the three CPU paths of one input group on synthetic shapes and least-squares fit
    (OP_S, FLOP_S, BYTE_S) to cost.group_terms' (ops, flops, bytes)."""
    from serve_app.engine.lora_kernels import cost, sgmv_cpu
    from serve_app.engine.lora_kernels.layout import build_layout

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
    ap.add_argument("--only", help="one configuration, RANK:TARGETS (e.g. 16:attn, 64:all)")
    args = ap.parse_args()
    quiet_libraries()
    if args.calibrate:
        calibrate()
        return
    n, plen, new, reps = (16, 32, 16, 1) if args.quick else (64, 32, 64, args.reps)
    distincts = [0, 1, 8, 16] if args.quick else [0, 1, 8, 32, 64]
    print(f"== lora_mix_bench: W1 base, {n} prompts x {plen} tokens, {new} new tokens, greedy, all in flight; "
          f"torch threads {torch.get_num_threads()}")
    print("   cells: tok/s and ratio to base-only on the same engine; paths forced except auto (the cost model)")
    todo = configs(args.quick)
    if args.only:
        r, t = args.only.split(":")
        todo = [(int(r), t)]
    for rank, targets in todo:
        bench_config(rank, targets, n, plen, new, reps, distincts)


if __name__ == "__main__":
    main()
