"""The stacked LRB mode's operands (lrb_stacked.py runs the mode; this module is its arithmetic, plain torch):
the extra columns of the extended weight and activation, their widths, the power of two c, the e4m3 splits, and
the reference computations the kernels are tested against.

The branch adds t A^T, t = (x H) B^T (M, r), to y = s_x s_w (q_x q_w^T). Written as

    y[m, n] = s_x[m] s_w[n] (q_x[m] . q_w[n] + u[m] . v[n]),    u = t / (s_x c),  v = A c / s_w

it is one product over K + r columns with the row and column scales `_scaled_mm` already applies, so the whole
layer is cuBLAS's fp8 GEMM (the Triton epilogue GEMM it replaces ran ~1.4x slower than `_scaled_mm` on the H200's
DiT shapes). u and v are not integers: each is split into two fp8 e4m3 terms (u ~ u1 + u2, v ~ v1 + v2, each
residual exact to ~2^-8 of the value) and the columns [u1, u1, u2] meet [v1, v2, v1]:
u1 v1 + u1 v2 + u2 v1 = u v up to ~3 * 2^-8 relative on the branch's term (bf16's t A^T rounds to 2^-9 per
factor), for 3r extra columns plus one slot for c (below), rounded to 16: K + 112 at rank 32, +10% of the main
GEMM's work at K = 1152, +2.4% at K = 4608.

Range: e4m3 holds |u| <= 448. For symmetric absmax codes |x H| <= s_x qmax, so |t_j| <= sqrt(K) s_x qmax |(B H)_j|
and |u| <= sqrt(K) qmax max_j |(B H)_j| / c: c is the power of two that brings that bound to `U_MAX`, whatever
the input. v = A c / s_w must then fit too (checked once per weight; else the layer keeps the Triton epilogue).
Asymmetric activations (absmax or `sigma` ranges; on unless ROBUQ_STACKED_ASYM=0, since session 19's H200 run) add
the offset term lo' c[n] = s_x s_w (lo' / s_x) S_n, S_n = sum_k q_w[n, k] an integer: its base-16 digits
(|d_j| <= 8, j = 0..3) scaled by 2^-p (exact in e4m3; p per layer, from max |S_n|) sit in 12 of the weight's padding
columns, three copies of the four, against U = lo' 2^p / s_x split into three e4m3 terms (~2^-12 of the term). Their
codes do not bound |x H| (sigma ranges clip; a range may exclude 0), so c comes from a typical row's bound and
`lrb_split_kernel` rescues the rows whose u or U leave e4m3's range: the row scale becomes g = s_x 2^e, the row's
codes q 2^-e (exact for e <= 9, as codes are <= 15; beyond, rounded at 2^-10 g, far below bf16's step of x H in such
a row), u and U computed against g. Rows with s_x = 0 (a constant rotated row: x H = lo') get g = a power of two
from lo' and t, and zero codes. 2^p sits in row 1 of c's column (the activation side is zero there too).

c sits in row 0, column 3r of the extended weight, where the activation side's column is zero: it adds nothing to
the product, and `lrb_split_kernel` and compiled graphs read it on the device (no host value in a graph).
"""
from __future__ import annotations

import math
import os

import torch

from .. import quantizers as Q

U_MAX = 224.0  # the bound put on |u| (e4m3's largest finite value is 448: a factor 2 of margin)
V_MAX = 448.0


TERMS_MIN_RANK = 65  # from this rank on, the extra columns are two 128-column boxes [v1, c, 0..] [v2, 0..] (below)
MAX_FLAT_RANK = 128  # lrb_split's tile (`triton_lowrank.lrb_down_ok`)


def wide_flat() -> bool:
    """Ranks TERMS_MIN_RANK..MAX_FLAT_RANK (the sibling-fused q/k/v's 96) take the stacked mode too, their extended
    weight laid out flat ([v1, v2, v1, c, ..] like lower ranks) instead of the warp-specialized kernel's two boxes,
    which that kernel then refuses. On unless ROBUQ_STACKED_WIDE=0 (session 19, H200: the paper policy at batch 64
    0.925x bf16 with it, 0.910x without, same run)."""
    return os.environ.get("ROBUQ_STACKED_WIDE", "1") != "0"


def terms_form(r: int) -> bool:
    """Rank r's extra columns are the warp-specialized kernel's two 128-column boxes (`ext_columns`)."""
    return r >= TERMS_MIN_RANK and not wide_flat()


