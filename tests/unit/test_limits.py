"""Per-tenant limits: config rules, token buckets, concurrency, 400 vs 429 + Retry-After, leases,
memory bound, the body-size middleware, prompt token counts."""

from __future__ import annotations

import asyncio
import gc
import pickle

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import ValidationError

from serve_app.api.errors import http_error_body, retry_after_header
from serve_app.api.protocol import ChatCompletionRequest, CompletionRequest
from serve_app.errors import InvalidRequestError, RateLimitError
from serve_app.router.admission import check_unicode
from serve_app.router.limits import LimitsConfig, TenantLimiter, TokenBucket
from serve_app.router.middleware import BodySizeLimitMiddleware, RequestTooLargeError


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def limiter(**kw) -> tuple[TenantLimiter, Clock]:
    clock = Clock()
    return TenantLimiter(LimitsConfig(**kw), clock=clock), clock


# ---- config -----------------------------------------------------------------------------------


def test_config_rules_and_defaults():
    for name, f in LimitsConfig.model_fields.items():
        assert f.description, name
    with pytest.raises(ValidationError, match="extra"):
        LimitsConfig.model_validate({"rpm": 1})
    with pytest.raises(ValidationError, match="request_burst needs"):
        LimitsConfig(request_burst=5)
    with pytest.raises(ValidationError, match="token_burst needs"):
        LimitsConfig(token_burst=5)
    with pytest.raises(ValidationError, match="could never be admitted"):
        LimitsConfig(max_prompt_tokens=1000, max_tokens=500, tokens_per_minute=6000, token_burst=1200)
    with pytest.raises(ValidationError):
        LimitsConfig(max_body_bytes=10)
    c = LimitsConfig(requests_per_minute=120, tokens_per_minute=600, max_prompt_tokens=200, max_tokens=100)
    assert c.effective_request_burst == 20  # ten seconds' worth
    assert c.effective_token_burst == 300  # raised to one request at the limits
    assert c.needs_prompt_tokens
    assert not LimitsConfig().needs_prompt_tokens
    assert LimitsConfig(requests_per_minute=1).effective_request_burst == 1


def test_token_bucket_math():
    b = TokenBucket(rate=2.0, capacity=10, stamp=0.0)
    assert b.full and b.wait_for(10) == 0
    b.level -= 10
    b.refill(1.0)
    assert b.level == pytest.approx(2.0)
    assert b.wait_for(5) == pytest.approx(1.5)
    b.refill(100.0)
    assert b.level == 10
    b.refill(50.0)  # a clock going backwards never drains it
    assert b.level == 10


# ---- 400: what no retry can fix ------------------------------------------------------------------


def test_prompt_and_max_tokens_caps_are_400():
    lim, _ = limiter(max_prompt_tokens=10, max_tokens=20)
    with pytest.raises(InvalidRequestError) as e:
        lim.admit("t", 11, 5)
    assert e.value.status_code == 400 and e.value.code == "prompt_too_long" and "10" in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        lim.admit("t", [3, 11], 5)  # any prompt of a batch
    assert e.value.code == "prompt_too_long"
    with pytest.raises(InvalidRequestError) as e:
        lim.admit("t", 3, 21)
    assert e.value.code == "max_tokens_too_large" and e.value.status_code == 400
    lim.admit("t", 10, 20).release()


def test_requests_larger_than_a_burst_or_the_cap_are_400_not_429():
    lim, _ = limiter(requests_per_minute=60, request_burst=4)
    with pytest.raises(InvalidRequestError, match="request burst 4"):
        lim.admit("t", [1] * 5, 1)
    lim2, _ = limiter(tokens_per_minute=600, token_burst=100)
    with pytest.raises(InvalidRequestError, match="token burst 100"):
        lim2.admit("t", 90, 20)
    lim3, _ = limiter(max_concurrent_requests=2)
    with pytest.raises(InvalidRequestError, match="concurrency limit 2"):
        lim3.admit("t", [1, 1, 1], 1)


# ---- 429 + Retry-After ------------------------------------------------------------------------------


