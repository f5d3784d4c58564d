"""OpenAI-compatible request / response models, in the style of vLLM's protocol.py.

Requests are validated here, at the edge: anything a client can get wrong must fail
as a pydantic ``ValidationError`` (FastAPI: ``RequestValidationError``) or an
``InvalidRequestError``, which the router turns into a 400 with OpenAI's error
shape via ``validation_error_body`` / ``error_body`` (api/errors.py). Nothing a client
sends should be able to reach the engine and come back as a 500.

Schemas only: the error shape is api/errors.py's, chat rendering api/chat.py's.

Validators raise ``PydanticCustomError`` rather than ``ValueError`` so the message
reaches the client verbatim (no "Value error, " prefix), and never raise
``ServeAppError``: pydantic does not wrap foreign exceptions, so one raised inside a
validator would escape FastAPI's request parsing as a 500.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from serve_app.api import structured
from serve_app.api.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    SamplingParams,
)

# OpenAI caps stop sequences at 4; matching every one after each token is per-row
# string work on the hot path, so keep the same cap, and cap each one's length too.
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 1024
# stop_token_ids are checked against every generated token of the row.
MAX_STOP_TOKEN_IDS = 64
# Prompts per request are capped at the LoRA replicas' batch size, max_num_seqs (or the lower
# limits.max_prompts_per_request), by the router's admission (router/limits.py). This is that
# cap's ceiling, max_num_seqs' upper bound (engine/config.py), checked before a prompt list is
# validated item by item: no server's cap is above it.
MAX_PROMPTS_PER_REQUEST = 4096
# Choices per prompt (``n``); n x prompts is also held to the router's prompts-per-request limit.
MAX_N = 128

# Every integer the engine turns into a tensor must fit its dtype: a top_k or a token ID
# beyond int64 raised inside the batched sampler (or the embedding) and failed the whole
# step, every tenant's rows with it. int32 is far above any vocabulary or context length.
MAX_INT32 = 2**31 - 1
# Seeds go to ``torch.Generator.manual_seed``, which raises (-> 500) outside int64.
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

FinishReason = Literal["stop", "length"]


def _check_token_ids(ids: list[int]) -> None:
    # min/max run at C speed: a 4 MB body holds ~2M token IDs.
    if not ids:
        return
    if min(ids) < 0:
        raise PydanticCustomError("negative_token", "token IDs must be >= 0")
    if (top := max(ids)) > MAX_INT32:
        raise PydanticCustomError(
            "token_out_of_range",
            "token IDs must be integers in [0, {max}] (got {got})",
            {"max": MAX_INT32, "got": shown(top, 40)},
        )


# The prompt's forms, validated one branch at a time (chosen by the first item): pydantic's
# smart union tries every branch, which took ~1 s of router CPU on a 4 MB body of token IDs.
_PROMPT_FORMS: dict[type, TypeAdapter] = {
    str: TypeAdapter(list[str]),
    int: TypeAdapter(list[int]),
    list: TypeAdapter(list[list[int]]),
}


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported", message)


def shown(value: Any, limit: int = 64) -> str:
    """``value`` as safe to echo in an error message: ``repr`` (so control characters and
    lone surrogates are escapes, never raw), cut to ``limit`` characters."""
    text = repr(value)
    if not text.isascii():
        text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Errors a bounded numeric field can fail with; all of them get the one "must be ... in
# [lo, hi]" message, so a client learns the whole range at once.
_RANGE_ERRORS = frozenset({
    "greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
    "int_type", "int_parsing", "int_parsing_size", "int_from_float", "float_type", "float_parsing",
})


def _range_of(field: Any) -> str:
    lo = hi = None
    lo_br, hi_br = "[", "]"
    for m in field.metadata:
        if getattr(m, "ge", None) is not None:
            lo = m.ge
        elif getattr(m, "gt", None) is not None:
            lo, lo_br = m.gt, "("
        if getattr(m, "le", None) is not None:
            hi = m.le
        elif getattr(m, "lt", None) is not None:
            hi, hi_br = m.lt, ")"
    return f"{lo_br}{lo:g}, {hi:g}{hi_br}" if isinstance(lo, float) or isinstance(hi, float) else f"{lo_br}{lo}, {hi}{hi_br}"


def _check_range(cls: type[BaseModel], v: Any, handler, info: ValidationInfo) -> Any:
    try:
        return handler(v)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if not errors or errors[0]["type"] not in _RANGE_ERRORS:
            raise
        field = cls.model_fields[info.field_name]
        ann = field.annotation
        kind = "a number" if ann is float or ann == (float | None) else "an integer"
        raise PydanticCustomError(
            "out_of_range",
            "must be {kind} in {range} (got {got})",
            {"kind": kind, "range": _range_of(field), "got": shown(errors[0].get("input"), 40)},
        ) from None


# --------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    # The official client may add newer keys (e.g. include_obfuscation); ignore them.
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(
        default=False,
        description="If true, a final chunk with empty `choices` and the request's `usage` "
        "is sent before `data: [DONE]`.",
    )


# Fields that change what the client gets back. They are not part of the model (so
# ``extra="ignore"`` would silently drop them); refuse them instead when set to
# anything but their no-op value, so a client never gets a quietly different answer.
_UNSUPPORTED_EXTRAS: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "prompt_logprobs": (None,),
}


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    # extra="ignore", not "forbid": benchmark harnesses and SDKs send fields we do not
    # model (``metadata``, ``store``, ``service_tier``, vLLM-specific knobs, ...), and
    # refusing them would break those clients for no benefit. The few extras that
    # would change the answer are refused explicitly (``_UNSUPPORTED_EXTRAS``).
    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        min_length=1,
        description="Model to use: the base model ID or a LoRA adapter ID (see GET /v1/models).",
    )
    temperature: float = Field(
        default=1.0,
        ge=0.0,
        le=2.0,
        allow_inf_nan=False,
        description="Sampling temperature in [0, 2]; 0 means greedy decoding.",
    )
    top_p: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Nucleus sampling: keep the smallest set of tokens whose probability mass "
        "reaches top_p. In (0, 1]; 1 disables it.",
    )
    n: int = Field(
        default=1,
        ge=1,
        le=MAX_N,
        description=f"Choices to generate per prompt, in [1, {MAX_N}]; each is its own sequence in the "
        "engine (choice j of a request with a `seed` samples with seed + j, so the choices differ and "
        "are reproducible). Usage counts every choice; n x prompts counts against the prompts per "
        "request limit.",
    )
    stream: bool = Field(
        default=False,
        description="Stream the result as server-sent events, ending with `data: [DONE]`.",
    )
    stream_options: StreamOptions | None = Field(
        default=None,
        description="Streaming options; only allowed when `stream` is true.",
    )
    stop: str | list[str] | None = Field(
        default=None,
        description=f"Up to {MAX_STOP_SEQUENCES} non-empty sequences of at most {MAX_STOP_CHARS} "
        "characters each; generation stops before the first one produced, which is not included "
        "in the output.",
    )
    stop_token_ids: list[int] | None = Field(
        default=None,
        description=f"vLLM extension: up to {MAX_STOP_TOKEN_IDS} token IDs, each in [0, {MAX_INT32}], "
        "that end generation, in addition to EOS.",
    )
    seed: int | None = Field(
        default=None,
        ge=_INT64_MIN,
        le=_INT64_MAX,
        description="Seed for a private random generator, so the same request gives the same "
        "output regardless of which other requests share its batch.",
    )
    user: str | None = Field(
        default=None,
        description="End-user identifier, accepted for OpenAI compatibility; not used.",
    )
    presence_penalty: float = Field(
        default=0.0,
        ge=-2.0,
        le=2.0,
        allow_inf_nan=False,
        description="In [-2, 2]: subtracted from the logit of every token already generated "
        "(OpenAI's rule), so positive values favour new tokens.",
    )
    frequency_penalty: float = Field(
        default=0.0,
        ge=-2.0,
        le=2.0,
        allow_inf_nan=False,
        description="In [-2, 2]: subtracted from a token's logit once per time it was already "
        "generated (OpenAI's rule).",
    )
    repetition_penalty: float = Field(
        default=1.0,
        ge=MIN_REPETITION_PENALTY,
        le=MAX_REPETITION_PENALTY,
        allow_inf_nan=False,
        description=f"vLLM extension, in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]: a token seen in the prompt "
        "or the output has its logit divided by this when positive, multiplied when negative "
        "(transformers' rule); 1 disables it.",
    )
    logit_bias: dict[str, float] | None = Field(
        default=None,
        description=f"Map of token ID (a string, as OpenAI sends it) to a bias in [-100, 100] added to "
        f"that token's logit before sampling; at most {MAX_LOGIT_BIAS} entries. -100 bans a token, "
        "100 all but forces it.",
    )
    min_tokens: int = Field(
        default=0,
        ge=0,
        le=MAX_INT32,
        description="vLLM extension: EOS and stop_token_ids cannot end the output before this many "
        "tokens (stop strings still can); at most max_tokens.",
    )
    ignore_eos: bool = Field(
        default=False,
        description="vLLM extension: keep generating past EOS until max_tokens or a stop "
        "sequence (benchmarks use it to fix output length).",
    )
    top_k: int = Field(
        default=-1,
        ge=-1,
        le=MAX_INT32,
        description="vLLM extension: sample only from the k most likely tokens, in "
        f"[-1, {MAX_INT32}]; -1 or 0 disables it, and a k above the vocabulary keeps every token.",
    )
    response_format: dict[str, Any] | None = Field(
        default=None,
        description="Structured output: {\"type\": \"text\"} (none), {\"type\": \"json_object\"} (the output "
        "is one JSON object) or {\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}} "
        "(the output matches the schema). Enforced token by token with a grammar (xgrammar); compact JSON, "
        "no free whitespace. A schema that is not a valid JSON Schema, or that the grammar compiler "
        f"refuses, is a 400; at most {structured.MAX_SCHEMA_CHARS} characters. If max_tokens ends the "
        "output first, finish_reason is 'length' and the JSON is incomplete (as OpenAI). Also on "
        "/v1/completions (vLLM extension).",
    )
    guided_json: dict[str, Any] | str | None = Field(
        default=None,
        description="vLLM extension: a JSON schema (object or JSON text) the output must match; the same as "
        "response_format json_schema. Set only one of the two.",
    )
    structured_outputs: dict[str, Any] | None = Field(
        default=None,
        description="vLLM extension: {\"json\": <schema>}, the same as guided_json.",
    )
    _json_schema: str | None = PrivateAttr(default=None)  # what the three above ask for (api/structured.py)

    # Every bounded number gets one message naming the field and its whole range. Fields
    # of the subclasses (max_tokens, max_completion_tokens) included, hence check_fields.
    @field_validator(
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "min_tokens",
        "n",
        "best_of",
        "max_tokens",
        "max_completion_tokens",
        mode="wrap",
        check_fields=False,
    )
    @classmethod
    def _in_range(cls, v: Any, handler, info: ValidationInfo) -> Any:
        return _check_range(cls, v, handler, info)

    # JSON null means "not given" in OpenAI's API (some clients send every key), so
    # map it to the field default instead of failing type validation.
    @field_validator(
        "temperature",
        "top_p",
        "n",
        "stream",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "min_tokens",
        "ignore_eos",
        "top_k",
        mode="before",
    )
    @classmethod
    def _null_means_default(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            return cls.model_fields[info.field_name].get_default()
        return v

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported_extras(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, noop_values in _UNSUPPORTED_EXTRAS.items():
                if name in data and data[name] not in noop_values:
                    raise _unsupported(f"{name}: not supported by this server")
        return data

    @field_validator("stop", mode="wrap")
    @classmethod
    def _check_stop(cls, v: Any, handler) -> Any:
        try:
            v = handler(v)
        except ValidationError:
            # The str | list[str] union would otherwise report one error per branch.
            raise PydanticCustomError(
                "stop_type", "must be a string, a list of strings, or null"
            ) from None
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise PydanticCustomError(
                "too_many_stop",
                "at most {max} stop sequences are allowed (got {n})",
                {"max": MAX_STOP_SEQUENCES, "n": len(stops)},
            )
        if any(s == "" for s in stops):
            raise PydanticCustomError("empty_stop", "stop sequences must be non-empty")
        for i, s in enumerate(stops):
            if len(s) > MAX_STOP_CHARS:
                raise PydanticCustomError(
                    "stop_too_long",
                    "stop sequence {i} is {n} characters, more than the limit {max}; shorten it",
                    {"i": i, "n": len(s), "max": MAX_STOP_CHARS},
                )
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, v: list[int] | None) -> list[int] | None:
        if not v:
            return v
        if len(v) > MAX_STOP_TOKEN_IDS:
            raise PydanticCustomError(
                "too_many_stop_token_ids",
                "at most {max} stop token IDs are allowed (got {n})",
                {"max": MAX_STOP_TOKEN_IDS, "n": len(v)},
            )
        _check_token_ids(v)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise PydanticCustomError(
                "too_many_logit_bias",
                "at most {max} logit_bias entries are allowed (got {n})",
                {"max": MAX_LOGIT_BIAS, "n": len(v)},
            )
        for key, bias in v.items():
            if not (key.isascii() and key.isdigit()) or int(key) > MAX_INT32:
                raise PydanticCustomError(
                    "logit_bias_key",
                    "logit_bias keys must be token IDs, integers in [0, {max}] written as strings (got {got})",
                    {"max": MAX_INT32, "got": shown(key, 40)},
                )
            if not (-100.0 <= bias <= 100.0):  # also refuses NaN
                raise PydanticCustomError(
                    "logit_bias_value",
                    "logit_bias values must be in [-100, 100] (got {got} for token {tok})",
                    {"got": shown(bias, 40), "tok": key},
                )
        return v

    @model_validator(mode="after")
    def _structured_output(self):
        self._json_schema = structured.from_request({
            "response_format": self.response_format, "guided_json": self.guided_json,
            "structured_outputs": self.structured_outputs,
        })
        return self

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        # Same rule as OpenAI and vLLM: silently ignoring it would hide a client bug.
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError(
                "stream_options", "stream_options is only allowed when stream is true"
            )
        return self

    @property
    def include_usage(self) -> bool:
        """Whether the stream must end with a usage-only chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _max_tokens(self, default_max_tokens: int) -> int:
        raise NotImplementedError

    @property
    def sequences(self) -> int:
        """Engine sequences per prompt: ``n`` (completions: ``best_of`` when larger)."""
        return self.n

    def choice_params(self, params: SamplingParams) -> list[SamplingParams]:
        """One SamplingParams per sequence (``sequences``): sequence j samples with ``seed + j``
        (int64 wrap)."""
        count = self.sequences
        if count == 1:
            return [params]
        if params.seed is None:
            return [params] * count
        span = _INT64_MAX - _INT64_MIN + 1
        return [dataclasses.replace(params, seed=(params.seed + j - _INT64_MIN) % span + _INT64_MIN)
                for j in range(count)]

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """Engine sampling parameters; ``default_max_tokens`` applies when none was given.

        The router still has to check prompt length + max_tokens against the model's
        context window: that needs the tokenized prompt, which the schema does not see.
        """
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = self._max_tokens(default_max_tokens)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=-1 if self.top_k == 0 else self.top_k,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias={int(k): float(b) for k, b in (self.logit_bias or {}).items()},
            min_tokens=self.min_tokens,
            json_schema=self._json_schema,
        )


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Prompt text, a batch of texts, or (vLLM extension) token IDs or a batch "
        "of token-ID lists. A batch yields one choice per prompt, in order; the server caps the "
        "prompts per request (the LoRA replicas' max_num_seqs). Token IDs are in "
        f"[0, {MAX_INT32}] (and below the vocabulary size)."
    )
    max_tokens: int | None = Field(
        default=16,
        ge=1,
        le=MAX_INT32,
        description=f"Most tokens to generate per choice, in [1, {MAX_INT32}] (OpenAI's default is "
        "16); null means the server's default. The model's context window (max_model_len) and "
        "limits.max_tokens are the real limits.",
    )
    echo: bool = Field(
        default=False,
        description="Prepend the prompt to each choice's text; with `logprobs`, the prompt's tokens come "
        "first in `logprobs` too (the first one's logprob and top_logprobs are null, as OpenAI and vLLM "
        "send), from a scoring forward of the prompt under the same model/adapter (raw logprobs). What "
        "lm-eval's loglikelihood tasks use (`echo` + `logprobs` + max_tokens 1).",
    )
    best_of: int | None = Field(
        default=None,
        ge=1,
        le=MAX_N,
        description=f"Generate this many sequences per prompt (in [n, {MAX_N}]) and return the `n` with the "
        "highest cumulative logprob (raw model logprobs of their tokens), best first. Usage counts every "
        "sequence. Not with `stream` unless equal to `n` (OpenAI's rule). Sequence j of a request with a "
        "`seed` samples with seed + j; greedy sequences are all the same.",
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description=f"In [0, {MAX_LOGPROBS}]: return each generated token's log probability and the "
        "this-many most likely alternatives (`choices[].logprobs`: tokens, token_logprobs, "
        "top_logprobs, text_offset). Raw model logprobs: before temperature, penalties, "
        "logit_bias and response_format, as vLLM reports them. With `echo`, the prompt's tokens too.",
    )

    @field_validator("echo", mode="before")
    @classmethod
    def _echo_null_means_false(cls, v: Any) -> Any:
        return False if v is None else v

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _check_prompt(cls, v: Any, handler) -> Any:
        # One readable message instead of an error per union branch.
        wrong_type = PydanticCustomError(
            "prompt_type",
            "must be a string, a list of strings, a list of token IDs, or a list of token-ID lists",
        )
        if not isinstance(v, list):
            try:
                return handler(v)
            except ValidationError:
                raise wrong_type from None
        if not v:
            raise PydanticCustomError("empty_prompt", "must not be an empty list")
        first = v[0]
        form = str if isinstance(first, str) else list if isinstance(first, list) else int if isinstance(first, int) else None
        # Before the items are validated: a 4 MB body of [[1],[1],...] is ~1M prompts, each
        # of which would become an engine request.
        if form is not int and len(v) > MAX_PROMPTS_PER_REQUEST:
            raise PydanticCustomError(
                "too_many_prompts",
                "a request may hold at most {max} prompts (got {n}); send fewer per request",
                {"max": MAX_PROMPTS_PER_REQUEST, "n": len(v)},
            )
        if form is None:
            raise wrong_type
        try:
            v = _PROMPT_FORMS[form].validate_python(v)
        except ValidationError:
            raise wrong_type from None
        if form is int:
            _check_token_ids(v)
        elif form is list:
            for p in v:
                if not p:
                    raise PydanticCustomError("empty_prompt", "token-ID prompts must not be empty")
                _check_token_ids(p)
        return v

    @model_validator(mode="after")
    def _check_best_of(self):
        if self.best_of is None:
            return self
        if self.best_of < self.n:
            raise PydanticCustomError("best_of", "best_of ({b}) must be >= n ({n})", {"b": self.best_of, "n": self.n})
        if self.stream and self.best_of > self.n:
            raise PydanticCustomError("best_of_stream", "best_of > n cannot be streamed; drop stream or best_of")
        return self

    @property
    def sequences(self) -> int:
        return max(self.n, self.best_of or 1)

    @field_validator("logprobs", mode="wrap")
    @classmethod
    def _logprobs_range(cls, v: Any, handler, info: ValidationInfo) -> Any:
        return _check_range(cls, v, handler, info)

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return dataclasses.replace(super().to_sampling_params(default_max_tokens), logprobs=self.logprobs,
                                   echo=self.echo)

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a batch: each item is one text or one token-ID list."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [list(p)]  # one tokenized prompt
        return list(p)

    def _max_tokens(self, default_max_tokens: int) -> int:
        return default_max_tokens if self.max_tokens is None else self.max_tokens


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"] = Field(description="Content part type; only 'text' is supported.")
    text: str = Field(description="The text of this part.")


