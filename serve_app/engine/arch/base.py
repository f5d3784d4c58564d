"""What the engine must know about a model architecture, said once per family.

We load the Hugging Face model as it is (weights, quantization, rotary scaling come from
transformers) but run our own decoder loop over its modules (model_runner.py says why). That
loop, the LoRA wrapping and the adapter parser each depend on how a family lays its decoder
layer out; an ``ArchSpec`` is that knowledge in one object:

- the projections LoRA may target, which of them sit in the attention block and which in the
  MLP, and which read the same input (``input_groups``: they share one A-matmul);
- how PEFT names those modules in an adapter's tensors and patterns (``peft_key_re``,
  ``peft_module_name``);
- the decoder layer's forward, embedding and head, calling the model's own submodules so the
  numerics are the model's (a forward that does work outside its submodules -- transformers'
  Gemma scales the embeddings inside ``GemmaModel.forward`` -- needs its own spec, not this
  one's defaults);
- what it cannot serve (``check``): refused at load, never served wrong.

The methods' defaults are the Llama layout; arch/llama.py registers the families that use it.
Nothing here imports torch: serve_app/config.py reads the target kinds through arch/, and the
router imports that config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch import Tensor, nn


@dataclass(frozen=True)
class BaseShape:
    """What an adapter must fit: per projection kind, (in_features, out_features).

    ``arch``: the architecture whose module naming the adapter's tensors follow (its registry
    name); a shape made by hand (tests) is a Llama-family one."""

    num_layers: int
    kinds: dict[str, tuple[int, int]]
    name: str = ""
    arch: str = "LlamaForCausalLM"


@dataclass(frozen=True)
class ArchSpec:
    """One architecture family: its LoRA targets, PEFT naming and decoder forward."""

    names: tuple[str, ...]  # the ``config.architectures`` values this spec serves
    attn_kinds: tuple[str, ...]  # LoRA-capable projections in the attention block, in order
    mlp_kinds: tuple[str, ...]  # ... and in the MLP
    # Projections that read the same input tensor share one A-matmul: for q/k/v (and gate/up)
    # the active adapters' A rows are concatenated, so a forward does one GEMM per group
    # instead of one per projection. kind -> its input group.
    input_groups: dict[str, str] = field(default_factory=dict)
    # An adapter tensor's name -> (layer, kind, "A" or "B"), e.g.
    # base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
    peft_key_re: re.Pattern = re.compile(r"$^")
    # the module path PEFT matches rank_pattern / alpha_pattern keys against, per block
    peft_module_format: str = "model.layers.{layer}.{block}.{kind}"
    qk_norm: bool = False  # per-head norms on q and k before the rotary embedding (Qwen3)

    @property
    def lora_kinds(self) -> tuple[str, ...]:
        return self.attn_kinds + self.mlp_kinds

    # ---- naming ----------------------------------------------------------------------------

    def block_of(self, kind: str) -> str:
        """The submodule of a decoder layer that holds ``kind`` (its attribute name)."""
        return "self_attn" if kind in self.attn_kinds else "mlp"

    def peft_module_name(self, layer: int, kind: str) -> str:
        """The name PEFT matches patterns against: the module's path inside the model."""
        return self.peft_module_format.format(layer=layer, block=self.block_of(kind), kind=kind)

    def parse_peft_key(self, key: str) -> tuple[int, str, str] | None:
        """(layer, kind, "A" | "B") of a LoRA tensor's name; None: not a decoder projection's."""
        m = self.peft_key_re.search(key)
        return None if m is None else (int(m.group(1)), m.group(2), m.group(3))

    # ---- the model's modules ---------------------------------------------------------------

    def layers(self, model: nn.Module) -> list:
        return model.model.layers

    def attention_dims(self, cfg: Any) -> tuple[int, int, int]:
        """(query heads, KV heads, head dim) from the model's config."""
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        return n_heads, n_kv, head_dim

    def attention_scale(self, model: nn.Module, head_dim: int) -> float:
        """The softmax scale: the attention module's own ``scaling``, else 1 / sqrt(head_dim)."""
        return getattr(self.layers(model)[0].self_attn, "scaling", head_dim**-0.5)

    def compute_dtype(self, model: nn.Module):
        """The dtype activations and the KV cache use (a quantized base's linear weights are not it)."""
        return model.model.embed_tokens.weight.dtype

    def linear_params_per_layer(self, cfg: Any) -> int:
        """Weights one token multiplies in a decoder layer's projections and MLP (2 FLOPs each):
        the scheduler's unit of a token's cost (model_runner.py ``attn_ctx_ref``)."""
        n_heads, n_kv, head_dim = self.attention_dims(cfg)
        q_dim, kv_dim = n_heads * head_dim, n_kv * head_dim
        return cfg.hidden_size * (2 * q_dim + 2 * kv_dim + 3 * cfg.intermediate_size)

    def targets(self, kinds: tuple[str, ...]) -> tuple[str, ...]:
        """The kinds of ``kinds`` (lora_target_modules) this family has. The setting's default is
        every served family's kinds (engine/config.py), so another family's are passed over."""
        return tuple(k for k in kinds if k in self.lora_kinds)

    def base_shape(self, model: nn.Module, kinds: tuple[str, ...]) -> BaseShape:
        layers = self.layers(model)
        shapes = {}
        for kind in self.targets(kinds):
            mod = getattr(getattr(layers[0], self.block_of(kind)), kind, None)
            if mod is None:
                raise ValueError(f"base model has no {kind} projection; remove it from lora_target_modules")
            shapes[kind] = (mod.in_features, mod.out_features)
        name = getattr(model.config, "_name_or_path", "") or ""
        return BaseShape(num_layers=len(layers), kinds=shapes, name=name, arch=self.names[0])

    def wrap_lora_layers(self, model: nn.Module, kinds: tuple[str, ...],
                         wrap: Callable[[nn.Module, str, int, str], nn.Module]) -> None:
        """Replace each targeted projection with ``wrap(base, kind, layer, input group)``."""
        kinds = self.targets(kinds)
        for i, layer in enumerate(self.layers(model)):
            for kind in kinds:
                parent = getattr(layer, self.block_of(kind))
                setattr(parent, kind, wrap(getattr(parent, kind), kind, i, self.input_groups[kind]))

    def check(self, cfg: Any, max_model_len: int) -> None:
        """Raise ValueError for a configuration our decoder loop would serve wrong."""

    # ---- the forward -----------------------------------------------------------------------

    def embed(self, model: nn.Module, ids: Tensor) -> Tensor:  # [B, T] -> [B, T, hidden]
        return model.model.embed_tokens(ids)

    def rotary(self, model: nn.Module, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [B, T, head_dim] at ``positions`` [B, T] (``x`` gives the dtype/device)."""
        return model.model.rotary_emb(x, positions)

    def logits(self, model: nn.Module, hidden: Tensor) -> Tensor:  # [B, hidden] -> [B, vocab], float
        return model.lm_head(model.model.norm(hidden)).float()

    def decoder_layer(self, li: int, layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, head_dim: int,
                      attend: Callable[[int, Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        """One decoder layer over ``x`` [B, T, hidden]; ``attend(li, q, k, v)`` is the paged
        attention (attention.py): q [B, H, T, hd], k/v [B, KV, T, hd] -> [B, H, T, hd].

        The Llama layout: pre-norm attention with rotary q/k, residual, pre-norm MLP, residual."""
        bsz, t = x.shape[0], x.shape[1]
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(bsz, t, -1, head_dim)  # [B, T, H, hd]
        k = attn.k_proj(h).view(bsz, t, -1, head_dim)  # [B, T, KV, hd]
        v = attn.v_proj(h).view(bsz, t, -1, head_dim)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = _rope()(q, k, cos, sin)
        o = attend(li, q, k, v)  # [B, H, T, hd]
        x = x + attn.o_proj(o.transpose(1, 2).reshape(bsz, t, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))


_apply_rotary = None


def _rope():
    """transformers' ``apply_rotary_pos_emb`` (imported on first use: this module stays light)."""
    global _apply_rotary
    if _apply_rotary is None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        _apply_rotary = apply_rotary_pos_emb
    return _apply_rotary