def test_request_bucket_429_with_retry_after_and_refill():
    lim, clock = limiter(requests_per_minute=60, request_burst=3)  # 1 per second
    leases = [lim.admit("acme", 5, 5) for _ in range(3)]
    with pytest.raises(RateLimitError) as e:
        lim.admit("acme", 5, 5)
    assert e.value.status_code == 429 and e.value.retry_after == pytest.approx(1.0)
    assert retry_after_header(e.value) == {"Retry-After": "1"}
    assert "requests/min" in e.value.message and "acme" in e.value.message
    # Another tenant is not affected.
    lim.admit("globex", 5, 5).release()
    clock.t += 1.0
    leases.append(lim.admit("acme", 5, 5))
    for lease in leases:
        lease.release()


def test_token_bucket_429_retry_after_is_time_to_refill():
    lim, clock = limiter(tokens_per_minute=600, token_burst=100)  # 10 tokens/s
    lim.admit("t", 40, 40).release()  # 80 of 100
    with pytest.raises(RateLimitError) as e:
        lim.admit("t", 30, 20)  # needs 50, has 20: 3 s
    assert e.value.retry_after == pytest.approx(3.0)
    assert retry_after_header(e.value) == {"Retry-After": "3"}
    clock.t += 2.9
    with pytest.raises(RateLimitError):
        lim.admit("t", 30, 20)
    clock.t += 0.2
    lim.admit("t", 30, 20).release()


def test_refused_requests_cost_nothing():
    lim, clock = limiter(requests_per_minute=60, request_burst=2, tokens_per_minute=60, token_burst=10)
    lim.admit("t", 1, 1).release()  # 1 request, 2 tokens
    with pytest.raises(RateLimitError):
        lim.admit("t", 5, 5)  # tokens short; the request bucket must not be charged
    lim.admit("t", 4, 4).release()  # 1 request left, 8 tokens left: fits exactly


def test_concurrency_cap_and_lease_release():
    lim, _ = limiter(max_concurrent_requests=2)
    a, b = lim.admit("t", 1, 1), lim.admit("t", 1, 1)
    with pytest.raises(RateLimitError) as e:
        lim.admit("t", 1, 1)
    assert e.value.retry_after == 1.0 and "concurrent" in e.value.message
    lim.admit("other", 1, 1).release()
    a.release()
    a.release()  # idempotent: must not free a second slot
    assert lim.active("t") == 1
    c = lim.admit("t", 1, 1)
    with pytest.raises(RateLimitError):
        lim.admit("t", 1, 1)
    b.release()
    c.release()
    assert lim.active("t") == 0
    assert lim.stats()["rejected"]["concurrent requests"] == 2


def test_lease_as_context_manager_stream_guard_and_gc():
    lim, _ = limiter(max_concurrent_requests=1)

    async def main():
        async with lim.admit("t", 1, 1):
            assert lim.active("t") == 1
        assert lim.active("t") == 0

        async def gen():
            for i in range(3):
                yield i

        lease = lim.admit("t", 1, 1)
        assert [x async for x in lease.guard(gen())] == [0, 1, 2]
        assert lim.active("t") == 0

        # A consumer that stops early (client went away): aclose releases.
        lease = lim.admit("t", 1, 1)
        g = lease.guard(gen())
        assert await g.__anext__() == 0
        await g.aclose()
        assert lim.active("t") == 0

        # ...but only once the stream is closed: what closing it cancels (a batch's other
        # requests, on their replicas) has settled before the tenant's slots are free.
        seen_active = []

        async def settling():
            try:
                yield 0
                yield 1
            finally:
                await asyncio.sleep(0.01)  # the replicas acknowledging the cancel
                seen_active.append(lim.active("t"))

        lease = lim.admit("t", 1, 1)
        g = lease.guard(settling())
        assert await g.__anext__() == 0
        await g.aclose()
        assert seen_active == [1] and lim.active("t") == 0

        async def failing():
            yield 1
            raise RuntimeError("replica died")

        lease = lim.admit("t", 1, 1)
        with pytest.raises(RuntimeError):
            async for _ in lease.guard(failing()):
                pass
        assert lim.active("t") == 0

        # A stream that is never started, then dropped: the lease is released on collection.
        never = lim.admit("t", 1, 1).guard(gen())
        del never
        gc.collect()
        assert lim.active("t") == 0

    asyncio.run(main())


