"""The engine against plain PEFT on the same files: every adapter, mixed batches, eviction."""

from __future__ import annotations

import json
import random
import shutil
import threading

import pytest
import torch

from serve_app.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.sampling import SamplingParams
from serve_app.errors import AdapterNotFoundError, InvalidAdapterError, InvalidRequestError
from tests.helpers import peft_model, reference_greedy, reference_logits

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def prompts(n: int, seed: int = 0, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, vocab) for _ in range(rng.randrange(3, 14))] for _ in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_assets):
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=32))
    for aid in tiny_assets.adapter_ids:
        eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def references(tiny_assets):
    """Greedy tokens per (adapter or None) for a fixed prompt set, from plain PEFT."""
    ps = prompts(3)
    refs = {}
    for aid in [None, *tiny_assets.adapter_ids]:
        model = peft_model(tiny_assets.base, None if aid is None else tiny_assets.adapters_dir / aid)
        refs[aid] = [reference_greedy(model, p, GREEDY.max_tokens) for p in ps]
    return ps, refs


def test_every_adapter_matches_peft_greedy_and_logits(engine, tiny_assets, references):
    ps, refs = references
    for aid in [None, *tiny_assets.adapter_ids]:
        outs = engine.generate_batch([(p, GREEDY, aid) for p in ps])
        assert [o.token_ids for o in outs] == refs[aid], f"greedy tokens differ from PEFT for {aid}"

    # Logits of the prompt's last position, engine vs PeftModel, fp32.
    for aid in tiny_assets.adapter_ids:
        model = peft_model(tiny_assets.base, tiny_assets.adapters_dir / aid)
        res = engine.lora.acquire(aid)
        try:
            ours = engine.runner.prefill([ps[0]], 0, engine.lora.prepare([res]))[0]
        finally:
            engine.lora.release(res)
        ref = reference_logits(model, ps[0])
        assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (aid, (ours - ref).abs().max())
        base_ref = reference_logits(peft_model(tiny_assets.base, None), ps[0])
        assert (ref - base_ref).abs().max() > 1e-2, f"{aid} does not change the base's logits"


def test_mixed_batch_equals_each_request_alone(engine, tiny_assets, references):
    ps, refs = references
    # 8 adapters (ranks 4/8/16/32; attention, attention+MLP, q/v, o/down) plus base rows, shuffled.
    work = [(pi, aid) for aid in [None, *tiny_assets.adapter_ids] for pi in range(len(ps))]
    random.Random(1).shuffle(work)
    outs = engine.generate_batch([(ps[pi], GREEDY, aid) for pi, aid in work])
    for (pi, aid), out in zip(work, outs):
        assert out.token_ids == refs[aid][pi], f"row for adapter {aid} prompt {pi} differs in the mixed batch"


def test_requests_join_a_running_batch(engine, tiny_assets, references):
    ps, refs = references
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    first_token = threading.Event()
    results = {}

    def sink(out):
        first_token.set()
        if out.finished:
            results["long"] = out

    engine.add_request(ps[0], long, "tenant-1", sink)
    assert first_token.wait(30)
    # These arrive while the long request is mid-generation and join its batch.
    outs = engine.generate_batch([(ps[1], GREEDY, aid) for aid in tiny_assets.adapter_ids])
    for aid, out in zip(tiny_assets.adapter_ids, outs):
        assert out.token_ids == refs[aid][1]


def test_streamed_text_equals_full_text_and_finish_reasons(engine):
    p = prompts(1, seed=5)[0]
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    chunks = []
    done = threading.Event()

    def sink(out):
        chunks.append(out)
        if out.finished:
            done.set()

    engine.add_request(p, sp, "tenant-2", sink)
    assert done.wait(30)
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == 20 and chunks[-1].finish_reason == "length"
    assert "".join(c.text for c in chunks) == engine.tokenizer.decode(tokens, skip_special_tokens=True)

    # A stop sequence taken from the greedy text itself must cut the output right before it.
    full = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    out = engine.generate_batch([(p, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop]), "tenant-2")])[0]
    assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]


