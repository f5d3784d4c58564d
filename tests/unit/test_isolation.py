"""One tenant's input never reaches another tenant's rows: the engine under hostile adapters and values.

Each test puts a broken or hostile request (or adapter) in the same batch as good ones and
checks the good ones against plain PEFT, so a wrong answer cannot pass as "still works".
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve_app.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.scheduler import FairQueue
from serve_app.engine.lora.weights import lora_gain_bound, parse_adapter_config
from serve_app.engine.sampling import SamplingParams, sample
from serve_app.errors import InvalidAdapterError, ServeAppError
from tests.helpers import TINY, peft_model, reference_greedy

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 17, 99, 240, 33, 8], [1, 400, 5, 77], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
GOOD = ["tenant-1", "tenant-2", "tenant-4"]  # attention, attention+MLP, q/v targets (tests/helpers.py)


@pytest.fixture(scope="module")
def engine(tiny_assets):
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=32))
    for aid in tiny_assets.adapter_ids:
        eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def refs(tiny_assets):
    out = {}
    for aid in [None, *GOOD]:
        model = peft_model(tiny_assets.base, None if aid is None else tiny_assets.adapters_dir / aid)
        out[aid] = [reference_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
    assert len({tuple(map(tuple, v)) for v in out.values()}) == len(out), "references must differ per adapter"
    return out


def run_all(engine, requests):
    """Submit everything at once; per request its tokens or the error it got (never raises)."""
    done = threading.Semaphore(0)
    results = [{"tokens": [], "error": None, "finish": None} for _ in requests]

    def sink_for(i):
        def sink(out):
            results[i]["tokens"] += out.token_ids
            if out.error is not None:
                results[i]["error"] = out.error
            if out.finished or out.error is not None:
                results[i]["finish"] = out.finish_reason
                done.release()
        return sink

    for i, (prompt, params, adapter) in enumerate(requests):
        engine.add_request(prompt, params, adapter, sink_for(i))
    for _ in requests:
        assert done.acquire(timeout=60), "a request never finished"
    return results


def good_batch():
    return [(p, GREEDY, aid) for aid in [None, *GOOD] for p in PROMPTS]


def assert_good(results, refs, offset=0):
    for k, (aid, pi) in enumerate((aid, pi) for aid in [None, *GOOD] for pi in range(len(PROMPTS))):
        r = results[offset + k]
        assert r["error"] is None, f"good request ({aid}, prompt {pi}) failed: {r['error']!r}"
        assert r["tokens"] == refs[aid][pi], f"good request ({aid}, prompt {pi}) differs from PEFT"


def copy_adapter(tiny_assets, tmp_path, src, name, config=None, tensors=None):
    dst = tmp_path / name
    shutil.copytree(tiny_assets.adapters_dir / src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))  # allow_nan: writes Infinity
    if tensors is not None:
        t = load_file(dst / "adapter_model.safetensors")
        save_file(tensors(t), dst / "adapter_model.safetensors")
    return str(dst)


# ---- defence in depth: a non-finite value in the pool never reaches another row ----------------


def _poison_rows(engine, aid, value, which="b"):
    """Write ``value`` straight into one resident adapter's device rows (bypassing validation)."""
    res = engine.lora.current(aid)
    pool = engine.lora._b if which == "b" else engine.lora._a
    for kind, idx in res.rows.items():
        pool[kind][:, idx] = value
    engine.lora.clear_set_caches()  # the next gather re-reads the pool


def test_inf_in_one_adapters_pool_rows_leaves_every_other_row_unchanged(tiny_assets, refs):
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=32))
    try:
        for aid in [*GOOD, "tenant-3"]:
            eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))
        eng.run_in_engine(_poison_rows, eng, "tenant-3", float("inf"), "b")
        results = run_all(eng, [*good_batch(), *[(p, GREEDY, "tenant-3") for p in PROMPTS]])
        assert_good(results, refs)
        bad = results[len(good_batch()):]
        assert all(r["error"] is not None for r in bad), "the poisoned adapter's requests must fail, not answer"
        assert "corrupted" in bad[0]["error"].message
        # Retired: the next request for it does not get the broken rows.
        assert eng.lora.current("tenant-3") is None
    finally:
        eng.shutdown()


