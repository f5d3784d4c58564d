"""The prompt is tokenized once: where the router counts its tokens (a limit needs them), it sends
the token IDs it made, and the replica generates from them without tokenizing again.

The real router (admission, serving, forwarding, streams) and the real LoRA replica code
(``LoRADeployment`` and its channels) on the real engine, over test_batch_cancel's in-process
stand-in for Serve's handle calls. Each request runs twice, with a limit that needs prompt
token counts (IDs forwarded) and without any (text and chat messages forwarded as sent): the
answers are the same, streamed or not, echoed prompt and logprobs included.
"""

from __future__ import annotations

import json
import types

import pytest
from fastapi.testclient import TestClient
from ray import serve

from serve_app import metrics
from serve_app.api.chat import chat_prompt_ids
from serve_app.deployments.lora import LoRADeployment
from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from serve_app.router import ingress
from serve_app.router.auth import Authenticator
from serve_app.router.limits import LimitsConfig, TenantLimiter
from serve_app.router.streams import ChannelHub
from tests.unit.test_batch_cancel import FakeHandle, _Metric

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]


class _Replica(LoRADeployment):
    """The real request path of a LoRA replica, none of its adapter machinery; the engine is the
    module's (a replica's ``__del__`` would shut it down)."""

    def __init__(self, engine):  # noqa: super().__init__ is the Serve replica's setup
        self.engine = engine

    def _start_background(self):
        pass

    def _replica_unique_id(self):
        return "replica-1"

    def __del__(self):
        pass


@pytest.fixture(scope="module")
def engine(tiny_assets):
    # One sequence at a time and no prefix cache: each run computes every row alone and from scratch,
    # so the two runs' logprobs are bit-equal (not a batch's or a cache hit's float differences).
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=16, max_num_seqs=1,
                                  enable_prefix_caching=False))
    yield eng
    eng.shutdown()


@pytest.fixture
def served(monkeypatch, tiny_assets, engine):
    """(client, use_limits, submitted): ``use_limits(on)`` switches the router between a limit that
    needs token counts and none; ``submitted`` records each prompt the engine was given."""
    for name in ("REQUESTS", "ROUTER_PATH", "LATENCY", "TTFT", "GENERATED_TOKENS"):
        monkeypatch.setattr(metrics, name, _Metric())
    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: "")
    submitted: list = []
    submit = engine.submit

    def recording_submit(prompt, *args, **kwargs):
        submitted.append(prompt)
        return submit(prompt, *args, **kwargs)

    monkeypatch.setattr(engine, "submit", recording_submit)
    router = object.__new__(ingress.Router.__mro__[1])
    router.auth = Authenticator(enabled=False)
    router.lora = FakeHandle(_Replica(engine))
    router.merged = None
    router.admin = types.SimpleNamespace(resolve=lambda n: f"{n}@v1", model_ids=lambda: [])
    router.base_model_name = "base"
    router.default_max_tokens = 8
    router.promoter = None
    router.streams = ChannelHub(key="router-1")
    router._handles = {}

    def use_limits(on: bool) -> None:
        # Off: not even the response size cap counts an echoed prompt's tokens.
        cfg = LimitsConfig(max_prompt_tokens=1000) if on else LimitsConfig(max_logprob_entries=None)
        router.limiter = TenantLimiter.from_config(cfg, tokenizer_path=str(tiny_assets.base), max_num_seqs=8)

    use_limits(False)
    monkeypatch.setitem(ingress._EDGE, "auth", router.auth)
    monkeypatch.setitem(ingress._EDGE, "max_body_bytes", LimitsConfig().max_body_bytes)
    monkeypatch.setattr(serve, "get_replica_context",
                        lambda: types.SimpleNamespace(servable_object=router, replica_id="replica-1"))
    with TestClient(ingress.app, raise_server_exceptions=False) as client:
        yield client, use_limits, submitted


def _answer(r) -> object:
    """A response without what differs from call to call: ids, timestamps, and for a stream where
    its chunks split the text (they are cut by time): each choice's text, logprobs and end."""
    assert r.status_code == 200, r.text
    if not r.headers["content-type"].startswith("text/event-stream"):
        return {k: v for k, v in r.json().items() if k not in ("id", "created")}
    choices: dict[int, dict] = {}
    for line in r.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for c in json.loads(line[len("data: "):])["choices"]:
            got = choices.setdefault(c["index"], {"text": "", "logprobs": [], "finish_reason": None})
            got["text"] += c.get("text") or (c.get("delta") or {}).get("content") or ""
            got["logprobs"].append(c["logprobs"])
            got["finish_reason"] = c["finish_reason"] or got["finish_reason"]
    for got in choices.values():
        got["logprobs"] = _joined([lp for lp in got["logprobs"] if lp])
    return choices


def _joined(parts: list[dict]) -> dict:
    """One choice's streamed logprobs, concatenated (completions: per field; chat: its content);
    text offsets depend on where the chunks were cut, so they are left out."""
    out: dict = {}
    for lp in parts:
        for k, v in lp.items():
            if k != "text_offset" and isinstance(v, list):
                out.setdefault(k, []).extend(v)
    return out


@pytest.mark.parametrize("path, body", [
    (CMPL, {"prompt": ["hello world", "the quick brown fox"], "echo": True, "logprobs": 2}),
    (CMPL, {"prompt": [[5, 6, 7], [8, 9]], "echo": True, "logprobs": 1}),
    (CMPL, {"prompt": "hello world", "n": 2, "seed": 7, "temperature": 1.0}),
    (CMPL, {"prompt": ["hello world", "a b c"], "stream": True}),
    (CMPL, {"prompt": "hello world", "stream": True, "echo": True, "logprobs": 1}),
    (CHAT, {"messages": MSGS, "logprobs": True, "top_logprobs": 2}),
    (CHAT, {"messages": MSGS, "n": 2, "stream": True}),
])
def test_forwarded_token_ids_answer_as_the_text_does(served, tiny_assets, path, body):
    from transformers import AutoTokenizer

    client, use_limits, submitted = served
    body = {"model": "base", "max_tokens": 6, "temperature": 0, **body}
    answers = {}
    for on in (False, True):
        use_limits(on)
        submitted.clear()
        answers[on] = _answer(client.post(path, json=body))
        if on:  # the replica got token IDs only: the router's, made with the model's tokenizer
            tok = AutoTokenizer.from_pretrained(str(tiny_assets.base))
            if path == CHAT:
                want = [chat_prompt_ids(tok, MSGS)] * body.get("n", 1)
            else:
                prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
                want = [p if isinstance(p, list) else tok(p)["input_ids"] for p in prompts for _ in range(body.get("n", 1))]
            assert submitted == want
        elif path == CMPL and "hello world" in str(body["prompt"]):
            assert all(isinstance(p, str) for p in submitted)  # nothing needs the counts: the text as sent
    assert answers[True] == answers[False]
