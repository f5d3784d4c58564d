"""The router's settings: ``RouterConfig``, and the ``auth``, ``limits`` and ``policy`` parts of
build_app's args it holds.

Pure pydantic models, apart from the code that uses them (auth.py, limits.py, path_policy.py), so
the app's config (serve_app/config.py) reaches them one import arrow down without loading the
router. The router reads only ``RouterConfig``, which app.py builds from the app's config
(``AppConfig.router_config``): nothing in router/ imports the app's config, an arrow back up.
"""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.adapters.config import StoreConfig
from serve_app.adapters.ids import validate_adapter_id
from serve_app.errors import InvalidRequestError

DEFAULT_KEYS_ENV = "SERVE_APP_API_KEYS"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# 4 MiB: a full batch of max_num_seqs (64) prompts of 4096 tokens as token IDs (~1.8 MB of
# JSON) fits, and JSON-parsing the largest body costs the router milliseconds.
DEFAULT_MAX_BODY_BYTES = 4 << 20
# Logprob entries per response (LimitsConfig.max_logprob_entries): 15-30 MB of JSON.
DEFAULT_MAX_LOGPROB_ENTRIES = 1_000_000
# EngineArgs.max_num_seqs' default (engine/config.py): the engine's batch size, which caps the
# prompts (engine sequences) one request may hold unless limits.max_prompts_per_request is lower.
# The schema's MAX_PROMPTS_PER_REQUEST (api/protocol.py) is the same cap's ceiling: the largest
# max_num_seqs, refused before a prompt list is even validated.
DEFAULT_MAX_NUM_SEQS = 64
# Ten buckets per rate window: fine enough that "for window_s" is accurate to a tenth of
# the rate window, small enough that thousands of tenants cost next to nothing.
BUCKETS_PER_RATE_WINDOW = 10


