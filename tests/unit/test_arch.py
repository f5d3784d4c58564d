"""The architecture registry (engine/arch/): what is served, and what is refused at load."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from serve_app.config import EngineConfig
from serve_app.engine import arch
from serve_app.engine.arch.base import BaseShape
from serve_app.engine.config import LORA_TARGET_KINDS
from serve_app.engine.loader import load_base_model


def test_registry_serves_the_llama_layout_families():
    assert arch.supported() == ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
    assert LORA_TARGET_KINDS == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name in arch.supported():
        spec = arch.get_arch(name)
        assert set(spec.input_groups) == set(spec.lora_kinds) and name in spec.names
    assert arch.get_arch("Qwen3ForCausalLM").qk_norm and not arch.get_arch("LlamaForCausalLM").qk_norm


def test_peft_names():
    spec = arch.get_arch(BaseShape(num_layers=1, kinds={}).arch)  # a hand-made shape: the Llama layout
    assert spec.peft_module_name(3, "down_proj") == "model.layers.3.mlp.down_proj"
    assert spec.peft_module_name(0, "q_proj") == "model.layers.0.self_attn.q_proj"
    assert spec.parse_peft_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight") == (3, "q_proj", "A")
    assert spec.parse_peft_key("base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight") == (1, "up_proj", "B")
    assert spec.parse_peft_key("base_model.model.lm_head.lora_A.weight") is None


def test_unknown_architecture_is_refused_before_loading(tiny_assets, tmp_path):
    base = tmp_path / "gemma"
    shutil.copytree(tiny_assets.base, base)
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    cfg["architectures"] = ["GemmaForCausalLM"]
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(arch.UnsupportedArchitectureError) as e:
        load_base_model(EngineConfig(model=str(base)))
    msg = str(e.value)
    assert "'GemmaForCausalLM'" in msg and "LlamaForCausalLM" in msg and "serve_app/engine/arch/" in msg


def test_sliding_window_beyond_the_context_is_refused():
    mistral = arch.get_arch("MistralForCausalLM")
    mistral.check(SimpleNamespace(sliding_window=4096), 4096)
    mistral.check(SimpleNamespace(sliding_window=None), 32768)
    with pytest.raises(ValueError, match="max_model_len <= 4096"):
        mistral.check(SimpleNamespace(sliding_window=4096), 8192)
    arch.get_arch("Qwen2ForCausalLM").check(SimpleNamespace(sliding_window=4096, use_sliding_window=False), 8192)
    arch.get_arch("LlamaForCausalLM").check(SimpleNamespace(), 1 << 20)
