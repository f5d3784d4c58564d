"""Penalties, logit_bias and min_tokens against transformers' own logits processors.

transformers has no OpenAI frequency / presence penalty, so those are checked against OpenAI's
documented formula written here as a transformers LogitsProcessor. Checked per row in mixed
batches (rows that ask for nothing must be bit-identical), and end to end through the engine's
greedy decoding against a plain-transformers / PEFT loop on the same files.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from serve_app.api.protocol import CompletionRequest
from serve_app.api.sampling_params import SamplingParams
from serve_app.engine.sampling import LogitsRow, apply_logits_processors
from serve_app.errors import InvalidRequestError
from tests.helpers import peft_model, reference_steps

VOCAB = 512


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's formula: logit -= frequency * count(output) + presence * (count(output) > 0)."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        counts = torch.bincount(input_ids[0, self.prompt_len:], minlength=scores.shape[-1]).to(scores.dtype)
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def hf_processors(p: SamplingParams, prompt_len: int, eos: list[int]) -> LogitsProcessorList:
    """transformers' processors for ``p``, in the order our sampler documents."""
    procs = []
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.frequency_penalty or p.presence_penalty:
        procs.append(OpenAIPenalties(prompt_len, p.frequency_penalty, p.presence_penalty))
    if p.logit_bias:
        procs.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in p.logit_bias.items()]))
    if p.min_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, p.min_tokens, eos))
    return LogitsProcessorList(procs)


ROW_PARAMS = [
    SamplingParams(max_tokens=16),  # nothing: must stay bit-identical
    SamplingParams(max_tokens=16, repetition_penalty=1.3),
    SamplingParams(max_tokens=16, repetition_penalty=0.7),
    SamplingParams(max_tokens=16, frequency_penalty=0.8, presence_penalty=-0.5),
    SamplingParams(max_tokens=16, logit_bias={3: 100.0, 7: -100.0, 11: 2.5}),
    SamplingParams(max_tokens=16, min_tokens=10, stop_token_ids=[5]),
    SamplingParams(max_tokens=16, repetition_penalty=1.1, frequency_penalty=0.3, logit_bias={9: -3.0}, min_tokens=2),
]


def test_processors_equal_transformers_per_row_in_one_batch():
    rng = random.Random(0)
    torch.manual_seed(0)
    logits = torch.randn(len(ROW_PARAMS), VOCAB) * 3
    eos = [2]
    rows, expected = [], []
    for i, p in enumerate(ROW_PARAMS):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(3, 20))]
        output = [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 8))] + [3, 3]  # repeats on purpose
        ids = torch.tensor([prompt + output])
        expected.append(hf_processors(p, len(prompt), eos + p.stop_token_ids)(ids, logits[i : i + 1].clone())[0])
        if p.processes_logits:
            rows.append(LogitsRow(i, p, prompt, output, frozenset(eos + p.stop_token_ids)))
    ours = logits.clone()
    assert apply_logits_processors(ours, rows) == {}
    assert torch.equal(ours[0], logits[0]), "a row that asks for nothing changed"
    for i in range(1, len(ROW_PARAMS)):
        torch.testing.assert_close(ours[i], expected[i], rtol=0, atol=1e-5, msg=f"row {i}: {ROW_PARAMS[i]}")
    assert ours[4, 3] > logits[4].max() and ours[4, 7] < -90
    assert ours[5, 2] == float("-inf") and ours[5, 5] == float("-inf")  # 10 tokens not reached yet


def test_a_row_whose_processing_breaks_fails_alone():
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    good = LogitsRow(0, SamplingParams(max_tokens=4, repetition_penalty=1.5), [1, 2], [3], frozenset())
    broken = LogitsRow(1, SamplingParams(max_tokens=4, logit_bias={VOCAB + 50: 1.0}), [1], [], frozenset())
    errors = apply_logits_processors(logits, [good, broken])
    assert list(errors) == [1]
    assert logits[0, 1] == before[0, 1] / 1.5 if before[0, 1] > 0 else logits[0, 1] == before[0, 1] * 1.5
    assert torch.equal(logits[2], before[2])


