"""The types that cross the router -> replica boundary, and the engine's per-step output (no torch).

``GenerateRequest`` is what the router sends a replica, ``RequestOutput`` what the engine yields
per step (and the replica answers with), ``SamplingParams`` (api/sampling_params.py) what the
request asks of the sampler; ``Accepted``, ``Final`` and ``Hello`` are the items of a channeled
stream (deployments/channel.py sends them, router/streams.py reads them). They live here, apart
from the engine and the deployments, so the router process imports them without torch and
without reaching up into deployments/, as vLLM keeps outputs.py and sampling_params.py apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.api.sampling_params import SamplingParams
from serve_app.errors import ServeAppError


@dataclass
class GenerateRequest:
    """What the router sends a replica: one prompt (text, token IDs or chat messages).

    When the router counted the prompt's tokens (a limit needs them) it sends the token IDs it
    made, a chat's rendered prompt included, with the model's own tokenizer: the replica does not
    tokenize again. Otherwise the text or the messages go as the client sent them."""

    params: SamplingParams
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None  # chat, not tokenized by the router: rendered with the replica's tokenizer
    request_id: str | None = None
    # Fair-admission key: the authenticated tenant (API key principal), so a tenant with N
    # adapters gets one share, not N. None: keyed by the adapter (the base model counts as one).
    tenant: str | None = None
    # Prefix-cache salt: requests reuse each other's cached prompt prefixes only under one salt.
    # The router sets it from the API key (its prefix_cache_group, else its tenant); None: the
    # engine salts by ``tenant``.
    cache_salt: str | None = None


def render_prompt(tokenizer, req: GenerateRequest) -> str | list[int]:
    """The engine's prompt: text or token IDs as given, or a chat rendered to token IDs."""
    if req.messages is None:
        return req.prompt
    from serve_app.api.chat import chat_prompt_ids  # deferred: the engine imports this module, not the schemas

    return chat_prompt_ids(tokenizer, req.messages)


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model (raw logits: before temperature,
    penalties and logit_bias, as vLLM reports them), and the most likely alternatives."""

    token: str  # the token decoded on its own
    token_id: int
    logprob: float | None  # None only for a prompt's first token (echo: nothing predicts it)
    top: list[tuple[str, int, float]] | None  # (token, id, logprob), most likely first; the request's top-n


@dataclass
class RequestOutput:
    """What one step produced for one request: a text delta and the new token(s)."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: ServeAppError | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token in ``token_ids``, when the request asked
    # echo (completions), on a request's first output only: the prompt as text, and with logprobs
    # one entry per prompt token (the first one's logprob and top are None, as OpenAI and vLLM send).
    prompt_text: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


# ---- a channeled stream's items (deployments/channel.py: the protocol; router/streams.py: its reader)


@dataclass(slots=True)
class Accepted:
    """First item of a channeled request: where it runs and its first output."""

    replica: str  # the replica's unique ID: the router opens (or reuses) its channel there
    text: str
    tokens: int  # completion tokens so far


@dataclass(slots=True)
class Final:
    """Last item of a channeled request: the deltas the channel did not take, and the totals."""

    last_seq: int  # deltas 1..last_seq went out on the channel; wait for them before ``text``
    text: str  # everything after delta ``last_seq``, the final output's text included
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class Hello:
    """A channel's first item: it reached the replica it was meant for."""

    replica: str