class ChatMessage(BaseModel):
    # Ignore name, tool_call_id, etc.: they do not affect the rendered prompt here.
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"] = Field(
        description="Author of the message."
    )
    content: str | list[TextContentPart] = Field(
        description="Message text, or a list of text content parts (concatenated, "
        "newline-separated)."
    )

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, v: Any) -> Any:
        # Checked by hand: union errors would list every branch, and a non-text part
        # (image_url, input_audio) deserves a message saying it is unsupported.
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise PydanticCustomError(
                "content_type", "must be a string or a list of content parts"
            )
        for part in v:
            kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
            if kind != "text":
                raise PydanticCustomError(
                    "unsupported",
                    "only 'text' content parts are supported (got {kind})",
                    {"kind": repr(kind)},
                )
            text = part.get("text") if isinstance(part, dict) else getattr(part, "text", None)
            if not isinstance(text, str):
                raise PydanticCustomError(
                    "content_text", "text content parts need a string 'text' field"
                )
        return v

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        # vLLM's choice: separate parts by newlines so they do not run into each other.
        return "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(
        min_length=1, description="The conversation so far; at least one message."
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        le=MAX_INT32,
        description=f"Most tokens to generate, in [1, {MAX_INT32}] (deprecated by OpenAI in favour "
        "of max_completion_tokens); null means the server's default.",
    )
    max_completion_tokens: int | None = Field(
        default=None,
        ge=1,
        le=MAX_INT32,
        description=f"Most tokens to generate, in [1, {MAX_INT32}]; null means the server's default.",
    )
    logprobs: bool | None = Field(
        default=None,
        description="Return each output token's log probability (`choices[].logprobs.content`); raw "
        "model logprobs, before temperature, penalties and logit_bias, as vLLM reports them.",
    )
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description=f"With logprobs true: the this-many most likely tokens per position, in [0, {MAX_LOGPROBS}].",
    )

    @field_validator("top_logprobs", mode="wrap")
    @classmethod
    def _top_logprobs_range(cls, v: Any, handler, info: ValidationInfo) -> Any:
        return _check_range(cls, v, handler, info)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:  # OpenAI's rule
            raise PydanticCustomError("top_logprobs", "top_logprobs needs logprobs set to true")
        return self

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        params = super().to_sampling_params(default_max_tokens)
        return dataclasses.replace(params, logprobs=(self.top_logprobs or 0) if self.logprobs else None)

    @model_validator(mode="after")
    def _one_max_tokens(self):
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise PydanticCustomError(
                "max_tokens_conflict",
                "max_tokens and max_completion_tokens disagree ({a} vs {b}); set only one",
                {"a": a, "b": b},
            )
        return self

    def _max_tokens(self, default_max_tokens: int) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        if self.max_tokens is not None:
            return self.max_tokens
        return default_max_tokens


