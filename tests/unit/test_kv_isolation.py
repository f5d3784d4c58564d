"""What one tenant's sequence can do to another's through the paged KV cache, and what the
scheduler owes a waiting tenant (issue: tenant isolation, round 2).

- Padding in a block table never reads a block another sequence holds: a hostile adapter's
  NaN K/V in its own blocks must not reach continuation rows (prefix-cache hits, 1-token
  prompts, chunked prefill) of other tenants in the same step, and the error names the
  adapter that overflowed, never the victim's.
- A row whose logits come out non-finite never registers its blocks in the prefix cache.
- Prefix-cache entries are salted by the caller's tenant: a tenant cannot time another's prompt.
- echo + logprobs come from the request's own chunked prefill, within the token budget.
- One tenant holding every running row gives one up when another tenant waits.

Every good output is compared with plain PEFT on the same files.
"""

from __future__ import annotations

import threading

import pytest
import torch

from serve_app.engine.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.sampling import SamplingParams
from tests.helpers import peft_model, reference_greedy

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PREFIX = [1] + [(7 * i) % 500 + 4 for i in range(39)]  # 40 tokens: 2 full blocks of 16 and 8 more
GOOD = [None, "tenant-1", "tenant-2"]


def _engine(tiny_assets, **kw):
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, **{"max_num_seqs": 16, **kw}))
    for aid in ["tenant-1", "tenant-2", "tenant-3"]:
        eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))
    return eng


def _ref(tiny_assets, aid, prompt, n=GREEDY.max_tokens):
    model = peft_model(tiny_assets.base, None if aid is None else tiny_assets.adapters_dir / aid)
    return reference_greedy(model, prompt, n)


def _run(engine, requests):
    """Submit all at once (in order); per request its tokens, error and outputs (never raises)."""
    done = threading.Semaphore(0)
    results = [{"tokens": [], "error": None, "outs": []} for _ in requests]

    def sink_for(i):
        def sink(out):
            results[i]["tokens"] += out.token_ids
            results[i]["outs"].append(out)
            if out.error is not None:
                results[i]["error"] = out.error
            if out.finished or out.error is not None:
                done.release()
        return sink

    for i, req in enumerate(requests):
        prompt, params, adapter, *rest = req
        engine.add_request(prompt, params, adapter, sink_for(i), **(rest[0] if rest else {}))
    for _ in requests:
        assert done.acquire(timeout=120), "a request never finished"
    return results


def _poison_a(engine, aid):
    """Huge but finite A rows (3e38): the pool's finiteness check passes, every forward of this
    adapter overflows to inf/NaN -- an adapter that overflows only as a chain of layers."""
    res = engine.lora.current(aid)
    for kind, idx in res.rows.items():
        engine.lora._a[kind][:, idx] = 3e38
    engine.lora.clear_set_caches()


def test_nan_kv_of_a_hostile_adapter_never_reaches_continuation_rows_of_other_tenants(tiny_assets):
    """Step B holds the hostile adapter's fresh prompt (its blocks include block 0) beside other
    tenants' continuation rows: a prefix-cache hit (3 blocks) and 1-token prompts (1 block,
    padded to 3). Padding used to read block 0 -- the attacker's NaN -- and failed the victims
    with "non-finite logits" under their own names; their new blocks were cached with NaN."""
    eng = _engine(tiny_assets)
    try:
        eng.run_in_engine(_poison_a, eng, "tenant-3")
        one_token = [[5], [9]]
        refs = {(aid, tuple(p)): _ref(tiny_assets, aid, p) for aid in GOOD for p in [PREFIX, *one_token]}
        # Step A: a holder takes block 0 (a 1-token prompt: its block never fills, so it is never
        # cached and goes back to the free list); the victims' prefix fills blocks 1-2, cached.
        warm = _run(eng, [([3], SamplingParams(max_tokens=2, temperature=0.0), None),
                          *[(PREFIX, GREEDY, aid, {"tenant": f"t{aid}"}) for aid in GOOD]])
        assert all(r["error"] is None for r in warm)
        # Step B: the attacker first (it gets block 0), then prefix hits and 1-token prompts.
        attack = [(PREFIX[::-1], GREEDY, "tenant-3", {"tenant": "attacker"})]
        victims = [(p, GREEDY, aid, {"tenant": f"t{aid}"}) for aid in GOOD for p in [PREFIX, *one_token]]
        results = _run(eng, [*attack, *victims])
        for (p, _, aid, _), r in zip(victims, results[1:]):
            assert r["error"] is None, f"victim {aid} failed beside the hostile adapter: {r['error']!r}"
            assert r["tokens"] == refs[(aid, tuple(p))], f"victim {aid} differs from PEFT"
        err = results[0]["error"]
        assert err is not None and "tenant-3" in err.message and err.code == "non_finite_output"
        assert eng.stats()["kv"]["prefix_hit_tokens"] >= 3 * 32, "the victims' prefix rows must have been hits"
        # Alone afterwards: whatever the victims cached in step B is clean.
        again = _run(eng, victims)
        for (p, _, aid, _), r in zip(victims, again):
            assert r["error"] is None and r["tokens"] == refs[(aid, tuple(p))]
    finally:
        eng.shutdown()


