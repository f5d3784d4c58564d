"""API keys and per-tenant limits over HTTP, on a dedicated app (``auth-app`` at ``/auth``).

No guard skips this module: if ``AppConfig`` loses ``auth`` or ``limits``, building the app
fails (extra="forbid") and every test here fails with it, as it should.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest
from ray import serve

from serve_app.router.api_keys import hash_key

pytestmark = pytest.mark.serve

APP, PREFIX = "auth-app", "/auth"
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
TIMEOUT = httpx.Timeout(120.0)
PROMPT = "The quick brown fox jumps over"

KEYS = {  # tenant -> key; each test uses its own tenant so their buckets do not interact
    "acme": "sk-acme-aaaaaaaaaaaaaaaaaaaaaaaa",
    "globex": "sk-globex-gggggggggggggggggggggg",
    "burst": "sk-burst-bbbbbbbbbbbbbbbbbbbbbbbb",
    "conc": "sk-conc-cccccccccccccccccccccccc",
    "caps": "sk-caps-dddddddddddddddddddddddd",
    "ops": "sk-ops-oooooooooooooooooooooooooo",
}
# 6 requests/min (one per 10 s) with a burst of 10: a burst of 16 requests cannot refill its way
# through even on a slow CI (that would take 60 s); the refill maths is unit-tested on a fake clock
# (tests/unit/test_limits.py). Every other tenant here sends fewer than 10 admitted requests.
REQUESTS_PER_MINUTE, REQUEST_BURST, MAX_CONCURRENT = 6, 10, 2
MAX_PROMPT_TOKENS, MAX_TOKENS, MAX_BODY = 64, 64, 64 * 1024


def auth(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def greedy(model: str, n: int, **extra) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True, **extra}


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, f"{r.status_code}: {r.text[:400]}"
    err = r.json()["error"]
    assert all(isinstance(err[k], str) and err[k] for k in ("message", "type", "code")), err
    for key in KEYS.values():
        assert key not in r.text and key not in str(r.headers)
    return err


@pytest.fixture(scope="module")
def auth_app(serve_env, tmp_path_factory):
    from serve_app.app import build_app

    ids = serve_env.assets.adapter_ids
    entries = [
        {"tenant": "acme", "key_sha256": hash_key(KEYS["acme"]), "adapters": [ids[0], ids[1]]},
        {"tenant": "globex", "key": KEYS["globex"], "adapters": [ids[2]], "base_model": False},
        {"tenant": "burst", "key_sha256": hash_key(KEYS["burst"]), "adapters": ["*"]},
        {"tenant": "conc", "key_sha256": hash_key(KEYS["conc"]), "adapters": ["tenant-*"]},
        {"tenant": "caps", "key_sha256": hash_key(KEYS["caps"]), "adapters": [ids[3]]},
        {"tenant": "ops", "key_sha256": hash_key(KEYS["ops"]), "admin": True},
    ]
    keys_file = tmp_path_factory.mktemp("auth") / "keys.json"
    keys_file.write_text(json.dumps({"keys": entries}))
    app = build_app(
        {
            "base_model": str(serve_env.assets.base),
            "adapters": str(serve_env.assets.adapters_dir),
            "base_model_name": serve_env.base_name,
            "max_adapters_per_replica": 2,
            "lora_num_cpus": 0.25,
            "router_num_cpus": 0.1,
            "torch_threads": 1,
            "default_max_tokens": 32,
            "auth": {"enabled": True, "keys_file": str(keys_file), "keys_env": None},
            "limits": {
                "max_body_bytes": MAX_BODY,
                "max_prompt_tokens": MAX_PROMPT_TOKENS,
                "max_tokens": MAX_TOKENS,
                "requests_per_minute": REQUESTS_PER_MINUTE,
                "request_burst": REQUEST_BURST,
                "max_concurrent_requests": MAX_CONCURRENT,
            },
        }
    )
    serve.run(app, name=APP, route_prefix=PREFIX)
    try:
        with httpx.Client(base_url=serve_env.url + PREFIX, timeout=TIMEOUT) as c:
            yield c
    finally:
        serve.delete(APP)


# ---- authentication ---------------------------------------------------------------------------------


def test_public_routes_need_no_key(auth_app):
    assert auth_app.get("/health").status_code == 200
    assert auth_app.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer sk-not-a-key-000000000000000000"},
    {"Authorization": "Basic " + KEYS["acme"]},
    {"Authorization": KEYS["acme"]},
    {"Authorization": "Bearer"},
])
def test_missing_or_invalid_key_is_401(auth_app, headers, serve_env):
    for method, path, body in (("POST", CMPL, greedy(serve_env.assets.adapter_ids[0], 2)),
                               ("POST", CHAT, {"model": "base", "messages": [{"role": "user", "content": "x"}]}),
                               ("GET", "/v1/models", None), ("GET", "/admin/merged", None),
                               ("GET", "/admin/adapters", None), ("POST", "/v1/nope", {})):
        r = auth_app.request(method, path, json=body, headers=headers)
        err = error_of(r, 401)
        assert err["type"] == "authentication_error", err
        assert r.headers.get("www-authenticate") == "Bearer"


def test_invalid_body_without_a_key_is_401_not_400(auth_app):
    r = auth_app.post(CMPL, content=b"{not json", headers={"content-type": "application/json"})
    error_of(r, 401)


# ---- authorization ----------------------------------------------------------------------------------


def test_own_adapter_served_other_tenants_adapter_403_same_answer_whether_it_exists(auth_app, serve_env, refs):
    ids = serve_env.assets.adapter_ids
    r = auth_app.post(CMPL, json=greedy(ids[0], 6), headers=auth("acme"))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == refs.text(ids[0], PROMPT, 6)
    answers = []
    for model in (ids[2], ids[5], "no-such-adapter", "tenant-999"):
        for stream in (False, True):
            r = auth_app.post(CMPL, json=greedy(model, 2, stream=stream), headers=auth("acme"))
            err = error_of(r, 403)
            answers.append(json.dumps(err).replace(model, "<model>"))
        # The same through the multiplexing header.
        r = auth_app.post(CMPL, json=greedy("base", 2), headers={**auth("acme"), "serve_multiplexed_model_id": model})
        answers.append(json.dumps(error_of(r, 403)).replace(model, "<model>"))
    assert len(set(answers)) == 1, set(answers)
    # A key whose list holds an adapter that does not exist: that is a plain 404.
    r = auth_app.post(CMPL, json=greedy("tenant-nonexistent", 2), headers=auth("conc"))
    error_of(r, 404)


def test_base_model_permission(auth_app, serve_env):
    r = auth_app.post(CHAT, json={"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
                      headers=auth("globex"))
    assert "base model" in error_of(r, 403)["message"]
    r = auth_app.post(CMPL, json=greedy("base", 2), headers=auth("acme"))
    assert r.status_code == 200, r.text


def test_models_list_is_filtered_per_key(auth_app, serve_env):
    ids = serve_env.assets.adapter_ids

    def listed(tenant):
        r = auth_app.get("/v1/models", headers=auth(tenant))
        assert r.status_code == 200, r.text
        return {m["id"] for m in r.json()["data"]}

    assert listed("acme") == {"base", ids[0], ids[1]}
    assert listed("globex") == {ids[2]}
    assert listed("ops") == {"base"}


def test_admin_routes_need_an_admin_key(auth_app, serve_env):
    for path in ("/admin/merged", "/admin/adapters"):
        err = error_of(auth_app.get(path, headers=auth("acme")), 403)
        assert err["code"] == "admin_required"
    # The admin key gets the real answers, not just a 200.
    r = auth_app.get("/admin/adapters", headers=auth("ops"))
    assert r.status_code == 200, r.text
    listed = {a["id"]: a for a in r.json()["data"]}
    assert set(listed) == set(serve_env.assets.adapter_ids), listed
    assert all(a["version"] == 0 and a["origin"] == "store" for a in listed.values()), listed
    r = auth_app.get("/admin/merged", headers=auth("ops"))
    assert r.status_code == 200, r.text
    assert isinstance(r.json().get("enabled"), bool), r.json()
    # Writes too (the lifecycle routes), refused before the body is even looked at.
    error_of(auth_app.post("/admin/adapters", json={}, headers=auth("acme")), 403)
    error_of(auth_app.delete("/admin/adapters/tenant-0", headers=auth("burst")), 403)


# ---- limits -----------------------------------------------------------------------------------------


def test_caps_are_400_and_body_size_413(auth_app, serve_env):
    model = serve_env.assets.adapter_ids[3]
    err = error_of(auth_app.post(CMPL, json=greedy(model, MAX_TOKENS + 1), headers=auth("caps")), 400)
    assert err["code"] == "max_tokens_too_large" and str(MAX_TOKENS) in err["message"]
    long_prompt = " ".join(["word"] * (MAX_PROMPT_TOKENS * 2))
    err = error_of(auth_app.post(CMPL, json=greedy(model, 2, prompt=long_prompt), headers=auth("caps")), 400)
    assert err["code"] == "prompt_too_long"
    err = error_of(auth_app.post(CMPL, json=greedy(model, 2, prompt=list(range(1, MAX_PROMPT_TOKENS + 2))),
                                 headers=auth("caps")), 400)
    assert err["code"] == "prompt_too_long"
    err = error_of(auth_app.post(CMPL, json=greedy(model, 2, prompt="x" * (MAX_BODY + 1)), headers=auth("caps")), 413)
    assert err["code"] == "request_too_large"
    raw = json.dumps(greedy(model, 2, prompt="a\udc80")).encode()  # the JSON escape of a lone surrogate
    err = error_of(auth_app.post(CMPL, content=raw, headers={**auth("caps"), "content-type": "application/json"}), 400)
    assert err["code"] == "invalid_unicode"
    # More prompts in one request than the tenant could ever have in flight: 400, not 429.
    err = error_of(auth_app.post(CMPL, json=greedy(model, 2, prompt=["a"] * (MAX_CONCURRENT + 1)),
                                 headers=auth("caps")), 400)
    assert err["code"] == "too_many_prompts"
    r = auth_app.post(CMPL, json=greedy(model, MAX_TOKENS), headers=auth("caps"))
    assert r.status_code == 200, r.text


def test_request_bucket_429_with_retry_after_other_tenants_unaffected(auth_app, serve_env):
    model = serve_env.assets.adapter_ids[4]
    n = REQUEST_BURST + 6

    async def burst():
        async with httpx.AsyncClient(base_url=str(auth_app.base_url), timeout=TIMEOUT) as c:
            # One at a time (the concurrency cap is not what this tests), as fast as possible.
            out = []
            for _ in range(n):
                out.append(await c.post(CMPL, json=greedy(model, 1), headers=auth("burst")))
            return out

    t0 = time.monotonic()
    rs = asyncio.run(burst())
    elapsed = time.monotonic() - t0
    ok = [r for r in rs if r.status_code == 200]
    limited = [r for r in rs if r.status_code == 429]
    assert len(ok) + len(limited) == n, [r.status_code for r in rs]
    # The burst, plus at most what the bucket refilled meanwhile at REQUESTS_PER_MINUTE.
    refill = math.ceil(elapsed * REQUESTS_PER_MINUTE / 60)
    assert REQUEST_BURST <= len(ok) <= REQUEST_BURST + refill and limited, ([r.status_code for r in rs], elapsed)
    per_request = 60 / REQUESTS_PER_MINUTE  # seconds one request takes to refill
    for r in limited:
        err = error_of(r, 429)
        assert err["type"] == "rate_limit_error" and "requests/min" in err["message"]
        assert 1 <= int(r.headers["retry-after"]) <= per_request
    # Right after the burst the bucket is (nearly) empty: the wait is about one request's refill,
    # so a bucket refilling too fast (e.g. per second) answers a much shorter Retry-After.
    assert int(limited[0].headers["retry-after"]) >= per_request / 2, limited[0].headers["retry-after"]
    # Another tenant is not limited by this one.
    r = auth_app.post(CMPL, json=greedy(serve_env.assets.adapter_ids[0], 1), headers=auth("acme"))
    assert r.status_code == 200, r.text


def test_concurrency_cap_429_then_released(auth_app, serve_env):
    model = serve_env.assets.adapter_ids[5]
    long_prompt = list(range(5, 5 + MAX_PROMPT_TOKENS - 1))

    async def together(k):
        async with httpx.AsyncClient(base_url=str(auth_app.base_url), timeout=TIMEOUT) as c:
            bodies = [greedy(model, MAX_TOKENS, prompt=long_prompt, stream=(i % 2 == 0)) for i in range(k)]
            return await asyncio.gather(*(c.post(CMPL, json=b, headers=auth("conc")) for b in bodies))

    rs = asyncio.run(together(MAX_CONCURRENT + 4))
    codes = [r.status_code for r in rs]
    assert codes.count(200) >= MAX_CONCURRENT and codes.count(429) >= 1, codes
    for r in rs:
        if r.status_code == 429:
            err = error_of(r, 429)
            assert "concurrent" in err["message"] and r.headers["retry-after"] == "1"
    # Every slot (streams included) was released when its response ended.
    rs = asyncio.run(together(MAX_CONCURRENT))
    assert [r.status_code for r in rs] == [200] * MAX_CONCURRENT, [r.text[:200] for r in rs]


def test_unknown_route_and_method_in_openai_shape(auth_app):
    error_of(auth_app.get("/v1/nope", headers=auth("acme")), 404)
    error_of(auth_app.get(CMPL, headers=auth("acme")), 405)
