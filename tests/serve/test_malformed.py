"""Hand-written malformed input against the live app (the session's ``lora-app``).

The rule for every answer: no 5xx, and every error (status >= 400, or an in-band SSE error
event) in OpenAI's shape ``{"error": {"message": str, "type": str, "code": str}}``. These cases
need nothing beyond httpx (schemathesis' generated cases are tests/serve/test_fuzz.py), so a
schemathesis problem can never skip them.

Hostile sampling parameters (top_k past int32 or past the vocab) are also sent *while another
tenant's long greedy request is decoding on the same replica*: a step that fails fails every
co-batched row, so the good request's text must equal PEFT's, never an error.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from ray import serve

from tests.helpers import check_response

pytestmark = pytest.mark.serve

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
TIMEOUT = httpx.Timeout(120.0)
MSGS = [{"role": "user", "content": "hi"}]

DEEP = 100_000
BIG = "9" * 400  # an integer literal with 400 digits

RAW_CASES = [
    # (id, method, path, body bytes, content type, allowed statuses)
    ("invalid-utf8", "POST", CMPL, b'{"model": "base", "prompt": "\xff\xfe\xfd"}', "application/json", (400,)),
    ("invalid-utf8-key", "POST", CHAT, b'{"model": "base", "\xc3\x28": 1, "messages": []}', "application/json",
     (400,)),
    ("latin1-declared", "POST", CMPL, '{"model": "base", "prompt": "caf\u00e9"}'.encode("latin-1"),
     "application/json; charset=latin-1", (200, 400)),
    ("lone-surrogate-escape", "POST", CMPL, b'{"model": "base", "prompt": "a\\udc80b", "max_tokens": 2}',
     "application/json", (400,)),
    ("lone-surrogate-chat", "POST", CHAT,
     b'{"model": "tenant-0", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
     "application/json", (400,)),
    ("nul-in-prompt", "POST", CMPL, b'{"model": "base", "prompt": "a\\u0000b", "max_tokens": 2}', "application/json",
     (200,)),
    ("deep-array", "POST", CMPL, b"[" * DEEP + b"]" * DEEP, "application/json", (400,)),
    ("deep-object", "POST", CHAT, b'{"a":' * DEEP + b"1" + b"}" * DEEP, "application/json", (400,)),
    ("deep-prompt", "POST", CMPL, b'{"model": "base", "prompt": ' + b"[" * 500 + b"1" + b"]" * 500 + b"}",
     "application/json", (400,)),
    ("deep-content", "POST", CHAT,
     b'{"model": "base", "messages": [{"role": "user", "content": ' + b"[" * 500 + b"]" * 500 + b"}]}",
     "application/json", (400,)),
    ("huge-max-tokens", "POST", CMPL, b'{"model": "base", "prompt": "x", "max_tokens": ' + BIG.encode() + b"}",
     "application/json", (400,)),
    ("huge-seed", "POST", CMPL, b'{"model": "base", "prompt": "x", "seed": ' + BIG.encode() + b"}", "application/json",
     (400,)),
    ("huge-top-k", "POST", CMPL,
     b'{"model": "base", "prompt": "x", "max_tokens": 2, "temperature": 1, "top_k": ' + BIG.encode() + b"}",
     "application/json", (400,)),
    ("int64-top-k", "POST", CMPL,
     b'{"model": "base", "prompt": "x", "max_tokens": 2, "temperature": 1, "top_k": 9223372036854775807}',
     "application/json", (400,)),
    ("huge-temperature", "POST", CMPL, b'{"model": "base", "prompt": "x", "temperature": 1e400}', "application/json",
     (400,)),
    ("nan-temperature", "POST", CMPL, b'{"model": "base", "prompt": "x", "temperature": NaN}', "application/json",
     (400,)),
    ("infinity-top-p", "POST", CHAT, b'{"model": "base", "messages": [], "top_p": -Infinity}', "application/json",
     (400,)),
    ("huge-token-id", "POST", CMPL, b'{"model": "base", "prompt": [' + BIG.encode() + b"]}", "application/json",
     (400,)),
    ("int64-token-id", "POST", CMPL, b'{"model": "base", "prompt": [9223372036854775807], "max_tokens": 1}',
     "application/json", (400,)),
    ("huge-stop-token-id", "POST", CMPL,
     b'{"model": "base", "prompt": "x", "max_tokens": 2, "stop_token_ids": [' + BIG.encode() + b"]}",
     "application/json", (200, 400)),
    ("float-max-tokens", "POST", CMPL, b'{"model": "base", "prompt": "x", "max_tokens": 2.5}', "application/json",
     (400,)),
    ("bool-max-tokens", "POST", CMPL, b'{"model": "base", "prompt": "x", "max_tokens": true}', "application/json",
     (200, 400)),
    ("empty-body", "POST", CMPL, b"", "application/json", (400,)),
    ("json-null", "POST", CMPL, b"null", "application/json", (400,)),
    ("json-number", "POST", CHAT, b"12345", "application/json", (400,)),
    ("json-string", "POST", CMPL, b'"hello"', "application/json", (400,)),
    ("trailing-garbage", "POST", CMPL, b'{"model": "base", "prompt": "x"} trailing', "application/json", (400,)),
    ("duplicate-keys", "POST", CMPL, b'{"model": "nope", "model": "base", "prompt": "x", "max_tokens": 1}',
     "application/json", (200,)),
    ("text-plain", "POST", CMPL, b'{"model": "base", "prompt": "x"}', "text/plain", (400, 415)),
    ("form-urlencoded", "POST", CMPL, b"model=base&prompt=x", "application/x-www-form-urlencoded", (400, 415)),
    ("multipart", "POST", CHAT, b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nbase\r\n--b--\r\n',
     "multipart/form-data; boundary=b", (400, 415)),
    ("octet-stream", "POST", CMPL, b"\x00\x01\x02\xff", "application/octet-stream", (400, 415)),
    ("no-content-type", "POST", CMPL, b'{"model": "base", "prompt": "x", "max_tokens": 1}', None, (200, 400, 415)),
    ("bogus-content-type", "POST", CMPL, b'{"model": "base", "prompt": "x"}', "application/json; charset=klingon",
     (200, 400, 415)),
    ("unknown-route", "POST", "/v1/nope", b"{}", "application/json", (404,)),
    ("wrong-method", "GET", CMPL, None, None, (405,)),
    ("wrong-method-put", "PUT", CHAT, b"{}", "application/json", (405,)),
    ("unknown-admin-route", "DELETE", "/admin/nope", None, None, (404, 405)),
]


@pytest.fixture(scope="module")
def client(serve_env):
    with httpx.Client(base_url=serve_env.url, timeout=TIMEOUT) as c:
        yield c


@pytest.mark.parametrize("method,path,body,ctype,statuses", [c[1:] for c in RAW_CASES],
                         ids=[c[0] for c in RAW_CASES])
def test_malformed_raw_input(client, method, path, body, ctype, statuses):
    headers = {} if ctype is None else {"content-type": ctype}
    r = client.request(method, path, content=body, headers=headers)
    assert r.status_code in statuses, f"{r.status_code}: {r.text[:300]}"
    check_response(r.status_code, r.headers.get("content-type", ""), r.text)


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
    ascii_cases = [
        {"serve_multiplexed_model_id": "x" * 5000},
        {"serve_multiplexed_model_id": ""},
        {"authorization": "Bearer " + "k" * 5000},
    ]
    non_ascii_cases = [
        {"authorization": b"Bearer \xff\xfe"},
        {"x-api-key": b"\xff"},
    ]
    body = {"model": "base", "prompt": "x", "max_tokens": 1}
    for h in ascii_cases + non_ascii_cases:
        try:
            r = client.post(CMPL, json=body, headers=h)
        except httpx.LocalProtocolError:
            # Raised by the client before anything is sent; only a non-ASCII value may be refused so.
            # A reset or closed connection (RemoteProtocolError, ReadError) is the server failing.
            assert h in non_ascii_cases, f"the client refused to send the ASCII headers {h!r}"
            continue
        try:
            check_response(r.status_code, r.headers.get("content-type", ""), r.text)
        except AssertionError as e:
            raise AssertionError(f"headers {h!r}: {e}") from None


@pytest.mark.xfail(reason="Ray Serve's HTTP proxy decodes these headers as UTF-8 itself and answers a plain-text "
                   "500 before the app is called (ray/serve/_private/proxy.py); needs an upstream fix or a "
                   "front proxy that drops non-UTF-8 header values", strict=True)
@pytest.mark.parametrize("header", ["serve_multiplexed_model_id", "x-request-id"])
def test_non_utf8_routing_headers(client, header):
    r = client.post(CMPL, json={"model": "base", "prompt": "x", "max_tokens": 1}, headers={header: b"tenant-\xff"})
    check_response(r.status_code, r.headers.get("content-type", ""), r.text)


def test_server_still_healthy_after_fuzzing(client, serve_env, refs):
    r = client.post(CMPL, json={"model": "tenant-1", "prompt": "hello", "max_tokens": 5, "temperature": 0,
                                "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == refs.text("tenant-1", "hello", 5)


# ---- hostile top_k next to another tenant's running request -------------------------------------

MAX_INT32 = 2**31 - 1
HOSTILE_TOP_K = [  # (top_k JSON literal, expected status): past int32 is refused at the edge,
    # anything within it is clamped to the vocab by the engine and served
    (BIG, 400), ("9223372036854775807", 400), (str(MAX_INT32 + 1), 400), (str(MAX_INT32), 200),
    ("1000000", 200), ("513", 200), ("512", 200),
]


def test_hostile_top_k_never_breaks_a_co_batched_request(client, serve_env, refs):
    """top_k beyond the vocab with top_p 0.9 takes the sampler's filtering branch (with top_p 1.0
    it is skipped): a k that fails the step would fail every row in it."""
    good_model, prompt, n_long = "tenant-2", "The quick brown fox jumps over", 400
    expected = refs.text(good_model, prompt, n_long)
    result: dict = {}
    first = threading.Event()

    def long_stream():
        body = {"model": good_model, "prompt": prompt, "max_tokens": n_long, "temperature": 0, "ignore_eos": True,
                "stream": True}
        try:
            with httpx.Client(base_url=serve_env.url, timeout=TIMEOUT) as c:
                with c.stream("POST", CMPL, json=body) as r:
                    result["status"] = r.status_code
                    lines = []
                    for line in r.iter_lines():
                        if line:
                            lines.append(line)
                            first.set()
                    result["lines"] = lines
        finally:
            first.set()

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        assert first.wait(120) and "lines" not in result, f"the long request never streamed: {result}"
        for literal, status in HOSTILE_TOP_K:
            for model in ("base", "tenant-0"):
                raw = (b'{"model": "' + model.encode() + b'", "prompt": "x", "max_tokens": 3, "temperature": 1, '
                       b'"top_p": 0.9, "ignore_eos": true, "top_k": ' + literal.encode() + b"}")
                r = client.post(CMPL, content=raw, headers={"content-type": "application/json"})
                assert r.status_code == status, f"top_k {literal[:24]} on {model}: {r.status_code} {r.text[:300]}"
                check_response(r.status_code, r.headers.get("content-type", ""), r.text)
                if status == 200:
                    assert r.json()["usage"]["completion_tokens"] == 3, r.text
                else:
                    assert "top_k" in r.json()["error"]["message"], r.text
        # The hostile requests really overlapped the long one: it is still decoding now.
        stats = serve.get_deployment_handle("LoRADeployment", app_name=serve_env.app_name).stats.remote().result(
            timeout_s=60)
        assert "lines" not in result and stats["running"] >= 1, f"the long request ended too soon; raise n_long: {stats}"
    finally:
        t.join(180)
    assert not t.is_alive() and result.get("status") == 200, result
    lines = result["lines"]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert not any("error" in p for p in payloads), [p for p in payloads if "error" in p]
    assert "".join(c["text"] for p in payloads for c in p["choices"]) == expected
