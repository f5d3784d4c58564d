"""OpenAI protocol models, error bodies, SSE framing and chat rendering (CPU only, offline)."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel, ValidationError

from serve_app.api import protocol as P
from serve_app.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatResponseMessage,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    UsageInfo,
)
from serve_app.api.chat import render_chat
from serve_app.api.errors import error_body, error_status, validation_error_body
from serve_app.api.sse import DONE, encode_error, encode_event
from serve_app.engine.sampling import SamplingParams
from serve_app.errors import AdapterNotFoundError, InvalidRequestError
from tests.unit.test_edge_caps import edge  # noqa: F401  (fixture: the real ingress app, no Ray)

MSGS = [{"role": "user", "content": "hi"}]


def _completion(**kw):
    return CompletionRequest(**{"model": "base", "prompt": "hello", **kw})


def _chat(**kw):
    return ChatCompletionRequest(**{"model": "base", "messages": MSGS, **kw})


def _error_of(make, **kw) -> dict:
    with pytest.raises(ValidationError) as ei:
        make(**kw)
    body = validation_error_body(ei.value)
    assert set(body) == {"error"}
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "make, kw, message, param",
    [
        (_completion, {"max_tokens": 0}, "max_tokens: must be an integer in [1, 2147483647] (got 0)", "max_tokens"),
        (_completion, {"max_tokens": -5}, "max_tokens: must be an integer in [1, 2147483647] (got -5)", "max_tokens"),
        (_completion, {"n": 129}, "n: must be an integer in [1, 128] (got 129)", "n"),
        (_completion, {"n": 0}, "n: must be an integer in [1, 128] (got 0)", "n"),
        (_completion, {"temperature": 2.5}, "temperature: must be a number in [0, 2] (got 2.5)", "temperature"),
        (_completion, {"temperature": -0.1}, "temperature: must be a number in [0, 2] (got -0.1)", "temperature"),
        (_completion, {"temperature": float("nan")}, "temperature: must be a number in [0, 2] (got nan)", "temperature"),
        (_completion, {"top_p": 0}, "top_p: must be a number in (0, 1] (got 0)", "top_p"),
        (_completion, {"top_p": 1.5}, "top_p: must be a number in (0, 1] (got 1.5)", "top_p"),
        (_completion, {"top_k": -2}, "top_k: must be an integer in [-1, 2147483647] (got -2)", "top_k"),
        (_completion, {"stop": ["a", "b", "c", "d", "e"]}, "stop: at most 4 stop sequences are allowed (got 5)", "stop"),
        (_completion, {"stop": ""}, "stop: stop sequences must be non-empty", "stop"),
        (_completion, {"stop": ["ok", ""]}, "stop: stop sequences must be non-empty", "stop"),
        (_completion, {"stop": 3}, "stop: must be a string, a list of strings, or null", "stop"),
        (_completion, {"stop_token_ids": [-1]}, "stop_token_ids: token IDs must be >= 0", "stop_token_ids"),
        (_completion, {"seed": 2**64}, "seed: must be an integer in [-9223372036854775808, 9223372036854775807]", "seed"),
        (_completion, {"echo": 3}, "echo: Input should be a valid boolean", "echo"),
        (_completion, {"logprobs": 21}, "logprobs: must be an integer in [0, 20] (got 21)", "logprobs"),
        (_completion, {"logprobs": -1}, "logprobs: must be an integer in [0, 20] (got -1)", "logprobs"),
        (_completion, {"presence_penalty": -2.5}, "presence_penalty: must be a number in [-2, 2] (got -2.5)", "presence_penalty"),
        (_completion, {"frequency_penalty": 3}, "frequency_penalty: must be a number in [-2, 2] (got 3)", "frequency_penalty"),
        (_completion, {"repetition_penalty": 0}, "repetition_penalty: must be a number in [0.01, 10] (got 0)", "repetition_penalty"),
        (_completion, {"stream_options": {"include_usage": True}}, "stream_options is only allowed when stream is true", None),
        (_completion, {"best_of": 2, "n": 3}, "best_of (2) must be >= n (3)", None),
        (_completion, {"best_of": 3, "stream": True}, "best_of > n cannot be streamed", None),
        (_completion, {"best_of": 129}, "best_of: must be an integer in [1, 128] (got 129)", "best_of"),
        (_completion, {"logit_bias": {"5": 101}}, "logit_bias: logit_bias values must be in [-100, 100] (got 101", "logit_bias"),
        (_completion, {"logit_bias": {"-5": 1}}, "logit_bias: logit_bias keys must be token IDs", "logit_bias"),
        (_completion, {"min_tokens": -1}, "min_tokens: must be an integer in [0, 2147483647] (got -1)", "min_tokens"),
        (_completion, {"model": ""}, "model: String should have at least 1 character", "model"),
        (_completion, {"prompt": []}, "prompt: must not be an empty list", "prompt"),
        (_completion, {"prompt": [[1, 2], []]}, "prompt: token-ID prompts must not be empty", "prompt"),
        (_completion, {"prompt": [1, -2]}, "prompt: token IDs must be >= 0", "prompt"),
        (_completion, {"prompt": [[1], [-2]]}, "prompt: token IDs must be >= 0", "prompt"),
        (_completion, {"prompt": [1, "a"]}, "prompt: must be a string, a list of strings, a list of token IDs", "prompt"),
        (_completion, {"prompt": {"text": "x"}}, "prompt: must be a string, a list of strings", "prompt"),
        (_chat, {"messages": []}, "messages: List should have at least 1 item", "messages"),
        (_chat, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role: Input should be", "messages[0].role"),
        (_chat, {"messages": [{"role": "user"}]}, "messages[0].content: Field required", "messages[0].content"),
        (_chat, {"messages": [{"role": "user", "content": 7}]}, "messages[0].content: must be a string or a list of content parts", "messages[0].content"),
        (
            _chat,
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content: only 'text' content parts are supported (got 'image_url')",
            "messages[0].content",
        ),
        (_chat, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "need a string 'text' field", "messages[0].content"),
        (_chat, {"max_tokens": 0}, "max_tokens: must be an integer in [1, 2147483647] (got 0)", "max_tokens"),
        (_chat, {"max_completion_tokens": 0}, "max_completion_tokens: must be an integer in [1, 2147483647] (got 0)", "max_completion_tokens"),
        (_chat, {"max_tokens": 5, "max_completion_tokens": 6}, "disagree (5 vs 6); set only one", None),
        (_chat, {"n": 200}, "n: must be an integer in [1, 128] (got 200)", "n"),
        (_chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs: must be an integer in [0, 20] (got 21)", "top_logprobs"),
        (_chat, {"top_logprobs": 3}, "top_logprobs needs logprobs set to true", None),
        (_chat, {"response_format": {"type": "xml"}}, "response_format.type must be 'text', 'json_object' or 'json_schema'", None),
        (_chat, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
         "response_format.json_schema.schema: not a valid JSON Schema at type", None),
        (_completion, {"guided_json": "{not json"}, "guided_json: the schema is not valid JSON", None),
        (_completion, {"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}},
         "set only one of response_format, guided_json and structured_outputs", None),
        (_chat, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools: not supported", None),
        (_chat, {"stream_options": {"include_usage": True}}, "stream_options is only allowed when stream is true", None),
        # Every integer that becomes a tensor fits int32 (beyond int64 it failed the engine's whole step).
        (_completion, {"top_k": 2**63}, "top_k: must be an integer in [-1, 2147483647] (got 9223372036854775808)", "top_k"),
        (_completion, {"top_k": 1.5}, "top_k: must be an integer in [-1, 2147483647] (got 1.5)", "top_k"),
        (_completion, {"max_tokens": 2**31}, "max_tokens: must be an integer in [1, 2147483647]", "max_tokens"),
        (_chat, {"max_completion_tokens": 2**31}, "max_completion_tokens: must be an integer in [1, 2147483647]",
         "max_completion_tokens"),
        (_completion, {"stop_token_ids": [2**31]}, "stop_token_ids: token IDs must be integers in [0, 2147483647]",
         "stop_token_ids"),
        (_completion, {"stop_token_ids": [1] * 65}, "stop_token_ids: at most 64 stop token IDs are allowed (got 65)",
         "stop_token_ids"),
        (_completion, {"stop": ["ok", "x" * 1025]}, "stop: stop sequence 1 is 1025 characters, more than the limit 1024",
         "stop"),
        (_completion, {"prompt": [[1], [2**31]]}, "prompt: token IDs must be integers in [0, 2147483647]", "prompt"),
        (_completion, {"prompt": ["a"] * 4097}, "prompt: a request may hold at most 4096 prompts (got 4097)", "prompt"),
    ],
)
def test_bad_requests_give_readable_400_bodies(make, kw, message, param):
    err = _error_of(make, **kw)
    assert message in err["message"]
    assert err["param"] == param
    assert err["code"] == "invalid_request"


def test_missing_required_fields_are_named():
    err = _error_of(CompletionRequest.model_validate, obj={})
    assert "model: Field required" in err["message"]
    assert "prompt: Field required" in err["message"]


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("hello", ["hello"]),
        ("", [""]),  # allowed by OpenAI; the router checks the tokenized length
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_prompt_forms(prompt, expected):
    req = _completion(prompt=prompt)
    assert req.prompts() == expected


def test_huge_max_tokens_is_accepted_at_schema_level():
    # The context-window check needs the prompt length, so it belongs to the router; the
    # schema only keeps it an int32.
    req = _completion(max_tokens=10**9)
    assert req.to_sampling_params(default_max_tokens=16).max_tokens == 10**9
    assert _chat(max_completion_tokens=10**9).to_sampling_params(16).max_tokens == 10**9


def test_largest_legal_values_pass():
    req = _completion(top_k=2**31 - 1, top_p=1e-300, temperature=2.0, seed=-(2**63), max_tokens=2**31 - 1,
                      stop=["s" * 1024] * 4, stop_token_ids=list(range(2**31 - 64, 2**31)), prompt=[[2**31 - 1]] * 4096)
    params = req.to_sampling_params(16)
    assert params.top_k == 2**31 - 1 and params.top_p == 1e-300  # the sampler clamps a tiny top_p
    assert len(req.prompts()) == 4096
    assert _completion(prompt=list(range(5000))).prompts() == [list(range(5000))]  # one long token-ID prompt


def test_null_means_default_and_unknown_fields_are_ignored():
    req = CompletionRequest.model_validate(
        {
            "model": "base",
            "prompt": "x",
            "temperature": None,
            "top_p": None,
            "n": None,
            "stream": None,
            "echo": None,
            "presence_penalty": None,
            "frequency_penalty": None,
            "top_k": None,
            "ignore_eos": None,
            "stop": None,
            "logprobs": None,
            # What SDKs and benchmark harnesses add; harmless to ignore.
            "metadata": {"k": "v"},
            "store": False,
            "best_of": 1,
            "some_vendor_knob": 3,
        }
    )
    assert (req.temperature, req.top_p, req.n, req.stream, req.top_k) == (1.0, 1.0, 1, False, -1)
    assert not hasattr(req, "some_vendor_knob")
    assert _chat(response_format={"type": "text"}, tools=[], logprobs=False, top_logprobs=0).n == 1
    assert _completion(min_tokens=64, max_tokens=64, ignore_eos=True).ignore_eos
    assert _completion(logprobs=3).to_sampling_params(16).logprobs == 3
    assert _completion().to_sampling_params(16).logprobs is None
    assert _chat(logprobs=True, top_logprobs=4).to_sampling_params(16).logprobs == 4
    assert _chat(logprobs=True).to_sampling_params(16).logprobs == 0
    assert _chat(logprobs=False, top_logprobs=0).to_sampling_params(16).logprobs is None
    # Supported since the logits processors: accepted and passed on (tests/unit/test_logits_processors.py).
    p = _completion(presence_penalty=0.5, frequency_penalty=-1, logit_bias={"5": 10}, min_tokens=8,
                    max_tokens=16).to_sampling_params(16)
    assert (p.presence_penalty, p.frequency_penalty, p.logit_bias, p.min_tokens) == (0.5, -1.0, {5: 10.0}, 8)


def test_json_body_validation_like_fastapi_does():
    req = ChatCompletionRequest.model_validate_json(
        json.dumps(
            {
                "model": "tenant-a/adapter",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                    {"role": "assistant", "content": "ok", "name": "bot"},
                    {"role": "tool", "content": "42", "tool_call_id": "t1"},
                ],
                "stream": True,
                "stream_options": {"include_usage": True, "include_obfuscation": False},
            }
        )
    )
    assert req.include_usage
    assert [m.text() for m in req.messages] == ["be brief", "a\nb", "ok", "42"]
    assert not _chat(stream=True).include_usage
    assert not _chat(stream=True, stream_options={}).include_usage


# ----------------------------------------------------------------- sampling params


def test_completion_to_sampling_params():
    sp = _completion(
        max_tokens=7,
        temperature=0.0,
        top_p=0.9,
        top_k=40,
        seed=-3,
        stop="###",
        stop_token_ids=[2],
        ignore_eos=True,
    ).to_sampling_params(default_max_tokens=100)
    assert sp == SamplingParams(
        max_tokens=7,
        temperature=0.0,
        top_p=0.9,
        top_k=40,
        seed=-3,
        stop=["###"],
        stop_token_ids=[2],
        ignore_eos=True,
    )
    assert sp.greedy


def test_completion_max_tokens_defaults():
    assert _completion().to_sampling_params(default_max_tokens=100).max_tokens == 16  # OpenAI's default
    assert _completion(max_tokens=None).to_sampling_params(default_max_tokens=100).max_tokens == 100


def test_stop_str_vs_list_and_top_k_zero():
    assert _completion(stop="x").to_sampling_params(16).stop == ["x"]
    assert _completion(stop=["x", "y"]).to_sampling_params(16).stop == ["x", "y"]
    assert _completion(stop=[]).to_sampling_params(16).stop == []
    assert _completion().to_sampling_params(16).stop == []
    assert _completion(top_k=0).to_sampling_params(16).top_k == -1  # 0 means disabled


def test_chat_to_sampling_params_max_tokens_precedence():
    assert _chat().to_sampling_params(default_max_tokens=64).max_tokens == 64
    assert _chat(max_tokens=5).to_sampling_params(64).max_tokens == 5
    assert _chat(max_completion_tokens=6).to_sampling_params(64).max_tokens == 6
    assert _chat(max_tokens=6, max_completion_tokens=6).to_sampling_params(64).max_tokens == 6
    sp = _chat(temperature=0.7, top_p=0.5, seed=1, stop=["\n"], ignore_eos=True).to_sampling_params(64)
    assert (sp.temperature, sp.top_p, sp.seed, sp.stop, sp.ignore_eos) == (0.7, 0.5, 1, ["\n"], True)


def test_bad_default_max_tokens_is_a_400_not_a_500():
    with pytest.raises(InvalidRequestError):
        _chat().to_sampling_params(default_max_tokens=0)


# ----------------------------------------------------------------------- responses


def _jsonable(model: BaseModel) -> dict:
    return json.loads(model.model_dump_json())


def test_completion_response_parses_with_openai_types():
    resp = CompletionResponse(
        model="tenant-a/adapter",
        choices=[CompletionResponseChoice(index=0, text="hi there", finish_reason="length")],
        usage=UsageInfo.of(3, 2),
    )
    data = _jsonable(resp)
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    assert data["choices"][0]["logprobs"] is None
    parsed = Completion.model_validate(data)
    assert parsed.choices[0].text == "hi there"
    assert parsed.usage.total_tokens == 5


def test_chat_response_parses_with_openai_types():
    resp = ChatCompletionResponse(
        model="base",
        choices=[ChatCompletionResponseChoice(index=0, message=ChatResponseMessage(content="yo"), finish_reason="stop")],
        usage=UsageInfo.of(4, 1),
    )
    data = _jsonable(resp)
    assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
    parsed = ChatCompletion.model_validate(data)
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].message.content == "yo"
    assert parsed.usage.prompt_tokens == 4


def test_chat_chunks_match_openai_shape():
    first = ChatCompletionStreamResponse(
        id="chatcmpl-1",
        model="base",
        choices=[ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))],
    )
    last = ChatCompletionStreamResponse(
        id="chatcmpl-1",
        model="base",
        choices=[ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(), finish_reason="stop")],
    )
    usage = ChatCompletionStreamResponse(id="chatcmpl-1", model="base", choices=[], usage=UsageInfo.of(1, 2))
    d_first, d_last, d_usage = _jsonable(first), _jsonable(last), _jsonable(usage)
    # As OpenAI sends them: finish_reason null kept, delta only has what changed,
    # usage absent until the usage-only chunk.
    assert d_first["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    assert d_last["choices"][0]["delta"] == {} and d_last["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in d_first and d_usage["choices"] == [] and d_usage["usage"]["total_tokens"] == 3
    for d in (d_first, d_last, d_usage):
        assert d["object"] == "chat.completion.chunk"
        ChatCompletionChunk.model_validate(d)


def test_completion_final_chunk_parses_with_openai_types():
    chunk = CompletionStreamResponse(
        id="cmpl-1", model="base", choices=[CompletionResponseStreamChoice(index=0, text="!", finish_reason="stop")]
    )
    data = _jsonable(chunk)
    assert data["object"] == "text_completion" and "usage" not in data
    Completion.model_validate(data)


def test_model_list_parses_with_openai_types():
    models = ModelList(
        data=[
            ModelCard(id="base", root="/models/llama"),
            ModelCard(id="tenant-a/adapter", owned_by="tenant-a", root="s3://bucket/a", parent="base"),
        ]
    )
    data = _jsonable(models)
    assert data["object"] == "list"
    assert data["data"][1]["parent"] == "base" and data["data"][0]["parent"] is None
    for card in data["data"]:
        assert Model.model_validate(card).object == "model"


# ------------------------------ the official client parsing canned SSE bodies (no server)


def _client_over_canned_sse(sse_body: str) -> openai.OpenAI:
    """The official client over an httpx MockTransport that answers every call with ``sse_body``:
    checks our bytes parse with the client's SSE reader, not a round trip through the router."""
    def handler(request):
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=sse_body.encode())

    return openai.OpenAI(
        api_key="k",
        base_url="http://serve-app.test/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )


def test_openai_client_parses_our_completion_stream_bytes():
    chunks = [
        CompletionStreamResponse(id="cmpl-1", model="m", choices=[CompletionResponseStreamChoice(index=0, text="Hel")]),
        CompletionStreamResponse(
            id="cmpl-1", model="m", choices=[CompletionResponseStreamChoice(index=0, text="lo\n", finish_reason="length")]
        ),
        CompletionStreamResponse(id="cmpl-1", model="m", choices=[], usage=UsageInfo.of(2, 2)),
    ]
    body = "".join(encode_event(c) for c in chunks) + DONE
    got = list(_client_over_canned_sse(body).completions.create(model="m", prompt="p", stream=True))
    assert "".join(c.choices[0].text for c in got if c.choices) == "Hello\n"
    assert [c.choices[0].finish_reason for c in got[:2]] == [None, "length"]
    assert got[-1].usage.completion_tokens == 2


def test_openai_client_parses_our_chat_stream_bytes():
    def chunk(**kw):
        return ChatCompletionStreamResponse(id="chatcmpl-1", model="m", **kw)

    events = [
        chunk(choices=[ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))]),
        chunk(choices=[ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(content="héllo \"x\"\n"))]),
        chunk(choices=[ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(), finish_reason="stop")]),
    ]
    body = "".join(encode_event(e) for e in events) + DONE
    got = list(_client_over_canned_sse(body).chat.completions.create(model="m", messages=MSGS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in got) == 'héllo "x"\n'
    assert got[0].choices[0].delta.role == "assistant"
    assert got[-1].choices[0].finish_reason == "stop"


def test_openai_client_raises_on_our_mid_stream_error_event_bytes():
    first = ChatCompletionStreamResponse(
        id="chatcmpl-1", model="m", choices=[ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(content="a"))]
    )
    body = encode_event(first) + encode_error(AdapterNotFoundError("adapter 'x' was unloaded")) + DONE
    stream = _client_over_canned_sse(body).chat.completions.create(model="m", messages=MSGS, stream=True)
    with pytest.raises(openai.APIError) as ei:
        list(stream)
    assert "adapter 'x' was unloaded" in ei.value.message
    assert ei.value.body["code"] == "model_not_found"


