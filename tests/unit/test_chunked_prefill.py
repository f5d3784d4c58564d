"""The per-step token budget: long prompts are prefilled in chunks while running rows keep decoding.

Every output is compared with plain PEFT greedy decoding, so a chunk boundary that reads the
wrong KV (off-by-one in the causal offset, a chunk written into another slot, a slot move that
drops positions) fails here.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from serve_app.config import EngineConfig
from serve_app.engine.engine import LoRAEngine
from serve_app.engine.sampling import SamplingParams
from tests.helpers import peft_model, reference_greedy

BUDGET = 48


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def rand_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(4, 512) for _ in range(n - 1)]


@pytest.fixture(scope="module")
def engine(tiny_assets):
    eng = LoRAEngine(EngineConfig(model=str(tiny_assets.base), max_lora_rank=32, max_num_seqs=8,
                                  max_num_batched_tokens=BUDGET))
    for aid in tiny_assets.adapter_ids[:4]:
        eng.load_adapter(aid, str(tiny_assets.adapters_dir / aid))
    calls = []
    real = eng.runner.step

    def step(rows, num_decode, lora):
        # (decode rows, tokens of prompts from position 0, tokens of chunks that continue a prompt)
        prefill = rows[num_decode:]
        calls.append((num_decode, sum(len(r.tokens) for r in prefill if r.start == 0),
                      sum(len(r.tokens) for r in prefill if r.start > 0)))
        return real(rows, num_decode, lora)

    eng.runner.step = step
    eng.calls = calls
    yield eng
    eng.shutdown()


def ref(tiny_assets, aid, prompt, n):
    return reference_greedy(peft_model(tiny_assets.base, None if aid is None else tiny_assets.adapters_dir / aid), prompt, n)


def test_long_prompts_in_chunks_equal_peft_in_a_mixed_batch(engine, tiny_assets):
    ids = tiny_assets.adapter_ids
    work = [
        (rand_prompt(170, 1), greedy(9), ids[0]),   # 4 chunks of at most 48
        (rand_prompt(7, 2), greedy(30), ids[1]),
        (rand_prompt(101, 3), greedy(12), None),    # chunked while another long prompt waits
        (rand_prompt(12, 4), greedy(20), ids[2]),
        (rand_prompt(49, 5), greedy(5), ids[3]),    # one token over the budget
        (rand_prompt(48, 6), greedy(5), ids[0]),    # exactly the budget: whole
    ]
    engine.calls.clear()
    outs = engine.generate_batch(work)
    assert any(c[2] for c in engine.calls), "precondition: some prompt was chunked"
    assert max(sum(c) for c in engine.calls) <= BUDGET, f"a step went over the budget: {max(engine.calls, key=sum)}"
    for i, ((p, sp, aid), out) in enumerate(zip(work, outs)):
        assert out.token_ids == ref(tiny_assets, aid, p, sp.max_tokens), f"row {i} ({aid}, {len(p)} tokens) differs"
    assert engine.stats()["prefilling"] == 0 and engine.stats()["running"] == 0


def test_running_rows_get_a_token_every_step_while_a_long_prompt_prefills(engine, tiny_assets):
    got, done = [], threading.Event()

    def sink(out):
        got.append(len(out.token_ids))
        if out.finished:
            done.set()

    short = rand_prompt(6, 7)
    engine.add_request(short, greedy(60), tiny_assets.adapter_ids[1], sink)
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        time.sleep(0.002)
    engine.calls.clear()
    long_prompt = rand_prompt(400, 8)
    (long_out,) = engine.generate_batch([(long_prompt, greedy(4), tiny_assets.adapter_ids[2])])
    chunked = [c for c in engine.calls if c[2]]
    assert len(chunked) >= 400 // BUDGET, f"precondition: the 400-token prompt took {len(chunked)} chunked steps"
    assert all(c[0] == 1 for c in chunked), "the running row must decode in every step of the chunked prefill"
    assert done.wait(30)
    assert long_out.token_ids == ref(tiny_assets, tiny_assets.adapter_ids[2], long_prompt, 4)


def test_chunks_deep_in_a_long_prompt_are_charged_their_attention(engine, tiny_assets):
    """A chunk at position p attends to p keys per token: it takes fewer tokens as p grows, so a
    step deep in a long prompt costs what one at its start does (the running rows' gap stays
    bounded; measured by benchmarks/prefill_stall_bench). Before, every chunk took the whole budget."""
    ref_ctx = engine.runner.attn_ctx_ref  # the tiny model's: a few hundred tokens
    long_prompt = rand_prompt(int(3 * ref_ctx), 11)
    engine.calls.clear()
    (out,) = engine.generate_batch([(long_prompt, greedy(3), tiny_assets.adapter_ids[3])])
    chunks, pos = [], 0
    for decode, fresh, cont in engine.calls:
        n = fresh + cont
        if n > 1:
            chunks.append((pos, n))
            cost = n + int(n * (pos + n / 2) / ref_ctx)
            assert decode + cost <= BUDGET, f"chunk of {n} at position {pos} costs {cost}: over the budget {BUDGET}"
            pos += n
    assert pos >= len(long_prompt) - 1 and len(chunks) > 3, f"precondition: the prompt was chunked: {chunks}"
    assert chunks[0][1] >= 0.9 * BUDGET and chunks[-2][1] <= BUDGET // 3, f"chunks did not shrink with depth: {chunks}"
    assert out.token_ids == ref(tiny_assets, tiny_assets.adapter_ids[3], long_prompt, 3)


def test_abort_during_a_chunked_prefill(engine, tiny_assets):
    outs, done = [], threading.Event()

    def sink(out):
        outs.append(out)
        if out.finished:
            done.set()

    req = engine.add_request(rand_prompt(450, 9), greedy(4), None, sink)
    deadline = time.monotonic() + 20
    while engine.stats()["prefilling"] == 0 and not done.is_set() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.stats()["prefilling"] == 1, "precondition: the prompt must be mid-prefill"
    engine.abort(req)
    assert done.wait(20) and outs[-1].finish_reason == "abort"
    # The engine goes on: a fresh request is exact.
    p = rand_prompt(60, 10)
    (out,) = engine.generate_batch([(p, greedy(6), tiny_assets.adapter_ids[0])])
    assert out.token_ids == ref(tiny_assets, tiny_assets.adapter_ids[0], p, 6)
    assert engine.stats()["prefilling"] == 0


def test_budget_must_leave_room_for_prompts(tiny_assets):
    with pytest.raises(ValueError, match="max_num_batched_tokens 8 is less than max_num_seqs 16"):
        EngineConfig(model=str(tiny_assets.base), max_num_seqs=16, max_num_batched_tokens=8)