def test_nan_in_a_block_held_by_another_sequence_is_never_read_by_chunked_rows(tiny_assets):
    """Block 0 held by someone else and full of NaN; victims arrive as chunked prefills (a small
    token budget), prefix hits and 1-token prompts: none of them may read it."""
    eng = _engine(tiny_assets, max_num_batched_tokens=32)

    def hold_block_0_with_nan():
        pool = eng.scheduler.kv.pool
        assert pool.allocate() == 0
        pool.take_dirty()  # never zeroed: it stays NaN while "its sequence" holds it
        with torch.inference_mode():
            eng.runner.kv[:, :, 0] = float("nan")

    try:
        eng.run_in_engine(hold_block_0_with_nan)
        long = [1] + [(11 * i) % 500 + 4 for i in range(69)]  # 70 tokens: chunked under a budget of 32
        prompts = [long, PREFIX, [5]]
        requests = [(p, GREEDY, aid, {"tenant": f"t{aid}"}) for aid in GOOD for p in prompts]
        first = _run(eng, requests)
        second = _run(eng, requests)  # prefix hits now
        for (p, _, aid, _), r1, r2 in zip(requests, first, second):
            ref = _ref(tiny_assets, aid, p)
            assert r1["error"] is None and r1["tokens"] == ref, f"{aid} prompt of {len(p)}: {r1['error']!r}"
            assert r2["error"] is None and r2["tokens"] == ref
    finally:
        eng.shutdown()


def test_a_non_finite_row_never_enters_the_prefix_cache(tiny_assets):
    eng = _engine(tiny_assets)
    try:
        eng.run_in_engine(_poison_a, eng, "tenant-3")
        before = eng.stats()["kv"]["cached_blocks"]
        (r,) = _run(eng, [(PREFIX, GREEDY, "tenant-3")])
        assert r["error"] is not None
        assert eng.stats()["kv"]["cached_blocks"] == before, "a NaN row's blocks were registered"
        assert "tenant-3" in r["error"].message
    finally:
        eng.shutdown()


def test_prefix_cache_entries_are_salted_by_tenant(tiny_assets):
    """The base model's cached prefix of tenant A is a miss for tenant B (no timing oracle),
    a hit for A again, and a hit for B when both carry one cache_salt (opt-in sharing)."""
    eng = _engine(tiny_assets)
    try:
        def hits():
            return eng.stats()["kv"]["prefix_hit_tokens"]

        _run(eng, [(PREFIX, GREEDY, None, {"tenant": "a"})])
        h0 = hits()
        _run(eng, [(PREFIX, GREEDY, None, {"tenant": "b"})])
        assert hits() == h0, "tenant b hit tenant a's cached prefix"
        _run(eng, [(PREFIX, GREEDY, None, {"tenant": "a"})])
        assert hits() == h0 + 32
        _run(eng, [(PREFIX, GREEDY, None, {"tenant": "c", "cache_salt": "shared"})])
        _run(eng, [(PREFIX, GREEDY, None, {"tenant": "d", "cache_salt": "shared"})])
        assert hits() == h0 + 64
    finally:
        eng.shutdown()


def test_echo_logprobs_come_from_the_chunked_prefill_within_the_budget(tiny_assets):
    """A 70-token echo+logprobs prompt under a 32-token budget: no forward is longer than the
    budget allows (no whole-prompt scoring pass), and the prompt logprobs equal PEFT's."""
    eng = _engine(tiny_assets, max_num_batched_tokens=32)
    sizes = []
    real = eng.runner.step

    def step(rows, num_decode, lora):
        sizes.append(sum(len(r.tokens) for r in rows))
        return real(rows, num_decode, lora)

    eng.runner.step = step
    try:
        prompt = [1] + [(13 * i) % 500 + 4 for i in range(69)]
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, echo=True, logprobs=2)
        eng.runner.score = None  # the old path scored the whole prompt in one forward
        (r,) = _run(eng, [(prompt, params, "tenant-1")])
        assert r["error"] is None, r["error"]
        lps = r["outs"][0].prompt_logprobs
        assert len(lps) == len(prompt) and lps[0].logprob is None
        model = peft_model(tiny_assets.base, tiny_assets.adapters_dir / "tenant-1")
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0].float(), dim=-1)  # [T, vocab]
        want = [float(ref[t, prompt[t + 1]]) for t in range(len(prompt) - 1)]
        assert [lp.logprob for lp in lps[1:]] == pytest.approx(want, abs=1e-4)
        assert [lp.top[0][1] for lp in lps[1:]] == ref[:-1].argmax(-1).tolist()
        assert max(sizes) <= 32
    finally:
        eng.shutdown()