def test_huge_finite_a_rows_cannot_turn_other_rows_into_nan(tiny_assets, refs):
    """x @ A overflows to inf in the hostile adapter's columns for EVERY row; a multiply by a 0
    mask would give NaN there and NaN in h @ B for everyone. The fill writes exact zeros."""
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=32))
    try:
        for aid in [*GOOD, "tenant-3"]:
            eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))
        eng.run_in_engine(_poison_rows, eng, "tenant-3", 3e38, "a")  # finite: not caught as poisoned
        results = run_all(eng, [*good_batch(), *[(p, GREEDY, "tenant-3") for p in PROMPTS]])
        assert_good(results, refs)
        bad = results[len(good_batch()):]
        assert all(r["error"] is not None for r in bad), "non-finite logits must fail the request"
    finally:
        eng.shutdown()


# ---- validation of what the pool will hold ------------------------------------------------------


@pytest.mark.parametrize(
    "name,config,match",
    [
        ("alpha-huge", {"lora_alpha": 1e30}, r"LoRA gain .* exceeds .*sqrt\(float32 max\).*lora_alpha"),
        ("alpha-pattern-inf", {"alpha_pattern": {"q_proj": float("inf")}}, r"alpha_pattern\['q_proj'\]=inf must be a finite number"),
        ("alpha-pattern-huge", {"alpha_pattern": {"layers.1.self_attn.q_proj": 1e35}}, r"layer 1 q_proj: LoRA gain"),
        ("alpha-bool", {"lora_alpha": True}, r"lora_alpha=True must be a finite number"),
        ("rank-pattern-str", {"rank_pattern": {"q_proj": "8"}}, r"rank_pattern\['q_proj'\]='8' must be an integer"),
        ("rank-pattern-big", {"rank_pattern": {"q_proj": 4096}}, r"max_lora_rank 32"),
        ("rank-pattern-wrong", {"rank_pattern": {"q_proj": 2}}, r"has rank 8 but adapter_config.json says 2"),
        ("rslora-str", {"use_rslora": "no"}, r"use_rslora='no' must be true or false"),
        ("regex-key", {"alpha_pattern": {"(a+)+$": 8}}, r"regular expressions are not accepted"),
        ("regex-key-rank", {"rank_pattern": {"^model\\.layers\\.(0|1)\\.self_attn\\.q_proj$": 8}}, r"not a module name"),
    ],
)
def test_hostile_configs_are_refused_with_the_reason(engine, tiny_assets, tmp_path, name, config, match):
    path = copy_adapter(tiny_assets, tmp_path, "tenant-1", name, config=config)  # rank 8, attention
    with pytest.raises(InvalidAdapterError, match=match) as e:
        engine.load_adapter(name, path)
    assert f"adapter '{name}'" in e.value.message and str(tmp_path) not in e.value.message


def test_overflow_weights_scaled_into_range_are_refused(engine, tiny_assets, tmp_path):
    # Every stored value is finite and modest; the scale (alpha / r) makes the pool's B rows huge.
    path = copy_adapter(tiny_assets, tmp_path, "tenant-1", "scaled", config={"lora_alpha": 8e20},
                        tensors=lambda t: {k: v * 1e3 for k, v in t.items()})
    with pytest.raises(InvalidAdapterError, match=re.escape(f"exceeds {lora_gain_bound(torch.float32):.3g} = sqrt(float32 max)")):
        engine.load_adapter("scaled", path)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_non_float_tensor_dtypes_are_refused_by_name(engine, tiny_assets, tmp_path, dtype):
    path = copy_adapter(tiny_assets, tmp_path, "tenant-1", "fp8",
                        tensors=lambda t: {k: v.to(dtype) for k, v in t.items()})
    with pytest.raises(InvalidAdapterError, match=r"tensor .*lora_[AB].*has dtype (float8_e4m3fn|int8); LoRA weights must be"):
        engine.load_adapter("fp8", path)


