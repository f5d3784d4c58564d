"""Paged attention behind one interface: ``attend(li, q, k, v, ctx)``.

The model runner builds a ``StepContext`` once per step (``prepare``: where each token's K/V
goes, the decode plan, the padded index maps of the prefill rows) and every layer's attention
reads it, as nano-vllm's ``utils/context.py`` hands per-step metadata to its attention layers.
An ``AttentionBackend`` owns the KV cache's layout and everything that reads or writes it: a
CUDA paged-attention kernel, or flash-attention on a GPU, is another backend.

One backend today, ``TorchAttention``: plain torch on every device, over one pool
``kv: [layers, 2, num_blocks + 1, n_kv, block_size, head_dim]`` (the last block is the null
block, below). Per kind of row in a step:

- decode rows (one token each at its own position): block-wise batched matmuls that read the
  pool's blocks where they are (``decode_plan``);
- fresh prefill rows (a new prompt from position 0, attending to itself): one batched causal
  SDPA over the rows right-padded to the longest;
- continuing rows (the rest of a chunked prompt, or after a prefix-cache hit): one SDPA over
  keys gathered through the rows' block tables, padded with the null block;
- scoring (``prepare_scoring``: echo's prompt logprobs): plain causal SDPA, no cache at all.

Allocator order. ``decode_plan`` reads a step's blocks in a few contiguous ranges of the pool,
which is cheap only while the blocks in use are packed low: BlockPool (kv_cache.py) hands out
the lowest free block first for this reason (``TorchAttention.block_order``). It is a speed
matter, never a correctness one: any order gives the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F


class Row(Protocol):
    """What attention reads of a step's row (model_runner.SeqChunk)."""

    tokens: list[int]
    start: int
    blocks: list[int]


@dataclass(slots=True)
class StepContext:
    """One step's metadata, built once (``AttentionBackend.prepare``) and read by every layer.

    ``kv``: the runner's cache tensor; ``slot_block`` / ``slot_off`` [N]: the block and offset
    each token's K/V is written to (None when scoring: nothing is written). The rest is the
    backend's own (for TorchAttention: the decode plan and the padded index maps)."""

    kv: torch.Tensor | None
    slot_block: torch.Tensor | None = None  # [N]
    slot_off: torch.Tensor | None = None  # [N]
    num_decode: int = 0
    decode: tuple | None = None  # decode_plan's result
    fresh: tuple | None = None  # (idx [W, Tmax], valid [W, Tmax], idx[valid])
    cont: tuple | None = None  # (tables [C * nbmax], nbmax, idx [C, Lmax], valid, idx[valid], mask [C, 1, Lmax, E])
    lora: Any = None  # the step's LoRABatch (lora/), handed to the LoRA layers by the runner