def test_one_tenant_holding_every_row_gives_one_up_to_a_waiting_tenant(tiny_assets):
    """Tenant A fills all 4 rows with long requests; tenant B's request arrives: it gets a row
    within a few steps (A's newest row is preempted and re-run), not when one of A's ends."""
    eng = _engine(tiny_assets, max_num_seqs=4, max_num_batched_tokens=64)
    try:
        long = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
        first_step: dict[str, int] = {}
        done = threading.Semaphore(0)
        outs: dict[str, list[int]] = {}

        def sink_for(name):
            def sink(out):
                outs.setdefault(name, []).extend(out.token_ids)
                if out.token_ids and name not in first_step:
                    first_step[name] = eng.steps
                if out.finished or out.error is not None:
                    assert out.error is None, out.error
                    done.release()
            return sink

        a_prompts = [[1, 20 + i, 30 + i] for i in range(4)]
        for i, p in enumerate(a_prompts):
            eng.add_request(p, long, None, sink_for(f"a{i}"), tenant="A")
        while len(first_step) < 4:
            threading.Event().wait(0.005)
        b_prompt = [1, 77, 78]
        eng.add_request(b_prompt, GREEDY, "tenant-1", sink_for("b"), tenant="B")
        submitted = eng.steps
        for _ in range(5):
            assert done.acquire(timeout=120)
        assert first_step["b"] - submitted <= 3, f"B waited {first_step['b'] - submitted} steps for a row"
        assert eng.stats()["kv"]["share_preemptions"] >= 1
        # The preempted request of A still equals the reference (re-run from its tokens so far).
        for i, p in enumerate(a_prompts):
            assert outs[f"a{i}"] == _ref(tiny_assets, None, p, long.max_tokens)
        assert outs["b"] == _ref(tiny_assets, "tenant-1", b_prompt)
    finally:
        eng.shutdown()


def test_an_unloaded_versions_prefix_stats_are_dropped(tiny_assets):
    """Per-version stats (and the hit-rate gauge labels exported from them) do not grow with
    every version ever served: unloading a version forgets its counts."""
    eng = _engine(tiny_assets)
    try:
        _run(eng, [(PREFIX, GREEDY, "tenant-1"), (PREFIX, GREEDY, None)])
        assert "tenant-1" in eng.stats()["kv"]["prefix_hit_rate_by_adapter"]
        eng.unload_adapter("tenant-1")
        rates = eng.stats()["kv"]["prefix_hit_rate_by_adapter"]
        assert "tenant-1" not in rates and "base" in rates
    finally:
        eng.shutdown()


def test_prefix_totals_stay_monotonic_when_a_version_is_forgotten(tiny_assets):
    eng = _engine(tiny_assets)
    try:
        _run(eng, [(PREFIX, GREEDY, "tenant-1")])
        _run(eng, [(PREFIX, GREEDY, "tenant-1")])
        kv = eng.stats()["kv"]
        eng.unload_adapter("tenant-1")
        after = eng.stats()["kv"]
        assert after["prefix_hit_tokens"] == kv["prefix_hit_tokens"] == 32
        assert after["prefix_query_tokens"] == kv["prefix_query_tokens"] == 64
    finally:
        eng.shutdown()


def test_another_tenants_long_prefill_does_not_hold_back_a_short_prompt(tiny_assets):
    """Tenant A's 600-token prompt is being prefilled in chunks under a 64-token budget when
    tenant B's 5-token prompt arrives: B takes its share of the next step's budget and gets its
    first token at once, not after A's ~10 remaining chunks."""
    eng = _engine(tiny_assets, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=1024)
    try:
        steps: dict[str, int] = {}
        done = threading.Semaphore(0)
        outs: dict[str, list[int]] = {}

        def sink_for(name):
            def sink(out):
                outs.setdefault(name, []).extend(out.token_ids)
                if out.token_ids and name not in steps:
                    steps[name] = eng.steps
                if out.finished or out.error is not None:
                    assert out.error is None, out.error
                    done.release()
            return sink

        long_prompt = [1] + [(17 * i) % 500 + 4 for i in range(599)]
        eng.add_request(long_prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), None,
                        sink_for("a"), tenant="A")
        while eng.steps < 1:
            threading.Event().wait(0.001)
        b_prompt = [1, 50, 60, 70, 80]
        eng.add_request(b_prompt, GREEDY, "tenant-2", sink_for("b"), tenant="B")
        submitted = eng.steps
        for _ in range(2):
            assert done.acquire(timeout=120)
        assert steps["b"] - submitted <= 2, f"B's first token came {steps['b'] - submitted} steps after it arrived"
        assert steps["a"] > steps["b"]
        assert outs["b"] == _ref(tiny_assets, "tenant-2", b_prompt)
        assert outs["a"] == _ref(tiny_assets, None, long_prompt, 2)
    finally:
        eng.shutdown()
