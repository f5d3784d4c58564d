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
            ours = engine.prefill([ps[0]], engine.lora.prepare([res]))[0]
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
    """Requests admitted while another is decoding: the running row's KV slot must survive the
    joiners' prefill (the classic continuous-batching bug), and every row matches PEFT."""
    ps, refs = references
    n_long = 200  # far more steps than the joiners' 12 tokens: it is still running when they finish
    long = SamplingParams(max_tokens=n_long, temperature=0.0, ignore_eos=True)
    first_token, done = threading.Event(), threading.Event()
    chunks = []

    def sink(out):
        chunks.append(out)
        first_token.set()
        if out.finished or out.error is not None:
            done.set()

    engine.add_request(ps[0], long, "tenant-1", sink)
    assert first_token.wait(30)
    # These arrive while the long request is mid-generation and join its batch.
    outs = engine.generate_batch([(ps[1], GREEDY, aid) for aid in tiny_assets.adapter_ids])
    still_running, produced = not done.is_set(), sum(len(c.token_ids) for c in list(chunks))
    assert still_running, f"the long request finished ({produced} tokens) before the joiners did; raise n_long"
    for aid, out in zip(tiny_assets.adapter_ids, outs):
        assert out.token_ids == refs[aid][1], f"joiner {aid} differs from PEFT"
    assert done.wait(60)
    assert chunks[-1].error is None and chunks[-1].finish_reason == "length"
    got = [t for c in chunks for t in c.token_ids]
    ref = reference_greedy(peft_model(tiny_assets.base, tiny_assets.adapters_dir / "tenant-1"), ps[0], n_long)
    assert got == ref, f"the running request changed when others joined: first divergence at {_diverge(got, ref)}"


def _diverge(a: list[int], b: list[int]) -> int | None:
    """Index of the first difference between two token lists (None if equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


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


@pytest.fixture(scope="module")
def eos_engine(tiny_assets, tmp_path_factory):
    """An engine on a copy of the TINY base whose generation_config EOS is the greedy first token
    of ``EOS_PROMPT`` (found with plain transformers), so greedy decoding really produces EOS."""
    base = tmp_path_factory.mktemp("eos-base") / "base"
    shutil.copytree(tiny_assets.base, base)
    first = reference_greedy(peft_model(tiny_assets.base, None), EOS_PROMPT, 1)[0]
    gen_path = base / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    gen["eos_token_id"] = first
    gen_path.write_text(json.dumps(gen))
    eng = LoRAEngine(EngineConfig(model=str(base), max_lora_rank=32, max_num_seqs=4))
    yield eng, first
    eng.shutdown()


EOS_PROMPT = prompts(1, seed=9)[0]


def test_eos_stops_unless_ignored(eos_engine):
    eng, eos = eos_engine
    assert eos in eng.eos_ids, (eos, eng.eos_ids)
    assert eos not in eng.tokenizer.all_special_ids, "pick a prompt whose greedy first token is an ordinary one"
    assert eng.tokenizer.decode([eos]), "the EOS token must have text, so text == '' below means it was dropped"
    # EOS generated: the request stops at once, the EOS token is reported and adds no text.
    out = eng.generate_batch([(EOS_PROMPT, SamplingParams(max_tokens=8, temperature=0.0), None)])[0]
    assert out.finish_reason == "stop" and out.token_ids == [eos] and out.text == "", out
    # ignore_eos: EOS is generated and decoding goes on to exactly max_tokens.
    out = eng.generate_batch([(EOS_PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), None)])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8 and out.token_ids[0] == eos, out
    # An explicit stop token ID stops too (without EOS involved).
    ref = reference_greedy(eng_peft_base(eng), EOS_PROMPT, 3)
    out = eng.generate_batch([(EOS_PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                                          stop_token_ids=[ref[2]]), None)])[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(ref[2]) + 1], (out, ref)


def eng_peft_base(eng):
    return peft_model(eng.config.model, None)


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


def test_eviction_while_running_keeps_output_and_memory_pinned(tiny_assets):
    """LRU eviction of an adapter a request is decoding with: the request keeps its rows (new
    loads never land in them) and its output equals PEFT's; the rows free when it finishes."""
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=8))
    try:
        a0 = tiny_assets.adapter_ids[3]  # rank 32: many rows to reuse
        prompt = prompts(1, seed=0)[0]
        n = 200  # every load below takes one engine iteration (one token): 200 leaves a wide margin
        ref = reference_greedy(peft_model(tiny_assets.base, tiny_assets.adapters_dir / a0), prompt, n)
        res = eng.load_adapter(a0, str(tiny_assets.adapters_dir / a0))
        pinned_rows = {k: set(v.tolist()) for k, v in res.rows.items()}
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        chunks, started, done = [], threading.Event(), threading.Event()

        def sink(out):  # never blocks: the loads below need the engine thread
            chunks.append(out)
            started.set()
            if out.finished or out.error is not None:
                done.set()

        eng.add_request(prompt, sp, a0, sink)
        assert started.wait(30)
        eng.unload_adapter(a0)  # the LRU above evicts it mid-sequence
        assert a0 not in eng.lora.resident_ids()
        # New adapters, incl. a fresh copy of the same ID, must not land in the pinned rows.
        for aid in tiny_assets.adapter_ids:
            new = eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))
            for kind, rows in new.rows.items():
                assert not (set(rows.tolist()) & pinned_rows.get(kind, set())), f"{aid} reused pinned rows"
        produced = sum(len(c.token_ids) for c in list(chunks))
        assert not done.is_set(), f"the request finished ({produced} tokens) before the last load; raise n"
        assert not res.freed and eng.lora.stats()["retired_pinned"] == 1, eng.lora.stats()
        assert done.wait(60)
        got = [t for c in chunks for t in c.token_ids]
        assert chunks[-1].error is None and got == ref, f"output changed after eviction at {_diverge(got, ref)}"
        # Once the sequence finished, the old version's rows are free again.
        assert res.freed and eng.lora.stats()["retired_pinned"] == 0
        with pytest.raises(Exception, match="unloaded"):
            eng.lora.acquire(res)
    finally:
        eng.shutdown()


