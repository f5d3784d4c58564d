"""The `scripts` group: what the READMEs tell users to run, run as they run it (issue 31).

Each test starts one documented command (a cluster script, a benchmark in its quick mode) as a
subprocess in a session of its own, bounded in time, and checks its exit status and the lines its
own check prints (deploy_local: OK; a benchmark's verify step: no INVALID, rows identical ...).
They are slow (Ray, model loads), so:

* they run last (``pytest_collection_modifyitems`` below): the fast suite reports first, and the
  demo caches it builds (the W1 assets, the SmolLM2 tenants) are warm for them;
* every process a command starts must be gone when it ends (the scripts stop only what they
  started; a leftover is killed and fails the test);
* ``-m "not scripts"`` leaves them out; ``-m scripts`` runs only them.

The group's times are printed at the end of the run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_TIMES: list[tuple[str, float, float]] = []  # (test id, wall s, CPU s of the command's processes)
_HZ = os.sysconf("SC_CLK_TCK")


def pytest_collection_modifyitems(session, config, items):
    """Scripts last, in file order; the rest keep their order."""
    scripts = [it for it in items if it.get_closest_marker("scripts")]
    if scripts:
        rest = [it for it in items if not it.get_closest_marker("scripts")]
        items[:] = rest + scripts


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _TIMES:
        return
    tr = terminalreporter
    tr.section("scripts group: wall and CPU time per command (CPU: every process of its session, sampled)")
    for name, wall, cpu in _TIMES:
        tr.write_line(f"{wall:7.1f} s wall {cpu:8.1f} s CPU  {name}")
    tr.write_line(f"{sum(w for _, w, _ in _TIMES):7.1f} s wall {sum(c for _, _, c in _TIMES):8.1f} s CPU  "
                  f"total, {len(_TIMES)} commands")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    bindir = str(Path(sys.executable).parent)  # the venv's ray / serve CLIs, as after `. .venv/bin/activate`
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)  # never an existing cluster
    env.update(extra)
    return env


@dataclass
class Run:
    cmd: str
    rc: int
    output: str
    wall_s: float
    log: Path

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])


def _session_cpu(sid: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of every process in session ``sid``, from /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the command: state ppid pgrp session ... utime(11) stime(12)
            out[int(name)] = (int(fields[11]) + int(fields[12])) / _HZ
    return out


def _session_pids(sid: int) -> list[int]:
    return sorted(_session_cpu(sid))


class _CpuSampler(threading.Thread):
    """The session's CPU time: each process's last sample, every 0.5 s (a process that lives less
    than that may be missed, and the last half second of each is: a lower bound)."""

    def __init__(self, sid: int):
        super().__init__(daemon=True)
        self.sid, self.seen, self.stop = sid, {}, threading.Event()
        self.start()

    def run(self):
        while not self.stop.wait(0.5):
            self.seen.update(_session_cpu(self.sid))

    def total(self) -> float:
        self.stop.set()
        self.join()
        return sum(self.seen.values())


def run_command(cmd: list[str], *, name: str, timeout: float, log_dir: Path, env: dict[str, str] | None = None,
                linger_s: float = 30.0) -> Run:
    """Run ``cmd`` from the repo root in a new session, output to ``log_dir/<name>.log``; on timeout
    the whole session is stopped (SIGTERM, then SIGKILL). Afterwards no process of that session may
    be left (``linger_s`` to exit): a leftover is killed and the test fails, naming it."""
    log = log_dir / f"{name}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or script_env(), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        sid = proc.pid
        sampler = _CpuSampler(sid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                for pid in _session_pids(sid):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = -999
    wall = time.monotonic() - t0
    cpu = sampler.total()
    deadline = time.monotonic() + linger_s
    left = _session_pids(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _session_pids(sid)
    leftover = ""
    if left:
        leftover = subprocess.run(["ps", "-o", "pid=,args=", "-p", ",".join(map(str, left))], capture_output=True,
                                  text=True).stdout
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _TIMES.append((name, wall, cpu))
    output = log.read_text(errors="replace")
    run = Run(" ".join(cmd), rc, output, wall, log)
    if rc == -999:
        pytest.fail(f"{run.cmd}: still running after {timeout:.0f} s (stopped); log {log}\n{run.tail()}")
    if leftover:
        pytest.fail(f"{run.cmd} (exit {rc}) left processes running {linger_s:.0f} s after it ended (killed now):\n"
                    f"{leftover}\n{run.tail(30)}")
    return run


@pytest.fixture
def log_dir(tmp_path) -> Path:
    return tmp_path
