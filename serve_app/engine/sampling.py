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
