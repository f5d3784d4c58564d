"""echo's prompt logprobs (a scoring forward, ``ModelRunner.score``) against plain transformers /
PEFT: every prompt position's raw log-softmax, per adapter, with the request in a mixed batch."""

from __future__ import annotations

import random
import time

import torch

from serve_app.api.sampling_params import SamplingParams
from tests.helpers import peft_model

TOL = 1e-4  # fp32, our forward vs transformers' (the logprobs tests' tolerance)


@torch.inference_mode()
def reference_log_softmax(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)  # [T, vocab]


def test_prompt_logprobs_equal_the_reference_per_adapter_in_a_mixed_batch(two_adapter_engine, tiny_assets):
    eng = two_adapter_engine
    rng = random.Random(5)
    a0, a1 = tiny_assets.adapter_ids[:2]
    cases = [(None, 3), (a0, 0), (a1, 5), (a1, None)]  # (adapter, logprobs); None: echo without logprobs
    prompts = [[rng.randrange(4, eng.vocab_size) for _ in range(rng.randrange(5, 30))] for _ in cases]
    reqs = [(p, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, echo=True, logprobs=k), ad)
            for p, (ad, k) in zip(prompts, cases)]
    reqs += [(prompts[0], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), a0)]  # no echo beside them
    outs = eng.generate_batch(reqs)
    # Completion only: the engine's merged output carries the prompt's part on the side.
    assert len(outs[0].logprobs) == 3 and len(outs[-1].token_ids) == 6
    got: list[list] = [[] for _ in reqs]

    def sink_for(j):
        return got[j].append

    for j, (p, sp, ad) in enumerate(reqs):  # all in flight at once: one mixed batch
        eng.add_request(p, sp, ad, sink_for(j))
    deadline = time.monotonic() + 60
    while not all(g and g[-1].finished for g in got) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got[-1][0].prompt_text is None and got[-1][0].prompt_logprobs is None
    for (p, (ad, k)), outs_j in zip(zip(prompts, cases), got):
        first, rest = outs_j[0], outs_j[1:]
        assert first.error is None and len(rest) == 2
        assert first.prompt_text == eng.tokenizer.decode(p, skip_special_tokens=True)
        assert all(o.prompt_text is None and o.prompt_logprobs is None for o in rest)
        if k is None:
            assert first.prompt_logprobs is None
            continue
        model = peft_model(tiny_assets.base, None if ad is None else tiny_assets.adapters_dir / ad)
        ref = reference_log_softmax(model, p)
        entries = first.prompt_logprobs
        assert [e.token_id for e in entries] == p
        assert entries[0].logprob is None and entries[0].top is None
        for t in range(1, len(p)):
            e = entries[t]
            assert abs(e.logprob - float(ref[t - 1, p[t]])) < TOL, (ad, t)
            assert len(e.top) == k
            if k:
                top = ref[t - 1].topk(k)
                assert [i for _, i, _ in e.top] == top.indices.tolist()
                assert max(abs(v - float(r)) for (_, _, v), r in zip(e.top, top.values)) < TOL


def test_score_equals_the_reference_logits_at_every_position(two_adapter_engine, tiny_assets):
    eng = two_adapter_engine
    ids = list(range(10, 40))
    for ad in (None, *tiny_assets.adapter_ids[:2]):
        def run():
            resident = eng.pin_adapter(ad) if ad is not None else None
            try:
                return eng.score_prompt(ids, resident)
            finally:
                if resident is not None:
                    eng.unpin_adapter(resident)

        ours = eng.run_in_engine(run)
        model = peft_model(tiny_assets.base, None if ad is None else tiny_assets.adapters_dir / ad)
        with torch.inference_mode():
            ref = model(input_ids=torch.tensor([ids])).logits[0].float()
        assert ours.shape == ref.shape and (ours - ref).abs().max() < TOL, ad
