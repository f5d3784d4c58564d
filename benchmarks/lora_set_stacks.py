"""Time spent stacking adapter sets (LoRA set gathers) in a W1 bmm run at 64 distinct, rank 16 q,k,v,o (issue 16).

    python -m benchmarks.lora_set_stacks [--quick]   # --quick: smoke run (CI), 1 rep of 4 new tokens
"""
import sys, time, torch
from benchmarks.engine_bench import make_prompts, quiet_libraries
from serve_app.config import EngineConfig
from serve_app.demo import build_demo_assets
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.sampling import SamplingParams
from serve_app.engine.lora import manager as lm
quiet_libraries()
acc = {"t": 0.0, "n": 0, "bytes": 0}
cls = lm.LoRAManager
orig = cls._gather_stacked
def timed(self, distinct):
    t = time.perf_counter(); out = orig(self, distinct); acc["t"] += time.perf_counter() - t; acc["n"] += 1
    acc["bytes"] += sum(st.a.numel() * st.a.element_size() + sum(b.numel() * b.element_size() for _, _, b in st.spans.values()) for st in out[0].values())
    return out
cls._gather_stacked = timed
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
assets = build_demo_assets(num_adapters=64, ranks=[16], target_modules=[ATTN])
eng = LoRAEngine(EngineConfig(model=str(assets.base), max_num_seqs=64, max_lora_rank=64))
for a in assets.adapter_ids: eng.load_adapter(a, str(assets.adapter_path(a)))
prompts = make_prompts(64, 32, eng.vocab_size, 1234)
QUICK = "--quick" in sys.argv[1:]
sp = SamplingParams(max_tokens=4 if QUICK else 64, temperature=0.0, ignore_eos=True)
eng.lora.path = "bmm"
for rep in range(1 if QUICK else 3):
    eng.run_in_engine(eng.lora.clear_set_caches)
    acc.update(t=0.0, n=0, bytes=0); eng.lora.path_steps.clear()
    t0 = time.perf_counter()
    eng.generate_batch([(p, sp, assets.adapter_ids[i]) for i, p in enumerate(prompts)])
    dt = time.perf_counter() - t0
    print(f"rep {rep}: run {dt*1e3:.0f} ms, {acc['n']} set stacks, {acc['t']*1e3:.1f} ms in them, {acc['bytes']/1e6:.0f} MB stacked; steps {dict(eng.lora.path_steps)}")
eng.shutdown()
