"""Which LoRA path a step takes: a three-term cost model per input group and layer.

    seconds ~= OP_S * torch ops + FLOP_S * GEMM flops + BYTE_S * weight/copy bytes

On these CPUs a small op costs microseconds of dispatch, so the masked product (a fixed few
ops, but flops over the SUM of ranks for every row) wins at one or two adapters, the padded
``bmm`` (a fixed few ops, flops per row over its own rank, every adapter's weights read once)
wins at many, and ``loop`` (ops per contiguous run) wins when a few long prompts dominate the
step. The constants were fitted on the 2-core dev box (fp32, torch 2.13) with
``python -m benchmarks.lora_mix_bench --calibrate``, which re-measures and prints them; the
choice only needs their ratios to be right within a factor of about two near the crossovers.

The bmm terms count the step's members only: a slot buffer's range may also hold dead slots
(lora/slots.py), read as empty segments, but compaction keeps them to max(2, n/8), so the
estimate is low by at most that share of the weight bytes -- well inside the factor of two.

On CUDA the choice is simpler: ``masked`` when one adapter serves every row (two plain GEMMs),
else the Triton SGMV kernels.

The paths themselves are the backend objects of kernels/ (``kernel(path)``); this file only
weighs them. A new path is chosen automatically once its terms are added here; until then it
runs when forced (``LoRAManager.path``, ``SERVE_APP_LORA_PATH``).
"""

from __future__ import annotations

from serve_app.engine.lora.kernels.layout import runs_of, split_cut

__all__ = ["CPU_PATHS", "estimate", "group_kinds", "group_terms", "runs_of", "seconds", "split_cut"]

# Re-fitted 2026-12-02 (h16b) with benchmarks/lora_mix_bench.py --calibrate on the 2-core box,
# after prepare() was cached across decode steps: OP_S 8.1e-6, FLOP_S 1/135e9, BYTE_S 1/96e9
# (the calibration's weights are cache-hot, so BYTE_S is optimistic for DRAM-bound steps; the
# masked-vs-bmm choice reads about the same weight bytes either way, so it mostly cancels).
# Earlier fit (before the prepare cache): OP_S 1.7e-5, FLOP_S 1/120e9, BYTE_S 1/21e9, which
# chose masked for rank-8 q/k/v/o decode at 8 distinct, where bmm measured faster (0.94x vs
# 0.86x of base, W1). With this fit every W1 decode shape with 2+ distinct adapters picks bmm
# and one adapter on every row picks masked, as the forced-path table measures.
OP_S = 8.1e-6  # seconds per torch op (dispatch + small-kernel overhead)
FLOP_S = 1.0 / 135e9  # seconds per fp32 GEMM flop
BYTE_S = 1.0 / 96e9  # seconds per byte of weights read / rows copied

CPU_PATHS = ("masked", "loop", "bmm")  # the paths weighed on CPU (group_terms)