def _pool_allocated(lora) -> dict[str, int]:
    """Bytes the row pool really holds per kind: its A and B tensors, whatever is in use."""
    return {k: lora._a[k].numel() * lora._a[k].element_size() + lora._b[k].numel() * lora._b[k].element_size()
            for k in lora._a}


def test_pool_rows_equal_ranks_and_allocation_at_a_stated_fill(engine, tiny_assets):
    """Rows in use per kind == the sum of the resident adapters' ranks on that kind (read from
    their adapter_config.json, not from the engine), bytes in use == the raw tensor bytes, and the
    pool's real allocation at a stated fill: the initial 128 rows per kind, doubling when full."""
    stats = engine.lora.stats()
    assert set(engine.lora.resident_ids()) == set(tiny_assets.adapter_ids) and stats["retired_pinned"] == 0
    ranks: dict[str, int] = {}
    for aid in tiny_assets.adapter_ids:
        cfg = json.loads((tiny_assets.adapters_dir / aid / "adapter_config.json").read_text())
        for kind in cfg["target_modules"]:
            ranks[kind] = ranks.get(kind, 0) + cfg["r"]
    used = {k: v for k, v in stats["rows_used"].items() if v}
    assert used == ranks, (used, ranks)
    total_raw = sum(engine.lora.current(a).raw_bytes for a in tiny_assets.adapter_ids)
    assert stats["bytes_used"] == total_raw, (stats["bytes_used"], total_raw)  # fp32 files, fp32 pool

    # Fill: every kind is within the initial 128 rows, so each holds exactly 128 -- no more.
    layers, shapes = engine.base_shape.num_layers, engine.base_shape.kinds
    row_bytes = {k: layers * (i + o) * 4 for k, (i, o) in shapes.items()}
    assert max(ranks.values()) <= 128
    allocated = _pool_allocated(engine.lora)
    assert engine.lora.stats()["bytes_allocated"] == sum(allocated.values())
    assert stats["rows_capacity"] == {k: 128 for k in shapes}, stats["rows_capacity"]
    assert allocated == {k: 128 * row_bytes[k] for k in shapes}, allocated
    fill = sum(ranks.get(k, 0) * row_bytes[k] for k in shapes) / sum(allocated.values())
    print(f"pool at {fill:.0%} fill: allocated {sum(allocated.values())} bytes = "
          f"{sum(allocated.values()) / total_raw:.2f}x the {total_raw} raw bytes")

    # Fill q_proj past 128 rows: the pool doubles that kind once (256 rows), nothing else grows.
    extra, aid = [], tiny_assets.adapter_ids[3]  # rank 32 on q/k/v/o
    try:
        while engine.lora.stats()["rows_used"]["q_proj"] <= 128:
            extra.append(engine.load_adapter(f"fill-{len(extra)}", str(tiny_assets.adapters_dir / aid)))
        stats = engine.lora.stats()
        allocated = _pool_allocated(engine.lora)
        for k in shapes:
            cap = 256 if stats["rows_used"][k] > 128 else 128
            assert stats["rows_capacity"][k] == cap and allocated[k] == cap * row_bytes[k], (k, stats, allocated)
            assert stats["rows_used"][k] == ranks.get(k, 0) + (32 * len(extra) if k in ATTN_KINDS else 0)
    finally:
        for res in extra:
            engine.unload_adapter(res)
    assert engine.lora.stats()["rows_used"] == {k: ranks.get(k, 0) for k in shapes}


ATTN_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")


def test_invalid_requests(engine):
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=engine.max_model_len), None, lambda o: None)
    with pytest.raises(InvalidRequestError, match="out of range"):
        engine.add_request([1, 10**6], GREEDY, None, lambda o: None)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request([], GREEDY, None, lambda o: None)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_nf4_base_adapter_delta_matches_peft(tiny_assets):
    """NF4 base on CPU: the adapter's effect on the logits (tuned - base) points where PEFT's
    fp32 effect does (cosine > 0.9), and greedy decoding with it differs from the bare base."""
    from bitsandbytes.nn import Linear4bit

    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), quantization="nf4", max_lora_rank=32))
    try:
        aid = tiny_assets.adapter_ids[1]
        eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))
        assert isinstance(eng.model.model.layers[0].self_attn.q_proj.base, Linear4bit)
        p = prompts(1, seed=11)[0]
        base, tuned = eng.generate_batch([(p, GREEDY, None), (p, GREEDY, aid)])
        assert len(tuned.token_ids) == GREEDY.max_tokens
        assert base.token_ids != tuned.token_ids
        res = eng.lora.acquire(aid)
        try:
            ours = eng.run_in_engine(lambda: eng.prefill([p, p], eng.lora.prepare([None, res])))
        finally:
            eng.lora.release(res)
        ref_delta = (reference_logits(peft_model(tiny_assets.base, tiny_assets.adapters_dir / aid), p)
                     - reference_logits(peft_model(tiny_assets.base, None), p))
        our_delta = ours[1].float() - ours[0].float()
        cos = torch.nn.functional.cosine_similarity(our_delta, ref_delta, dim=0).item()
        assert ref_delta.norm() > 1e-2 and cos > 0.9, (cos, our_delta.norm().item(), ref_delta.norm().item())
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
