"""The low-rank branch's kernels on the fp8 path (imported lazily; needs triton).

`lrb_down_kernel`: t = x (B H)^T (M, r), the branch's down-projection, in x's dtype, accumulated in fp32 and rounded
once: a narrow product (r = 32) that streams x once (few rows: split over K, `lrb_down_reduce_kernel` adding the
fp32 partials in a fixed order). cuBLAS took 24 us a call for it in the paper policy's
batch-64 profile on the H200 (two to three times x's bytes at the memory's rate), and in bf16 it may split K and
add the partial sums in bf16 where `allow_bf16_reduced_precision_reduction` is on (torch's default).

`lowrank_add_kernel`, the addmm epilogue's second kernel: after `_scaled_mm` has written
y = s_x s_w (q_x q_w^T) + bias in bf16, add the low-rank branch and the asymmetric offset in place,

    y <- RN(y + t A^T + lo' c)          t (M, r) = x (B H)^T, A (N, r); lo' (M,), c (N,) fp32

one fp32 sum per element, rounded once. It replaces cuBLAS's `addmm_` of [t, lo'_hi, lo'_hi, lo'_lo] by
[A, c_hi, c_lo, c_hi] (the hi / lo halves carried the fp32 offset term through 16-bit operands), which on the H200
took 1.8-2.3x the time of reading and writing y once (qkv at M = 16384: 124 us over `_scaled_mm`'s 123 us, where
y is 113 MB: ~53 us at the memory's rate). Tiles of y are read and written once; t and A are read per tile (a
rank-32 tile of each, L2-resident) and multiplied on the tensor cores with y as the accumulator.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lrb_layout import OFF_DIGITS, OFF_TERMS, U_MAX
from .triton_act_quant import _input_act, act_code
from .switches import env_int
from .triton_launch import launch, rank_pad
from .triton_rowquant import _RINT

BM, BN, WARPS = 64, 128, 4
_U_MAX, _OFF_TERMS, _OFF_DIGITS = tl.constexpr(U_MAX), tl.constexpr(OFF_TERMS), tl.constexpr(OFF_DIGITS)
DOWN_BM, DOWN_BK, DOWN_WARPS, DOWN_STAGES = 64, 128, 4, 3


@triton.jit
def _down_acc(x_ptr, b_ptr, offs_m, mmask, rr, stride_x, K: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
              BM: tl.constexpr, BK: tl.constexpr, ACT: tl.constexpr, K0=0, KS: tl.constexpr = 0):
    """(BM, RP) fp32: sum_k act(x)[offs_m, k] b[rr, k] over k in [K0, K0 + KS) (KS = 0: all K), x's rows streamed
    once in BK-column tiles."""
    kk = K0 + tl.arange(0, BK)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_x + kk[None, :]
    b_ptrs = b_ptr + rr[:, None] * K + kk[None, :]
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for _ in range(0, K if KS == 0 else KS, BK):
        x = tl.load(x_ptrs, mask=mmask[:, None], other=0.0)
        if ACT != 0:
            x = _input_act(x.to(tl.float32), ACT).to(x_ptr.dtype.element_ty)
        b = tl.load(b_ptrs, mask=(rr < R)[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(b), acc)
        x_ptrs += BK
        b_ptrs += BK
    return acc


@triton.jit(do_not_specialize=["M"])
def lrb_down_kernel(x_ptr, b_ptr, t_ptr, M, stride_x, stride_t, K: tl.constexpr, R: tl.constexpr,
                    RP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, ACT: tl.constexpr = 0,
                    SPLIT: tl.constexpr = 1, T_COL: tl.constexpr = 0):
    """t[m, :R] = sum_k act(x)[m, k] b[:R, k] (b (R, K) with contiguous rows; K % BK == 0), stored from column T_COL
    of t's rows (SPLIT = 1: a wider buffer written without a view of it, kernels/qat_act.py). ACT: the layer's input
    activation (robuq::qlinear's input_act), rounded to x's dtype as the model's activation module writes it.
    SPLIT > 1: program (i, j) sums the j-th of SPLIT equal K ranges into its fp32 partial, t_ptr[j] of an
    (SPLIT, M, RP) buffer (stride_t = RP), which `lrb_down_reduce_kernel` adds up in order."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, RP)
    mmask = offs_m < M
    if SPLIT == 1:
        acc = _down_acc(x_ptr, b_ptr, offs_m, mmask, rr, stride_x, K, R, RP, BM, BK, ACT)
        tl.store(t_ptr + offs_m[:, None].to(tl.int64) * stride_t + (T_COL + rr[None, :]),
                 acc.to(t_ptr.dtype.element_ty), mask=mmask[:, None] & (rr[None, :] < R))
    else:
        j = tl.program_id(1)
        acc = _down_acc(x_ptr, b_ptr, offs_m, mmask, rr, stride_x, K, R, RP, BM, BK, ACT, j * (K // SPLIT),
                        K // SPLIT)
        part = t_ptr + (j * M).to(tl.int64) * RP
        tl.store(part + offs_m[:, None].to(tl.int64) * RP + rr[None, :], acc, mask=mmask[:, None])


@triton.jit(do_not_specialize=["M"])
def lrb_down_reduce_kernel(p_ptr, t_ptr, M, stride_t, R: tl.constexpr, RP: tl.constexpr, SPLIT: tl.constexpr,
                           BM: tl.constexpr):
    """t[m, :R] = the SPLIT partials of `lrb_down_kernel` (SPLIT, M, RP) fp32 added in order 0..SPLIT-1, rounded
    once (the same sum every call: no atomics)."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, RP)
    mmask = offs_m < M
    ptrs = p_ptr + offs_m[:, None].to(tl.int64) * RP + rr[None, :]
    acc = tl.load(ptrs, mask=mmask[:, None], other=0.0)
    m64 = tl.cast(M, tl.int64)  # (not M.to: Inductor's mutation analysis builds this kernel with M a Python int)
    for j in tl.static_range(1, SPLIT):
        acc += tl.load(ptrs + m64 * (j * RP), mask=mmask[:, None], other=0.0)
    tl.store(t_ptr + offs_m[:, None].to(tl.int64) * stride_t + rr[None, :], acc.to(t_ptr.dtype.element_ty),
             mask=mmask[:, None] & (rr[None, :] < R))


@triton.jit
def _e4m3_rn(u):
    """u rounded to the nearest fp8 e4m3 value (ties to even, as the fp32 -> e4m3 conversion), in fp32, for
    |u| < 448: rint(u / ulp) ulp with ulp = 2^(max(e, -6) - 3), e the binade of u (-6: e4m3's subnormal spacing,
    2^-9), the powers of two made from exponent bits (exact products). Used instead of converting the fp8 value
    back: on the H200 (Triton 3.6, sm_90) `u.to(fp8).to(fp32)` in this kernel's MMA-layout registers gave a fixed
    wrong byte pattern in half of the columns (session 10, scripts/debug_stacked.py)."""
    e = tl.maximum(((u.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    inv_ulp = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e)
    ulp = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    return _RINT(u * inv_ulp) * ulp


@triton.jit(do_not_specialize=["M", "M_STORE"])
def lrb_split_kernel(x_ptr, b_ptr, sx_ptr, o_ptr, w_ptr, lo_ptr, M, M_STORE, stride_x, stride_o, K: tl.constexpr,
                     R: tl.constexpr, RP: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BM: tl.constexpr,
                     BK: tl.constexpr, ACT: tl.constexpr = 0, ASYM: tl.constexpr = False):
    """The stacked mode's extra code columns (lrb_stacked.py), columns [0, W) of o's rows (the quantizer writes
    the K after them): t = act(x) (B H)^T as lrb_down_kernel, u = t / (s_x c) split into fp8 u1 + u2, stored as
    [u1, u1, u2] and zeros in the W - 3R pad columns; c (a power of two) read from its slot in the extended
    weight, W - 3R bytes before w_ptr (the weight's code columns: qweight, a graph input under torch.compile, with
    no view of it in the graph); rows M..M_STORE-1 (padding) and rows with s_x = 0 get zeros.
    ASYM: asymmetric codes (centred, lo' at lo_ptr; unread otherwise): `_asym_columns` (the offset term, rows
    rescued in place)."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, RP)
    mmask = offs_m < M
    acc = _down_acc(x_ptr, b_ptr, offs_m, mmask, rr, stride_x, K, R, RP, BM, BK, ACT)
    smask = offs_m < M_STORE
    sx = tl.load(sx_ptr + offs_m, mask=smask & mmask, other=0.0)
    row = o_ptr + offs_m[:, None].to(tl.int64) * stride_o
    if ASYM:
        lo = tl.load(lo_ptr + offs_m, mask=smask & mmask, other=0.0)
        _asym_columns(row, acc, sx, lo, sx_ptr + offs_m, w_ptr, smask, rr, K, R, W, WP, BM, BK)
    else:
        store_u_columns(row, acc, sx, w_ptr, smask, rr, R, W, WP, BM)


@triton.jit
def _asym_columns(row, t, sx, lo, sx_ptrs, w_ptr, smask, rr, K: tl.constexpr, R: tl.constexpr, W: tl.constexpr,
                  WP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """The W extra columns of asymmetric rows (lrb_stacked's module docstring; `act_ext_asym_reference` is this in
    torch): the row scale g = s_x 2^e with e the least making max |u| and |U| <= U_MAX (>= 0 where s_x > 0; where
    s_x = 0, any e and zero codes), written back over s_x, the row's codes rewritten as q 2^-e where e > 0; then
    [u1, u1, u2] with u = t / (c g), zeros, and U = lo' 2^p / g in three e4m3 terms in each of the offset term's
    OFF_DIGITS-column groups. c and 2^p: rows 0 and 1 of c's column, W - 3R bytes before w_ptr."""
    slot = w_ptr - (W - 3 * R)
    inv_c = 1.0 / tl.load(slot).to(tl.float32)  # exact: c is a power of two
    two_p = tl.load(slot + (W + K)).to(tl.float32)
    zero = sx == 0
    base = tl.where(zero, 1.0, sx)
    tmax = tl.max(tl.abs(t), axis=1)
    need = tl.div_rn(tl.div_rn(tl.maximum(tmax * inv_c, tl.abs(lo) * two_p), base), _U_MAX)
    bits = need.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    e = tl.where(need > 0, e, 0)
    e = tl.minimum(tl.maximum(tl.where(zero, e, tl.maximum(e, 0)), -126), 126)  # (2^e and 2^-e stay normal)
    two_e = ((e + 127) << 23).to(tl.float32, bitcast=True)  # 2^e
    g = tl.where((need > 0) | (sx != 0), base * two_e, 0.0)
    fix = smask & (zero | (e > 0)) & (g > 0)
    if tl.max(fix.to(tl.int32), axis=0) > 0:  # rare: rewrite the rescued rows' codes (zero where s_x = 0)
        keep = tl.where(zero, 0.0, ((127 - e) << 23).to(tl.float32, bitcast=True))  # 2^-e
        kk = tl.arange(0, BK)
        for k0 in range(0, K, BK):
            ptrs = row + W + k0 + kk[None, :]
            q = tl.load(ptrs, mask=fix[:, None], other=0.0).to(tl.float32)
            tl.store(ptrs, _e4m3_rn(q * keep[:, None]).to(tl.float8e4nv), mask=fix[:, None])
    tl.store(sx_ptrs, g, mask=smask)
    store_u_columns(row, t, g, w_ptr, smask, rr, R, W, WP, BM, False)  # [u1, u1, u2] against g
    # the pad columns from 3R: c's column and the tail stay zero, the offset columns hold U's terms
    pp = tl.arange(0, WP)
    off = pp - 1  # offset column index from 3R + 1 (`lrb_layout.off_column`)
    j = tl.where((off >= 0) & (off < _OFF_TERMS * _OFF_DIGITS), off // _OFF_DIGITS, _OFF_TERMS)  # its U term
    uu = tl.where(g > 0, tl.div_rn(lo * two_p, tl.where(g > 0, g, 1.0)), 0.0)
    u0 = _e4m3_rn(uu)
    r1 = uu - u0
    u1t = _e4m3_rn(r1)
    u2t = _e4m3_rn(r1 - u1t)  # (every term rounded by arithmetic, subnormals included: the conversion then is exact)
    val = tl.where(j[None, :] == 0, u0[:, None], tl.where(j[None, :] == 1, u1t[:, None],
                                                          tl.where(j[None, :] == 2, u2t[:, None], 0.0)))
    tl.store(row + 3 * R + pp[None, :], val.to(tl.float8e4nv), mask=smask[:, None] & (pp[None, :] < W - 3 * R))


@triton.jit
def store_u_columns(row, t, sx, w_ptr, smask, rr, R: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                    BM: tl.constexpr, PAD: tl.constexpr = True):
    """The stacked mode's W activation columns of the rows at `row` (pointers to their first byte): u = t / (s_x c)
    split into [u1, u1, u2] and zeros in the W - 3R pad columns (zero rows where s_x = 0; PAD False: the pad columns
    are the caller's, `_asym_columns`); c read from its slot W - 3R bytes before w_ptr (the extended weight's code
    columns)."""
    inv_c = 1.0 / tl.load(w_ptr - (W - 3 * R)).to(tl.float32)  # exact: c is a power of two
    rs = tl.where(sx > 0, inv_c / tl.where(sx > 0, sx, 1.0), 0.0)
    u = t * rs[:, None]
    u1f = _e4m3_rn(u)  # u1 in fp32 by arithmetic: the fp8 -> fp32 conversion of u1 miscompiled here (_e4m3_rn)
    u1 = u1f.to(tl.float8e4nv)  # exact
    u2 = _e4m3_rn(u - u1f).to(tl.float8e4nv)  # (rounded by arithmetic: the interpreter truncates fp8 subnormals)
    cmask = smask[:, None] & (rr[None, :] < R)
    tl.store(row + rr[None, :], u1, mask=cmask)
    tl.store(row + R + rr[None, :], u1, mask=cmask)
    tl.store(row + 2 * R + rr[None, :], u2, mask=cmask)
    if PAD:
        pp = tl.arange(0, WP)  # the pad columns up to a multiple of 16 (cuBLAS's fp8 K): zeros
        tl.store(row + 3 * R + pp[None, :], tl.zeros((BM, WP), dtype=tl.float32).to(tl.float8e4nv),
                 mask=smask[:, None] & (pp[None, :] < W - 3 * R))


def ext_constexprs(k: int, r: int, w: int) -> dict:
    """The constexprs of the stacked mode's extra columns for K, rank r and W extra columns (both kernels)."""
    return dict(K=k, R=r, RP=rank_pad(r), W=w, WP=max(16, triton.next_power_of_2(w - 3 * r)))


def lrb_split(x2, bh, sx, out, w_codes, m_store: int, launcher=launch, act: str = "", lo=None) -> None:
    """Columns [0, W) of out (m_store, W + K) fp8 (the quantizer writes the last K) = [u1, u1, u2, 0...] with
    u = act(x2) (B H)^T / (s_x c); w_codes: the extended weight's code columns (N, K) (lrb_stacked.py), c read from
    its slot W - 3r bytes before their first element (`lrb_split_kernel`; check `lrb_down_ok` first). With lo (the
    asymmetric codes' lo', m_store): the offset term's columns too, rescued rows' codes and s_x rewritten in place."""
    m, k = x2.shape
    r = bh.shape[0]
    w = out.shape[1] - k
    if m_store == 0:
        return
    launcher(lrb_split_kernel, (triton.cdiv(m_store, DOWN_BM),),
             (x2, bh, sx, out, w_codes, sx if lo is None else lo, m, m_store, x2.stride(0), out.stride(0)),
             dict(**ext_constexprs(k, r, w), BM=DOWN_BM, BK=DOWN_BK, ACT=act_code(act), ASYM=lo is not None),
             dict(num_warps=DOWN_WARPS, num_stages=DOWN_STAGES), no_specialize=(6, 7))


def lrb_down_ok(x2, bh) -> bool:
    """The kernel takes x2 (M, K) and bh (r, K): 16-bit, the same dtype, contiguous rows, K a multiple of its tile,
    r <= 128 (the sibling-fused q/k/v's 3 x 32; offline sm_90 at r = 128: 144 KiB of shared memory, no spills)."""
    k = x2.shape[1]
    return (x2.dtype in (torch.bfloat16, torch.float16) and bh.dtype == x2.dtype and x2.stride(1) == 1
            and bh.is_contiguous() and k % DOWN_BK == 0 and 0 < bh.shape[0] <= 128)


def down_split(m: int, k: int) -> int:
    """How many K ranges `lrb_down` splits the product into: one below ~128 programs' worth of rows would leave
    most SMs idle, each program streaming all of K (session 13, H200 profile of the paper policy at batch 1:
    84 calls at M = 256 took 8 us each on 4 programs). A divisor of K's tile count, the most up to about
    128 programs in all for the largest M of m's bucket (`dispatch.m_bucket`: the choice changes only where the
    dispatch's other per-M choices do, so a dynamic-M graph guards on no new bound)."""
    from .dispatch import m_bucket
    tiles = k // DOWN_BK
    bound = env_int("ROBUQ_LRB_DOWN_SPLIT")  # an upper bound, for A/B runs (1: one program streams all of K)
    want = max(1, 128 // triton.cdiv(m_bucket(m), DOWN_BM))
    if bound is not None:
        want = min(want, max(1, bound))
    return max(d for d in range(1, min(want, tiles) + 1) if tiles % d == 0)


def lrb_down(x2, bh, t, launcher=launch, act: str = "", col: int = 0) -> None:
    """t (m, r) = act(x2) (B H)^T with `lrb_down_kernel` (check `lrb_down_ok` first). launcher: as `lowrank_add`.
    Few rows: split over K (`down_split`) into fp32 partials, added in a fixed order by a second kernel. col > 0:
    t is a wider buffer whose columns [col, col + r) take the product, in one kernel (no split)."""
    m, k = x2.shape
    r = bh.shape[0]
    if m == 0:
        return
    rp = rank_pad(r)
    split = 1 if col else down_split(m, k)
    out = t if split == 1 else torch.empty(split, m, rp, device=x2.device, dtype=torch.float32)  # (partials)
    # (T_COL passed even where 0: traced without it, torch's mutation analysis of the kernel gave up and cloned x and
    # B on every call, tests/kernels/test_inductor_traced.py)
    launcher(lrb_down_kernel, (triton.cdiv(m, DOWN_BM), split), (x2, bh, out, m, x2.stride(0), out.stride(-2)),
             dict(K=k, R=r, RP=rp, BM=DOWN_BM, BK=DOWN_BK, ACT=act_code(act), SPLIT=split, T_COL=col),
             dict(num_warps=DOWN_WARPS, num_stages=DOWN_STAGES), no_specialize=(3,))
    if split > 1:
        launcher(lrb_down_reduce_kernel, (triton.cdiv(m, DOWN_BM),), (out, t, m, t.stride(0)),
                 dict(R=r, RP=rp, SPLIT=split, BM=DOWN_BM), dict(num_warps=DOWN_WARPS), no_specialize=(2,))


@triton.jit(do_not_specialize=["M"])
def lowrank_add_kernel(y_ptr, out_ptr, t_ptr, a_ptr, lo_ptr, c_ptr, M, N, stride_y, stride_o, stride_t, stride_a,
                       R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr,
                       HAS_LRB: tl.constexpr, ASYM: tl.constexpr):
    # R (the rank) a constexpr: the factors' column mask is then known per 8-column group, and their rows load as
    # 16-byte vectors
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mmask = offs_m < M
    nmask = offs_n < N
    mask = mmask[:, None] & nmask[None, :]
    acc = tl.load(y_ptr + offs_m[:, None].to(tl.int64) * stride_y + offs_n[None, :], mask=mask,
                  other=0.0).to(tl.float32)
    if HAS_LRB:
        rr = tl.arange(0, RP)
        t = tl.load(t_ptr + offs_m[:, None].to(tl.int64) * stride_t + rr[None, :],
                    mask=mmask[:, None] & (rr[None, :] < R), other=0.0)
        a = tl.load(a_ptr + offs_n[:, None].to(tl.int64) * stride_a + rr[None, :],
                    mask=nmask[:, None] & (rr[None, :] < R), other=0.0)
        acc = tl.dot(t, tl.trans(a), acc)
    if ASYM:
        lo = tl.load(lo_ptr + offs_m, mask=mmask, other=0.0)
        c = tl.load(c_ptr + offs_n, mask=nmask, other=0.0)
        acc += lo[:, None] * c[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_o + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


def lowrank_add(y, out, t, up, lo, cs, launcher=launch) -> None:
    """out (m, N) = y + t up^T [+ lo c] (out may be y: in place). y / out rows contiguous; t (m, r) and up (N, r) in
    y's dtype with contiguous rows, or both None; lo (>= m,) and cs (N,) fp32, or both None. launcher: `launch`
    (eager) or `triton_launch.traced` (inside a triton_op)."""
    m, n = y.shape
    if m == 0 or n == 0:
        return
    r = 0 if t is None else t.shape[1]
    rp = rank_pad(r)
    launcher(lowrank_add_kernel, (triton.cdiv(m, BM), triton.cdiv(n, BN)),
             (y, out, t if t is not None else y, up if up is not None else y, lo if lo is not None else y,
              cs if cs is not None else y, m, n, y.stride(0), out.stride(0), t.stride(0) if t is not None else 0,
              up.stride(0) if up is not None else 0),
             dict(R=r, BM=BM, BN=BN, RP=rp, HAS_LRB=t is not None, ASYM=lo is not None),
             dict(num_warps=WARPS, num_stages=1), no_specialize=(6,))