# -------------------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt(s).")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


def _lp(v: float) -> float:
    return max(v, -9999.0)  # JSON has no -inf (vLLM's floor too)


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape: one entry per generated token."""

    tokens: list[str] = Field(description="Each generated token (with echo: the prompt's first), decoded on its own.")
    token_logprobs: list[float | None] = Field(
        description="Each token's log probability; null for the prompt's first token (echo).")
    top_logprobs: list[dict[str, float] | None] = Field(
        description="Per token, the requested number of most likely tokens -> their log probability; null "
        "for the prompt's first token (echo).")
    text_offset: list[int] = Field(description="Each token's character offset in the choice's text.")

    @classmethod
    def of(cls, entries: list[Any], offset: int = 0) -> CompletionLogprobs:
        """From the engine's TokenLogprob entries (api/wire.py); ``offset``: text already sent."""
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e.token)
        return cls(tokens=[e.token for e in entries],
                   token_logprobs=[None if e.logprob is None else _lp(e.logprob) for e in entries],
                   top_logprobs=[None if e.top is None else {t: _lp(v) for t, _, v in e.top} for e in entries],
                   text_offset=offsets)


class ChatTopLogprob(BaseModel):
    token: str = Field(description="The token, decoded on its own.")
    logprob: float = Field(description="Its log probability.")
    bytes: list[int] = Field(description="The token's UTF-8 bytes.")


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(description="The requested number of most likely tokens here.")


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(description="One entry per generated token.")

    @classmethod
    def of(cls, entries: list[Any]) -> ChatLogprobs:
        return cls(content=[
            ChatTokenLogprob(token=e.token, logprob=_lp(e.logprob), bytes=list(e.token.encode("utf-8", "replace")),
                             top_logprobs=[ChatTopLogprob(token=t, logprob=_lp(v), bytes=list(t.encode("utf-8", "replace")))
                                           for t, _, v in e.top])
            for e in entries
        ])


