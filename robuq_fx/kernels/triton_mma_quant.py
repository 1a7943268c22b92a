"""The activation quantizer with the rotation on tensor cores, and with it the stacked LRB mode's codes in one
kernel (lrb_stacked.py; imported lazily, needs triton): the quantizer and `lrb_split` fused, x read once from memory.

The two-kernel form reads x twice (the quantizer, then `lrb_split` for t = x (B H)^T): at M = 16384, K = 1152 on the
H200 the stacked layer took 165 us against the plain layer's 132 (session 10, docs/gpu.md), ~10 us of it the second
read. Here each program holds BM rows and makes two passes over K in Hadamard-block chunks (as
`triton_qgemm_small`, whose formulation this shares):

    pass 1:  y_c = RN_dtype(act(x_c) H_b)   (16-bit tensor-core dot, fp32 sums: `hadamard.block_hadamard`'s formula)
             absmax over the chunks -> s;  t += act(x_c) (B H)_c^T   (as `lrb_split`, from the same loads)
    pass 2:  y_c again (x_c from L2: the program just read it), q_c = rint(y_c / s) -> fp8 codes, columns [W, W + K)
    then     u = t / (s c) -> [u1, u1, u2, 0..] in columns [0, W)  (c read W - 3r bytes before the weight's codes)

The tensor-core rotation costs 2 HB flops an element a pass (HB = 128: ~5 GFLOP a pass at M = 16384, K = 1152), in
exchange for the butterfly's layout shuffles (docs/gpu.md: ~4-5 an element in Triton's automatic layouts). Codes equal
the quantizer's up to the order of the rotation's fp32 sums. Without a branch (HAS_LRB off) the kernel is a plain
symmetric absmax quantizer (`mma_quant`, ROBUQ_QUANT_KERNEL=mma). sm_90 compile (BM 64, 8 warps): 87 registers, no
spills, wgmma for the rotation. Measured on the H200 (session 11), both lose: the plain quantizer takes 2.0-2.2x the
butterfly kernel's time at M = 16384 and 9-22x at M = 256, the fused stacked codes make the layer slower than the
two kernels (docs/gpu.md). Opt-in (ROBUQ_STACKED_QUANT=fused, ROBUQ_QUANT_KERNEL=mma); the sweep never picks them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_act_quant import _input_act, act_code
from .triton_launch import launch
from .triton_lowrank import ext_constexprs, store_u_columns
from .triton_rowquant import round_quotient, scale_of


@triton.jit
def _rotated(x_ptr, h_ptr, rows, rmask, stride_x, kc, HB: tl.constexpr, ACT: tl.constexpr):
    """(act(x_c), RN_dtype(act(x_c) H_b)) for x_c = x[rows, kc:kc+HB] (H reloaded per chunk from L1/L2, as
    triton_qgemm_small._chunk)."""
    kk = tl.arange(0, HB)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + (kc + kk)[None, :], mask=rmask[:, None], other=0.0)
    if ACT != 0:
        x = _input_act(x.to(tl.float32), ACT).to(x_ptr.dtype.element_ty)
    h = tl.load(h_ptr + kk[:, None] * HB + kk[None, :])
    return x, tl.dot(x, h).to(x_ptr.dtype.element_ty)


@triton.jit(do_not_specialize=["M", "M_STORE"])
def stacked_quant_kernel(x_ptr, h_ptr, b_ptr, sx_ptr, o_ptr, w_ptr, M, M_STORE, stride_x, stride_o, levels,
                         K: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                         BM: tl.constexpr, HB: tl.constexpr, HAS_LRB: tl.constexpr, ACT: tl.constexpr = 0):
    """o[rows] = [u1, u1, u2, 0.., q] (W + K fp8 columns; without a branch W = 0: the codes), sx[rows] = s for rows
    < M_STORE (padding rows: zeros)."""
    levels = tl.cast(levels, tl.float32)  # fp64 when Inductor launches it (see triton_act_quant)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    smask = rows < M_STORE
    kk = tl.arange(0, HB)
    rr = tl.arange(0, RP)
    hi = tl.zeros([BM], dtype=tl.float32)
    t = tl.zeros((BM, RP), dtype=tl.float32)
    for kc in range(0, K, HB):  # pass 1: the row's absmax and t
        xc, yc = _rotated(x_ptr, h_ptr, rows, rmask, stride_x, kc, HB, ACT)
        hi = tl.maximum(hi, tl.max(tl.abs(yc.to(tl.float32)), axis=1))
        if HAS_LRB:
            d = tl.load(b_ptr + rr[:, None] * K + (kc + kk)[None, :], mask=(rr < R)[:, None], other=0.0)
            t = tl.dot(xc, tl.trans(d), t)
    s, lo, safe, rcp = scale_of(hi, hi, levels, True)
    tl.store(sx_ptr + rows, s, mask=smask)
    row = o_ptr + rows[:, None].to(tl.int64) * stride_o
    for kc in range(0, K, HB):  # pass 2: the codes
        _, yc = _rotated(x_ptr, h_ptr, rows, rmask, stride_x, kc, HB, ACT)
        q = round_quotient(yc.to(tl.float32), safe[:, None], rcp[:, None])
        tl.store(row + W + kc + kk[None, :], q.to(tl.float8e4nv), mask=smask[:, None])
    if HAS_LRB:  # the branch's columns, as triton_lowrank.lrb_split_kernel
        store_u_columns(row, t, s, w_ptr, smask, rr, R, W, WP, BM)


def stacked_quant_ok(x2, bh, block: int) -> bool:
    """The kernel takes the call: 16-bit x with contiguous rows, Hadamard block 128 (the tensor-core chunk), K a
    multiple of it, B H (r <= 64, contiguous) in x's dtype."""
    return (x2.dtype in (torch.bfloat16, torch.float16) and x2.stride(1) == 1 and block == 128
            and x2.shape[1] % 128 == 0 and bh.dtype == x2.dtype and bh.is_contiguous()
            and 0 < bh.shape[0] <= 64)


