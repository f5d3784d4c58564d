"""The per-row LoRA paths (issue 16): every path equals plain PEFT and the masked path, the cost
model's choice is one of them, a row never reads another adapter's weights, and the Triton SGMV
kernels (under Triton's CPU interpreter) agree with the CPU path.

Mixes: 1 adapter, the 8 tiny adapters (ranks 4..32; targets attention, attention+MLP, q/v,
o/down), and 24 distinct adapters (the 8 plus 16 copies with rescaled B, so every row's delta
is its own), each with base rows in the batch.
"""

from __future__ import annotations

import importlib
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve_app.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.lora.kernels import cost, sgmv_cpu
from serve_app.engine.lora.kernels.layout import build_layout
from serve_app.engine.sampling import SamplingParams
from tests.helpers import peft_model, reference_greedy, reference_logits

CPU_PATHS = ["masked", "loop", "bmm", "auto"]


def rand_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, 512) for _ in range(rng.randrange(2, 11))] for _ in range(n)]


@pytest.fixture(scope="module")
def many(tiny_assets, tmp_path_factory):
    """24 adapter folders: the 8 tiny ones and 16 copies whose lora_B is scaled (distinct deltas)."""
    root = tmp_path_factory.mktemp("many")
    dirs = {aid: tiny_assets.adapters_dir / aid for aid in tiny_assets.adapter_ids}
    for i in range(16):
        src = tiny_assets.adapter_ids[i % 8]
        name = f"copy-{i}"
        dst = root / name
        shutil.copytree(dirs[src], dst)
        t = load_file(dst / "adapter_model.safetensors")
        scale = (-1.0) ** i * (0.5 + 0.25 * (i // 2))
        t = {k: (v * scale if "lora_B" in k else v).contiguous() for k, v in t.items()}
        save_file(t, dst / "adapter_model.safetensors")
        dirs[name] = dst
    return dirs


@pytest.fixture(scope="module")
def engine(tiny_assets, many):
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=32))
    for aid, d in many.items():
        eng.load_adapter(aid, str(d))
    yield eng
    eng.shutdown()


def mix(many, kind: str, n: int) -> list[str | None]:
    ids = list(many)
    if kind == "1":
        return [ids[1] if i % 4 else None for i in range(n)]
    k = 8 if kind == "8" else len(ids)
    return [None if i % 7 == 3 else ids[i % k] for i in range(n)]


def step_logits(engine, prompts, adapters, path):
    """Last-token logits of one flattened forward of whole prompts (per-token layout, as the engine)."""

    def run():
        res = [engine.lora.current(a) if a else None for a in adapters]
        per_token = [r for r, p in zip(res, prompts) for _ in p]
        lora = engine.lora.prepare(per_token, path=path)
        out = engine.prefill(prompts, lora)
        return out, (lora.path if lora is not None else None)

    return engine.run_in_engine(run)


_peft_cache: dict = {}


def peft_logits(tiny_assets, many, aid, prompt):
    key = (aid, tuple(prompt))
    if key not in _peft_cache:
        model = _peft_cache.setdefault(("model", aid), peft_model(tiny_assets.base, None if aid is None else many[aid]))
        _peft_cache[key] = reference_logits(model, prompt)
    return _peft_cache[key]


@pytest.mark.parametrize("kind", ["1", "8", "24"])
@pytest.mark.parametrize("path", CPU_PATHS)
def test_every_path_equals_peft_logits(engine, tiny_assets, many, kind, path):
    n = 30 if kind == "24" else 12
    prompts = rand_prompts(n, seed=len(kind))
    adapters = mix(many, kind, n)
    out, used = step_logits(engine, prompts, adapters, path)
    assert used in ("masked", "loop", "bmm")
    if path != "auto":
        assert used == path
    for i, (p, a) in enumerate(zip(prompts, adapters)):
        ref = peft_logits(tiny_assets, many, a, p)
        diff = (out[i] - ref).abs().max().item()
        assert diff < 1e-4, f"row {i} ({a}, path {used}) differs from PEFT by {diff}"


