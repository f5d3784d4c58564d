"""How long one large completions response holds the router's event loop (issue 25).

The router is built by hand around a fake LoRA handle (as tests/unit/test_edge_caps.py does) that
answers every prompt at once with ``echo`` + ``logprobs`` data of a given size, so what is timed is
only the router: building the response, and encoding it to JSON. A ticker task in the same loop
records the longest gap between its 1 ms ticks while one request is answered through the real
ASGI app (httpx's ASGI transport, no sockets).

    python benchmarks/response_stall.py --prompts 64 --prompt-tokens 2000 --max-tokens 16 --logprobs 20

Prints the response size, its wall time, the loop's longest stall, and the CPU time the event
loop's thread spent meanwhile (request parsing, the ticker, and whatever of the response was built
on the loop: the figure that does not depend on how loaded the machine is). Run it on the old
code with ``PYTHONPATH=<old checkout>``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import types


def build(prompts: int, prompt_tokens: int, max_tokens: int, logprobs: int, limits: dict | None):
    from ray import serve

    from serve_app import metrics
    from serve_app.api.wire import RequestOutput, TokenLogprob
    from serve_app.router import ingress
    from serve_app.router.auth import Authenticator
    from serve_app.router.limits import LimitsConfig, TenantLimiter
    from serve_app.router.streams import ChannelHub

    class _Metric:
        def inc(self, *a, **k):
            pass

        observe = set = inc

    for name in ("REQUESTS", "ROUTER_PATH", "LATENCY", "TTFT", "GENERATED_TOKENS"):
        setattr(metrics, name, _Metric())

    def entry(i: int, first: bool = False) -> TokenLogprob:
        top = None if first else [(f"tok{(i + j) % 997}", (i + j) % 997, -1.25 - j * 0.5) for j in range(logprobs)]
        return TokenLogprob(f"tok{i % 997}", i % 997, None if first else -2.5, top)

    prompt_lp = [entry(0, True), *(entry(i) for i in range(1, prompt_tokens))]
    out_lp = [entry(i) for i in range(max_tokens)]
    out = RequestOutput("r", "x" * max_tokens, list(range(max_tokens)), True, "length",
                        prompt_tokens=prompt_tokens, completion_tokens=max_tokens, logprobs=out_lp,
                        prompt_text="p" * prompt_tokens, prompt_logprobs=prompt_lp)

    class FakeHandle:
        def options(self, **_):
            return self

        @property
        def generate(self):
            async def remote(req):
                return out

            return types.SimpleNamespace(remote=remote)

    class FakeAdmin:
        def resolve(self, name):
            return f"{name}@v1"

        def model_ids(self):
            return []

    router = object.__new__(ingress.Router.__mro__[1])
    router.auth = Authenticator(enabled=False)
    cfg = LimitsConfig(**(limits or {}))
    router.limiter = TenantLimiter.from_config(cfg, max_num_seqs=max(64, prompts))
    router.lora, router.merged, router.admin = FakeHandle(), None, FakeAdmin()
    router.base_model_name, router.default_max_tokens, router.promoter = "base", 16, None
    router.streams, router._handles = ChannelHub(), {}
    ingress._EDGE.update(auth=router.auth, max_body_bytes=cfg.max_body_bytes)
    serve.get_replica_context = lambda: types.SimpleNamespace(servable_object=router)
    body = {"model": "base", "prompt": [[5] * prompt_tokens] * prompts, "max_tokens": max_tokens, "echo": True,
            "logprobs": logprobs}
    return ingress.app, body


async def measure(app, body) -> dict:
    import httpx

    gaps = []
    stop = False

    async def ticker():
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    t = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=600) as c:
        await c.get("/health")  # imports and first-call costs out of the way
        gaps.clear()
        cpu0, t0 = time.thread_time(), time.perf_counter()
        r = await c.post("/v1/completions", json=body)
        wall, loop_cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    stop = True
    await t
    return {"status": r.status_code, "bytes": len(r.content), "wall_s": wall, "max_stall_s": max(gaps),
            "loop_cpu_s": loop_cpu, "detail": r.json()["error"]["message"] if r.status_code != 200 else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--logprobs", type=int, default=20)
    ap.add_argument("--max-logprob-entries", type=int, default=None,
                    help="limits.max_logprob_entries (where the router has it); default: the router's default")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    limits = None if a.max_logprob_entries is None else {"max_logprob_entries": a.max_logprob_entries}
    app, body = build(a.prompts, a.prompt_tokens, a.max_tokens, a.logprobs, limits)
    import serve_app.router.ingress as ingress

    getattr(ingress, "freeze_startup_objects", lambda: None)()  # what Router.__init__ does, where it does
    for _ in range(a.repeat):
        res = asyncio.run(measure(app, body))
        print(f"prompts={a.prompts} prompt_tokens={a.prompt_tokens} max_tokens={a.max_tokens} logprobs={a.logprobs}: "
              f"status {res['status']}, {res['bytes'] / 1e6:.1f} MB in {res['wall_s']:.2f} s, "
              f"loop's longest stall {res['max_stall_s'] * 1000:.0f} ms, loop thread's CPU {res['loop_cpu_s']:.2f} s "
              f"{res['detail'][:160]}")


if __name__ == "__main__":
    main()
