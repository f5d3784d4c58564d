"""Pydantic models for every argument, with a description on each field.

``extra="forbid"`` everywhere: a typo in serve_config.yaml fails at deploy time with the
field's name instead of being silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The projections a Llama-family decoder layer has; LoRA can target any subset.
LORA_TARGET_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Local Hugging Face model folder of the base model (Llama family).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Compute dtype. 'auto': bfloat16 on CUDA, float32 on CPU.",
    )
    quantization: Literal["none", "nf4", "int8"] = Field(
        default="none",
        description="Quantize the base model's linear layers with bitsandbytes (4-bit NF4 or 8-bit). "
        "Adapters stay in the compute dtype.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where the model runs. 'auto': CUDA when available, else CPU."
    )
    max_lora_rank: int = Field(default=64, ge=1, le=1024, description="Largest adapter rank accepted.")
    lora_target_modules: tuple[str, ...] = Field(
        default=LORA_TARGET_KINDS,
        description="Projections wrapped with LoRA-capable layers at start. Adapters may target any subset "
        "of these; an adapter targeting anything else is refused.",
    )
    max_num_seqs: int = Field(
        default=64, ge=1, le=4096, description="Most sequences decoded together in one forward pass."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=8,
        description="Longest prompt + completion in tokens. Default: the model's max_position_embeddings, "
        "capped at 4096.",
    )
    max_adapter_bytes: int = Field(
        default=1 << 30, ge=1, description="Refuse adapters whose weight file is larger than this."
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads for CPU inference (default: torch's choice)."
    )

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        unknown = sorted(set(self.lora_target_modules) - set(LORA_TARGET_KINDS))
        if unknown:
            raise ValueError(
                f"lora_target_modules {unknown} are not Llama projections; choose from {list(LORA_TARGET_KINDS)}"
            )
        if self.quantization != "none" and self.dtype == "float16":
            raise ValueError("quantized bases compute in bfloat16 or float32; set dtype to one of those")
        return self