@pytest.mark.parametrize("kind", ["1", "8", "24"])
def test_paths_agree_with_masked_to_1e5(engine, many, kind):
    prompts = rand_prompts(24, seed=7)
    adapters = mix(many, kind, 24)
    ref, _ = step_logits(engine, prompts, adapters, "masked")
    for path in ("loop", "bmm", "auto"):
        out, used = step_logits(engine, prompts, adapters, path)
        diff = (out - ref).abs().max().item()
        assert diff <= 1e-5, f"{path} (ran {used}) vs masked: max |diff| {diff}"


@pytest.mark.parametrize("path", ["loop", "bmm", "auto"])
def test_decoding_equals_peft_greedy_with_24_adapters(engine, tiny_assets, many, path):
    """Decode steps (one token per row, 24 distinct adapters) and their prefill, greedy vs PEFT."""
    prompts = rand_prompts(26, seed=11)
    adapters = mix(many, "24", 26)
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.lora.path = path
    engine.lora.path_steps.clear()
    try:
        outs = engine.generate_batch([(p, sp, a) for p, a in zip(prompts, adapters)])
    finally:
        engine.lora.path = "auto"
    if path != "auto":
        assert set(engine.lora.path_steps) == {path}
    for i, (p, a, o) in enumerate(zip(prompts, adapters, outs)):
        model = _peft_cache.setdefault(("model", a), peft_model(tiny_assets.base, None if a is None else many[a]))
        assert o.token_ids == reference_greedy(model, p, 6), f"row {i} ({a}, {path}) differs from PEFT"


def test_per_row_prepare_is_expanded_per_token(engine, many):
    """Tests and benchmarks prepare one entry per row of equal-length prompts; the per-row paths
    expand that to the flattened tokens and equal the masked path."""
    prompts = rand_prompts(6, seed=3)
    prompts = [p[:3] + [5] * (8 - len(p[:3])) for p in prompts]  # one length
    ids = list(many)
    res = engine.run_in_engine(lambda: [engine.lora.current(ids[i * 3]) if i % 3 else None for i in range(6)])

    def run(path):
        return engine.run_in_engine(lambda: engine.prefill(prompts, engine.lora.prepare(res, path=path)))

    ref = run("masked")
    for path in ("loop", "bmm"):
        assert (run(path) - ref).abs().max().item() <= 1e-5


def test_cost_model_choices():
    outs = {"q": 256, "k": 256, "v": 256}
    r16 = {"q": 16, "k": 16, "v": 16}
    # one adapter on every decode row: two plain GEMMs beat any per-row path
    est = cost.estimate(64, cost.runs_of([0] * 64), [64], [(256, outs, [r16])], True)
    assert min(est, key=est.get) == "masked"
    # 64 distinct adapters, one decode token each: the masked product pays 64x the ranks per row
    tok = list(range(64))
    est = cost.estimate(64, cost.runs_of(tok), [1] * 64, [(256, outs, [r16] * 64)], False)
    assert min(est, key=est.get) == "bmm", est
    assert est["masked"] > 2 * est["bmm"]
    # two long prompts of different adapters: few runs, heavy padding for bmm is not chosen
    tok = [0] * 1500 + [1] * 100
    est = cost.estimate(len(tok), cost.runs_of(tok), [1500, 100], [(256, outs, [r16, r16])], False)
    assert min(est, key=est.get) in ("loop", "masked"), est
    # rank 8, 8 distinct adapters round-robin over 64 decode rows (q/k/v and o): bmm measured
    # 0.94x of base against masked's 0.86x on W1 (benchmarks/README.md, lora_mix_bench); the
    # fit before the prepare cache chose masked here
    r8 = {"q": 8, "k": 8, "v": 8}
    tok = [t % 8 for t in range(64)]
    groups = [(256, outs, [r8] * 8), (256, {"o": 256}, [{"o": 8}] * 8)]
    est = cost.estimate(64, cost.runs_of(tok), [8] * 8, groups, False)
    assert min(est, key=est.get) == "bmm", est
    # continuous batching: 63 decode rows of distinct adapters and a 32-token prompt of a 64th;
    # padding every segment to the prompt would cost more than twice the split (layout.split_cut)
    tok = list(range(63)) + [63] * 32
    args = (len(tok), cost.runs_of(tok), [1] * 63 + [32], [(256, outs, [r16] * 64)], False)
    est = cost.estimate(*args)
    assert min(est, key=est.get) == "bmm", est
    cut, cost.split_cut = cost.split_cut, lambda lens: None
    try:
        padded = cost.estimate(*args)
    finally:
        cost.split_cut = cut
    assert est["bmm"] < 0.5 * padded["bmm"], (est, padded)
    # on CUDA: the kernels unless one adapter serves every row
    d = cost.estimate(64, [], [1] * 64, [], False, "cuda")
    assert min(d, key=d.get) == "triton"
    d = cost.estimate(64, [], [64], [], True, "cuda")
    assert min(d, key=d.get) == "masked"


