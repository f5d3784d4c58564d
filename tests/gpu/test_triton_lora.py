"""Triton SGMV kernels compiled on CUDA: agreement with the CPU path, and the engine's choice."""

from __future__ import annotations

import random

import pytest
import torch

from serve_app.engine.lora.kernels import cost, sgmv_cpu
from serve_app.engine.lora.kernels.layout import build_layout

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_sgmv_on_cuda_equals_cpu_bmm(dtype, tol):
    from serve_app.engine.lora.kernels import sgmv_triton

    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    n_tok, in_f, out_f, ranks = 300, 576, 1536, [8, 16, 64, 8, 32, 16]
    n, rp = len(ranks), max(ranks)
    a = torch.zeros(n, in_f, rp)
    b = torch.zeros(n, rp, out_f)
    for i, r in enumerate(ranks):
        a[i, :, :r] = torch.randn(in_f, r, generator=g) * in_f**-0.5
        b[i, :r] = torch.randn(r, out_f, generator=g) * r**-0.5
    member_of = list(range(n))
    tok_adapter = [rng.choice([-1, *range(n)]) for _ in range(n_tok)]
    x = torch.randn(n_tok, in_f, generator=g)
    base = torch.randn(n_tok, out_f, generator=g)
    lay_b = build_layout(tok_adapter, member_of, n, "bmm", torch.device("cpu"))
    ref = base.clone()
    sgmv_cpu.bmm_expand(ref, sgmv_cpu.bmm_shrink(x, a, lay_b), b, 0, rp, lay_b)
    dev = torch.device("cuda")
    lay_t = build_layout(tok_adapter, member_of, n, "triton", dev)
    out = base.to(dev, dtype)
    h = sgmv_triton.sgmv_shrink(x.to(dev, dtype), a.to(dev, dtype), lay_t)
    sgmv_triton.sgmv_expand(out, h, b.to(dev, dtype), 0, lay_t)
    assert (out.float().cpu() - ref).abs().max().item() <= tol


def test_cuda_picks_triton_for_mixed_batches():
    d = cost.estimate(64, [], [1] * 64, [], False, "cuda")
    assert min(d, key=d.get) == "triton"
