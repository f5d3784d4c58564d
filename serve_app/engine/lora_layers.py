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
with many distinct adapters per batch on a small model they exceed the base projection's.

So that is only one of the paths (``LoRABatch.path``, chosen per step by lora_kernels/cost.py).
The others cost per row, each token reading only its own adapter's stacked weights
(lora_kernels/layout.py):

    loop    per contiguous run of one adapter's tokens:  out[t0:t1] += x[t0:t1] @ A_j @ B_j
    bmm     tokens sorted by adapter, segments padded to S:
            h = bmm(x[pad_tok] [n, S, in], A [n, in, Rp]); out.index_add_(tok, bmm(h, B_k)[keep])
    triton  SGMV shrink/expand kernels over the sorted tokens (CUDA)
"""

from __future__ import annotations

import torch
from torch import nn

from serve_app.engine.arch import spec_for
from serve_app.engine.lora_kernels import sgmv_cpu
from serve_app.engine.lora_manager import GroupBatch, LoRABatch

_triton = None


def _sgmv_triton():
    global _triton
    if _triton is None:
        from serve_app.engine.lora_kernels import sgmv_triton

        _triton = sgmv_triton
    return _triton


class LoRAContext:
    """The current forward's LoRABatch (set by the model runner) and its per-group A products."""

    __slots__ = ("batch", "_h", "_per_token")

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None
        self._h: dict[tuple[int, str], tuple[torch.Tensor, object]] = {}
        self._per_token: LoRABatch | None = None

    def set(self, batch: LoRABatch | None) -> None:
        self.batch = batch
        self._per_token = None
        self._h.clear()

    def token_batch(self, n_tokens: int) -> LoRABatch:
        """The batch laid out per token of this forward (a per-row batch is expanded once)."""
        if self._per_token is None or self._per_token.rows != n_tokens:
            self._per_token = self.batch.per_token(n_tokens)
        return self._per_token

    def shrink(self, layer: int, group: str, x: torch.Tensor, g: GroupBatch, path: str):
        """x @ A for this layer and input group, once for every projection that reads ``x``:
        masked: [N, R] (other adapters' columns filled with 0); bmm: [n_seg, S, Rp];
        loop: per run [t, Rp]; triton: [M, Rp] in sorted-token order."""
        cached = self._h.get((layer, group))
        if cached is not None and cached[0] is x:
            return cached[1]
        x2 = x.reshape(-1, x.shape[-1])  # [N, in], N = B * T
        if path == "masked":
            h = torch.mm(x2, g.a_layers[layer])  # [N, R]
            if g.drop is not None:
                rows = g.drop.shape[0]  # B; N = B * T in a prefill
                h.view(rows, -1, h.shape[-1]).masked_fill_(g.drop[:, None, :], 0)
        elif path == "bmm":
            h = sgmv_cpu.bmm_shrink(x2, g.stack.a_layers[layer], g.layout)
        elif path == "loop":
            h = sgmv_cpu.loop_shrink(x2, g.stack.a_layers[layer], g.layout)
        else:
            h = _sgmv_triton().sgmv_shrink(x2, g.stack.a_layers[layer], g.layout)
        self._h[(layer, group)] = (x, h)
        return h


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, kind: str, layer: int, ctx: LoRAContext, group: str):
        super().__init__()
        self.base = base
        self.kind = kind
        self.group = group  # its input group (arch/): projections reading one input share x @ A
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
        # (GroupBatch, first col, end col, per-layer B), built once per batch: a few Python ops
        # per projection, no tensor select
        kb = batch.kinds.get(self.kind)
        if kb is None:
            return out
        out2 = out.view(-1, out.shape[-1])  # [N, out]
        path = batch.path
        if path != "masked" and batch.rows != out2.shape[0]:  # prepared per row: expand per token
            kb = self.ctx.token_batch(out2.shape[0]).kinds[self.kind]
        g, start, end, b_layers = kb
        h = self.ctx.shrink(self.layer, self.group, x, g, path)
        b_l = b_layers[self.layer]  # masked: [R_kind, out]; per-row paths: [n, e - s, out]
        if path == "masked":
            out2.addmm_(h[:, start:end], b_l)  # += h_kind @ B_kind
        elif path == "bmm":
            sgmv_cpu.bmm_expand(out2, h, b_l, start, end, g.layout)
        elif path == "loop":
            sgmv_cpu.loop_expand(out2, h, b_l, start, self.kind, g.stack.ranks, g.layout)
        else:
            _sgmv_triton().sgmv_expand(out2, h, b_l, start, g.layout)
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer={self.layer}"


def wrap_lora_layers(model: nn.Module, kinds: tuple[str, ...], ctx: LoRAContext) -> None:
    """Wrap each targeted projection of ``model`` (where its architecture keeps them, arch/)
    in a LoRALinear reading ``ctx``."""
    spec_for(model).wrap_lora_layers(model, kinds, lambda base, kind, i, group: LoRALinear(base, kind, i, ctx, group))