def ext_width(r: int) -> int:
    """Extra columns for rank r: 3r and c's slot, rounded up to 16 (cuBLAS's fp8 GEMM wants K % 16 == 0); for
    ranks > 64 (e.g. sibling-fused q/k/v's 96) with ROBUQ_STACKED_WIDE=0, the warp-specialized
    quantize-in-GEMM kernel's two boxes, 256 columns (`ext_columns`)."""
    return 256 if terms_form(r) else -(-(3 * r + 1) // 16) * 16


def c_column(r: int) -> int:
    """The column of row 0 that holds c in the extended weight (after the v terms; the activation side is 0 there)."""
    return r if terms_form(r) else 3 * r


C_MIN, C_MAX = 2.0 ** -9, 2.0 ** 8  # the powers of two e4m3 holds exactly (its slot in the extended weight)


OFF_TERMS, OFF_DIGITS = 3, 4  # the offset term's columns: three e4m3 terms of U against four base-16 digits of S_n


def off_column(r: int) -> int:
    """The first of the asymmetric offset term's OFF_TERMS x OFF_DIGITS columns (after c's slot)."""
    return 3 * r + 1


def asym_enabled() -> bool:
    """Asymmetric layers may take the stacked mode (module docstring); ROBUQ_STACKED_ASYM=0 keeps them on the
    Triton epilogue GEMM."""
    return os.environ.get("ROBUQ_STACKED_ASYM", "1") != "0"


def offset_fits(r: int) -> bool:
    """Rank r's padding columns hold the offset term's OFF_TERMS x OFF_DIGITS columns after c's slot."""
    return off_column(r) + OFF_TERMS * OFF_DIGITS <= ext_width(r)


def split_fp8(v: torch.Tensor, terms: int = 2) -> tuple[torch.Tensor, ...]:
    """v (fp32) ~ v1 + v2 (+ ...), `terms` fp8 e4m3 values (round to nearest even), each the residual's."""
    out = []
    for _ in range(terms):
        out.append(v.to(torch.float8_e4m3fn))
        v = v - out[-1].float()
    return tuple(out)


def scale_c(bh: torch.Tensor, k: int, a_bits: int, sym: bool = True, clip: str = "absmax") -> float:
    """The power of two c with sqrt(K) F max_j |(B H)_j| / c <= U_MAX, the bound on |u| above: F = qmax for
    symmetric absmax codes (for every input). Asymmetric: |t_j| <= ||x H|| |(B H)_j|, ||x H|| = sqrt(K (mu^2 +
    sigma^2)), and the range is at least min(c_k, 2) sigma (sigma) or 2 sigma (absmax) wide, so F = sqrt(2) levels /
    min(c_k, 2) bounds the rows with |mu| <= sigma; `lrb_split_kernel` rescues the others (module docstring)."""
    if sym:
        f = Q.act_levels(a_bits, True)
    else:
        width = min(Q.gaussian_clip(2 ** a_bits), 2.0) if clip == "sigma" else 2.0
        f = math.sqrt(2.0) * Q.act_levels(a_bits, False) / width
    bound = math.sqrt(k) * f * bh.float().norm(dim=1).max().item()
    return 2.0 ** math.ceil(math.log2(max(bound / U_MAX, 2.0 ** -60)))


def offset_digits(colsum: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(D (N, OFF_DIGITS) fp32, p): D[:, j] = d_j 16^j 2^-p with d_j the balanced base-16 digits (|d_j| <= 8) of the
    integer column sums S_n (sum_j D[:, j] 2^p = S_n exactly), each exact in e4m3, p the least with |D| <= V_MAX;
    None where S_n needs more digits or the digits leave e4m3's exact values."""
    rem = colsum.double().round()
    digits = []
    for _ in range(OFF_DIGITS):
        d = torch.remainder(rem + 8, 16) - 8
        digits.append(d)
        rem = (rem - d) / 16
    if rem.abs().max().item() > 0:
        return None
    raw = torch.stack([d * 16.0 ** j for j, d in enumerate(digits)], 1)
    p = max(0, math.ceil(math.log2(max(raw.abs().max().item(), 1.0) / V_MAX)))
    dd = (raw * 2.0 ** -p).float()
    if p > 9 or not torch.equal(dd.to(torch.float8_e4m3fn).float(), dd):
        return None
    return dd, p


def ext_columns(sw: torch.Tensor, up: torch.Tensor, c: float, colsum: torch.Tensor | None = None
                ) -> torch.Tensor | None:
    """[v1, v2, v1, 0...] (N, W) fp8 with v = A c / s_w (the extended weight's first W columns), and c itself in
    row 0, column 3r (its slot: the activation side's column there is zero, so it adds nothing to the product;
    `lrb_split_kernel` reads c from it); for ranks >= TERMS_MIN_RANK (with ROBUQ_STACKED_WIDE=0) two 128-column
    boxes [v1, c, 0..] [v2, 0..] instead (gluon_qgemm_ws's "terms" form, c in column r). With `colsum` (the codes'
    integer column sums S_n, for asymmetric activations): the offset term's digit columns from `off_column(r)`
    ([D_0..D_3] three times) and 2^p in row 1, column 3r. None where v leaves e4m3's range, a channel with s_w = 0 has a branch, c is not one of e4m3's
    exact powers of two, the rank leaves no room for c (or the digits), or S_n no exact digits."""
    n, r = up.shape
    v = up.float() * c / sw.view(-1, 1)
    if not C_MIN <= c <= C_MAX or not torch.isfinite(v).all() or v.abs().max().item() > V_MAX:
        return None
    if colsum is not None:
        dp = offset_digits(colsum) if not terms_form(r) and n >= 2 else None
        if dp is None or not offset_fits(r):
            return None
    v1, v2 = split_fp8(v)
    ext = torch.zeros(n, ext_width(r), device=up.device, dtype=torch.float8_e4m3fn)
    if terms_form(r):  # two boxes, [v1, c, 0..] and [v2, 0..], met by [u1, 0..] [u1, 0..] [u2, 0..] (box 0, 1, 0)
        if r >= 128:
            return None
        ext[:, :r], ext[:, 128:128 + r] = v1, v2
    else:
        ext[:, :r], ext[:, r:2 * r], ext[:, 2 * r:3 * r] = v1, v2, v1
    ext[0, c_column(r)] = c
    if colsum is not None:
        dd, p = dp
        o = off_column(r)
        for i in range(OFF_TERMS):
            ext[:, o + OFF_DIGITS * i:o + OFF_DIGITS * (i + 1)] = dd.to(torch.float8_e4m3fn)
        ext[1, c_column(r)] = 2.0 ** p
    return ext


def act_ext_reference(t: torch.Tensor, sx: torch.Tensor, c: float, w: int) -> torch.Tensor:
    """What `triton_lowrank.lrb_split_kernel` writes, from t (M, r) in torch math: [u1, u1, u2, 0...] (M, w) fp8
    with u = t / (s_x c), zero rows where s_x = 0."""
    r = t.shape[1]
    rs = torch.where(sx > 0, (1.0 / c) / sx, torch.zeros_like(sx))
    u1, u2 = split_fp8(t.float() * rs.view(-1, 1))
    out = torch.zeros(t.shape[0], w, device=t.device, dtype=torch.float8_e4m3fn)
    out[:, :r], out[:, r:2 * r], out[:, 2 * r:3 * r] = u1, u1, u2
    return out


def ceil_log2(v: torch.Tensor) -> torch.Tensor:
    """The least integer e with v <= 2^e, per element of a positive fp32 tensor (0 where v = 0), from the exponent
    and mantissa bits as `lrb_split_kernel` takes it."""
    bits = v.float().view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return torch.where(v > 0, e, torch.zeros_like(e))


def act_ext_asym_reference(t: torch.Tensor, sx: torch.Tensor, lo: torch.Tensor, codes: torch.Tensor, c: float,
                           p: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `lrb_split_kernel` makes of an asymmetric row block, in torch math with the kernel's fp32 operations:
    (the W extra columns (M, w) fp8, the rescued codes (M, K) fp8, the row scales g (M,) fp32). need = the larger of
    max |t| / c and |lo'| 2^p over s_x (1 where s_x = 0) and U_MAX; e = ceil(log2(need)), at least 0 where s_x > 0;
    g = s_x 2^e (2^e where s_x = 0; 0 for an all-zero row), codes q 2^-e (0 where s_x = 0); u = t (1 / c) / g in two
    e4m3 terms, U = lo' 2^p / g in three."""
    t, sx, lo = t.float(), sx.float(), lo.float()
    zero = sx == 0
    base = torch.where(zero, torch.ones_like(sx), sx)
    inv_c = torch.tensor(1.0 / c, dtype=torch.float32)
    two_p = torch.tensor(2.0 ** p, dtype=torch.float32)
    need = torch.maximum(t.abs().amax(1) * inv_c, lo.abs() * two_p) / base / U_MAX
    e = ceil_log2(need)
    e = torch.where(zero, e, e.clamp_min(0)).clamp(-126, 126)
    g = torch.where((need > 0) | ~zero, torch.ldexp(base, e), torch.zeros_like(sx))
    keep = torch.where(zero, torch.zeros_like(sx), torch.ldexp(torch.ones_like(sx), -e))
    q = (codes.float() * keep.view(-1, 1)).to(torch.float8_e4m3fn)
    out = act_ext_reference(t, g, c, w)  # [u1, u1, u2] against g, zeros
    uu = torch.where(g > 0, (lo * two_p) / torch.where(g > 0, g, torch.ones_like(g)), torch.zeros_like(g))
    o = off_column(t.shape[1])
    for i, term in enumerate(split_fp8(uu, OFF_TERMS)):
        out[:, o + OFF_DIGITS * i:o + OFF_DIGITS * (i + 1)] = term.view(-1, 1).expand(-1, OFF_DIGITS)
    return out, q, g
