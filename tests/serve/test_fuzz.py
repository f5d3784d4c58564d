"""Fuzzing the live app: schemathesis against its OpenAPI schema, and hand-written malformed input.

The rule for every answer: no 5xx, and every error (status >= 400, or an in-band SSE error
event) in OpenAI's shape ``{"error": {"message": str, "type": str, "code": str}}``.

A few cases (unknown route, wrong method, undecodable bodies) are answered by FastAPI itself
with ``{"detail": ...}`` until the router's HTTPException handler is in (the auth / limits
integration); until then those cases only check the status.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytestmark = pytest.mark.serve

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
TIMEOUT = httpx.Timeout(120.0)
MSGS = [{"role": "user", "content": "hi"}]


def integrated() -> bool:
    """Whether the router has the auth / limits integration (and with it the HTTPException handler)."""
    from serve_app.config import AppConfig

    return "auth" in AppConfig.model_fields


def assert_error_shape(status: int, body: dict) -> None:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"{status}: {body!r}"[:500]
    err = body["error"]
    for k in ("message", "type", "code"):
        assert isinstance(err.get(k), str) and err[k], f"{status}: error.{k} missing in {body!r}"[:500]


def check_response(status: int, content_type, text: str, *, shape: bool = True) -> None:
    """No 5xx; errors in OpenAI's shape; a 200 stream's in-band errors too, and never internal ones."""
    if isinstance(content_type, list):  # schemathesis' response headers are lists
        content_type = content_type[0] if content_type else ""
    assert status < 500, f"server error {status}: {text[:500]}"
    if status >= 400:
        if shape or integrated():
            assert content_type.startswith("application/json"), (status, content_type, text[:300])
            body = json.loads(text)
            if not integrated() and isinstance(body, dict) and set(body) == {"detail"}:
                return  # FastAPI's own error; the router's HTTPException handler (integration) reshapes it
            assert_error_shape(status, body)
    elif content_type.startswith("text/event-stream"):
        for line in text.splitlines():
            if line.startswith("data: {"):
                payload = json.loads(line[6:])
                if "error" in payload:
                    assert_error_shape(200, payload)
                    assert payload["error"]["type"] != "internal_error", payload


# ---- schemathesis -----------------------------------------------------------------------------------
# Schemathesis' own pytest fixture loader does not work with this pytest (it sets Node._nodeid,
# gone in pytest 9), so the schema's hypothesis strategy is driven directly.


def _shorten(case, models: list[str]) -> None:
    """Point half of the generated bodies at real models, so they reach the engine, and keep the
    generation short (huge values still reach the validators: only 65..4096 is folded)."""
    body = case.body
    if not isinstance(body, dict):
        return
    m = body.get("model")
    if isinstance(m, str) and len(m) % 2 == 0:
        body["model"] = models[len(m) % len(models)]
    for k in ("max_tokens", "max_completion_tokens"):
        v = body.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and 64 < v <= 4096:
            body[k] = v % 64 + 1
    p = body.get("prompt")
    if isinstance(p, list) and len(p) > 4 and all(isinstance(x, (str, list)) for x in p):
        body["prompt"] = p[:4]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_no_5xx_and_openai_errors(serve_env, mode):
    from collections import Counter

    from hypothesis import given

    schema = schemathesis.openapi.from_url(serve_env.url + "/openapi.json", wait_for_schema=30)
    # Not the adapter lifecycle's writes: on the shared app they could delete other tests' tenants.
    schema = schema.exclude(path_regex="^/admin/", method=["POST", "PUT", "PATCH", "DELETE"])
    strategy = schema.as_strategy(schemathesis.GenerationMode(mode))
    seen: Counter = Counter()
    t_start = time.monotonic()

    @given(case=strategy)
    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples every run
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        _shorten(case, serve_env.models)
        t0 = time.monotonic()
        r = case.call(base_url=serve_env.url, timeout=60)
        seen[(case.method, case.path, r.status_code)] += 1
        check_response(r.status_code, r.headers.get("content-type", ""), r.text)
        assert time.monotonic() - t0 < 60

    run()
    print(f"schemathesis {mode}: {sum(seen.values())} requests in {time.monotonic() - t_start:.1f}s: "
          f"{dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 20


# ---- hand-written malformed input -------------------------------------------------------------------

DEEP = 100_000
BIG = "9" * 400  # an integer literal with 400 digits

RAW_CASES = [
    # (id, method, path, body bytes, content type, allowed statuses, what of the router integration it needs:
    #  None, "shape" (FastAPI's own errors in OpenAI's shape) or "fix" (a 500 without it))
    ("invalid-utf8", "POST", CMPL, b'{"model": "base", "prompt": "\xff\xfe\xfd"}', "application/json", (400,), "shape"),
    ("invalid-utf8-key", "POST", CHAT, b'{"model": "base", "\xc3\x28": 1, "messages": []}', "application/json",
     (400,), "shape"),
    ("latin1-declared", "POST", CMPL, '{"model": "base", "prompt": "caf\u00e9"}'.encode("latin-1"),
     "application/json; charset=latin-1", (200, 400), "shape"),
    ("lone-surrogate-escape", "POST", CMPL, b'{"model": "base", "prompt": "a\\udc80b", "max_tokens": 2}',
     "application/json", (400,), "fix"),
    ("lone-surrogate-chat", "POST", CHAT,
     b'{"model": "tenant-0", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
     "application/json", (400,), "fix"),
    ("nul-in-prompt", "POST", CMPL, b'{"model": "base", "prompt": "a\\u0000b", "max_tokens": 2}', "application/json",
     (200,), None),
    ("deep-array", "POST", CMPL, b"[" * DEEP + b"]" * DEEP, "application/json", (400,), "shape"),
    ("deep-object", "POST", CHAT, b'{"a":' * DEEP + b"1" + b"}" * DEEP, "application/json", (400,), "shape"),
    ("deep-prompt", "POST", CMPL, b'{"model": "base", "prompt": ' + b"[" * 500 + b"1" + b"]" * 500 + b"}",
     "application/json", (400,), None),
    ("deep-content", "POST", CHAT,
     b'{"model": "base", "messages": [{"role": "user", "content": ' + b"[" * 500 + b"]" * 500 + b"}]}",
     "application/json", (400,), None),
    ("huge-max-tokens", "POST", CMPL, b'{"model": "base", "prompt": "x", "max_tokens": ' + BIG.encode() + b"}",
     "application/json", (400,), None),
    ("huge-seed", "POST", CMPL, b'{"model": "base", "prompt": "x", "seed": ' + BIG.encode() + b"}", "application/json",
     (400,), None),
    ("huge-top-k", "POST", CMPL,
     b'{"model": "base", "prompt": "x", "max_tokens": 2, "temperature": 1, "top_k": ' + BIG.encode() + b"}",
     "application/json", (200, 400), None),
    ("int64-top-k", "POST", CMPL,
     b'{"model": "base", "prompt": "x", "max_tokens": 2, "temperature": 1, "top_k": 9223372036854775807}',
     "application/json", (200, 400), None),
    ("huge-temperature", "POST", CMPL, b'{"model": "base", "prompt": "x", "temperature": 1e400}', "application/json",
     (400,), None),
    ("nan-temperature", "POST", CMPL, b'{"model": "base", "prompt": "x", "temperature": NaN}', "application/json",
     (400,), None),
    ("infinity-top-p", "POST", CHAT, b'{"model": "base", "messages": [], "top_p": -Infinity}', "application/json",
     (400,), None),
    ("huge-token-id", "POST", CMPL, b'{"model": "base", "prompt": [' + BIG.encode() + b"]}", "application/json",
     (400,), None),
    ("int64-token-id", "POST", CMPL, b'{"model": "base", "prompt": [9223372036854775807], "max_tokens": 1}',
     "application/json", (400,), None),
    ("huge-stop-token-id", "POST", CMPL,
     b'{"model": "base", "prompt": "x", "max_tokens": 2, "stop_token_ids": [' + BIG.encode() + b"]}",
     "application/json", (200, 400), None),
    ("float-max-tokens", "POST", CMPL, b'{"model": "base", "prompt": "x", "max_tokens": 2.5}', "application/json",
     (400,), None),
    ("bool-max-tokens", "POST", CMPL, b'{"model": "base", "prompt": "x", "max_tokens": true}', "application/json",
     (200, 400), None),
    ("empty-body", "POST", CMPL, b"", "application/json", (400,), None),
    ("json-null", "POST", CMPL, b"null", "application/json", (400,), None),
    ("json-number", "POST", CHAT, b"12345", "application/json", (400,), None),
    ("json-string", "POST", CMPL, b'"hello"', "application/json", (400,), None),
    ("trailing-garbage", "POST", CMPL, b'{"model": "base", "prompt": "x"} trailing', "application/json", (400,),
     None),
    ("duplicate-keys", "POST", CMPL, b'{"model": "nope", "model": "base", "prompt": "x", "max_tokens": 1}',
     "application/json", (200,), None),
    ("text-plain", "POST", CMPL, b'{"model": "base", "prompt": "x"}', "text/plain", (400, 415), None),
    ("form-urlencoded", "POST", CMPL, b"model=base&prompt=x", "application/x-www-form-urlencoded", (400, 415), None),
    ("multipart", "POST", CHAT, b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nbase\r\n--b--\r\n',
     "multipart/form-data; boundary=b", (400, 415), None),
    ("octet-stream", "POST", CMPL, b"\x00\x01\x02\xff", "application/octet-stream", (400, 415), None),
    ("no-content-type", "POST", CMPL, b'{"model": "base", "prompt": "x", "max_tokens": 1}', None, (200, 400, 415),
     None),
    ("bogus-content-type", "POST", CMPL, b'{"model": "base", "prompt": "x"}', "application/json; charset=klingon",
     (200, 400, 415), "shape"),
    ("unknown-route", "POST", "/v1/nope", b"{}", "application/json", (404,), "shape"),
    ("wrong-method", "GET", CMPL, None, None, (405,), "shape"),
    ("wrong-method-put", "PUT", CHAT, b"{}", "application/json", (405,), "shape"),
    ("unknown-admin-route", "DELETE", "/admin/nope", None, None, (404, 405), "shape"),
]


@pytest.fixture(scope="module")
def client(serve_env):
    with httpx.Client(base_url=serve_env.url, timeout=TIMEOUT) as c:
        yield c


@pytest.mark.parametrize("method,path,body,ctype,statuses,needs", [c[1:] for c in RAW_CASES],
                         ids=[c[0] for c in RAW_CASES])
def test_malformed_raw_input(client, method, path, body, ctype, statuses, needs):
    headers = {} if ctype is None else {"content-type": ctype}
    r = client.request(method, path, content=body, headers=headers)
    try:
        assert r.status_code in statuses, f"{r.status_code}: {r.text[:300]}"
        check_response(r.status_code, r.headers.get("content-type", ""), r.text, shape=needs != "shape")
    except AssertionError:
        if needs == "fix" and not integrated():
            pytest.xfail("a 500 until the router integration (limits.check_unicode) is in")
        raise


JSON_CASES = [
    # (id, path, body, allowed statuses)
    ("empty-prompt", CMPL, {"model": "base", "prompt": "", "max_tokens": 2}, (200, 400)),
    ("empty-prompt-in-batch", CMPL, {"model": "tenant-0", "prompt": ["x", ""], "max_tokens": 2}, (200, 400)),
    ("empty-token-list", CMPL, {"model": "base", "prompt": [[]], "max_tokens": 2}, (400,)),
    ("empty-chat-content", CHAT, {"model": "tenant-1", "messages": [{"role": "user", "content": ""}],
                                  "max_tokens": 2}, (200,)),
    ("empty-content-parts", CHAT, {"model": "base", "messages": [{"role": "user", "content": []}],
                                   "max_tokens": 2}, (200, 400)),
    ("huge-prompt-1mb", CMPL, {"model": "base", "prompt": "lorem ipsum " * 90_000, "max_tokens": 2}, (400, 413)),
    ("huge-chat-1mb", CHAT, {"model": "tenant-2", "messages": [{"role": "user", "content": "z" * 1_000_000}],
                             "max_tokens": 2}, (400, 413)),
    ("huge-prompt-6mb", CMPL, {"model": "base", "prompt": "a" * 6_000_000}, (400, 413)),
    ("many-chat-messages", CHAT, {"model": "base", "messages": [{"role": "user", "content": "hi"}] * 5000,
                                  "max_tokens": 2}, (400, 413)),
    ("long-stop-string", CMPL, {"model": "base", "prompt": "x", "max_tokens": 4, "stop": "s" * 100_000}, (200, 400)),
    ("many-stop-strings", CMPL, {"model": "base", "prompt": "x", "stop": ["a"] * 100}, (400,)),
    ("unicode-everything", CMPL, {"model": "tenant-3", "prompt": "\u202e\u0000\ufeff\U0001F600" * 50,
                                  "max_tokens": 3, "stop": ["\U0001F600"]}, (200,)),
    ("unicode-model", CMPL, {"model": "t\u00e9nant-0", "prompt": "x"}, (400, 404)),
    ("model-is-number", CMPL, {"model": 5, "prompt": "x"}, (400,)),
    ("model-huge", CMPL, {"model": "m" * 100_000, "prompt": "x"}, (400, 404)),
    ("role-bogus", CHAT, {"model": "base", "messages": [{"role": "wizard", "content": "x"}]}, (400,)),
    ("content-image", CHAT, {"model": "base", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, (400,)),
    ("negative-everything", CMPL, {"model": "base", "prompt": [-1], "max_tokens": -5, "temperature": -1,
                                   "top_p": -1, "top_k": -7, "seed": -1}, (400,)),
    ("stream-as-string", CMPL, {"model": "base", "prompt": "x", "stream": "maybe"}, (400,)),
    ("stream-options-object-garbage", CMPL, {"model": "base", "prompt": "x", "stream": True,
                                             "stream_options": {"include_usage": "maybe"}}, (400,)),
    ("stream-huge-prompt", CMPL, {"model": "tenant-4", "prompt": "q " * 200_000, "stream": True}, (400, 413)),
    ("stream-empty-prompt", CHAT, {"model": "tenant-5", "messages": [{"role": "user", "content": ""}],
                                   "max_tokens": 2, "stream": True}, (200,)),
]


@pytest.mark.parametrize("path,body,statuses", [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES])
def test_malformed_json_input(client, path, body, statuses):
    t0 = time.monotonic()
    r = client.post(path, json=body)
    assert r.status_code in statuses, f"{r.status_code}: {r.text[:300]}"
    check_response(r.status_code, r.headers.get("content-type", ""), r.text)
    assert time.monotonic() - t0 < 60


def test_weird_headers(client):
    cases = [
        {"serve_multiplexed_model_id": "x" * 5000},
        {"serve_multiplexed_model_id": ""},
        {"authorization": "Bearer " + "k" * 5000},
        {"authorization": b"Bearer \xff\xfe"},
        {"x-api-key": b"\xff"},
    ]
    for h in cases:
        try:
            r = client.post(CMPL, json={"model": "base", "prompt": "x", "max_tokens": 1}, headers=h)
        except httpx.HTTPError:
            continue  # the client refused to send it, or the server closed a malformed request: no 5xx
        try:
            check_response(r.status_code, r.headers.get("content-type", ""), r.text, shape=True)
        except AssertionError as e:
            raise AssertionError(f"headers {h!r}: {e}") from None


@pytest.mark.xfail(reason="Ray Serve's HTTP proxy decodes these headers as UTF-8 itself and answers a plain-text "
                   "500 before the app is called (ray/serve/_private/proxy.py); needs an upstream fix or a "
                   "front proxy that drops non-UTF-8 header values", strict=False)
@pytest.mark.parametrize("header", ["serve_multiplexed_model_id", "x-request-id"])
def test_non_utf8_routing_headers(client, header):
    r = client.post(CMPL, json={"model": "base", "prompt": "x", "max_tokens": 1}, headers={header: b"tenant-\xff"})
    check_response(r.status_code, r.headers.get("content-type", ""), r.text)


def test_server_still_healthy_after_fuzzing(client, serve_env, refs):
    r = client.post(CMPL, json={"model": "tenant-1", "prompt": "hello", "max_tokens": 5, "temperature": 0,
                                "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == refs.text("tenant-1", "hello", 5)