@pytest.mark.parametrize("path", ["loop", "bmm"])
def test_a_row_never_reads_another_adapters_weights(engine, many, path):
    """NaN written straight into one adapter's stacked copy (after the gather's finiteness check,
    as a bug would) reaches only that adapter's rows. The masked product cannot pass this: its
    rows multiply every adapter's B column, 0 * NaN = NaN; it relies on the gather's zeroing."""
    prompts = rand_prompts(12, seed=5)
    ids = list(many)
    adapters = [None, ids[0], ids[1], ids[2], ids[0], ids[3], None, ids[1], ids[2], ids[3], ids[0], ids[1]]
    victim = ids[2]

    def run(poison):
        res = [engine.lora.current(a) if a else None for a in adapters]
        per_token = [r for r, p in zip(res, prompts) for _ in p]
        lora = engine.lora.prepare(per_token, path=path)
        saved = []
        if poison:
            j = [r for r in dict.fromkeys(per_token) if r is not None].index(engine.lora.current(victim))
            for g in lora.groups.values():
                i = g.stack.member_of[j]
                if i >= 0:
                    saved.append((g.stack.a, i, g.stack.a[:, i].clone()))
                    g.stack.a[:, i] = float("nan")
                    for _, _, b in g.stack.spans.values():
                        saved.append((b, i, b[:, i].clone()))
                        b[:, i] = float("nan")
        try:
            return engine.prefill(prompts, lora)
        finally:
            for t, i, v in saved:  # the stacked copy is cached: restore it
                t[:, i] = v

    clean = engine.run_in_engine(run, False)
    dirty = engine.run_in_engine(run, True)
    for i, a in enumerate(adapters):
        if a == victim:
            assert torch.isnan(dirty[i]).all(), f"row {i} uses the poisoned adapter and must show it"
        else:
            assert torch.equal(dirty[i], clean[i]), f"row {i} ({a}) changed when another adapter's weights did"


def test_inf_in_pool_rows_fails_only_its_rows_on_the_per_row_paths(tiny_assets):
    """The pool-level defence (non-finite rows zeroed in the gathered copy, adapter retired,
    its rows failed) holds on the stacked gather too."""
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=32))
    try:
        ids = tiny_assets.adapter_ids
        for aid in ids[:4]:
            eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))
        prompts = rand_prompts(8, seed=9)
        adapters = [ids[i % 4] for i in range(8)]
        ref, _ = step_logits(eng, prompts, adapters, "masked")

        def poison():
            res = eng.lora.current(ids[3])
            for kind, idx in res.rows.items():
                eng.lora._b[kind][:, idx] = float("inf")
            eng.lora.clear_set_caches()  # the next gather re-reads the pool
            return res

        bad = eng.run_in_engine(poison)

        def run():
            res = [eng.lora.current(a) or bad for a in adapters]
            per_token = [r for r, p in zip(res, prompts) for _ in p]
            lora = eng.lora.prepare(per_token, path="bmm")
            return eng.prefill(prompts, lora), lora.poisoned

        out, poisoned = eng.run_in_engine(run)
        assert poisoned == {bad.load_id} and bad.poisoned and eng.lora.current(ids[3]) is None
        for i, a in enumerate(adapters):
            assert torch.isfinite(out[i]).all()
            if a != ids[3]:
                assert (out[i] - ref[i]).abs().max().item() <= 1e-5
    finally:
        eng.shutdown()


