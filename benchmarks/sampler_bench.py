"""What the per-row sampler features cost: logprobs and logits processors on W1, in one run.

W1 (64 prompts x 32 tokens, 64 new, 8 adapters round-robin, all in flight) through the engine
(``generate_batch``, torch_threads 2), once per variant, interleaved over ``--reps`` rounds after a
warm-up; median tok/s and the ratio to the plain row. Variants: plain greedy; ``logprobs=5`` on
every row; ``repetition_penalty`` + ``frequency_penalty`` + a 16-entry ``logit_bias`` on every
row; both. The issue's target: logprobs=5 on every row costs <= 10% tok/s.

    python -m benchmarks.sampler_bench --reps 3
    python -m benchmarks.sampler_bench --reps 1 --prompts 8 --new-tokens 12   # smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.engine_bench import SEED, make_prompts, quiet_libraries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=64, help="prompts per batch (W1: 64)")
    args = ap.parse_args()
    quiet_libraries()

    from serve_app.api.sampling_params import SamplingParams
    from serve_app.demo import build_demo_assets
    from serve_app.engine.config import EngineConfig
    from serve_app.engine.engine import LoRAEngine

    assets = build_demo_assets()
    ids = list(assets.adapter_ids)
    eng = LoRAEngine(EngineConfig(model=str(assets.base), torch_threads=2, max_num_seqs=64))
    for aid in ids:
        eng.load_adapter(aid, str(assets.adapters_dir / aid))
    prompts = make_prompts(args.prompts, 32, eng.vocab_size, SEED)
    n = args.new_tokens
    base = dict(max_tokens=n, temperature=0.0, ignore_eos=True)
    procs = dict(repetition_penalty=1.1, frequency_penalty=0.2, logit_bias={t: -1.0 for t in range(100, 116)})
    item = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                              "name": {"type": "string", "maxLength": 8},
                                              "kind": {"enum": ["a", "b", "c"]}},
            "required": ["id", "name", "kind"], "additionalProperties": False}
    schema = json.dumps({"type": "array", "items": item, "minItems": 64})
    plain = SamplingParams(**base)
    constrained = SamplingParams(**base, json_schema=schema)
    variants = {  # name -> (row 0's params, rows 1..63's params)
        "plain greedy": (plain, plain),
        "1 json_schema row of 64 (others' tok/s)": (constrained, plain),
        "json_schema on every row": (constrained, constrained),
        "logprobs=5 on every row": (SamplingParams(**base, logprobs=5),) * 2,
        "penalties + logit_bias on every row": (SamplingParams(**base, **procs),) * 2,
        "both": (SamplingParams(**base, **procs, logprobs=5),) * 2,
    }

    def run(params) -> float:
        """tok/s of rows 1..63."""
        first, rest = params
        t = time.perf_counter()
        outs = eng.generate_batch([(p, first if i == 0 else rest, ids[i % len(ids)]) for i, p in enumerate(prompts)])
        dt = time.perf_counter() - t
        assert all(len(o.token_ids) == n for o in outs), [len(o.token_ids) for o in outs]
        for o, sp in zip(outs[:2], params):
            assert not sp.json_schema or o.text.startswith('[{"id": '), o.text  # the mask was applied
        return (len(prompts) - 1) * n / dt

    for params in variants.values():  # warm-up
        run(params)
    tps: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, params in variants.items():
            tps[name].append(run(params))
    eng.shutdown()
    plain_tps = statistics.median(tps["plain greedy"])
    print(f"== sampler_bench: W1 engine, {len(prompts)} x 32 in / {n} out, 8 adapters round-robin; median of "
          f"{args.reps}; tok/s of rows 1..{len(prompts) - 1}")
    for name, xs in tps.items():
        m = statistics.median(xs)
        print(f"  {name:<40} {m:>7,.0f} tok/s  {m / plain_tps:.2f}x")
    lp = statistics.median(tps["logprobs=5 on every row"]) / plain_tps
    print(f"Target: logprobs=5 on every row >= 0.90x plain: {lp:.2f}x {'OK' if lp >= 0.90 else 'MISS'}")
    js = statistics.median(tps["1 json_schema row of 64 (others' tok/s)"]) / plain_tps
    print(f"Target: the other 63 rows beside a json_schema row >= 0.90x plain: {js:.2f}x {'OK' if js >= 0.90 else 'MISS'}")


if __name__ == "__main__":
    main()
