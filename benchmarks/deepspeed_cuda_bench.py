"""The merged path on CUDA, timed through the engines it serves with (target: DeepSpeed >= 3x).

Why this shape: the merged path does not serve ``model.generate``; it serves
``build_merged_engine(...)`` (serve_app/engine/merge.py), which on CUDA drives the DeepSpeed
kernel-injected model through ``GenerateEngine`` (static_batch.py: a Python logits processor
samples, detokenizes and flushes every step). So every row here is an engine's
``generate_batch`` on the same batch, and every row's greedy tokens are checked against fp32
PEFT before its time counts (a row that differs beyond a near-tie is INVALID, not PASS).

A prepared script for a CUDA machine (benchmarks/gpu_check.sh runs it). It builds, offline, a
demo Llama big enough for kernels to matter (default hidden 2048, intermediate 5504, 16 layers,
16 heads, vocab 16384: about 0.9B parameters) with ``build_demo_assets`` and one tenant adapter
(tenant-0), then times, in fp16 on the GPU, greedy, ``--new-tokens`` new tokens, prompts of
DIFFERENT lengths in one batch (DeepSpeed's Llama injection has had padded-batch bugs,
DeepSpeed issue 3960), batch 1 and batch 8:

* ``merged_ds``: ``build_merged_engine(cfg, "tenant-0", path)``: the served merged path
  (PEFT safe merge, ``deepspeed.init_inference(replace_with_kernel_inject=True)``, GenerateEngine);
* ``merged_plain``: ``build_merged_engine(..., kernel_inject=False)``: the same merged weights
  without kernels (LoRAEngine's loop, no LoRA layers): the 1.00 of the speed-up;
* ``lora``: ``LoRAEngine`` with tenant-0 loaded, requests on tenant-0 (the LoRA path);
* ``bare``: ``LoRAEngine`` with ``lora_target_modules=()`` on the unmodified base;
* ``bare_ds``: the bare base through the same DeepSpeed kernels and GenerateEngine as
  ``merged_ds`` (README's "as fast as the bare base", like for like).

Reference: fp32 PEFT (tenant-0 unmerged; and the plain base for ``bare*``) ``generate`` one
prompt at a time with ``output_logits``. A row that diverges from it is tolerated only where
the reference's logits put the two tokens within ``--tie-tol`` at the first diverging step
(fp16 kernels may flip a near-tie; the gap is printed). Precondition: the adapter must change
the reference greedy output (else a row serving the base would pass).

Verdicts (each INVALID when a row it uses failed the check):
* merged_ds >= 3x merged_plain (the kernels' speed-up on the served path), per batch size;
* merged_ds <= 1.05x bare_ds (the merged path as fast as the bare base, same kernels);
  this target moved here from merged_bench, where on CPU both graphs are identical.

    python -m benchmarks.deepspeed_cuda_bench              # on a CUDA machine, about 2-4 min on an H200
    python -m benchmarks.deepspeed_cuda_bench --json out.json
    python -m benchmarks.deepspeed_cuda_bench --cpu-smoke  # the code path on CPU: W1 model, no kernels

Without CUDA (and without --cpu-smoke) it prints "CUDA not available: ..." and exits 0. Exit
status 1 when any verdict is INVALID or a row failed. DeepSpeed compiles its inference kernels
on first use (JIT: needs nvcc and ninja); engine build times (compilation included) are printed
separately and are not part of the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback

HOT = "tenant-0"
TARGET_SPEEDUP = 3.0  # merged_ds >= 3x merged_plain
TARGET_VS_BARE = 1.05  # merged_ds <= 1.05x bare_ds
SEED = 1234  # engine_bench's prompt seed


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:400] if msg else ''}"


def prompt_lengths(n: int, longest: int) -> list[int]:
    """Different lengths in one batch (left padding in GenerateEngine): longest, longest-7, ..."""
    span = max(1, longest // 2)
    return [longest - (7 * i) % span for i in range(n)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deepspeed_cuda_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=16384, help="the demo tokenizer caps near 18k")
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt; the others are shorter")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tie-tol", type=float, default=0.05,
                        help="a divergence from the fp32 reference is a tolerated near-tie when the reference's "
                             "logits of the two tokens differ by at most this (default 0.05)")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="stop timing new repetitions once the run is this old (seconds)")
    parser.add_argument("--out", default=None, help="demo assets cache folder (default: serve_app's)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="check the code path on CPU: W1-sized model, fp32, no kernel injection, tiny runs")
    parser.add_argument("--json", metavar="OUT", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"CUDA not available: torch {torch.__version__} (CUDA build: {torch.version.cuda}), "
              "torch.cuda.is_available() is False. This benchmark measures the merged path with DeepSpeed's CUDA "
              "inference kernels; run it on a GPU machine (or with --cpu-smoke to check the code path). "
              "Nothing measured.")
        return 0

    from benchmarks.engine_bench import make_prompts, quiet_libraries
    from benchmarks.verify import INVALID, compare_tokens, gate

    quiet_libraries()
    if args.cpu_smoke:
        device, dtype_name = "cpu", "float32"
        shape = dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4,
                     vocab_size=8192)  # W1: the cached default demo assets
        new_tokens, batch_sizes, reps = min(args.new_tokens, 8), [1, 3], 1
    else:
        device, dtype_name = "cuda", "float16"
        shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
                     num_heads=args.heads, num_kv_heads=args.heads, vocab_size=args.vocab)
        new_tokens, batch_sizes, reps = args.new_tokens, [int(b) for b in args.batch_sizes.split(",")], args.reps
    dtype = getattr(torch, dtype_name)

    # ---- environment ----
    import transformers

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__, "device": device, "dtype": dtype_name,
        "nvcc": shutil.which("nvcc"), "ninja": shutil.which("ninja"), "CUDA_HOME": os.environ.get("CUDA_HOME"),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except Exception as e:  # the rows without kernels still run
        env["deepspeed"] = f"import failed: {_short(e)}"
    print("== deepspeed_cuda_bench: the merged path through its engines (DeepSpeed kernels vs none, LoRA, bare base)"
          + (" (--cpu-smoke: CPU, fp32, no kernels; checks the code path only)" if args.cpu_smoke else ""))
    print("env: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if device == "cuda" and (env["nvcc"] is None or env["ninja"] is None):
        print("  note: DeepSpeed JIT-compiles its inference kernels; nvcc or ninja is missing from PATH, so "
              "init_inference may fail (unless the ops were pre-built: DS_BUILD_OPS=1)")

    # ---- assets: the demo base + tenant-0, built offline ----
    from serve_app.config import EngineConfig
    from serve_app.demo import build_demo_assets
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.merge import build_merged_engine, deepspeed_optimize
    from serve_app.engine.sampling import SamplingParams
    from serve_app.engine.static_batch import GenerateEngine

    t0 = time.perf_counter()
    # --cpu-smoke: the W1 default (8 adapters) is usually cached already; tenant-0 is the same either way.
    assets = build_demo_assets(args.out, num_adapters=8 if args.cpu_smoke else 1, **shape)
    t_build = time.perf_counter() - t0
    base, path = str(assets.base), str(assets.adapter_path(HOT))
    print(f"assets: {assets.root} ({t_build:.1f}s)")

    max_b = max(batch_sizes)
    cfg = EngineConfig(model=base, device=device, dtype=dtype_name, max_num_seqs=max(8, max_b),
                       max_model_len=args.prompt_len + new_tokens + 8)
    bare_cfg = cfg.model_copy(update={"lora_target_modules": ()})

    # ---- the fp32 reference (PEFT, one prompt at a time, with logits), untimed ----
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    ref_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    ref_base.to(device).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in ref_base.parameters())
    vocab = ref_base.config.vocab_size
    pad_id = ref_base.generation_config.pad_token_id
    pad_id = 3 if pad_id is None else pad_id
    full = make_prompts(max_b, args.prompt_len, vocab, SEED)
    prompts = [p[:n] for p, n in zip(full, prompt_lengths(max_b, args.prompt_len))]

    @torch.inference_mode()
    def reference(model) -> tuple[list[list[int]], list[torch.Tensor]]:
        toks, logits = [], []
        for p in prompts:
            ids = torch.tensor([p], dtype=torch.long, device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                                 output_logits=True, return_dict_in_generate=True)
            toks.append(out.sequences[0, len(p):].tolist())
            logits.append(torch.stack(out.logits)[:, 0].float().cpu())  # [steps, vocab], raw (EOS not masked)
        return toks, logits

    base_ref = reference(ref_base)
    peft_ref = PeftModel.from_pretrained(ref_base, path, adapter_name="tenant").eval()
    adapter_ref = reference(peft_ref)
    del peft_ref, ref_base
    if device == "cuda":
        torch.cuda.empty_cache()
    t_ref = time.perf_counter() - t0
    moved = sum(a != b for a, b in zip(adapter_ref[0], base_ref[0]))
    precondition = moved * 2 >= max_b
    print(f"model: {n_params / 1e6:,.0f}M parameters ({shape}); {len(prompts)} prompts of lengths "
          f"{[len(p) for p in prompts]}; fp32 reference (PEFT {HOT}, and the base) in {t_ref:.1f}s; "
          f"{HOT} changes the reference greedy output on {moved}/{max_b} prompts"
          + ("" if precondition else " -- too few to tell a row serving the base from one serving the adapter: "
             "the checks below are INVALID"))

    # ---- the engines ----
    def bare_ds_engine():
        # On CPU deepspeed_optimize injects nothing; GenerateEngine's code path still runs.
        return GenerateEngine(bare_cfg, transform=lambda m: deepspeed_optimize(m, dtype, kernel_inject=True)[0])

    def lora_engine():
        e = LoRAEngine(cfg)
        e.load_adapter(HOT, path)
        return e

    specs = [  # key, label, builder, adapter, reference
        ("merged_ds", f"merged path served: build_merged_engine ({'DeepSpeed kernels' if device == 'cuda' else 'CPU: no kernels'})",
         lambda: build_merged_engine(cfg, HOT, path), None, adapter_ref),
        ("merged_plain", "merged weights, no kernels: build_merged_engine(kernel_inject=False)",
         lambda: build_merged_engine(cfg, HOT, path, kernel_inject=False), None, adapter_ref),
        ("lora", f"LoRA path: LoRAEngine + {HOT}", lora_engine, HOT, adapter_ref),
        ("bare", "bare base: LoRAEngine, no LoRA layers", lambda: LoRAEngine(bare_cfg), None, base_ref),
        ("bare_ds", f"bare base, {'DeepSpeed kernels' if device == 'cuda' else 'CPU: no kernels'} (GenerateEngine)",
         bare_ds_engine, None, base_ref),
    ]
    engines, errors, build_s, injected = {}, {}, {}, {}
    for key, _, build, _, _ in specs:
        t0 = time.perf_counter()
        try:
            engines[key] = build()
        except Exception as e:  # one row failing must not stop the others
            errors[key] = _short(e)
            print(f"  {key}: engine build failed: {errors[key]}")
            traceback.print_exc(limit=6, file=sys.stdout)
            continue
        build_s[key] = time.perf_counter() - t0
        injected[key] = sum(1 for m in engines[key].model.modules() if "DeepSpeed" in type(m).__name__)
        print(f"  {key}: built in {build_s[key]:.1f}s ({type(engines[key]).__name__}, "
              f"{injected[key]} DeepSpeed modules)", flush=True)
    kernels_ok = device != "cuda" or (injected.get("merged_ds", 0) > 0 and injected.get("bare_ds", 0) > 0)
    if device == "cuda" and not kernels_ok:
        print("  WARNING: no DeepSpeed module was injected in merged_ds or bare_ds: the 'kernel' rows run "
              "transformers' modules; the speed-up verdicts are n/a")

    # ---- timing: warm-up (outputs checked) + reps, interleaved, order alternating ----
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    times = {(k, b): [] for k, *_ in specs for b in batch_sizes}
    tokens: dict[tuple[str, int], list[list[int]]] = {}
    keys = [k for k, *_ in specs]
    adapters = {k: a for k, _, _, a, _ in specs}
    done_reps = 0
    for rep in range(reps + 1):
        if rep > 1 and time.perf_counter() - t_start > args.budget_s:
            print(f"  budget of {args.budget_s:.0f}s reached: stopping after {done_reps} timed reps")
            break
        for b in batch_sizes:
            for k in (keys if rep % 2 == 0 else keys[::-1]):
                if k not in engines or (k, b) in errors:
                    continue
                try:
                    t0 = time.perf_counter()
                    comps = engines[k].generate_batch([(p, sp, adapters[k]) for p in prompts[:b]])
                    if device == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                except Exception as e:
                    errors[(k, b)] = _short(e)
                    print(f"  {k} batch {b} failed: {errors[(k, b)]}")
                    traceback.print_exc(limit=6, file=sys.stdout)
                    continue
                if rep == 0:
                    tokens[(k, b)] = [c.token_ids for c in comps]
                else:
                    times[(k, b)].append(dt)
        if rep > 0:
            done_reps = rep
        print(f"  {'warm-up' if rep == 0 else f'rep {rep}/{reps}'} done ({time.perf_counter() - t_start:.0f}s)",
              flush=True)
    for e in engines.values():
        e.shutdown()

    # ---- checks: every row's tokens vs the fp32 reference ----
    def checker(ref):
        ref_logits = ref[1]

        def is_tie(row: int, step: int, got: int, want: int) -> tuple[bool, str]:
            lg = ref_logits[row][step]
            gap = float(lg[want] - lg[got])
            return gap <= args.tie_tol, f"reference logit gap {gap:.4f}, tolerance {args.tie_tol}"

        return is_tie

    refs = {k: r for k, _, _, _, r in specs}
    agreement = {}
    for k in keys:
        for b in batch_sizes:
            if (k, b) in tokens:
                agreement[(k, b)] = compare_tokens(tokens[(k, b)], refs[k][0][:b], is_tie=checker(refs[k]))
            else:
                agreement[(k, b)] = compare_tokens(None, None)

    def valid(k: str, b: int) -> bool:
        return precondition and agreement[(k, b)].ok

    def med(k, b):
        return statistics.median(times[(k, b)]) if times[(k, b)] else None

    labels = {k: label for k, label, *_ in specs}
    print()
    print(f"generate_batch, greedy, prompts of {min(len(p) for p in prompts)}-{max(len(p) for p in prompts)} tokens, "
          f"{new_tokens} new tokens; median of {done_reps} after a warm-up (ms per request = the batch's time); "
          f"tokens checked against fp32 PEFT (near-tie tolerance {args.tie_tol} in logits)")
    print(f"  {'row':<70} {'batch':>5} {'ms/req':>9} {'min..max':>17} {'tok/s':>8}  tokens vs fp32 reference")
    rows = {}
    for k in keys:
        for b in batch_sizes:
            m = med(k, b)
            ts = times[(k, b)]
            spread = f"{min(ts) * 1e3:,.1f}..{max(ts) * 1e3:,.1f}" if ts else "-"
            err = errors.get(k) or errors.get((k, b))
            print(f"  {labels[k]:<70} {b:>5} {'-' if m is None else f'{m * 1e3:,.1f}':>9} {spread:>17} "
                  f"{'-' if m is None else f'{b * new_tokens / m:,.0f}':>8}  "
                  + (f"error: {err}" if err else agreement[(k, b)].summary()))
            rows[f"{k}/{b}"] = {"label": labels[k], "batch": b, "median_s": m, "times_s": ts, "error": err,
                                "agreement": agreement[(k, b)].to_json(), "valid": valid(k, b)}
    if device == "cuda":
        print(f"  peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    def ratio(a, b):
        return a / b if a and b else None

    verdicts = {}
    print()
    for b in batch_sizes:
        s = ratio(med("merged_plain", b), med("merged_ds", b))
        v = "n/a" if s is None or not kernels_ok else ("PASS" if s >= TARGET_SPEEDUP else "MISS")
        v = gate(v, valid("merged_ds", b), valid("merged_plain", b))
        verdicts[f"speedup/{b}"] = {"value": s, "target": TARGET_SPEEDUP, "verdict": v}
        r = ratio(med("merged_ds", b), med("bare_ds", b))
        w = "n/a" if r is None else ("PASS" if r <= TARGET_VS_BARE else "MISS")
        w = gate(w, valid("merged_ds", b), valid("bare_ds", b))
        verdicts[f"vs_bare/{b}"] = {"value": r, "target": TARGET_VS_BARE, "verdict": w}
        lo = ratio(med("lora", b), med("merged_ds", b))
        verdicts[f"vs_lora/{b}"] = {"value": lo, "target": None,
                                    "verdict": gate("info", valid("merged_ds", b), valid("lora", b))}
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    print(f"Target: served merged path (DeepSpeed kernels, GenerateEngine) >= {TARGET_SPEEDUP:.0f}x the merged "
          "weights without kernels: " + "; ".join(
              f"batch {b}: {fmt(verdicts[f'speedup/{b}']['value'])} {verdicts[f'speedup/{b}']['verdict']}"
              for b in batch_sizes))
    print(f"Target: served merged path <= {TARGET_VS_BARE:.2f}x the bare base through the same kernels: " + "; ".join(
        f"batch {b}: {fmt(verdicts[f'vs_bare/{b}']['value'])} {verdicts[f'vs_bare/{b}']['verdict']}"
        for b in batch_sizes))
    print("(info) LoRA path time / served merged path time: " + "; ".join(
        f"batch {b}: {fmt(verdicts[f'vs_lora/{b}']['value'])}"
        + (" INVALID" if verdicts[f"vs_lora/{b}"]["verdict"] == INVALID else "") for b in batch_sizes))
    if args.cpu_smoke:
        print("(--cpu-smoke: no kernels on CPU, so the speed-up is ~1x by construction; code path check only)")
    elapsed = time.perf_counter() - t_start
    print(f"\ntotal {elapsed:.0f}s (assets {t_build:.0f}s, reference {t_ref:.0f}s, engine builds "
          + ", ".join(f"{k} {v:.0f}s" for k, v in build_s.items()) + ")")
    failed = any(v["verdict"] == INVALID for v in verdicts.values()) or bool(errors)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "shape": shape, "n_params": n_params, "new_tokens": new_tokens,
                       "prompt_lengths": [len(p) for p in prompts], "reps": done_reps, "cpu_smoke": args.cpu_smoke,
                       "tie_tol": args.tie_tol, "precondition_adapter_moves_rows": moved, "build_s": build_s,
                       "deepspeed_modules": injected, "errors": {str(k): v for k, v in errors.items()},
                       "rows": rows, "verdicts": verdicts, "elapsed_s": elapsed}, f, indent=2)
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