class CompletionResponseChoice(BaseModel):
    index: int = Field(description="Position of this choice (the prompt's index in a batch).")
    text: str = Field(description="Generated text.")
    logprobs: CompletionLogprobs | None = Field(default=None, description="With `logprobs` in the request: the tokens' log probabilities.")
    finish_reason: FinishReason = Field(
        description="'stop' for EOS or a stop sequence, 'length' for max_tokens."
    )


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"), description="Completion ID.")
    object: Literal["text_completion"] = Field(
        default="text_completion", description="Always 'text_completion'."
    )
    created: int = Field(
        default_factory=lambda: int(time.time()), description="Unix time of creation, seconds."
    )
    model: str = Field(description="Model (base or adapter ID) that served the request.")
    choices: list[CompletionResponseChoice] = Field(description="One choice per prompt.")
    usage: UsageInfo = Field(description="Token counts for the request.")


class CompletionResponseStreamChoice(BaseModel):
    index: int = Field(description="Position of this choice (the prompt's index in a batch).")
    text: str = Field(description="Text generated since the previous chunk.")
    logprobs: CompletionLogprobs | None = Field(default=None, description="With `logprobs` in the request: the tokens' log probabilities.")
    finish_reason: FinishReason | None = Field(
        default=None, description="Null until the choice's last chunk."
    )