def test_idle_tenants_are_forgotten_so_memory_stays_bounded():
    lim, clock = limiter(requests_per_minute=600, max_concurrent_requests=10)
    held = lim.admit("busy", 1, 1)
    for i in range(5000):
        lim.admit(f"t{i}", 1, 1).release()
        clock.t += 0.01
    clock.t += 60
    lim.admit("last", 1, 1).release()
    for i in range(3000):  # enough admissions to cross the prune threshold again
        lim.admit(f"u{i % 10}", 1, 1).release()
        clock.t += 1
    assert lim.stats()["tenants_tracked"] < 2100
    assert lim.active("busy") == 1  # a tenant with requests in flight is never forgotten
    held.release()


def test_rate_limit_error_pickles_with_retry_after():
    e = pickle.loads(pickle.dumps(RateLimitError("slow down", retry_after=2.5)))
    assert isinstance(e, RateLimitError) and e.retry_after == 2.5 and e.message == "slow down"
    assert retry_after_header(InvalidRequestError("x")) == {}


# ---- prompt token counts -------------------------------------------------------------------------


def test_prompt_counts_match_the_replicas_tokenization(tiny_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_assets.base))
    lim = TenantLimiter(LimitsConfig(max_prompt_tokens=1000), tokenizer_path=str(tiny_assets.base))
    req = CompletionRequest(model="base", prompt=["hello world", "the quick brown fox"])
    assert lim.count_prompts_sync(req) == [len(tok("hello world")["input_ids"]), len(tok("the quick brown fox")["input_ids"])]
    assert lim.count_prompts_sync(CompletionRequest(model="base", prompt=[1, 2, 3])) == [3]
    assert lim.count_prompts_sync(CompletionRequest(model="base", prompt=[[1, 2], [3]])) == [2, 1]
    chat = ChatCompletionRequest(model="base", messages=[{"role": "user", "content": "hi there"}])
    text = "user: hi there\nassistant:"  # the TINY tokenizer has no chat template
    assert lim.count_prompts_sync(chat) == [len(tok(text)["input_ids"])]
    long = CompletionRequest(model="base", prompt="word " * 10_000)
    assert asyncio.run(lim.count_prompts(long))[0] > 1000
    # No limit needs counts: no tokenizer is loaded.
    off = TenantLimiter(LimitsConfig())
    assert off.count_prompts_sync(req) == [0, 0] and off._tokenizer is None


def test_echoed_prompts_are_counted_for_the_response_size_cap(tiny_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_assets.base))
    lim = TenantLimiter(LimitsConfig(), tokenizer_path=str(tiny_assets.base))  # no limit needs counts...
    text = "the quick brown fox " * 50
    plain = CompletionRequest(model="base", prompt=[text], logprobs=5)
    assert lim.count_prompts_sync(plain) == [0] and lim._tokenizer is None
    # ...but an echo of the prompt's logprobs does: the prompt's positions come back in the response.
    echo = CompletionRequest(model="base", prompt=[text], logprobs=5, echo=True)
    n = len(tok(text)["input_ids"])
    assert lim.count_prompts_sync(echo) == [n]
    with pytest.raises(InvalidRequestError, match=f"{(n + 16) * 6:,} logprob entries"):
        TenantLimiter(LimitsConfig(max_logprob_entries=(n + 16) * 6 - 1)).check_response_size([n], 16, 5, True)
    # Without a tokenizer to be had, a text's UTF-8 bytes (+2) bound its tokens.
    assert TenantLimiter(LimitsConfig()).count_prompts_sync(echo) == [len(text.encode()) + 2]
    assert TenantLimiter(LimitsConfig(max_logprob_entries=None)).count_prompts_sync(echo) == [0]


def test_the_vocabulary_comes_from_the_model_folder(tiny_assets, tmp_path):
    lim = TenantLimiter(LimitsConfig(), tokenizer_path=str(tiny_assets.base))
    assert lim.vocab_size == 512  # TINY's config.json, what the engine checks against too
    lim.check_token_ids(CompletionRequest(model="base", prompt=[[0, 511], [3]], logit_bias={"511": 1}))
    with pytest.raises(InvalidRequestError, match=r"token ID 512 \(at position 2\), outside this model's vocabulary \[0, 512\)"):
        lim.check_token_ids(CompletionRequest(model="base", prompt=[1, 2, 512]))
    with pytest.raises(InvalidRequestError, match="logit_bias key 999"):
        lim.check_token_ids(CompletionRequest(model="base", prompt="text", logit_bias={"999": 1}))
    assert lim._tokenizer is None  # the vocabulary is config.json's: no tokenizer needed
    # No config.json (a hub ID, or none given): no check here, the replica still checks.
    for none in (TenantLimiter(LimitsConfig(), tokenizer_path=str(tmp_path)), TenantLimiter(LimitsConfig())):
        assert none.vocab_size is None
        none.check_token_ids(CompletionRequest(model="base", prompt=[10**6]))


