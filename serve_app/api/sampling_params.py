"""Sampling parameters: what a request asks of the sampler (no torch).

The router builds them (api/protocol.py), the replica passes them to the engine, and
engine/sampling.py draws with them, so they live apart from the sampler, as vLLM keeps
sampling_params.py apart from its engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.errors import InvalidRequestError

MAX_LOGPROBS = 20  # alternatives per token (vLLM's default max_logprobs; OpenAI allows 20 on chat)
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias (each is a scatter into its row)
# Seen tokens' positive logits are divided by the penalty: a tiny one would turn them into inf.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 10.0


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k filtering
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Logits processors, applied per row before temperature (engine/sampling.py says the order).
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output so far
    repetition_penalty: float = 1.0  # vLLM/transformers: over prompt and output, divide (>0) or multiply (<0) logits
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # EOS and stop_token_ids cannot be generated before this many tokens
    logprobs: int | None = None  # None: none; k: each token's logprob and its k most likely alternatives
    # Structured output: the JSON schema the output must match, as JSON text (api/structured.py
    # builds it from response_format / guided_json; json_object is '{"type":"object"}'). The
    # engine compiles it once per distinct text (engine/structured.py) and masks the row's logits.
    json_schema: str | None = None
    # echo (completions): the first output also carries the prompt's text and, with ``logprobs``,
    # its tokens' logprobs (a scoring forward of the prompt on the engine thread).
    echo: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 (disabled) or >= 0, got {self.top_k}")
        if any(s == "" for s in self.stop):
            raise InvalidRequestError("stop sequences must be non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {v}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidRequestError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, "
                                      f"{MAX_REPETITION_PENALTY}], got {self.repetition_penalty}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias has {len(self.logit_bias)} entries, more than {MAX_LOGIT_BIAS}")
        for tok, bias in self.logit_bias.items():
            if not -100.0 <= bias <= 100.0:
                raise InvalidRequestError(f"logit_bias for token {tok} is {bias}; biases must be in [-100, 100]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_tokens ({self.max_tokens})], got {self.min_tokens}")

    @property
    def processes_logits(self) -> bool:
        """Whether any logits processor applies to this request's rows (most requests: none)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

    @property
    def per_token_output(self) -> bool:
        """Whether the outputs carry per-token data besides text (logprobs, the echoed prompt): a
        stream of such a request goes on its own call, not over the text-only channel
        (router/forward.py). A new per-token output option belongs here too."""
        return self.logprobs is not None or self.echo

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1
