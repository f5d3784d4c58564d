"""Base model loading and the forward pass with a per-slot KV cache.

We load the Hugging Face model as it is (so bitsandbytes quantization, weight formats and
rotary scaling come from transformers) but run our own decoder loop over its modules:
transformers' generic forward builds masks and cache objects per call, and cannot give each
row of a batch its own position, which iteration-level batching needs. The loop calls the
model's own submodules (norms, projections, MLP, rotary embedding), so numerics match.

KV cache: per layer ``k, v: [max_num_seqs, n_kv_heads, capacity, head_dim]``. Running
sequences occupy slots 0..B-1 (the engine keeps them compact), so attention reads a plain
view of the cache; capacity grows by doubling up to max_model_len.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.engine.config import EngineConfig
from serve_app.engine.lora_layers import LoRAContext, LoRALinear
from serve_app.engine.lora_manager import LoRABatch
from serve_app.engine.lora_weights import BaseShape

logger = logging.getLogger(__name__)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_LONG_ROWS = 4  # decode rows that may attend alone over a span much longer than the others'
_SOLO_COST = 1024  # a solo row's overhead, in key-rows read (a few extra small ops per layer)
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


class ModelRunner:
    """Prefill and decode over the model's own modules with a slot-indexed KV cache."""

    def __init__(self, model: nn.Module, *, max_num_seqs: int, max_model_len: int, ctx: LoRAContext):
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
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.device = next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype
        self._rope_table(cfg)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._ensure_capacity(min(256, max_model_len))

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

    @torch.inference_mode()  # the cache is written only under inference mode; allocate it there too
    def _ensure_capacity(self, length: int) -> None:
        if length <= self.capacity:
            return
        new = min(self.max_model_len, max(length, 2 * self.capacity))
        shape = (self.max_num_seqs, self.n_kv, new, self.head_dim)
        for cache in (self.k, self.v):
            for i in range(len(self.layers)):
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(cache):
                    fresh[:, :, : self.capacity] = cache[i]
                    cache[i] = fresh
                else:
                    cache.append(fresh)
        self.capacity = new

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy slot ``src``'s KV into slot ``dst`` (its first ``length`` positions: the live ones)."""
        n = self.capacity if length is None else min(length, self.capacity)
        for cache in (self.k, self.v):
            for c in cache:
                c[dst, :, :n] = c[src, :, :n]

    def prefill(self, prompts: list[list[int]], first_slot: int, lora: LoRABatch | None) -> torch.Tensor:
        """Prefill whole prompts into slots first_slot.. through ``step`` (the served path);
        returns last-token logits [B, vocab]. ``lora`` is prepared per token, or per row when
        every prompt has the same length (tests and benchmarks call it that way)."""
        if lora is not None and len({len(p) for p in prompts}) > 1 and lora.rows == len(prompts) and not lora.uniform:
            raise ValueError("a per-row LoRABatch needs prompts of one length; prepare it per token")
        return self.step([], [], [(first_slot + i, p) for i, p in enumerate(prompts)], None, lora)

    def _decode_plan(self, positions: list[int]) -> tuple:
        """How one step's decode rows read the cache: (S, mask [D, 1, 1, S], long rows).

        Rows 0..D-1 attend in one batched matmul over the first S positions of their slots. A
        dense batch reads max(span) keys for every row, so one long sequence among short ones
        would multiply every row's attention traffic; instead up to ``_LONG_ROWS`` outliers
        attend on their own over their full span, and S is the longest span of the others
        (chosen by the keys read, counting a solo row as ``_SOLO_COST`` key-rows of overhead).
        """
        D = len(positions)
        spans = [p + 1 for p in positions]
        order = sorted(range(D), key=lambda i: -spans[i])
        best_k, best_cost = 0, None
        for k in range(min(_LONG_ROWS, D - 1) + 1):
            cost = D * spans[order[k]] + sum(spans[order[j]] for j in range(k)) + k * _SOLO_COST
            if best_cost is None or cost < best_cost:
                best_k, best_cost = k, cost
        long_rows = [(i, spans[i]) for i in order[:best_k]]
        S = spans[order[best_k]]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        # Additive mask: row b sees its own positions 0..pos[b] only (a long row's batched
        # result is garbage, finite, and replaced by its solo result).
        mask = torch.zeros(D, 1, 1, S, dtype=self.dtype, device=self.device).masked_fill_(
            torch.arange(S, device=self.device)[None, None, None, :] > pos[:, None, None, None], float("-inf")
        )  # [D, 1, 1, S]
        return S, mask, long_rows

    def _decode_attention(self, li: int, qg: torch.Tensor, plan: tuple) -> torch.Tensor:
        """qg: [D, KV, G, hd], one query per decode row (slots 0..D-1) -> [D, KV, G, hd]."""
        S, mask, long_rows = plan
        D = qg.shape[0]
        kc, vc = self.k[li], self.v[li]
        # One query token per row: plain matmuls beat SDPA's kernel launch at this size, and
        # grouping query heads per KV head handles GQA without copying K/V.
        keys, values = kc[:D, :, :S], vc[:D, :, :S]  # [D, KV, S, hd] views
        scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(self.scale).add_(mask)  # [D, KV, G, S]
        probs = scores.softmax(dim=-1) if self.dtype == torch.float32 else scores.float().softmax(dim=-1).to(self.dtype)
        out = torch.matmul(probs, values)  # [D, KV, G, hd]
        for i, span in long_rows:
            sc = torch.matmul(qg[i], kc[i, :, :span].transpose(-1, -2)).mul_(self.scale)  # [KV, G, span]
            pr = sc.softmax(dim=-1) if self.dtype == torch.float32 else sc.float().softmax(dim=-1).to(self.dtype)
            out[i] = torch.matmul(pr, vc[i, :, :span])
        return out

    @torch.inference_mode()
    def step(
        self,
        dec_tokens: list[int],
        dec_positions: list[int],
        fresh: list[tuple[int, list[int]]],
        chunk: tuple[int, int, list[int]] | None,
        lora: LoRABatch | None,
    ) -> torch.Tensor:
        """One forward for a whole engine step, every token of it flattened into one sequence.

        - decode: one token for each of slots 0..D-1 at its own position (``dec_*``);
        - fresh: whole prompts ``(slot, token ids)`` prefilled from position 0;
        - chunk: ``(slot, start, token ids)``, a slice of a long prompt whose first ``start``
          tokens are already in the slot's cache (chunked prefill).

        The projections, norms and MLP run once over all N tokens (on these CPUs per-op overhead
        dominates, so one forward beats a prefill forward plus a decode forward); attention runs
        per kind of segment. Returns float logits ``[D + len(fresh) + (1 if chunk)]``: each decode
        row, each fresh prompt's last token, the chunk's last token -- in that order.
        """
        D = len(dec_tokens)
        lens = [len(t) for _, t in fresh]
        ids: list[int] = list(dec_tokens)
        positions: list[int] = list(dec_positions)
        for _, toks in fresh:
            ids += toks
            positions += range(len(toks))
        c0 = len(ids)
        if chunk is not None:
            c_slot, c_start, c_toks = chunk
            ids += c_toks
            positions += range(c_start, c_start + len(c_toks))
        n = len(ids)
        self._ensure_capacity(max(positions) + 1)
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)[None]  # [1, N]
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)  # [N]
        group = self.n_heads // self.n_kv

        if D:
            dec_rows = torch.arange(D, device=dev)
            dec_pos = pos_t[:D]
            plan = self._decode_plan(dec_positions)
        if fresh:
            w, tmax = len(fresh), max(lens)
            # [W, Tmax] flat index of each prompt's tokens, right-padded with its own last token.
            f_idx = torch.empty(w, tmax, dtype=torch.long)
            start = D
            for i, ln in enumerate(lens):
                f_idx[i, :ln] = torch.arange(start, start + ln)
                f_idx[i, ln:] = start + ln - 1
                start += ln
            f_idx = f_idx.to(dev)
            f_valid = (torch.arange(tmax)[None, :] < torch.tensor(lens)[:, None]).to(dev)  # [W, Tmax]
            f_slots = torch.tensor([slot for slot, _ in fresh], dtype=torch.long, device=dev)
        if chunk is not None:
            c_len = len(c_toks)
            c_end = c_start + c_len
            c_mask = None
            if c_start:
                # Query i (absolute position c_start + i) sees keys 0..c_start + i.
                c_mask = torch.arange(c_end, device=dev)[None, :] <= torch.arange(c_start, c_end, device=dev)[:, None]

        def attend(li, q, k, v):  # q: [1, H, N, hd], k/v: [1, KV, N, hd]
            kc, vc = self.k[li], self.v[li]
            qt, kt, vt = q[0], k[0], v[0]
            out = torch.empty_like(qt)  # [H, N, hd]
            if D:
                kc[dec_rows, :, dec_pos] = kt[:, :D].transpose(0, 1)  # [D, KV, hd]
                vc[dec_rows, :, dec_pos] = vt[:, :D].transpose(0, 1)
                qg = qt[:, :D].transpose(0, 1).reshape(D, self.n_kv, group, self.head_dim)  # [D, KV, G, hd]
                o = self._decode_attention(li, qg, plan)  # [D, KV, G, hd]
                out[:, :D] = o.reshape(D, self.n_heads, self.head_dim).transpose(0, 1)
            if fresh:
                qf = qt[:, f_idx].transpose(0, 1)  # [W, H, Tmax, hd]
                kf, vf = kt[:, f_idx].transpose(0, 1), vt[:, f_idx].transpose(0, 1)  # [W, KV, Tmax, hd]
                kc[f_slots, :, :tmax] = kf
                vc[f_slots, :, :tmax] = vf
                # Right padding + causal mask: real tokens never see the pad tokens after them.
                of = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=self.scale, enable_gqa=self.gqa)
                out[:, D:c0] = of.transpose(0, 1)[:, f_valid]  # [H, sum(lens), hd]
            if chunk is not None:
                kc[c_slot, :, c_start:c_end] = kt[:, c0:]
                vc[c_slot, :, c_start:c_end] = vt[:, c0:]
                oc = F.scaled_dot_product_attention(
                    qt[None, :, c0:], kc[c_slot : c_slot + 1, :, :c_end], vc[c_slot : c_slot + 1, :, :c_end],
                    attn_mask=c_mask, is_causal=c_mask is None, scale=self.scale, enable_gqa=self.gqa,
                )  # [1, H, c_len, hd]
                out[:, c0:] = oc[0]
            return out[None]

        hidden = self._forward(ids_t, pos_t[None], attend, lora)  # [1, N, hidden]
        last = list(range(D))
        end = D
        for ln in lens:
            end += ln
            last.append(end - 1)
        if chunk is not None:
            last.append(n - 1)
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