# ---- HTTP edge --------------------------------------------------------------------------------------


def body_app(limit: int) -> TestClient:
    app = FastAPI()
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=lambda: limit)

    @app.post("/echo")
    async def echo(request: Request):
        return {"n": len(await request.body())}

    @app.get("/ping")
    async def ping():
        return {"ok": True}

    return TestClient(app)


def test_body_size_limit():
    c = body_app(2048)
    assert c.post("/echo", content=b"x" * 2048).json() == {"n": 2048}
    r = c.post("/echo", content=b"x" * 2049)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "2048" in err["message"] and err["type"] == "invalid_request_error"

    def chunks():  # no Content-Length: chunked upload, counted as it arrives
        for _ in range(10):
            yield b"y" * 500

    r = c.post("/echo", content=chunks())
    assert r.status_code == 413
    assert c.post("/echo", content=iter([b"a" * 1000, b"b" * 1000])).json() == {"n": 2000}
    assert c.get("/ping").json() == {"ok": True}
    r = c.post("/echo", content=b"x", headers={"content-length": "abc"})
    assert r.status_code == 400


def test_http_error_body_shape():
    for status in (400, 401, 403, 404, 405, 413, 415, 422, 429, 418, 500):
        err = http_error_body(status, None)["error"]
        assert isinstance(err["message"], str) and err["message"]
        assert isinstance(err["type"], str) and isinstance(err["code"], str)
    assert http_error_body(404, "Not Found")["error"]["code"] == "not_found"
    assert "UTF-8" in http_error_body(400, "There was an error parsing the body")["error"]["message"]
    assert RequestTooLargeError("x").status_code == 413


def test_unpaired_surrogates_are_400():
    check_unicode(CompletionRequest(model="m", prompt=["ok \U0001F600", "b"], stop=["\u00e9"]))
    check_unicode(CompletionRequest(model="m", prompt=[[1, 2], [3]]))
    bad = [
        CompletionRequest(model="m", prompt="a\udc80b"),
        CompletionRequest(model="m", prompt=["fine", "\ud800"]),
        CompletionRequest(model="m", prompt="x", stop="\udfff"),
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "\ud800"}]),
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]),
    ]
    for req in bad:
        with pytest.raises(InvalidRequestError) as e:
            check_unicode(req)
        assert e.value.status_code == 400 and e.value.code == "invalid_unicode"
    # The model header is echoed in responses, so it is checked too.
    with pytest.raises(InvalidRequestError, match="unpaired surrogate"):
        check_unicode(CompletionRequest(model="m", prompt="x"), "tenant-\udc80")


# ---- prompts per request: capped with no limits config at all -----------------------------------------


def test_prompts_per_request_default_to_max_num_seqs_without_config():
    lim = TenantLimiter.from_config(LimitsConfig(), max_num_seqs=8)
    assert lim.max_prompts == 8
    lim.admit("t", [1] * 8, 1).release()
    with pytest.raises(InvalidRequestError) as e:
        lim.admit("t", [1] * 9, 1)
    assert e.value.status_code == 400 and e.value.code == "too_many_prompts"
    assert "9 prompts" in e.value.message and "limit of 8" in e.value.message
    # A limiter built with nothing at all still caps (AppConfig.max_num_seqs' default).
    assert TenantLimiter(LimitsConfig()).max_prompts == 64
    # Configured lower than max_num_seqs: that one.
    assert TenantLimiter.from_config(LimitsConfig(max_prompts_per_request=2), max_num_seqs=8).max_prompts == 2


def test_prompt_count_is_checked_before_any_prompt_is_tokenized():
    class Exploding:
        def __call__(self, text):
            raise AssertionError("tokenized a prompt of a refused request")

    lim = TenantLimiter(LimitsConfig(max_prompt_tokens=100), tokenizer=Exploding(), max_num_seqs=4)
    req = CompletionRequest(model="m", prompt=["x"] * 5)
    with pytest.raises(InvalidRequestError, match="5 prompts"):
        asyncio.run(lim.count_prompts(req))
    with pytest.raises(InvalidRequestError, match="5 prompts"):
        lim.count_prompts_sync(req)