def test_eos_stops_unless_ignored(engine):
    eos = next(iter(engine.eos_ids))
    p = prompts(1, seed=9)[0]
    sp = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[])
    # Force EOS by making it a stop token id: the first generated token ends the request.
    first = engine.generate_batch([(p, SamplingParams(max_tokens=1, temperature=0.0), None)])[0].token_ids[0]
    out = engine.generate_batch([(p, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first]), None)])[0]
    assert out.finish_reason == "stop" and out.token_ids == [first] and out.text == ""
    assert engine.generate_batch([(p, sp, None)])[0].finish_reason in ("stop", "length")
    assert eos in engine.eos_ids


def test_sampling_seed_is_reproducible_and_independent_of_batch(engine, tiny_assets):
    p = prompts(1, seed=3)[0]
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate_batch([(p, sp, "tenant-3")])[0].token_ids
    crowd = [(q, SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True), a)
             for q, a in zip(prompts(6, seed=4), tiny_assets.adapter_ids)]
    batched = engine.generate_batch([*crowd, (p, sp, "tenant-3")])[-1].token_ids
    assert alone == batched
    other = engine.generate_batch([(p, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=99,
                                                       ignore_eos=True), "tenant-3")])[0].token_ids
    assert other != alone
    greedy = engine.generate_batch([(p, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), "tenant-3")])[0]
    topk1 = engine.generate_batch([(p, SamplingParams(max_tokens=16, temperature=0.7, top_k=1, ignore_eos=True), "tenant-3")])[0]
    assert greedy.token_ids == topk1.token_ids


def test_eviction_while_running_keeps_output_and_memory_pinned(tiny_assets, references):
    ps, refs = references
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=8))
    try:
        a0 = tiny_assets.adapter_ids[3]  # rank 32: many rows to reuse
        res = eng.load_adapter(a0, str(tiny_assets.adapters_dir / a0))
        pinned_rows = {k: set(v.tolist()) for k, v in res.rows.items()}
        sp = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0.0, ignore_eos=True)
        chunks, started, done = [], threading.Event(), threading.Event()
        gate = threading.Event()

        def sink(out):
            chunks.append(out)
            started.set()
            if out.finished:
                done.set()
            gate.wait(10)  # hold the engine after the first token until the eviction is done

        eng.add_request(ps[0], sp, a0, sink)
        assert started.wait(30)
        eng.unload_adapter(a0)  # the LRU above evicts it mid-sequence
        assert a0 not in eng.lora.resident_ids()
        # New adapters, incl. a fresh copy of the same ID, must not land in the pinned rows.
        for aid in tiny_assets.adapter_ids:
            new = eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))
            for kind, rows in new.rows.items():
                assert not (set(rows.tolist()) & pinned_rows.get(kind, set())), f"{aid} reused pinned rows"
        gate.set()
        assert done.wait(30)
        assert [t for c in chunks for t in c.token_ids] == refs[a0][0]
        # Once the sequence finished, the old version's rows are free again.
        assert res.freed and eng.lora.stats()["retired_pinned"] == 0
        with pytest.raises(Exception, match="unloaded"):
            eng.lora.acquire(res)
    finally:
        eng.shutdown()


def test_memory_per_adapter_close_to_raw_bytes(engine):
    for aid in engine.lora.resident_ids():
        res = engine.lora.current(aid)
        assert res.nbytes <= 1.10 * res.raw_bytes, (aid, res.nbytes, res.raw_bytes)
    stats = engine.lora.stats()
    total_raw = sum(engine.lora.current(a).raw_bytes for a in engine.lora.resident_ids())
    assert stats["bytes_used"] <= 1.10 * total_raw


def test_invalid_requests(engine):
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=engine.max_model_len), None, lambda o: None)
    with pytest.raises(InvalidRequestError, match="out of range"):
        engine.add_request([1, 10**6], GREEDY, None, lambda o: None)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request([], GREEDY, None, lambda o: None)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_nf4_base_with_adapter_runs_and_differs(tiny_assets):
    pytest.importorskip("bitsandbytes")
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), quantization="nf4", max_lora_rank=32))
    try:
        aid = tiny_assets.adapter_ids[1]
        eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))
        from bitsandbytes.nn import Linear4bit

        assert isinstance(eng.model.model.layers[0].self_attn.q_proj.base, Linear4bit)
        p = prompts(1, seed=11)[0]
        base, tuned = eng.generate_batch([(p, GREEDY, None), (p, GREEDY, aid)])
        assert len(tuned.token_ids) == GREEDY.max_tokens
        assert base.token_ids != tuned.token_ids
    finally:
        eng.shutdown()


