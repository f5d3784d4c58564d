"""Adapter memory: a shared row pool per projection kind, resident adapters, and pinning.

Layout. For each projection kind (q_proj, ..., down_proj) the pool holds
``a: [num_layers, rows, in]`` and ``b: [num_layers, rows, out]``. An adapter of rank r on that
kind owns r rows -- any r free rows, since the runtime gathers rows by index. So a resident
adapter costs its raw tensor bytes, not max_lora_rank's (S-LoRA's unified pool, without the
paging machinery: rows are the pages).

Isolation. String adapter IDs live outside; inside, each load gets a fresh ``ResidentAdapter``
with a unique integer ``load_id``. Requests pin the ResidentAdapter they started with. Unloading (LRU
eviction, an update, a delete) only retires it: its rows go back to the free list when the last
pinned request finishes, so a running sequence never sees another tenant's weights, and a new
load never lands in rows still in use.

Numerical isolation. A row never reads another adapter's columns, not even as ``0 * value``:
the mask is applied with ``masked_fill`` (an inf in another adapter's ``x @ A`` column becomes
0, where multiplying by 0 would give NaN), and each gather checks the B (and A) rows it copies:
an adapter whose device rows are not finite -- validation refuses such weights, so this is
defence in depth against a bug or a corrupted copy -- has its columns zeroed in the gathered
copy, is marked ``poisoned`` and retired, and only its own requests fail.

Per-step paths. ``prepare`` picks, per step, how the LoRALinears compute the mixed batch (see
lora/kernels/cost.py): ``masked`` (one dense product over the sum of the active ranks; cheapest
for one or two adapters), ``loop`` (a GEMM pair per contiguous run of one adapter's tokens),
``bmm`` (tokens sorted by adapter, one padded batched GEMM pair), ``triton`` (SGMV kernels, on
CUDA). The per-row paths read adapter-major stacks (``StackedGroup``): views of a long-lived
slot buffer per input group (slots.py) that a new adapter set patches one newcomer at a
time, checked the same way for non-finite rows.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

from serve_app.engine.arch import BaseShape, get_arch
from serve_app.engine.lora.kernels import PATHS, cost, kernel
from serve_app.engine.lora.kernels.layout import StackedGroup
from serve_app.engine.lora.layers import GroupBatch, LoRABatch
from serve_app.engine.lora.slots import SlotStack
from serve_app.engine.lora.weights import LoRAWeights
from serve_app.errors import ServeAppError

logger = logging.getLogger(__name__)
_load_ids = itertools.count(1)


@dataclass(eq=False)
class ResidentAdapter:
    """One load of one adapter into the pool. Compared by identity, never by name."""

    adapter_id: str
    rows: dict[str, torch.Tensor]  # kind -> [r_kind] pool row indices
    nbytes: int
    raw_bytes: int
    load_id: int = field(default_factory=lambda: next(_load_ids))  # this load's identity (not a KV slot)
    refcount: int = 0
    retired: bool = False  # unloaded: no new requests; rows freed when refcount drops to 0
    freed: bool = False
    poisoned: bool = False  # its device rows were found non-finite: its requests fail, it is reloaded

    def __repr__(self) -> str:
        return f"ResidentAdapter({self.adapter_id!r}, load_id={self.load_id}, refs={self.refcount}, retired={self.retired})"


class AdapterNotResidentError(ServeAppError):
    """Asked to run an adapter that is not (or no longer) in this engine's memory."""

    status_code = 503
    error_type = "service_unavailable"
    code = "adapter_not_loaded"


