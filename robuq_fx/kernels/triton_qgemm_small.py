"""One Triton kernel for a whole qlinear at small M (issue 20: "at small M the same single kernel also removes the
extra launch"; imported lazily, needs triton): x is read, rotated, quantized and multiplied in one launch, the
activation codes never leave registers.

Grid: (N tiles, M tiles). Each program holds BM rows of x and makes two passes over K in chunks of HB columns (HB =
the Hadamard block, or up to 128 without one):
    pass 1:  y_c = RN_dtype(x_c H_b)   (a 16-bit tensor-core dot with fp32 sums, as `hadamard.block_hadamard`)
             row range (absmax, or min/max) over the chunks -> s, lo       (triton_rowquant.scale_of)
    pass 2:  y_c again, q_c = rint((y_c - lo) / s) (round_quotient), acc += q_c . q_w[:, c]^T on fp8 tensor cores
             (codes |q| <= 15 are exact in e4m3), and with a low-rank branch t += y_c B_c^T (16-bit, fp32 sums)
    epilogue: y = s s_w acc [+ lo c] [+ bias] [+ RN_dtype(t) A^T]
Every program repeats the quantization of its rows for its N tile: (N / BN)-fold redundant work that costs less than
a second launch only while M is small, which is where the dispatch uses it (`dispatch.small_m_max`). The codes are
the reference's up to the order of the rotation's fp32 sums (as the two-kernel path); t is (x H) B^T from the
rounded rotation, exactly the reference's formula.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_fp8_kernels import scale_bias
from .triton_launch import launch, rank_pad
from .triton_rowquant import round_quotient, scale_of


@triton.jit
def _chunk(x_ptr, h_ptr, rows, rmask, stride_xm, kc, HB: tl.constexpr, HAD: tl.constexpr):
    """RN_dtype(x[rows, kc:kc+HB] H_b) (H reloaded per chunk from L1/L2: held across the loop it took 128
    registers a thread and spilled)."""
    kk = tl.arange(0, HB)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + (kc + kk)[None, :], mask=rmask[:, None], other=0.0)
    if HAD:
        h = tl.load(h_ptr + kk[:, None] * HB + kk[None, :])
        return tl.dot(x, h).to(x_ptr.dtype.element_ty)
    return x


@triton.jit(do_not_specialize=["M"])
def qgemm_small_kernel(x_ptr, h_ptr, w_ptr, y_ptr, sw_ptr, bias_ptr, cs_ptr, down_ptr, up_ptr,
                       M, N, K, stride_xm, stride_ym, R, levels,
                       BM: tl.constexpr, BN: tl.constexpr, HB: tl.constexpr, RP: tl.constexpr,
                       HAD: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LRB: tl.constexpr):
    levels = tl.cast(levels, tl.float32)  # fp64 when Inductor launches it (see triton_act_quant)
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    rmask = rows < M
    kk = tl.arange(0, HB)
    # pass 1: the row ranges of the rotated rows
    lo_acc = tl.full([BM], float("inf"), tl.float32)
    hi_acc = tl.full([BM], float("-inf"), tl.float32)
    for kc in range(0, K, HB):
        yf = _chunk(x_ptr, h_ptr, rows, rmask, stride_xm, kc, HB, HAD).to(tl.float32)
        if SYM:
            hi_acc = tl.maximum(hi_acc, tl.max(tl.abs(yf), axis=1))
        else:
            lo_acc = tl.minimum(lo_acc, tl.min(yf, axis=1))
            hi_acc = tl.maximum(hi_acc, tl.max(yf, axis=1))
    s, lo, safe, rcp = scale_of(lo_acc, hi_acc, levels, SYM)
    # pass 2: codes and the integer product, one K chunk at a time
    cols_n = pid_n * BN + tl.arange(0, BN)
    nmask = cols_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rr = tl.arange(0, RP)
    t = tl.zeros((BM, RP), dtype=tl.float32)
    for kc in range(0, K, HB):
        yc = _chunk(x_ptr, h_ptr, rows, rmask, stride_xm, kc, HB, HAD)
        yf = yc.to(tl.float32)
        if not SYM:
            yf = yf - lo[:, None]
        q8 = round_quotient(yf, safe[:, None], rcp[:, None]).to(tl.float8e4nv)
        w = tl.load(w_ptr + cols_n[:, None].to(tl.int64) * K + (kc + kk)[None, :], mask=nmask[:, None], other=0.0)
        acc = tl.dot(q8, tl.trans(w), acc)
        if HAS_LRB:
            d = tl.load(down_ptr + rr[:, None] * K + (kc + kk)[None, :], mask=(rr < R)[:, None], other=0.0)
            t = tl.dot(yc, tl.trans(d), t)
    out = scale_bias(acc, s, lo, cols_n, nmask, sw_ptr, cs_ptr, bias_ptr, not SYM, HAS_BIAS)
    if HAS_LRB:
        u = tl.load(up_ptr + cols_n[:, None].to(tl.int64) * R + rr[None, :], mask=nmask[:, None] & (rr < R)[None, :],
                    other=0.0)
        out = tl.dot(t.to(y_ptr.dtype.element_ty), tl.trans(u), out)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols_n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


def chunk_of(k: int, block: int) -> int:
    """HB: the Hadamard block, or without one the largest power of two <= 128 dividing K (0: K does not fit)."""
    if block > 1:
        return block if k % block == 0 and 16 <= block <= 256 else 0
    hb = 128
    while hb >= 16 and k % hb:
        hb //= 2
    return hb if hb >= 16 else 0


def launch_qgemm_small(x2, h, w8, y, sw, bias, cs, down, up, m, levels, block, sym, cfg=(16, 64, 8)):
    """x2 (m, K) 16-bit, h (HB, HB) in x2's dtype or None, w8 (N, K) fp8 codes, y (m, N) out; sw / cs (N,) fp32;
    bias (N,) or None; down (r, K) / up (N, r) in x2's dtype or None. cfg: (BM, BN, num_warps); the default
    16 x 64 with 8 warps compiles for sm_90 without spills at HB = 128 (4 warps spill; BM = 32 spills)."""
    launch(*qgemm_small_launch(x2, h, w8, y, sw, bias, cs, down, up, m, levels, block, sym, cfg))


def qgemm_small_launch(x2, h, w8, y, sw, bias, cs, down, up, m, levels, block, sym, cfg=(16, 64, 8)):
    """(kernel, grid, runtime args, constexprs, options, no_specialize) of `launch_qgemm_small`'s launch. Tensors
    that are absent are replaced by x2 / sw (never read), so x2 is at position 0 only when h, down and up are given:
    `fastcall` replaces positions 0 and 3 per call and rebuilds the rest when it binds."""
    bm, bn, warps = cfg
    n, k = w8.shape
    hb = chunk_of(k, block)
    r = 0 if down is None else down.shape[0]
    rp = rank_pad(r)
    return (qgemm_small_kernel, (triton.cdiv(n, bn), triton.cdiv(m, bm)),
            (x2, h if h is not None else x2, w8, y, sw, bias if bias is not None else sw, cs if cs is not None else sw,
             down if down is not None else x2, up if up is not None else x2,
             m, n, k, x2.stride(0), y.stride(0), r, float(levels)),
            dict(BM=bm, BN=bn, HB=hb, RP=rp, HAD=block > 1, SYM=bool(sym), HAS_BIAS=bias is not None,
                 HAS_LRB=down is not None),
            dict(num_warps=warps), (9,))