# -------------------------------------------------------------------------------- SSE


def test_sse_framing():
    assert DONE == "data: [DONE]\n\n"
    assert encode_event({"a": None, "b": "é\nx"}) == 'data: {"a":null,"b":"é\\nx"}\n\n'
    chunk = CompletionStreamResponse(id="cmpl-1", created=5, model="m", choices=[CompletionResponseStreamChoice(index=0, text="a\n\nb")])
    event = encode_event(chunk)
    # One data line per event, whatever the text holds.
    assert event.startswith("data: {") and event.endswith("}\n\n") and event.count("\n") == 2
    assert json.loads(event[len("data: ") :]) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 5,
        "model": "m",
        "choices": [{"index": 0, "text": "a\n\nb", "logprobs": None, "finish_reason": None}],
    }
    # A pydantic model and the equivalent dict encode to the same bytes.
    assert encode_event(chunk) == encode_event(chunk.model_dump(mode="json"))


def test_sse_error_event():
    event = encode_error(InvalidRequestError("prompt is too long"))
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[len("data: ") :]) == {
        "error": {"message": "prompt is too long", "type": "invalid_request_error", "code": "invalid_request", "param": None}
    }


# ------------------------------------------------------------------------------ errors


def test_error_body_and_status():
    exc = AdapterNotFoundError("no adapter 'x'")
    assert error_body(exc) == {"error": {"message": "no adapter 'x'", "type": "invalid_request_error", "code": "model_not_found", "param": None}}
    assert error_status(exc) == 404
    # Internals stay in the server log.
    crash = RuntimeError("CUDA error at /src/kernel.cu:12")
    assert "CUDA" not in json.dumps(error_body(crash))
    assert error_body(crash)["error"]["type"] == "internal_error" and error_status(crash) == 500
    with pytest.raises(ValidationError) as ei:
        _completion(n=300)
    assert error_status(ei.value) == 400
    assert error_body(ei.value) == validation_error_body(ei.value)