# ---- Triton SGMV kernels under the interpreter ---------------------------------------------------


@pytest.fixture(scope="module")
def sgmv_triton():
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"triton is not importable here ({type(e).__name__}: {e}); the [test] extra installs it")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when the module is (re)loaded
    from serve_app.engine.lora.kernels import sgmv_triton as mod

    mod = importlib.reload(mod)
    yield mod
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triton_sgmv_equals_cpu_bmm_to_1e5(sgmv_triton, seed):
    g = torch.Generator().manual_seed(seed)
    n_tok, in_f, out_f, n = 53, 48, 40, 5
    ranks = [4, 8, 16, 32, 8][: n]
    rp = max(ranks)
    a = torch.zeros(n, in_f, rp)
    b = torch.zeros(n, rp, out_f)
    for i, r in enumerate(ranks):  # zero padding past each member's rank, as the stacked gather
        a[i, :, :r] = torch.randn(in_f, r, generator=g) * in_f**-0.5  # real LoRA scales: deltas O(1)
        b[i, :r] = torch.randn(r, out_f, generator=g) * r**-0.5
    rng = random.Random(seed)
    # distinct j -> member: distinct 1 is not a member (targets another group); -1 tokens are base
    member_of = [0, -1, 1, 2, 3, 4]
    tok_adapter = [rng.choice([-1, 0, 1, 2, 3, 4, 5, 5, 5]) for _ in range(n_tok)]
    x = torch.randn(n_tok, in_f, generator=g)
    base = torch.randn(n_tok, out_f, generator=g)
    lay_b = build_layout(tok_adapter, member_of, n, "bmm", x.device)
    lay_t = build_layout(tok_adapter, member_of, n, "triton", x.device)
    out_cpu, out_tri = base.clone(), base.clone()
    sgmv_cpu.bmm_expand(out_cpu, sgmv_cpu.bmm_shrink(x, a, lay_b), b, 0, rp, lay_b)
    h = sgmv_triton.sgmv_shrink(x, a, lay_t)  # [M, Rp]
    sgmv_triton.sgmv_expand(out_tri, h, b, 0, lay_t)
    assert (out_tri - out_cpu).abs().max().item() <= 1e-5
    # base tokens and non-members untouched, bit for bit
    untouched = [t for t, j in enumerate(tok_adapter) if j < 0 or member_of[j] < 0]
    assert untouched and torch.equal(out_tri[untouched], base[untouched])
    # and against a plain per-token reference
    ref = base.clone()
    for t, j in enumerate(tok_adapter):
        if j >= 0 and member_of[j] >= 0:
            m = member_of[j]
            ref[t] += x[t] @ a[m] @ b[m]
    assert (out_tri - ref).abs().max().item() <= 1e-4


def test_triton_path_in_the_engine_equals_masked(engine, many, sgmv_triton):
    prompts = rand_prompts(10, seed=13)
    adapters = mix(many, "24", 10)
    ref, _ = step_logits(engine, prompts, adapters, "masked")
    out, used = step_logits(engine, prompts, adapters, "triton")
    assert used == "triton"
    assert (out - ref).abs().max().item() <= 1e-5


# ---- bmm layouts without gathers, and prepare()'s batch cache ------------------------------------


def _per_token_reference(x, a, b, tok_adapter, member_of, base):
    ref = base.clone()
    for t, j in enumerate(tok_adapter):
        if j >= 0 and member_of[j] >= 0:
            m = member_of[j]
            ref[t] += x[t] @ a[m] @ b[m]
    return ref


@pytest.mark.parametrize("case", ["identity", "inv", "inv-padded", "keep", "keep-padded", "inv-dead", "keep-dead",
                                  "split", "split-dead"])
