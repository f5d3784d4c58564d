"""Base model loading and the forward pass over a paged KV cache.

We load the Hugging Face model as it is (so bitsandbytes quantization, weight formats and
rotary scaling come from transformers) but run our own decoder loop over its modules:
transformers' generic forward builds masks and cache objects per call, and cannot give each
row of a batch its own position, which iteration-level batching needs. The loop calls the
model's own submodules (norms, projections, MLP, rotary embedding), so numerics match.

KV cache: one pool of fixed-size blocks for every layer, ``kv: [layers, 2, num_blocks, n_kv,
block_size, head_dim]``, sized from a memory budget; each sequence reads and writes it through
its block table (kv_cache.py keeps the books). Attention is plain torch on every device: one
batched SDPA for new prompts, SDPA over a gathered block table for chunks that continue a
sequence, and block-wise batched matmuls for decode rows (``_decode_plan``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.engine.config import EngineConfig
from serve_app.engine.kv_cache import BlockPool
from serve_app.engine.lora_layers import LoRAContext, LoRALinear
from serve_app.engine.lora_manager import LoRABatch
from serve_app.engine.lora_weights import BaseShape

logger = logging.getLogger(__name__)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def resolve_device_dtype(cfg: EngineConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


def quantization_config(kind: str, dtype: torch.dtype):
    """BitsAndBytesConfig for an NF4 or int8 base (None for an unquantized one)."""
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base_model(cfg: EngineConfig):
    """Load tokenizer + causal LM from a local folder; never touches a model hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cfg.model)
    if not (path / "config.json").is_file():
        raise ValueError(f"base model folder {path} has no config.json; pass a local Hugging Face model folder")
    device, dtype = resolve_device_dtype(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    kwargs = dict(dtype=dtype, local_files_only=True)
    qcfg = quantization_config(cfg.quantization, dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if qcfg is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, device, dtype


def base_shape(model: nn.Module, kinds: tuple[str, ...]) -> BaseShape:
    layers = model.model.layers
    shapes = {}
    for kind in kinds:
        parent = layers[0].self_attn if kind in _ATTN else layers[0].mlp
        mod = getattr(parent, kind, None)
        if mod is None:
            raise ValueError(f"base model has no {kind} projection; remove it from lora_target_modules")
        shapes[kind] = (mod.in_features, mod.out_features)
    name = getattr(model.config, "_name_or_path", "") or ""
    return BaseShape(num_layers=len(layers), kinds=shapes, name=name)


def wrap_lora_layers(model: nn.Module, kinds: tuple[str, ...], ctx: LoRAContext) -> None:
    for i, layer in enumerate(model.model.layers):
        for kind in kinds:
            parent = layer.self_attn if kind in _ATTN else layer.mlp
            setattr(parent, kind, LoRALinear(getattr(parent, kind), kind, i, ctx))


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


def _padded_index(rows: list[tuple[int, "SeqChunk"]], offsets: list[int], dev) -> tuple:
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


@dataclass(slots=True)
class SeqChunk:
    """One sequence's share of a step: ``tokens`` at positions ``start ..``, its KV written into
    ``blocks`` (its block table, covering every position up to the chunk's last). ``every_token``:
    the step returns this row's logits at each of its tokens, not only the last (a prompt's own
    logprobs, computed as its chunks pass instead of in a second forward)."""

    tokens: list[int]
    start: int
    blocks: list[int]
    every_token: bool = False


class ModelRunner:
    """Forward passes over the model's own modules, reading and writing a paged KV cache.

    The pool is one tensor ``kv: [layers, 2, num_blocks, n_kv, block_size, head_dim]``; the
    bookkeeping (who holds which block, the prefix cache) is ``self.blocks``, a BlockPool.
    """

    def __init__(self, model: nn.Module, *, num_blocks: int, block_size: int, max_model_len: int, ctx: LoRAContext,
                 prefix_caching: bool = True):
        cfg = model.config
        self.model = model
        self.ctx = ctx
        self.inner = model.model
        self.layers = list(model.model.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = getattr(self.layers[0].self_attn, "scaling", self.head_dim**-0.5)
        self.gqa = self.n_kv != self.n_heads
        self.max_model_len = max_model_len
        self.device = next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype
        self._rope_table(cfg)
        self.block_size = block_size
        self.blocks = BlockPool(num_blocks, block_size, prefix_caching=prefix_caching)
        # One block past the pool's: the null block. The pool never hands it out and nothing writes
        # it, so it stays zero; padding in a block table points there, never at a block another
        # sequence holds (whose values may be anything, NaN included, and a boolean mask does
        # not stop NaN: SDPA adds -inf to a NaN score and multiplies a zero probability by a NaN
        # value).
        self.null_block = num_blocks
        with torch.inference_mode():  # the cache is written only under inference mode; allocate it there too
            self.kv = torch.zeros(len(self.layers), 2, num_blocks + 1, self.n_kv, block_size, self.head_dim,
                                  dtype=self.dtype, device=self.device)
        self.decode_paths = {"inplace": 0, "mixed": 0, "gather": 0}  # how decode steps read the pool (stats)
        # The context length at which a prefill token's attention (4 * heads * head_dim FLOPs per
        # key and layer) costs as much as its projections and MLP (2 FLOPs per weight): the
        # scheduler charges a chunk's attention against the token budget with it (W1: ~1,500;
        # Llama-2-7B: ~25,000, so there it barely matters).
        q_dim, kv_dim, inter = self.n_heads * self.head_dim, self.n_kv * self.head_dim, cfg.intermediate_size
        linear_per_layer = cfg.hidden_size * (2 * q_dim + 2 * kv_dim + 3 * inter)
        self.attn_ctx_ref = linear_per_layer / (2 * q_dim)
        # A token's logits (lm_head) in the same units: what a prompt position costs on top when
        # its logprobs are asked (SmolLM2: 0.27, Llama-2-7B: 0.02).
        self.logits_cost = cfg.vocab_size * cfg.hidden_size / (len(self.layers) * linear_per_layer)

    @staticmethod
    def bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
        cfg = model.config
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * len(model.model.layers) * n_kv * head_dim * torch.empty((), dtype=dtype).element_size()

    def _rope_table(self, cfg) -> None:
        """cos/sin for every position, computed once with the model's own rotary module.

        Saves a handful of ops per forward; skipped for rope types whose tables depend on the
        current sequence length (dynamic NTK, longrope), which keep computing per call.
        """
        params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        self.cos = self.sin = None
        if params.get("rope_type", "default") in ("dynamic", "longrope"):
            return
        pos = torch.arange(self.max_model_len, device=self.device)[None]
        probe = torch.zeros(1, 1, device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            cos, sin = self.inner.rotary_emb(probe, pos)  # [1, max_len, head_dim]
        self.cos, self.sin = cos[0], sin[0]

    def prefill(self, prompts: list[list[int]], lora: LoRABatch | None) -> torch.Tensor:
        """Whole prompts from position 0 in scratch blocks, freed after (tests and benchmarks
        compare logits this way; the served path goes through ``step``): last-token logits
        [B, vocab]. ``lora`` is prepared per token, or per row when every prompt has one length."""
        if lora is not None and len({len(p) for p in prompts}) > 1 and lora.rows == len(prompts) and not lora.uniform:
            raise ValueError("a per-row LoRABatch needs prompts of one length; prepare it per token")
        tables: list[list[int]] = []
        try:
            for p in prompts:
                tables.append(table := [])
                for _ in range(self.blocks.blocks_for(len(p))):
                    if (block := self.blocks.allocate()) is None:
                        raise RuntimeError("the KV pool is too small for these prompts")
                    table.append(block)
            return self.step([SeqChunk(p, 0, t) for p, t in zip(prompts, tables)], 0, lora)
        finally:
            for t in tables:
                self.blocks.free(t)

    def _decode_plan(self, rows: list[SeqChunk]) -> tuple:
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

        Returns (m, nb, S, ranges, extra blocks, mask, q_owner, o_owner, read, write): ``m``
        rows of the score matrix (the ranges' blocks, then the copied ones), each row's ``nb``
        padded blocks (``S = nb * block_size`` keys), and the index maps between them.
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

    def _decode_attention(self, li: int, qg: torch.Tensor, plan: tuple) -> torch.Tensor:
        """qg: [D, KV, G, hd], one query per decode row -> [D, KV, G, hd]."""
        m, m_in, nb, S, spans, extra, masked, q_owner, o_owner, read, write = plan
        D, KV, G, hd = qg.shape
        bs = self.block_size
        kc, vc = self.kv[li, 0], self.kv[li, 1]  # [num_blocks, KV, bs, hd]
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

    @torch.inference_mode()
    def step(self, rows: list[SeqChunk], num_decode: int, lora: LoRABatch | None) -> torch.Tensor:
        """One forward for a whole engine step, every token of it flattened into one sequence.

        ``rows[:num_decode]`` are decode rows (one token each at its own position); the rest
        are prefill chunks: from position 0 (a new prompt, attending to itself) or from
        ``start > 0`` (the rest of a chunked prompt, or after a prefix-cache hit: attending to
        the KV already in its blocks). Every token's K/V is written into its row's blocks.

        The projections, norms and MLP run once over all N tokens (on these CPUs per-op overhead
        dominates, so one forward beats a prefill forward plus a decode forward); attention runs
        per kind of row. ``lora`` is per flattened token in this order. Returns float logits
        ``[sum(len(r.tokens) if r.every_token else 1), vocab]``: each row's last token, or each of
        its tokens for a row that asks (rows in order); ``[len(rows), vocab]`` when none does.
        """
        dev, bs = self.device, self.block_size
        dirty = self.blocks.take_dirty()
        if dirty:  # blocks new to their sequence: no stale value of an earlier owner survives
            self.kv.index_fill_(2, torch.tensor(dirty, dtype=torch.long, device=dev), 0)
        D = num_decode
        ids: list[int] = []
        positions: list[int] = []
        slot_block: list[int] = []
        slot_off: list[int] = []
        last: list[int] = []
        for r in rows:
            n = len(r.tokens)
            ids += r.tokens
            span = range(r.start, r.start + n)
            positions += span
            slot_block += [r.blocks[p // bs] for p in span]
            slot_off += [p % bs for p in span]
            if r.every_token:
                last += range(len(ids) - n, len(ids))
            else:
                last.append(len(ids) - 1)
        if any(len(r.tokens) != 1 for r in rows[:D]):
            raise ValueError("decode rows carry one token each")
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)[None]  # [1, N]
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)  # [N]
        blk_t = torch.tensor(slot_block, dtype=torch.long, device=dev)  # [N]
        off_t = torch.tensor(slot_off, dtype=torch.long, device=dev)  # [N]
        group = self.n_heads // self.n_kv

        plan = self._decode_plan(rows[:D]) if D else None
        fresh = [(i, r) for i, r in enumerate(rows[D:], D) if r.start == 0 and len(r.tokens) > 1]
        cont = [(i, r) for i, r in enumerate(rows[D:], D) if not (r.start == 0 and len(r.tokens) > 1)]
        offsets = [0]
        for r in rows:
            offsets.append(offsets[-1] + len(r.tokens))
        if fresh:
            f_idx, f_valid, f_out = _padded_index(fresh, offsets, dev)  # [W, Tmax] x2, [sum(lens)]
        if cont:
            # Rows that continue a sequence attend to the KV already in their blocks: one padded
            # batch, keys gathered through the block tables [C, nbmax] (padding reads the null
            # block: zeros, masked). Query j of row i (position start_i + j) sees keys 0 .. start_i + j.
            c_lens = [len(r.tokens) for _, r in cont]
            c_ends = [r.start + n for (_, r), n in zip(cont, c_lens)]
            c = len(cont)
            c_nb = self.blocks.blocks_for(max(c_ends))
            tables: list[int] = []
            for (_, r), e in zip(cont, c_ends):
                nb_i = self.blocks.blocks_for(e)
                tables += r.blocks[:nb_i] + [self.null_block] * (c_nb - nb_i)
            c_tables = torch.tensor(tables, dtype=torch.long, device=dev)  # [C * nbmax]
            c_idx, c_valid, c_out = _padded_index(cont, offsets, dev)  # [C, Lmax] x2, [sum(lens)]
            q_pos = torch.tensor([r.start for _, r in cont], device=dev)[:, None] + torch.arange(c_idx.shape[1], device=dev)
            c_mask = (torch.arange(c_nb * bs, device=dev)[None, None, :] <= q_pos[:, :, None])[:, None]  # [C, 1, Lmax, E]

        def gather_keys(li):  # -> [C, KV, E, hd] each (a copy of the blocks the rows read)
            out = []
            for cache in (self.kv[li, 0], self.kv[li, 1]):
                g = cache.index_select(0, c_tables).view(c, c_nb, self.n_kv, bs, self.head_dim)
                out.append(g.transpose(1, 2).reshape(c, self.n_kv, c_nb * bs, self.head_dim))
            return out

        def attend(li, q, k, v):  # q: [1, H, N, hd], k/v: [1, KV, N, hd]
            qt, kt, vt = q[0], k[0], v[0]
            self.kv[li, 0, blk_t, :, off_t] = kt.transpose(0, 1)  # [N, KV, hd] into their blocks
            self.kv[li, 1, blk_t, :, off_t] = vt.transpose(0, 1)
            out = torch.empty_like(qt)  # [H, N, hd]
            if D:
                qg = qt[:, :D].transpose(0, 1).reshape(D, self.n_kv, group, self.head_dim)  # [D, KV, G, hd]
                o = self._decode_attention(li, qg, plan)  # [D, KV, G, hd]
                out[:, :D] = o.reshape(D, self.n_heads, self.head_dim).transpose(0, 1)
            if fresh:
                qf = qt[:, f_idx].transpose(0, 1)  # [W, H, Tmax, hd]
                kf, vf = kt[:, f_idx].transpose(0, 1), vt[:, f_idx].transpose(0, 1)  # [W, KV, Tmax, hd]
                # Right padding + causal mask: real tokens never see the pad tokens after them.
                of = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=self.scale, enable_gqa=self.gqa)
                out[:, f_out] = of.transpose(0, 1)[:, f_valid]  # [H, sum(lens), hd]
            if cont:
                kr, vr = gather_keys(li)  # [C, KV, E, hd]
                qc = qt[:, c_idx].transpose(0, 1)  # [C, H, Lmax, hd]
                oc = F.scaled_dot_product_attention(qc, kr, vr, attn_mask=c_mask, scale=self.scale, enable_gqa=self.gqa)
                out[:, c_out] = oc.transpose(0, 1)[:, c_valid]  # [H, sum(lens), hd]
            return out[None]

        hidden = self._forward(ids_t, pos_t[None], attend, lora)  # [1, N, hidden]
        return self._logits(hidden[0, torch.tensor(last, device=dev)])

    def _forward(self, ids, positions, attend, lora: LoRABatch | None) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        bsz, t = ids.shape
        x = self.inner.embed_tokens(ids)  # [B, T, hidden]
        if self.cos is not None:
            cos, sin = self.cos[positions], self.sin[positions]  # [B, T, head_dim]
        else:
            cos, sin = self.inner.rotary_emb(x, positions)
        self.ctx.set(lora)
        try:
            for li, layer in enumerate(self.layers):
                attn = layer.self_attn
                h = layer.input_layernorm(x)
                q = attn.q_proj(h).view(bsz, t, -1, self.head_dim)
                k = attn.k_proj(h).view(bsz, t, -1, self.head_dim)
                v = attn.v_proj(h).view(bsz, t, -1, self.head_dim)
                if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
                    q, k = attn.q_norm(q), attn.k_norm(k)
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                o = attend(li, q, k, v)  # [B, H, T, hd]
                x = x + attn.o_proj(o.transpose(1, 2).reshape(bsz, t, -1))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        finally:
            self.ctx.set(None)
        return x

    def _logits(self, last_hidden: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, vocab]
        return self.model.lm_head(self.inner.norm(last_hidden)).float()

    @torch.inference_mode()
    def score(self, ids: list[int], lora: LoRABatch | None) -> torch.Tensor:
        """Logits [T, vocab] at every position of ``ids``: one scoring forward with plain causal
        SDPA, no KV cache read or written (echo's prompt logprobs). ``lora``: prepared per token
        (``len(ids)`` entries) or None for the base."""
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)[None]  # [1, T]
        positions = torch.arange(len(ids), dtype=torch.long, device=dev)[None]  # [1, T]

        def attend(li, q, k, v):  # q: [1, H, T, hd], k/v: [1, KV, T, hd]
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.gqa)

        hidden = self._forward(ids_t, positions, attend, lora)  # [1, T, hidden]
        return self._logits(hidden[0])
