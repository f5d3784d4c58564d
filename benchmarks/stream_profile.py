"""Where the CPU goes per streamed token: py-spy on every Serve process under a streaming load.

Starts the app (Ray with 2 CPUs, Serve on 127.0.0.1, the W1 demo assets), keeps N streaming
completions in flight (round-robin over the 8 adapters, ``ignore_eos``), and while the load runs
samples each process with ``py-spy record`` (on-CPU samples only, every thread): the HTTP proxy,
the router replica, the LoRA replica (its event loop and its engine thread apart) and the client
(this process). It prints each process's CPU (cores used), and per process the functions that
take the most CPU, self and inclusive, so a change to the serving path can be judged by where
the time went, not only by the end figure.

    python -m benchmarks.stream_profile                 # 64 streams, 15 s of samples
    python -m benchmarks.stream_profile --no-stream     # the same, non-streaming
    python -m benchmarks.stream_profile --app-arg direct_ingress=true
    python -m benchmarks.stream_profile --quick         # smoke run (CI): 4 streams, 2 s warm-up, 2 s of samples

Needs py-spy (``pip install py-spy``); it reads other processes' memory (run as the same user).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import argparse
import asyncio
import collections
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.engine_bench import SEED, make_prompts, quiet_libraries
from benchmarks.http_bench import APP_NAME, BASE_NAME, client, post_completion, start_ray, start_serve, stop_ray, wait_http

RATE = 100  # py-spy samples per second


def serve_processes() -> dict[str, int]:
    """{role: pid} for the Serve processes of this machine's Ray (started by this script)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    roles = {}
    for line in out.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        if "ray::ProxyActor" in args:
            roles["proxy"] = int(pid)
        elif "ray::ServeReplica" in args and "Router" in args:
            roles["router"] = int(pid)
        elif "ray::ServeReplica" in args and "LoRADeployment" in args:
            roles["lora replica"] = int(pid)
        elif "ray::ServeController" in args:
            roles["controller"] = int(pid)
    return roles


def demo_app_args(overrides: list[str]) -> dict:
    """http_bench's app on the W1 demo assets, with ``key=value`` overrides (JSON values)."""
    app_args = {"base_model": "demo", "lora_num_cpus": 1.0, "router_num_cpus": 0.25, "torch_threads": 2,
                "max_adapters_per_replica": 8, "base_model_name": BASE_NAME}
    for kv in overrides:
        k, _, v = kv.partition("=")
        try:
            app_args[k] = json.loads(v)
        except json.JSONDecodeError:
            app_args[k] = v
    return app_args


@contextlib.contextmanager
def served_demo_app(app_args: dict, direct_ingress: bool = False):
    """A private Ray (2 CPUs) + Serve on 127.0.0.1 running ``build_app(app_args)``; yields the URL
    to send requests to (the router replica's own port with ``direct_ingress``, Ray's
    ``RAY_SERVE_ENABLE_DIRECT_INGRESS``: no proxy). Stops only the Ray this started."""
    from ray import serve

    from serve_app.app import build_app

    if direct_ingress:
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    start_ray(2)
    try:
        _, url = start_serve()
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
        if direct_ingress:
            url = direct_ingress_url()
        wait_http(url + "/health")
        yield url
    finally:
        stop_ray()