def group_kinds(kinds: dict, input_group: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for kind in kinds:
        out.setdefault(input_group[kind], []).append(kind)
    return out


def group_terms(
    n_tokens: int,
    runs: list[tuple[int, int, int]],
    counts: list[int],
    in_f: int,
    outs: dict[str, int],
    ranks: list[dict[str, int]],
    uniform: bool,
    elem: int = 4,
) -> dict[str, tuple[float, float, float]]:
    """(ops, flops, bytes) per path for one group and layer.

    ranks[j]: adapter j's rank per kind of this group (empty: j is not a member).
    """
    members = [j for j, r in enumerate(ranks) if r]
    kinds = [k for k in outs if any(k in ranks[j] for j in members)]
    # masked: h = x @ A_t over R = all members' ranks, mask, one addmm per kind (over all N tokens)
    r_kind = {k: sum(ranks[j].get(k, 0) for j in members) for k in kinds}
    r_all = sum(r_kind.values())
    m_ops = 1 + (0 if uniform else 1) + len(kinds)
    m_flops = 2 * n_tokens * in_f * r_all + sum(2 * n_tokens * r_kind[k] * outs[k] for k in kinds)
    m_bytes = elem * (in_f * r_all + sum(r_kind[k] * outs[k] for k in kinds)) + (0 if uniform else 2 * elem * n_tokens * r_all)
    # bmm: segments padded to the longest, ranks padded to the largest per kind; segments far
    # longer than the rest run as loop does (layout.split_cut)
    rmax = {k: max(ranks[j].get(k, 0) for j in members) for k in kinds}
    rp = sum(rmax.values())
    b_ops, b_flops, b_bytes = _bmm_terms(n_tokens, runs, counts, members, in_f, outs, ranks, kinds, rmax, elem)
    # loop: one mm + one addmm per kind the adapter has, per contiguous run; each run reads its weights
    l_ops, l_flops, l_bytes = _loop_terms([r for r in runs if ranks[r[2]]], in_f, outs, ranks, kinds, rp, elem)
    return {"masked": (m_ops, m_flops, m_bytes), "bmm": (b_ops, b_flops, b_bytes), "loop": (l_ops, l_flops, l_bytes)}


def _loop_terms(runs, in_f, outs, ranks, kinds, rp, elem) -> tuple[float, float, float]:
    """One mm + one addmm per kind the adapter has, per contiguous run; each run reads its weights."""
    ops = flops = nbytes = 0.0
    for t0, t1, j in runs:
        ln = t1 - t0
        mine = [k for k in kinds if k in ranks[j]]
        ops += 1 + len(mine)
        flops += 2 * ln * in_f * rp + sum(2 * ln * ranks[j][k] * outs[k] for k in mine)
        nbytes += elem * (in_f * rp + sum(ranks[j][k] * outs[k] for k in mine))
    return ops, flops, nbytes


def _bmm_terms(n_tokens, runs, counts, members, in_f, outs, ranks, kinds, rmax, elem) -> tuple[float, float, float]:
    """layout.py's bmm cases: identity (views, no gather/scatter), every token a member (one
    gather of x, then per kind a gather back + add), else a gather of x, per kind a keep-gather
    when padded and a scatter-add; long segments split off as loop runs."""
    rp = sum(rmax.values())
    cut = split_cut([counts[j] for j in members])
    split = (0.0, 0.0, 0.0)
    if cut is not None:
        long = {j for j in members if counts[j] > cut}
        split = _loop_terms([r for r in runs if r[2] in long], in_f, outs, ranks, kinds, rp, elem)
        members = [j for j in members if j not in long]
        runs = [r for r in runs if r[2] not in long]
    n = len(members)
    tok = sum(counts[j] for j in members)  # M: tokens of the bmm's members
    s_max = max(counts[j] for j in members)
    padded = any(counts[j] != s_max for j in members)
    slots = n * s_max
    mine = [(t0, t1) for t0, t1, j in runs if ranks[j]]
    all_members = tok == n_tokens
    if all_members and not padded and len(mine) == n:
        ops, moved = 1 + len(kinds), 0
    elif all_members:
        ops, moved = 2 + 3 * len(kinds), slots * in_f + sum(2 * n_tokens * outs[k] for k in kinds)
    else:
        ops = 2 + len(kinds) * (2 + (1 if padded else 0))
        moved = slots * in_f + sum(slots * outs[k] + 2 * tok * outs[k] for k in kinds)
    flops = 2 * slots * in_f * rp + sum(2 * slots * rmax[k] * outs[k] for k in kinds)
    nbytes = elem * (n * (in_f * rp + sum(rmax[k] * outs[k] for k in kinds)) + moved)
    return ops + split[0], flops + split[1], nbytes + split[2]


def seconds(terms: tuple[float, float, float]) -> float:
    ops, flops, nbytes = terms
    return OP_S * ops + FLOP_S * flops + BYTE_S * nbytes


def estimate(
    n_tokens: int,
    runs: list[tuple[int, int, int]],
    counts: list[int],
    groups: list[tuple[int, dict[str, int], list[dict[str, int]]]],
    uniform: bool,
    device_type: str = "cpu",
) -> dict[str, float]:
    """Estimated seconds per layer for each path available on ``device_type``.

    groups: per input group (in_features, {kind: out_features}, ranks per distinct adapter).
    """
    if device_type == "cuda":
        # Two plain GEMMs for one adapter on every row; otherwise the SGMV kernels, whose cost
        # is per row whatever the spread (no CPU-style dispatch trade-off to weigh).
        return {"masked": 0.0, "triton": 1.0} if uniform else {"masked": 1.0, "triton": 0.0}
    total = dict.fromkeys(CPU_PATHS, 0.0)
    for in_f, outs, ranks in groups:
        for path, terms in group_terms(n_tokens, runs, counts, in_f, outs, ranks, uniform).items():
            total[path] += seconds(terms)
    return total
