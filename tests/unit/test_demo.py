"""serve_app.demo: offline, deterministic, cached demo assets (tiny shapes to stay fast)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from serve_app import demo
from serve_app.demo import DemoAssets, build_demo_assets

SMALL = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=2, vocab_size=512)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> DemoAssets:
    return build_demo_assets(tmp_path_factory.mktemp("demo"), num_adapters=3, **SMALL)


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.base)


@pytest.fixture(scope="module")
def base_model(assets):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(assets.base).eval()


def _greedy(model, tokenizer, prompt: str = PROMPT, n: int = 12) -> tuple[list[int], torch.Tensor]:
    x = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=n, do_sample=False)
        logits = model(**x).logits[0, -1]
    return out[0, x["input_ids"].shape[1] :].tolist(), logits


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout(assets):
    assert assets.adapter_ids == ["tenant-0", "tenant-1", "tenant-2"]
    assert assets.base == assets.root / "demo-base"
    assert (assets.root / ".complete").is_file()
    for name in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert (assets.base / name).is_file(), name
    for aid in assets.adapter_ids:
        assert assets.adapter_path(aid) == assets.adapters_dir / aid
        assert (assets.adapter_path(aid) / "adapter_config.json").is_file()
        assert (assets.adapter_path(aid) / "adapter_model.safetensors").is_file()
    # Nothing left over from the temp-dir-and-rename dance.
    assert [p.name for p in assets.root.parent.iterdir()] == [assets.root.name]


def test_base_config(assets, tokenizer, base_model):
    cfg = base_model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 2)
    assert cfg.tie_word_embeddings is False
    assert cfg.max_position_embeddings == 2048
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert len(tokenizer) == cfg.vocab_size == base_model.get_input_embeddings().weight.shape[0] == 512
    assert base_model.dtype == torch.float32


def test_tokenizer(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) == (
        "<s>",
        "</s>",
        "<unk>",
        "<pad>",
    )
    assert tokenizer.chat_template is None  # the server must fall back to its own default

    text = "héllo 日本語 🙂"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids[1:]) == text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]
    # Byte-level: a character never seen in training still encodes (as several byte tokens).
    rare = tokenizer("𝔘", add_special_tokens=False)["input_ids"]
    assert len(rare) > 1 and tokenizer.unk_token_id not in rare
    assert tokenizer.decode(rare) == "𝔘"


def test_adapters_load_and_change_outputs(assets, tokenizer, base_model):
    from peft import PeftModel

    base_tokens, base_logits = _greedy(base_model, tokenizer)
    # The base itself should not collapse into repeating one token.
    assert len(set(base_tokens)) > 3, tokenizer.decode(base_tokens)

    seen = [base_tokens]
    for aid in assets.adapter_ids:
        cfg = json.loads((assets.adapter_path(aid) / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "demo-base"
        assert cfg["init_lora_weights"] is False
        model = PeftModel.from_pretrained(copy.deepcopy(base_model), assets.adapter_path(aid)).eval()
        tokens, logits = _greedy(model, tokenizer)
        assert (logits - base_logits).abs().max().item() > 0.1, aid
        assert tokens != base_tokens, aid
        seen.append(tokens)
    assert len({tuple(t) for t in seen}) == len(seen)  # tenants differ from each other too


def test_default_ranks_and_targets(assets):
    for i, aid in enumerate(assets.adapter_ids):
        cfg = json.loads((assets.adapter_path(aid) / "adapter_config.json").read_text())
        r = 8 if i % 2 == 0 else 16
        assert (cfg["r"], cfg["lora_alpha"]) == (r, 2 * r)
        assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_deterministic(assets, tmp_path):
    again = build_demo_assets(tmp_path, num_adapters=3, **SMALL)
    assert again.root.name == assets.root.name and again.root != assets.root
    a, b = _files(assets.root), _files(again.root)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], f"{name} differs between two builds"


def test_cache_hit_and_force(assets):
    weights = assets.base / "model.safetensors"
    before = (weights.stat().st_mtime_ns, weights.stat().st_ino)
    again = build_demo_assets(assets.root.parent, num_adapters=3, **SMALL)
    assert again == assets
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == before

    rebuilt = build_demo_assets(assets.root.parent, num_adapters=3, force=True, **SMALL)
    assert rebuilt == assets
    assert weights.stat().st_ino != before[1]  # a fresh folder was swapped in
    assert [p.name for p in assets.root.parent.iterdir()] == [assets.root.name]


def test_overrides(assets, tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    built = build_demo_assets(
        tmp_path,
        num_adapters=3,
        ranks=[4],
        target_modules=[["q_proj", "v_proj"], ["o_proj"]],
        chat_template=template,
        **SMALL,
    )
    assert built.root.name != assets.root.name  # different parameters, different cache folder
    expected = [["q_proj", "v_proj"], ["o_proj"], ["q_proj", "v_proj"]]
    for aid, targets in zip(built.adapter_ids, expected):
        cfg = json.loads((built.adapter_path(aid) / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)
        assert sorted(cfg["target_modules"]) == sorted(targets)

        with safe_open(built.adapter_path(aid) / "adapter_model.safetensors", "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        assert {k.split(".")[-3] for k in shapes} == set(targets)  # ...<module>.lora_A.weight
        # lora_A is (r, in), lora_B is (out, r).
        assert all(shape[0 if ".lora_A." in k else 1] == 4 for k, shape in shapes.items())

    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(built.base).chat_template == template


def test_env_default_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_APP_DEMO_DIR", str(tmp_path))
    built = build_demo_assets(num_adapters=0, **SMALL)
    assert built.root.parent == tmp_path
    assert built.adapter_ids == []
    assert (built.root / ".complete").is_file()


def test_publish_loses_race(tmp_path):
    # Another builder renamed its complete folder into place while we were building ours.
    final = tmp_path / "assets"
    final.mkdir()
    (final / "winner").write_text("1")
    (final / demo.MARKER).write_text("{}")
    ours = tmp_path / ".assets.tmp-x"
    ours.mkdir()
    (ours / "loser").write_text("1")
    demo._publish(ours, final, replace=False)
    assert (final / "winner").exists() and not (final / "loser").exists()


def test_publish_replaces_incomplete(tmp_path):
    final = tmp_path / "assets"
    final.mkdir()
    (final / "stale").write_text("1")  # no marker: e.g. left behind by hand
    ours = tmp_path / ".assets.tmp-x"
    ours.mkdir()
    (ours / demo.MARKER).write_text("{}")
    demo._publish(ours, final, replace=False)
    assert (final / demo.MARKER).exists() and not (final / "stale").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["assets"]


def test_bad_args(tmp_path):
    with pytest.raises(ValueError):
        build_demo_assets(tmp_path, **{**SMALL, "vocab_size": 100})
    with pytest.raises(ValueError):
        build_demo_assets(tmp_path, ranks=[], **SMALL)
    with pytest.raises(ValueError):
        build_demo_assets(tmp_path, **{**SMALL, "num_heads": 3})
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path, capsys):
    demo.main(["--out", str(tmp_path), "--num-adapters", "0"])
    out = capsys.readouterr().out
    (root,) = tmp_path.iterdir()  # W1 shapes
    assert f"base:         {root / 'demo-base'}" in out
    assert json.loads((root / "demo-base" / "config.json").read_text())["vocab_size"] == 8192