def direct_ingress_url(timeout: float = 60.0) -> str:
    """The router replica's own HTTP port (direct ingress allocates one from 30000 up)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for port in range(30000, 30010):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1, trust_env=False).status_code == 200:
                    return f"http://127.0.0.1:{port}"
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise RuntimeError("no direct-ingress port answered /health")


def record(pid: int, seconds: float, path: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(RATE),
         "--format", "raw", "--threads", "--nonblocking", "--output", path],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def summarize(path: str, seconds: float, top: int) -> dict:
    """CPU per thread and top functions from py-spy's collapsed stacks."""
    threads: collections.Counter = collections.Counter()
    self_t: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(n)
            frames = stack.split(";")
            thread = frames[0]
            frames = frames[1:]
            total += n
            threads[re.sub(r"\s*\(0x[0-9a-f]+\)", "", thread).strip('"') or "?"] += n
            names = []
            for fr in frames:
                m = _FRAME.match(fr)
                func, file = (m.group(1), m.group(2)) if m else (fr, "")
                names.append(f"{func} ({os.path.basename(file)})")
            if names:
                self_t[names[-1]] += n
                for name in set(names):
                    incl[name] += n
    cores = total / RATE / seconds
    return {
        "cores": cores,
        "threads": {t: n / RATE / seconds for t, n in threads.most_common(4)},
        "self": [(k, v / total) for k, v in self_t.most_common(top)] if total else [],
        "inclusive": [(k, v / total) for k, v in incl.most_common(top * 3)] if total else [],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=64, help="requests kept in flight")
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds of samples")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-stream", action="store_true", help="profile non-streaming requests instead")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--app-arg", action="append", default=[], help="extra build_app argument key=value (JSON value)")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--direct-ingress", action="store_true",
                    help="RAY_SERVE_ENABLE_DIRECT_INGRESS=1: the router replica serves HTTP itself, no proxy")
    ap.add_argument("--keep", help="keep py-spy's raw stacks in this folder")
    ap.add_argument("--warmup", type=float, default=8.0, help="seconds of load before sampling")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (CI): 4 streams of 16 in / 8 out, 2 s warm-up, 2 s of samples")
    args = ap.parse_args()
    if args.quick:
        args.streams, args.prompt_len, args.new_tokens, args.warmup, args.seconds = 4, 16, 8, 2.0, 2.0
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    quiet_libraries()

    from serve_app.demo import build_demo_assets

    assets = build_demo_assets()
    ids = list(assets.adapter_ids)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(assets.base)).vocab_size
    prompts = make_prompts(256, args.prompt_len, vocab, SEED)
    app_args = demo_app_args(args.app_arg)

    tmp = args.keep or tempfile.mkdtemp(prefix="stream_profile-")
    os.makedirs(tmp, exist_ok=True)
    with served_demo_app(app_args, args.direct_ingress) as url:
        stop = threading.Event()
        done = collections.Counter()
        t_load = [0.0]

        async def load():
            async with client() as c:
                i = 0

                async def worker(w):
                    nonlocal i
                    while not stop.is_set():
                        k = i
                        i += 1
                        r = await post_completion(c, url, ids[k % len(ids)], prompts[k % len(prompts)],
                                                  args.new_tokens, stream=not args.no_stream)
                        if t_load[0]:
                            done["tokens"] += r.completion_tokens
                            done["requests"] += 1
                            done["bad"] += r.status != 200

                await asyncio.gather(*(worker(w) for w in range(args.streams)))

        th = threading.Thread(target=lambda: asyncio.run(load()), daemon=True)
        th.start()
        time.sleep(args.warmup)  # warm-up: adapters loaded, steady state
        procs = {**serve_processes(), "client (this process)": os.getpid()}
        spies = {role: (record(pid, args.seconds, os.path.join(tmp, f"{role.split()[0]}.txt")),
                        os.path.join(tmp, f"{role.split()[0]}.txt")) for role, pid in procs.items()}
        t_load[0] = time.perf_counter()
        for p, _ in spies.values():
            p.wait()
        elapsed = time.perf_counter() - t_load[0]
        tokens, requests, bad = done["tokens"], done["requests"], done["bad"]
        stop.set()
        th.join(timeout=60)

    mode = "non-streaming" if args.no_stream else "streaming"
    print(f"== stream_profile: {args.streams} {mode} completions in flight, {args.prompt_len} in / {args.new_tokens} "
          f"out, 8 adapters round-robin; app args {app_args}")
    print(f"load while sampled: {tokens / elapsed:,.0f} output tok/s, {requests / elapsed:.1f} req/s over {elapsed:.1f}s"
          + (f", {bad} BAD replies" if bad else ""))
    summary = {"tok_s": tokens / elapsed, "mode": mode, "app_args": app_args, "processes": {}}
    for role, (_, path) in spies.items():
        if not os.path.exists(path):
            print(f"\n[{role}] no samples (py-spy failed)")
            continue
        s = summarize(path, args.seconds, args.top)
        summary["processes"][role] = s
        per_tok = s["cores"] / max(tokens / elapsed, 1e-9) * 1e6
        print(f"\n[{role}] {s['cores']:.2f} cores  ({per_tok:,.0f} us CPU per output token)")
        for t, c in s["threads"].items():
            print(f"    thread {t[:60]:<60} {c:.2f} cores")
        print("    self:      " + "; ".join(f"{k} {v:.0%}" for k, v in s["self"][:args.top]))
        ours = [(k, v) for k, v in s["inclusive"] if v >= 0.03][: args.top * 2]
        print("    inclusive: " + "; ".join(f"{k} {v:.0%}" for k, v in ours))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