class _OmitNullUsage(BaseModel):
    # OpenAI leaves `usage` out of chunks unless it has a value; the official client
    # treats missing and null alike, but other SSE consumers key on its presence.
    @model_serializer(mode="wrap")
    def _omit_null_usage(self, handler):
        out = handler(self)
        if out.get("usage", 0) is None:
            del out["usage"]
        return out


class CompletionStreamResponse(_OmitNullUsage):
    id: str = Field(description="Completion ID; the same on every chunk of a stream.")
    object: Literal["text_completion"] = Field(
        default="text_completion", description="Always 'text_completion' (as OpenAI sends)."
    )
    created: int = Field(
        default_factory=lambda: int(time.time()), description="Unix time of creation, seconds."
    )
    model: str = Field(description="Model (base or adapter ID) that served the request.")
    choices: list[CompletionResponseStreamChoice] = Field(
        description="Deltas; empty on the final usage-only chunk."
    )
    usage: UsageInfo | None = Field(
        default=None,
        description="Only on the final chunk, when stream_options.include_usage is set.",
    )


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = Field(default="assistant", description="Always 'assistant'.")
    content: str = Field(description="Generated text.")


class ChatCompletionResponseChoice(BaseModel):
    index: int = Field(description="Position of this choice.")
    message: ChatResponseMessage = Field(description="The generated message.")
    logprobs: ChatLogprobs | None = Field(default=None, description="With `logprobs: true` in the request: the tokens' log probabilities.")
    finish_reason: FinishReason = Field(
        description="'stop' for EOS or a stop sequence, 'length' for max_tokens."
    )