class AttentionBackend(Protocol):
    """How a step's attention reads and writes the paged KV cache."""

    name: str
    block_order: str  # the allocation order its reads are fastest with (documented for BlockPool)

    def kv_shape(self, num_layers: int, num_blocks: int) -> tuple[int, ...]: ...
    def zero_blocks(self, kv: torch.Tensor, blocks: list[int]) -> None: ...
    def prepare(self, kv: torch.Tensor, rows: Sequence[Row], num_decode: int, offsets: list[int],
                slot_block: torch.Tensor, slot_off: torch.Tensor) -> StepContext: ...
    def prepare_scoring(self) -> StepContext: ...
    def attend(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor: ...


_MAX_RANGES = 4  # pool ranges a decode step reads in place (a matmul pair per range and layer)
_MIN_GAP = 48  # blocks: a smaller gap is read through (a range costs about as much as 48 blocks of attention)


def _cover(blocks: list[int]) -> list[tuple[int, int]]:
    """At most ``_MAX_RANGES`` ranges [lo, hi) covering sorted ``blocks``, split at the widest gaps."""
    if not blocks:
        return []
    gaps = sorted(((blocks[i + 1] - blocks[i], i) for i in range(len(blocks) - 1) if blocks[i + 1] - blocks[i] > _MIN_GAP),
                  reverse=True)[: _MAX_RANGES - 1]
    cuts = sorted(i for _, i in gaps)
    out, lo = [], blocks[0]
    for i in cuts:
        out.append((lo, blocks[i] + 1))
        lo = blocks[i + 1]
    out.append((lo, blocks[-1] + 1))
    return out


def _padded_index(rows: list[tuple[int, Row]], offsets: list[int], dev) -> tuple:
    """For rows ``(i, chunk)`` of a step: ``idx [W, Tmax]``, each row's flat token positions
    right-padded with its own last one; ``valid [W, Tmax]``, the real ones; ``idx[valid]``."""
    lens = [len(r.tokens) for _, r in rows]
    idx = torch.empty(len(rows), max(lens), dtype=torch.long)
    for j, ((i, _), n) in enumerate(zip(rows, lens)):
        idx[j, :n] = torch.arange(offsets[i], offsets[i] + n)
        idx[j, n:] = offsets[i] + n - 1
    idx = idx.to(dev)
    valid = (torch.arange(idx.shape[1])[None, :] < torch.tensor(lens)[:, None]).to(dev)
    return idx, valid, idx[valid]


def make_backend(**dims) -> AttentionBackend:
    """The attention backend for a model runner (``dims``: TorchAttention's keyword arguments).

    TorchAttention on every device today; a CUDA paged-attention or flash-attention backend is
    chosen here (by ``dims["device"]``), so adding one touches this file only."""
    return TorchAttention(**dims)


class TorchAttention:
    """Paged attention in plain torch (CPU and GPU); see the module docstring."""

    name = "torch"
    # BlockPool (kv_cache.py) hands out the lowest free block first: decode_plan reads the
    # pool's low blocks in place, in a few ranges, instead of copying a step's blocks out.
    block_order = "lowest_first"

    def __init__(self, *, n_heads: int, n_kv: int, head_dim: int, scale: float, block_size: int, null_block: int,
                 dtype: torch.dtype, device: torch.device):
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.group = n_heads // n_kv
        self.gqa = n_kv != n_heads
        self.scale = scale
        self.block_size = block_size
        # The block past the pool's: the pool never hands it out and nothing writes it, so it
        # stays zero; padding in a block table points there (model_runner.py says why).
        self.null_block = null_block
        self.dtype, self.device = dtype, device
        self.decode_paths = {"inplace": 0, "mixed": 0, "gather": 0}  # how decode steps read the pool (stats)

    # ---- the cache -------------------------------------------------------------------------

    def kv_shape(self, num_layers: int, num_blocks: int) -> tuple[int, ...]:
        return (num_layers, 2, num_blocks, self.n_kv, self.block_size, self.head_dim)

    def zero_blocks(self, kv: torch.Tensor, blocks: list[int]) -> None:
        kv.index_fill_(2, torch.tensor(blocks, dtype=torch.long, device=self.device), 0)

    # ---- per step --------------------------------------------------------------------------

    def prepare(self, kv: torch.Tensor, rows: Sequence[Row], num_decode: int, offsets: list[int],
                slot_block: torch.Tensor, slot_off: torch.Tensor) -> StepContext:
        """The step's metadata: ``rows[:num_decode]`` decode rows, the rest prefill chunks;
        ``offsets[i]``: row i's first token in the flattened step; ``slot_*`` [N]: where each
        token's K/V goes."""
        dev, bs = self.device, self.block_size
        D = num_decode
        ctx = StepContext(kv=kv, slot_block=slot_block, slot_off=slot_off, num_decode=D)
        ctx.decode = self.decode_plan(rows[:D]) if D else None
        fresh = [(i, r) for i, r in enumerate(rows[D:], D) if r.start == 0 and len(r.tokens) > 1]
        cont = [(i, r) for i, r in enumerate(rows[D:], D) if not (r.start == 0 and len(r.tokens) > 1)]
        if fresh:
            ctx.fresh = _padded_index(fresh, offsets, dev)  # [W, Tmax] x2, [sum(lens)]
        if cont:
            # Rows that continue a sequence attend to the KV already in their blocks: one padded
            # batch, keys gathered through the block tables [C, nbmax] (padding reads the null
            # block: zeros, masked). Query j of row i (position start_i + j) sees keys 0 .. start_i + j.
            c_lens = [len(r.tokens) for _, r in cont]
            c_ends = [r.start + n for (_, r), n in zip(cont, c_lens)]
            c_nb = -(-max(c_ends) // bs)
            tables: list[int] = []
            for (_, r), e in zip(cont, c_ends):
                nb_i = -(-e // bs)
                tables += r.blocks[:nb_i] + [self.null_block] * (c_nb - nb_i)
            c_tables = torch.tensor(tables, dtype=torch.long, device=dev)  # [C * nbmax]
            c_idx, c_valid, c_out = _padded_index(cont, offsets, dev)  # [C, Lmax] x2, [sum(lens)]
            q_pos = torch.tensor([r.start for _, r in cont], device=dev)[:, None] + torch.arange(c_idx.shape[1], device=dev)
            c_mask = (torch.arange(c_nb * bs, device=dev)[None, None, :] <= q_pos[:, :, None])[:, None]  # [C, 1, Lmax, E]
            ctx.cont = (c_tables, c_nb, c_idx, c_valid, c_out, c_mask)
        return ctx

    def prepare_scoring(self) -> StepContext:
        """Plain causal attention over the forward's own tokens: no cache read or written."""
        return StepContext(kv=None)

    def attend(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """q: [1, H, N, hd], k/v: [1, KV, N, hd] -> [1, H, N, hd]; writes the step's K/V into the
        cache first (each token's into its row's block), then attends per kind of row."""
        if ctx.kv is None:  # scoring
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.gqa)
        qt, kt, vt = q[0], k[0], v[0]
        kv, blk_t, off_t = ctx.kv, ctx.slot_block, ctx.slot_off
        kv[li, 0, blk_t, :, off_t] = kt.transpose(0, 1)  # [N, KV, hd] into their blocks
        kv[li, 1, blk_t, :, off_t] = vt.transpose(0, 1)
        out = torch.empty_like(qt)  # [H, N, hd]
        D = ctx.num_decode
        if D:
            qg = qt[:, :D].transpose(0, 1).reshape(D, self.n_kv, self.group, self.head_dim)  # [D, KV, G, hd]
            o = self.decode_attention(kv, li, qg, ctx.decode)  # [D, KV, G, hd]
            out[:, :D] = o.reshape(D, self.n_heads, self.head_dim).transpose(0, 1)
        if ctx.fresh is not None:
            f_idx, f_valid, f_out = ctx.fresh
            qf = qt[:, f_idx].transpose(0, 1)  # [W, H, Tmax, hd]
            kf, vf = kt[:, f_idx].transpose(0, 1), vt[:, f_idx].transpose(0, 1)  # [W, KV, Tmax, hd]
            # Right padding + causal mask: real tokens never see the pad tokens after them.
            of = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=self.scale, enable_gqa=self.gqa)
            out[:, f_out] = of.transpose(0, 1)[:, f_valid]  # [H, sum(lens), hd]
        if ctx.cont is not None:
            c_tables, c_nb, c_idx, c_valid, c_out, c_mask = ctx.cont
            kr, vr = self._gather_keys(kv, li, c_tables, c_nb)  # [C, KV, E, hd]
            qc = qt[:, c_idx].transpose(0, 1)  # [C, H, Lmax, hd]
            oc = F.scaled_dot_product_attention(qc, kr, vr, attn_mask=c_mask, scale=self.scale, enable_gqa=self.gqa)
            out[:, c_out] = oc.transpose(0, 1)[:, c_valid]  # [H, sum(lens), hd]
        return out[None]

    def _gather_keys(self, kv: torch.Tensor, li: int, tables: torch.Tensor, nb: int) -> list[torch.Tensor]:
        """K and V of the blocks the continuing rows read: [C, KV, E, hd] each (a copy)."""
        c = tables.shape[0] // nb
        out = []
        for cache in (kv[li, 0], kv[li, 1]):
            g = cache.index_select(0, tables).view(c, nb, self.n_kv, self.block_size, self.head_dim)
            out.append(g.transpose(1, 2).reshape(c, self.n_kv, nb * self.block_size, self.head_dim))
        return out

    # ---- decode ----------------------------------------------------------------------------

    def decode_plan(self, rows: Sequence[Row]) -> tuple:
        """How one step's decode rows read the pool, shared by every layer.

        Each row's keys are its blocks ``0 .. pos // block_size``. Attention is scored per
        (row, block) pair, so a row reads its own blocks only and one long sequence among short
        ones costs its own span (a dense batch would read the longest span for every row).

        Copying a step's blocks out of the pool costs more than the attention itself on these
        CPUs, so blocks are read where they are: the pool's blocks in a few ranges ``[lo, hi)``
        that cover the distinct blocks in use (the allocator hands out low blocks first, so one
        or two ranges usually do), each scored by one batched matmul. A block in a range that no
        decode row reads is scored against row 0's query and its result is sent to a dummy
        output row. Pairs that read a block already taken by another row (a shared prefix), and
        every pair when the ranges would cover more than twice the blocks in use, read a copy
        (``index_select``) instead.

        Returns (m, m_inplace, nb, S, ranges, extra blocks, mask, q_owner, o_owner, read, write):
        ``m`` rows of the score matrix (the ranges' blocks, then the copied ones), each row's
        ``nb`` padded blocks (``S = nb * block_size`` keys), and the index maps between them.
        """
        dev, bs = self.device, self.block_size
        D = len(rows)
        n_blk = [r.start // bs + 1 for r in rows]
        pair_blocks = [b for r, n in zip(rows, n_blk) for b in r.blocks[:n]]
        pair_rows = [i for i, n in enumerate(n_blk) for _ in range(n)]
        distinct = sorted(set(pair_blocks))
        ranges = _cover(distinct)
        if sum(hi - lo for lo, hi in ranges) > 2 * len(distinct):
            ranges = []
        where: dict[int, int] = {}  # block -> its score-matrix row, for blocks read in place
        m = 0
        spans = []
        for lo, hi in ranges:
            for blk in range(lo, hi):
                where[blk] = m + blk - lo
            spans.append((lo, hi, m))
            m += hi - lo
        m_inplace = m
        src: list[int] = []
        extra: list[int] = []
        taken: set[int] = set()
        for blk in pair_blocks:
            if blk in where and blk not in taken:
                taken.add(blk)
                src.append(where[blk])
            else:
                src.append(m)
                extra.append(blk)
                m += 1
        q_owner = [0] * m
        o_owner = [D] * m  # dummy output row
        for j, i in zip(src, pair_rows):
            q_owner[j] = o_owner[j] = i
        nb = max(n_blk)
        S = nb * bs
        # [D * nb]: score-matrix row of row i's t-th block; padding reads row 0 (masked) and
        # writes into the spare row m of the probability matrix.
        read: list[int] = []
        write: list[int] = []
        k = 0
        for n in n_blk:
            seg = src[k : k + n]
            read += seg + [0] * (nb - n)
            write += seg + [m] * (nb - n)
            k += n
        pos = torch.tensor([r.start for r in rows], dtype=torch.long, device=dev)
        masked = torch.arange(S, device=dev)[None, None, None, :] > pos[:, None, None, None]  # [D, 1, 1, S]
        self.decode_paths["inplace" if not extra else "mixed" if spans else "gather"] += 1
        t = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731
        return (m, m_inplace, nb, S, spans, t(extra) if extra else None, masked,
                t(q_owner), t(o_owner), t(read), t(write))

    def decode_attention(self, kv: torch.Tensor, li: int, qg: torch.Tensor, plan: tuple) -> torch.Tensor:
        """qg: [D, KV, G, hd], one query per decode row -> [D, KV, G, hd]."""
        m, m_in, nb, S, spans, extra, masked, q_owner, o_owner, read, write = plan
        D, KV, G, hd = qg.shape
        bs = self.block_size
        kc, vc = kv[li, 0], kv[li, 1]  # [num_blocks, KV, bs, hd]
        if extra is not None:
            ke, ve = kc.index_select(0, extra), vc.index_select(0, extra)  # [m - m_in, KV, bs, hd] copies
        # Plain batched matmuls: one query token per row, so SDPA's kernel launch costs more than
        # it saves; grouping query heads per KV head handles GQA without copying K/V.
        qb = qg.index_select(0, q_owner)  # [m, KV, G, hd]
        scores = qg.new_empty(m, KV, G, bs)
        for lo, hi, o in spans:
            torch.matmul(qb[o : o + hi - lo], kc[lo:hi].transpose(-1, -2), out=scores[o : o + hi - lo])
        if extra is not None:
            torch.matmul(qb[m_in:], ke.transpose(-1, -2), out=scores[m_in:])
        rows = scores.index_select(0, read).view(D, nb, KV, G, bs).permute(0, 2, 3, 1, 4).reshape(D, KV, G, S)
        rows = rows.mul_(self.scale).masked_fill_(masked, float("-inf"))  # [D, KV, G, S]
        probs = rows.softmax(dim=-1) if self.dtype == torch.float32 else rows.float().softmax(dim=-1).to(self.dtype)
        per_block = probs.view(D, KV, G, nb, bs).permute(0, 3, 1, 2, 4).reshape(D * nb, KV, G, bs)
        pb = qg.new_empty(m + 1, KV, G, bs)
        pb.index_copy_(0, write, per_block)  # [m + 1, KV, G, bs]: row m takes the padding
        out = qg.new_zeros(D + 1, KV, G, hd)  # row D takes the dummy blocks' results
        for lo, hi, o in spans:
            out.index_add_(0, o_owner[o : o + hi - lo], torch.matmul(pb[o : o + hi - lo], vc[lo:hi]))
        if extra is not None:
            out.index_add_(0, o_owner[m_in:], torch.matmul(pb[m_in:m], ve))
        return out[:D]
