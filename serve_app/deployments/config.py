"""The engine deployments' settings: what a LoRA or a merged replica reads, and nothing else.

build_app binds each deployment with its own config object, which the app's config builds
(``AppConfig.lora_deployment_config`` / ``merged_deployment_config``): nothing in deployments/
imports the app's config, an arrow back up. Like ``RouterConfig`` (router/config.py) the fields
are AppConfig's, under the same names (the engine's through ``EngineArgs``, declared once), so
``from_args`` reads a dict of build_app's args the same way: a test or a script that builds one
replica without build_app. The defaults equal AppConfig's (tests/unit/test_merged_versions.py
checks that the two routes give the same config).

Pure pydantic, no torch and no Ray: the app's config imports it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Self

from pydantic import ConfigDict, Field

from serve_app.adapters.config import StoreConfig
from serve_app.engine.config import EngineArgs, EngineConfig


def replica_engine_config(args: EngineArgs, base_path: str, *, num_cpus: float, torch_threads: int | None,
                          max_adapter_bytes: int) -> EngineConfig:
    """The engine of a replica reserving ``num_cpus``: the shared engine args, torch threads
    (default: the CPUs reserved, at least 1) and the store's adapter size cap."""
    return EngineConfig(
        model=base_path,
        **args.model_dump(include=set(EngineArgs.model_fields)),
        torch_threads=torch_threads or max(1, math.ceil(num_cpus)),
        max_adapter_bytes=max_adapter_bytes,
    )


class _ReplicaConfig(EngineArgs):
    """What both engine deployments read: the base model, the adapter store, the engine args."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(
        default="demo", description="AppConfig.base_model: a base model folder, or 'demo' / 'smollm2' (built here)."
    )
    adapters: str | None = Field(default=None, description="AppConfig.adapters: where the adapters are.")
    demo_num_adapters: int = Field(
        default=8, ge=1, le=10_000, description="AppConfig.demo_num_adapters: demo tenants built for 'demo'."
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="AppConfig.torch_threads (default: the replica's num_cpus, at least 1)."
    )
    store: StoreConfig = Field(
        default_factory=StoreConfig, description="AppConfig.store: how adapters are reached, cached and validated."
    )

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        """From a dict of build_app's args: the keys this replica reads (the others are the other
        parts' settings, which only build_app's AppConfig validates)."""
        return cls.model_validate({k: v for k, v in args.items() if k in cls.model_fields})

    def resolve_paths(self) -> tuple[str, str]:
        """(base model folder, adapters location), in this process: the demo names are built once
        per node into the demo cache (serve_app/models: ``resolve_paths``)."""
        from serve_app.models import resolve_paths

        return resolve_paths(self.base_model, self.adapters, demo_num_adapters=self.demo_num_adapters)


class LoRADeploymentConfig(_ReplicaConfig):
    """Everything a LoRA replica (deployments/lora.py) reads."""

    lora_num_cpus: float = Field(
        default=1.0, ge=0, description="AppConfig.lora_num_cpus: the CPUs the replica reserves (torch threads)."
    )
    max_adapters_per_replica: int = Field(
        default=8, ge=1, description="AppConfig.max_adapters_per_replica: the replica's adapter LRU (Serve multiplexing)."
    )

    def engine_config(self, base_path: str) -> EngineConfig:
        return replica_engine_config(self, base_path, num_cpus=self.lora_num_cpus, torch_threads=self.torch_threads,
                                     max_adapter_bytes=self.store.max_adapter_bytes)


class MergedDeploymentConfig(_ReplicaConfig):
    """Everything a merged replica (deployments/merged.py) reads."""

    merged_num_cpus: float = Field(
        default=0.5, ge=0, description="AppConfig.merged_num_cpus: the CPUs the replica reserves (torch threads)."
    )
    merged_tenants_per_replica: int = Field(
        default=2, ge=1, description="AppConfig.merged_tenants_per_replica: merged copies per replica (its LRU)."
    )
    merged_kernel_inject: bool = Field(
        default=True, description="AppConfig.merged_kernel_inject: DeepSpeed kernels where CUDA exists."
    )

    def engine_config(self, base_path: str) -> EngineConfig:
        return replica_engine_config(self, base_path, num_cpus=self.merged_num_cpus, torch_threads=self.torch_threads,
                                     max_adapter_bytes=self.store.max_adapter_bytes)
