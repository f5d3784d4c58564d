"""The engine on a 7B-shaped random Llama (bf16 and NF4), for a machine with a GPU.

    python -m benchmarks.gpu_7b_bench                # Llama-2-7B's shape, CUDA (benchmarks/gpu_check.sh runs it)
    python -m benchmarks.gpu_7b_bench --tiny         # the same script on a small shape, on CPU (a smoke run)

Builds the base once into ``--dir`` (random weights, Llama-2-7B's config: hidden 4096, 32
layers, 32 heads, intermediate 11008, vocab 32000; the W1 demo tokenizer, whose ids all fit) and
``--adapters`` random PEFT adapters of rank ``--rank`` on q/k/v/o. Then, per quantization
(none = bf16, nf4): 64 sequences x 128 prompt tokens x 64 new (greedy, EOS ignored), base only
and adapters round-robin; prints tok/s, the LoRA overhead (mixed / base), the KV pool's size,
and adapters per GiB of device memory (the pool rows one adapter takes).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def build(root: Path, shape: dict, n_adapters: int, rank: int, device: str) -> tuple[Path, list[Path]]:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from serve_app.demo import build_demo_assets

    base = root / "base"
    if not (base / "model.safetensors").exists() and not (base / "model.safetensors.index.json").exists():
        base.mkdir(parents=True, exist_ok=True)
        cfg = LlamaConfig(**shape, torch_dtype="bfloat16", max_position_embeddings=4096, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(base, safe_serialization=True, max_shard_size="4GB")
        del model
        demo = build_demo_assets()
        for f in demo.base.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, base / f.name)
    adapters = []
    h, L = shape["hidden_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    outs = {"q_proj": h, "k_proj": kv, "v_proj": kv, "o_proj": h}
    for i in range(n_adapters):
        d = root / f"tenant-{i}"
        adapters.append(d)
        if (d / "adapter_model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for li in range(L):
            for kind in ATTN:
                pre = f"base_model.model.model.layers.{li}.self_attn.{kind}"
                tensors[f"{pre}.lora_A.weight"] = (torch.randn(rank, h, generator=g) / h**0.5).to(torch.bfloat16)
                tensors[f"{pre}.lora_B.weight"] = (torch.randn(outs[kind], rank, generator=g) * 0.01).to(torch.bfloat16)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(ATTN),
            "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        }))
    return base, adapters


def run(base: Path, adapters: list[Path], quant: str, a) -> dict:
    from serve_app.config import EngineConfig
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.sampling import SamplingParams

    kw = {} if a.tiny else {"dtype": "bfloat16"}
    eng = LoRAEngine(EngineConfig(model=str(base), quantization=quant, max_num_seqs=a.seqs, max_lora_rank=a.rank,
                                  max_num_batched_tokens=max(2048, a.seqs), **kw))
    try:
        names = [f"tenant-{i}" for i in range(len(adapters))]
        resident = [eng.load_adapter(n, str(p)) for n, p in zip(names, adapters)]
        g = torch.Generator().manual_seed(7)
        prompts = torch.randint(4, 8000, (a.seqs, a.prompt), generator=g).tolist()
        sp = SamplingParams(max_tokens=a.new, temperature=0.0, ignore_eos=True)
        out = {"quant": quant, "kv": eng.stats()["kv"]}
        for mix in ("base", "rr"):
            work = [(p, sp, None if mix == "base" else names[i % len(names)]) for i, p in enumerate(prompts)]
            eng.generate_batch(work[: max(2, a.seqs // 8)])  # warm-up
            best = 0.0
            for _ in range(a.reps):
                t0 = time.perf_counter()
                comps = eng.generate_batch(work)
                best = max(best, sum(len(c.token_ids) for c in comps) / (time.perf_counter() - t0))
            out[mix] = best
        out["adapter_bytes"] = resident[0].nbytes
        if torch.cuda.is_available():
            out["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out
    finally:
        eng.shutdown()
        del eng
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shape on CPU (smoke run of this script)")
    ap.add_argument("--dir", default=None, help="where the random base and adapters are built (cached)")
    ap.add_argument("--quant", default="none,nf4")
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if a.tiny:
        shape = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=8192)
        a.seqs, a.prompt, a.new, a.reps, quants = min(a.seqs, 8), min(a.prompt, 32), min(a.new, 8), 1, ["none"]
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            print("gpu_7b_bench: no CUDA device; use --tiny for the CPU smoke run")
            return 2
        shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000)
        quants, device = a.quant.split(","), "cuda"
    root = Path(a.dir or ("/tmp/serve_app_7b" + ("_tiny" if a.tiny else "")))
    t0 = time.perf_counter()
    base, adapters = build(root, shape, a.adapters, a.rank, device)
    print(f"== gpu_7b_bench: {shape}, {a.adapters} adapters r{a.rank} on q/k/v/o, built in {time.perf_counter() - t0:.0f}s")
    print(f"{a.seqs} sequences x {a.prompt} prompt tokens x {a.new} new, greedy; best of {a.reps}")
    print(f"{'quant':>6} {'base tok/s':>11} {'rr tok/s':>9} {'rr/base':>8} {'KV tokens':>10} {'adapters/GiB':>13} {'peak GiB':>9}")
    for q in quants:
        try:
            r = run(base, adapters, q, a)
        except Exception as e:  # one quantization failing must not hide the other's figures
            print(f"{q:>6} FAILED: {type(e).__name__}: {e}")
            continue
        kv_tokens = r["kv"]["num_blocks"] * r["kv"]["block_size"]
        print(f"{q:>6} {r['base']:>11,.0f} {r['rr']:>9,.0f} {r['rr'] / r['base']:>7.2f}x {kv_tokens:>10,} "
              f"{2**30 / r['adapter_bytes']:>13,.1f} {r.get('max_allocated_gib', float('nan')):>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
