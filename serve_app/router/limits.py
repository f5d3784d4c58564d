"""Per-tenant limits on the router: buckets, concurrency leases, caps, and the prompt token counts
they need.

What a request can be refused for, and how (router/admission.py runs the checks in order):

| limit | answer |
|---|---|
| body larger than ``max_body_bytes`` | 413, before the body is parsed (router/middleware.py) |
| more prompts in one request than ``max_prompts_per_request`` (default: ``max_num_seqs``) | 400, before any is counted |
| a prompt longer than ``max_prompt_tokens`` | 400 |
| ``max_tokens`` above the ``max_tokens`` cap | 400 |
| a prompt token ID (or ``logit_bias`` key) outside the model's vocabulary | 400, before anything reaches a replica |
| more logprob entries than ``max_logprob_entries`` (logprobs x positions, echo included) | 400, before generating |
| a request that could never fit a limit (more prompts or tokens than the burst or the concurrency cap) | 400: retrying cannot help |
| over the tenant's request or token bucket | 429 + ``Retry-After``: when the bucket will hold enough |
| over the tenant's concurrency cap | 429 + ``Retry-After: 1`` |

Token buckets: ``requests_per_minute`` / ``tokens_per_minute`` refill continuously up to their
burst. A request costs 1 request per prompt, and prompt tokens + ``max_tokens`` per prompt,
charged when it is admitted (as OpenAI's limiter does: the completion's length is not known
yet). Concurrency counts prompts in flight, streams included, until the response ends.

Limits are per router replica (each keeps its own buckets): with N router replicas a tenant
can get up to N times the configured rates. Python handle callers are not limited.

The tenant key is the API key's tenant (``auth.py``); with auth off, the adapter ID (or the
base model's name), so each adapter still gets its own buckets.

The body size, the prompts per request and the logprob entries per response are capped even
with no ``limits`` config at all: without them one 4 MB body of token-ID lists fanned out to ~1M
engine requests, and one echo + logprobs response was 75 MB of JSON.

A batch's lease covers all of its engine requests (prompts x n, best_of): the router holds it
until every one of them has settled on its replica, the ones it cancelled after a sibling's
error included (router/forward.py), so an early 400 cannot free the tenant's slots while its
other prompts still generate.

Prompt token counts come from the model's own tokenizer, loaded as the engine loads it, so the
token IDs counted here are the ones the engine would make: the router forwards them
(``PromptTokens.ids``) and the replica does not tokenize the prompt again.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from serve_app.api.chat import chat_prompt_ids
from serve_app.errors import InvalidRequestError, RateLimitError
from serve_app.router.config import DEFAULT_MAX_NUM_SEQS, LimitsConfig

CONCURRENCY_RETRY_AFTER_S = 1.0
# Prompts longer than this (characters) are tokenized off the event loop.
_OFFLOAD_CHARS = 32_768


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """A request's prompts as the router counted them: each one's token count and, when it
    tokenized them with the model's tokenizer, each one's token IDs (a chat: its rendered prompt),
    which go to the replica in place of the text."""

    counts: list[int]
    ids: list[list[int]] | None = None  # None: not tokenized here (no limit needs the counts, or no tokenizer)


# --------------------------------------------------------------------------- buckets and leases


@dataclass
class TokenBucket:
    """Continuous refill at ``rate`` per second up to ``capacity``; starts full."""

    rate: float
    capacity: float
    level: float = -1.0
    stamp: float = 0.0

    def __post_init__(self):
        if self.level < 0:
            self.level = self.capacity

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def wait_for(self, cost: float) -> float:
        """Seconds until ``cost`` is available (0 if it is now). Call ``refill`` first."""
        return 0.0 if self.level >= cost else (cost - self.level) / self.rate

    @property
    def full(self) -> bool:
        return self.level >= self.capacity


@dataclass
class _TenantState:
    requests: TokenBucket | None
    tokens: TokenBucket | None
    active: int = 0


class Lease:
    """An admitted request's hold on its tenant's concurrency; released exactly once.

    Use as ``async with`` around a whole response, or ``guard(stream)`` to release when a
    stream ends (or is closed). Dropping an unreleased lease releases it too, so a stream that
    is never started cannot leak a slot.
    """

    __slots__ = ("_limiter", "tenant", "n", "_released", "__weakref__")

    def __init__(self, limiter: "TenantLimiter | None", tenant: str, n: int):
        self._limiter = limiter
        self.tenant = tenant
        self.n = n
        self._released = limiter is None

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._limiter._release(self.tenant, self.n)

    async def __aenter__(self) -> "Lease":
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()

    async def guard(self, stream: AsyncIterator) -> AsyncIterator:
        """Yield ``stream``'s items; release when it ends, fails or is closed: after the stream is
        closed, so that what closing it cancels (a batch's other engine requests) has settled
        before the tenant's slots are free again."""
        try:
            async for item in stream:
                yield item
        finally:
            try:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


def unlimited_lease(tenant: str = "", n: int = 1) -> Lease:
    """A lease that holds nothing (for callers that are not limited)."""
    return Lease(None, tenant, n)


class TenantLimiter:
    """Per-tenant token buckets and concurrency caps, plus the prompt / max_tokens caps.

    ``admit`` is synchronous: it decides at once (400, 429 or a ``Lease``). Thread-safe.
    """

    def __init__(
        self,
        cfg: LimitsConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        tokenizer: Any = None,
        tokenizer_path: str | None = None,
        max_num_seqs: int | None = None,
        vocab_size: int | None = None,
    ):
        self.cfg = cfg
        # Prompts per request (each an engine sequence): the configured cap, else the engine's batch size.
        self.max_prompts = cfg.max_prompts_per_request or max_num_seqs or DEFAULT_MAX_NUM_SEQS
        self.clock = clock
        self._tokenizer = tokenizer
        self._tokenizer_path = tokenizer_path
        self._vocab_size = vocab_size  # None: read from tokenizer_path's config.json on first use
        self._lock = threading.Lock()
        self._tenants: dict[str, _TenantState] = {}
        self._prune_at = 1024
        self.rejected: dict[str, int] = {}
        self._req_rate = None if cfg.requests_per_minute is None else cfg.requests_per_minute / 60.0
        self._tok_rate = None if cfg.tokens_per_minute is None else cfg.tokens_per_minute / 60.0
        self._req_burst = cfg.effective_request_burst
        self._tok_burst = cfg.effective_token_burst

    @classmethod
    def from_config(
        cls, cfg: LimitsConfig, *, tokenizer_path: str | None = None, max_num_seqs: int | None = None,
        vocab_size: int | None = None,
    ) -> "TenantLimiter":
        """``tokenizer_path``: the base model folder; its tokenizer is loaded (once, lazily) only
        if prompt token counts are needed, its config.json gives the vocabulary size token IDs
        are checked against (``vocab_size`` overrides it). ``max_num_seqs``: the LoRA replicas'
        batch size, the default cap on prompts per request."""
        return cls(cfg, tokenizer_path=tokenizer_path, max_num_seqs=max_num_seqs, vocab_size=vocab_size)

    @property
    def needs_prompt_tokens(self) -> bool:
        return self.cfg.needs_prompt_tokens

    def _needs_counts(self, request: Any) -> bool:
        """Whether this request's prompt token counts are needed: by a limit, or by the response
        size cap for an echo of the prompt's logprobs."""
        return self.needs_prompt_tokens or (
            self.cfg.max_logprob_entries is not None and bool(getattr(request, "echo", False))
            and getattr(request, "logprobs", None) is not None)

    # ---- prompt token counts ------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self._tokenizer_path is None:
                raise RuntimeError("prompt token limits need the tokenizer: pass tokenizer_path")
            from transformers import AutoTokenizer

            # As the engine loads it (engine/loader.py): the IDs counted here are forwarded to it.
            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path, local_files_only=True)
        return self._tokenizer

    def count_prompts_sync(self, request: Any) -> list[int]:
        """Tokens of each prompt of a CompletionRequest (one per prompt) or ChatCompletionRequest
        (one), counted as the LoRA replica will tokenize them. Zeros when nothing needs them."""
        if not hasattr(request, "messages"):
            self.check_prompt_count(len(request.prompts()))
        return self.tokenize_sync(request).counts

    async def count_prompts(self, request: Any) -> list[int]:
        """``count_prompts_sync``, off the event loop when the prompts are long."""
        if not hasattr(request, "messages"):
            self.check_prompt_count(len(request.prompts()))
        return (await self.tokenize(request)).counts

    def tokenize_sync(self, request: Any) -> PromptTokens:
        """Each prompt's token count and, where the model's tokenizer made them, its token IDs;
        zeros when nothing needs the counts. The prompt count is not checked here: the caller
        checks it first (admission: prompts x sequences), before anything is tokenized."""
        if hasattr(request, "messages"):
            if not self.needs_prompt_tokens:
                return PromptTokens([0])
            ids = chat_prompt_ids(self.tokenizer, request.messages)
            return PromptTokens([len(ids)], [ids])
        prompts = request.prompts()
        if not self._needs_counts(request):
            return PromptTokens([0] * len(prompts))
        if self._tokenizer is None and self._tokenizer_path is None:
            # No tokenizer to be had (a limiter built without one): a text's UTF-8 bytes (+ BOS/EOS)
            # bound its tokens from above, which is what the response size cap needs.
            return PromptTokens([len(p) if isinstance(p, list) else len(p.encode("utf-8", "surrogatepass")) + 2
                                 for p in prompts])
        ids = [p if isinstance(p, list) else self.tokenizer(p)["input_ids"] for p in prompts]
        return PromptTokens([len(i) for i in ids], ids)

    async def tokenize(self, request: Any) -> PromptTokens:
        """``tokenize_sync``, off the event loop when the prompts are long."""
        if self._needs_counts(request) and _text_size(request) > _OFFLOAD_CHARS:
            return await asyncio.to_thread(self.tokenize_sync, request)
        return self.tokenize_sync(request)

    # ---- the model's vocabulary -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary size (its config.json ``vocab_size``, what the engine checks
        token IDs against), or None where the base model folder has none to read."""
        if self._vocab_size is None and self._tokenizer_path is not None:
            self._vocab_size = _read_vocab_size(self._tokenizer_path) or 0
        return self._vocab_size or None

    def check_token_ids(self, request: Any) -> None:
        """400 for a prompt token ID or ``logit_bias`` key outside the model's vocabulary, naming
        the ID and the range, before any prompt goes to a replica: there the first bad prompt of
        a batch would fail while its siblings were already generating. No check without a
        vocabulary size (the replica still checks)."""
        vocab = self.vocab_size
        if vocab is None:
            return
        prompts = [] if hasattr(request, "messages") else request.prompts()  # chat: no token IDs
        for i, p in enumerate(prompts):
            if isinstance(p, list) and p and max(p) >= vocab:  # >= 0 and ints: the schema's checks
                bad = max(p)
                where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
                self._count("token_ids")
                raise InvalidRequestError(
                    f"{where} holds token ID {bad} (at position {p.index(bad)}), outside this model's vocabulary "
                    f"[0, {vocab}); send token IDs below {vocab}",
                    code="token_out_of_range",
                )
        for key in getattr(request, "logit_bias", None) or {}:
            if int(key) >= vocab:
                self._count("token_ids")
                raise InvalidRequestError(
                    f"logit_bias key {int(key)} is outside this model's vocabulary [0, {vocab}); "
                    f"use token IDs below {vocab}",
                    code="token_out_of_range",
                )

    # ---- response size ----------------------------------------------------------------------------

    def check_response_size(self, prompt_tokens: Sequence[int], max_tokens: int, logprobs: int | None,
                            echo: bool) -> None:
        """400 for a request whose logprobs could make its response larger than
        ``max_logprob_entries``, before anything is generated. ``prompt_tokens``: one count per
        engine sequence (prompts x n / best_of); ``logprobs``: the alternatives asked per position
        (None: no logprobs); ``echo``: the prompt's positions come back too."""
        limit = self.cfg.max_logprob_entries
        if limit is None or logprobs is None:
            return
        positions = sum(prompt_tokens) * echo + len(prompt_tokens) * max_tokens
        entries = positions * (logprobs + 1)
        if entries > limit:
            self._count("logprob_entries")
            raise InvalidRequestError(
                f"this request could return {entries:,} logprob entries ({len(prompt_tokens)} sequences, "
                f"{positions:,} token positions{' with the echoed prompts' if echo else ''}, x (logprobs "
                f"{logprobs} + 1)), more than this server's limit of {limit:,} per response; ask for fewer "
                f"logprobs, lower max_tokens, or send fewer prompts or choices (n, best_of) per request"
                f"{', or drop echo' if echo else ''}",
                code="response_too_large",
            )

    # ---- admission ------------------------------------------------------------------------------

    def check_prompt_count(self, n: int) -> None:
        """400 for a request holding more prompts than ``max_prompts`` (before any is tokenized)."""
        if n > self.max_prompts:
            self._count("prompts_per_request")
            raise InvalidRequestError(
                f"this request holds {n} prompts, more than this server's limit of {self.max_prompts} per "
                "request; send fewer prompts per request",
                code="too_many_prompts",
            )

    def check_request(self, prompt_tokens: Sequence[int], max_tokens: int) -> None:
        """400 for what no retry can fix: a prompt or max_tokens over its cap, or a request
        larger than a bucket's burst or the concurrency cap."""
        cfg, n = self.cfg, len(prompt_tokens)
        self.check_prompt_count(n)
        longest, cost = max(prompt_tokens, default=0), sum(prompt_tokens) + n * max_tokens
        # (limit, value, counted as, code, message): the first value over its limit is the answer.
        caps = (
            (cfg.max_tokens, max_tokens, "max_tokens", "max_tokens_too_large",
             "max_tokens {v} is more than this server's limit {limit}; lower max_tokens"),
            (cfg.max_prompt_tokens, longest, "prompt_tokens", "prompt_too_long",
             "the prompt is {v} tokens, more than this server's limit {limit}; shorten it"),
            (self._req_burst, n, "request_burst", "too_many_prompts",
             "this request holds {v} prompts, more than a tenant's request burst {limit}; "
             "send fewer prompts per request"),
            (cfg.max_concurrent_requests, n, "concurrency", "too_many_prompts",
             "this request holds {v} prompts, more than a tenant's concurrency limit {limit}; "
             "send fewer prompts per request"),
            (self._tok_burst, cost, "token_burst", "request_too_large",
             "this request may use {v} tokens (prompt + max_tokens per prompt), more than a tenant's "
             "token burst {limit}; lower max_tokens or shorten the prompt"),
        )
        for limit, value, reason, code, message in caps:
            if limit is not None and value > limit:
                self._count(reason)
                raise InvalidRequestError(message.format(v=value, limit=limit), code=code)

    def admit(self, tenant: str, prompt_tokens: int | Sequence[int], max_tokens: int) -> Lease:
        """Admit a request now or refuse it: 400 (``check_request``), 429 with ``retry_after``,
        or a ``Lease`` to release when the response is over. ``prompt_tokens``: one count per
        prompt (an int for a single prompt)."""
        counts = [prompt_tokens] if isinstance(prompt_tokens, int) else list(prompt_tokens)
        if not counts:
            counts = [0]
        self.check_request(counts, max_tokens)
        n = len(counts)
        token_cost = sum(counts) + n * max_tokens
        cfg = self.cfg
        with self._lock:
            now = self.clock()
            st = self._tenants.get(tenant)
            if st is None:
                st = self._tenants[tenant] = self._new_state(now)
            waits: dict[str, float] = {}
            if st.requests is not None:
                st.requests.refill(now)
                if (w := st.requests.wait_for(n)) > 0:
                    waits[f"{cfg.requests_per_minute:g} requests/min"] = w
            if st.tokens is not None:
                st.tokens.refill(now)
                if (w := st.tokens.wait_for(token_cost)) > 0:
                    waits[f"{cfg.tokens_per_minute:g} tokens/min"] = w
            if cfg.max_concurrent_requests is not None and st.active + n > cfg.max_concurrent_requests:
                waits[f"{cfg.max_concurrent_requests} concurrent requests"] = CONCURRENCY_RETRY_AFTER_S
            if waits:
                for what in waits:
                    self.rejected[what.split(" ", 1)[1]] = self.rejected.get(what.split(" ", 1)[1], 0) + 1
                retry = max(waits.values())
                raise RateLimitError(
                    f"tenant {tenant!r} is over its limit of {' and '.join(waits)}; "
                    f"retry after {max(1, math.ceil(retry))} s",
                    retry_after=retry,
                )
            if st.requests is not None:
                st.requests.level -= n
            if st.tokens is not None:
                st.tokens.level -= token_cost
            st.active += n
            if len(self._tenants) > self._prune_at:
                self._prune(now)
        return Lease(self, tenant, n)

    def _new_state(self, now: float) -> _TenantState:
        return _TenantState(
            requests=None if self._req_rate is None else TokenBucket(self._req_rate, self._req_burst, stamp=now),
            tokens=None if self._tok_rate is None else TokenBucket(self._tok_rate, self._tok_burst, stamp=now),
        )

    def _release(self, tenant: str, n: int) -> None:
        with self._lock:
            st = self._tenants.get(tenant)
            if st is not None:
                st.active = max(0, st.active - n)

    def _prune(self, now: float) -> None:
        """Forget tenants that are idle with full buckets: a fresh state is the same thing.
        Keeps memory bounded by the tenants active lately, not every name ever seen."""
        for name in [k for k, st in self._tenants.items() if self._idle(st, now)]:
            del self._tenants[name]
        self._prune_at = max(1024, 2 * len(self._tenants))

    @staticmethod
    def _idle(st: _TenantState, now: float) -> bool:
        if st.active:
            return False
        for b in (st.requests, st.tokens):
            if b is not None:
                b.refill(now)
                if not b.full:
                    return False
        return True

    def _count(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def active(self, tenant: str) -> int:
        with self._lock:
            st = self._tenants.get(tenant)
            return 0 if st is None else st.active

    def stats(self) -> dict:
        with self._lock:
            return {
                "tenants_tracked": len(self._tenants),
                "active": {k: st.active for k, st in self._tenants.items() if st.active},
                "rejected": dict(self.rejected),
            }


def _read_vocab_size(model_dir: str) -> int | None:
    """``vocab_size`` of a model folder's config.json (multimodal configs: its text_config's)."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _text_size(request: Any) -> int:
    if hasattr(request, "messages"):
        return sum(len(m.text()) if hasattr(m, "text") else len(str(m)) for m in request.messages)
    p = request.prompt
    if isinstance(p, str):
        return len(p)
    return sum(len(x) if isinstance(x, str) else 0 for x in p)