def test_pathological_pattern_is_refused_fast_and_off_the_engine_thread(engine, tiny_assets, tmp_path):
    """PEFT would run ``re.match(r"(.*\\.)?((x+x+)+y)$", name)``: exponential backtracking. We
    refuse the key without running it, and the config half does not need the engine thread."""
    path = copy_adapter(tiny_assets, tmp_path, "tenant-1", "redos",
                        config={"rank_pattern": {"(x+x+)+y": 8}, "alpha_pattern": {"(a|a)+$": 16}})
    hold, held = threading.Event(), threading.Event()

    def block():
        held.set()
        hold.wait(30)

    t = threading.Thread(target=engine.run_in_engine, args=(block,), daemon=True)
    t.start()
    assert held.wait(10), "the engine thread did not pick up the blocking task"
    try:
        t0 = time.perf_counter()
        with pytest.raises(InvalidAdapterError, match="regular expressions are not accepted"):
            engine.load_adapter("redos", path)  # would hang here if it needed the engine thread
        assert time.perf_counter() - t0 < 1.0
    finally:
        hold.set()
        t.join(10)


def test_patterns_match_like_peft(tiny_assets, tmp_path):
    """rank_pattern / alpha_pattern keys as PEFT writes them (a bare module name, a dotted
    suffix, a full path): the engine equals PEFT on the same files."""
    from transformers import AutoModelForCausalLM

    from serve_app.demo import build_adapter  # noqa: F401  (same PEFT save path as the demo)

    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(str(tiny_assets.base), dtype=torch.float32)
    cfg = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.down_proj": 2},
        alpha_pattern={"v_proj": 64, "layers.1.self_attn.o_proj": 2},
        init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM",
    )
    torch.manual_seed(7)
    model = get_peft_model(base, cfg)
    out = tmp_path / "patterned"
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=8))
    try:
        eng.load_adapter("patterned", str(out))
        spec = parse_adapter_config("patterned", out, eng.base_shape, max_rank=32)
        assert spec.rank_for(0, "q_proj") == 4 and spec.rank_for(1, "q_proj") == 8
        assert spec.rank_for(1, "down_proj") == 2 and spec.rank_for(0, "down_proj") == 8
        assert spec.scale_for(0, "v_proj", 8) == 8.0 and spec.scale_for(1, "o_proj", 8) == 0.25
        ref = peft_model(tiny_assets.base, out)
        outs = eng.generate_batch([(p, GREEDY, "patterned") for p in PROMPTS])
        assert [o.token_ids for o in outs] == [reference_greedy(ref, p, GREEDY.max_tokens) for p in PROMPTS]
    finally:
        eng.shutdown()


# ---- row-level failure containment ----------------------------------------------------------------