def stacked_quant(x2, h, bh, sx, out, w_codes, m_store: int, levels: float, launcher=launch, act: str = "",
                  bm: int = 64, warps: int = 8) -> None:
    """out (m_store, W + K) fp8 = [u1, u1, u2, 0.., Q_a(act(x2) H)] and sx (m_store,) fp32 for x2 (m, K); h the
    Hadamard block (128 x 128, x2's dtype: hadamard.hadamard_matrix), bh = B H (r, K) in x2's dtype, w_codes the
    extended weight's code columns (c sits W - 3r bytes before them). Check `stacked_quant_ok` first."""
    if m_store:
        launcher(*_launch_spec(x2, h, bh, sx, out, w_codes, m_store, levels, act, bm, warps))


def mma_quant_ok(x2, block: int, sym: bool, clip: str, dequant: bool) -> bool:
    """`mma_quant` takes the call: symmetric absmax codes of a 16-bit x with contiguous rows, Hadamard block 128,
    K a multiple of it."""
    return (sym and clip == "absmax" and not dequant and block == 128 and x2.dtype in (torch.bfloat16, torch.float16)
            and x2.stride(1) == 1 and x2.shape[1] % 128 == 0)


def mma_quant_launch(x2, h, out, sx, m_store: int, levels: float, act: str = "", bm: int = 64, warps: int = 8):
    """(kernel, grid, runtime args, constexprs, options, no_specialize) of the plain quantizer: out (m_store, K) fp8
    codes of Q_a(act(x2) H) (rows of any stride), sx (m_store,) their scales (`quantizer.act_quant` with
    ROBUQ_QUANT_KERNEL=mma; check `mma_quant_ok`). Its runtime arguments do not start with x, out, scale, lo:
    kernels/fastcall.py does not bind it."""
    return _launch_spec(x2, h, None, sx, out, None, m_store, levels, act, bm, warps)


def _launch_spec(x2, h, bh, sx, out, w_codes, m_store, levels, act, bm, warps) -> tuple:
    """`stacked_quant_kernel`'s launch for both entries: with a branch (bh, w_codes given) or without (W = 0; the
    unused pointers are x2 and out)."""
    k = x2.shape[1]
    lrb = bh is not None
    ext = ext_constexprs(k, bh.shape[0] if lrb else 0, out.shape[1] - k)
    return (stacked_quant_kernel, (triton.cdiv(m_store, bm),),
            (x2, h, bh if lrb else x2, sx, out, w_codes if lrb else out, x2.shape[0], m_store, x2.stride(0),
             out.stride(0), float(levels)),
            dict(**ext, BM=bm, HB=h.shape[0], HAS_LRB=lrb, ACT=act_code(act)), dict(num_warps=warps), (6, 7))
