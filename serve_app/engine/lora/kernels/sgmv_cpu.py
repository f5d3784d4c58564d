"""CPU per-row LoRA products over a ``SegmentLayout`` (see layout.py for the weight shapes).

Two ways to make each token pay only for its own adapter's rank:

- ``loop``: one GEMM pair per contiguous run of tokens that share an adapter, on views of the
  input and output (no copies). A prefill prompt is one run; a decode batch with D distinct
  adapters is up to D runs, so the cost is per-op overhead times runs -- good for a few long
  runs, poor for many one-token rows.
- ``bmm``: tokens sorted by adapter, each adapter's segment padded to the longest one, and one
  batched GEMM pair for all segments (BGMV/SGMV as two ``torch.bmm``). A fixed number of ops
  whatever the number of adapters; every adapter's weights are read once per step. Padding
  slots repeat their own segment's first token and are dropped before the scatter. A segment
  far longer than the others (a prompt among decode rows, ``layout.split_cut``) is not padded
  to: it runs as ``loop`` does, on views, and the bmm covers the rest.
"""

from __future__ import annotations

from typing import Any

import torch

from serve_app.engine.lora.kernels.base import LoRAKernel
from serve_app.engine.lora.kernels.layout import SegmentLayout, build_layout


def bmm_shrink(x2: torch.Tensor, a_l: torch.Tensor, lay: SegmentLayout):
    """x2: [N, in], a_l: [n, in, Rp] -> h: [n_seg, S, Rp] (segment s = member seg_member[s]);
    with split runs, (h, per run [t1 - t0, Rp])."""
    h = _bmm_shrink(x2, a_l, lay)
    if lay.split:
        return h, [torch.mm(x2[t0:t1], a_l[m]) for t0, t1, m in lay.split]
    return h


def _bmm_shrink(x2: torch.Tensor, a_l: torch.Tensor, lay: SegmentLayout) -> torch.Tensor:
    if lay.members_t is not None:
        a_l = a_l.index_select(0, lay.members_t)  # [n_seg, in, Rp]
    if lay.identity:
        xs = x2.view(len(lay.seg_len), lay.s_max, x2.shape[1])  # [n_seg, S, in]: the tokens in place
    else:
        n_seg, s = lay.pad_tok.shape
        xs = x2.index_select(0, lay.pad_tok.view(-1)).view(n_seg, s, x2.shape[1])  # [n_seg, S, in]
    return torch.bmm(xs, a_l)  # [n_seg, S, Rp]


def bmm_expand(out2: torch.Tensor, h, b_l: torch.Tensor, start: int, end: int, lay: SegmentLayout) -> None:
    """out2: [N, out] += per token h[.., start:end] @ its member's b_l: [n, r, out] (in place)."""
    if lay.split:
        h, hs = h
        for (t0, t1, m), hr in zip(lay.split, hs):
            out2[t0:t1].addmm_(hr[:, start:end], b_l[m])  # [t, r] @ [r, out] (zero rows past m's rank)
    _bmm_expand(out2, h, b_l, start, end, lay)


def _bmm_expand(out2: torch.Tensor, h: torch.Tensor, b_l: torch.Tensor, start: int, end: int, lay: SegmentLayout) -> None:
    if lay.members_t is not None:
        b_l = b_l.index_select(0, lay.members_t)  # [n_seg, r, out]
    if lay.identity:  # out's rows are the sorted tokens: accumulate in place
        out2.view(h.shape[0], h.shape[1], out2.shape[1]).baddbmm_(h[:, :, start:end], b_l)  # [n_seg, S, out]
        return
    d = torch.bmm(h[:, :, start:end], b_l).view(-1, out2.shape[1])  # [n_seg * S, out]
    if lay.inv is not None:  # every token a member: gather each token's slot back into token order
        out2.add_(d.index_select(0, lay.inv))  # [N, out]
        return
    if lay.keep is not None:
        d = d.index_select(0, lay.keep)  # [M, out]: padding slots dropped
    out2.index_add_(0, lay.tok, d)


def loop_shrink(x2: torch.Tensor, a_l: torch.Tensor, lay: SegmentLayout) -> list[torch.Tensor]:
    """x2: [N, in], a_l: [n, in, Rp] -> per run [t1 - t0, Rp]."""
    return [torch.mm(x2[t0:t1], a_l[m]) for t0, t1, m in lay.runs]


def loop_expand(
    out2: torch.Tensor,
    hs: list[torch.Tensor],
    b_l: torch.Tensor,
    start: int,
    kind: str,
    ranks: list[dict[str, int]],
    lay: SegmentLayout,
) -> None:
    """out2[t0:t1] += h_run[:, start:start + r] @ b_l[m, :r] per run (r: the member's own rank)."""
    for (t0, t1, m), h in zip(lay.runs, hs):
        r = ranks[m].get(kind, 0)
        if r:
            out2[t0:t1].addmm_(h[:, start : start + r], b_l[m, :r])  # [t, r] @ [r, out]


class BmmKernel(LoRAKernel):
    """``bmm``: h is [n_seg, S, Rp] (with split runs: (h, per run [t, Rp]))."""

    name = "bmm"

    def shrink(self, x2: torch.Tensor, g: Any, layer: int):
        return bmm_shrink(x2, g.a_layers[layer], g.layout)

    def expand(self, out2: torch.Tensor, h, g: Any, kind: str, start: int, end: int, b_l: torch.Tensor) -> None:
        bmm_expand(out2, h, b_l, start, end, g.layout)  # b_l: [n, e - s, out]

    def layout(self, tok_adapter, member_of, n_members, device) -> SegmentLayout:
        return build_layout(tok_adapter, member_of, n_members, "bmm", device)


class LoopKernel(LoRAKernel):
    """``loop``: h is a list, per contiguous run [t1 - t0, Rp]."""

    name = "loop"

    def shrink(self, x2: torch.Tensor, g: Any, layer: int) -> list[torch.Tensor]:
        return loop_shrink(x2, g.a_layers[layer], g.layout)

    def expand(self, out2: torch.Tensor, h, g: Any, kind: str, start: int, end: int, b_l: torch.Tensor) -> None:
        loop_expand(out2, h, b_l, start, kind, g.stack.ranks, g.layout)

    def layout(self, tok_adapter, member_of, n_members, device) -> SegmentLayout:
        return build_layout(tok_adapter, member_of, n_members, "loop", device)


BMM = BmmKernel()
LOOP = LoopKernel()
