"""The backward kernel of `robuq::qat_act_lrb` (kernels/qat_act.py; imported lazily, needs triton).

The op's input gradient, from the gradient g (M, K + r) of its output [Q_a(x H), x (B H)^T] (the STE is the
identity for symmetric absmax ranges):

    g_x = g[:, :K] H + g[:, K:] (B H)          (M, K)

in one pass: a program takes BM rows and one Hadamard block of B columns, rotates them with the quantizer's
in-register butterfly (`triton_act_quant._fwht`: fp32 sums, times dtype(1/sqrt(B)) as `hadamard_matrix` stores it),
adds the rank-r product on the tensor cores with the rotated block as the accumulator, and rounds once. The op graph
runs it as a copy of the strided g[:, :K], a GEMM with H and an addmm: three launches for one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_act_quant import _fwht
from .triton_launch import launch, rank_pad

BM, WARPS = 32, 4


@triton.jit(do_not_specialize=["M"])
def rot_lowrank_kernel(g_ptr, bh_ptr, out_ptr, M, stride_g, stride_o, hscale, K: tl.constexpr, R: tl.constexpr,
                       RP: tl.constexpr, B: tl.constexpr, LOGB: tl.constexpr, HAD: tl.constexpr, BM: tl.constexpr,
                       HAS_T: tl.constexpr = True):
    """out[rows, blk] = (g[rows, :K] H)[:, blk] + g[rows, K:K + R] bh[:, blk] for the column block blk =
    program_id(1) of width B (H block-diagonal with blocks of B: the block's own columns rotated alone); without
    HAS_T (no branch) the rotation alone."""
    hscale = tl.cast(hscale, tl.float32)  # fp64 when Inductor launches it (see triton_act_quant)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    cols = tl.program_id(1) * B + tl.arange(0, B)
    g_rows = g_ptr + rows[:, None].to(tl.int64) * stride_g
    acc = tl.load(g_rows + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    if HAD:
        acc = _fwht(acc, BM, B, LOGB) * hscale
    if HAS_T:
        rr = tl.arange(0, RP)
        t = tl.load(g_rows + K + rr[None, :], mask=rmask[:, None] & (rr[None, :] < R), other=0.0)
        b = tl.load(bh_ptr + rr[:, None] * K + cols[None, :], mask=(rr < R)[:, None], other=0.0)
        acc = tl.dot(t, b, acc)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None])


def rot_lowrank(g: torch.Tensor, bh: torch.Tensor | None, out: torch.Tensor, block: int, hscale: float,
                launcher=launch) -> None:
    """out (M, K) = g[:, :K] H + g[:, K:] bh, H block-diagonal of `block` (0: none; the columns then go in tiles of
    128); g (M, K + r) and bh (r, K) 16-bit with contiguous rows, K a multiple of the block (module docstring).
    bh None (no branch): out = g H, g (M, K)."""
    m, k = out.shape
    r = 0 if bh is None else bh.shape[0]
    if m == 0:
        return
    w = block if block > 1 else 128
    launcher(rot_lowrank_kernel, (triton.cdiv(m, BM), k // w),
             (g, g if bh is None else bh, out, m, g.stride(0), out.stride(0), hscale),
             dict(K=k, R=r, RP=rank_pad(r), B=w, LOGB=w.bit_length() - 1, HAD=block > 1, BM=BM, HAS_T=bh is not None),
             dict(num_warps=WARPS), no_specialize=(3,))
