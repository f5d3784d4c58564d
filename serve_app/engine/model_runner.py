"""The forward pass over a paged KV cache: ``step`` = prepare -> forward -> logits.

We load the Hugging Face model as it is (loader.py) but run our own decoder loop over its
modules: transformers' generic forward builds masks and cache objects per call, and cannot give
each row of a batch its own position, which iteration-level batching needs. The loop calls the
model's own submodules (norms, projections, MLP, rotary embedding) through its architecture's
spec (arch/), so numerics match.

A step flattens every token of every row into one sequence (``prepare``), builds the step's
attention metadata once (attention.py, a ``StepContext``), runs the decoder layers over all the
tokens at once (on these CPUs per-op overhead dominates, so one forward beats a prefill forward
plus a decode forward), and returns the logits the engine asked for.

KV cache: one pool of fixed-size blocks for every layer, sized from a memory budget; this runner
owns the tensor only (its layout is the attention backend's). Who holds which block is the
scheduler's KV manager's business (kv_cache.py); each row of a step brings its block table, and
the engine passes the blocks newly handed out (``zero_blocks``) before the forward that first
writes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from serve_app.engine.arch import spec_for
from serve_app.engine.attention import StepContext, make_backend
from serve_app.engine.config import EngineConfig
from serve_app.engine.lora.layers import LoRABatch, LoRAContext

logger = logging.getLogger(__name__)


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

    The pool is one tensor ``kv`` (``attn.kv_shape``: ``[layers, 2, num_blocks + 1, n_kv,
    block_size, head_dim]`` for TorchAttention); the bookkeeping (who holds which block, the
    prefix cache) is the scheduler's ``KVCacheManager`` (kv_cache.py).
    """

    def __init__(self, model: nn.Module, *, num_blocks: int, block_size: int, max_model_len: int, ctx: LoRAContext):
        cfg = model.config
        self.model = model
        self.arch = spec_for(model)
        self.arch.check(cfg, max_model_len)
        self.ctx = ctx
        self.layers = list(self.arch.layers(model))
        self.n_heads, self.n_kv, self.head_dim = self.arch.attention_dims(cfg)
        self.max_model_len = max_model_len
        self.device = next(model.parameters()).device
        self.dtype = self.arch.compute_dtype(model)
        self._rope_table(cfg)
        self.block_size = block_size
        self.num_blocks = num_blocks
        # (kv_cache.py's BlockPool hands out the lowest free block first, the order TorchAttention's
        # decode plan reads fastest: attention.py, ``block_order``.)
        # One block past the pool's: the null block. The pool never hands it out and nothing writes
        # it, so it stays zero; padding in a block table points there, never at a block another
        # sequence holds (whose values may be anything, NaN included, and a boolean mask does
        # not stop NaN: SDPA adds -inf to a NaN score and multiplies a zero probability by a NaN
        # value).
        self.null_block = num_blocks
        scale = self.arch.attention_scale(model, self.head_dim)
        self.attn = make_backend(n_heads=self.n_heads, n_kv=self.n_kv, head_dim=self.head_dim, scale=scale,
                                 block_size=block_size, null_block=self.null_block, dtype=self.dtype,
                                 device=self.device)
        with torch.inference_mode():  # the cache is written only under inference mode; allocate it there too
            self.kv = torch.zeros(self.attn.kv_shape(len(self.layers), num_blocks + 1), dtype=self.dtype,
                                  device=self.device)
        self.decode_paths = self.attn.decode_paths  # how decode steps read the pool (stats)
        # The context length at which a prefill token's attention (4 * heads * head_dim FLOPs per
        # key and layer) costs as much as its projections and MLP (2 FLOPs per weight): the
        # scheduler charges a chunk's attention against the token budget with it (W1: ~1,500;
        # Llama-2-7B: ~25,000, so there it barely matters).
        linear_per_layer = self.arch.linear_params_per_layer(cfg)
        self.attn_ctx_ref = linear_per_layer / (2 * self.n_heads * self.head_dim)
        # A token's logits (lm_head) in the same units: what a prompt position costs on top when
        # its logprobs are asked (SmolLM2: 0.27, Llama-2-7B: 0.02).
        self.logits_cost = cfg.vocab_size * cfg.hidden_size / (len(self.layers) * linear_per_layer)

    @staticmethod
    def kv_blocks(model: nn.Module, dtype: torch.dtype, device: torch.device, cfg: EngineConfig,
                  max_model_len: int) -> int:
        """How many KV blocks the memory budget holds: ``kv_cache_memory_bytes``, else on CUDA
        ``kv_cache_memory_fraction`` of the free memory, else on CPU what the dense cache this
        replaced held at its usual size (as nano-vllm's ``allocate_kv_cache`` sizes its cache)."""
        per_token = ModelRunner.bytes_per_token(model, dtype)
        budget = cfg.kv_cache_memory_bytes
        if budget is None and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * cfg.kv_cache_memory_fraction)
        elif budget is None:  # CPU: what the dense cache this replaced held at its usual size
            budget = per_token * max(cfg.max_num_seqs * min(512, max_model_len), max_model_len)
        num_blocks = budget // (per_token * cfg.block_size)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory_bytes {budget} holds no block of {cfg.block_size} tokens "
                f"({per_token * cfg.block_size} bytes for this model); raise kv_cache_memory_bytes"
            )
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens, %.1f MiB (%d bytes per token); prefix caching %s",
            num_blocks, cfg.block_size, num_blocks * cfg.block_size, num_blocks * cfg.block_size * per_token / 2**20,
            per_token, "on" if cfg.enable_prefix_caching else "off",
        )
        return num_blocks

    @staticmethod
    def bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
        """KV bytes one token takes: K and V per layer."""
        arch = spec_for(model)
        _, n_kv, head_dim = arch.attention_dims(model.config)
        return 2 * len(arch.layers(model)) * n_kv * head_dim * torch.empty((), dtype=dtype).element_size()

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
            cos, sin = self.arch.rotary(self.model, probe, pos)  # [1, max_len, head_dim]
        self.cos, self.sin = cos[0], sin[0]

    @torch.inference_mode()
    def step(self, rows: list[SeqChunk], num_decode: int, lora: LoRABatch | None) -> torch.Tensor:
        """One forward for a whole engine step, every token of it flattened into one sequence.

        ``rows[:num_decode]`` are decode rows (one token each at its own position); the rest
        are prefill chunks: from position 0 (a new prompt, attending to itself) or from
        ``start > 0`` (the rest of a chunked prompt, or after a prefix-cache hit: attending to
        the KV already in its blocks). Every token's K/V is written into its row's blocks.

        The projections, norms and MLP run once over all N tokens; attention runs per kind of
        row (attention.py). ``lora`` is per flattened token in this order. Returns float logits
        ``[sum(len(r.tokens) if r.every_token else 1), vocab]``: each row's last token, or each of
        its tokens for a row that asks (rows in order); ``[len(rows), vocab]`` when none does.
        """
        ids, positions, last, ctx = self.prepare(rows, num_decode, lora)
        hidden = self.forward(ids, positions, ctx)  # [1, N, hidden]
        return self.arch.logits(self.model, hidden[0, last])

    @torch.inference_mode()
    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero blocks newly handed out to a sequence (the KV manager lists them), before the
        forward that writes them: no stale value of an earlier owner survives."""
        if blocks:
            self.attn.zero_blocks(self.kv, blocks)

    def prepare(self, rows: list[SeqChunk], num_decode: int,
                lora: LoRABatch | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StepContext]:
        """Flatten a step's rows: input ids [1, N], positions [1, N], the token indices whose
        logits are returned, and the step's context (attention metadata and the LoRA batch)."""
        dev, bs = self.device, self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slot_block: list[int] = []
        slot_off: list[int] = []
        last: list[int] = []
        offsets = [0]  # row i's first token in the flattened step
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
            offsets.append(len(ids))
        if any(len(r.tokens) != 1 for r in rows[:num_decode]):
            raise ValueError("decode rows carry one token each")
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)[None]  # [1, N]
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)[None]  # [1, N]
        blk_t = torch.tensor(slot_block, dtype=torch.long, device=dev)  # [N]
        off_t = torch.tensor(slot_off, dtype=torch.long, device=dev)  # [N]
        ctx = self.attn.prepare(self.kv, rows, num_decode, offsets, blk_t, off_t)
        ctx.lora = lora
        return ids_t, pos_t, torch.tensor(last, device=dev), ctx

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The decoder over ``ids`` [B, T] at ``positions`` [B, T] -> hidden [B, T, hidden]."""
        arch, hd = self.arch, self.head_dim
        x = arch.embed(self.model, ids)  # [B, T, hidden]
        if self.cos is not None:
            cos, sin = self.cos[positions], self.sin[positions]  # [B, T, head_dim]
        else:
            cos, sin = arch.rotary(self.model, x, positions)
        attend = partial(self.attn.attend, ctx=ctx)  # attend(li, q, k, v)
        self.ctx.set(ctx.lora)
        try:
            for li, layer in enumerate(self.layers):
                x = arch.decoder_layer(li, layer, x, cos, sin, hd, attend)
        finally:
            self.ctx.set(None)
        return x

    @torch.inference_mode()
    def score(self, ids: list[int], lora: LoRABatch | None) -> torch.Tensor:
        """Logits [T, vocab] at every position of ``ids``: one scoring forward with plain causal
        SDPA, no KV cache read or written (echo's prompt logprobs). ``lora``: prepared per token
        (``len(ids)`` entries) or None for the base."""
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)[None]  # [1, T]
        positions = torch.arange(len(ids), dtype=torch.long, device=dev)[None]  # [1, T]
        ctx = self.attn.prepare_scoring()
        ctx.lora = lora
        hidden = self.forward(ids_t, positions, ctx)  # [1, T, hidden]
        return self.arch.logits(self.model, hidden[0])
