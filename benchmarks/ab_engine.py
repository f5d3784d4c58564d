"""A/B: our engine on W1 (or W3) from two source trees, side by side in one run.

Speed differs ~1.5x between machines of this kind and drifts within a run, so a change is
judged against the code before it on the same machine, interleaved: each side is a worker
process importing ``serve_app`` from its own tree (a git worktree of the older commit, say),
and the coordinator asks them for one timed repetition in turn (A base, B base, A rr, B rr, ...).
Greedy tokens of B must equal A's on every row (or the row prints DIFF).

    git worktree add --detach /tmp/before <commit>
    python -m benchmarks.ab_engine --a /tmp/before --b . [--b-config '{"enable_prefix_caching": false}']

``--a-config`` / ``--b-config``: EngineConfig fields for one side only (JSON), e.g. settings the
older tree does not have. Prints tok/s per mix and side (median of ``--reps``) and B / A.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time, random
import torch
from serve_app.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.sampling import SamplingParams
args = json.loads(sys.argv[1])
if args["workload"] == "w3":
    from serve_app.models.tenants import build_smollm2_random_adapters
    assets = build_smollm2_random_adapters()
else:
    from serve_app.demo import build_demo_assets
    assets = build_demo_assets()
ids = list(assets.adapter_ids)
n, plen, new = args["n"], args["prompt_len"], args["new"]
engine = LoRAEngine(EngineConfig(model=str(assets.base), max_num_seqs=max(64, n), **args["config"]))
for a in ids:
    engine.load_adapter(a, str(assets.adapter_path(a)))
rng = random.Random(1234)
prompts = [[rng.randrange(4, engine.vocab_size) for _ in range(plen)] for _ in range(n)]
zrng = random.Random(1235)
weights = [1 / (k + 1) ** 1.1 for k in range(len(ids))]
mixes = {"base": [None] * n, "rr": [ids[i % len(ids)] for i in range(n)],
         "zipf": zrng.choices(ids, weights=weights, k=n)}
sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    mix = line.strip()
    if not mix:
        break
    if args["fresh_prompts"]:  # a new prompt set per repetition: no prefix-cache hits across reps
        prompts = [[rng.randrange(4, engine.vocab_size) for _ in range(plen)] for _ in range(n)]
    t0 = time.perf_counter()
    comps = engine.generate_batch([(p, sp, a) for p, a in zip(prompts, mixes[mix])])
    dt = time.perf_counter() - t0
    print(json.dumps({"mix": mix, "tps": sum(len(c.token_ids) for c in comps) / dt,
                      "tokens": [c.token_ids for c in comps]}), flush=True)
engine.shutdown()
"""


class Side:
    def __init__(self, name: str, tree: str, args: dict):
        env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(args)], cwd=tree, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"side {self.name} exited (rc {self.proc.wait()})")
        return json.loads(line)

    def run(self, mix: str) -> dict:
        self.proc.stdin.write(mix + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="source tree of side A (the baseline)")
    ap.add_argument("--b", required=True, help="source tree of side B")
    ap.add_argument("--a-config", default="{}", help="EngineConfig fields for A only (JSON)")
    ap.add_argument("--b-config", default="{}", help="EngineConfig fields for B only (JSON)")
    ap.add_argument("--workload", choices=["w1", "w3"], default="w1")
    ap.add_argument("--mixes", default="base,rr,zipf")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n", type=int, default=64, help="prompts (all in flight)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt (greedy, EOS ignored)")
    ap.add_argument("--fresh-prompts", action="store_true", help="new prompts every repetition")
    a = ap.parse_args(argv)
    common = {"workload": a.workload, "n": a.n, "prompt_len": a.prompt_len, "new": a.new,
              "fresh_prompts": a.fresh_prompts}
    sides = [Side("A", a.a, {**common, "config": json.loads(a.a_config)}),
             Side("B", a.b, {**common, "config": json.loads(a.b_config)})]
    mixes = a.mixes.split(",")
    tps = {(s.name, m): [] for s in sides for m in mixes}
    same = {m: True for m in mixes}
    try:
        for s in sides:  # warm-up: one untimed run of each mix
            for m in mixes:
                s.run(m)
        for _ in range(a.reps):
            for m in mixes:
                outs = [s.run(m) for s in sides]
                for s, o in zip(sides, outs):
                    tps[(s.name, m)].append(o["tps"])
                same[m] &= outs[0]["tokens"] == outs[1]["tokens"]
    finally:
        for s in sides:
            s.close()
    print(f"== ab_engine {a.workload.upper()}: {a.n} prompts x {a.prompt_len} tokens, {a.new} new, "
          f"median of {a.reps} interleaved reps" + (", fresh prompts per rep" if a.fresh_prompts else ""))
    print(f"A = {a.a} {a.a_config}\nB = {a.b} {a.b_config}")
    print(f"{'mix':>6} {'A tok/s':>9} {'B tok/s':>9} {'B / A':>7}  tokens")
    for m in mixes:
        ta, tb = statistics.median(tps[("A", m)]), statistics.median(tps[("B", m)])
        print(f"{m:>6} {ta:>9,.0f} {tb:>9,.0f} {tb / ta:>6.2f}x  {'same' if same[m] else 'DIFF'}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