def test_bmm_layout_cases_equal_per_token_reference(case):
    """Each bmm layout case (views only; every token a member: gather back + add; base tokens:
    scatter-add; dead slots of a slot buffer as empty segments) equals the plain per-token
    product, and base tokens stay bit for bit, whatever the dead slots hold."""
    g = torch.Generator().manual_seed(3)
    n, in_f, out_f, r = 6, 40, 24, 8
    tok = {
        "identity": [0, 1, 2, 3, 4, 5],  # one decode token per distinct adapter
        "inv": [0, 1, 2, 0, 1, 2, 0, 1, 2],  # round-robin, all members, equal segments
        "inv-padded": [0, 1, 0, 2, 0, 1, 3, 0],
        "keep": [0, -1, 1, 0, -1, 1],
        "keep-padded": [0, -1, 1, 0, 0, 2, -1],
        "inv-dead": [0, 1, 2, 1],  # adapters 0, 1, 2 in slots 3, 0, 4 of 5: slots 1 and 2 dead
        "keep-dead": [2, -1, 0, 1, 0, -1],
        # decode rows and a prompt (continuous batching): adapter 5's 9 tokens (a decode row,
        # then an 8-token prompt) are not padded to; every other segment stays one token
        "split": [0, 1, 2, 5, 3, 4, 5, 5, 5, 5, 5, 5, 5, 5, -1],
        "split-dead": [0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, -1, 1],
    }[case]
    n_ad = max(tok) + 1
    member_of = [3, 0, 4] if "dead" in case else list(range(n_ad))
    n_slots = max(member_of) + 1
    a = torch.randn(n_slots, in_f, r, generator=g) * in_f**-0.5
    b = torch.randn(n_slots, r, out_f, generator=g) * r**-0.5
    if "dead" in case:  # a dead slot may hold anything (a finished tenant's weights, even huge values)
        a[1:3] = 1e30
        b[1:3] = float("inf")
    x = torch.randn(len(tok), in_f, generator=g)
    base = torch.randn(len(tok), out_f, generator=g)
    lay = build_layout(tok, member_of, n_slots, "bmm", x.device)
    assert lay.identity == (case == "identity")
    assert (lay.inv is not None) == case.startswith("inv")
    assert bool(lay.split) == case.startswith("split")
    if case == "split":
        assert lay.split == [(3, 4, 5), (6, 14, 5)] and lay.s_max == 1  # no segment padded to the prompt
    if "dead" in case:
        assert lay.members_t is None and len(lay.seg_member) == n_slots  # read in place, not gathered
    out = base.clone()
    sgmv_cpu.bmm_expand(out, sgmv_cpu.bmm_shrink(x, a, lay), b, 0, r, lay)
    ref = _per_token_reference(x, a, b, tok, member_of, base)
    assert (out - ref).abs().max().item() <= 1e-5
    untouched = [t for t, j in enumerate(tok) if j < 0]
    assert torch.equal(out[untouched], base[untouched])


@pytest.mark.parametrize("spread", ["one-per-row", "round-robin"])
@pytest.mark.parametrize("path", ["bmm", "auto"])
def test_all_adapter_rows_decode_equals_peft(engine, tiny_assets, many, spread, path):
    """Every row on an adapter (no base rows): decode takes bmm's gather-free views (one row
    per distinct adapter) or its gather-back layout (round-robin); greedy equals PEFT."""
    ids = list(many)
    n = 24 if spread == "one-per-row" else 16
    prompts = rand_prompts(n, seed=17)
    adapters = ids[:n] if spread == "one-per-row" else [ids[i % 8] for i in range(n)]
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    engine.lora.path = path
    try:
        outs = engine.generate_batch([(p, sp, a) for p, a in zip(prompts, adapters)])
    finally:
        engine.lora.path = "auto"
    for i, (p, a, o) in enumerate(zip(prompts, adapters, outs)):
        model = _peft_cache.setdefault(("model", a), peft_model(tiny_assets.base, many[a]))
        assert o.token_ids == reference_greedy(model, p, 5), f"row {i} ({a}, {path}, {spread}) differs from PEFT"