class ChatCompletionResponse(BaseModel):
    id: str = Field(
        default_factory=lambda: random_id("chatcmpl"), description="Chat completion ID."
    )
    object: Literal["chat.completion"] = Field(
        default="chat.completion", description="Always 'chat.completion'."
    )
    created: int = Field(
        default_factory=lambda: int(time.time()), description="Unix time of creation, seconds."
    )
    model: str = Field(description="Model (base or adapter ID) that served the request.")
    choices: list[ChatCompletionResponseChoice] = Field(description="The generated choice.")
    usage: UsageInfo = Field(description="Token counts for the request.")


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = Field(
        default=None, description="'assistant' on the first chunk only."
    )
    content: str | None = Field(default=None, description="Text generated since the last chunk.")

    # OpenAI sends `"delta": {}` on the finishing chunk and only the keys that changed
    # otherwise; drop nulls here so every caller serializes it the same way.
    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionResponseStreamChoice(BaseModel):
    index: int = Field(description="Position of this choice.")
    delta: DeltaMessage = Field(description="What changed since the previous chunk.")
    logprobs: ChatLogprobs | None = Field(default=None, description="With `logprobs: true` in the request: the tokens' log probabilities.")
    finish_reason: FinishReason | None = Field(
        default=None, description="Null until the choice's last chunk."
    )


