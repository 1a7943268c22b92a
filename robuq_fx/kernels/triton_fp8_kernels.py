"""Triton kernels of the Hopper fp8 qlinear path (imported lazily by `triton_fp8.py`; importing this module needs
triton). Two kernels:

`act_quant_kernel`: one pass over BM activation rows. The row is read once, as up to four power-of-two "pieces" of
    NB_i tiles of T columns (K = T * sum NB_i, e.g. 1152 = 128 * (8 + 1)), so that each piece is a
    (BM, NB_i, T) register tile. With a Hadamard, a piece is reshaped to (BM * NB_i, T) and multiplied by the
    unnormalized +-1 matrix kron(I_{T/b}, H_b) on the tensor cores (fp32 accumulation), then scaled by
    dtype(1/sqrt(b)) and rounded to the input dtype, exactly like `hadamard.block_hadamard` does in that dtype.
    Then per-row absmax (or min/max), the scale with an IEEE division (`div_rn`), codes by `rint(div_rn(x, s))`
    (round half to even, as `torch.round`), clamp, and a store of fp8 e4m3 codes (|q| <= 15 is exact) or, in
    DEQUANT mode, of Q_a(x) = s q (+ lo) in the input dtype. Per-row scale (and lo) go out in fp32.

`fp8_gemm_kernel`: y = (q_x q_w^T) * s_x[m] * s_w[n] [+ lo[m] c[n]] [+ bias[n]] [+ t[m] A^T], fp8 e4m3 tensor-core
    GEMM (fp32 accumulation) with everything after the integer product fused in the epilogue; used for the
    asymmetric and low-rank-branch cases where `torch._scaled_mm` would need extra passes over y.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _load_rot(x_ptr, rows, rmask, stride_xm, h, hscale,
              OFF: tl.constexpr, NB: tl.constexpr, T: tl.constexpr, BM: tl.constexpr,
              HAD: tl.constexpr, IEEE: tl.constexpr):
    """(BM, NB, T) fp32 tile of x H for columns [OFF, OFF + NB*T), rounded to the input dtype."""
    j = tl.arange(0, NB)
    c = tl.arange(0, T)
    cols = OFF + j[:, None] * T + c[None, :]
    x = tl.load(x_ptr + rows[:, None, None] * stride_xm + cols[None, :, :], mask=rmask[:, None, None], other=0.0)
    if HAD:
        x2 = tl.reshape(x, (BM * NB, T))
        if IEEE:
            y = tl.dot(x2, h, input_precision="ieee")
        else:
            y = tl.dot(x2, h)
        y = tl.reshape(y, (BM, NB, T)) * hscale
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _quant_store(y, out_ptr, rows, smask, stride_om, s, safe, lo, qmin, qmax,
                 OFF: tl.constexpr, NB: tl.constexpr, T: tl.constexpr, BM: tl.constexpr,
                 SYM: tl.constexpr, DEQUANT: tl.constexpr):
    j = tl.arange(0, NB)
    c = tl.arange(0, T)
    cols = OFF + j[:, None] * T + c[None, :]
    sf = tl.broadcast_to(safe[:, None, None], (BM, NB, T))
    if SYM:
        q = libdevice.rint(tl.div_rn(y, sf))
    else:
        q = libdevice.rint(tl.div_rn(y - tl.broadcast_to(lo[:, None, None], (BM, NB, T)), sf))
    q = tl.minimum(tl.maximum(q, qmin), qmax)
    if DEQUANT:
        if SYM:
            v = s[:, None, None] * q
        else:
            v = lo[:, None, None] + s[:, None, None] * q
    else:
        v = q
    tl.store(out_ptr + rows[:, None, None] * stride_om + cols[None, :, :], v.to(out_ptr.dtype.element_ty),
             mask=smask[:, None, None])


@triton.jit(do_not_specialize=["M", "M_STORE"])
def act_quant_kernel(x_ptr, h_ptr, out_ptr, scale_ptr, lo_ptr, M, M_STORE, stride_xm, stride_om,
                     hscale, levels, qmin, qmax,
                     T: tl.constexpr, NB0: tl.constexpr, NB1: tl.constexpr, NB2: tl.constexpr, NB3: tl.constexpr,
                     BM: tl.constexpr, HAD: tl.constexpr, SYM: tl.constexpr, DEQUANT: tl.constexpr,
                     IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < M
    smask = rows < M_STORE
    if HAD:
        hr = tl.arange(0, T)
        h = tl.load(h_ptr + hr[:, None] * T + hr[None, :])
    else:
        h = hscale
    y0 = _load_rot(x_ptr, rows, rmask, stride_xm, h, hscale, 0, NB0, T, BM, HAD, IEEE)
    if SYM:
        r = tl.max(tl.max(tl.abs(y0), axis=2), axis=1)
    else:
        mn = tl.min(tl.min(y0, axis=2), axis=1)
        mx = tl.max(tl.max(y0, axis=2), axis=1)
    if NB1 > 0:
        y1 = _load_rot(x_ptr, rows, rmask, stride_xm, h, hscale, NB0 * T, NB1, T, BM, HAD, IEEE)
        if SYM:
            r = tl.maximum(r, tl.max(tl.max(tl.abs(y1), axis=2), axis=1))
        else:
            mn = tl.minimum(mn, tl.min(tl.min(y1, axis=2), axis=1))
            mx = tl.maximum(mx, tl.max(tl.max(y1, axis=2), axis=1))
    if NB2 > 0:
        y2 = _load_rot(x_ptr, rows, rmask, stride_xm, h, hscale, (NB0 + NB1) * T, NB2, T, BM, HAD, IEEE)
        if SYM:
            r = tl.maximum(r, tl.max(tl.max(tl.abs(y2), axis=2), axis=1))
        else:
            mn = tl.minimum(mn, tl.min(tl.min(y2, axis=2), axis=1))
            mx = tl.maximum(mx, tl.max(tl.max(y2, axis=2), axis=1))
    if NB3 > 0:
        y3 = _load_rot(x_ptr, rows, rmask, stride_xm, h, hscale, (NB0 + NB1 + NB2) * T, NB3, T, BM, HAD, IEEE)
        if SYM:
            r = tl.maximum(r, tl.max(tl.max(tl.abs(y3), axis=2), axis=1))
        else:
            mn = tl.minimum(mn, tl.min(tl.min(y3, axis=2), axis=1))
            mx = tl.maximum(mx, tl.max(tl.max(y3, axis=2), axis=1))
    if SYM:
        s = tl.div_rn(r, tl.zeros_like(r) + levels)
        lo = -r
    else:
        s = tl.div_rn(mx - mn, tl.zeros_like(mx) + levels)
        lo = mn
    safe = tl.where(s > 0, s, 1.0)
    tl.store(scale_ptr + rows, s, mask=smask)
    tl.store(lo_ptr + rows, lo, mask=smask)
    _quant_store(y0, out_ptr, rows, smask, stride_om, s, safe, lo, qmin, qmax, 0, NB0, T, BM, SYM, DEQUANT)
    if NB1 > 0:
        _quant_store(y1, out_ptr, rows, smask, stride_om, s, safe, lo, qmin, qmax, NB0 * T, NB1, T, BM, SYM,
                     DEQUANT)
    if NB2 > 0:
        _quant_store(y2, out_ptr, rows, smask, stride_om, s, safe, lo, qmin, qmax, (NB0 + NB1) * T, NB2, T, BM,
                     SYM, DEQUANT)
    if NB3 > 0:
        _quant_store(y3, out_ptr, rows, smask, stride_om, s, safe, lo, qmin, qmax, (NB0 + NB1 + NB2) * T, NB3, T,
                     BM, SYM, DEQUANT)


def launch_act_quant(x, h, out, scale, lo, m, m_store, hscale, levels, qmin, qmax, plan, had, sym, dequant, ieee):
    t, pieces, bm, warps = plan
    nb = list(pieces) + [0] * (4 - len(pieces))
    grid = (triton.cdiv(m_store, bm),)
    act_quant_kernel[grid](x, h if had else x, out, scale, lo, m, m_store, x.stride(0), out.stride(0),
                           float(hscale), float(levels), float(qmin), float(qmax),
                           T=t, NB0=nb[0], NB1=nb[1], NB2=nb[2], NB3=nb[3], BM=bm, HAD=bool(had), SYM=bool(sym),
                           DEQUANT=bool(dequant), IEEE=bool(ieee), num_warps=warps)


# ----------------------------------------------------------------------------------------------------------------
# fp8 GEMM with fused epilogue

# (BM, BN, BK, GROUP_M, num_warps, num_stages). Every entry is exercised by tests/kernels/test_triton_fp8.py on
# odd M and all DiT-XL/2 shapes; BK must divide K (the path requires K % 128 == 0).
GEMM_CONFIGS = (
    (128, 256, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 4),
    (64, 128, 128, 8, 4, 4),
    (64, 64, 128, 8, 4, 4),
)


@triton.jit(do_not_specialize=["M"])
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, sx_ptr, sw_ptr, bias_ptr, lo_ptr, cs_ptr, t_ptr, up_ptr,
                    M, N, K, stride_am, stride_bn, stride_cm, stride_tm, stride_un, R,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    RP: tl.constexpr, HAS_BIAS: tl.constexpr, ASYM: tl.constexpr, HAS_LRB: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_am = tl.max_contiguous(tl.multiple_of(offs_m % M, BM), BM)
    offs_bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BN), BN)
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + offs_am[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_bn[:, None].to(tl.int64) * stride_bn + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BK)):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BK
        b_ptrs += BK

    mmask = offs_m < M
    nmask = offs_n < N
    sx = tl.load(sx_ptr + offs_m, mask=mmask, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=nmask, other=0.0)
    acc = acc * sx[:, None] * sw[None, :]
    if ASYM:
        lo = tl.load(lo_ptr + offs_m, mask=mmask, other=0.0)
        cs = tl.load(cs_ptr + offs_n, mask=nmask, other=0.0)
        acc += lo[:, None] * cs[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if HAS_LRB:
        rr = tl.arange(0, RP)
        t = tl.load(t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + rr[None, :],
                    mask=mmask[:, None] & (rr[None, :] < R), other=0.0)
        u = tl.load(up_ptr + offs_n[:, None].to(tl.int64) * stride_un + rr[None, :],
                    mask=nmask[:, None] & (rr[None, :] < R), other=0.0)
        acc = tl.dot(t, tl.trans(u), acc)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def launch_fp8_gemm(a, b, c, sx, sw, bias, lo, cs, t, up, m, cfg):
    """a (>= m, K) fp8, b (N, K) fp8, c (m, N) out; sx/lo (>= m,) fp32; sw/cs (N,) fp32; bias (N,) or None;
    t (m, r), up (N, r) or None. cfg: one of GEMM_CONFIGS."""
    bm, bn, bk, gm, warps, stages = cfg
    n, k = b.shape
    r = 0 if t is None else t.shape[1]
    rp = max(16, triton.next_power_of_2(r)) if r else 16
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    fp8_gemm_kernel[grid](a, b, c, sx, sw, bias if bias is not None else sx, lo if lo is not None else sx,
                          cs if cs is not None else sw, t if t is not None else c, up if up is not None else c,
                          m, n, k, a.stride(0), b.stride(0), c.stride(0), t.stride(0) if t is not None else 0,
                          up.stride(0) if up is not None else 0, r,
                          BM=bm, BN=bn, BK=bk, GROUP_M=gm, RP=rp, HAS_BIAS=bias is not None,
                          ASYM=lo is not None, HAS_LRB=t is not None, num_warps=warps, num_stages=stages)
