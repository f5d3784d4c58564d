"""The Llama layout: Llama, Mistral, Qwen2 and Qwen3.

Each decoder layer is ``input_layernorm -> self_attn (q/k/v/o_proj, rotary q/k) -> residual ->
post_attention_layernorm -> mlp (gate/up/down_proj, SiLU-gated) -> residual``, over
``model.model.embed_tokens`` and under ``model.model.norm`` and ``model.lm_head``: ArchSpec's
default forward. What differs between them:

- Qwen3 normalises each head of q and k (``q_norm`` / ``k_norm``) before the rotary embedding.
- Qwen2 has biases on q/k/v: inside the projections, nothing to do here.
- Mistral (and Qwen2 with ``use_sliding_window``) attend within a sliding window. Our paged
  attention is full causal, so it serves them only while the whole context fits in the window:
  ``check`` refuses a ``max_model_len`` beyond it.
"""

from __future__ import annotations

import re
from typing import Any

from serve_app.engine.arch.base import ArchSpec

ATTN_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_KINDS = ("gate_proj", "up_proj", "down_proj")
INPUT_GROUPS = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
    "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in",
}
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (PEFT's saved names; an
# adapter name such as ".default" may appear before ".weight" in hand-made files).
PEFT_KEY_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


class LlamaArch(ArchSpec):
    def check(self, cfg: Any, max_model_len: int) -> None:
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        if window and max_model_len > window:
            raise ValueError(
                f"{self.names[0]}: this model attends within a sliding window of {window} tokens and the engine's "
                f"attention is full causal, so max_model_len {max_model_len} would serve wrong text past the "
                f"window; set max_model_len <= {window}"
            )


def _spec(name: str, **kw) -> LlamaArch:
    return LlamaArch(names=(name,), attn_kinds=ATTN_KINDS, mlp_kinds=MLP_KINDS, input_groups=INPUT_GROUPS,
                     peft_key_re=PEFT_KEY_RE, **kw)


LLAMA = _spec("LlamaForCausalLM")
MISTRAL = _spec("MistralForCausalLM")
QWEN2 = _spec("Qwen2ForCausalLM")
QWEN3 = _spec("Qwen3ForCausalLM", qk_norm=True)