def test_prepare_caches_the_batch_while_its_gather_is_valid(tiny_assets):
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=32))
    try:
        ids = tiny_assets.adapter_ids
        for aid in ids[:3]:
            eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))

        def run():
            lm = eng.lora
            rows = [lm.current(ids[i % 3]) for i in range(9)] + [None]
            b1 = lm.prepare(rows, path="bmm")
            assert lm.prepare(list(rows), path="bmm") is b1  # same rows: the same batch
            assert lm.prepare(rows, path="masked") is not b1  # another path: its own entry
            assert lm.prepare(rows[::-1], path="bmm") is not b1  # other rows
            lm._gather_cache.clear()  # the gather it was built from is gone: rebuilt
            b2 = lm.prepare(rows, path="bmm")
            assert b2 is not b1 and lm.prepare(rows, path="bmm") is b2
            # a reload of one adapter: new load ID, so its rows key a new batch
            return b2, rows

        b2, rows = eng.run_in_engine(run)
        eng.load_adapter(ids[1], str(tiny_assets.adapters_dir / ids[1]))  # old version retired, freed

        def after():
            lm = eng.lora
            new_rows = [lm.current(ids[i % 3]) for i in range(9)] + [None]
            b3 = lm.prepare(new_rows, path="bmm")
            assert b3 is not b2
            # the old rows' entry is gone with the freed adapter's gather
            assert not any(hit[2] is b2 for hit in lm._batch_cache.values())
            return lm.path_steps["bmm"]

        assert eng.run_in_engine(after) >= 1
    finally:
        eng.shutdown()


def _slot_writes(lm) -> int:
    """Adapters written into the manager's slot buffers (every group and shape)."""
    return sum(st.writes for stacks in lm._slots.values() for st in stacks)


def test_a_new_adapter_set_writes_only_its_newcomers_into_the_slot_buffer(tiny_assets):
    """A set that grows (a prefill admitting requests) or swaps a member (a request finishing,
    another admitted) writes only the adapters that have no slot yet; a gather of another set
    that read an overwritten slot is dropped, one that did not stays cached."""
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=32))
    try:
        folder = str(tiny_assets.adapters_dir / tiny_assets.adapter_ids[1])
        names = [f"same-{i}" for i in range(6)]  # one folder, six loads: one shape, six load IDs
        for name in names:
            eng.load_adapter(name, folder)

        def run():
            lm = eng.lora
            res = [lm.current(a) for a in names]
            groups = lambda: [st for stacks in lm._slots.values() for st in stacks]  # noqa: E731
            writes = lambda: _slot_writes(lm)  # noqa: E731
            n_groups = len(lm.prepare([res[0], res[1]], path="bmm").groups)
            w0 = writes()
            b012 = lm.prepare([res[0], res[1], res[2]], path="bmm")
            grew = writes() - w0
            w1 = writes()
            lm.prepare([res[3], res[4], res[1], res[2]], path="bmm")  # 0 left; 3 and 4 joined
            swapped = writes() - w1
            slots = {r.load_id: groups()[0].slot_of.get(r.load_id) for r in res}
            # the set {0, 1, 2} read slot 0, now adapter 3's or 4's: its batch is rebuilt, not reused
            b012_again = lm.prepare([res[0], res[1], res[2]], path="bmm")
            return n_groups, w0, grew, swapped, slots, b012_again is not b012, len(groups())

        n_groups, w0, grew, swapped, slots, rebuilt, n_buffers = eng.run_in_engine(run)
        assert n_groups and w0 == 2 * n_groups  # one write per member and group
        assert grew == n_groups  # only the newcomer
        assert swapped == 2 * n_groups  # only the two newcomers, into slot 0 and a free slot
        assert n_buffers == n_groups  # patched in place, no new buffer
        assert rebuilt
    finally:
        eng.shutdown()


