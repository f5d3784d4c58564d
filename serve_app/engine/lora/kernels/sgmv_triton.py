"""SGMV shrink/expand as Triton kernels (CUDA; on CPU under TRITON_INTERPRET=1 for tests).

Semantics (Punica's SGMV, over an adapter-sorted ``SegmentLayout``):

    shrink:  h[p, :]          = x[tok[p], :] @ a[member(p)]              h: [M, Rp]
    expand:  out[tok[p], :]  += h[p, c0:c0 + r] @ b[member(p)]           b: [n, r, out]

where p runs over the M LoRA tokens sorted by member and member(p) is the member of p's
segment. One program handles one (segment, BLOCK_M rows, BLOCK_N columns) tile, so a tile only
ever loads its own segment's adapter weights. Each token appears once in ``tok``, so the
expand's read-add-write of ``out`` has no races. Accumulation is fp32; for fp32 inputs the dot
runs in IEEE precision (no TF32) so the result agrees with the CPU path to 1e-5.

The interpreter is chosen by Triton at decoration time: set TRITON_INTERPRET=1 before this
module is first imported (tests reload it).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from serve_app.engine.lora.kernels.base import LoRAKernel
from serve_app.engine.lora.kernels.layout import SegmentLayout, build_layout

BLOCK_M = 16
BLOCK_K = 32


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, h_ptr, tok_ptr, seg_start_ptr, seg_len_ptr, seg_member_ptr,
    K, R,
    stride_xm, stride_xk, stride_an, stride_ak, stride_ar, stride_hm, stride_hr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    seg = tl.program_id(0)
    pm = tl.program_id(1)
    pn = tl.program_id(2)
    seg_len = tl.load(seg_len_ptr + seg)
    start = tl.load(seg_start_ptr + seg)
    member = tl.load(seg_member_ptr + seg).to(tl.int64)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of this segment
    m_mask = offs_m < seg_len
    rows = tl.load(tok_ptr + start + offs_m, mask=m_mask, other=0)  # [BM] token indices
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < R
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.full: a builtin (tl.zeros is @jit, not interpretable once triton is imported)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xb = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :], other=0.0,
        )  # [BM, BK]
        ab = tl.load(
            a_ptr + member * stride_an + offs_k[:, None] * stride_ak + offs_n[None, :] * stride_ar,
            mask=k_mask[:, None] & n_mask[None, :], other=0.0,
        )  # [BK, BN]
        acc += tl.dot(xb, ab, input_precision=PRECISION)
    h_rows = (start + offs_m).to(tl.int64)
    tl.store(
        h_ptr + h_rows[:, None] * stride_hm + offs_n[None, :] * stride_hr,
        acc.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def _sgmv_expand_kernel(
    h_ptr, b_ptr, out_ptr, tok_ptr, seg_start_ptr, seg_len_ptr, seg_member_ptr,
    R, OUT, col0,
    stride_hm, stride_hr, stride_bn, stride_br, stride_bo, stride_om, stride_oo,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    seg = tl.program_id(0)
    pm = tl.program_id(1)
    pn = tl.program_id(2)
    seg_len = tl.load(seg_len_ptr + seg)
    start = tl.load(seg_start_ptr + seg)
    member = tl.load(seg_member_ptr + seg).to(tl.int64)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_len
    rows = tl.load(tok_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)  # [BM]
    h_rows = (start + offs_m).to(tl.int64)
    offs_o = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = offs_o < OUT
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.full: a builtin (tl.zeros is @jit, not interpretable once triton is imported)
    for r0 in range(0, R, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K)
        r_mask = offs_r < R
        hb = tl.load(
            h_ptr + h_rows[:, None] * stride_hm + (col0 + offs_r)[None, :] * stride_hr,
            mask=m_mask[:, None] & r_mask[None, :], other=0.0,
        )  # [BM, BK]
        bb = tl.load(
            b_ptr + member * stride_bn + offs_r[:, None] * stride_br + offs_o[None, :] * stride_bo,
            mask=r_mask[:, None] & o_mask[None, :], other=0.0,
        )  # [BK, BN]
        acc += tl.dot(hb, bb, input_precision=PRECISION)
    o_ptrs = out_ptr + rows[:, None] * stride_om + offs_o[None, :] * stride_oo
    mask = m_mask[:, None] & o_mask[None, :]
    cur = tl.load(o_ptrs, mask=mask, other=0.0)
    tl.store(o_ptrs, (cur.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


def _block_n(n: int) -> int:
    return max(16, min(64, triton.next_power_of_2(n)))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def sgmv_shrink(x2: torch.Tensor, a_l: torch.Tensor, lay: SegmentLayout) -> torch.Tensor:
    """x2: [N, in], a_l: [n, in, Rp] -> h: [M, Rp], row p = sorted token p (``lay.tok``)."""
    k, rp = a_l.shape[1], a_l.shape[2]
    h = torch.empty(lay.m, rp, dtype=x2.dtype, device=x2.device)  # [M, Rp]
    bn = _block_n(rp)
    grid = (len(lay.seg_len), triton.cdiv(lay.s_max, BLOCK_M), triton.cdiv(rp, bn))
    _sgmv_shrink_kernel[grid](
        x2, a_l, h, lay.tok, lay.seg_start_t, lay.seg_len_t, lay.seg_member_t,
        k, rp,
        x2.stride(0), x2.stride(1), a_l.stride(0), a_l.stride(1), a_l.stride(2), h.stride(0), h.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=BLOCK_K, PRECISION=_precision(x2.dtype),
    )
    return h


def sgmv_expand(out2: torch.Tensor, h: torch.Tensor, b_l: torch.Tensor, start: int, lay: SegmentLayout) -> None:
    """out2: [N, out] += h[p, start:start + r] @ b_l[member(p)] at row tok[p]; b_l: [n, r, out]."""
    r, out_f = b_l.shape[1], b_l.shape[2]
    bn = _block_n(out_f)
    grid = (len(lay.seg_len), triton.cdiv(lay.s_max, BLOCK_M), triton.cdiv(out_f, bn))
    _sgmv_expand_kernel[grid](
        h, b_l, out2, lay.tok, lay.seg_start_t, lay.seg_len_t, lay.seg_member_t,
        r, out_f, start,
        h.stride(0), h.stride(1), b_l.stride(0), b_l.stride(1), b_l.stride(2), out2.stride(0), out2.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=BLOCK_K, PRECISION=_precision(h.dtype),
    )


class TritonKernel(LoRAKernel):
    """``triton``: h is [M, Rp], row p = sorted token p (``layout.tok``)."""

    name = "triton"

    def shrink(self, x2: torch.Tensor, g: Any, layer: int) -> torch.Tensor:
        return sgmv_shrink(x2, g.a_layers[layer], g.layout)

    def expand(self, out2: torch.Tensor, h: torch.Tensor, g: Any, kind: str, start: int, end: int,
               b_l: torch.Tensor) -> None:
        sgmv_expand(out2, h, b_l, start, g.layout)  # b_l: [n, r, out]

    def layout(self, tok_adapter, member_of, n_members, device) -> SegmentLayout:
        return build_layout(tok_adapter, member_of, n_members, "triton", device)


KERNEL = TritonKernel()
