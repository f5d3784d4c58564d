"""The router's HTTP edge, through the real ingress app (no Ray): caps that hold without any
``limits`` config, echoed values, fail-closed principals, the tenant key of every engine
request, and error messages without store URIs or local paths.

The ``Router`` is built without its constructor (that needs a Serve replica and a store): the
attributes the routes use are set by hand, the LoRA handle is a fake that records every
``GenerateRequest``, and ``serve.get_replica_context`` (what Serve's class-based routes use to
find ``self``) returns it.
"""

from __future__ import annotations

import json
import types

import pytest
from fastapi.testclient import TestClient
from ray import serve

from serve_app import metrics
from serve_app.api.wire import Final, RequestOutput
from serve_app.router.streams import ChannelHub
from serve_app.errors import AdapterNotFoundError, AdapterStoreUnavailableError, InvalidRequestError
from serve_app.router import ingress, serving
from serve_app.router.api_keys import KeyEntry
from serve_app.router.auth import Authenticator
from serve_app.router.limits import LimitsConfig, TenantLimiter

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
KEY_A, KEY_B, KEY_ADMIN = "sk-acme-" + "a" * 24, "sk-globex-" + "b" * 24, "sk-ops-" + "c" * 24


class _Metric:
    def inc(self, *a, **k):
        pass

    observe = set = inc


class FakeHandle:
    """Stands in for the LoRA deployment handle: answers every prompt with "ok", records requests."""

    def __init__(self, seen: list, fail: Exception | None = None, output: RequestOutput | None = None):
        self.seen, self.fail, self.model_id, self.output = seen, fail, None, output

    def options(self, multiplexed_model_id=None, stream=False):
        h = FakeHandle(self.seen, self.fail, self.output)
        h.model_id = multiplexed_model_id or self.model_id
        return h

    @property
    def generate(self):
        async def remote(req):
            self.seen.append((self.model_id, req))
            if self.fail is not None:
                raise self.fail
            if self.output is not None:
                return self.output
            return RequestOutput("r", "ok", [1], True, "length", prompt_tokens=1, completion_tokens=1)

        return types.SimpleNamespace(remote=remote)

    @property
    def generate_stream(self):
        def remote(req):
            self.seen.append((self.model_id, req))

            async def gen():
                if self.fail is not None:
                    raise self.fail
                yield RequestOutput("r", "ok", [1], True, "length", prompt_tokens=1, completion_tokens=1)

            return gen()

        return types.SimpleNamespace(remote=remote)


    @property
    def generate_channeled(self):
        """The channeled stream (deployments/channel.py): here the whole answer in its Final."""
        fake = self

        class Call:
            def __init__(self):
                self.sent = False

            def __aiter__(self):
                return self

            async def __anext__(self):
                if fake.fail is not None:
                    raise fake.fail
                if self.sent:
                    raise StopAsyncIteration
                self.sent = True
                return Final(0, "ok", "length", 1, 1)

            def cancel(self):
                pass

        def remote(req, key):
            self.seen.append((self.model_id, req))
            return Call()

        return types.SimpleNamespace(remote=remote)


class FakeAdmin:
    def __init__(self, known=("tenant-0", "acme-1", "acme-2", "globex-1")):
        self.known = set(known)

    def resolve(self, name):
        if name not in self.known:
            raise AdapterNotFoundError(f"model '{name}' does not exist")
        return f"{name}@v1"

    def model_ids(self):
        return sorted(self.known)


@pytest.fixture
def edge(monkeypatch):
    """A factory: ``edge(auth=..., limits=..., max_num_seqs=..., fail=..., vocab_size=..., output=...)`` ->
    (TestClient, seen requests). ``output``: what the fake engine answers every prompt with."""
    for name in ("REQUESTS", "ROUTER_PATH", "LATENCY", "TTFT", "GENERATED_TOKENS"):
        monkeypatch.setattr(metrics, name, _Metric())

    def make(auth: Authenticator | None = None, limits: LimitsConfig | None = None, max_num_seqs: int = 8,
             fail: Exception | None = None, admin: FakeAdmin | None = None, vocab_size: int | None = None,
             output: RequestOutput | None = None):
        seen: list = []
        # The class under Serve's ASGI wrapper (whose async __del__ would warn in tests).
        router = object.__new__(ingress.Router.__mro__[1])
        router.auth = auth or Authenticator(enabled=False)
        cfg = limits or LimitsConfig()
        router.limiter = TenantLimiter.from_config(cfg, max_num_seqs=max_num_seqs, vocab_size=vocab_size)
        router.lora = FakeHandle(seen, fail, output)
        router.merged = None
        router.admin = admin or FakeAdmin()
        router.base_model_name = "base"
        router.default_max_tokens = 4
        router.promoter = None
        router.streams = ChannelHub()
        router._handles = {}
        monkeypatch.setitem(ingress._EDGE, "auth", router.auth)
        monkeypatch.setitem(ingress._EDGE, "max_body_bytes", cfg.max_body_bytes)
        monkeypatch.setattr(serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=router))
        return TestClient(ingress.app, raise_server_exceptions=False), seen

    return make


