"""Output checks shared by the benchmarks: a timed row counts only if it did the right work.

Why: a benchmark that times work without checking it passes with a wrong adapter, no adapter
or a broken kernel (the review of 2026-12-01, B1-B4). Each bench compares what its rows returned
with an independent reference (PEFT / transformers greedy tokens, or the engine's own decoded
text for HTTP replies) and turns its verdict into ``INVALID`` when they differ. The only
difference tolerated is a documented tie:

* EOS tie: the engine runs with ``ignore_eos`` and may emit EOS when it is the argmax, while
  ``generate(min_new_tokens=...)`` suppresses EOS and takes the runner-up; a row may diverge
  first at a step where one side produced an EOS id (after that the continuations differ);
* near-tie (CUDA, fp16 kernels): ``deepspeed_cuda_bench`` passes a callable that says whether
  the reference's logits at the first diverging step put both tokens within a tolerance.

Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

INVALID = "INVALID"


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (a length difference counts at the shorter end)."""
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class Agreement:
    """Row-by-row comparison of token lists with a reference."""

    rows: int
    identical: int
    ties: list[tuple[int, int]] = field(default_factory=list)  # (row, step) of tolerated divergences
    bad: list[tuple[int, int, str]] = field(default_factory=list)  # (row, step, why)
    missing: bool = False  # no output or no reference to compare

    @property
    def ok(self) -> bool:
        return not self.missing and not self.bad

    def summary(self) -> str:
        if self.missing:
            return "not checked (no output or no reference): INVALID"
        s = f"{self.identical}/{self.rows} rows identical"
        if self.ties:
            s += f", {len(self.ties)} diverge after a tolerated tie (first at step {min(t for _, t in self.ties)})"
        if self.bad:
            r, j, why = self.bad[0]
            s += f", {len(self.bad)} WRONG (e.g. row {r} from step {j}: {why}): INVALID"
        return s

    def to_json(self) -> dict:
        return {"rows": self.rows, "identical": self.identical, "ties": self.ties, "bad": self.bad[:20],
                "n_bad": len(self.bad), "missing": self.missing, "ok": self.ok, "summary": self.summary()}


def compare_tokens(
    got: Sequence[Sequence[int]] | None,
    ref: Sequence[Sequence[int]] | None,
    *,
    eos_ids: frozenset[int] | set[int] = frozenset(),
    is_tie: Callable[[int, int, int, int], tuple[bool, str]] | None = None,
) -> Agreement:
    """Compare greedy token rows with a reference. A row diverging first at step j is tolerated
    when ``got[j]`` or ``ref[j]`` is an EOS id, or when ``is_tie(row, j, got_tok, ref_tok)`` says
    so (it returns (tie?, description)); any other difference makes the comparison fail."""
    if got is None or ref is None:
        return Agreement(rows=0, identical=0, missing=True)
    if len(got) != len(ref):
        return Agreement(rows=len(ref), identical=0,
                         bad=[(-1, 0, f"{len(got)} rows returned for {len(ref)} reference rows")])
    ag = Agreement(rows=len(ref), identical=0)
    for i, (g, r) in enumerate(zip(got, ref)):
        j = first_divergence(g, r)
        if j is None:
            ag.identical += 1
            continue
        if j >= len(g) or j >= len(r):
            ag.bad.append((i, j, f"{len(g)} tokens vs {len(r)} in the reference"))
            continue
        if g[j] in eos_ids or r[j] in eos_ids:
            ag.ties.append((i, j))
            continue
        if is_tie is not None:
            tie, why = is_tie(i, j, g[j], r[j])
            if tie:
                ag.ties.append((i, j))
                continue
            ag.bad.append((i, j, f"token {g[j]} vs {r[j]} ({why})"))
            continue
        ag.bad.append((i, j, f"token {g[j]} vs {r[j]}"))
    return ag


@dataclass
class TextAgreement:
    """Per-request comparison of returned texts with the engine's decoded outputs."""

    checked: int = 0
    equal: int = 0
    mismatches: list[str] = field(default_factory=list)  # human-readable, first few kept

    @property
    def ok(self) -> bool:
        return self.checked > 0 and self.equal == self.checked

    def add(self, label: str, got: str | None, want: str | None) -> bool:
        self.checked += 1
        if got is not None and want is not None and got == want:
            self.equal += 1
            return True
        if want is None:
            why = "no engine reference for this request"
        elif got is None:
            why = "no text in the reply"
        else:
            j = next((k for k, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
            why = f"differs from char {j}: got {got[j:j + 24]!r}, engine {want[j:j + 24]!r}"
        self.mismatches.append(f"{label}: {why}")
        return False

    def summary(self) -> str:
        if self.checked == 0:
            return "no reply text checked: INVALID"
        s = f"{self.equal}/{self.checked} reply texts equal the engine's"
        if not self.ok:
            s += f"; {self.checked - self.equal} DIFFER (e.g. {self.mismatches[0]}): INVALID"
        return s

    def to_json(self) -> dict:
        return {"checked": self.checked, "equal": self.equal, "ok": self.ok,
                "mismatches": self.mismatches[:20], "summary": self.summary()}


def gate(verdict: str, *valid: bool) -> str:
    """A PASS/MISS verdict stands only if every check it relies on held; else INVALID."""
    return verdict if all(valid) else INVALID
