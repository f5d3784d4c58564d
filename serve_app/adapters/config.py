"""Adapter store settings: where adapters live, the caches below the store, validation policy.

``AppConfig.adapters`` says *where* the adapters are (a local folder or an fsspec URI such as
``s3://bucket/prefix``); this model says *how* they are reached and cached. It is
``AppConfig.store`` (serve_config.yaml: ``args.store``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the fsspec filesystem of a URI store (and of URIs given to "
        "POST /admin/adapters), e.g. for S3: {key, secret, client_kwargs: {endpoint_url}, config_kwargs}. "
        "Ignored for a local folder.",
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Connect/read timeout for one S3 call when storage_options sets no config_kwargs; "
        "a store that does not answer in time is reported as unavailable (HTTP 503).",
    )
    registry_dir: str = Field(
        default=".registry",
        min_length=1,
        description="Folder, relative to the store root, holding the version manifest (manifest.json) and "
        "the immutable version folders <id>/v<n>/ created by POST /admin/adapters. Its first path component "
        "must start with '.', so that no adapter ID can name it.",
    )
    registry_refresh_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How often routers and LoRA replicas re-read the version manifest: the propagation bound "
        "of an update or delete made through another router replica, and of old versions being freed.",
    )
    list_refresh_s: float = Field(
        default=10.0,
        gt=0,
        description="How often a router re-lists a URI store's adapter folders (adapters copied into the "
        "store by hand appear within this time; a local folder is checked on every request).",
    )
    allowed_source_prefixes: list[str] = Field(
        default_factory=list,
        description="URIs / paths POST /admin/adapters may copy from (prefix match, e.g. 's3://uploads/'); "
        "empty: any. Set it when the admin API is reachable by more than the operators: a local path is "
        "read on the router's machine.",
    )
    keep_versions: int = Field(
        default=2,
        ge=2,
        description="Version folders kept per adapter (the current one and older ones for requests still "
        "routed to them during an update); older ones are deleted on the next update.",
    )
    disk_cache_dir: str | None = Field(
        default=None,
        description="Local folder caching adapters downloaded from a URI store, shared by the replicas of "
        "one node. Default: <system temp>/serve_app_adapter_cache.",
    )
    disk_cache_bytes: int = Field(
        default=20 << 30,
        ge=1,
        description="Size cap of the disk cache; least recently used adapters are deleted beyond it.",
    )
    ram_cache_bytes: int = Field(
        default=2 << 30,
        ge=0,
        description="Per LoRA replica: bytes of parsed, validated adapters kept in host RAM below the device "
        "slots, so re-loading an evicted adapter skips the disk and the parsing. 0 disables the tier.",
    )
    max_adapter_bytes: int = Field(
        default=1 << 30,
        ge=1,
        description="Largest adapter weight file accepted (checked before any download and again on load).",
    )
    max_safetensors_header_bytes: int = Field(
        default=1 << 20,
        ge=8,
        description="Largest safetensors header (the file's JSON tensor index) the LoRA path reads; a larger "
        "one is refused (HTTP 422) from its 8-byte length field, before it is read. A LoRA adapter needs about "
        "150 bytes per tensor (a 7B all-linear adapter ~70 KB); the merged path uses the default.",
    )
    base_model_mismatch: Literal["ignore", "warn", "refuse"] = Field(
        default="warn",
        description="What to do when an adapter's base_model_name_or_path names another base than the served "
        "one (compared by last path component, case-insensitive): log a warning, refuse it (HTTP 422), or "
        "ignore. Shapes that do not fit are always refused.",
    )
    base_model_aliases: list[str] = Field(
        default_factory=list,
        description="Other names of the served base model (e.g. its hub repo ID when it is served from a "
        "renamed local folder) that adapters' base_model_name_or_path may use.",
    )
    @field_validator("registry_dir")
    @classmethod
    def _hidden_registry_dir(cls, value: str) -> str:
        parts = [p for p in value.strip("/").split("/") if p]
        if not parts or not parts[0].startswith(".") or any(p in (".", "..") for p in parts):
            raise ValueError(
                f"registry_dir {value!r} must be a folder whose first path component starts with '.' (like the "
                "default '.registry'): adapter IDs cannot start with '.', so no adapter folder can collide with it"
            )
        return value

    progress_min_bytes: int = Field(
        default=16 << 20,
        ge=0,
        description="Downloads at least this large log their progress (percent, bytes, rate).",
    )
