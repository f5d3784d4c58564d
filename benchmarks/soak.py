"""Soak: Zipf traffic over many tenants through the deployed app for N minutes; memory, leaks, errors.

Issue 7's soak: 10 minutes of Zipf traffic over 50 tenants, LRU 8 per replica, a quarter
streaming; replica RSS sampled every 10 s grows less than 5% after warm-up; adapter memory
holds nothing but the resident adapters when idle (no leaked slots); zero errors; outputs
spot-checked against references.

What runs: Ray (2 CPUs) + Serve on a free port on 127.0.0.1, ``build_app`` with the W1 demo base
and ``--tenants`` demo adapters (a private copy of the folder, so nothing here touches the
shared demo cache), ``max_adapters_per_replica = --lru``. ``--concurrency`` closed-loop clients
send, for ``--minutes``:

* tenant ~ Zipf(``--zipf``) over the tenants (so the LRU churns: loads and evictions all along),
  1 in 20 requests to the base model;
* a quarter streamed (``--stream-share``), a fifth chat, the rest completions; 4-24 new tokens;
* 4 in 5 greedy, 1 in 5 sampled with a seed from a small pool (seeded requests repeat too).

Checks, each printed with its figure and PASS / FAIL:

* **errors**: every non-200, stream without ``[DONE]``, in-band error event or transport error;
* **consistency**: every repeat of the same (tenant, prompt, max_tokens, sampling, seed) gave
  the same text (greedy and seeded alike), whatever the batch and the LRU did in between;
* **references**: the most frequent greedy completions, per tenant, equal plain PEFT's output on
  the same files (computed after the traffic);
* **RSS**: the LoRA replica's and the router's resident set size, sampled every 10 s; growth from
  the first samples after warm-up (the first 20% of the run, at least 30 s) to the last ones
  must stay under 5%;
* **no leaked slots**: once idle, nothing running or waiting, no retired-but-pinned adapter, at
  most ``--lru`` resident, and the pool's rows in use per projection equal the sum of the
  resident adapters' ranks exactly;
* **replica restarts**: none (the replica's PID never changes).

    python -m benchmarks.soak --minutes 10            # the issue's run
    python -m benchmarks.soak --minutes 2 --json soak.json
    python -m benchmarks.soak --quick                 # CI smoke run: 10 s, 8 tenants, LRU 2; RSS not judged
"""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "disabled"  # before any ray import

import argparse
import asyncio
import json
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

APP = "soak"
BASE = "base"
PROMPTS = [
    "The quick brown fox jumps over",
    "tenant adapter token batch queue",
    "Hello, world! 123",
    "once upon a time in a small village",
    "the river flows to the sea and",
    "café 日本語 über the river",
    "a b c d e f g",
    "In the beginning there was",
]
SEEDS = [11, 22, 33]
RSS_GROWTH_LIMIT = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def replica_pids(app: str) -> dict[str, int]:
    """{deployment name: PID} of the app's live replicas (named actors in Serve's namespace)."""
    import ray

    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"]
        if name.startswith(f"SERVE_REPLICA::{app}#"):
            deployment = name.split("#")[1]
            try:
                actor = ray.get_actor(name, namespace=a["namespace"])
                out[deployment] = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
            except Exception:  # noqa: BLE001 -- going away
                pass
    return out


def lora_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("LoRADeployment", app_name=APP).stats.remote().result(timeout_s=60)


def adapter_ranks(adapters_dir: Path) -> dict[str, tuple[int, list[str]]]:
    out = {}
    for d in adapters_dir.iterdir():
        cfg = d / "adapter_config.json"
        if cfg.is_file():
            c = json.loads(cfg.read_text())
            out[d.name] = (int(c["r"]), list(c["target_modules"]))
    return out