class ChatCompletionStreamResponse(_OmitNullUsage):
    id: str = Field(description="Chat completion ID; the same on every chunk of a stream.")
    object: Literal["chat.completion.chunk"] = Field(
        default="chat.completion.chunk", description="Always 'chat.completion.chunk'."
    )
    created: int = Field(
        default_factory=lambda: int(time.time()), description="Unix time of creation, seconds."
    )
    model: str = Field(description="Model (base or adapter ID) that served the request.")
    choices: list[ChatCompletionResponseStreamChoice] = Field(
        description="Deltas; empty on the final usage-only chunk."
    )
    usage: UsageInfo | None = Field(
        default=None,
        description="Only on the final chunk, when stream_options.include_usage is set.",
    )


class ModelCard(BaseModel):
    id: str = Field(description="Model ID to pass as `model`: the base model or an adapter.")
    object: Literal["model"] = Field(default="model", description="Always 'model'.")
    created: int = Field(
        default_factory=lambda: int(time.time()),
        description="Unix time the model became available, seconds.",
    )
    owned_by: str = Field(default="serve-app", description="Owner: the server or the tenant.")
    root: str | None = Field(
        default=None,
        description="Where the weights come from: the base model's path/hub ID, or the "
        "adapter's source URI.",
    )
    parent: str | None = Field(
        default=None, description="For an adapter, the base model ID it applies to; else null."
    )


class ModelList(BaseModel):
    object: Literal["list"] = Field(default="list", description="Always 'list'.")
    data: list[ModelCard] = Field(default_factory=list, description="Servable models.")
