"""A long prompt arriving into running streams: how long do the streams pause? (issue: token budget)

W1's model and adapters (design/WORKLOAD.md). 32 greedy streams (8 adapters round-robin) decode;
once every one of them is producing tokens, one 1,900-token prompt of another tenant arrives.
For each ``max_num_batched_tokens`` the engine runs the same script, side by side in one process:

- ``steady gap``: median inter-token gap of the running streams before the arrival;
- ``max gap``: the longest gap any running stream sees from the arrival until the long prompt's
  first token (its prefill);
- ``stall``: max gap / steady gap (the target: <= 2x), and the long prompt's time to first token;
- W1 tok/s (64 x 32-token prompts, 64 new, 8 adapters round-robin), so the budget's cost on a
  burst of short prompts shows in the same run.

The dense KV cache is grown to the long prompt's length before the streams start (growth
copies every slot and belongs to the paged-KV work, not to the budget). A budget of 4096 prefills the long prompt in one step: the engine's behaviour before chunked
prefill, as the baseline row. Every stream's tokens are checked against the same stream run with
that baseline budget (greedy: identical or the row is INVALID).

    python -m benchmarks.prefill_stall_bench [--budgets 4096,512,128] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def w1_assets():
    from serve_app.demo import build_demo_assets

    root = os.environ.get("SERVE_APP_BENCH_DIR", os.path.expanduser("~/.cache/serve_app/bench-w1"))
    return build_demo_assets(root, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                             num_kv_heads=4, vocab_size=8192, num_adapters=8, ranks=[8, 16] * 4,
                             target_modules=[ATTN] * 8)


def run(assets, budget: int, long_len: int, n_streams: int, stream_tokens: int, w1_shape=(64, 64, 3)):
    from serve_app.config import EngineConfig
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.sampling import SamplingParams

    eng = LoRAEngine(EngineConfig(model=str(assets.base), max_lora_rank=16, max_num_seqs=64, torch_threads=2,
                                  max_model_len=2048, max_num_batched_tokens=budget))
    try:
        for a in assets.adapter_ids:
            eng.load_adapter(a, str(assets.adapters_dir / a))
        rng = random.Random(0)
        # One long request first (a warm-up of the long shapes; with the dense KV cache this
        # replaced, it also grew the cache, which copied every slot).
        eng.generate_batch([([rng.randrange(4, 8192) for _ in range(long_len + 8)],
                             SamplingParams(max_tokens=1, temperature=0.0), None)])
        sp = SamplingParams(max_tokens=stream_tokens, temperature=0.0, ignore_eos=True)
        stamps = [[] for _ in range(n_streams)]
        tokens = [[] for _ in range(n_streams)]
        done = threading.Semaphore(0)

        def sink_for(i):
            def sink(out):
                now = time.perf_counter()
                stamps[i].extend([now] * len(out.token_ids))
                tokens[i].extend(out.token_ids)
                if out.finished or out.error is not None:
                    done.release()
            return sink

        for i in range(n_streams):
            prompt = [rng.randrange(4, 8192) for _ in range(16)]
            eng.add_request(prompt, sp, assets.adapter_ids[i % 8], sink_for(i))
        while min(len(s) for s in stamps) < 20:
            time.sleep(0.001)
        long_prompt = [rng.randrange(4, 8192) for _ in range(long_len)]
        first = []
        t_arrive = time.perf_counter()
        long_done = threading.Event()

        def long_sink(out):
            if not first and out.token_ids:
                first.append(time.perf_counter())
            if out.finished:
                long_done.set()

        eng.add_request(long_prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), None, long_sink)
        for _ in range(n_streams):
            done.acquire()
        long_done.wait(120)
        t_first = first[0]
        before, during = [], []
        for s in stamps:
            gaps = [(b - a, b) for a, b in zip(s, s[1:])]
            before += [g for g, t in gaps if t < t_arrive]
            during += [g for g, t in gaps if t_arrive <= t <= t_first + 0.05]
        steady = statistics.median(before)
        stall = max(during) if during else float("nan")

        # W1 burst on the same engine (--quick: 16 x 16 tokens, one timed run).
        w1_n, w1_new, w1_reps = w1_shape
        w1 = [([rng.randrange(4, 8192) for _ in range(32)], SamplingParams(max_tokens=w1_new, temperature=0.0,
               ignore_eos=True), assets.adapter_ids[i % 8]) for i in range(w1_n)]
        eng.generate_batch(w1)
        best = 0.0
        for _ in range(w1_reps):
            t0 = time.perf_counter()
            outs = eng.generate_batch(w1)
            best = max(best, sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
        return dict(steady=steady, stall=stall, ttft=t_first - t_arrive, tokens=tokens,
                    w1=best, w1_tokens=[o.token_ids for o in outs])
    finally:
        eng.shutdown()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="4096,512,128", help="max_num_batched_tokens values; the first is the baseline")
    ap.add_argument("--quick", action="store_true",
                    help="a 600-token prompt into 8 streams of 48 tokens; W1 burst 16 x 16 tokens, once; no warm-up engine "
                         "(a smoke run, CI)")
    args = ap.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    long_len, n_streams, stream_tokens = (600, 8, 48) if args.quick else (1900, 32, 140)
    w1_shape = (16, 16, 1) if args.quick else (64, 64, 3)
    assets = w1_assets()
    if not args.quick:  # warm-up: the first engine of a process is slower (--quick: a smoke run, skipped)
        run(assets, budgets[0], long_len, n_streams, stream_tokens, w1_shape)
    rows = {b: run(assets, b, long_len, n_streams, stream_tokens, w1_shape) for b in budgets}
    base = rows[budgets[0]]
    print(f"\n{long_len}-token prompt into {n_streams} running streams (W1 model, fp32, 2 threads); "
          f"budget {budgets[0]} = whole prefill in one step (before chunking)")
    print(f"{'max_num_batched_tokens':>24} {'steady gap ms':>14} {'max gap ms':>11} {'stall':>7} "
          f"{'long TTFT s':>12} {'W1 rr tok/s':>12} {'vs baseline':>11}  check")
    for b, r in rows.items():
        ok = r["tokens"] == base["tokens"] and r["w1_tokens"] == base["w1_tokens"]
        print(f"{b:>24} {1e3 * r['steady']:>14.1f} {1e3 * r['stall']:>11.1f} {r['stall'] / r['steady']:>6.1f}x "
              f"{r['ttft']:>12.2f} {r['w1']:>12,.0f} {r['w1'] / base['w1']:>10.2f}x  {'ok' if ok else 'INVALID'}")
    for b, r in rows.items():
        if b == budgets[0]:
            continue
        ratio = r["stall"] / r["steady"]
        valid = r["tokens"] == base["tokens"] and r["w1_tokens"] == base["w1_tokens"]
        verdict = "INVALID (tokens differ from the baseline budget)" if not valid else (
            "PASS" if ratio <= 2.0 else "MISS")
        print(f"Target budget {b}: stall <= 2x steady gap: {ratio:.1f}x {verdict}; "
              f"W1 rr {r['w1'] / base['w1']:.2f}x of the baseline budget")


if __name__ == "__main__":
    main()