def _keys() -> Authenticator:
    return Authenticator([
        KeyEntry(tenant="acme", key=KEY_A, adapters=["acme-*"]),
        KeyEntry(tenant="globex", key=KEY_B, adapters=["globex-*"], base_model=True),
        KeyEntry(tenant="ops", key=KEY_ADMIN, admin=True),
    ])


def _bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def _is_openai_error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    return err


# ------------------------------------------------------------- prompts per request, body size


def test_prompts_per_request_are_capped_at_max_num_seqs_without_limits_config(edge):
    client, seen = edge(max_num_seqs=8)
    r = client.post(CMPL, json={"model": "base", "prompt": [[1]] * 9, "max_tokens": 1})
    err = _is_openai_error(r, 400)
    assert "9 prompts" in err["message"] and "8" in err["message"] and err["code"] == "too_many_prompts"
    assert seen == []  # nothing reached the engine
    r = client.post(CMPL, json={"model": "base", "prompt": [[1]] * 8, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8 and len(seen) == 8
    # The same for streams, and for text batches.
    r = client.post(CMPL, json={"model": "base", "prompt": ["x"] * 9, "max_tokens": 1, "stream": True})
    _is_openai_error(r, 400)


def test_a_4mb_body_of_token_lists_never_fans_out(edge):
    client, seen = edge(max_num_seqs=64)
    body = b'{"model": "base", "max_tokens": 1, "prompt": [' + b",".join([b"[1]"] * 1_000_000) + b"]}"
    assert len(body) < LimitsConfig().max_body_bytes
    r = client.post(CMPL, content=body, headers={"content-type": "application/json"})
    err = _is_openai_error(r, 400)
    assert "prompts" in err["message"]
    assert seen == []


def test_default_body_size_cap_holds_without_limits_config(edge):
    client, seen = edge()
    big = "a" * (LimitsConfig().max_body_bytes + 1)
    r = client.post(CMPL, json={"model": "base", "prompt": big})
    _is_openai_error(r, 413)
    assert seen == []


def test_limits_config_prompt_cap_must_fit_max_num_seqs():
    from serve_app.config import AppConfig

    with pytest.raises(ValueError, match="max_prompts_per_request 100 is more than max_num_seqs 64"):
        AppConfig(limits={"max_prompts_per_request": 100}, max_num_seqs=64)
    AppConfig(limits={"max_prompts_per_request": 16}, max_num_seqs=64)


# ---------------------------------------------------------------------- sampling bounds at the edge


@pytest.mark.parametrize("field, value, range_text", [
    ("top_k", 2**70, "[-1, 2147483647]"),
    ("top_k", 2**63 - 1, "[-1, 2147483647]"),
    ("seed", 2**64, "[-9223372036854775808, 9223372036854775807]"),
    ("max_tokens", 2**40, "[1, 2147483647]"),
    ("temperature", 3.0, "[0, 2]"),
    ("top_p", 0.0, "(0, 1]"),
])
def test_sampling_fields_out_of_range_are_400_naming_field_and_range(edge, field, value, range_text):
    client, seen = edge()
    r = client.post(CMPL, json={"model": "base", "prompt": "x", "temperature": 1.0, field: value})
    err = _is_openai_error(r, 400)
    assert err["message"].startswith(f"{field}: must be") and range_text in err["message"], err
    assert err["param"] == field
    assert seen == []


def test_tiny_positive_top_p_and_huge_legal_values_are_accepted(edge):
    client, seen = edge()
    r = client.post(CMPL, json={"model": "base", "prompt": "x", "temperature": 1.0, "top_p": 1e-300,
                                "top_k": 2**31 - 1, "seed": -(2**63), "stop_token_ids": [2**31 - 1]})
    assert r.status_code == 200, r.text
    params = seen[0][1].params
    assert params.top_p == 1e-300 and params.top_k == 2**31 - 1


@pytest.mark.parametrize("body, needle", [
    ({"stop_token_ids": [2**63]}, "stop_token_ids: token IDs must be integers in [0, 2147483647]"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids: at most 64 stop token IDs"),
    ({"stop": ["s" * 1025]}, "stop: stop sequence 0 is 1025 characters, more than the limit 1024"),
    ({"prompt": [2**40]}, "prompt: token IDs must be integers in [0, 2147483647]"),
])
def test_stop_and_token_id_caps(edge, body, needle):
    client, seen = edge()
    r = client.post(CMPL, json={"model": "base", "prompt": "x", **body})
    assert needle in _is_openai_error(r, 400)["message"]
    assert seen == []


# ------------------------------------------------------- token IDs against the model's vocabulary


def test_out_of_vocab_token_ids_are_400_at_the_router_naming_the_id_and_range(edge):
    client, seen = edge(vocab_size=512)
    # A batch: the bad prompt is refused before any prompt of it reaches a replica (where it would
    # fail while its siblings were already generating).
    r = client.post(CMPL, json={"model": "base", "prompt": [[1, 2], [3, 600, 4], [5]], "max_tokens": 1})
    err = _is_openai_error(r, 400)
    assert err["code"] == "token_out_of_range", err
    assert "prompt 1 holds token ID 600 (at position 1)" in err["message"] and "[0, 512)" in err["message"], err
    assert "below 512" in err["message"]
    err = _is_openai_error(client.post(CMPL, json={"model": "base", "prompt": [1, 512], "stream": True}), 400)
    assert "the prompt holds token ID 512 (at position 1)" in err["message"], err
    err = _is_openai_error(client.post(CMPL, json={"model": "base", "prompt": [1], "logit_bias": {"700": 5}}), 400)
    assert "logit_bias key 700" in err["message"] and "[0, 512)" in err["message"], err
    err = _is_openai_error(client.post(CHAT, json={"model": "base", "messages": [{"role": "user", "content": "x"}],
                                                   "logit_bias": {"512": 5}}), 400)
    assert "logit_bias key 512" in err["message"], err
    assert seen == []
    r = client.post(CMPL, json={"model": "base", "prompt": [[0, 511], [7]], "logit_bias": {"511": 1}, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert len(seen) == 2


# ------------------------------------------------------------------ response size (logprob entries)


def test_logprob_entries_over_the_cap_are_400_before_generating(edge):
    client, seen = edge(limits=LimitsConfig(max_logprob_entries=100_000))
    long = [[5] * 2000] * 4
    # echo + logprobs=20: 4 sequences x (2000 prompt + 16 generated positions) x 21 = 169,344 entries.
    r = client.post(CMPL, json={"model": "base", "prompt": long, "echo": True, "logprobs": 20, "max_tokens": 16})
    err = _is_openai_error(r, 400)
    assert err["code"] == "response_too_large", err
    assert "169,344 logprob entries" in err["message"] and "100,000" in err["message"], err
    assert "logprobs" in err["message"] and "drop echo" in err["message"], err
    # The same for a stream, for best_of's candidates, and for chat's top_logprobs x n.
    r = client.post(CMPL, json={"model": "base", "prompt": long, "echo": True, "logprobs": 20, "max_tokens": 16,
                                "stream": True})
    _is_openai_error(r, 400)
    r = client.post(CMPL, json={"model": "base", "prompt": [5] * 10, "logprobs": 20, "max_tokens": 700, "best_of": 8})
    assert "117,600 logprob entries" in _is_openai_error(r, 400)["message"]
    r = client.post(CHAT, json={"model": "base", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                "top_logprobs": 20, "max_tokens": 2000, "n": 4})
    assert "168,000 logprob entries" in _is_openai_error(r, 400)["message"]
    assert seen == []  # nothing was generated
    # Under the cap: served. Without echo the prompt's positions do not count.
    r = client.post(CMPL, json={"model": "base", "prompt": long, "logprobs": 20, "max_tokens": 16})
    assert r.status_code == 200, r.text


def test_the_logprob_cap_holds_without_limits_config():
    field = LimitsConfig.model_fields["max_logprob_entries"]
    assert LimitsConfig().max_logprob_entries == 1_000_000
    assert "logprob" in field.description and "Null: no cap" in field.description
    limiter = TenantLimiter(LimitsConfig(), max_num_seqs=64)
    # The response: 64 x 2,000-token prompts echoed with logprobs=20.
    with pytest.raises(InvalidRequestError, match="2,709,504 logprob entries"):
        limiter.check_response_size([2000] * 64, 16, 20, True)
    limiter.check_response_size([2048] * 64, 1, 6, True)  # an lm-eval loglikelihood batch fits
    TenantLimiter(LimitsConfig(max_logprob_entries=None)).check_response_size([2000] * 64, 16, 20, True)


def _logprob_output(positions: int, top: int) -> RequestOutput:
    from serve_app.api.wire import TokenLogprob

    entries = [TokenLogprob(f"t\u00e9{i % 97}", i % 97, -1.5 - (i % 7) / 3,
                            [(f"a{j}\"\n", j, -2.0 - j / 7) for j in range(top)]) for i in range(positions)]
    return RequestOutput("r", "out", list(range(positions)), True, "length", prompt_tokens=positions,
                         completion_tokens=positions, logprobs=entries, prompt_text="p",
                         prompt_logprobs=[TokenLogprob("<s>", 1, None, None), *entries])


def test_a_large_response_is_the_same_json_built_off_the_loop(edge):
    out = _logprob_output(600, 20)  # 2 prompts x (601 + 600) positions x 21 > LARGE_RESPONSE_ENTRIES
    client, seen = edge(output=out)
    body = {"model": "base", "prompt": [[5] * 8, [6] * 8], "echo": True, "logprobs": 20, "max_tokens": 600}
    r = client.post(CMPL, json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    got = r.json()
    assert serving._response_entries(types.SimpleNamespace(choices=[
        types.SimpleNamespace(logprobs=types.SimpleNamespace(tokens=c["logprobs"]["tokens"],
                                                             top_logprobs=c["logprobs"]["top_logprobs"]))
        for c in got["choices"]])) > serving.LARGE_RESPONSE_ENTRIES
    # What the in-loop path (JSONResponse of model_dump) sends for the same response.
    from serve_app.api.protocol import CompletionLogprobs, CompletionResponse, CompletionResponseChoice, UsageInfo

    lp = CompletionLogprobs.of([*out.prompt_logprobs, *out.logprobs])
    want = CompletionResponse(id=got["id"], created=got["created"], model="base", choices=[
        CompletionResponseChoice(index=i, text="p" + "out", finish_reason="length", logprobs=lp) for i in range(2)],
        usage=UsageInfo.of(1200, 1200))
    assert got == json.loads(ingress.JSONResponse(want.model_dump()).body)
    assert json.loads(serving._encode(want)) == json.loads(ingress.JSONResponse(want.model_dump()).body)


def test_a_large_response_does_not_hold_the_event_loop(edge):
    """While one ~10 MB echo + logprobs response is built and encoded, the router's loop keeps
    serving: its longest stall is a small part of the response's time (it was all of it)."""
    import asyncio
    import time

    import httpx

    out = _logprob_output(1000, 20)
    edge(output=out)  # sets the router up; the request goes through httpx's ASGI transport below
    body = {"model": "base", "prompt": [[5] * 8] * 8, "echo": True, "logprobs": 20, "max_tokens": 1000}

    async def main():
        gaps, stop = [], False

        async def ticker():
            last = time.perf_counter()
            while not stop:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ingress.app), base_url="http://x") as c:
            t0 = time.perf_counter()
            gaps.clear()
            r = await c.post(CMPL, json=body, timeout=300)
            wall = time.perf_counter() - t0
        stop = True
        await t
        return r, wall, max(gaps)

    r, wall, stall = asyncio.run(main())
    assert r.status_code == 200 and len(r.content) > 5_000_000, r.text[:300]
    assert stall < wall / 2, (stall, wall)


# ---------------------------------------------------------------------------- echoed values


@pytest.mark.parametrize("auth_on", [False, True])
def test_lone_surrogate_in_model_is_400_and_never_echoed(edge, auth_on):
    # A guard, not a reproduction: it passes on the old code too. pydantic's str refuses a lone
    # surrogate (string_unicode) and the router's validation handler never echoes the input;
    # FastAPI's default handler does, and that echo is the 500 (test_protocol covers it).
    client, seen = edge(auth=_keys() if auth_on else None)
    raw = b'{"model": "acme-\\udc80", "prompt": "x", "max_tokens": 1}'
    r = client.post(CMPL, content=raw, headers={"content-type": "application/json", **_bearer(KEY_A)})
    err = _is_openai_error(r, 400)
    r.content.decode("utf-8")  # valid UTF-8, and no raw surrogate once decoded
    assert "\udc80" not in err["message"] and "acme-" not in err["message"]
    assert seen == []


def test_forbidden_model_name_is_echoed_escaped_and_short(edge):
    client, _ = edge(auth=_keys())
    name = "globex-1\n\x1b[31m" + "x" * 5000
    r = client.post(CMPL, json={"model": name, "prompt": "x"}, headers=_bearer(KEY_A))
    err = _is_openai_error(r, 403)
    assert "\n" not in err["message"] and "\x1b" not in err["message"] and len(err["message"]) < 300


# ---------------------------------------------------------------------- principals fail closed


def test_a_request_without_a_principal_is_401_not_admin():
    from serve_app.router.auth import AuthenticationError, principal_of

    with pytest.raises(AuthenticationError):
        principal_of({"type": "http"})
    with pytest.raises(AuthenticationError):
        principal_of({"type": "http"}, _keys())
    p = principal_of({"type": "http"}, Authenticator(enabled=False))
    assert not p.admin and p.tenant is None and p.may_use("anything")


# -------------------------------------------------------------------------- fair admission key


def test_every_engine_request_carries_the_tenant_principal(edge):
    client, seen = edge(auth=_keys())
    calls = [
        (CMPL, {"model": "acme-1", "prompt": ["a", "b"], "max_tokens": 1}),
        (CMPL, {"model": "acme-2", "prompt": "a", "max_tokens": 1, "stream": True}),
        (CHAT, {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
        (CHAT, {"model": "acme-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": True}),
    ]
    for path, body in calls:
        r = client.post(path, json=body, headers=_bearer(KEY_A))
        assert r.status_code == 200, r.text
    r = client.post(CMPL, json={"model": "base", "prompt": "a", "max_tokens": 1}, headers=_bearer(KEY_B))
    assert r.status_code == 200
    tenants = [req.tenant for _, req in seen]
    # Two adapters and the base model of one key: one fair-share key; the other key's base model: its own.
    assert tenants == ["acme"] * 5 + ["globex"], tenants


def test_with_auth_off_the_tenant_key_is_the_model_name(edge):
    client, seen = edge()
    client.post(CMPL, json={"model": "tenant-0", "prompt": "a", "max_tokens": 1})
    client.post(CMPL, json={"model": "base", "prompt": "a", "max_tokens": 1, "stream": True})
    client.post(CHAT, json={"model": "tenant-0", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
                headers={ingress.MODEL_HEADER: "acme-1"})
    assert [req.tenant for _, req in seen] == ["tenant-0", "base", "acme-1"]


# ------------------------------------------------------------------- no store URIs or paths


@pytest.mark.parametrize("stream", [False, True])
def test_tenant_facing_errors_carry_no_store_uris_or_paths(edge, stream):
    fail = AdapterStoreUnavailableError(
        "the adapter store s3://acme-private/adapters has not answered (cannot read "
        "/var/lib/serve/cache/tenant-0/adapter_model.safetensors); retry later"
    )
    client, _ = edge(fail=fail)
    r = client.post(CMPL, json={"model": "tenant-0", "prompt": "a", "max_tokens": 1, "stream": stream})
    text = r.text
    assert r.status_code == 503, text
    assert "s3://" not in text and "acme-private" not in text and "/var/lib" not in text, text
    assert "retry later" in text


def test_redaction_keeps_api_routes_and_ordinary_text():
    from serve_app.api.errors import redact_locations

    msg = "model 'x' was deleted; register it again with POST /admin/adapters; GET /v1/models lists them"
    assert redact_locations(msg) == msg
    assert redact_locations("600 tokens/min and 1/2 of it") == "600 tokens/min and 1/2 of it"
    assert redact_locations("cannot read /tmp/x/y.json (EACCES)") == "cannot read <path> (EACCES)"
    assert redact_locations("store s3://b/p/q, gs://c and file:///etc/x") == "store <uri>, <uri> and <uri>"
    assert redact_locations(r"at C:\data\x.bin now") == "at <path> now"
    assert redact_locations("in ~/adapters/a") == "in <path>"


def test_the_demo_config_ships_sane_limits():
    from pathlib import Path

    import yaml

    from serve_app.config import AppConfig

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "serve_config.yaml").read_text())
    args = AppConfig.model_validate(cfg["applications"][0]["args"])
    lim = args.limits
    assert lim.max_body_bytes <= 4 << 20
    assert lim.max_tokens is not None and lim.max_prompt_tokens is not None
    assert lim.requests_per_minute and lim.tokens_per_minute and lim.max_concurrent_requests
    assert lim.max_concurrent_requests * args.router_replicas < args.lora_max_ongoing_requests * args.lora_replicas
    assert lim.max_prompt_tokens + lim.max_tokens <= 2048  # the demo model's context
