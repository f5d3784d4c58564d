"""Paged KV cache: block tables, preemption, the adapter-keyed prefix cache, memory accounting.

Every generated sequence is compared with plain PEFT greedy decoding on the same files, so a
block table that points at the wrong block, a prefix reused under the wrong adapter, or a
resumed sequence that lost a position fails here.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from transformers import AutoConfig

from serve_app.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.kv_cache import ROOT, BlockPool
from serve_app.engine.sampling import SamplingParams
from serve_app.errors import InvalidRequestError
from tests.helpers import peft_model, reference_greedy


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def rand_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(4, 512) for _ in range(n - 1)]


def kv_bytes(base, tokens: int) -> int:
    cfg = AutoConfig.from_pretrained(base)
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    return tokens * 2 * cfg.num_hidden_layers * kv * (cfg.hidden_size // cfg.num_attention_heads) * 4


_refs: dict = {}


def ref(assets, aid, prompt, n):
    key = (aid, tuple(prompt), n)
    if key not in _refs:
        model = peft_model(assets.base, None if aid is None else assets.adapters_dir / aid)
        _refs[key] = reference_greedy(model, prompt, n)
    return _refs[key]


def make_engine(assets, n_adapters=4, **kw) -> LoRAEngine:
    eng = LoRAEngine(EngineConfig(model=str(assets.base), max_lora_rank=32, **kw))
    for aid in assets.adapter_ids[:n_adapters]:
        eng.load_adapter(aid, str(assets.adapters_dir / aid))
    return eng


# ---- BlockPool (no model) ------------------------------------------------------------------


def test_pool_refcounts_lru_and_lowest_block_first():
    pool = BlockPool(4, 2)
    a, b = pool.allocate(), pool.allocate()
    assert (a, b) == (0, 1) and pool.num_used == 2
    node = pool.register(ROOT, None, (5, 6), a)
    pool.free([a, b])
    assert pool.num_free == 4 and pool.num_cached == 1
    # b was never cached: it comes back first; then the never-used 2, 3; only then is the cached a evicted
    assert [pool.allocate() for _ in range(3)] == [1, 2, 3]
    blocks, nodes = pool.lookup(None, [5, 6, 7], 2)
    assert blocks == [a] and nodes == [node] and pool.ref[a] == 1  # a hit takes a reference
    pool.free(blocks)
    assert pool.allocate() == a and pool.num_cached == 0 and pool.evictions == 1
    assert pool.allocate() is None
    with pytest.raises(RuntimeError):
        pool.free([a, a])


def test_pool_keys_are_exact_and_scoped_by_adapter_and_parent():
    pool = BlockPool(8, 2)
    a = pool.allocate()
    n1 = pool.register(ROOT, ("t1@v1", 7), (5, 6), a)
    assert pool.lookup(("t1@v1", 7), [5, 6], 2)[0] == [a]
    pool.free([a])
    assert pool.lookup(("t1@v2", 8), [5, 6], 2)[0] == []  # another version
    assert pool.lookup(("t1@v1", 9), [5, 6], 2)[0] == []  # another load of the same version
    assert pool.lookup(None, [5, 6], 2)[0] == []  # the base model
    b = pool.allocate()
    assert pool.register(n1 + 100, ("t1@v1", 7), (5, 6), b) != n1  # another parent: another entry
    c = pool.allocate()
    assert pool.register(ROOT, ("t1@v1", 7), (5, 6), c) == n1  # same content: the first entry stays
    pool.free([b, c])
    assert c not in pool._key_of


# ---- the engine ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_assets):
    eng = make_engine(tiny_assets, max_num_seqs=16, max_num_batched_tokens=64)
    yield eng
    eng.shutdown()


def test_prefix_hits_equal_peft_and_never_cross_adapters(engine, tiny_assets):
    ids = tiny_assets.adapter_ids
    system = rand_prompt(70, 1)  # 4 full blocks of 16
    q = [system + rand_prompt(9, 10 + i)[1:] for i in range(6)]
    kv0 = engine.stats()["kv"]
    # A warms the cache; then three more A requests share its prefix (decode rows share blocks)
    (first,) = engine.generate_batch([(q[0], greedy(6), ids[0])])
    kv1 = engine.stats()["kv"]
    outs = engine.generate_batch([(q[i], greedy(12), ids[0]) for i in (1, 2, 3)])
    kv2 = engine.stats()["kv"]
    assert kv2["prefix_hit_tokens"] - kv1["prefix_hit_tokens"] == 3 * 64, "precondition: the A requests hit"
    assert kv2["decode_reads"]["mixed"] + kv2["decode_reads"]["gather"] > kv1["decode_reads"]["mixed"] + \
        kv1["decode_reads"]["gather"], "shared blocks must have been read through the copy path"
    assert first.token_ids == ref(tiny_assets, ids[0], q[0], 6)
    for i, out in zip((1, 2, 3), outs):
        assert out.token_ids == ref(tiny_assets, ids[0], q[i], 12), f"A request {i} differs from PEFT"
    # The same prompt under B and under the base: no hit, and their own outputs
    for aid in (ids[1], None):
        before = engine.stats()["kv"]["prefix_hit_tokens"]
        (out,) = engine.generate_batch([(q[4], greedy(8), aid)])
        assert engine.stats()["kv"]["prefix_hit_tokens"] == before, f"{aid} hit A's prefix"
        assert out.token_ids == ref(tiny_assets, aid, q[4], 8)
    assert kv0["used_blocks"] == 0 and engine.stats()["kv"]["used_blocks"] == 0
    rates = engine.stats()["kv"]["prefix_hit_rate_by_adapter"]
    assert rates[ids[0]] > 0.5 and rates.get(ids[1], 0) == 0


def test_a_reloaded_version_does_not_reuse_the_old_versions_prefix(tiny_assets):
    """Same adapter ID, new weights (another adapter's files): KV from the first load is not reused."""
    eng = make_engine(tiny_assets, n_adapters=0, max_num_seqs=8)
    try:
        ids = tiny_assets.adapter_ids
        p = rand_prompt(60, 3)
        eng.load_adapter("tenant@v1", str(tiny_assets.adapters_dir / ids[0]))
        (a,) = eng.generate_batch([(p, greedy(6), "tenant@v1")])
        eng.load_adapter("tenant@v1", str(tiny_assets.adapters_dir / ids[1]))  # re-registered, other content
        hits = eng.stats()["kv"]["prefix_hit_tokens"]
        (b,) = eng.generate_batch([(p, greedy(6), "tenant@v1")])
        assert eng.stats()["kv"]["prefix_hit_tokens"] == hits, "the new load reused the old load's KV"
        assert a.token_ids == ref(tiny_assets, ids[0], p, 6)
        assert b.token_ids == ref(tiny_assets, ids[1], p, 6)
        (c,) = eng.generate_batch([(p, greedy(6), "tenant@v1")])
        assert eng.stats()["kv"]["prefix_hit_tokens"] > hits and c.token_ids == b.token_ids
    finally:
        eng.shutdown()


def test_preemption_resumes_with_identical_output(tiny_assets):
    """A pool of 160 tokens for 8 requests of up to 75: sequences are preempted and recomputed;
    nobody fails and every output equals PEFT's."""
    eng = make_engine(tiny_assets, max_num_seqs=8, kv_cache_memory_bytes=kv_bytes(tiny_assets.base, 160))
    try:
        assert eng.scheduler.kv.num_blocks == 10
        ids = tiny_assets.adapter_ids
        work = [(rand_prompt(15 + 5 * i, 40 + i), greedy(40), [*ids[:4], None][i % 5]) for i in range(8)]
        outs = eng.generate_batch(work)
        kv = eng.stats()["kv"]
        assert kv["preemptions"] > 0, "precondition: the pool was too small for everyone at once"
        for i, ((p, sp, aid), out) in enumerate(zip(work, outs)):
            assert out.token_ids == ref(tiny_assets, aid, p, sp.max_tokens), f"row {i} ({aid}) differs after preemption"
        assert kv["used_blocks"] == 0
    finally:
        eng.shutdown()


def test_a_prompt_that_can_never_fit_is_a_400(tiny_assets):
    eng = make_engine(tiny_assets, n_adapters=0, max_num_seqs=4, kv_cache_memory_bytes=kv_bytes(tiny_assets.base, 64))
    try:
        with pytest.raises(InvalidRequestError, match=r"prompt \(60 tokens\) \+ max_tokens \(10\).*4 blocks of 16"):
            eng.add_request(rand_prompt(60, 5), greedy(10), None, lambda out: None)
        (out,) = eng.generate_batch([(rand_prompt(40, 6), greedy(10), None)])  # fits: served
        assert out.token_ids == ref(tiny_assets, None, rand_prompt(40, 6), 10)
    finally:
        eng.shutdown()


def test_stale_values_in_freed_blocks_never_reach_the_next_owner(tiny_assets):
    """Poison the whole pool with NaN between requests: blocks are zeroed when handed out, so the
    next requests (whose last blocks are only partly written) are exact."""
    eng = make_engine(tiny_assets, max_num_seqs=8, enable_prefix_caching=False)
    try:
        ids = tiny_assets.adapter_ids
        eng.generate_batch([(rand_prompt(30, 7), greedy(20), ids[0])])

        def poison():
            with torch.inference_mode():
                eng.runner.kv.fill_(float("nan"))

        eng.run_in_engine(poison)
        work = [(rand_prompt(9 + 7 * i, 50 + i), greedy(11), ids[i % 4]) for i in range(4)]
        for (p, sp, aid), out in zip(work, eng.generate_batch(work)):
            assert out.token_ids == ref(tiny_assets, aid, p, sp.max_tokens)
    finally:
        eng.shutdown()


def test_blocks_are_all_free_after_churn(engine, tiny_assets):
    """Aborts mid-prefill and mid-decode, finished and failed requests, prefix hits: afterwards
    no block is held (cached blocks are free to evict)."""
    ids = tiny_assets.adapter_ids
    system = rand_prompt(40, 8)
    done = threading.Semaphore(0)
    reqs = []
    for i in range(12):
        p = system + rand_prompt(5 + i * 13, 60 + i)[1:]
        reqs.append(engine.add_request(p, greedy(30), ids[i % 3], lambda out: out.finished and done.release()))
    for r in reqs[::3]:
        engine.abort(r)
    for _ in reqs:
        assert done.acquire(timeout=60)
    kv = engine.stats()["kv"]
    assert kv["used_blocks"] == 0 and kv["free_blocks"] == kv["num_blocks"]
    assert engine.stats()["running"] == engine.stats()["prefilling"] == 0


def test_kv_blocks_grow_and_are_reused_in_a_mixed_batch(tiny_assets):
    """A request grows across many blocks while rows of other adapters finish at different steps
    and their blocks are handed to new sequences: every row equals PEFT's greedy tokens."""
    eng = make_engine(tiny_assets, n_adapters=6, max_num_seqs=8, enable_prefix_caching=False)
    try:
        ids = tiny_assets.adapter_ids
        work = [(rand_prompt(250, 21), greedy(30), ids[1])]
        work += [(rand_prompt(5 + 3 * i, 22 + i), greedy(n), ids[i % 6]) for i, n in enumerate([2, 9, 3, 7, 5, 11, 4, 8])]
        outs = eng.generate_batch(work)
        for i, ((p, sp, aid), out) in enumerate(zip(work, outs)):
            assert out.token_ids == ref(tiny_assets, aid, p, sp.max_tokens), f"row {i} ({aid}) differs from PEFT"
        assert eng.stats()["kv"]["used_blocks"] == 0
    finally:
        eng.shutdown()