# ---- bad adapter folders -------------------------------------------------------------------------


def _copy_adapter(tiny_assets, tmp_path, idx=0):
    dst = tmp_path / "bad"
    shutil.copytree(tiny_assets.adapters_dir / tiny_assets.adapter_ids[idx], dst)
    return dst


def _rewrite_weights(path, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    save_file(fn(tensors), path / "adapter_model.safetensors")


def test_bad_adapter_folders(engine, tiny_assets, tmp_path):
    with pytest.raises(AdapterNotFoundError, match="'ghost' not found"):
        engine.load_adapter("ghost", str(tmp_path / "nope"))

    bad = _copy_adapter(tiny_assets, tmp_path)
    (bad / "adapter_config.json").unlink()
    with pytest.raises(InvalidAdapterError, match="'bad'.*adapter_config.json is missing"):
        engine.load_adapter("bad", str(bad))
    shutil.rmtree(bad)

    bad = _copy_adapter(tiny_assets, tmp_path)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapterError, match="not valid JSON"):
        engine.load_adapter("bad", str(bad))
    shutil.rmtree(bad)

    bad = _copy_adapter(tiny_assets, tmp_path)
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    with pytest.raises(InvalidAdapterError, match="pickle file and is refused"):
        engine.load_adapter("bad", str(bad))
    shutil.rmtree(bad)

    bad = _copy_adapter(tiny_assets, tmp_path)
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidAdapterError, match="adapter_model.safetensors is missing"):
        engine.load_adapter("bad", str(bad))
    shutil.rmtree(bad)

    bad = _copy_adapter(tiny_assets, tmp_path)
    _rewrite_weights(bad, lambda t: {k: (torch.zeros(v.shape[0], v.shape[1] + 8) if "lora_A" in k else v) for k, v in t.items()})
    with pytest.raises(InvalidAdapterError, match="do not fit the base projection"):
        engine.load_adapter("bad", str(bad))
    shutil.rmtree(bad)

    bad = _copy_adapter(tiny_assets, tmp_path, idx=3)  # rank 32
    small = LoRAEngine.__new__(LoRAEngine)  # reuse the loaded model, only the limit differs
    small.__dict__.update(engine.__dict__)
    small.config = engine.config.model_copy(update={"max_lora_rank": 16})
    with pytest.raises(InvalidAdapterError, match="LoRA rank 32 is greater than max_lora_rank 16"):
        small.load_adapter("bad", str(bad))
    shutil.rmtree(bad)

    bad = _copy_adapter(tiny_assets, tmp_path)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidAdapterError, match=r"target modules \['c_attn'\]"):
        engine.load_adapter("bad", str(bad))
    shutil.rmtree(bad)

    bad = _copy_adapter(tiny_assets, tmp_path)
    _rewrite_weights(bad, lambda t: {k.replace("q_proj", "qkv_proj"): v for k, v in t.items()})
    with pytest.raises(InvalidAdapterError, match="qkv_proj"):
        engine.load_adapter("bad", str(bad))
    shutil.rmtree(bad)

    bad = _copy_adapter(tiny_assets, tmp_path)

    def poison(t):
        k = sorted(t)[0]
        t[k] = t[k].clone()
        t[k][0, 0] = float("nan")
        return t

    _rewrite_weights(bad, poison)
    with pytest.raises(InvalidAdapterError, match="'bad'.*NaN or inf"):
        engine.load_adapter("bad", str(bad))

    # None of that disturbed the adapters already served.
    assert "bad" not in engine.lora.resident_ids()
    assert len(engine.lora.resident_ids()) == len(tiny_assets.adapter_ids)


def test_kv_cache_growth_then_compaction(engine, tiny_assets):
    """A long request grows the KV cache; rows finishing at different steps then move slots."""
    long_prompt = [1] + [random.Random(21).randrange(4, 512) for _ in range(300)]  # > 256: the cache grows
    work = [(long_prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), "tenant-1")]
    work += [(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), aid)
             for p, n, aid in zip(prompts(6, seed=22), [2, 9, 3, 7, 5, 11], tiny_assets.adapter_ids)]
    batched = engine.generate_batch(work)
    alone = [engine.generate_batch([w])[0] for w in work]
    assert engine.runner.capacity > 256
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
