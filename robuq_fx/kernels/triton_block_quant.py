"""The activation quantizer for per-block ranges (`LayerSpec.a_group` = the Hadamard block = 128; imported lazily,
needs triton): each program rotates one 128-wide block of BM rows and quantizes it with that block's own absmax, in
one pass: no row-wide reduction, no second read of x (the per-token quantizer needs both at K = 4608).

    y = RN_dtype(x_b H)       (MMA, the default: a 16-bit tensor-core dot with fp32 sums, `hadamard.block_hadamard`'s
                               formula; else the butterfly of triton_act_quant._piece, which the per-token
                               quantizer runs. In that quantizer the butterfly won ~2x (session 11); in this one
                               the tensor cores win 1.5-2.4x at M = 16384 (session 17, `rotation()`))
    s[b, m] = RN(max_k |y[m, k]| / qmax),  q = rint(y / s) -> fp8 codes          (symmetric absmax)

The scales are stored block-major, (K / 128, M_STORE) fp32: what `fp8_gemm_kernel`'s BLOCK_SCALE form reads, one
K block's column a step of its K loop (kernels/triton_fp8_kernels.py); transposed, cuBLAS's 1 x 128 scale_a
layout (M_STORE, K / 128) with strides (1, M_STORE) (kernels/block_scaled.py). Codes and scales equal
`quantizers.quantize_act(x H, group=128)` up to the order of the rotation's fp32 sums. Rows in [M, M_STORE) get
codes and scales 0 (the GEMM's padded rows).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_act_quant import _piece
from .triton_launch import launch
from .triton_mma_quant import _rotated
from .triton_rowquant import round_quotient, scale_of

BLOCK = 128  # the group, the Hadamard block and the GEMM's K step


@triton.jit(do_not_specialize=["M", "M_STORE"])
def block_quant_kernel(x_ptr, h_ptr, o_ptr, s_ptr, M, M_STORE, stride_x, stride_o, levels, hscale,
                       BM: tl.constexpr, HB: tl.constexpr, LOGB: tl.constexpr, MMA: tl.constexpr):
    """o[rows, b*HB:(b+1)*HB] = codes of block b of rows, s[b, rows] = its scales (grid: row blocks x K blocks)."""
    levels = tl.cast(levels, tl.float32)  # fp64 when Inductor launches it (see triton_act_quant)
    hscale = tl.cast(hscale, tl.float32)  # (in fp64, y H would round once to x's dtype, not via fp32 as eagerly)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    kb = tl.program_id(1)
    rmask = rows < M
    smask = rows < M_STORE
    if MMA:
        _, yc = _rotated(x_ptr, h_ptr, rows, rmask, stride_x, kb * HB, HB, 0)
    else:
        yc = _piece(x_ptr, rows, rmask, stride_x, hscale, kb * HB, HB, BM, HB, LOGB, True)
    y = yc.to(tl.float32)
    hi = tl.max(tl.abs(y), axis=1)
    s, lo, safe, rcp = scale_of(hi, hi, levels, True)
    tl.store(s_ptr + kb * M_STORE + rows, s, mask=smask)
    q = round_quotient(y, safe[:, None], rcp[:, None])
    kk = tl.arange(0, HB)
    tl.store(o_ptr + rows[:, None].to(tl.int64) * stride_o + kb * HB + kk[None, :], q.to(tl.float8e4nv),
             mask=smask[:, None])


def rotation() -> str:
    """"mma" (default) or "butterfly" (ROBUQ_BLOCK_QUANT_ROT=butterfly): how the block quantizer rotates. Session 17
    (H200, M = 16384): the tensor-core rotation 43 / 94 us at K = 1152 / 4608 against the butterfly's 64 / 226 us;
    equal at M = 1024 (benchmarks/results/block_scale_diag_NVIDIA_H200.txt)."""
    return "butterfly" if os.environ.get("ROBUQ_BLOCK_QUANT_ROT") == "butterfly" else "mma"


def block_quant(x2: torch.Tensor, h: torch.Tensor, m_store: int, levels: float, launcher=launch, bm: int = 64,
                warps: int = 4, rot: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (m_store, K) fp8, block scales (K / 128, m_store) fp32) of x2 (m, K); h the Hadamard block (128 x 128
    in x2's dtype: `hadamard.hadamard_matrix`; the butterfly reads only its scale h[0, 0]). rot: `rotation()`'s
    choice by default. The calls it takes: `block_scaled.takes`."""
    m, k = x2.shape
    codes = torch.empty(m_store, k, device=x2.device, dtype=torch.float8_e4m3fn)
    scales = torch.empty(k // BLOCK, m_store, device=x2.device, dtype=torch.float32)
    if m_store:
        from .quantizer import _hscale
        launcher(block_quant_kernel, (triton.cdiv(m_store, bm), k // BLOCK),
                 (x2, h, codes, scales, m, m_store, x2.stride(0), codes.stride(0), float(levels),
                  _hscale(BLOCK, x2.dtype)),
                 dict(BM=bm, HB=BLOCK, LOGB=BLOCK.bit_length() - 1, MMA=(rot or rotation()) == "mma"),
                 dict(num_warps=warps), (4, 5))
    return codes, scales
