"""LoRA-capable projections: wrap a base linear once, serve any mix of adapters per batch.

One module per projection, created at start; adapters are data (see lora_manager), never
modules. For a batch whose rows use different adapters, the delta is

    h     = x @ A_active.T        # [B, T, R]   R = sum of the active adapters' ranks
    h    *= mask                  # [B, 1, R]   row b keeps only its own adapter's columns
    out  += h @ B_active          # [B, T, out] B already holds alpha/r

Three dense GEMM-sized ops per projection whatever the number of adapters, instead of a
Python loop over adapters (PEFT's mixed batch) or a per-row weight gather (punica's BGMV
without its CUDA kernel). Its extra FLOPs grow with R, which stays small next to the base
projection for the tens of adapters a batch holds.
"""

from __future__ import annotations

import torch
from torch import nn

from serve_app.engine.lora_manager import LoRABatch


class LoRAContext:
    """Holds the current forward's LoRABatch; set by the model runner around each forward."""

    __slots__ = ("batch",)

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, kind: str, layer: int, ctx: LoRAContext):
        super().__init__()
        self.base = base
        self.kind = kind
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
        kb = batch.kinds.get(self.kind)
        if kb is None:
            return out
        h = torch.matmul(x, kb.a_t[self.layer])  # [B, T, R]
        if kb.mask is not None:
            h.mul_(kb.mask)
        return out.add_(torch.matmul(h, kb.b[self.layer]))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer={self.layer}"
