"""Token logprobs against plain transformers / PEFT: raw model log-softmax, per row, per adapter,
in one mixed batch (greedy and penalized rows beside rows that ask for none)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from serve_app.api.sampling_params import SamplingParams
from tests.helpers import peft_model, reference_steps

TOL = 1e-4  # fp32, our decoder loop vs transformers' forward (the greedy-parity tests' tolerance class)


def reference(model, prompt: list[int], n: int, k: int, procs: LogitsProcessorList | None = None):
    """(tokens, raw logprob of each, top-k ids of each): greedy on the processed scores, logprobs
    from the raw ones."""
    toks, lps, tops = [], [], []
    for t, raw in reference_steps(model, prompt, n, procs):
        lp = torch.log_softmax(raw, -1)
        toks.append(t)
        lps.append(float(lp[t]))
        tops.append(lp.topk(k).indices.tolist() if k else [])
    return toks, lps, tops


def test_logprobs_equal_the_reference_log_softmax_per_adapter_in_a_mixed_batch(two_adapter_engine, tiny_assets):
    rng = random.Random(3)
    n = 8
    a0, a1 = tiny_assets.adapter_ids[:2]
    cases = [  # (adapter, params)
        (None, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=3)),
        (a0, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0)),
        (a0, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)),  # asks for none
        (a1, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=5)),
        # Penalized (< 1 favours seen tokens): the choice follows the penalty, the reported logprobs stay the raw model's.
        (a1, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2, repetition_penalty=0.2)),
    ]
    prompts = [[1] + [rng.randrange(4, 500) for _ in range(rng.randrange(4, 12))] for _ in cases]
    outs = two_adapter_engine.generate_batch([(p, params, aid) for p, (aid, params) in zip(prompts, cases)])
    for (aid, params), prompt, out in zip(cases, prompts, outs):
        if params.logprobs is None:
            assert out.logprobs is None
            continue
        model = peft_model(tiny_assets.base, None if aid is None else tiny_assets.adapters_dir / aid)
        procs = (LogitsProcessorList([RepetitionPenaltyLogitsProcessor(params.repetition_penalty)])
                 if params.repetition_penalty != 1.0 else None)
        toks, lps, tops = reference(model, prompt, n, params.logprobs, procs)
        assert out.token_ids == toks, (aid, params)
        assert [e.token_id for e in out.logprobs] == toks
        for e, lp, top in zip(out.logprobs, lps, tops):
            assert abs(e.logprob - lp) < TOL, (aid, e, lp)
            assert [t for _, t, _ in e.top] == top, (aid, e.top, top)
            assert all(b <= a for (_, _, a), (_, _, b) in zip(e.top, e.top[1:])), "top not sorted"
            assert e.token == two_adapter_engine.tokenizer.decode([e.token_id])
        if procs is not None:  # the penalty changed the choice somewhere, so the check above could fail
            plain, _, _ = reference(model, prompt, n, 0)
            assert plain != toks
