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

from serve_app.config import EngineConfig
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
    def move_slot(self, src: int, dst: int) -> None:
        for cache in (self.k, self.v):
            for c in cache:
                c[dst] = c[src]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], first_slot: int, lora: LoRABatch | None) -> torch.Tensor:
        """Run prompts (right-padded) into slots first_slot.. ; returns last-token logits [B, vocab]."""
        bsz = len(prompts)
        lens = [len(p) for p in prompts]
        t = max(lens)
        self._ensure_capacity(t + 1)
        ids = torch.zeros(bsz, t, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        positions = torch.arange(t, device=self.device).expand(bsz, t)
        slots = slice(first_slot, first_slot + bsz)

        def attend(li, q, k, v):  # q: [B, H, T, hd], k/v: [B, KV, T, hd]
            self.k[li][slots, :, :t] = k
            self.v[li][slots, :, :t] = v
            # Right padding + causal mask: real tokens never see the pad tokens after them.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.gqa)

        hidden = self._forward(ids, positions, attend, lora)  # [B, T, hidden]
        last = torch.tensor(lens, device=self.device) - 1
        return self._logits(hidden[torch.arange(bsz, device=self.device), last])

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], lora: LoRABatch | None) -> torch.Tensor:
        """One new token for each of slots 0..B-1 at its own position; returns logits [B, vocab]."""
        bsz = len(tokens)
        self._ensure_capacity(max(positions) + 1)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # [B, 1]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)  # [B]
        rows = torch.arange(bsz, device=self.device)
        span = max(positions) + 1
        # Additive mask: row b sees its own positions 0..pos[b] only.
        mask = torch.zeros(bsz, 1, 1, span, dtype=self.dtype, device=self.device).masked_fill_(
            torch.arange(span, device=self.device)[None, None, None, :] > pos[:, None, None, None], float("-inf")
        )  # [B, 1, 1, S]
        group = self.n_heads // self.n_kv

        def attend(li, q, k, v):  # q: [B, H, 1, hd], k/v: [B, KV, 1, hd]
            kc, vc = self.k[li], self.v[li]
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            keys, values = kc[:bsz, :, :span], vc[:bsz, :, :span]  # [B, KV, S, hd] views
            # One query token per row: plain matmuls beat SDPA's kernel launch at this size,
            # and grouping query heads per KV head handles GQA without copying K/V.
            qg = q.reshape(bsz, self.n_kv, group, self.head_dim)  # [B, KV, G, hd]
            scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(self.scale).add_(mask)  # [B, KV, G, S]
            probs = scores.softmax(dim=-1) if self.dtype == torch.float32 else scores.float().softmax(dim=-1).to(self.dtype)
            out = torch.matmul(probs, values)  # [B, KV, G, hd]
            return out.view(bsz, self.n_heads, 1, self.head_dim)

        hidden = self._forward(ids, pos[:, None], attend, lora)  # [B, 1, hidden]
        return self._logits(hidden[:, -1])

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