class Traffic:
    def __init__(self, tenants: list[str], zipf: float, stream_share: float):
        self.tenants = tenants
        self.weights = [1.0 / (k + 1) ** zipf for k in range(len(tenants))]
        self.stream_share = stream_share
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.requests = Counter()
        self.outputs: dict[tuple, str] = {}
        self.mismatches: list[tuple] = []
        self.repeats = 0
        self.by_tenant = Counter()
        self.key_counts = Counter()

    def pick(self, rng: random.Random) -> tuple[tuple, str, dict, bool]:
        model = BASE if rng.random() < 0.05 else rng.choices(self.tenants, weights=self.weights)[0]
        stream = rng.random() < self.stream_share
        chat = rng.random() < 0.2
        pi = rng.randrange(len(PROMPTS))
        n = rng.randint(4, 24)
        seed = rng.choice(SEEDS) if rng.random() < 0.2 else None
        body = {"model": model, "max_tokens": n, "ignore_eos": True}
        body.update({"temperature": 0.8, "seed": seed} if seed is not None else {"temperature": 0})
        if chat:
            body["messages"] = [{"role": "user", "content": PROMPTS[pi]}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = PROMPTS[pi]
            path = "/v1/completions"
        key = (model, chat, pi, n, seed)
        return key, path, body, stream

    def record(self, key: tuple, text: str) -> None:
        self.key_counts[key] += 1
        have = self.outputs.get(key)
        if have is None:
            self.outputs[key] = text
        else:
            self.repeats += 1
            if have != text:
                self.mismatches.append((key, have, text))


async def one_request(client, traffic: Traffic, rng: random.Random) -> None:
    key, path, body, stream = traffic.pick(rng)
    chat = path.endswith("chat/completions")
    traffic.requests["stream" if stream else "plain"] += 1
    traffic.by_tenant[key[0]] += 1
    t0 = time.perf_counter()
    try:
        if stream:
            text, done = [], False
            async with client.stream("POST", path, json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    traffic.errors.append(f"{r.status_code} {(await r.aread())[:200]!r}")
                    return
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        continue
                    p = json.loads(data)
                    if "error" in p:
                        traffic.errors.append(f"in-band {p['error']}")
                        return
                    for c in p["choices"]:
                        text.append((c["delta"].get("content") or "") if chat else c["text"])
            if not done:
                traffic.errors.append("stream ended without [DONE]")
                return
            out = "".join(text)
        else:
            r = await client.post(path, json=body)
            if r.status_code != 200:
                traffic.errors.append(f"{r.status_code} {r.text[:200]}")
                return
            c = r.json()["choices"][0]
            out = c["message"]["content"] if chat else c["text"]
    except Exception as e:  # noqa: BLE001 -- transport errors count as errors
        traffic.errors.append(f"{type(e).__name__}: {e}"[:200])
        return
    traffic.latencies.append(time.perf_counter() - t0)
    traffic.record(key, out)


async def drive(url: str, traffic: Traffic, seconds: float, concurrency: int, seed: int,
                samples: list, sample_every: float) -> None:
    import httpx

    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(i: int, client):
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < stop_at:
            await one_request(client, traffic, rng)

    async def sampler():
        t0 = time.monotonic()
        while True:
            pids = await asyncio.to_thread(replica_pids, APP)
            stats = await asyncio.to_thread(lora_stats)
            samples.append({
                "t": time.monotonic() - t0,
                "pids": pids,
                "rss": {d: rss_bytes(p) for d, p in pids.items()},
                "requests": sum(traffic.requests.values()),
                "errors": len(traffic.errors),
                "resident": len(stats["resident_adapters"]),
                "bytes_used": stats["lora"]["bytes_used"],
                "loads": stats["adapter_loads"],
                "evictions": stats["adapter_evictions"],
            })
            s = samples[-1]
            rss = ", ".join(f"{d} {v / 2**20:.0f} MiB" for d, v in sorted(s["rss"].items()) if v)
            print(f"  t={s['t']:5.0f}s  requests {s['requests']:6d}  errors {s['errors']}  resident {s['resident']}  "
                  f"loads {s['loads']}  evictions {s['evictions']}  RSS {rss}", flush=True)
            if time.monotonic() >= stop_at:
                return
            await asyncio.sleep(max(0.0, min(sample_every, stop_at - time.monotonic() + 0.5)))

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0), limits=limits) as client:
        await asyncio.gather(sampler(), *(worker(i, client) for i in range(concurrency)))