def test_sampler_contains_a_broken_row():
    logits = torch.randn(4, 50)
    logits[1, 3] = float("nan")
    logits[2] = float("-inf")
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, top_k=2**70, top_p=0.9)]
    gens = [None, None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    tokens, errors = sample(logits, params, gens)
    assert set(errors) == {1, 2}
    assert tokens[0] == int(logits[0].argmax())
    # top_k beyond int64 is clamped to the vocabulary: a valid draw among the top-p tokens.
    probs = logits[3].softmax(-1)
    assert probs[tokens[3]] > 0


@pytest.mark.parametrize(
    "hostile",
    [
        SamplingParams(max_tokens=10, temperature=1.0, top_k=2**70, top_p=0.9, seed=3),
        SamplingParams(max_tokens=10, temperature=1.0, top_p=5e-324, seed=3),
        SamplingParams(max_tokens=10, temperature=1.000001e-5, top_k=2**63 + 5, seed=3),
    ],
    ids=["top_k-beyond-int64", "top_p-denormal", "tiny-temperature"],
)
def test_extreme_sampling_values_run_beside_good_rows(engine, refs, hostile):
    results = run_all(engine, [*good_batch(), (PROMPTS[0], hostile, "tenant-1")])
    assert_good(results, refs)
    assert results[-1]["error"] is None and len(results[-1]["tokens"]) == 10


def test_one_rows_sampling_failure_fails_that_row_only(engine, refs, monkeypatch):
    """Whatever breaks the batched draw for one row, the other rows of the step go on."""
    import serve_app.engine.sampling as sampling

    real = sampling._filtered_probs

    def fragile(logits, params):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("boom")
        return real(logits, params)

    monkeypatch.setattr(sampling, "_filtered_probs", fragile)
    sampled_ok = SamplingParams(max_tokens=10, temperature=1.0, seed=5)
    results = run_all(engine, [*good_batch(), (PROMPTS[0], SamplingParams(max_tokens=10, seed=666), "tenant-2"),
                               (PROMPTS[1], sampled_ok, "tenant-2")])
    assert_good(results, refs)
    assert results[-2]["error"] is not None and results[-2]["error"].status_code == 500
    assert results[-1]["error"] is None and len(results[-1]["tokens"]) == 10


def test_a_prefill_that_raises_fails_only_its_request(engine, refs, monkeypatch):
    poison = [1, 13, 13, 13, 13, 13]
    real = engine.runner.step

    def step(rows, num_decode, lora):
        if any(r.tokens == poison for r in rows):
            raise RuntimeError("kernel failure on this prompt")
        return real(rows, num_decode, lora)

    monkeypatch.setattr(engine.runner, "step", step)
    results = run_all(engine, [*good_batch(), (poison, GREEDY, "tenant-4")])
    assert_good(results, refs)
    err = results[-1]["error"]
    assert isinstance(err, ServeAppError) and "prefill" in err.message and "kernel failure" not in err.message


def test_a_running_request_survives_a_neighbours_failure(engine, refs, monkeypatch):
    """The long request is running (not finished) when the hostile one fails next to it."""
    import serve_app.engine.sampling as sampling

    real = sampling._filtered_probs
    monkeypatch.setattr(sampling, "_filtered_probs",
                        lambda logits, params: (_ for _ in ()).throw(RuntimeError("x")) if any(p.seed == 9 for p in params) else real(logits, params))
    long = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    model = peft_model(engine.config.model, None)
    want = reference_greedy(model, PROMPTS[2], 120)
    got = []
    done = threading.Event()

    def sink(out):
        got.extend(out.token_ids)
        if out.finished or out.error is not None:
            done.set()

    engine.add_request(PROMPTS[2], long, None, sink)
    deadline = time.monotonic() + 30
    while len(got) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert 5 <= len(got) < 120, "the long request must be running when the neighbour fails"
    hostile = run_all(engine, [(PROMPTS[0], SamplingParams(max_tokens=4, seed=9), "tenant-1")])
    assert hostile[0]["error"] is not None, "the hostile request must fail"
    assert not done.is_set() or len(got) < 120, "precondition: the long request was still running"
    assert done.wait(60)
    assert got == want, "the running request's output changed"


# ---- fair admission keys on the tenant -----------------------------------------------------------


def test_fair_queue_keys_on_the_tenant_not_the_adapter():
    from types import SimpleNamespace

    def req(tenant, adapter, i):
        return SimpleNamespace(tenant=tenant, adapter=SimpleNamespace(adapter_id=adapter), name=f"{adapter}-{i}")

    q = FairQueue()
    # Tenant A owns 3 adapters with 2 requests each; tenant B one request.
    for i in range(2):
        for a in ("a1", "a2", "a3"):
            q.append(req("A", a, i))
    q.append(req("B", "b1", 0))
    order = [q.popleft().name for _ in range(len(q))]
    assert order[1] == "b1-0", f"tenant B must be admitted second, not after A's adapters: {order}"
