"""LoRA-capable projections: wrap a base linear once, serve any mix of adapters per batch.

One module per projection, created at start; adapters are data (see manager.py), never
modules. Each forward reads the step's ``LoRABatch`` from a ``LoRAContext`` (set by the model
runner around the decoder loop) and adds every token's own adapter's delta

    out += (x @ A_adapter(t)) @ B_adapter(t)      # B already holds alpha/r

through the batch's kernel path (lora/kernels/: ``masked``, ``loop``, ``bmm``, ``triton``;
chosen per step by the cost model, kernels/cost.py). A path computes the ``shrink`` (x @ A)
once per input group and layer -- q/k/v, and gate/up, read the same input and share it -- and
the ``expand`` (h @ B) per projection:

    masked  h = x @ A_active.T [N, R], other adapters' columns filled with 0; out += h @ B_active
    loop    per contiguous run of one adapter's tokens:  out[t0:t1] += x[t0:t1] @ A_j @ B_j
    bmm     tokens sorted by adapter, segments padded to S:
            h = bmm(x[pad_tok] [n, S, in], A [n, in, Rp]); out.index_add_(tok, bmm(h, B_k)[keep])
    triton  SGMV shrink/expand kernels over the sorted tokens (CUDA)

The batch types the manager builds and these layers read live here too: ``LoRABatch`` (per
step) and ``GroupBatch`` (per input group).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from serve_app.engine.arch import spec_for
from serve_app.engine.lora.kernels import LoRAKernel, kernel
from serve_app.engine.lora.kernels.layout import SegmentLayout, StackedGroup


@dataclass
class GroupBatch:
    # masked path (None otherwise)
    a_t: torch.Tensor | None  # [num_layers, in, R]: A rows of every active adapter, every kind of the group
    drop: torch.Tensor | None  # [B, R] bool: True where column r is NOT row b's adapter's; None: one adapter for all
    spans: dict[str, tuple[int, int, torch.Tensor]]  # kind -> (first col, end col, B [num_layers, r, out])
    # per-row paths (loop / bmm / triton; None for masked)
    stack: StackedGroup | None = None  # adapter-major weights, spans: kind -> (s, e, B [L, n, e - s, out])
    layout: SegmentLayout | None = None  # this step's tokens of the group's members
    # Per-layer views of the weights a forward reads (a_t's / the stack's, unbound once per gather)
    a_layers: list[torch.Tensor] | None = None  # [L] of masked [in, R] or stacked [n, in, Rp]
    b_layers: dict[str, list[torch.Tensor]] | None = None  # kind -> [L] of masked [r, out] or stacked [n, e - s, out]

    def __post_init__(self) -> None:
        if self.stack is not None:
            self.a_layers, self.b_layers = self.stack.a_layers, self.stack.b_layers
        elif self.a_layers is None:
            self.a_layers = list(self.a_t.unbind(0))
            self.b_layers = {k: list(b.unbind(0)) for k, (_, _, b) in self.spans.items()}


@dataclass
class LoRABatch:
    """Per-forward LoRA state read by every LoRALinear: which rows use which adapter's weights."""

    groups: dict[str, GroupBatch]
    poisoned: frozenset[int] = frozenset()  # load IDs of adapters whose rows were not finite (zeroed here): fail their rows
    path: str = "masked"  # how the LoRALinears compute it (kernels.PATHS)
    rows: int = 0  # entries given to prepare: tokens of the forward, or rows of T tokens each
    uniform: bool = False  # one adapter for every row
    tok_adapter: list[int] | None = None  # [rows] index into the step's distinct adapters, -1: base
    costs: dict[str, float] | None = None  # the cost model's estimate per path (seconds), when it chose
    # kind -> (its GroupBatch, first col, end col, B per layer): what a LoRALinear reads
    kinds: dict[str, tuple] = field(default_factory=dict)
    kernel: LoRAKernel = field(init=False, repr=False)  # the path's backend object

    def __post_init__(self) -> None:
        self.kernel = kernel(self.path)
        if not self.kinds:
            for g in self.groups.values():
                for kind, (s, e, _) in g.spans.items():
                    self.kinds[kind] = (g, s, e, g.b_layers[kind])

    def per_token(self, n_tokens: int) -> LoRABatch:
        """The same batch for a forward of ``n_tokens`` tokens when it was prepared per row
        (``rows`` rows of ``n_tokens / rows`` tokens each); self when it already is per token."""
        if n_tokens == self.rows or not self.kernel.stacked:
            return self
        if self.uniform:
            tok = [0] * n_tokens
        else:
            if n_tokens % self.rows:
                raise ValueError(f"a per-row LoRABatch of {self.rows} rows cannot cover {n_tokens} tokens")
            t = n_tokens // self.rows
            tok = [j for j in self.tok_adapter for _ in range(t)]
        groups = {}
        for name, g in self.groups.items():
            lay = self.kernel.layout(tok, g.stack.member_of, g.stack.a.shape[1], g.stack.a.device)
            groups[name] = GroupBatch(a_t=None, drop=None, spans=g.spans, stack=g.stack, layout=lay)
        return LoRABatch(groups=groups, poisoned=self.poisoned, path=self.path, rows=n_tokens,
                         uniform=self.uniform, tok_adapter=tok, costs=self.costs)


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

    def shrink(self, layer: int, group: str, x: torch.Tensor, g: GroupBatch, kern: LoRAKernel):
        """x @ A for this layer and input group, once for every projection that reads ``x``
        (the form of h is the kernel path's: masked [N, R]; bmm [n_seg, S, Rp]; loop per run
        [t, Rp]; triton [M, Rp] in sorted-token order)."""
        cached = self._h.get((layer, group))
        if cached is not None and cached[0] is x:
            return cached[1]
        h = kern.shrink(x.reshape(-1, x.shape[-1]), g, layer)  # x: [N, in], N = B * T
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
        kern = batch.kernel
        if kern.stacked and batch.rows != out2.shape[0]:  # prepared per row: expand per token
            kb = self.ctx.token_batch(out2.shape[0]).kinds[self.kind]
        g, start, end, b_layers = kb
        h = self.ctx.shrink(self.layer, self.group, x, g, kern)
        kern.expand(out2, h, g, self.kind, start, end, b_layers[self.layer])  # masked b: [R_kind, out]; stacked [n, e - s, out]
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer={self.layer}"


def wrap_lora_layers(model: nn.Module, kinds: tuple[str, ...], ctx: LoRAContext) -> None:
    """Wrap each targeted projection of ``model`` (where its architecture keeps them, arch/)
    in a LoRALinear reading ``ctx``."""
    spec_for(model).wrap_lora_layers(model, kinds, lambda base, kind, i, group: LoRALinear(base, kind, i, ctx, group))