class LoRAManager:
    def __init__(
        self,
        shape: BaseShape,
        *,
        dtype: torch.dtype,
        device: torch.device,
        initial_rows: int = 128,
        path: str | None = None,
        max_slots: int = 80,
    ):
        self.shape = shape
        # kind -> input group: kinds that read one input share a gathered A (arch/)
        self.input_groups = get_arch(shape.arch).input_groups
        self.dtype = dtype
        self.device = device
        self._lock = threading.RLock()
        self._a: dict[str, torch.Tensor] = {}
        self._b: dict[str, torch.Tensor] = {}
        self._free: dict[str, list[int]] = {}
        for kind, (in_f, out_f) in shape.kinds.items():
            self._a[kind] = torch.zeros(shape.num_layers, initial_rows, in_f, dtype=dtype, device=device)
            self._b[kind] = torch.zeros(shape.num_layers, initial_rows, out_f, dtype=dtype, device=device)
            self._free[kind] = list(range(initial_rows))
        self._current: dict[str, ResidentAdapter] = {}  # adapter_id -> the version new requests get
        self._retired_pinned: set[ResidentAdapter] = set()
        self._pool_version = 0  # bumps when pool tensors are reallocated; invalidates gathers
        self._gather_cache: OrderedDict[tuple, tuple[int, dict]] = OrderedDict()
        # prepare()'s whole LoRABatch per (path asked, pool version, rows' load IDs); an entry is
        # used only while the gather it was built from is still the cached one
        self._batch_cache: OrderedDict[tuple, tuple] = OrderedDict()
        # the per-row paths' adapter-major buffers, per input group (slots.py): a few shapes each
        self._slots: dict[str, list[SlotStack]] = {}
        self.max_slots = max_slots  # a slot buffer grows past this only to hold one step's set
        # "auto": the cost model picks per step; or one of PATHS, forced (benchmarks, tests).
        self.path = path or os.environ.get("SERVE_APP_LORA_PATH", "auto")
        self.last_path: str | None = None  # the path of the latest prepared batch
        self.path_steps: Counter[str] = Counter()  # prepared batches per path (benchmarks read it)

    # ---- loading / unloading -------------------------------------------------------------

    def add(self, weights: LoRAWeights) -> ResidentAdapter:
        """Copy a validated adapter into free rows; it becomes the current version of its ID."""
        with self._lock:
            rows: dict[str, torch.Tensor] = {}
            for kind, a in weights.a.items():
                r = a.shape[1]
                idx = torch.tensor(self._take_rows(kind, r), dtype=torch.long, device=self.device)
                self._a[kind][:, idx] = a.to(self.device, non_blocking=True)
                self._b[kind][:, idx] = weights.b[kind].to(self.device, non_blocking=True)
                rows[kind] = idx
            res = ResidentAdapter(weights.adapter_id, rows, nbytes=weights.nbytes, raw_bytes=weights.raw_bytes)
            old = self._current.get(weights.adapter_id)
            self._current[weights.adapter_id] = res
            if old is not None:
                self._retire(old)
            return res

    def remove(self, adapter: str | ResidentAdapter) -> None:
        """Retire an adapter (by ID: its current version). Safe while requests still use it."""
        with self._lock:
            if isinstance(adapter, str):
                res = self._current.pop(adapter, None)
                if res is None:
                    return
            else:
                res = adapter
                if self._current.get(res.adapter_id) is res:
                    del self._current[res.adapter_id]
            self._retire(res)

    def _retire(self, res: ResidentAdapter) -> None:
        if res.retired:
            return
        res.retired = True
        if res.refcount == 0:
            self._free_rows(res)
        else:
            self._retired_pinned.add(res)

    def _take_rows(self, kind: str, r: int) -> list[int]:
        free = self._free[kind]
        if len(free) < r:
            self._grow(kind, r - len(free))
        # Lowest rows first keeps the pool compact; sorting a short free list is cheap.
        free.sort()
        taken, self._free[kind] = free[:r], free[r:]
        return taken

    def _grow(self, kind: str, at_least: int) -> None:
        a, b = self._a[kind], self._b[kind]
        old = a.shape[1]
        new = max(2 * old, old + at_least)
        grow_a = torch.zeros(a.shape[0], new - old, a.shape[2], dtype=a.dtype, device=a.device)
        grow_b = torch.zeros(b.shape[0], new - old, b.shape[2], dtype=b.dtype, device=b.device)
        self._a[kind] = torch.cat([a, grow_a], dim=1)
        self._b[kind] = torch.cat([b, grow_b], dim=1)
        self._free[kind].extend(range(old, new))
        self._pool_version += 1

    def _free_rows(self, res: ResidentAdapter) -> None:
        if res.freed:
            return
        res.freed = True
        self._retired_pinned.discard(res)
        for kind, idx in res.rows.items():
            self._free[kind].extend(idx.tolist())
        self._gather_cache.clear()
        self._batch_cache.clear()  # its slots (copies) stay until a newcomer takes them

    # ---- pinning --------------------------------------------------------------------------

    def acquire(self, adapter: str | ResidentAdapter) -> ResidentAdapter:
        """Pin an adapter for one request. A retired version can still be pinned while its
        rows are held by others (a request that resolved it before the retire)."""
        with self._lock:
            if isinstance(adapter, str):
                res = self._current.get(adapter)
                if res is None:
                    raise AdapterNotResidentError(f"adapter '{adapter}' is not loaded on this replica")
            else:
                res = adapter
                if res.freed or res.poisoned:
                    raise AdapterNotResidentError(
                        f"adapter '{res.adapter_id}' was unloaded before the request started; retry"
                    )
            res.refcount += 1
            return res

    def release(self, res: ResidentAdapter) -> None:
        with self._lock:
            res.refcount -= 1
            assert res.refcount >= 0, res
            if res.refcount == 0 and res.retired:
                self._free_rows(res)

    # ---- per-forward batch state -----------------------------------------------------------

    def prepare(self, row_adapters: list[ResidentAdapter | None], path: str | None = None) -> LoRABatch | None:
        """Build the LoRA state for a batch whose row b uses ``row_adapters[b]`` (None: base).

        The engine passes one entry per token of the step's flattened forward (a prefill
        prompt contributes one entry per prompt token); tests may pass one per row of equal
        length prompts. ``path`` (default ``self.path``) forces a path; "auto" lets the cost
        model choose from (tokens, distinct adapters, ranks).

        Gathers each active adapter's rows once per distinct adapter set (and layout); in
        steady decoding the set does not change between steps, so the gather is cached.
        """
        # Decode steps repeat the same rows step after step: the whole batch (path choice,
        # layouts, masks) is cached under the rows' load IDs, valid while its gather is.
        path = path or self.path
        bkey = (path, self._pool_version, *[0 if r is None else r.load_id for r in row_adapters])
        hit = self._batch_cache.get(bkey)
        if hit is not None and self._gather_cache.get(hit[0]) is hit[1]:
            self._batch_cache.move_to_end(bkey)
            self._gather_cache.move_to_end(hit[0])
            batch = hit[2]
            self.last_path = batch.path
            self.path_steps[batch.path] += 1
            return batch
        index: dict[ResidentAdapter, int] = {}
        tok_adapter = [-1 if r is None else index.setdefault(r, len(index)) for r in row_adapters]  # [rows]
        distinct = list(index)
        if not distinct:
            return None
        uniform = len(distinct) == 1 and -1 not in tok_adapter
        costs = None
        if path == "auto":
            path, costs = self._choose(distinct, tok_adapter, uniform)
        elif path not in PATHS:
            raise ValueError(f"unknown LoRA path {path!r}; one of auto, {', '.join(PATHS)}")
        self.last_path = path
        self.path_steps[path] += 1
        kern = kernel(path)
        layout_kind = "stacked" if kern.stacked else "masked"  # which gather it reads (the cache keys say)
        key = (layout_kind, *(r.load_id for r in distinct))
        with self._lock:
            cached = self._gather_cache.get(key)
            if cached is None or cached[0] != self._pool_version:
                built = self._gather(distinct) if layout_kind == "masked" else self._gather_stacked(distinct)
                cached = (self._pool_version, built)
                self._gather_cache[key] = cached
                while len(self._gather_cache) > 8:
                    self._gather_cache.popitem(last=False)
            else:
                self._gather_cache.move_to_end(key)
        gathered, poisoned = cached[1][:2]

        groups = {}
        if layout_kind == "masked":
            row_load = torch.tensor([r.load_id if r is not None else 0 for r in row_adapters], device=self.device)
            for group, (a_t, spans, col_load) in gathered.items():
                drop = None if uniform else row_load[:, None] != col_load[None, :]  # [B, R] bool
                groups[group] = GroupBatch(a_t=a_t, drop=drop, spans=spans)
        else:
            for group, st in gathered.items():
                lay = kern.layout(tok_adapter, st.member_of, st.a.shape[1], self.device)
                groups[group] = GroupBatch(a_t=None, drop=None, spans=st.spans, stack=st, layout=lay)
        batch = LoRABatch(groups=groups, poisoned=poisoned, path=path, rows=len(row_adapters), uniform=uniform,
                          tok_adapter=tok_adapter, costs=costs)
        self._batch_cache[bkey] = (key, cached, batch)
        while len(self._batch_cache) > 16:
            self._batch_cache.popitem(last=False)
        return batch

    def clear_set_caches(self) -> None:
        """Drop the per-set gathers, prepared batches and what the slot buffers hold (not their
        memory): the next step of every adapter set re-reads its adapters from the pool, checked
        again (benchmarks: each row pays its own gathers; tests: rows written into the pool behind
        the manager's back are seen)."""
        with self._lock:
            self._gather_cache.clear()
            self._batch_cache.clear()
            for stacks in self._slots.values():
                for st in stacks:
                    st.forget()

    def _choose(self, distinct: list[ResidentAdapter], tok_adapter: list[int], uniform: bool) -> tuple[str, dict]:
        """The cheapest path for this step by the cost model (cost.py), and every estimate."""
        runs = cost.runs_of(tok_adapter)
        counts = [0] * len(distinct)
        for t0, t1, j in runs:
            counts[j] += t1 - t0
        groups = []
        for group, kinds in cost.group_kinds(self.shape.kinds, self.input_groups).items():
            ranks = [{k: len(r.rows[k]) for k in kinds if k in r.rows} for r in distinct]  # per distinct adapter
            if any(ranks):
                groups.append((self.shape.kinds[kinds[0]][0], {k: self.shape.kinds[k][1] for k in kinds}, ranks))
        estimates = cost.estimate(len(tok_adapter), runs, counts, groups, uniform, self.device.type)
        return min(estimates, key=estimates.get), estimates

    def _gather(self, distinct: list[ResidentAdapter]) -> tuple[dict[str, tuple], frozenset[int]]:
        """Per input group: (A_t [L, in, R], {kind: (start, end, B)}, column owner load IDs [R]),
        and the load IDs of adapters whose rows are not finite (zeroed in the copy, retired)."""
        parts: dict[str, list] = {}
        for kind in self._a:
            users = [r for r in distinct if kind in r.rows]
            if users:
                parts.setdefault(self.input_groups[kind], []).append((kind, users))
        out = {}
        poisoned: set[int] = set()
        for group, kinds in parts.items():
            a_blocks, spans, owners, col = [], {}, [], 0
            for kind, users in kinds:
                idx = torch.cat([r.rows[kind] for r in users])  # [r_kind]
                a_sel = self._a[kind].index_select(1, idx)  # [L, r_kind, in]
                b_sel = self._b[kind].index_select(1, idx)  # [L, r_kind, out]
                owner = torch.cat([torch.full((len(r.rows[kind]),), r.load_id, device=self.device) for r in users])
                bad = ~(torch.isfinite(a_sel).all(dim=2).all(dim=0) & torch.isfinite(b_sel).all(dim=2).all(dim=0))
                if bool(bad.any()):  # [r_kind] columns of a broken adapter: never let them meet other rows
                    bad_loads = set(owner[bad].tolist())
                    cols = torch.isin(owner, torch.tensor(sorted(bad_loads), device=self.device))
                    a_sel[:, cols] = 0
                    b_sel[:, cols] = 0
                    poisoned |= bad_loads
                a_blocks.append(a_sel)
                spans[kind] = (col, col + len(idx), b_sel)
                owners.append(owner)
                col += len(idx)
            a_t = torch.cat(a_blocks, dim=1).transpose(1, 2).contiguous()  # [L, in, R]
            out[group] = (a_t, spans, torch.cat(owners))
        self._retire_poisoned(distinct, poisoned)
        return out, frozenset(poisoned)

    def _gather_stacked(self, distinct: list[ResidentAdapter]) -> tuple[dict[str, StackedGroup], frozenset[int], list]:
        """Per input group, the members' weights adapter-major (layout.py) as a view of the
        group's slot buffer (slots.py), the load IDs of adapters whose rows are not finite
        (their slots left zero, retired), and the (buffer, [(slot, generation)]) each group read.

        A new set -- a prefill admitting requests chunk by chunk, a request finishing and another
        taking its place -- writes only the members that have no slot yet, one adapter each; the
        gathers of other sets that read a slot it overwrote are dropped from the cache."""
        parts: dict[str, list] = {}
        for kind in self._a:
            users = [r for r in distinct if kind in r.rows]
            if users:
                parts.setdefault(self.input_groups[kind], []).append((kind, users))
        position = {r: j for j, r in enumerate(distinct)}
        out, deps = {}, []
        poisoned: set[int] = set()
        for group, kinds in parts.items():
            in_users = {r for _, users in kinds for r in users}
            members = [r for r in distinct if r in in_users]
            shape = tuple((kind, max(len(r.rows[kind]) for r in users)) for kind, users in kinds)
            ss, slots = self._place(group, shape, members)
            lo, hi = min(slots), max(slots) + 1  # the range of slots the step reads
            member_of = [-1] * len(distinct)
            for r, s in zip(members, slots):
                member_of[position[r]] = s - lo
                if ss.bad[s]:
                    poisoned.add(r.load_id)
            spans: dict[str, tuple[int, int, torch.Tensor]] = {}
            col = 0
            for kind, rk in ss.shape:
                spans[kind] = (col, col + rk, ss.b[kind][:, lo:hi])  # B [L, hi - lo, rk, out]
                col += rk
            out[group] = StackedGroup(a=ss.a[:, lo:hi], spans=spans, ranks=list(ss.ranks[lo:hi]), member_of=member_of)
            deps.append((ss, [(s, ss.gen[s]) for s in slots]))
        self._retire_poisoned(distinct, poisoned)
        return out, frozenset(poisoned), deps

    def _place(self, group: str, shape: tuple[tuple[str, int], ...], members: list[ResidentAdapter]):
        """A slot buffer of the group that fits ``shape`` and a slot per member (newcomers written)."""
        by_load = {r.load_id: r for r in members}
        loads = [r.load_id for r in members]
        stacks = self._slots.setdefault(group, [])
        ss = next((st for st in stacks if st.fits(shape)), None)
        writes = ss.writes if ss is not None else 0

        def fill(s: int, lid: int) -> tuple[dict[str, int], bool]:
            return self._fill_slot(ss, s, by_load[lid])  # ss: whichever buffer is placing

        slots = ss.place(loads, fill, self.max_slots) if ss is not None else None
        while slots is None:  # no buffer of this shape, or it should grow: its slots are copied as they are
            n = len(members)
            need = n + max(4, n // 4)
            if ss is None:
                in_f = self._a[shape[0][0]].shape[2]
                ss = SlotStack(shape, need, self.shape.num_layers, in_f, {k: self._b[k].shape[2] for k, _ in shape},
                               self.dtype, self.device)
                stacks.insert(0, ss)
                del stacks[3:]  # a few shapes per group (e.g. sets with and without a rank-64 adapter)
            else:
                old = ss
                ss = old.grown(max(need, min(2 * old.capacity, self.max_slots)))
                stacks[stacks.index(old)] = ss
                for key in [k for k, (_, built) in self._gather_cache.items()
                            if k[0] == "stacked" and any(st is old for st, _ in built[2])]:
                    del self._gather_cache[key]  # views of the old buffer: rebuilt (no writes) on next use
            writes = ss.writes
            slots = ss.place(loads, fill, self.max_slots)
        if ss.writes != writes:  # slots were overwritten: gathers of other sets that read them go
            for key in [k for k, (_, built) in self._gather_cache.items()
                        if k[0] == "stacked" and not all(st is not ss or st.valid(d) for st, d in built[2])]:
                del self._gather_cache[key]
        return ss, slots

    def _fill_slot(self, ss: SlotStack, s: int, r: ResidentAdapter) -> tuple[dict[str, int], bool]:
        """Write adapter ``r`` into slot ``s``: A^T into its kinds' columns, B into its rows, zeros
        past its own rank. A slot whose pool rows are not finite stays all zeros (only its own
        tokens read it). Returns its rank per kind and whether it was broken."""
        a = ss.a[:, s]  # [L, in, Rp]
        ss.zero(s)
        ranks, bad, col = {}, False, 0
        for kind, rk in ss.shape:
            idx = r.rows.get(kind)
            if idx is not None:
                own = len(idx)
                ranks[kind] = own
                a_sel = self._a[kind].index_select(1, idx)  # [L, own, in]
                b_sel = self._b[kind].index_select(1, idx)  # [L, own, out]
                if bool(torch.isfinite(a_sel).all()) and bool(torch.isfinite(b_sel).all()):
                    a[:, :, col : col + own] = a_sel.transpose(1, 2)
                    ss.b[kind][:, s, :own] = b_sel
                else:
                    bad = True
            col += rk
        if bad:  # a broken adapter: its whole slot stays zero
            ss.zero(s)
        return ranks, bad

    def _retire_poisoned(self, distinct: list[ResidentAdapter], poisoned: set[int]) -> None:
        for res in distinct:
            if res.load_id in poisoned and not res.poisoned:
                res.poisoned = True
                logger.error("adapter %s (load %d) has non-finite rows in device memory; failing its requests "
                             "and retiring it (the next request reloads it)", res.adapter_id, res.load_id)
                if self._current.get(res.adapter_id) is res:
                    del self._current[res.adapter_id]
                self._retire(res)

    # ---- introspection -------------------------------------------------------------------

    def current(self, adapter_id: str) -> ResidentAdapter | None:
        return self._current.get(adapter_id)

    def resident_ids(self) -> list[str]:
        with self._lock:
            return list(self._current)

    def stats(self) -> dict:
        with self._lock:
            used = {k: self._a[k].shape[1] - len(f) for k, f in self._free.items()}
            return {
                "resident": len(self._current),
                "retired_pinned": len(self._retired_pinned),
                "rows_used": used,
                "rows_capacity": {k: self._a[k].shape[1] for k in self._a},
                # What the pool really holds in device memory (capacity, not rows in use).
                "bytes_allocated": sum(t.numel() * t.element_size() for t in (*self._a.values(), *self._b.values())),
                "bytes_used": sum(
                    used[k] * self.shape.num_layers * (self._a[k].shape[2] + self._b[k].shape[2]) * self._a[k].element_size()
                    for k in used
                ),
            }
