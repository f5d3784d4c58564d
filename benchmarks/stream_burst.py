"""Streaming vs non-streaming over HTTP, side by side: 64 completions at once, 128 in / 64 out.

The quick check behind the streaming work (benchmarks/README.md, "stream_burst"): the same 64
requests (8 adapters round-robin, greedy, ``ignore_eos``) sent at once, streamed, three rounds,
then once non-streamed, against one app in one run. Prints tok/s per round, the SSE chunks each
streamed request received (one per token before the channel and the chunk budget), and the
ratio streaming / non-streaming. Every streamed text must equal the non-streamed text of the
same request; otherwise the row is INVALID.

    python -m benchmarks.stream_burst
    python -m benchmarks.stream_burst --app-arg torch_threads=1
    python -m benchmarks.stream_burst --direct-ingress      # Ray's RAY_SERVE_ENABLE_DIRECT_INGRESS: no proxy
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
from benchmarks.http_bench import APP_NAME, client, start_ray, start_serve, stop_ray, wait_http
from benchmarks.stream_profile import demo_app_args, direct_ingress_url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--app-arg", action="append", default=[], help="extra build_app argument key=value (JSON value)")
    ap.add_argument("--direct-ingress", action="store_true")
    args = ap.parse_args()
    quiet_libraries()

    from transformers import AutoConfig

    from serve_app.demo import build_demo_assets

    assets = build_demo_assets()
    ids = list(assets.adapter_ids)
    vocab = AutoConfig.from_pretrained(str(assets.base)).vocab_size
    n, new = args.requests, args.new_tokens
    prompts = make_prompts(n, args.prompt_len, vocab, SEED)
    app_args = demo_app_args(args.app_arg)
    if args.direct_ingress:
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"

    from ray import serve

    from serve_app.app import build_app

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

    async def phase(url):
        async with client() as c:
            rounds = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                res = await asyncio.gather(*(streamed(c, url, k) for k in range(n)))
                rounds.append((n * new / (time.perf_counter() - t), res))
            t = time.perf_counter()
            plain = await asyncio.gather(*(c.post(url + "/v1/completions", json=body(k, False)) for k in range(n)))
            plain_tps = n * new / (time.perf_counter() - t)
            return rounds, plain_tps, [r.json()["choices"][0]["text"] for r in plain]

    start_ray(2)
    try:
        _, url = start_serve()
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
        if args.direct_ingress:
            url = direct_ingress_url()
        wait_http(url + "/health")
        rounds, plain_tps, texts = asyncio.run(phase(url))
    finally:
        stop_ray()

    print(f"== stream_burst: {n} completions at once, {args.prompt_len} in / {new} out, 8 adapters round-robin"
          f"{', direct ingress' if args.direct_ingress else ''}; app args {app_args}")
    bad = 0
    for i, (tps, res) in enumerate(rounds):
        chunks = [c for c, _ in res]
        bad += sum(t != want for (_, t), want in zip(res, texts))
        print(f"  streaming round {i}: {tps:,.0f} tok/s; SSE chunks per request mean {statistics.mean(chunks):.1f}, "
              f"max {max(chunks)}")
    stream_tps = statistics.median(t for t, _ in rounds)
    print(f"  non-streaming:     {plain_tps:,.0f} tok/s")
    verdict = "INVALID (streamed text != non-streamed text)" if bad else f"{stream_tps / plain_tps:.2f}x"
    print(f"  streaming (median round) / non-streaming: {verdict}; texts equal: {n * len(rounds) - bad}/{n * len(rounds)}")


if __name__ == "__main__":
    main()
