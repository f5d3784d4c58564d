"""The engine's settings: EngineConfig and the LoRA target kinds.

The engine reads nothing else. ``EngineArgs`` holds the settings the app's args share with the
engine, declared once: serve_app/config.py's AppConfig derives from it, and
``AppConfig.engine_config`` fills an EngineConfig from them.

``extra="forbid"`` everywhere: a typo fails with the field's name instead of being ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.engine.arch import LORA_KINDS

# The projections LoRA can target: those of the served architectures' decoder layers (arch/;
# today the Llama family's q/k/v/o_proj and gate/up/down_proj). An adapter targets any subset.
LORA_TARGET_KINDS = LORA_KINDS


class EngineArgs(BaseModel):
    """Engine settings that are also the app's args (serve_config.yaml's keys of the same name)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Compute dtype. 'auto': bfloat16 on CUDA, float32 on CPU.",
    )
    quantization: Literal["none", "nf4", "int8"] = Field(
        default="none",
        description="Quantize the base model's linear layers with bitsandbytes (4-bit NF4 or 8-bit). "
        "Adapters stay in the compute dtype.",
    )
    max_lora_rank: int = Field(default=64, ge=1, le=1024, description="Largest adapter rank accepted.")
    max_num_seqs: int = Field(
        default=64, ge=1, le=4096, description="Most sequences decoded together in one forward pass."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=8,
        description="Longest prompt + completion in tokens. Default: the model's max_position_embeddings, "
        "capped at 4096.",
    )
    max_num_batched_tokens: int = Field(
        default=512,
        ge=1,
        description="Token budget of one engine step: one token per decoding sequence first, then new "
        "prompts, whole while they fit and a longer one in chunks across steps (chunked prefill), so a "
        "long prompt never pauses the running sequences for its whole prefill. Lower: smoother "
        "inter-token latency beside long prompts; higher: fewer steps for bursts of prompts. Must be "
        "at least max_num_seqs.",
    )

    block_size: int = Field(
        default=16, ge=1, le=1024,
        description="Tokens per KV-cache block. Memory is handed out in blocks, so a sequence wastes at "
        "most one partly filled block; the prefix cache shares whole blocks.",
    )
    kv_cache_memory_bytes: int | None = Field(
        default=None, ge=1,
        description="Size of the KV-cache pool in bytes (the log says how many tokens it holds). Default: "
        "on CUDA, kv_cache_memory_fraction of the device memory free after loading; on CPU, room for "
        "max_num_seqs x 512 tokens (at least max_model_len).",
    )
    kv_cache_memory_fraction: float = Field(
        default=0.6, gt=0, le=0.95,
        description="On CUDA without kv_cache_memory_bytes: the share of the device memory free after the "
        "base model is loaded that goes to the KV pool; the rest is left for activations and adapters.",
    )
    enable_prefix_caching: bool = Field(
        default=True,
        description="Reuse the KV of full blocks of an earlier prompt that starts the same way under the same "
        "adapter version (a tenant's shared system prompt is computed once). Never shared across adapters, "
        "versions, or with the base model.",
    )

    structured_output_compile_timeout_s: float = Field(
        default=2.0, gt=0, le=600,
        description="CPU seconds a new response_format schema may take to compile (in a sandbox process, "
        "killed at the limit); a schema over it is refused with a 400 and remembered as refused. CPU time, so a "
        "busy replica does not refuse a normal schema (one starved 4x as long by the clock gets a 503 to retry). "
        "Normal schemas take milliseconds to ~0.4 s (larger vocabularies take longer); a crafted "
        "nested-repetition pattern can take minutes.",
    )
    structured_output_compile_memory_bytes: int = Field(
        default=1 << 30, ge=16 << 20,
        description="Most memory one schema compile may take in the sandbox process (RLIMIT_AS above the "
        "worker's own); a schema over it is refused with a 400 and remembered as refused.",
    )
    structured_output_compile_workers: int = Field(
        default=2, ge=1, le=16,
        description="Schema compile threads per replica, each with its warm sandbox process (~270 MB: xgrammar "
        "imports torch). A tenant compiles one new schema at a time, so with 2 or more one tenant's slow "
        "schema never holds up another tenant's.",
    )

    @model_validator(mode="after")
    def _check_engine_args(self) -> "EngineArgs":
        if self.quantization != "none" and self.dtype == "float16":
            raise ValueError("quantized bases compute in bfloat16 or float32; set dtype to one of those")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens {self.max_num_batched_tokens} is less than max_num_seqs "
                f"{self.max_num_seqs}: a full batch of decoding sequences would leave no budget for prompts; "
                "raise max_num_batched_tokens"
            )
        return self


class EngineConfig(EngineArgs):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Local Hugging Face model folder of the base model (Llama family).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where the model runs. 'auto': CUDA when available, else CPU."
    )
    lora_target_modules: tuple[str, ...] = Field(
        default=LORA_TARGET_KINDS,
        description="Projections wrapped with LoRA-capable layers at start. Adapters may target any subset "
        "of these; an adapter targeting anything else is refused.",
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
                f"lora_target_modules {unknown} are not projections of a served architecture (engine/arch/); "
                f"choose from {list(LORA_TARGET_KINDS)}"
            )
        return self
