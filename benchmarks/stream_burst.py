"""Streaming vs non-streaming over HTTP, side by side: 64 completions at once, 128 in / 64 out.

The quick check behind the streaming work (benchmarks/README.md, "stream_burst"): the same 64
requests (8 adapters round-robin, greedy, ``ignore_eos``) sent at once, streamed then
non-streamed, alternating for three rounds each (after one untimed warm-up of each), against one
app in one run; medians. Prints tok/s per round, the SSE chunks each
streamed request received (one per token before the channel and the chunk budget), and the
ratio streaming / non-streaming. Every streamed text must equal the non-streamed text of the
same request; otherwise the row is INVALID.

    python -m benchmarks.stream_burst
    python -m benchmarks.stream_burst --app-arg torch_threads=1
    python -m benchmarks.stream_burst --direct-ingress      # Ray's RAY_SERVE_ENABLE_DIRECT_INGRESS: no proxy
    python -m benchmarks.stream_burst --variant serve_throughput_mode=false --variant serve_throughput_mode=true

Each ``--variant`` (app args ``key=value,key=value`` on top of ``--app-arg``) is served in turn
by its own Ray in the same run; the summary prints each one's figures and its ratio to the first.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import argparse
import asyncio
import json
import statistics
import time

from benchmarks.engine_bench import SEED, make_prompts, quiet_libraries
from benchmarks.http_bench import client
from benchmarks.stream_profile import demo_app_args, served_demo_app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--app-arg", action="append", default=[], help="extra build_app argument key=value (JSON value)")
    ap.add_argument("--direct-ingress", action="store_true")
    ap.add_argument("--variant", action="append", default=[],
                    help="app args key=value[,key=value] served in turn in this run (default: one, --app-arg only)")
    args = ap.parse_args()
    quiet_libraries()

    from transformers import AutoConfig

    from serve_app.demo import build_demo_assets

    assets = build_demo_assets()
    ids = list(assets.adapter_ids)
    vocab = AutoConfig.from_pretrained(str(assets.base)).vocab_size
    n, new = args.requests, args.new_tokens
    prompts = make_prompts(n, args.prompt_len, vocab, SEED)
    variants = [demo_app_args(args.app_arg + [kv for kv in v.split(",") if kv]) for v in args.variant or [""]]

    def body(k: int, stream: bool) -> dict:
        return {"model": ids[k % len(ids)], "prompt": prompts[k], "max_tokens": new, "temperature": 0,
                "ignore_eos": True, "stream": stream}

    async def streamed(c, url, k):
        chunks, parts = 0, []
        async with c.stream("POST", url + "/v1/completions", json=body(k, True)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    obj = json.loads(line[6:])
                    if obj.get("choices"):
                        chunks += 1
                        parts.append(obj["choices"][0]["text"])
        return chunks, "".join(parts)

    async def plain(c, url, k):
        r = await c.post(url + "/v1/completions", json=body(k, False))
        return r.json()["choices"][0]["text"]

    async def timed(coro_of):
        t = time.perf_counter()
        res = await asyncio.gather(*(coro_of(k) for k in range(n)))
        return n * new / (time.perf_counter() - t), res

    async def phase(url):
        async with client() as c:
            await timed(lambda k: streamed(c, url, k))  # warm-up: adapters resident, channels open
            await timed(lambda k: plain(c, url, k))
            rounds, plain_rounds = [], []
            for _ in range(args.rounds):
                rounds.append(await timed(lambda k: streamed(c, url, k)))
                plain_rounds.append(await timed(lambda k: plain(c, url, k)))
            return rounds, plain_rounds

    def report(app_args, rounds, plain_rounds):
        texts = plain_rounds[0][1]
        print(f"== stream_burst: {n} completions at once, {args.prompt_len} in / {new} out, 8 adapters round-robin"
              f"{', direct ingress' if args.direct_ingress else ''}; app args {app_args}")
        bad = 0
        for i, (tps, res) in enumerate(rounds):
            chunks = [c for c, _ in res]
            bad += sum(t != want for (_, t), want in zip(res, texts))
            print(f"  streaming round {i}: {tps:,.0f} tok/s; SSE chunks per request mean {statistics.mean(chunks):.1f}, "
                  f"max {max(chunks)}")
        bad += sum(t != want for _, res in plain_rounds for t, want in zip(res, texts))
        print("  non-streaming rounds: " + ", ".join(f"{tps:,.0f}" for tps, _ in plain_rounds) + " tok/s")
        stream_tps = statistics.median(t for t, _ in rounds)
        plain_tps = statistics.median(t for t, _ in plain_rounds)
        print(f"  median: streaming {stream_tps:,.0f} tok/s, non-streaming {plain_tps:,.0f} tok/s")
        verdict = "INVALID (a text differs between rounds or modes)" if bad else f"{stream_tps / plain_tps:.2f}x"
        print(f"  streaming / non-streaming: {verdict}; texts equal: {n * 2 * len(rounds) - bad}/{n * 2 * len(rounds)}",
              flush=True)
        return stream_tps, plain_tps, bad

    summary = []
    for app_args in variants:
        with served_demo_app(app_args, args.direct_ingress) as url:
            rounds, plain_rounds = asyncio.run(phase(url))
        summary.append((app_args, *report(app_args, rounds, plain_rounds)))
    if len(summary) > 1:
        base = summary[0]
        print("\n== summary (one run; ratio = this variant / the first)")
        for app_args, stream_tps, plain_tps, bad in summary:
            extra = {k: v for k, v in app_args.items() if k not in variants[0] or variants[0][k] != v} or "first"
            print(f"  {str(extra):<40} streaming {stream_tps:>6,.0f} tok/s ({stream_tps / base[1]:.2f}x)  "
                  f"non-streaming {plain_tps:>6,.0f} tok/s ({plain_tps / base[2]:.2f}x)  stream/non-stream "
                  f"{'INVALID' if bad else f'{stream_tps / plain_tps:.2f}x'}")



if __name__ == "__main__":
    main()
