"""The batched sampler (the parameters are serve_app/api/sampling_params.py: no torch).

Greedy rows are one vectorized argmax. Sampled rows share the temperature / top-k /
top-p filtering as batched tensor ops; only the final draw is per row, because a
request's ``seed`` owns a private ``torch.Generator`` so its output does not depend
on which other requests share the batch.

Rows are contained: ``sample`` returns an error for a row whose logits are not finite or
whose parameters break the draw, and picks every other row's token as if it were alone.
One tenant's sampling values never fail another tenant's step. Values are clamped to what
they can mean: top_k to the vocabulary, top_p to ``MIN_TOP_P`` (below 1/vocab both keep only
the most likely token).
"""

from __future__ import annotations

import torch

from serve_app.api.sampling_params import SamplingParams
from serve_app.errors import ServeAppError

MIN_TOP_P = 1e-6


class LogitsRow:
    """What the logits processors read of one row: its parameters and token history."""

    __slots__ = ("index", "params", "prompt_ids", "output_ids", "blocked_early")

    def __init__(self, index: int, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
                 blocked_early: frozenset[int]):
        self.index = index  # row in the step's logits
        self.params = params
        self.prompt_ids = prompt_ids
        self.output_ids = output_ids
        self.blocked_early = blocked_early  # EOS + stop_token_ids: masked while output < min_tokens


class SamplingError(ServeAppError):
    """One row could not be sampled (non-finite logits, or its parameters broke the draw)."""

    status_code = 500
    error_type = "internal_error"
    code = "sampling_failed"


def sample(
    logits: torch.Tensor,  # [B, vocab], float
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], dict[int, SamplingError]]:
    """One token per row, and the rows that could not be sampled (row index -> error)."""
    best, picked = logits.max(dim=-1)  # [B]; max propagates NaN, so ``best`` flags broken rows
    out = picked.tolist()
    errors: dict[int, SamplingError] = {}
    if not bool(torch.isfinite(best).all()):
        for i in (~torch.isfinite(best)).nonzero().flatten().tolist():
            errors[i] = SamplingError(
                "the model produced non-finite logits for this request (its adapter's weights overflow); "
                "the request was stopped"
            )
    rows = [i for i, p in enumerate(params) if not p.greedy and i not in errors]
    if not rows:
        return out, errors
    try:
        probs = _filtered_probs(logits[rows].float(), [params[i] for i in rows])  # [S, vocab]
        for j, i in enumerate(rows):
            out[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]).item())
    except Exception:
        # Something in one row broke the batched draw: redo each row alone, failing only its own.
        for i in rows:
            try:
                probs = _filtered_probs(logits[i : i + 1].float(), [params[i]])
                out[i] = int(torch.multinomial(probs[0], 1, generator=generators[i]).item())
            except Exception as e:
                errors[i] = SamplingError(f"sampling failed for this request ({type(e).__name__}); the request was stopped")
    return out, errors


def apply_logits_processors(logits: torch.Tensor, rows: list[LogitsRow]) -> dict[int, SamplingError]:
    """Apply each row's processors to ``logits`` [B, vocab] in place, before temperature (so
    greedy rows see them too), in vLLM's order:

    1. repetition_penalty over prompt + output tokens (transformers' and vLLM's rule: a seen
       token's logit is divided by the penalty when positive, multiplied when negative);
    2. frequency / presence penalties over output tokens (OpenAI's rule:
       ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``);
    3. logit_bias added (token ids were checked against the vocabulary at submit);
    4. min_tokens: EOS and stop_token_ids get -inf while the output is shorter.

    Rows not in ``rows`` are untouched. Batched over the rows that ask; if the batch breaks,
    each row is redone alone and only a row that breaks on its own fails (row index -> error).
    """
    if not rows:
        return {}
    try:
        _apply(logits, rows)
        return {}
    except Exception:
        errors: dict[int, SamplingError] = {}
        for r in rows:
            try:
                _apply(logits, [r])
            except Exception as e:
                errors[r.index] = SamplingError(
                    f"applying this request's penalties or logit_bias failed ({type(e).__name__}); "
                    "the request was stopped")
        return errors