def test_engine_greedy_with_processors_equals_transformers_in_a_mixed_batch(two_adapter_engine, tiny_assets):
    """Rows with penalties, bias and min_tokens share steps with plain rows, base and adapters;
    each equals its own reference, and the plain rows equal plain greedy."""
    rng = random.Random(1)
    eos = sorted(two_adapter_engine.eos_ids)
    n = 12
    cases = [  # (adapter, params)
        (None, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)),
        (None, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, repetition_penalty=1.8)),
        (tiny_assets.adapter_ids[0], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                    frequency_penalty=1.5, presence_penalty=0.5)),
        (tiny_assets.adapter_ids[0], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)),
        (tiny_assets.adapter_ids[1], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                    logit_bias={17: 8.0, 40: -100.0}, repetition_penalty=1.2)),
        # EOS pushed up by +100 but held back for 5 tokens: exactly 5 other tokens, then EOS.
        (tiny_assets.adapter_ids[1], SamplingParams(max_tokens=n, temperature=0.0,
                                                    logit_bias={eos[0]: 100.0}, min_tokens=5)),
    ]
    prompts = [[1] + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(4, 12))] for _ in cases]
    outs = two_adapter_engine.generate_batch([(p, params, aid) for p, (aid, params) in zip(prompts, cases)])
    for (aid, params), prompt, out in zip(cases, prompts, outs):
        model = peft_model(tiny_assets.base, None if aid is None else tiny_assets.adapters_dir / aid)
        stops = set() if params.ignore_eos else set(eos)
        want = [t for t, _ in reference_steps(model, prompt, n, hf_processors(params, len(prompt), eos), stops)]
        assert out.token_ids == want, f"{aid} {params}: {out.token_ids} != transformers {want}"
        if params.processes_logits:  # the case is a real one: without the processors the output differs
            plain = [t for t, _ in reference_steps(model, prompt, n, None, stops)]
            assert plain != want, f"{params} does not change this prompt's greedy output"
    last = outs[-1]
    assert len(last.token_ids) == 6 and last.token_ids[-1] == eos[0] and last.finish_reason == "stop"


def test_logit_bias_token_outside_the_vocabulary_is_a_clear_400(two_adapter_engine):
    with pytest.raises(InvalidRequestError, match=r"logit_bias token id 9999 is out of range.*\[0, 512\)"):
        two_adapter_engine.generate_batch([([1, 5, 6], SamplingParams(max_tokens=2, logit_bias={9999: 1.0}), None)])


@pytest.mark.parametrize("body, pattern", [
    ({"logit_bias": {"x1": 5}}, "logit_bias keys must be token IDs"),
    ({"logit_bias": {"5": 100.5}}, r"logit_bias values must be in \[-100, 100\]"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "at most 1024 logit_bias entries"),
    ({"repetition_penalty": 0}, r"\[0.01, 10\]"),
    ({"repetition_penalty": 1e-300}, r"\[0.01, 10\]"),  # would divide logits into inf
    ({"repetition_penalty": 11}, r"\[0.01, 10\]"),
    ({"frequency_penalty": -2.5}, r"\[-2, 2\]"),
    ({"presence_penalty": 2.01}, r"\[-2, 2\]"),
    ({"min_tokens": -1}, r"\[0, 2147483647\]"),
])
def test_bad_values_are_refused_at_the_edge_naming_the_range(body, pattern):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=pattern):
        CompletionRequest(model="m", prompt="hi", **body)


def test_min_tokens_above_max_tokens_is_refused_naming_both():
    req = CompletionRequest(model="m", prompt="hi", max_tokens=4, min_tokens=9)
    with pytest.raises(InvalidRequestError, match=r"min_tokens must be in \[0, max_tokens \(4\)\], got 9"):
        req.to_sampling_params(16)


def test_accepted_values_reach_the_sampling_params():
    p = CompletionRequest(model="m", prompt="hi", max_tokens=8, logit_bias={"12": -100, "3": 4.5}, min_tokens=2,
                          repetition_penalty=1.15, frequency_penalty=0.25, presence_penalty=-0.75).to_sampling_params(16)
    assert (p.logit_bias, p.min_tokens, p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (
        {12: -100.0, 3: 4.5}, 2, 1.15, 0.25, -0.75)
    assert not CompletionRequest(model="m", prompt="hi").to_sampling_params(16).processes_logits