class AuthConfig(BaseModel):
    """``auth`` in build_app's args."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=False,
        description="Require a tenant API key (Authorization: Bearer <key>) on every route but /health and "
        "the OpenAPI docs. Off only for the local demo: the router then logs a warning at start and lets "
        "every caller use every adapter and the admin routes. The cluster configs turn it on.",
    )
    keys_file: str | None = Field(
        default=None,
        description="Path, on every router node, of a JSON or YAML key list (see serve_app/router/api_keys.py). "
        "Entries hold key_sha256 (preferred) or a plaintext key that is hashed at load.",
    )
    keys_env: str | None = Field(
        default=DEFAULT_KEYS_ENV,
        description="Name of an environment variable of the router processes holding a key list in the same "
        "format (e.g. a Kubernetes secret exposed as an env var). Unset or empty variables add no keys; "
        "null disables this source. Read at start only (a process's environment does not change): to "
        "rotate keys without a restart, mount the secret as a file and use keys_file.",
    )
    keys_reload_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="How often, in seconds, a router checks keys_file for a change (mtime, size, inode) and "
        "reloads it without a restart: added, rotated and revoked keys take effect within this time. A "
        "file that cannot be read or parsed, or holds no keys, keeps the last good keys and logs an error. "
        "0: read at start only.",
    )

    @field_validator("keys_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError(f"keys_env must be an environment variable name (letters, digits, _), got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "AuthConfig":
        if self.enabled and not self.keys_file and not self.keys_env:
            raise ValueError("auth.enabled needs a key source: set auth.keys_file or auth.keys_env")
        return self


class LimitsConfig(BaseModel):
    """``limits`` in build_app's args. Every limit but the body size, the prompts per request
    and the logprob entries per response is off unless set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES,
        ge=1024,
        le=1 << 30,
        description="Largest HTTP request body accepted, in bytes; larger bodies get 413 before they are parsed.",
    )
    max_prompts_per_request: int | None = Field(
        default=None,
        ge=1,
        description="Most prompts one /v1/completions request may hold (a batch fans out to one engine "
        "request per prompt); more get 400. Null: the LoRA replicas' max_num_seqs, so one request can at "
        "most fill one engine step. At most max_num_seqs.",
    )
    max_prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Longest prompt, in tokens (each prompt of a batch; a chat counts its rendered prompt); "
        "longer ones get 400. Null: only the model's max_model_len applies.",
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Largest max_tokens a request may ask for (after the server default fills a missing "
        "one); larger gets 400. Null: only max_model_len applies.",
    )
    requests_per_minute: float | None = Field(
        default=None,
        gt=0,
        description="Per-tenant request bucket: prompts admitted per minute, refilled continuously. "
        "Over it: 429 with Retry-After. Null: no request bucket.",
    )
    request_burst: int | None = Field(
        default=None,
        ge=1,
        description="Capacity of the request bucket (prompts a tenant may send at once after idling). "
        "Default: ten seconds' worth of requests_per_minute, at least 1.",
    )
    tokens_per_minute: float | None = Field(
        default=None,
        gt=0,
        description="Per-tenant token bucket: prompt tokens + max_tokens admitted per minute. Over it: 429 "
        "with Retry-After. Null: no token bucket.",
    )
    token_burst: int | None = Field(
        default=None,
        ge=1,
        description="Capacity of the token bucket. Default: ten seconds' worth of tokens_per_minute, and at "
        "least max_prompt_tokens + max_tokens when both are set, so a request at the limits can pass.",
    )
    max_concurrent_requests: int | None = Field(
        default=None,
        ge=1,
        description="Per-tenant prompts in flight at once (streams count until they end). Over it: 429 with "
        "Retry-After. Keep it below lora_max_ongoing_requests so one tenant cannot fill a replica's queue.",
    )
    max_logprob_entries: int | None = Field(
        default=DEFAULT_MAX_LOGPROB_ENTRIES,
        ge=1,
        description="Most logprob entries one response may carry: per sequence (prompts x n, or best_of), its "
        "token positions (max_tokens, plus the prompt's tokens with echo) x (logprobs + 1), summed. A request "
        "that could go over it gets 400 before anything is generated. Each entry is 15-30 bytes of JSON and "
        "~1 us of router CPU, and at the other caps' limits one echo + logprobs=20 response was 75 MB of JSON "
        "that held the router's event loop for seconds; the default (1,000,000: 15-30 MB) still fits an "
        "lm-eval loglikelihood batch (echo, logprobs <= 6, 64 prompts of 2,048 tokens). Responses of more "
        "than 20,000 entries are built and encoded on a worker thread, off the event loop. Null: no cap.",
    )

    @model_validator(mode="after")
    def _check(self) -> "LimitsConfig":
        if self.request_burst is not None and self.requests_per_minute is None:
            raise ValueError("limits.request_burst needs limits.requests_per_minute")
        if self.token_burst is not None and self.tokens_per_minute is None:
            raise ValueError("limits.token_burst needs limits.tokens_per_minute")
        largest = self.largest_request_tokens
        if self.token_burst is not None and largest is not None and self.token_burst < largest:
            raise ValueError(
                f"limits.token_burst {self.token_burst} is less than max_prompt_tokens + max_tokens = {largest}: "
                "a request at those limits could never be admitted; raise token_burst or lower the caps"
            )
        return self

    @property
    def largest_request_tokens(self) -> int | None:
        if self.max_prompt_tokens is None or self.max_tokens is None:
            return None
        return self.max_prompt_tokens + self.max_tokens

    @property
    def effective_request_burst(self) -> int | None:
        if self.requests_per_minute is None:
            return None
        return self.request_burst or max(1, math.ceil(self.requests_per_minute / 6))

    @property
    def effective_token_burst(self) -> int | None:
        if self.tokens_per_minute is None:
            return None
        if self.token_burst is not None:
            return self.token_burst
        return max(1, math.ceil(self.tokens_per_minute / 6), self.largest_request_tokens or 0)

    @property
    def needs_prompt_tokens(self) -> bool:
        """Whether admission needs prompt token counts (the router then loads the tokenizer)."""
        return self.max_prompt_tokens is not None or self.tokens_per_minute is not None


