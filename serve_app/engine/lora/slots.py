"""Adapter-major slot buffers for the per-row LoRA paths: a change of adapter set patches slots.

The ``bmm`` / ``loop`` / ``triton`` paths read one input group's adapters stacked adapter-major
(kernels/layout.py: ``a [L, n, in, Rp]``, ``b[kind] [L, n, rk, out]``). Under real traffic
the set of adapters in a step changes all the time -- a request finishes, another is admitted
-- and building a fresh stack for every new set copies every member's weights: 470 MB per set
for 64 rank-16 q/k/v/o adapters on SmolLM2-135M, about 157 ms a set on the 2-core box
(benchmarks/lora_churn_bench.py), which made churning traffic 0.54x of base.

A ``SlotStack`` is one long-lived buffer per input group instead. Each resident adapter that a
step uses occupies a slot; a new set keeps every member that already has a slot where it is
and writes only the newcomers, each into a slot no member of the set uses (one adapter's bytes,
from the pool, checked for non-finite values on the way). A step reads the range view
``[:, lo:hi]`` of the slots its members occupy -- no copy. Slots inside the range that no member
of this step uses ("dead": a finished request's adapter) are read as padding and their outputs
dropped (kernels/layout.py); when they pile up, the members at the range's top move down into them
(one adapter each).

Where newcomers go decides how much a later step re-reads or re-writes: next to the members
that stay (dead slots inside their range first, then the nearest outside, an empty slot before
one that still holds an adapter, the least recently used of those first); a set with no member
in the buffer -- a chunked prefill admitting a new batch of requests -- takes the lowest run of
empty slots that holds it, so the next chunk's set does not overwrite this one's and the decode
set that unites them is found whole. A buffer that is too small grows (twice, up to the
``limit`` the engine allows: its max_num_seqs and some spare), its slots copied over as they are.

Isolation holds as before: a token multiplies only its own slot, a slot's padding columns are
zero, and a slot whose source rows are not finite is left all zeros and reported. A patch bumps
the slot's generation; a cached gather that read an overwritten slot is no longer valid
(``valid``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Shape = tuple[tuple[str, int], ...]  # (kind, padded rank) per kind of the group, in column order
Fill = Callable[[int, int], tuple[dict[str, int], bool]]  # (slot, load ID) -> (rank per kind, not finite)


class SlotStack:
    """One input group's slot buffer: ``a [L, C, in, Rp]`` and per kind ``b [L, C, rk, out]``."""

    def __init__(self, shape: Shape, capacity: int, num_layers: int, in_f: int, outs: dict[str, int],
                 dtype: torch.dtype, device: torch.device):
        self.shape = shape
        self.capacity = capacity
        rp = sum(rk for _, rk in shape)
        self.a = torch.zeros(num_layers, capacity, in_f, rp, dtype=dtype, device=device)  # [L, C, in, Rp]
        self.b = {k: torch.zeros(num_layers, capacity, rk, outs[k], dtype=dtype, device=device) for k, rk in shape}
        self.occupant: list[int | None] = [None] * capacity  # load ID held by each slot
        self.ranks: list[dict[str, int]] = [{} for _ in range(capacity)]  # slot -> its adapter's rank per kind
        self.bad: list[bool] = [False] * capacity  # slot's source rows were not finite (slot is all zeros)
        self.gen: list[int] = [0] * capacity  # bumped whenever a slot's contents change
        self.used_at: list[int] = [0] * capacity  # the place() call that last read each slot (LRU)
        self.slot_of: dict[int, int] = {}  # load ID -> slot
        self.writes = 0  # adapters written or moved into slots since made or forget() (growing keeps the count)
        self._clock = 0

    def fits(self, shape: Shape) -> bool:
        """The buffer can hold a set of this shape: the same kinds, no rank above the padded one,
        and not more than twice padded (which would make every step read mostly zeros)."""
        mine = dict(self.shape)
        return [k for k, _ in shape] == [k for k, _ in self.shape] and all(rk <= mine[k] <= 2 * rk for k, rk in shape)

    def grown(self, capacity: int) -> SlotStack:
        """A buffer of ``capacity`` slots holding this one's slots where they are (one copy)."""
        a = self.a
        out = SlotStack(self.shape, capacity, a.shape[0], a.shape[2], {k: b.shape[3] for k, b in self.b.items()},
                        a.dtype, a.device)
        c = self.capacity
        out.a[:, :c] = a
        for k, b in self.b.items():
            out.b[k][:, :c] = b
        out.occupant[:c], out.ranks[:c], out.bad[:c], out.used_at[:c] = self.occupant, self.ranks, self.bad, self.used_at
        out.slot_of, out._clock, out.writes = dict(self.slot_of), self._clock, self.writes
        return out

    def place(self, loads: Sequence[int], fill: Fill, limit: int = 0) -> list[int] | None:
        """A slot for each load ID of the set (in order), writing newcomers with ``fill(slot,
        load_id)`` (which returns the adapter's rank per kind and whether its rows were not
        finite); None when the buffer should grow first: it has fewer free slots than newcomers,
        or fewer empty ones while it is below ``limit`` slots (it grows before it evicts)."""
        members = set(loads)
        new = [lid for lid in loads if lid not in self.slot_of]
        if new:
            if self.capacity < limit and self.occupant.count(None) < len(new):
                return None
            spots = self._spots(members, len(new))
            if spots is None:
                return None
            for lid, s in zip(new, spots):
                self._write(s, lid, fill)
        self._compact(members)
        self._clock += 1
        slots = [self.slot_of[lid] for lid in loads]
        for s in slots:
            self.used_at[s] = self._clock
        return slots

    def _spots(self, members: set[int], k: int) -> list[int] | None:
        """The ``k`` slots newcomers take (ascending), or None when fewer are free."""
        occ = self.occupant
        free = [s for s in range(self.capacity) if occ[s] is None or occ[s] not in members]
        if len(free) < k:
            return None
        kept = [self.slot_of[lid] for lid in members if lid in self.slot_of]
        if kept:  # next to the members that stay: inside their range, then the nearest outside
            lo, hi = min(kept), max(kept) + 1
            dist = lambda s: 0 if lo <= s < hi else lo - s if s < lo else s + 1 - hi  # noqa: E731
            free.sort(key=lambda s: (dist(s), occ[s] is not None, self.used_at[s], s))
            return sorted(free[:k])
        run = 0  # the lowest run of k empty slots
        for s in range(self.capacity):
            run = run + 1 if occ[s] is None else 0
            if run == k:
                return list(range(s + 1 - k, s + 1))
        # else the k free slots closest together (lowest first), so the range stays short
        best = min(range(len(free) - k + 1), key=lambda i: (free[i + k - 1] - free[i], i))
        return free[best : best + k]

    def forget(self) -> None:
        """Forget every slot's adapter (each is written again, from the pool, on its next use);
        the memory stays allocated."""
        c = self.capacity
        self.occupant, self.ranks, self.bad = [None] * c, [{} for _ in range(c)], [False] * c
        self.gen = [g + 1 for g in self.gen]
        self.used_at = [0] * c
        self.slot_of = {}
        self.writes = 0

    def zero(self, s: int) -> None:
        """Clear slot ``s`` (every kind's A columns and B rows)."""
        self.a[:, s].zero_()
        for b in self.b.values():
            b[:, s].zero_()

    def valid(self, deps: Sequence[tuple[int, int]]) -> bool:
        """Whether every (slot, generation) a gather read still holds what it held."""
        return all(self.gen[s] == g for s, g in deps)

    def _write(self, s: int, lid: int, fill: Fill) -> None:
        old = self.occupant[s]
        if old is not None:
            del self.slot_of[old]
        self.occupant[s] = lid
        self.slot_of[lid] = s
        self.gen[s] += 1
        self.writes += 1
        self.ranks[s], self.bad[s] = fill(s, lid)

    def _compact(self, members: set[int]) -> None:
        """Move the top members down into dead slots while the range a step reads holds more
        than a few of them (each move copies one adapter, slot to slot)."""
        if not members:
            return
        slack = max(2, len(members) // 8)
        while True:
            slots = [self.slot_of[lid] for lid in members]
            lo, top = min(slots), max(slots)
            if top + 1 - lo - len(members) <= slack:
                return
            dst = next(s for s in range(lo, top) if self.occupant[s] not in members)
            self._move(top, dst, self.occupant[top])

    def _move(self, src: int, dst: int, lid: int) -> None:
        old = self.occupant[dst]
        if old is not None:
            del self.slot_of[old]
        self.a[:, dst] = self.a[:, src]
        for b in self.b.values():
            b[:, dst] = b[:, src]
        self.occupant[dst], self.ranks[dst], self.bad[dst] = lid, self.ranks[src], self.bad[src]
        self.occupant[src], self.ranks[src], self.bad[src] = None, {}, False
        self.slot_of[lid] = dst
        self.gen[dst] += 1
        self.gen[src] += 1
        self.writes += 1
