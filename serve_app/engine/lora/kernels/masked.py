"""The masked path: one dense product over every active adapter's columns, a mask per row.

For a batch whose rows use different adapters, the delta is

    h     = x @ A_active.T        # [N, R]   R = sum of the active adapters' ranks
    h[drop] = 0                   # [N, R]   row b keeps only its own adapter's columns
    out  += h @ B_active          # [N, out] B already holds alpha/r (one addmm)

``masked_fill`` rather than a multiply by a 0/1 mask: another adapter's column may hold an inf
(``0 * inf`` is NaN, and would reach every row); a fill writes an exact 0 whatever was there.

A fixed number of dense ops per projection whatever the number of adapters, instead of a
Python loop over adapters (PEFT's mixed batch) or a per-row weight gather (punica's BGMV
without its CUDA kernel). Projections that read the same input (q/k/v, gate/up) share the
first GEMM and the mask. The extra FLOPs grow with R: cheap at a few adapters per batch (and
the choice whenever one adapter serves every row); with many distinct adapters per batch on a
small model they exceed the base projection's, and the per-row paths (sgmv_cpu.py) win.
"""

from __future__ import annotations

from typing import Any

import torch

from serve_app.engine.lora.kernels.base import LoRAKernel


class MaskedKernel(LoRAKernel):
    name = "masked"
    stacked = False

    def shrink(self, x2: torch.Tensor, g: Any, layer: int) -> torch.Tensor:
        """-> h [N, R], other adapters' columns filled with 0."""
        h = torch.mm(x2, g.a_layers[layer])  # [N, R]
        if g.drop is not None:
            rows = g.drop.shape[0]  # B; N = B * T in a prefill
            h.view(rows, -1, h.shape[-1]).masked_fill_(g.drop[:, None, :], 0)
        return h

    def expand(self, out2: torch.Tensor, h: torch.Tensor, g: Any, kind: str, start: int, end: int,
               b_l: torch.Tensor) -> None:
        out2.addmm_(h[:, start:end], b_l)  # += h_kind @ B_kind; b_l: [R_kind, out]


KERNEL = MaskedKernel()