def _padded(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """([S, W] long ids, each row padded with its own first id (or 0), [S, W] bool: real)."""
    width = max(1, max(len(q) for q in seqs))
    ids = torch.tensor([q + [q[0] if q else 0] * (width - len(q)) for q in seqs], dtype=torch.long, device=device)
    lens = torch.tensor([len(q) for q in seqs], device=device)
    return ids, torch.arange(width, device=device)[None, :] < lens[:, None]


@torch.inference_mode()  # the step's logits are inference tensors: written in place only under it
def _apply(logits: torch.Tensor, rows: list[LogitsRow]) -> None:
    """On a copy of the rows, written back only if every processor succeeded (so a retry never
    applies a penalty twice)."""
    idx = torch.tensor([r.index for r in rows], device=logits.device)
    sel = logits.index_select(0, idx)  # [S, vocab]
    _processors(sel, rows)
    logits[idx] = sel


def _processors(logits: torch.Tensor, rows: list[LogitsRow]) -> None:
    """``logits`` [S, vocab]: row j is ``rows[j]``'s. Sparse: each op touches only the tokens a
    row has seen (gather, change, scatter back), never a [S, vocab] mask."""
    device, vocab = logits.device, logits.shape[-1]
    pos = {id(r): j for j, r in enumerate(rows)}
    rep = [r for r in rows if r.params.repetition_penalty != 1.0]
    if rep:
        idx = torch.tensor([pos[id(r)] for r in rep], device=device)
        seen, _ = _padded([r.prompt_ids + r.output_ids for r in rep], device)  # [R, W]; pads repeat a seen id
        sub = logits[idx]  # [R, vocab]
        vals = sub.gather(1, seen)  # [R, W]
        pen = torch.tensor([r.params.repetition_penalty for r in rep], dtype=logits.dtype, device=device)[:, None]
        # Each seen token once, whatever its count: duplicates write the same value.
        sub.scatter_(1, seen, torch.where(vals > 0, vals / pen, vals * pen))
        logits[idx] = sub
    fp = [r for r in rows if (r.params.frequency_penalty or r.params.presence_penalty) and r.output_ids]
    if fp:
        idx = torch.tensor([pos[id(r)] for r in fp], device=device)
        sub = logits[idx]  # [F, vocab]
        out, real = _padded([r.output_ids for r in fp], device)  # [F, W]
        freq = torch.tensor([r.params.frequency_penalty for r in fp], dtype=logits.dtype, device=device)[:, None]
        sub.scatter_add_(1, out, -freq * real.to(logits.dtype))  # once per occurrence: frequency * count
        uniq, _ = _padded([list(dict.fromkeys(r.output_ids)) for r in fp], device)  # [F, U]
        pres = torch.tensor([r.params.presence_penalty for r in fp], dtype=logits.dtype, device=device)[:, None]
        sub.scatter_(1, uniq, sub.gather(1, uniq) - pres)  # once per distinct token: presence
        logits[idx] = sub
    bias_rows, bias_toks, bias_vals = [], [], []
    for j, r in enumerate(rows):
        for tok, b in r.params.logit_bias.items():
            bias_rows.append(j)
            bias_toks.append(tok)
            bias_vals.append(b)
    if bias_rows:
        logits.index_put_(
            (torch.tensor(bias_rows, device=device), torch.tensor(bias_toks, device=device)),
            torch.tensor(bias_vals, dtype=logits.dtype, device=device), accumulate=True,
        )
    early_rows, early_toks = [], []
    for j, r in enumerate(rows):
        if len(r.output_ids) < r.params.min_tokens:
            for tok in r.blocked_early:
                if tok < vocab:
                    early_rows.append(j)
                    early_toks.append(tok)
    if early_rows:
        logits[torch.tensor(early_rows, device=device), torch.tensor(early_toks, device=device)] = float("-inf")


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    device = logits.device
    temp = torch.tensor([p.temperature for p in params], device=device)
    logits = logits / temp[:, None]
    vocab = logits.shape[-1]
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    top_p = [min(max(p.top_p, MIN_TOP_P), 1.0) for p in params]
    if min(top_k) < vocab or min(top_p) < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [S, vocab]
        ranks = torch.arange(vocab, device=device)[None, :]
        drop = ranks >= torch.tensor(top_k, device=device)[:, None]
        probs_sorted = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass strictly before it already reaches top_p; the
        # most likely token is always kept.
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
        drop |= mass_before >= torch.tensor(top_p, device=device)[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)
