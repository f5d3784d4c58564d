"""The deployed app on a real Ray instance, against plain PEFT references.

One session-wide ``lora-app`` (tests/serve/conftest.py): TINY model, 6 tenants, adapter LRU
of 2 per replica. Every greedy request here sets ``ignore_eos`` so its output is exactly
``max_tokens`` tokens and can be compared with ``reference_greedy``.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import httpx
import pytest
from ray import serve

from serve_app.api.protocol import ChatCompletionRequest, CompletionRequest
from serve_app.errors import AdapterNotFoundError

pytestmark = pytest.mark.serve

PROMPTS = [
    "The quick brown fox jumps over",
    "tenant adapter token batch queue",
    "Hello, world! 123",
    "café 日本語 über the river",
]
CHATS = [
    [{"role": "user", "content": "Tell me about the river."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tenant adapter?"}],
]
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]
TIMEOUT = httpx.Timeout(120.0)


def greedy(model: str, n: int, **extra) -> dict:
    return {"model": model, "max_tokens": n, "temperature": 0, "ignore_eos": True, **extra}


def lora_stats() -> dict:
    return serve.get_deployment_handle("LoRADeployment", app_name="lora-app").stats.remote().result()


def sse_payloads(lines) -> tuple[list[dict], bool]:
    """(JSON payloads, saw [DONE]) from an iterable of SSE lines."""
    payloads, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        assert not done, "event after [DONE]"
        if data == "[DONE]":
            done = True
        else:
            payloads.append(json.loads(data))
    return payloads, done


def stream_text(payloads: list[dict], chat: bool = False) -> tuple[str, list[str]]:
    """(concatenated text, finish reasons) of a single-choice stream; fails on in-band errors."""
    text, reasons = [], []
    for p in payloads:
        assert "error" not in p, p
        for c in p["choices"]:
            text.append((c["delta"].get("content") or "") if chat else c["text"])
            if c["finish_reason"] is not None:
                reasons.append(c["finish_reason"])
    return "".join(text), reasons


def post_stream(client: httpx.Client, path: str, body: dict) -> tuple[httpx.Response, list[dict], bool]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return r, [], False
        payloads, done = sse_payloads(r.iter_lines())
    return r, payloads, done


@pytest.fixture(scope="module")
def http(serve_env):
    with httpx.Client(base_url=serve_env.url, timeout=TIMEOUT) as c:
        yield c


# ---- 1. the official OpenAI client ------------------------------------------------------------


def test_openai_client_completions_chat_and_streams(serve_env, refs):
    import openai

    client = openai.OpenAI(base_url=serve_env.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    n = 12

    model, prompt = "tenant-0", PROMPTS[0]
    expected = refs.text(model, prompt, n)
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == model
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].text and r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(refs.prompt_ids(prompt))
    assert r.usage.completion_tokens == n
    assert r.usage.total_tokens == r.usage.prompt_tokens + n

    chunks = list(
        client.completions.create(
            model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert "".join(ch.text for c in chunks for ch in c.choices) == r.choices[0].text
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (r.usage.prompt_tokens, n)
    assert all(c.usage is None for c in chunks[:-1])

    model, messages = "tenant-3", CHATS[1]
    expected = refs.chat_text(model, messages, n)
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
    )
    assert chat.object == "chat.completion" and chat.model == model
    msg = chat.choices[0].message
    assert msg.role == "assistant" and msg.content and msg.content == expected
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens == len(refs.chat_ids(messages)) and chat.usage.completion_tokens == n

    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, max_completion_tokens=n, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == msg.content
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n

    # Without include_usage there is no usage chunk; the base model by its name.
    chunks = list(client.completions.create(model="base", prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert all(c.choices for c in chunks)
    assert "".join(ch.text for c in chunks for ch in c.choices) == refs.text("base", prompt, 4)

    ids = [m.id for m in client.models.list().data]
    assert ids == serve_env.models


# ---- 2. every tenant matches plain PEFT ---------------------------------------------------------


def test_every_tenant_matches_peft(serve_env, refs, http):
    n = 10
    for model in serve_env.models:
        for prompt in PROMPTS[:2]:
            r = http.post("/v1/completions", json=greedy(model, n, prompt=prompt))
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["text"] == refs.text(model, prompt, n), f"{model} differs from PEFT on {prompt!r}"
            assert choice["finish_reason"] == "length"
        r = http.post("/v1/chat/completions", json=greedy(model, n, messages=CHATS[0]))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == refs.chat_text(model, CHATS[0], n), model

    # Token-level, straight at the LoRA deployment (the router only returns text).
    from serve_app.deployments.lora import GenerateRequest
    from serve_app.engine.sampling import SamplingParams

    lora = serve.get_deployment_handle("LoRADeployment", app_name=serve_env.app_name)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for model in serve_env.models:
        ids = refs.prompt_ids(PROMPTS[2])
        h = lora if model == serve_env.base_name else lora.options(multiplexed_model_id=model)
        out = h.generate.remote(GenerateRequest(params=params, prompt=ids)).result()
        assert out.token_ids == refs.tokens(model, ids, n), f"{model}: token IDs differ from PEFT"
        assert (out.prompt_tokens, out.completion_tokens, out.finish_reason) == (len(ids), n, "length")


# ---- 3. isolation under adapter churn -----------------------------------------------------------


def test_isolation_under_adapter_churn(serve_env, refs):
    """7 models through an LRU of 2, >= 200 concurrent requests in random order, 1/4 streamed."""
    n, total, concurrency = 8, 210, 32
    rng = random.Random(20240601)
    jobs = []
    for i in range(total):
        model = serve_env.models[i % len(serve_env.models)]  # every model about equally often
        stream = i % 4 == 0
        if rng.random() < 0.25:
            messages = rng.choice(CHATS)
            jobs.append(dict(model=model, stream=stream, path="/v1/chat/completions",
                             body=greedy(model, n, messages=messages), expected=refs.chat_text(model, messages, n)))
        else:
            prompt = rng.choice(PROMPTS)
            jobs.append(dict(model=model, stream=stream, path="/v1/completions",
                             body=greedy(model, n, prompt=prompt), expected=refs.text(model, prompt, n)))
    rng.shuffle(jobs)
    # Every model answers every prompt differently, so a request served with another tenant's
    # adapter (or none) cannot pass.
    for prompt in PROMPTS:
        assert len({refs.text(m, prompt, n) for m in serve_env.models}) == len(serve_env.models), prompt
    assert sum(j["stream"] for j in jobs) >= total // 4 - 1
    before = lora_stats()

    async def one(client: httpx.AsyncClient, sem: asyncio.Semaphore, job: dict) -> tuple[str, str]:
        chat = job["path"].endswith("chat/completions")
        async with sem:
            if job["stream"]:
                async with client.stream("POST", job["path"], json={**job["body"], "stream": True}) as r:
                    if r.status_code != 200:
                        return "error", f"{r.status_code} {(await r.aread())[:300]!r}"
                    payloads, done = sse_payloads([line async for line in r.aiter_lines()])
                if not done:
                    return "error", "stream ended without [DONE]"
                if any("error" in p for p in payloads):
                    return "error", str(payloads)
                text, reasons = stream_text(payloads, chat)
            else:
                r = await client.post(job["path"], json=job["body"])
                if r.status_code != 200:
                    return "error", f"{r.status_code} {r.text[:300]}"
                choice = r.json()["choices"][0]
                text = choice["message"]["content"] if chat else choice["text"]
                reasons = [choice["finish_reason"]]
        if reasons != ["length"]:
            return "error", f"finish reasons {reasons}"
        return "ok", text

    async def run_all():
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=serve_env.url, timeout=TIMEOUT, limits=limits) as client:
            return await asyncio.gather(*(one(client, sem, j) for j in jobs), return_exceptions=True)

    t0 = time.monotonic()
    results = asyncio.run(run_all())
    elapsed = time.monotonic() - t0

    errors = [(j["model"], j["stream"], res) for j, res in zip(jobs, results)
              if isinstance(res, BaseException) or res[0] != "ok"]
    assert not errors, f"{len(errors)} of {total} requests failed, e.g. {errors[:3]}"
    wrong = [(j["model"], j["path"], j["stream"], res[1], j["expected"]) for j, res in zip(jobs, results)
             if res[1] != j["expected"]]
    assert not wrong, f"{len(wrong)} of {total} outputs differ from their tenant's PEFT reference, e.g. {wrong[:3]}"

    after = lora_stats()
    # 6 adapters through an LRU of 2: loads and evictions must have happened, and nothing may leak.
    assert after["adapter_evictions"] > before["adapter_evictions"], (before, after)
    assert after["adapter_loads"] - before["adapter_loads"] >= len(serve_env.assets.adapter_ids) - serve_env.lru_size
    assert len(after["resident_adapters"]) <= serve_env.lru_size, after
    assert after["running"] == 0 and after["waiting"] == 0, after
    assert after["lora"]["retired_pinned"] == 0, after
    print(f"churn: {total} requests in {elapsed:.1f}s; loads +{after['adapter_loads'] - before['adapter_loads']}, "
          f"evictions +{after['adapter_evictions'] - before['adapter_evictions']}")


# ---- 4. LRU eviction under a running stream ------------------------------------------------------


def test_eviction_does_not_break_a_running_stream(serve_env, refs):
    a, others = "tenant-0", ["tenant-1", "tenant-2", "tenant-3", "tenant-4"]
    # long_n: several times what the evicting requests take (~100 tokens' time on 2 CPU cores),
    # and past the KV cache's initial 256 positions so the cache grows mid-stream.
    long_n, short_n, prompt = 800, 4, PROMPTS[1]
    expected = refs.text(a, prompt, long_n)
    expected_others = {m: refs.text(m, PROMPTS[0], short_n) for m in others}
    before = lora_stats()

    async def run():
        async with httpx.AsyncClient(base_url=serve_env.url, timeout=TIMEOUT) as client:
            body = greedy(a, long_n, prompt=prompt, stream=True)
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                assert r.headers["x-served-by"] == "lora"
                lines = r.aiter_lines()
                head = []
                async for line in lines:  # until the first text: A is loaded and decoding
                    head.append(line)
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                        break
                # More tenants than the LRU holds, each then most recently used: A is evicted.
                other_texts = {}
                for m in others:
                    resp = await client.post("/v1/completions", json=greedy(m, short_n, prompt=PROMPTS[0]))
                    assert resp.status_code == 200, resp.text
                    other_texts[m] = resp.json()["choices"][0]["text"]
                mid = await asyncio.to_thread(lora_stats)
                rest = [line async for line in lines]
        return head + rest, other_texts, mid

    lines, other_texts, mid = asyncio.run(run())
    assert other_texts == expected_others
    assert mid["adapter_evictions"] - before["adapter_evictions"] >= 2, (before, mid)
    assert a not in mid["resident_adapters"], mid
    # A's request was still decoding on its retired (pinned) adapter when it was evicted.
    assert mid["running"] >= 1 and mid["lora"]["retired_pinned"] >= 1, (
        f"the long stream finished before the eviction; raise long_n: {mid}"
    )

    payloads, done = sse_payloads(lines)
    text, reasons = stream_text(payloads)
    assert done and reasons == ["length"]
    assert text == expected, "the stream's output changed when its adapter was evicted"
    after = lora_stats()
    assert after["lora"]["retired_pinned"] == 0 and after["running"] == 0, after

    # A loads again on demand and still matches. The long request grew the KV cache past its
    # initial size; rows finishing at different steps (slot compaction) must still work after it.
    jobs = [(m, p, k) for k, (m, p) in enumerate([(a, PROMPTS[0]), (others[0], PROMPTS[2]), (a, PROMPTS[3]),
                                                  ("base", PROMPTS[1])], start=3)]

    async def mixed():
        async with httpx.AsyncClient(base_url=serve_env.url, timeout=TIMEOUT) as client:
            return await asyncio.gather(*(client.post(CMPL, json=greedy(m, k, prompt=p)) for m, p, k in jobs))

    for (m, p, k), r in zip(jobs, asyncio.run(mixed())):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == refs.text(m, p, k), (m, p, k)


# ---- 5. Python handles: from a second Ray app and from the driver --------------------------------


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=8)
class Caller:
    """A second app that uses lora-app through its Python API (no HTTP)."""

    def __init__(self, app_name: str):
        self.app_name = app_name

    async def run(self, model: str, prompt: str, messages: list[dict], n: int) -> dict:
        h = serve.get_app_handle(self.app_name)
        req = CompletionRequest(model=model, prompt=prompt, max_tokens=n, temperature=0, ignore_eos=True)
        resp = await h.completions.remote(req)
        chunks = [c async for c in h.options(stream=True).completions_stream.remote(req)]
        chat_req = ChatCompletionRequest(model=model, messages=messages, max_tokens=n, temperature=0, ignore_eos=True)
        chat = await h.chat.remote(chat_req)
        chat_chunks = [c async for c in h.options(stream=True).chat_stream.remote(chat_req)]
        models = await h.models.remote()
        try:
            await h.completions.remote(CompletionRequest(model="no-such-tenant", prompt="x"))
            missing = None
        except Exception as e:
            missing = (type(e).__name__, isinstance(e, AdapterNotFoundError))
        return {
            "completion": resp.model_dump(),
            "chunks": [c.model_dump() for c in chunks],
            "chat": chat.model_dump(),
            "chat_chunks": [c.model_dump() for c in chat_chunks],
            "models": [m.id for m in models.data],
            "missing": missing,
        }


def test_handle_calls_from_another_app_and_the_driver(serve_env, refs):
    n, model, prompt, messages = 9, "tenant-5", PROMPTS[3], CHATS[1]
    expected, expected_chat = refs.text(model, prompt, n), refs.chat_text(model, messages, n)

    caller = serve.run(Caller.bind(serve_env.app_name), name="caller-app", route_prefix="/caller")
    try:
        out = caller.run.remote(model, prompt, messages, n).result(timeout_s=120)
    finally:
        serve.delete("caller-app")
    assert out["completion"]["choices"][0]["text"] == expected
    assert out["completion"]["choices"][0]["finish_reason"] == "length"
    assert out["completion"]["usage"]["completion_tokens"] == n
    assert "".join(ch["text"] for c in out["chunks"] for ch in c["choices"]) == expected
    assert [ch["finish_reason"] for c in out["chunks"] for ch in c["choices"] if ch["finish_reason"]] == ["length"]
    assert out["chat"]["choices"][0]["message"]["content"] == expected_chat
    assert "".join(ch["delta"].get("content") or "" for c in out["chat_chunks"] for ch in c["choices"]) == expected_chat
    assert out["models"] == serve_env.models
    assert out["missing"] is not None and out["missing"][1], out["missing"]  # AdapterNotFoundError

    # The driver, through the same app handle.
    h = serve.get_app_handle(serve_env.app_name)
    req = CompletionRequest(model=model, prompt=prompt, max_tokens=n, temperature=0, ignore_eos=True)
    resp = h.completions.remote(req).result(timeout_s=120)
    assert resp.choices[0].text == expected and resp.usage.completion_tokens == n
    chunks = list(h.options(stream=True).completions_stream.remote(req))
    assert "".join(ch.text for c in chunks for ch in c.choices) == expected
    chat = h.chat.remote(ChatCompletionRequest(model="base", messages=messages, max_tokens=n, temperature=0,
                                               ignore_eos=True)).result(timeout_s=120)
    assert chat.choices[0].message.content == refs.chat_text("base", messages, n)
    with pytest.raises(AdapterNotFoundError):
        h.completions.remote(CompletionRequest(model="no-such-tenant", prompt="x")).result(timeout_s=60)


# ---- 6. bad requests: the right 4xx in OpenAI's error shape ---------------------------------------


def assert_openai_error(r: httpx.Response, statuses: tuple[int, ...]) -> dict:
    assert r.status_code in statuses, f"{r.status_code}: {r.text}"
    body = r.json()
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert isinstance(err["code"], str) and err["code"]
    return err


BAD_IDS = ["tenant-1/../tenant-2", "../tenant-1", "..", "a/b", "tenant-1/", "/etc/passwd", "tenant-1..", " tenant-1",
           "tenant-1\n", "%2e%2e", "x" * 300]

BAD_REQUESTS = [
    # (id, path, json body or raw bytes, allowed statuses)
    ("unknown-model", CMPL, {"model": "no-such-tenant", "prompt": "x"}, (404,)),
    ("unknown-model-chat", CHAT, {"model": "no-such-tenant", "messages": MSGS}, (404,)),
    ("unknown-model-stream", CMPL, {"model": "no-such-tenant", "prompt": "x", "stream": True}, (404,)),
    ("unknown-model-chat-stream", CHAT, {"model": "no-such-tenant", "messages": MSGS, "stream": True}, (404,)),
    ("invalid-json", CMPL, b'{"model": "base", "prompt": ', (400,)),
    ("invalid-json-chat", CHAT, b"{not json", (400,)),
    ("json-not-object", CMPL, b'["base"]', (400,)),
    ("missing-model", CMPL, {"prompt": "x"}, (400,)),
    ("max-tokens-str", CMPL, {"model": "base", "prompt": "x", "max_tokens": "abc"}, (400,)),
    ("prompt-wrong-type", CMPL, {"model": "base", "prompt": {"a": 1}}, (400,)),
    ("messages-wrong-type", CHAT, {"model": "base", "messages": "hi"}, (400,)),
    ("max-tokens-negative", CMPL, {"model": "base", "prompt": "x", "max_tokens": -1}, (400,)),
    ("max-tokens-zero-chat", CHAT, {"model": "base", "messages": MSGS, "max_tokens": 0}, (400,)),
    ("over-max-model-len", CMPL, {"model": "tenant-1", "prompt": "x", "max_tokens": 4096}, (400,)),
    ("over-max-model-len-stream", CMPL, {"model": "tenant-1", "prompt": "x", "max_tokens": 4096, "stream": True},
     (400,)),
    ("over-max-model-len-chat", CHAT, {"model": "base", "messages": MSGS, "max_tokens": 4096}, (400,)),
    ("token-id-out-of-vocab", CMPL, {"model": "base", "prompt": [1, 99999], "max_tokens": 2}, (400,)),
    ("n-129", CMPL, {"model": "base", "prompt": "x", "n": 129}, (400,)),
    ("n-0-chat", CHAT, {"model": "base", "messages": MSGS, "n": 0}, (400,)),
    ("n-times-prompts-over-the-cap", CMPL, {"model": "base", "prompt": ["x"] * 8, "n": 128}, (400,)),
    ("empty-messages", CHAT, {"model": "base", "messages": []}, (400,)),
    # Structured output: a schema that is not a JSON Schema (the edge), one the grammar compiler refuses (the replica).
    ("bad-json-schema", CHAT, {"model": "base", "messages": MSGS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}, (400,)),
    ("uncompilable-schema", CMPL, {"model": "tenant-1", "prompt": "x", "guided_json": {"$ref": "#/$defs/nope"}}, (400,)),
    ("uncompilable-schema-stream", CHAT, {"model": "base", "messages": MSGS, "stream": True, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nope"}}}}, (400,)),
    ("response-format-unknown", CMPL, {"model": "base", "prompt": "x", "response_format": {"type": "yaml"}}, (400,)),
    ("empty-prompt-list", CMPL, {"model": "base", "prompt": []}, (400,)),
    ("temperature-too-high", CMPL, {"model": "base", "prompt": "x", "temperature": 5}, (400,)),
    # Path-traversal and malformed IDs are refused before any lookup: 400 invalid_model, never a 404
    # (a 404 would mean the ID reached the store).
    *[(f"bad-id-{i}", CMPL, {"model": bad, "prompt": "x"}, (400,)) for i, bad in enumerate(BAD_IDS)],
    *[(f"bad-id-chat-stream-{i}", CHAT, {"model": bad, "messages": MSGS, "stream": True}, (400,))
      for i, bad in enumerate(BAD_IDS[:4])],
]


@pytest.mark.parametrize("path,body,statuses", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_openai_4xx(http, path, body, statuses):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    err = assert_openai_error(r, statuses)
    if isinstance(body, dict) and body.get("model") in BAD_IDS:
        assert err["code"] == "invalid_model", err


@pytest.mark.parametrize("bad", BAD_IDS[:5])
def test_bad_adapter_id_in_header_is_4xx(http, bad):
    # httpx refuses control characters in headers, so only the printable bad IDs here.
    r = http.post(CMPL, json={"model": "base", "prompt": "x"}, headers={"serve_multiplexed_model_id": bad})
    assert assert_openai_error(r, (400,))["code"] == "invalid_model"


def test_header_selects_the_adapter(http, refs):
    n = 6
    r = http.post(CMPL, json=greedy("base", n, prompt=PROMPTS[0]), headers={"serve_multiplexed_model_id": "tenant-1"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == refs.text("tenant-1", PROMPTS[0], n)
    assert r.json()["choices"][0]["text"] != refs.text("base", PROMPTS[0], n)
    assert r.json()["model"] == "tenant-1"
    r, payloads, done = post_stream(http, CHAT, greedy("base", n, messages=CHATS[0]))
    assert r.status_code == 200 and done
    assert stream_text(payloads, chat=True)[0] == refs.chat_text("base", CHATS[0], n)
    with http.stream("POST", CHAT, json={**greedy("base", n, messages=CHATS[0]), "stream": True},
                     headers={"serve_multiplexed_model_id": "tenant-2"}) as r:
        assert r.status_code == 200
        payloads, done = sse_payloads(r.iter_lines())
    assert done and stream_text(payloads, chat=True)[0] == refs.chat_text("tenant-2", CHATS[0], n)


def test_prompt_as_token_ids_and_as_a_batch_of_strings(http, refs):
    n = 6
    ids = refs.prompt_ids(PROMPTS[2])[1:]  # no BOS: token-ID prompts are used as given
    r = http.post(CMPL, json=greedy("tenant-4", n, prompt=ids))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == refs.text("tenant-4", ids, n)
    assert body["usage"]["prompt_tokens"] == len(ids)

    r = http.post(CMPL, json=greedy("tenant-2", n, prompt=PROMPTS[:2]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [refs.text("tenant-2", p, n) for p in PROMPTS[:2]]
    assert body["usage"]["prompt_tokens"] == sum(len(refs.prompt_ids(p)) for p in PROMPTS[:2])
    assert body["usage"]["completion_tokens"] == 2 * n

    # The same batch streamed: chunks of both choices, each reassembling to its own text.
    r, payloads, done = post_stream(http, CMPL, greedy("tenant-2", n, prompt=PROMPTS[:2]))
    assert r.status_code == 200 and done
    texts, reasons = {0: "", 1: ""}, {0: [], 1: []}
    for p in payloads:
        for c in p["choices"]:
            texts[c["index"]] += c["text"]
            if c["finish_reason"]:
                reasons[c["index"]].append(c["finish_reason"])
    assert [texts[0], texts[1]] == [c["text"] for c in body["choices"]]
    assert reasons == {0: ["length"], 1: ["length"]}


def test_stop_seed_and_top_k_are_accepted(http, refs):
    n = 16
    full = refs.text("tenant-3", PROMPTS[0], n)
    # A stop string from the second half of the greedy output: generation ends just before it.
    m = re.compile(r"[A-Za-z]{2}").search(full, len(full) // 3)
    assert m, f"no ASCII pair to use as a stop string in {full!r}"
    stop = m.group()
    cut = full.find(stop)
    assert cut > 0
    r = http.post(CMPL, json=greedy("tenant-3", n, prompt=PROMPTS[0], stop=[stop]))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == full[:cut] and choice["finish_reason"] == "stop"
    r, payloads, done = post_stream(http, CMPL, greedy("tenant-3", n, prompt=PROMPTS[0], stop=stop))
    assert r.status_code == 200 and done
    assert stream_text(payloads) == (full[:cut], ["stop"])

    # Seeded sampling with top_k: the same seed gives the same text, another seed another text.
    body = {"model": "tenant-2", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 1.0, "top_k": 5,
            "seed": 1234, "ignore_eos": True}
    texts = []
    for b in (body, body, {**body, "seed": 99}):
        r = http.post(CMPL, json=b)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    assert texts[0] == texts[1] and texts[2] != texts[0], texts
    # top_k is applied: top_k=1 at temperature 1 is greedy, i.e. PEFT's greedy text (unfiltered
    # sampling at temperature 1 would almost never reproduce 12 greedy tokens).
    greedy_text = refs.text("tenant-2", PROMPTS[1], 12)
    assert texts[0] != greedy_text, "the sampled text is greedy: this check could not see top_k"
    r = http.post(CMPL, json={**body, "top_k": 1, "seed": 5})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy_text, r.text
    # Chat with top_k, seed, stop and top_p: top_k=1 makes it greedy, so it is PEFT's greedy chat
    # text cut right before the stop string.
    full_chat = refs.chat_text("tenant-2", MSGS, 16)
    m = re.compile(r"[A-Za-z]{2}").search(full_chat, len(full_chat) // 3)
    assert m, f"no ASCII pair to use as a stop string in {full_chat!r}"
    chat_stop = m.group()
    r = http.post(CHAT, json={"model": "tenant-2", "messages": MSGS, "max_tokens": 16, "top_k": 1, "seed": 7,
                              "temperature": 1.0, "stop": [chat_stop], "top_p": 0.9, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == full_chat[: full_chat.find(chat_stop)], (choice, full_chat, chat_stop)
    assert choice["finish_reason"] == "stop"


def test_n_choices_are_seeded_reproducible_and_counted(http, refs):
    """n choices: choice j of a seeded request is the single request with seed + j; the same
    request gives the same choices; greedy choices all equal PEFT's greedy text; usage counts
    every choice; streamed choices (by index) equal the non-streamed ones; completions order
    choices prompt-major (index = prompt * n + j)."""
    body = {"model": "tenant-2", "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 1.0, "seed": 41,
            "ignore_eos": True}
    r = http.post(CMPL, json={**body, "n": 3})
    assert r.status_code == 200, r.text
    got = r.json()
    texts = [c["text"] for c in sorted(got["choices"], key=lambda c: c["index"])]
    assert [c["index"] for c in got["choices"]] == [0, 1, 2]
    singles = [http.post(CMPL, json={**body, "seed": 41 + j}).json()["choices"][0]["text"] for j in range(3)]
    assert texts == singles, (texts, singles)
    assert len(set(texts)) > 1, f"seeded choices should differ: {texts}"
    assert got["usage"]["completion_tokens"] == 30
    r, payloads, done = post_stream(http, CMPL, {**body, "n": 3})
    assert r.status_code == 200 and done
    streamed = {0: "", 1: "", 2: ""}
    for p in payloads:
        for c in p["choices"]:
            streamed[c["index"]] += c["text"]
    assert [streamed[j] for j in range(3)] == texts

    two = http.post(CMPL, json={**greedy("tenant-3", 8, prompt=PROMPTS[:2]), "n": 2}).json()
    want = [refs.text("tenant-3", PROMPTS[0], 8)] * 2 + [refs.text("tenant-3", PROMPTS[1], 8)] * 2
    assert [c["text"] for c in sorted(two["choices"], key=lambda c: c["index"])] == want
    assert two["usage"]["completion_tokens"] == 32

    chat = {"model": "tenant-2", "messages": MSGS, "max_tokens": 8, "temperature": 1.0, "seed": 5, "n": 2,
            "ignore_eos": True}
    r = http.post(CHAT, json=chat)
    assert r.status_code == 200, r.text
    contents = [c["message"]["content"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    single = http.post(CHAT, json={**chat, "n": 1, "seed": 6}).json()["choices"][0]["message"]["content"]
    assert len(contents) == 2 and contents[1] == single, (contents, single)
    assert r.json()["usage"]["completion_tokens"] == 16
    r, payloads, done = post_stream(http, CHAT, {**chat, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and done
    parts, roles = {0: "", 1: ""}, []
    for p in payloads:
        for c in p["choices"]:
            parts[c["index"]] += c["delta"].get("content") or ""
            if c["delta"].get("role"):
                roles.append(c["index"])
    assert [parts[0], parts[1]] == contents and sorted(roles) == [0, 1]
    assert payloads[-1]["usage"]["completion_tokens"] == 16


def test_logprobs_over_http_streamed_equal_non_streamed(serve_env, http):
    """Completions ``logprobs`` and chat ``logprobs``/``top_logprobs`` in OpenAI's shapes; the
    streamed entries equal the non-streamed ones; the official client parses them."""
    body = greedy("tenant-1", 10, prompt=PROMPTS[0], logprobs=2)
    r = http.post(CMPL, json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 10
    assert all(v <= 0 for v in lp["token_logprobs"]) and lp["text_offset"] == sorted(lp["text_offset"])
    for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(v, abs=1e-5), (tok, v, top)  # greedy: the top one
    r, payloads, done = post_stream(http, CMPL, body)
    assert r.status_code == 200 and done
    toks, vals = [], []
    for p in payloads:
        for c in p["choices"]:
            if c.get("logprobs"):
                toks += c["logprobs"]["tokens"]
                vals += c["logprobs"]["token_logprobs"]
    # 1e-5: the streamed request may reuse the first one's prompt KV (prefix cache), computed in another
    # batch shape, so its fp32 logprobs can differ in the 7th digit; the tokens must be equal.
    assert toks == lp["tokens"] and vals == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert r.status_code == 200 and http.post(CMPL, json={**body, "logprobs": None}).json()["choices"][0]["logprobs"] is None

    from openai import OpenAI

    client = OpenAI(base_url=serve_env.url + "/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(model="tenant-1", messages=MSGS, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5) for t in content)
    stream = client.chat.completions.create(model="tenant-1", messages=MSGS, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True, extra_body={"ignore_eos": True})
    streamed = [t for ch in stream for c in ch.choices if c.logprobs and c.logprobs.content for t in c.logprobs.content]
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [(t.token, round(t.logprob, 5)) for t in content]


def test_structured_output_through_the_openai_clients_parse_helpers(serve_env, http, refs):
    """json_schema outputs validate against the schema: the official client's ``parse`` with a
    pydantic model (chat, per adapter and the base), guided_json on completions streamed and not,
    json_object; free requests sent at the same time keep their exact PEFT tokens."""
    from concurrent.futures import ThreadPoolExecutor
    from typing import Literal

    import jsonschema
    from openai import OpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=99)
        role: Literal["admin", "user", "guest"]
        tags: list[Literal["a", "b"]] = Field(max_length=3)

    client = OpenAI(base_url=serve_env.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def parse(model):
        return client.chat.completions.parse(model=model, messages=MSGS, response_format=Person, max_tokens=200,
                                             temperature=0)

    def free(model):
        return model, http.post(CMPL, json=greedy(model, 12, prompt=PROMPTS[1])).json()["choices"][0]["text"]

    models = ["base", "tenant-1", "tenant-2"]
    with ThreadPoolExecutor(6) as pool:  # constrained and free requests in the same engine steps
        parsed = list(pool.map(parse, models))
        frees = list(pool.map(free, models))
    for r in parsed:
        assert r.choices[0].finish_reason == "stop" and isinstance(r.choices[0].message.parsed, Person), r
        assert Person.model_validate_json(r.choices[0].message.content) == r.choices[0].message.parsed
    for model, text in frees:
        assert text == refs.text(model, PROMPTS[1], 12)

    schema = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 50},
                                               "ok": {"type": "boolean"}},
              "required": ["id", "ok"], "additionalProperties": False}
    body = {"model": "tenant-1", "prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0, "guided_json": schema}
    r = http.post(CMPL, json=body)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    jsonschema.validate(json.loads(text), schema)
    r, payloads, done = post_stream(http, CMPL, body)
    assert r.status_code == 200 and done and stream_text(payloads) == (text, ["stop"])
    rf = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    out = client.completions.create(model="base", prompt=PROMPTS[2], max_tokens=60, temperature=0.7, seed=3,
                                    extra_body={"response_format": rf})
    jsonschema.validate(json.loads(out.choices[0].text), schema)
    close = {str(refs.tokenizer.convert_tokens_to_ids(t)): 4 for t in ('"', "}")}  # a random model's object: lean to closing
    obj = client.chat.completions.create(model="tenant-2", messages=MSGS, max_tokens=300, temperature=0,
                                         response_format={"type": "json_object"}, logit_bias=close)
    assert obj.choices[0].finish_reason == "stop" and isinstance(json.loads(obj.choices[0].message.content), dict)


def test_echo_and_best_of_over_http(http, refs):
    """echo: the prompt before the text and, with logprobs, the prompt's tokens first (the first one
    null) equal to PEFT's log-softmax; streamed the same. best_of: the n most likely of best_of
    sequences (the same ones n=best_of with that seed returns), best first; usage counts all."""
    import torch

    body = greedy("tenant-1", 4, prompt=PROMPTS[0], logprobs=1, echo=True)
    r = http.post(CMPL, json=body)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    ids = refs.prompt_ids(PROMPTS[0])
    assert c["text"] == PROMPTS[0] + refs.text("tenant-1", PROMPTS[0], 4)
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 4
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    full = ids + refs.tokens("tenant-1", ids, 4)
    with torch.inference_mode():
        ref = torch.log_softmax(refs._model("tenant-1")(input_ids=torch.tensor([full])).logits[0].float(), -1)
    for t in range(1, len(full)):
        assert lp["token_logprobs"][t] == pytest.approx(float(ref[t - 1, full[t]]), abs=1e-4), t
    r, payloads, done = post_stream(http, CMPL, body)
    assert r.status_code == 200 and done
    streamed = [v for p in payloads for ch in p["choices"] if ch.get("logprobs") for v in ch["logprobs"]["token_logprobs"]]
    assert stream_text(payloads)[0] == c["text"] and streamed == lp["token_logprobs"]
    r = http.post(CMPL, json=greedy("base", 2, prompt=[5, 6, 7], echo=True))  # token IDs: the decoded prompt
    assert r.json()["choices"][0]["text"] == refs.decode([5, 6, 7]) + refs.decode(refs.tokens("base", [5, 6, 7], 2))

    sampled = {"model": "tenant-2", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 1.0, "seed": 11,
               "ignore_eos": True, "logprobs": 0}
    four = http.post(CMPL, json={**sampled, "n": 4}).json()["choices"]
    score = {c["text"]: sum(c["logprobs"]["token_logprobs"]) for c in four}
    best = http.post(CMPL, json={**sampled, "n": 2, "best_of": 4}).json()
    assert [c["text"] for c in best["choices"]] == sorted(score, key=lambda t: -score[t])[:2]
    assert [c["index"] for c in best["choices"]] == [0, 1] and best["usage"]["completion_tokens"] == 4 * 6
    plain = http.post(CMPL, json={**sampled, "n": 1, "best_of": 4, "logprobs": None}).json()
    assert plain["choices"][0]["text"] == max(score, key=score.get) and plain["choices"][0]["logprobs"] is None


def test_server_still_serves_after_errors(http, refs):
    r = http.post(CMPL, json=greedy("tenant-1", 5, prompt=PROMPTS[2]))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == refs.text("tenant-1", PROMPTS[2], 5)
    stats = lora_stats()
    assert stats["running"] == 0 and stats["lora"]["retired_pinned"] == 0, stats


# ---- 7. headers, health, model list -------------------------------------------------------------


def test_served_by_header_health_and_models(serve_env, http):
    r = http.post(CMPL, json=greedy("tenant-0", 3, prompt="x"))
    assert r.status_code == 200 and r.headers["x-served-by"] == "lora"
    r = http.post(CHAT, json=greedy("tenant-0", 3, messages=MSGS))
    assert r.status_code == 200 and r.headers["x-served-by"] == "lora"
    for path, body in [(CMPL, greedy("base", 3, prompt="x")), (CHAT, greedy("tenant-1", 3, messages=MSGS))]:
        with http.stream("POST", path, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["x-served-by"] == "lora"
            assert r.headers["content-type"].startswith("text/event-stream")
            r.read()
    r = http.post(CMPL, json={"model": "no-such-tenant", "prompt": "x"})
    assert r.status_code == 404 and r.headers.get("x-served-by") == "lora"

    r = http.get("/health")
    assert r.status_code == 200

    r = http.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == serve_env.models
    by_id = {m["id"]: m for m in body["data"]}
    assert all(by_id[a]["parent"] == "base" for a in serve_env.assets.adapter_ids)
    assert by_id["base"]["parent"] is None