class PolicyConfig(BaseModel):
    """Router policy arguments: which tenants get a merged copy of the model, and when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hot_tenants: list[str] = Field(
        default_factory=list,
        description="Adapter IDs always served by a merged replica. They do not count against "
        "max_merged_tenants and are never demoted.",
    )
    dynamic: bool = Field(
        default=True,
        description="Promote and demote other tenants by measured request rate. False: only hot_tenants "
        "are merged.",
    )
    promote_rps: float = Field(
        default=5.0,
        gt=0,
        description="A tenant whose request rate stays above this (requests/s) for window_s gets a merged "
        "replica.",
    )
    demote_rps: float = Field(
        default=1.0,
        ge=0,
        description="A dynamically merged tenant whose rate stays below this for window_s goes back to the "
        "LoRA path. Must be below promote_rps (hysteresis). 0: never demoted on rate, only preempted.",
    )
    window_s: float = Field(
        default=30.0,
        gt=0,
        description="How long (seconds) the rate must stay above promote_rps, or below demote_rps, before "
        "a change starts.",
    )
    rate_window_s: float = Field(
        default=10.0,
        gt=0,
        description="Sliding window (seconds) the request rate is averaged over. Shorter reacts faster but is "
        "noisier; at most window_s.",
    )
    cooldown_s: float = Field(
        default=120.0,
        ge=0,
        description="Per tenant, least time (seconds) between two changes (promotion, demotion, failure); "
        "also the first retry delay after a failed merge, doubled per consecutive failure.",
    )
    max_merged_tenants: int = Field(
        default=2,
        ge=0,
        description="Most tenants merged dynamically at once (warming, ready or demoting). hot_tenants come "
        "on top of this.",
    )
    max_merged_per_owner: int = Field(
        default=1,
        ge=1,
        description="Most of those dynamic merged slots one owner holds at once: the adapters an API key's "
        "tenant (auth's key list) sends traffic to count together, so a customer with several hot adapters "
        "cannot take every slot from the others. With auth off each adapter is its own owner. hot_tenants "
        "do not count.",
    )

    @field_validator("hot_tenants")
    @classmethod
    def _check_hot_tenants(cls, v: list[str]) -> list[str]:
        for tenant in v:
            try:
                validate_adapter_id(tenant)
            except InvalidRequestError as e:  # pydantic reports ValueError only
                raise ValueError(f"hot_tenants: {e.message}") from None
        dupes = sorted({t for t in v if v.count(t) > 1})
        if dupes:
            raise ValueError(f"hot_tenants lists {dupes} more than once; list each adapter ID once")
        return v

    @model_validator(mode="after")
    def _check(self) -> "PolicyConfig":
        if self.demote_rps >= self.promote_rps:
            raise ValueError(
                f"demote_rps ({self.demote_rps}) must be below promote_rps ({self.promote_rps}) so a tenant "
                f"near the threshold does not flap; lower demote_rps or raise promote_rps"
            )
        if self.rate_window_s > self.window_s:
            raise ValueError(
                f"rate_window_s ({self.rate_window_s}) is longer than window_s ({self.window_s}): the rate "
                f"could not change within one decision window; set rate_window_s <= window_s"
            )
        if self.dynamic and self.max_merged_tenants == 0:
            raise ValueError(
                "dynamic is true but max_merged_tenants is 0, so no tenant could ever be promoted; "
                "set max_merged_tenants >= 1 or dynamic: false"
            )
        return self

    @property
    def bucket_s(self) -> float:
        return self.rate_window_s / BUCKETS_PER_RATE_WINDOW

    @property
    def window_buckets(self) -> int:
        # The epsilon keeps 30 / 1.0000000001 from asking for a 31st bucket.
        return max(1, math.ceil(self.window_s / self.bucket_s - 1e-9))


class RouterConfig(BaseModel):
    """Everything the Router deployment reads. app.py builds it from the app's args
    (``AppConfig.router_config``); the fields are AppConfig's, described there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(description="AppConfig.base_model: a base model folder, or 'demo' / 'smollm2'.")
    adapters: str | None = Field(description="AppConfig.adapters: where the adapters are.")
    demo_num_adapters: int = Field(ge=1, description="AppConfig.demo_num_adapters.")
    base_model_name: str = Field(min_length=1, description="AppConfig.base_model_name: the base model's `model`.")
    default_max_tokens: int = Field(ge=1, description="AppConfig.default_max_tokens.")
    max_num_seqs: int = Field(
        ge=1, description="The LoRA replicas' batch size: the prompts-per-request cap unless limits set a lower one."
    )
    stream_interval_ms: float = Field(ge=0, description="AppConfig.stream_interval_ms.")
    stream_chunks_per_s: float | None = Field(gt=0, description="AppConfig.stream_chunks_per_s.")
    store: StoreConfig = Field(description="AppConfig.store: how adapters are reached (resolve, admin).")
    auth: AuthConfig = Field(description="AppConfig.auth: tenant API keys.")
    limits: LimitsConfig = Field(description="AppConfig.limits: per-tenant HTTP limits.")
    policy: PolicyConfig = Field(description="AppConfig.policy: when a tenant goes to the merged path.")

    def resolve_paths(self) -> tuple[str, str]:
        """(base model folder, adapters location), in this process: the demo names are built once
        per node into the demo cache (serve_app/models: ``resolve_paths``)."""
        from serve_app.models import resolve_paths

        return resolve_paths(self.base_model, self.adapters, demo_num_adapters=self.demo_num_adapters)