def test_router_request_validation_errors(edge):
    """The router's own validation handler (serve_app/router/middleware.py), through the real
    ingress app with auth off (see test_edge_caps for the harness), not a stand-in app."""
    client, seen = edge()
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "max_tokens: must be an integer in [1, 2147483647] (got 0)"
    assert r.json()["error"]["param"] == "max_tokens"
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["message"].startswith("request body is not valid JSON (at character 1)")
    assert r.json()["error"]["param"] is None
    r = client.post("/v1/completions", json=["not", "an", "object"])
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("body: Input should be")
    # FastAPI's default handler echoes the input and cannot encode a lone surrogate (a 500);
    # the router's never echoes it.
    r = client.post("/v1/chat/completions", content=b'{"model": "a\\udc80", "messages": []}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "\udc80" not in r.json()["error"]["message"]
    assert seen == []
    r = client.post("/v1/completions", json={"model": "base", "prompt": [1, 2], "max_tokens": 3, "extra": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"
    assert [(model_id, req.prompt, req.params.max_tokens) for model_id, req in seen] == [(None, [1, 2], 3)]


# ------------------------------------------------------------------------- chat prompt


def _tiny_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "hi": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>")
    tok.chat_template = chat_template
    return tok


CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
]


def test_render_chat_default_template():
    assert render_chat(_tiny_tokenizer(None), CONVERSATION) == "system: be brief\nuser: hi\nthere\nassistant:"

    class NoTemplate:  # any tokenizer-like object without a chat_template attribute
        pass

    msgs = [ChatMessage(role="user", content="hi")]
    assert render_chat(NoTemplate(), msgs) == "user: hi\nassistant:"


def test_render_chat_uses_the_tokenizer_template():
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    out = render_chat(_tiny_tokenizer(template), CONVERSATION)
    assert out == "<s><|system|>be brief\n<|user|>hi\nthere\n<|assistant|>"


def test_render_chat_template_rejection_is_a_400():
    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    with pytest.raises(InvalidRequestError, match="System role not supported") as ei:
        render_chat(_tiny_tokenizer(template), CONVERSATION)
    assert ei.value.status_code == 400


# ------------------------------------------------------------------------------ schema


def _models():
    return [v for v in vars(P).values() if isinstance(v, type) and issubclass(v, BaseModel) and v.__module__ == P.__name__]


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_field_is_described_and_schema_builds(model):
    missing = [name for name, f in model.model_fields.items() if not f.description]
    assert not missing, f"{model.__name__}: fields without a description: {missing}"
    model.model_json_schema()
