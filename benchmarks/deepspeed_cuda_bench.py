"""DeepSpeed kernel injection vs the plain merged model on CUDA (the merged path's speed-up; target >= 3x).

A prepared script for a CUDA machine. It builds, offline, a demo Llama big enough for kernels to
matter on a GPU (default hidden 2048, intermediate 5504, 16 layers, 16 heads, vocab 16384: about
0.9B parameters) with ``build_demo_assets`` and one tenant adapter, loads it in fp16 on the GPU,
merges tenant-0 with ``serve_app.engine.merge.merge_adapter`` (what the merged path does), then
times ``model.generate`` (greedy, 64 new tokens, 32-token prompts, batch 1 and batch 8) for:

* the plain merged model (transformers' own modules);
* the same merged weights through ``deepspeed.init_inference(model, dtype=torch.float16,
  replace_with_kernel_inject=True).module`` (DeepSpeed's fused inference kernels).

Rows are warmed up once and timed ``--reps`` times, interleaved, median reported; ms per request
(a batch's requests all finish together, so a request's latency is the batch's time), generated
tokens/s, the speed-up, and whether the two produce the same greedy tokens (fp16 kernels may
legitimately diverge after a near-tie; the count and the first diverging step are printed).

    python -m benchmarks.deepspeed_cuda_bench              # on a CUDA machine, < 5 min on an H100/H200
    python -m benchmarks.deepspeed_cuda_bench --json out.json
    python -m benchmarks.deepspeed_cuda_bench --cpu-smoke  # the code path on CPU: W1 model, no kernels

Without CUDA (and without --cpu-smoke) it prints "CUDA not available: ..." and exits 0.
DeepSpeed compiles its inference kernels on first use (JIT: needs nvcc and ninja); the time of
``init_inference`` (compilation included) is printed separately and is not part of the timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback

HOT = "tenant-0"
TARGET_SPEEDUP = 3.0
SEED = 1234  # engine_bench's prompt seed


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:400] if msg else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deepspeed_cuda_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=16384, help="the demo tokenizer caps near 18k")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="stop timing new repetitions once the run is this old (seconds)")
    parser.add_argument("--out", default=None, help="demo assets cache folder (default: serve_app's)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="check the code path on CPU: W1-sized model, fp32, no kernel injection, tiny runs")
    parser.add_argument("--json", metavar="OUT", default=None)
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"CUDA not available: torch {torch.__version__} (CUDA build: {torch.version.cuda}), "
              "torch.cuda.is_available() is False. This benchmark measures DeepSpeed's CUDA inference kernels; "
              "run it on a GPU machine (or with --cpu-smoke to check the code path). Nothing measured.")
        return 0

    from benchmarks.engine_bench import make_prompts, quiet_libraries

    quiet_libraries()
    if args.cpu_smoke:
        device, dtype, inject = torch.device("cpu"), torch.float32, False
        shape = dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4,
                     vocab_size=8192)  # W1: the cached default demo assets
        new_tokens, batch_sizes, reps = min(args.new_tokens, 8), [1, 2], 1
    else:
        device, dtype, inject = torch.device("cuda"), torch.float16, True
        shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
                     num_heads=args.heads, num_kv_heads=args.heads, vocab_size=args.vocab)
        new_tokens, batch_sizes, reps = args.new_tokens, [int(b) for b in args.batch_sizes.split(",")], args.reps

    # ---- environment ----
    import transformers

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__, "device": str(device), "dtype": str(dtype),
        "nvcc": shutil.which("nvcc"), "ninja": shutil.which("ninja"), "CUDA_HOME": os.environ.get("CUDA_HOME"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    ds_error = None
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except Exception as e:  # the plain rows still run
        deepspeed = None
        ds_error = f"deepspeed import failed: {_short(e)}"
        env["deepspeed"] = None
    print("== deepspeed_cuda_bench: DeepSpeed kernel injection vs the plain merged model"
          + (" (--cpu-smoke: CPU, fp32, no kernels; checks the code path only)" if args.cpu_smoke else ""))
    print("env: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if inject and (env["nvcc"] is None or env["ninja"] is None):
        print("  note: DeepSpeed JIT-compiles its inference kernels; nvcc or ninja is missing from PATH, so "
              "init_inference may fail (unless the ops were pre-built: DS_BUILD_OPS=1)")

    # ---- assets: the demo base + tenant-0, built offline ----
    from serve_app.demo import build_demo_assets
    from serve_app.engine.merge import merge_adapter

    t0 = time.perf_counter()
    # --cpu-smoke: the W1 default (8 adapters) is usually cached already; tenant-0 is the same either way.
    assets = build_demo_assets(args.out, num_adapters=8 if args.cpu_smoke else 1, **shape)
    t_build = time.perf_counter() - t0
    print(f"assets: {assets.root} ({t_build:.1f}s)")

    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(assets.base), dtype=dtype, local_files_only=True)
    model.to(device).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    merged = merge_adapter(model, HOT, str(assets.adapter_path(HOT)), max_rank=64)
    merged.requires_grad_(False)
    vocab = merged.config.vocab_size
    pad_id = merged.generation_config.pad_token_id
    pad_id = 3 if pad_id is None else pad_id
    t_load = time.perf_counter() - t0
    print(f"model: {n_params / 1e6:,.0f}M parameters ({shape}), {dtype} on {device}; {HOT} merged; "
          f"loaded + merged in {t_load:.1f}s")

    # ---- DeepSpeed: on its own copy (kernel injection replaces the layers in place) ----
    ds_model, t_ds = None, None
    if deepspeed is not None:
        try:
            t0 = time.perf_counter()
            ds_src = copy.deepcopy(merged)
            engine = deepspeed.init_inference(ds_src, dtype=dtype, replace_with_kernel_inject=inject)
            ds_model = engine.module
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_ds = time.perf_counter() - t0
            injected = sum(1 for m in ds_model.modules() if "DeepSpeed" in type(m).__name__)
            print(f"deepspeed.init_inference(replace_with_kernel_inject={inject}): {t_ds:.1f}s "
                  f"(JIT compile included), {injected} DeepSpeed modules in the model")
            if inject and injected == 0:
                print("  WARNING: no DeepSpeed module was injected; the 'DeepSpeed' rows run transformers' modules")
        except Exception as e:
            ds_error = f"deepspeed.init_inference failed: {_short(e)}"
            print(ds_error)
            traceback.print_exc(limit=6, file=sys.stdout)
            ds_model = None

    # ---- timing ----
    max_b = max(batch_sizes)
    prompts = make_prompts(max_b, args.prompt_len, vocab, SEED)
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def gen(m, b: int) -> tuple[float, list[list[int]]]:
        sync()
        t = time.perf_counter()
        out = m.generate(input_ids=ids[:b], attention_mask=mask[:b], max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        sync()
        dt = time.perf_counter() - t
        if tuple(out.shape) != (b, args.prompt_len + new_tokens):
            raise RuntimeError(f"generate returned {tuple(out.shape)}, expected ({b}, {args.prompt_len + new_tokens})")
        return dt, out[:, args.prompt_len:].tolist()

    models = {"plain": merged, "deepspeed": ds_model}
    times = {(k, b): [] for k in models for b in batch_sizes}
    tokens: dict[tuple[str, int], list[list[int]]] = {}
    errors: dict[tuple[str, int], str] = {}
    if ds_model is None:
        for b in batch_sizes:
            errors[("deepspeed", b)] = ds_error or "no DeepSpeed model"
    done_reps = 0
    for rep in range(reps + 1):
        if rep > 1 and time.perf_counter() - t_start > args.budget_s:
            print(f"  budget of {args.budget_s:.0f}s reached: stopping after {done_reps} timed reps")
            break
        for b in batch_sizes:
            for k in (("plain", "deepspeed") if rep % 2 == 0 else ("deepspeed", "plain")):
                if (k, b) in errors:
                    continue
                try:
                    dt, toks = gen(models[k], b)
                except Exception as e:
                    errors[(k, b)] = _short(e)
                    print(f"  {k} batch {b} failed: {errors[(k, b)]}")
                    traceback.print_exc(limit=6, file=sys.stdout)
                    continue
                if rep == 0:
                    tokens[(k, b)] = toks
                else:
                    times[(k, b)].append(dt)
        if rep > 0:
            done_reps = rep
        print(f"  {'warm-up' if rep == 0 else f'rep {rep}/{reps}'} done ({time.perf_counter() - t_start:.0f}s)",
              flush=True)

    def med(k, b):
        return statistics.median(times[(k, b)]) if times[(k, b)] else None

    def agree(b):
        x, y = tokens.get(("plain", b)), tokens.get(("deepspeed", b))
        if x is None or y is None:
            return None, None
        same = sum(p == q for p, q in zip(x, y))
        firsts = [next((j for j, (s, t) in enumerate(zip(p, q)) if s != t), None) for p, q in zip(x, y)]
        diverged = [f for f in firsts if f is not None]
        return same, (min(diverged) if diverged else None)

    print()
    print(f"generate, greedy, {args.prompt_len}-token prompts, {new_tokens} new tokens; median of {done_reps} "
          "after a warm-up (ms per request = the batch's time)")
    print(f"  {'batch':>5} {'plain ms/req':>13} {'DeepSpeed ms/req':>17} {'speed-up':>9} {'plain tok/s':>12} "
          f"{'DS tok/s':>9} {'target':>7}  greedy tokens")
    rows = {}
    for b in batch_sizes:
        p, d = med("plain", b), med("deepspeed", b)
        speedup = p / d if p and d else None
        verdict = "n/a" if speedup is None else ("PASS" if speedup >= TARGET_SPEEDUP else "MISS")
        same, first = agree(b)
        agree_s = "n/a" if same is None else (
            f"{same}/{b} rows identical" + (f", first divergence at step {first}" if first is not None else ""))
        fmt = lambda s: "-" if s is None else f"{s * 1e3:,.1f}"  # noqa: E731
        tps = lambda s: "-" if s is None else f"{b * new_tokens / s:,.0f}"  # noqa: E731
        print(f"  {b:>5} {fmt(p):>13} {fmt(d):>17} {('-' if speedup is None else f'{speedup:.2f}x'):>9} "
              f"{tps(p):>12} {tps(d):>9} {verdict:>7}  {agree_s}")
        for k in models:
            if (k, b) in errors:
                print(f"        {k}: {errors[(k, b)]}")
        rows[str(b)] = {"plain_s": p, "deepspeed_s": d, "speedup": speedup, "verdict": verdict,
                        "plain_times_s": times[("plain", b)], "deepspeed_times_s": times[("deepspeed", b)],
                        "identical_rows": same, "first_divergence": first,
                        "errors": {k: errors.get((k, b)) for k in models}}
    if device.type == "cuda":
        print(f"  peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print()
    print(f"Target: DeepSpeed kernel injection >= {TARGET_SPEEDUP:.0f}x the plain merged model: "
          + "; ".join(f"batch {b}: {'-' if r['speedup'] is None else format(r['speedup'], '.2f') + 'x'} "
                      f"{r['verdict']}" for b, r in rows.items()))
    if args.cpu_smoke:
        print("(--cpu-smoke: no kernels on CPU, so the speed-up is ~1x by construction; code path check only)")
    elapsed = time.perf_counter() - t_start
    print(f"\ntotal {elapsed:.0f}s (assets {t_build:.0f}s, load+merge {t_load:.0f}s, init_inference "
          f"{'-' if t_ds is None else f'{t_ds:.0f}s'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "shape": shape, "n_params": n_params, "new_tokens": new_tokens,
                       "prompt_len": args.prompt_len, "reps": done_reps, "cpu_smoke": args.cpu_smoke,
                       "kernel_inject": inject, "init_inference_s": t_ds, "deepspeed_error": ds_error,
                       "rows": rows, "target": TARGET_SPEEDUP, "elapsed_s": elapsed}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