def test_chunked_prefill_sets_take_fresh_slots_and_the_decode_set_finds_them_whole(tiny_assets):
    """A prefill admits requests chunk by chunk: sets {0, 1, 2} then {3, 4, 5}, then the decode
    set {0..5} that unites them. The second chunk's newcomers take empty slots (the buffer grows,
    its slots copied) instead of overwriting the first chunk's, so every adapter is written once
    per group, and the decode set reads one contiguous range of slots in row order: no dead
    slot, no gather."""
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=32))
    try:
        folder = str(tiny_assets.adapters_dir / tiny_assets.adapter_ids[1])
        names = [f"same-{i}" for i in range(6)]
        for name in names:
            eng.load_adapter(name, folder)

        def run():
            lm = eng.lora
            res = [lm.current(a) for a in names]
            lm.prepare(res[:3], path="bmm")
            lm.prepare(res[3:], path="bmm")
            decode = lm.prepare(res, path="bmm")
            writes = _slot_writes(lm)
            return len(decode.groups), writes, [(g.stack.a.shape[1], g.layout.identity) for g in decode.groups.values()]

        n_groups, writes, views = eng.run_in_engine(run)
        assert writes == 6 * n_groups  # each adapter once per group
        assert views == [(6, True)] * n_groups  # 6 slots in the range, read in place
    finally:
        eng.shutdown()


def test_slot_placement_stays_next_to_the_set_and_evicts_only_at_the_limit():
    """SlotStack alone: below its limit a set with too few empty slots asks to grow (None), and a
    grown buffer keeps every slot; at the limit a newcomer takes the dead slot nearest the members
    that stay (the least recently used one), not a far empty one; written slots hold the adapter."""
    from serve_app.engine.lora.slots import SlotStack

    def fill(st):
        def f(s, lid):
            st.a[:, s] = lid  # slot contents name the adapter
            return {"q_proj": 2}, False
        return f

    st = SlotStack((("q_proj", 2),), 5, 1, 3, {"q_proj": 4}, torch.float32, torch.device("cpu"))
    assert st.place([1, 2, 3, 4], fill(st), limit=8) == [0, 1, 2, 3]
    assert st.place([5, 6, 7], fill(st), limit=8) is None  # 1 empty slot < 3 newcomers, below the limit
    st = st.grown(8)
    assert st.place([5, 6, 7], fill(st), limit=8) == [4, 5, 6]  # the run of empty slots, not 0..2
    assert st.place([1, 2, 3, 4, 5, 6, 7], fill(st), limit=8) == list(range(7)) and st.writes == 7
    st.place([3, 4], fill(st), limit=8)  # 1, 2 are now the least recently used
    assert st.place([3, 4, 9], fill(st), limit=8) == [2, 3, 1]  # dead slot next to the range (LRU), not empty 7
    assert st.slot_of.get(2) is None and st.slot_of[1] == 0
    assert [int(st.a[0, s, 0, 0]) for s in range(8)][:7] == [1, 9, 3, 4, 5, 6, 7]
    assert st.place(list(range(20, 29)), fill(st), limit=8) is None  # more members than slots: grow


def test_churning_adapter_sets_decode_equals_peft(tiny_assets, many):
    """More requests than sequences, each with its own length, over 24 adapters: the set of
    adapters changes at almost every step (finished requests leave, queued ones join), so slots
    are patched, reused and compacted under running sequences. Every request equals PEFT."""
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=6))
    try:
        for aid, d in many.items():
            eng.load_adapter(aid, str(d))
        ids = list(many)
        prompts = rand_prompts(30, seed=21)
        adapters = [ids[(i * 7) % len(ids)] if i % 5 else None for i in range(30)]
        sps = [SamplingParams(max_tokens=2 + (i * 5) % 7, temperature=0.0, ignore_eos=True) for i in range(30)]
        for path in ("bmm", "loop"):
            eng.lora.path = path
            eng.run_in_engine(eng.lora.clear_set_caches)
            outs = eng.generate_batch([(p, sp, a) for p, sp, a in zip(prompts, sps, adapters)])
            writes = eng.run_in_engine(_slot_writes, eng.lora)
            for i, (p, a, sp, o) in enumerate(zip(prompts, adapters, sps, outs)):
                model = _peft_cache.setdefault(("model", a), peft_model(tiny_assets.base, None if a is None else many[a]))
                assert o.token_ids == reference_greedy(model, p, sp.max_tokens), f"request {i} ({a}, {path}) differs from PEFT"
            # each adapter written about once per group it targets, not once per set it was in
            assert writes <= 4 * len(set(a for a in adapters if a)) + 8, writes
    finally:
        eng.shutdown()
