"""Fairness: a quiet tenant's latency while one tenant sends 10x its traffic (the engine's scheduler).

Issue 7's figure: with one tenant sending 10x the others' traffic, another tenant's p50 latency
stays within 2x of its value on an idle server.

One process, the engine alone (no Ray, no HTTP: the router's per-tenant limits are not in play,
so this measures the scheduler), the W1 demo model (``build_demo_assets()`` defaults):

1. **capacity**: one full batch (``max_num_seqs`` requests of the shape below) to measure the
   engine's requests/s; the offered load below is set from it;
2. **idle**: ``--quiet`` quiet tenants, each sending Poisson traffic at rate q, alone;
3. **loaded**: the same quiet traffic plus one noisy tenant at ``--ratio`` x q (10x each quiet
   tenant), with q chosen so the total offered load is ``--overload`` x capacity: the noisy
   tenant alone keeps the batch full and a queue waiting, the case a FIFO admits it ahead of
   everyone.

Every request: a 32-token prompt, 32 new tokens, greedy, EOS ignored. Latency = submit to last
token. The quiet tenants' p50 latency loaded / idle is the figure (target <= 2.0).

Survivorship: after the arrivals stop, the quiet tenants' requests get ``--quiet-wait`` seconds
(default 120) to finish; the noisy backlog is then cancelled. A quiet request still unfinished
at that point is counted on its own ("quiet cancelled") and kept as a censored latency (its
wait so far, a lower bound) in the quiet percentiles, and any such request FAILS the target: a
scheduler that starves quiet tenants must not look better because their slowest requests were
dropped. ``--scheduler
both`` (default) runs phases 2-3 with the fair scheduler (round-robin admission across tenants,
``FairQueue``) and again with a plain FIFO deque (the scheduler before issue 7) for comparison.

    python -m benchmarks.fairness_bench                  # 2 x (10 s idle + 10 s loaded), both schedulers
    python -m benchmarks.fairness_bench --reps 1 --seconds 6   # quick
    python -m benchmarks.fairness_bench --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import time

from benchmarks.engine_bench import CpuMeter, environment, loadavg, quiet_libraries

TARGET = 2.0
PROMPT_LEN = 32
NEW_TOKENS = 32
NOISY = "tenant-0"


class _Fifo(collections.deque):
    """The scheduler before issue 7: one FIFO for everyone."""

    def tenants(self) -> int:
        return -1


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_ms(x: float | None) -> str:
    return "      -" if x is None else f"{x * 1e3:7.1f}"


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run_phase(engine, params, seconds: float, rates: dict[str, float], seed: int,
                    quiet_wait: float = 120.0) -> dict:
    """Open-loop Poisson arrivals per tenant for ``seconds``; latencies of the requests that
    finished, and censored waits (lower bounds) of the quiet requests that did not."""
    rng = random.Random(seed)
    lat: dict[str, list[float]] = {t: [] for t in rates}
    tasks: list[tuple[str, asyncio.Task, float]] = []  # tenant, task, submit time
    vocab = engine.vocab_size

    async def one(tenant: str, prompt: list[int]):
        t0 = time.perf_counter()
        n = 0
        async for out in engine.generate(prompt, params, tenant):
            n += len(out.token_ids)
        assert n == NEW_TOKENS, n
        lat[tenant].append(time.perf_counter() - t0)

    async def arrivals(tenant: str, rate: float, trng: random.Random):
        t_end = time.perf_counter() + seconds
        next_t = time.perf_counter() + trng.expovariate(rate)
        while next_t < t_end:
            await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
            prompt = [trng.randrange(4, vocab) for _ in range(PROMPT_LEN)]
            tasks.append((tenant, asyncio.create_task(one(tenant, prompt)), time.perf_counter()))
            next_t += trng.expovariate(rate)

    t0 = time.perf_counter()
    await asyncio.gather(*(arrivals(t, r, random.Random(rng.random())) for t, r in rates.items()))
    offered_s = time.perf_counter() - t0
    # Let the quiet tenants' last requests finish (bounded); then stop the rest (the noisy
    # tenant's backlog) so the next phase starts on an empty engine.
    quiet_tasks = [t for tenant, t, _ in tasks if tenant != NOISY]
    if quiet_tasks:
        await asyncio.wait(quiet_tasks, timeout=quiet_wait)
    t_cancel = time.perf_counter()
    censored: dict[str, list[float]] = {t: [] for t in rates}  # quiet requests that never finished
    noisy_cancelled = 0
    for tenant, t, t_sub in tasks:
        if t.done():
            continue
        if tenant == NOISY:
            noisy_cancelled += 1
        else:
            censored[tenant].append(t_cancel - t_sub)
    for _, t, _ in tasks:
        t.cancel()
    await asyncio.gather(*(t for _, t, _ in tasks), return_exceptions=True)
    await asyncio.to_thread(engine.drain, 60)
    return {"latencies": lat, "censored": censored, "offered_s": offered_s, "noisy_cancelled": noisy_cancelled,
            "wall_s": time.perf_counter() - t0}


def summarize(res: dict, quiet: list[str]) -> dict:
    """Quiet percentiles over finished AND censored requests (a censored wait is a lower bound,
    so with any censored request the percentiles are lower bounds too)."""
    done = [x for t in quiet for x in res["latencies"][t]]
    cens = [x for t in quiet for x in res["censored"].get(t, [])]
    noisy = res["latencies"].get(NOISY, [])
    return {
        "quiet_n": len(done) + len(cens),
        "quiet_finished": len(done),
        "quiet_cancelled": len(cens),  # censored: never finished within the wait
        "quiet_censored_waits_s": cens,
        "quiet_p50_s": pct(done + cens, 0.5),
        "quiet_p90_s": pct(done + cens, 0.9),
        "quiet_p50_finished_only_s": pct(done, 0.5),
        "noisy_n": len(noisy),
        "noisy_p50_s": pct(noisy, 0.5),
        "noisy_cancelled": res["noisy_cancelled"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="arrivals per phase and repetition (default 10)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions of idle + loaded, interleaved (default 2)")
    ap.add_argument("--quiet", type=int, default=4, help="quiet tenants (default 4)")
    ap.add_argument("--ratio", type=float, default=10.0, help="noisy rate / one quiet tenant's rate (default 10)")
    ap.add_argument("--overload", type=float, default=1.2,
                    help="total offered load loaded / engine capacity (default 1.2: the noisy tenant saturates)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--scheduler", default="both", choices=["fair", "fifo", "both"])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="seconds the quiet tenants' last requests get to finish after the arrivals stop; any "
                         "still running then is counted as cancelled (censored) and fails the target (default 120)")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    args = ap.parse_args(argv)
    quiet_libraries()

    import torch  # noqa: F401  (after quiet_libraries)

    from serve_app.config import EngineConfig
    from serve_app.demo import build_demo_assets
    from serve_app.engine.engine import LoRAEngine
    from serve_app.engine.scheduler import FairQueue
    from serve_app.engine.sampling import SamplingParams

    assets = build_demo_assets()
    tenants = [NOISY] + [f"tenant-{i}" for i in range(1, args.quiet + 1)]
    engine = LoRAEngine(EngineConfig(model=str(assets.base), max_num_seqs=args.max_num_seqs,
                                     torch_threads=args.threads, device=args.device))
    for t in tenants:
        engine.load_adapter(t, str(assets.adapter_path(t)))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    env = environment()
    print(f"fairness_bench: {env['platform']}, torch {env['torch']}, {engine.device}, threads {env['torch_threads']}, "
          f"load {loadavg()}", flush=True)

    # Capacity: full batches of the request shape, mixed adapters.
    rng = random.Random(args.seed)
    batch = [([rng.randrange(4, engine.vocab_size) for _ in range(PROMPT_LEN)], params, tenants[i % len(tenants)])
             for i in range(args.max_num_seqs * 2)]
    engine.generate_batch(batch[: args.max_num_seqs])  # warm-up
    t0 = time.perf_counter()
    engine.generate_batch(batch)
    capacity = len(batch) / (time.perf_counter() - t0)
    q_rate = args.overload * capacity / (args.ratio + args.quiet)
    print(f"capacity {capacity:.1f} req/s (batch {args.max_num_seqs}, {PROMPT_LEN}+{NEW_TOKENS} tokens); "
          f"quiet tenants {args.quiet} x {q_rate:.2f} req/s, noisy {args.ratio:g}x = {args.ratio * q_rate:.2f} req/s "
          f"(offered {args.overload:g}x capacity when loaded)", flush=True)

    quiet = tenants[1:]
    results: dict = {"environment": env, "capacity_rps": capacity, "quiet_rate_rps": q_rate,
                     "noisy_rate_rps": args.ratio * q_rate, "args": vars(args), "schedulers": {}}
    meter = CpuMeter()
    schedulers = ["fair", "fifo"] if args.scheduler == "both" else [args.scheduler]
    for sched in schedulers:
        with engine._cv:  # idle here: swapping the waiting queue's type is safe
            assert not engine.scheduler.waiting
            engine.scheduler.waiting = FairQueue() if sched == "fair" else _Fifo()
        row = {}
        pooled: dict[str, dict] = {
            phase: {"latencies": collections.defaultdict(list), "censored": collections.defaultdict(list),
                    "noisy_cancelled": 0}
            for phase in ("idle", "loaded")
        }
        others_max = {"idle": 0.0, "loaded": 0.0}
        for rep in range(args.reps):  # phases interleaved, so drift on a shared machine hits both
            for phase, rates in (("idle", {t: q_rate for t in quiet}),
                                 ("loaded", {NOISY: args.ratio * q_rate, **{t: q_rate for t in quiet}})):
                a = meter.snap()
                res = asyncio.run(run_phase(engine, params, args.seconds, rates, args.seed + rep, args.quiet_wait))
                others = meter.others_share(a, meter.snap())
                others_max[phase] = max(others_max[phase], others or 0.0)
                for t, xs in res["latencies"].items():
                    pooled[phase]["latencies"][t] += xs
                for t, xs in res["censored"].items():
                    pooled[phase]["censored"][t] += xs
                pooled[phase]["noisy_cancelled"] += res["noisy_cancelled"]
                s = summarize(res, quiet)
                print(f"  {sched:4s} rep {rep + 1} {phase:6s}: quiet p50 {fmt_ms(s['quiet_p50_s'])} ms  p90 "
                      f"{fmt_ms(s['quiet_p90_s'])} ms  (n={s['quiet_n']}, {s['quiet_cancelled']} quiet CANCELLED "
                      f"unfinished, counted as censored); noisy n={s['noisy_n']}, noisy backlog stopped "
                      f"{s['noisy_cancelled']}; others' CPU {'n/a' if others is None else f'{others:.0%}'}",
                      flush=True)
        for phase in ("idle", "loaded"):
            row[phase] = {**summarize(pooled[phase], quiet), "others_cpu_max": others_max[phase]}
            if others_max[phase] > 0.10:
                print(f"  WARNING: other processes took up to {others_max[phase]:.0%} of the CPU during the {phase} "
                      "phase; re-run on an idle machine for a clean figure", flush=True)
        row["ratio_p50"] = _ratio(row["loaded"]["quiet_p50_s"], row["idle"]["quiet_p50_s"])
        row["ratio_p90"] = _ratio(row["loaded"]["quiet_p90_s"], row["idle"]["quiet_p90_s"])
        cancelled = row["idle"]["quiet_cancelled"] + row["loaded"]["quiet_cancelled"]
        if cancelled:
            verdict = (f"FAILS ({cancelled} quiet requests never finished within {args.quiet_wait:g}s: censored, "
                       "the ratios are lower bounds)")
        elif row["ratio_p50"] is None:
            verdict = "n/a (no quiet request)"
        else:
            verdict = "meets" if row["ratio_p50"] <= TARGET else "MISSES"
        row["verdict"] = verdict.split()[0]
        results["schedulers"][sched] = row
        print(f"  {sched}: quiet p50 {fmt_ms(row['idle']['quiet_p50_s'])} ms idle, "
              f"{fmt_ms(row['loaded']['quiet_p50_s'])} ms loaded = {_fmt_x(row['ratio_p50'])} "
              f"(p90 {_fmt_x(row['ratio_p90'])}; quiet cancelled idle/loaded {row['idle']['quiet_cancelled']}/"
              f"{row['loaded']['quiet_cancelled']}) -> {verdict} the <= {TARGET:g}x target", flush=True)
    engine.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
