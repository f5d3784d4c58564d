"""Per-step token layout and adapter-major stacked weights for the per-row LoRA paths.

A step's forward flattens every token of every request into one sequence of N tokens (decode
rows one token each, prefill prompts and chunks several contiguous tokens each). Token t uses
``tok_adapter[t]``: an index into the step's distinct adapters, or -1 for the base model.

Per input group (q/k/v share ``attn_in``, ...) the adapters that target a kind of the group are
its *members*, stacked adapter-major:

    a          [L, n, in, Rp]     member i's A^T, kinds side by side, each kind padded to the
                                  largest rank any member has on it (zero columns)
    b[kind]    [L, n, rk, out]    member i's B for that kind (alpha/r folded in), zero rows past
                                  its own rank

so member i's delta on a kind is ``x @ a[l, i][:, s:e] @ b[kind][l, i]`` and a token only ever
multiplies its own member's slice: isolation holds by construction, not by a mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SPLIT_FACTOR = 4  # bmm: a segment longer than this many times the median one runs as its own GEMMs


def split_cut(seg_len: list[int]) -> int | None:
    """bmm pads every segment to the longest one, so one prompt among decode rows (a step of
    continuous batching: 63 rows of 1 token, a 32-token prompt) would multiply 64 x 32 slots
    for 95 tokens. Segments longer than the returned length run as their own GEMM pair on views
    (the loop path's way), the rest stay one padded bmm; None: no segment is that long."""
    if len(seg_len) < 2:
        return None
    cut = SPLIT_FACTOR * sorted(seg_len)[(len(seg_len) - 1) // 2]
    return cut if max(seg_len) > cut else None


@dataclass
class StackedGroup:
    a: torch.Tensor  # [L, n, in, Rp] adapter-major A^T of the group's members, zero padded per kind
    spans: dict[str, tuple[int, int, torch.Tensor]]  # kind -> (first col, end col, B [L, n, e - s, out])
    ranks: list[dict[str, int]]  # member i -> {kind: its real rank}
    member_of: list[int]  # distinct adapter j -> member index, -1: j targets no kind of this group
    # Per-layer views, unbound once when the stack is built (a forward then indexes a Python
    # list instead of dispatching a tensor select per projection):
    a_layers: list[torch.Tensor] | None = None  # [L] of [n, in, Rp]
    b_layers: dict[str, list[torch.Tensor]] | None = None  # kind -> [L] of [n, e - s, out]

    def __post_init__(self) -> None:
        if self.a_layers is None:
            self.a_layers = list(self.a.unbind(0))
        if self.b_layers is None:
            self.b_layers = {k: list(b.unbind(0)) for k, (_, _, b) in self.spans.items()}


@dataclass
class SegmentLayout:
    """One group's LoRA tokens in one step (base tokens and non-members are left out)."""

    n_tokens: int  # N: tokens in the forward
    m: int  # M: tokens of this group's members
    # contiguous runs in token order (loop path): (first token, end token, member)
    runs: list[tuple[int, int, int]]
    # adapter-sorted segments (bmm / triton paths), segment s = member seg_member[s]
    seg_member: list[int]
    seg_len: list[int]
    tok: torch.Tensor | None = None  # [M] long: token indices, sorted by member (stable)
    s_max: int = 0  # longest segment
    pad_tok: torch.Tensor | None = None  # [n_seg, s_max] long: token of each padded slot (pads: the segment's own first token)
    keep: torch.Tensor | None = None  # [M] long: slot (in n_seg * s_max) of each sorted token; None: no padding
    # bmm: the sorted, unpadded order is the token order itself (every token a member, each
    # member's tokens one contiguous run, runs in member order, all of one length S): x and out
    # are read and written as [n_seg, S, *] views, no gather and no scatter. Decode with one
    # token per distinct adapter, one adapter on every row, or prompts of one length per adapter.
    identity: bool = False
    # bmm, every token a member but not ``identity``: padded slot of each token [N] long, so the
    # expand adds ``d.index_select(0, inv)`` (one gather + one add) instead of a keep-gather and
    # a scatter-add
    inv: torch.Tensor | None = None
    members_t: torch.Tensor | None = None  # [n_seg] long: member per segment; None when segment s is member s
    # bmm: runs (first token, end token, member) of the members whose segment is too long to pad
    # the others to (``split_cut``): each an mm pair on views; the segments above leave them out
    split: list[tuple[int, int, int]] = field(default_factory=list)
    seg_start_t: torch.Tensor | None = None  # [n_seg] int32: first row of segment s in ``tok`` (triton)
    seg_len_t: torch.Tensor | None = None  # [n_seg] int32 (triton)
    seg_member_t: torch.Tensor | None = None  # [n_seg] int32 (triton)


def runs_of(tok: list[int]) -> list[tuple[int, int, int]]:
    """Contiguous runs (first, end, index) of tokens with one adapter (or member) index; -1
    (the base model, or not a member) is left out."""
    runs, start, cur = [], 0, -1
    for t, j in enumerate(tok):
        if j != cur:
            if cur >= 0:
                runs.append((start, t, cur))
            start, cur = t, j
    if cur >= 0:
        runs.append((start, len(tok), cur))
    return runs


def build_layout(
    tok_adapter: list[int], member_of: list[int], n_members: int, path: str, device: torch.device, split_off: int = 0
) -> SegmentLayout:
    """The layout ``path`` reads, for one group whose distinct adapter j is member ``member_of[j]``
    (of ``n_members`` stacked members); ``split_off``: members left out of these segments because
    they run split (live, though they have no segment here)."""
    tok_member = [member_of[j] if j >= 0 else -1 for j in tok_adapter]  # [N] python
    n = len(tok_member)
    if path == "loop":
        runs = runs_of(tok_member)
        return SegmentLayout(n_tokens=n, m=sum(e - s for s, e, _ in runs), runs=runs, seg_member=[], seg_len=[])
    buckets: dict[int, list[int]] = {}
    for t, m in enumerate(tok_member):
        if m >= 0:
            buckets.setdefault(m, []).append(t)
    if path == "bmm" and (cut := split_cut([len(b) for b in buckets.values()])) is not None:
        long = {m for m, b in buckets.items() if len(b) > cut}
        short = [j if j < 0 or member_of[j] not in long else -1 for j in tok_adapter]
        lay = build_layout(short, member_of, n_members, path, device, split_off + len(long))  # their slots: dead here
        lay.split = [*lay.split, *(r for r in runs_of(tok_member) if r[2] in long)]
        return lay
    seg_member = sorted(buckets)
    if path == "bmm" and len(seg_member) < n_members <= 2 * (len(seg_member) + split_off):
        # Members of the stack with no token this step (a slot buffer's dead slots, lora/slots.py)
        # ride along as empty, padded segments whose outputs are dropped: reading their weights
        # costs less than gathering the live members' weights into a copy (``members_t``).
        seg_member = list(range(n_members))
    seg_len = [len(buckets.get(m, ())) for m in seg_member]
    flat = [t for m in seg_member for t in buckets.get(m, ())]
    lay = SegmentLayout(n_tokens=n, m=len(flat), runs=[], seg_member=seg_member, seg_len=seg_len)
    lay.tok = torch.tensor(flat, dtype=torch.long, device=device)  # [M]
    lay.s_max = max(seg_len)
    if seg_member != list(range(n_members)):
        lay.members_t = torch.tensor(seg_member, dtype=torch.long, device=device)
    if path == "bmm":
        s = lay.s_max
        padded = any(ln != s for ln in seg_len)
        if not padded and lay.m == n and flat == list(range(n)):
            lay.identity = True  # views only: no index tensors are read
            return lay
        pad = [(b := buckets.get(m) or [flat[0]]) + [b[0]] * (s - len(b)) for m in seg_member]
        lay.pad_tok = torch.tensor(pad, dtype=torch.long, device=device)  # [n_seg, S]
        if lay.m == n:
            inv = [0] * n
            for i, m in enumerate(seg_member):
                for k, t in enumerate(buckets.get(m, ())):
                    inv[t] = i * s + k
            lay.inv = torch.tensor(inv, dtype=torch.long, device=device)  # [N]
        elif padded:
            lay.keep = torch.tensor([i * s + k for i, ln in enumerate(seg_len) for k in range(ln)],
                                    dtype=torch.long, device=device)  # [M]
    elif path == "triton":
        starts, acc = [], 0
        for ln in seg_len:
            starts.append(acc)
            acc += ln
        lay.seg_start_t = torch.tensor(starts, dtype=torch.int32, device=device)
        lay.seg_len_t = torch.tensor(seg_len, dtype=torch.int32, device=device)
        lay.seg_member_t = torch.tensor(seg_member, dtype=torch.int32, device=device)
    return lay