def peft_references(base: Path, adapters: Path, keys: list[tuple]) -> dict[tuple, str]:
    """Plain PEFT greedy text for completion keys (model, False, prompt index, n, None)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    out = {}
    by_model = defaultdict(list)
    for k in keys:
        by_model[k[0]].append(k)
    for model, ks in by_model.items():
        m = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
        if model != BASE:
            m = PeftModel.from_pretrained(m, str(adapters / model)).eval()
        with torch.inference_mode():
            for k in ks:
                ids = tok(PROMPTS[k[2]])["input_ids"]
                o = m(input_ids=torch.tensor([ids]), use_cache=True)
                toks = []
                for _ in range(k[3]):
                    toks.append(int(o.logits[0, -1].argmax()))
                    o = m(input_ids=torch.tensor([[toks[-1]]]), past_key_values=o.past_key_values, use_cache=True)
                out[k] = tok.decode(toks, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return out


def rss_growth(samples: list, deployment: str, warmup_s: float) -> tuple[float | None, int, int]:
    vals = [(s["t"], s["rss"].get(deployment)) for s in samples if s["rss"].get(deployment)]
    after = [v for t, v in vals if t >= warmup_s]
    if len(after) < 2:
        return None, 0, 0
    k = min(3, max(1, len(after) // 3))
    first, last = statistics.median(after[:k]), statistics.median(after[-k:])
    return (last - first) / first, int(first), int(last)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--tenants", type=int, default=50)
    ap.add_argument("--lru", type=int, default=8)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--stream-share", type=float, default=0.25)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--lora-cpus", type=float, default=1.0)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--references", type=int, default=12, help="greedy completions checked against PEFT")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (CI): 10 s, 8 tenants (the W1 demo cache), LRU 2, 4 clients, 4 references; the RSS growth is "
                         "printed but not judged (the run is shorter than the 30 s warm-up)")
    args = ap.parse_args(argv)
    if args.quick:
        args.minutes, args.tenants, args.lru, args.concurrency = 1 / 6, 8, 2, 4
        args.references, args.sample_every = 4, 2.0

    from benchmarks.engine_bench import environment, loadavg, quiet_libraries

    quiet_libraries()
    import httpx
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.demo import build_demo_assets

    assets = build_demo_assets(num_adapters=args.tenants)
    work = Path(tempfile.mkdtemp(prefix="serve-app-soak-"))
    adapters = work / "adapters"
    shutil.copytree(assets.adapters_dir, adapters)
    ranks = adapter_ranks(adapters)
    seconds = args.minutes * 60
    warmup_s = max(30.0, 0.2 * seconds)
    print(f"soak: {args.minutes:g} min, {args.tenants} tenants Zipf({args.zipf}), LRU {args.lru}, "
          f"{args.stream_share:.0%} streamed, {args.concurrency} clients; load {loadavg()}", flush=True)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(Path.cwd())}})
    results: dict = {"args": vars(args), "environment": environment()}
    checks: dict[str, tuple[bool, str]] = {}
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({
            "base_model": str(assets.base), "adapters": str(adapters), "base_model_name": BASE,
            "max_adapters_per_replica": args.lru, "lora_num_cpus": args.lora_cpus, "router_num_cpus": 0.25,
            "torch_threads": args.torch_threads,
        }), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the app did not come up")
            time.sleep(0.5)

        traffic = Traffic([f"tenant-{i}" for i in range(args.tenants)], args.zipf, args.stream_share)
        samples: list = []
        t0 = time.monotonic()
        asyncio.run(drive(url, traffic, seconds, args.concurrency, args.seed, samples, args.sample_every))
        wall = time.monotonic() - t0

        # Idle: let in-flight work settle, then look at the pool.
        time.sleep(3)
        idle = lora_stats()
        resident = [r.split("@")[0] for r in idle["resident_adapters"]]
        expected_rows: Counter = Counter()
        for a in resident:
            r, targets = ranks[a]
            for k in targets:
                expected_rows[k] += r
        rows_used = {k: v for k, v in idle["lora"]["rows_used"].items() if v}

        # The most repeated greedy completions, one per model first, then the next most repeated.
        refs_keys = [k for k, _ in traffic.key_counts.most_common() if not k[1] and k[4] is None]
        picked, seen_models = [], set()
        for k in refs_keys:
            if k[0] not in seen_models and len(picked) < args.references:
                picked.append(k)
                seen_models.add(k[0])
        picked += [k for k in refs_keys if k not in picked][: max(0, args.references - len(picked))]
        refs = peft_references(assets.base, adapters, picked)
        ref_wrong = [(k, refs[k], traffic.outputs[k]) for k in picked if refs[k] != traffic.outputs[k]]

        n_req = sum(traffic.requests.values())
        lat = sorted(traffic.latencies)
        pid_sets = {d: {s["pids"].get(d) for s in samples if s["pids"].get(d)} for d in ("LoRADeployment", "Router")}
        checks["errors"] = (not traffic.errors, f"{len(traffic.errors)} of {n_req}"
                            + (f", e.g. {traffic.errors[:3]}" if traffic.errors else ""))
        checks["consistency"] = (not traffic.mismatches,
                                 f"{traffic.repeats} repeats of {len(traffic.outputs)} distinct requests, "
                                 f"{len(traffic.mismatches)} differ")
        checks["references"] = (not ref_wrong and len(picked) > 0,
                                 f"{len(picked) - len(ref_wrong)}/{len(picked)} greedy completions over "
                                 f"{len({k[0] for k in picked})} models equal PEFT's")
        for d in ("LoRADeployment", "Router"):
            g, first, last = rss_growth(samples, d, warmup_s)
            ok = g is not None and g < RSS_GROWTH_LIMIT
            checks[f"rss {d}"] = (ok, "not enough samples after warm-up" if g is None else
                                  f"{first / 2**20:.0f} -> {last / 2**20:.0f} MiB after warm-up ({g:+.1%})")
            if args.quick:
                checks[f"rss {d}"] = (True, f"not judged (--quick: shorter than the warm-up); {checks[f'rss {d}'][1]}")
        leak_ok = (idle["running"] == 0 and idle["waiting"] == 0 and idle["lora"]["retired_pinned"] == 0
                   and len(resident) <= args.lru and rows_used == dict(expected_rows))
        checks["no leaked slots"] = (leak_ok, f"idle: running {idle['running']}, waiting {idle['waiting']}, "
                                     f"retired pinned {idle['lora']['retired_pinned']}, resident {len(resident)} "
                                     f"(LRU {args.lru}), rows in use {rows_used} vs resident ranks "
                                     f"{dict(expected_rows)}, {idle['lora']['bytes_used'] / 2**20:.1f} MiB")
        checks["replica restarts"] = (all(len(v) == 1 for v in pid_sets.values()),
                                      f"PIDs seen {({d: sorted(v) for d, v in pid_sets.items()})}")
        results.update({
            "wall_s": wall, "requests": n_req, "requests_per_s": n_req / wall, "streamed": traffic.requests["stream"],
            "latency_p50_s": lat[len(lat) // 2] if lat else None,
            "latency_p99_s": lat[int(len(lat) * 0.99)] if lat else None,
            "loads": idle["adapter_loads"], "evictions": idle["adapter_evictions"],
            "tenants_seen": len(traffic.by_tenant), "samples": samples, "idle_stats": idle,
            "checks": {k: {"ok": ok, "detail": d} for k, (ok, d) in checks.items()},
            "loadavg_end": loadavg(),
        })
        print(f"\n{n_req} requests in {wall:.0f}s ({n_req / wall:.1f}/s, {traffic.requests['stream']} streamed) over "
              f"{len(traffic.by_tenant)} models; p50 {results['latency_p50_s'] * 1e3:.0f} ms, p99 "
              f"{results['latency_p99_s'] * 1e3:.0f} ms; adapter loads {idle['adapter_loads']}, evictions "
              f"{idle['adapter_evictions']}; load {loadavg()}")
        for name, (ok, detail) in checks.items():
            print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0 if checks and all(ok for ok, _ in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
