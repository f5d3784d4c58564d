"""The structured-output compile sandbox: a warm worker process that tries each new schema in a
forked child under a time and memory limit, so a schema built to compile for minutes costs at
most the limit and never holds anything in the engine's process.

Why: xgrammar's compile of a 49-character regex ``pattern`` with nested bounded repetition took
19 s at a 16k vocabulary (~n^2.7 in its bounds); in a thread it cannot be cancelled, and it held
the single compile lock and a worker of the default executor meanwhile. Here:

* ``SandboxWorker`` (the engine's side): one long-lived worker per compile thread (started once,
  ~2-4 s: ``import xgrammar`` brings torch and transformers), sent the tokenizer info once.
  ``probe(schema)`` asks it whether the schema compiles within the limits.
* The worker forks a child per schema (15-40 ms for a ~270 MB worker, so ahead of need: a spare
  child waits for the next schema while the worker is idle), which sets ``RLIMIT_AS`` to its
  current address space + the memory limit, compiles and reports the time and size. Once the child has used the time limit in CPU seconds the worker SIGKILLs it,
  so a timeout costs no restart; CPU time, so a busy box does not get a legitimate schema refused
  (a child starved that long by the clock, ``wall_limit``, is called off as "busy, retry", not
  refused). A child that runs out of memory reports it (xgrammar raises ``std::bad_alloc``).
* Only a verdict comes back, never the compiled grammar: the engine compiles a schema that passed
  again in its own process (``CompiledGrammar.serialize_json`` is no way across: a 200-property
  schema whose grammar holds 3 MB serialized to 360 MB of JSON in 85 s, deserialized in 24 s;
  even a small one took 12 ms + 6 ms against a 3-9 ms compile, at vocab 16k). A schema that
  passed compiles in the engine in about the time it took here, and it is bounded by the limit.

The worker runs this file as a script (``runpy``, no ``serve_app`` import; its own ``sys.path``
entry dropped so that nothing in this folder shadows a library module); the protocol is
length-framed bytes over a socketpair (``multiprocessing.connection``), never pickle: the worker
handles tenants' input, and what it sends back is parsed as data only. Both the worker and its
child die with their parent (``PR_SET_PDEATHSIG``), and the worker exits at EOF.

Messages: engine -> worker ``I`` + tokenizer info JSON (once; answered ``R``), ``C`` + JSON
{schema, timeout_s, wall_s, memory_bytes}; worker -> engine ``K`` + JSON {seconds, bytes} (compiled in
time), ``E`` + xgrammar's message (the schema is refused), ``T`` (CPU limit reached), ``W`` + the
CPU seconds it got (wall limit reached first: starved), ``M`` (out of memory), ``D`` + how the
child died.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

STARTUP_TIMEOUT_S = 120.0  # importing xgrammar (torch, transformers) on a loaded 2-core box
REPLY_GRACE_S = 5.0  # beyond the wall limit: fork, reap and the reply; a silent worker is killed
POLL_S = 0.05  # how often the worker reads its child's CPU time


def wall_limit(timeout_s: float) -> float:
    """How long a child may take by the clock: its CPU limit is the compile limit, and a child
    starved of CPU by a busy box (not by its schema) is given this much before it is called off."""
    return max(4 * timeout_s, timeout_s + 5.0)
_BOOT = "import runpy, sys; del sys.path[0]; runpy.run_path(sys.argv[1], run_name='__main__')"


class WorkerUnavailable(RuntimeError):
    """The sandbox worker could not be started or stopped answering (it is killed; the next call
    starts a fresh one)."""


def _die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere a no-op: EOF still ends it)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# ---- the engine's side ------------------------------------------------------------------------------


class SandboxWorker:
    """One warm worker process (owned by one thread: calls are not thread-safe)."""

    def __init__(self, tokenizer_info_json: str, startup_timeout_s: float = STARTUP_TIMEOUT_S):
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, os.path.abspath(__file__), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
            )
        except OSError as e:
            ours.close()
            raise WorkerUnavailable(f"could not start the schema compile worker: {e}") from None
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        try:
            self.conn.send_bytes(b"I" + tokenizer_info_json.encode())
            if not self.conn.poll(startup_timeout_s):
                raise WorkerUnavailable(f"the schema compile worker did not start within {startup_timeout_s:.0f} s")
            if self.conn.recv_bytes() != b"R":
                raise WorkerUnavailable("the schema compile worker did not start")
        except (OSError, EOFError) as e:
            self.close()
            raise WorkerUnavailable(f"the schema compile worker died at start ({type(e).__name__})") from None
        except BaseException:
            self.close()
            raise

    def probe(self, schema: str, timeout_s: float, memory_bytes: int, wall_s: float | None = None) -> tuple[str, str]:
        """Whether ``schema`` compiles within the limits: ``(verdict, detail)``, verdict one of
        ``K`` (detail: JSON {seconds, bytes}), ``E`` (xgrammar's message), ``T`` (CPU limit),
        ``W`` (wall limit: CPU-starved; detail: the CPU seconds it got), ``M``, ``D`` (how the
        child died). Raises WorkerUnavailable (the worker is then closed)."""
        try:
            wall_s = wall_limit(timeout_s) if wall_s is None else wall_s
            self.conn.send_bytes(b"C" + json.dumps({"schema": schema, "timeout_s": timeout_s, "wall_s": wall_s,
                                                    "memory_bytes": memory_bytes}).encode())
            if not self.conn.poll(wall_s + REPLY_GRACE_S):
                raise WorkerUnavailable("the schema compile worker stopped answering")
            reply = self.conn.recv_bytes()
        except (OSError, EOFError) as e:
            self.close()
            raise WorkerUnavailable(f"the schema compile worker died ({type(e).__name__})") from None
        except BaseException:
            self.close()
            raise
        return reply[:1].decode(), reply[1:].decode(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """Kill the worker (and so its child) and reap it."""
        try:
            self.conn.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


# ---- the worker's side ------------------------------------------------------------------------------


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(xgr, info, schema: str, memory_bytes: int, out_fd: int) -> None:
    """In the forked child: compile under RLIMIT_AS and write the verdict to ``out_fd`` (4-byte
    length, then the verdict: the worker need not wait for this process to exit, ~25 ms)."""
    import resource

    _die_with_parent()
    # Below the engine's threads in the CPU scheduler: a tenant's slow compile may use the CPU
    # the engine leaves idle, not take cores from every tenant's decode (the limit is CPU time,
    # so a niced child is refused no sooner).
    os.nice(10)
    limit = _vm_size() + memory_bytes
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    t0 = time.perf_counter()
    try:
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        g = compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        reply = b"K" + json.dumps({"seconds": time.perf_counter() - t0, "bytes": g.memory_size_bytes}).encode()
    except MemoryError:
        reply = b"M"
    except Exception as e:
        text = str(e).strip()
        reply = b"M" if "bad_alloc" in text else b"E" + (text or type(e).__name__).encode(errors="replace")
    _write_all(out_fd, len(reply).to_bytes(4, "big") + reply)


def _cpu_seconds(pid: int, started: float) -> float:
    """CPU time ``pid`` has used (user + system, /proc); the wall time since ``started`` where
    /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return time.monotonic() - started


def _read_exactly(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Spare:
    """A child forked ahead of need, blocked reading its schema: a compile does not wait for a
    fork (15-40 ms of a ~270 MB worker) on its path; the next spare is forked after answering."""

    def __init__(self, xgr, info, conn_fd: int):
        job_r, self.job_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into the worker's loop
            code = 0
            try:
                os.close(self.job_w)
                os.close(self.out_r)
                os.close(conn_fd)
                _die_with_parent()
                req = json.loads(_read_exactly(job_r, int.from_bytes(_read_exactly(job_r, 4), "big")))
                _child(xgr, info, req["schema"], int(req["memory_bytes"]), out_w)
            except BaseException:  # EOF: the worker is gone
                code = 1
            finally:
                os._exit(code)
        os.close(job_r)
        os.close(out_w)


def _probe(spare: _Spare, req: dict, body: bytes) -> tuple[bytes, int]:
    """Hand the schema to the spare child; kill it once it has used the limit in CPU time (or,
    starved, the wall limit). (The verdict as bytes, the child's pid: the caller reaps it after
    answering.) CPU time, not the clock, so that a legitimate schema compiled while the box is
    busy is not refused, and remembered as refused, for the box's load."""
    timeout_s = float(req["timeout_s"])
    pid, r = spare.pid, spare.out_r
    started = time.monotonic()
    try:
        _write_all(spare.job_w, len(body).to_bytes(4, "big") + body)
    except OSError:
        pass  # it died: its pipe reads EOF below
    finally:
        os.close(spare.job_w)
    wall_deadline = started + float(req.get("wall_s") or wall_limit(timeout_s))
    buf = bytearray()
    need = None  # the reply's length, once its 4-byte header is in
    try:
        while need is None or len(buf) < 4 + need:
            left = wall_deadline - time.monotonic()
            if left <= 0:
                cpu = _cpu_seconds(pid, started)
                os.kill(pid, signal.SIGKILL)
                return (b"T" if cpu >= timeout_s else b"W" + f"{cpu:.2f}".encode()), pid
            if not select.select([r], [], [], min(left, POLL_S))[0]:
                if _cpu_seconds(pid, started) >= timeout_s:
                    os.kill(pid, signal.SIGKILL)
                    return b"T", pid
                continue
            chunk = os.read(r, 1 << 16)
            if not chunk:  # it exited without a whole verdict: it died
                _, status = os.waitpid(pid, 0)
                how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else
                       f"exit status {os.WEXITSTATUS(status) if os.WIFEXITED(status) else status}")
                return b"D" + how.encode(), 0
            buf += chunk
            if need is None and len(buf) >= 4:
                need = int.from_bytes(buf[:4], "big")
    finally:
        os.close(r)
    return bytes(buf[4:4 + need]), pid


def main(fd: int) -> None:
    _die_with_parent()
    conn = Connection(fd)
    if os.getppid() == 1:  # the parent died before PR_SET_PDEATHSIG took hold
        return
    import xgrammar as xgr  # the slow part of a start (torch, transformers): once per worker

    info = None
    spare: _Spare | None = None
    exiting: list[int] = []  # children that answered and are exiting (~25 ms each), reaped in passing
    while True:
        if info is not None and spare is None and not conn.poll(0):
            spare = _Spare(xgr, info, fd)  # while idle: off the next compile's path
            continue
        if exiting and not conn.poll(0.05):
            exiting = [pid for pid in exiting if os.waitpid(pid, os.WNOHANG)[0] == 0]
            continue
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        op, body = msg[:1], msg[1:]
        if op == b"I":
            info = xgr.TokenizerInfo.deserialize_json(body.decode())
            conn.send_bytes(b"R")
        elif op == b"C" and info is not None:
            if spare is not None and os.waitpid(spare.pid, os.WNOHANG)[0] != 0:  # died waiting (OOM kill)
                os.close(spare.job_w)
                os.close(spare.out_r)
                spare = None
            if spare is None:
                spare = _Spare(xgr, info, fd)
            reply, pid = _probe(spare, json.loads(body), body)
            spare = None
            conn.send_bytes(reply)
            if pid:  # reaped after answering, never waited for: its exit overlaps the engine's work
                exiting.append(pid)
        else:
            conn.send_bytes(b"E" + b"the compile worker got an unknown message")


if __name__ == "__main__":
    main(int(sys.argv[-1]))
