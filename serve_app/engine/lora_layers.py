"""LoRA-capable projections: wrap a base linear once, serve any mix of adapters per batch.

One module per projection, created at start; adapters are data (see lora_manager), never
modules. For a batch whose rows use different adapters, the delta is

    h     = x @ A_active.T        # [N, R]   R = sum of the active adapters' ranks
    h[drop] = 0                   # [N, R]   row b keeps only its own adapter's columns
    out  += h @ B_active          # [N, out] B already holds alpha/r (one addmm)

``masked_fill`` rather than a multiply by a 0/1 mask: another adapter's column may hold an inf
(``0 * inf`` is NaN, and would reach every row); a fill writes an exact 0 whatever was there.

A fixed number of dense ops per projection whatever the number of adapters, instead of a
Python loop over adapters (PEFT's mixed batch) or a per-row weight gather (punica's BGMV
without its CUDA kernel). Projections that read the same input (q/k/v, gate/up) share the
first GEMM and the mask. The extra FLOPs grow with R: cheap at a few adapters per batch;
with many distinct adapters per batch on a small model they approach the base projection's.
"""

from __future__ import annotations

import torch
from torch import nn

from serve_app.engine.lora_manager import INPUT_GROUP, GroupBatch, LoRABatch


class LoRAContext:
    """The current forward's LoRABatch (set by the model runner) and its per-group A products."""

    __slots__ = ("batch", "_h")

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None
        self._h: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def set(self, batch: LoRABatch | None) -> None:
        self.batch = batch
        self._h.clear()

    def group_input(self, layer: int, group: str, x: torch.Tensor, g: GroupBatch) -> torch.Tensor:
        """x @ A_group for this layer, computed once for all projections that read ``x``."""
        cached = self._h.get((layer, group))
        if cached is not None and cached[0] is x:
            return cached[1]
        x2 = x.reshape(-1, x.shape[-1])  # [N, in], N = B * T
        h = torch.mm(x2, g.a_t[layer])  # [N, R]
        if g.drop is not None:
            rows = g.drop.shape[0]  # B; N = B * T in a prefill
            h.view(rows, -1, h.shape[-1]).masked_fill_(g.drop[:, None, :], 0)
        self._h[(layer, group)] = (x, h)
        return h


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, kind: str, layer: int, ctx: LoRAContext):
        super().__init__()
        self.base = base
        self.kind = kind
        self.group = INPUT_GROUP[kind]
        self.layer = layer
        self.ctx = ctx
        # bitsandbytes' Linear4bit / Linear8bitLt keep these too.
        self.in_features = base.in_features
        self.out_features = base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, in]
        out = self.base(x)  # [B, T, out]
        batch = self.ctx.batch
        if batch is None:
            return out
        g = batch.groups.get(self.group)
        if g is None or self.kind not in g.spans:
            return out
        start, end, b = g.spans[self.kind]
        h = self.ctx.group_input(self.layer, self.group, x, g)  # [N, R] masked
        out.view(-1, out.shape[-1]).addmm_(h[:, start:end], b[self.layer])  # += h_kind @ B_kind
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer={self.layer}"
