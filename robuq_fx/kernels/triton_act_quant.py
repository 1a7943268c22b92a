"""Triton activation quantizer of the Hopper qlinear path: x -> (x H) -> per-token codes, in one pass (imported
lazily by `triton_fp8.py`). The Hadamard is an in-register butterfly (no tensor cores, no padding).

`act_quant_bfly_kernel`: one program per BM rows (the tuned tilings use one row and one or two warps, so a row's
reductions stay inside a warp). A row of K columns is read once as up to four contiguous power-of-two "pieces"
(1152 = 1024 + 128, 4608 = 4096 + 512; `quantizer.make_plan`). With a Hadamard of block b each piece is viewed as
(rows * width / b, b) and multiplied by the unnormalized Sylvester matrix H_b with the constant-geometry fast
Walsh-Hadamard transform: log2(b) identical stages of `(a, c) -> (a + c, a - c)` on adjacent pairs, the sums going to
the first half and the differences to the second (Pease; after log2(b) stages the result is x H_b in natural order).
Sums are taken in fp32, then multiplied by dtype(1/sqrt(b)) and rounded to the input dtype, exactly like
`hadamard.block_hadamard` (a bf16 matmul with fp32 accumulation) where the fp32 sums are exact.

Then per-row absmax (or min/max over the row; with `sigma` clipping mu +- c sigma of the row, kept inside them, and
codes clamped), the scale s = range / levels by IEEE division, and each code
rint(y / s) (round half to even, as `torch.round`; no clamp is needed, see `_store`) with the quotient from one
reciprocal per row and an FMA-corrected product per element:
    r = RN(1/s),  q0 = RN(y r),  e = fma(-q0, s, y) (exact),  q = RN(q0 + e r)
which is the correctly rounded y / s for normal s (Markstein), ties included; s == 0 gives q = 0. Output:
fp8 e4m3 codes (|q| <= 15 is exact), or in DEQUANT mode Q_a(x H) = s q (+ lo) in the input dtype; per-row s and lo
in fp32. Asymmetric codes may be stored centred (HAS_SHIFT): q' = q - z with z = rint(-lo / s) clamped to the codes,
the code of 0 in this row, and lo' = lo + z s (|lo'| <= s / 2 when the row's range holds 0), so that
y = s_x s_w (q' q_w) + lo' c: the same value, with the GEMM's term already centred and the rank-1 term small. (A
constant shift of 2^(k-1) left the two terms large and of opposite sign; the addmm epilogue rounds the first to
bf16 before adding the second, which lost ~1% of rms(y) on 0.4% of the outputs at K = 4608, A2, on the H200.)

It replaced a kernel that rotated on the tensor cores (a (rows * tiles, 128) x (128, 128) dot) and divided with
`tl.div_rn`: the codes came out bit-identical in every tested case and it is 1.4-2.1x faster on the H100
(`benchmarks/results/bench_act_quant_vs_tensorcore_NVIDIA_H100.txt`): the dot's layout conversions put CTA-wide
barriers in the loop and the IEEE division took ~10 instructions per element.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .triton_launch import launch
from .triton_rowquant import round_quotient, scale_of, zero_code


@triton.jit
def _fwht(x, R: tl.constexpr, B: tl.constexpr, LOGB: tl.constexpr):
    """(R, B) fp32 -> (R, B) x H_B, H_B the +-1 Sylvester matrix (constant-geometry FWHT)."""
    for _ in tl.static_range(LOGB):
        a, c = tl.split(tl.reshape(x, (R, B // 2, 2)))
        x = tl.reshape(tl.permute(tl.join(a + c, a - c), (0, 2, 1)), (R, B))
    return x


@triton.jit
def _tanh_interpretable(u):
    """tanh for Triton's CPU interpreter, which has no libdevice (the GPU build uses libdevice.tanh = CUDA's tanhf)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _fdiv_interpretable(a, b):
    return a / b


_TANH = _tanh_interpretable if os.environ.get("TRITON_INTERPRET") == "1" else libdevice.tanh
_FDIV = _fdiv_interpretable if os.environ.get("TRITON_INTERPRET") == "1" else libdevice.fast_dividef
ACTS = {"": 0, "gelu": 1, "gelu_tanh": 2}  # robuq::qlinear's input_act -> the kernels' ACT constexpr
FAST_TANH_GELU = 3  # the tanh GELU in its sigmoid form (`act_code`, ROBUQ_GELU_FORM=fast)
# 2 log2(e) sqrt(2 / pi) and its 0.044715 multiple: x sigma(2 inner) = x / (1 + 2^(x (K0 + K1 x^2)))
_K0 = tl.constexpr(-2.0 * 1.4426950408889634 * 0.7978845608028654)
_K1 = tl.constexpr(-2.0 * 1.4426950408889634 * 0.7978845608028654 * 0.044715)


def act_code(act: str) -> int:
    """The kernels' ACT constexpr for robuq::qlinear's input_act / output_act. "gelu_tanh" is ATen's formula (tanhf:
    bit-equal to torch's GELU, ~31 instructions a value) unless ROBUQ_GELU_FORM=fast picks its sigmoid form,
    x / (1 + 2^(-2 log2(e) inner)) on the special-function unit (~8 instructions): the same function, its fp32 value a
    few ulp from ATen's, so a rare value rounds to the neighbouring bf16 (docs/gpu.md, session 17)."""
    if act == "gelu_tanh" and os.environ.get("ROBUQ_GELU_FORM") == "fast":
        return FAST_TANH_GELU
    return ACTS[act]


@triton.jit
def _input_act(x, ACT: tl.constexpr):
    """torch's GELU of fp32 x as ATen's CUDA kernel computes it (ActivationGeluKernel.cu): exact (ACT 1) or tanh
    (ACT 2); ACT 3 the tanh GELU as x sigma(2 inner) (`act_code`)."""
    if ACT == 1:
        return x * 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 3:
        return _FDIV(x, 1.0 + tl.exp2(x * (_K0 + _K1 * (x * x))))
    else:
        inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
        return 0.5 * x * (1.0 + _TANH(inner))


@triton.jit
def _piece(x_ptr, rows, rmask, stride_xm, hscale, OFF, W: tl.constexpr, BM: tl.constexpr,
           B: tl.constexpr, LOGB: tl.constexpr, HAD: tl.constexpr, ACT: tl.constexpr = 0):
    """(BM, W) rotated columns [OFF, OFF + W), rounded to and kept in the input dtype (half the registers of fp32
    while the row's range is reduced). ACT: the layer's input activation first (robuq::qlinear's input_act),
    rounded to the input dtype as the model's own activation module writes it."""
    cols = OFF + tl.arange(0, W)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=rmask[:, None], other=0.0)
    if ACT != 0:
        x = _input_act(x.to(tl.float32), ACT).to(x_ptr.dtype.element_ty)
    if HAD:
        y = _fwht(tl.reshape(x.to(tl.float32), (BM * W // B, B)), BM * W // B, B, LOGB)
        y = (tl.reshape(y, (BM, W)) * hscale).to(x_ptr.dtype.element_ty)
    else:
        y = x
    return y


@triton.jit
def _range(y, SYM: tl.constexpr):
    y = y.to(tl.float32)
    if SYM:
        r = tl.max(tl.abs(y), axis=1)
        return r, r
    return tl.min(y, axis=1), tl.max(y, axis=1)


@triton.jit
def _store(y, out_ptr, rows, smask, stride_om, s, safe, rcp, lo, z, OFF,
           W: tl.constexpr, SYM: tl.constexpr, DEQUANT: tl.constexpr, HAS_SHIFT: tl.constexpr,
           levels=0.0, CLAMP: tl.constexpr = False):
    cols = OFF + tl.arange(0, W)
    y = y.to(tl.float32)
    if not SYM:
        y = y - lo[:, None]
    q = round_quotient(y, safe[:, None], rcp[:, None])
    # absmax ranges need no clamp: |y| <= absmax and s = RN(absmax / qmax) give |y / s| <= qmax (1 + 2^-23), so
    # rint <= qmax (asymmetric: 0 <= RN(y - lo) <= RN(hi - lo), the same bound with levels); s == 0 only for an
    # all-zero row. Sigma ranges leave values outside: CLAMP, as quantizers.quantize_act does.
    if CLAMP:
        q = tl.minimum(tl.maximum(q, -levels if SYM else 0.0), levels)
    if DEQUANT:
        if SYM:
            v = s[:, None] * q
        else:
            v = lo[:, None] + s[:, None] * q
    elif HAS_SHIFT:
        v = q - z[:, None]
    else:
        v = q
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], v.to(out_ptr.dtype.element_ty),
             mask=smask[:, None])


@triton.jit
def _welford_combine(m_a, q_a, n_a, m_b, q_b, n_b):
    """Two (mean, sum of squared deviations, count) summaries of disjoint parts of a row -> that of their union
    (Chan et al.'s pairwise update; stable where E[y^2] - mu^2 cancels, e.g. a row far from 0)."""
    n = n_a + n_b
    w = tl.where(n > 0, n_b / n, 0.0)
    d = m_b - m_a
    return m_a + d * w, q_a + q_b + d * d * n_a * w, n


@triton.jit
def _moments(y):
    """(mean, sum of squared deviations, count) of each row of y, (BM,) fp32 each, in one Welford reduction: no row
    statistic is broadcast back against y, which (a mean then the deviations from it, two passes) made Triton
    convert each whole piece's layout through shared memory, 5x the absmax kernel's time on the H200 (session 15).
    For programs of several rows; one-row programs take the two scalar passes (`_total`, `_dev2`: no division a
    value, session 17)."""
    yf = y.to(tl.float32)
    return tl.reduce((yf, tl.zeros_like(yf), tl.full(yf.shape, 1.0, tl.float32)), 1, _welford_combine)


@triton.jit
def _total(y):
    """The sum of a one-row piece (1, W) in fp32, a scalar: a scalar broadcasts back against any piece's layout, so
    the squared deviations from the mean (`_dev2`) need no layout conversion of the row (session 15: a (BM,) mean
    broadcast back made Triton convert whole pieces through shared memory)."""
    return tl.sum(tl.sum(y.to(tl.float32), axis=1), axis=0)


@triton.jit
def _dev2(y, mu):
    """The sum of squared deviations of a one-row piece from the scalar mu."""
    d = y.to(tl.float32) - mu
    return tl.sum(tl.sum(d * d, axis=1), axis=0)


@triton.jit
def _two_pass(x_ptr, out_ptr, scale_ptr, lo_ptr, rows, rmask, smask, stride_xm, stride_om, hscale, levels,
              K: tl.constexpr, CHUNK: tl.constexpr, BM: tl.constexpr, B: tl.constexpr, LOGB: tl.constexpr,
              HAD: tl.constexpr, SYM: tl.constexpr, DEQUANT: tl.constexpr, HAS_SHIFT: tl.constexpr,
              ACT: tl.constexpr = 0):
    # elementwise running min / max (or absmax) in the loop, one reduction after it
    a = tl.full((BM, CHUNK), float("inf"), tl.float32)
    b = tl.full((BM, CHUNK), float("-inf"), tl.float32)
    for c in tl.range(0, K, CHUNK):
        y = _piece(x_ptr, rows, rmask, stride_xm, hscale, c, CHUNK, BM, B, LOGB, HAD, ACT).to(tl.float32)
        if SYM:
            b = tl.maximum(b, tl.abs(y))
        else:
            a = tl.minimum(a, y)
            b = tl.maximum(b, y)
    b = tl.max(b, axis=1)
    a = -b if SYM else tl.min(a, axis=1)
    s, lo, safe, rcp = scale_of(a, b, levels, SYM)
    z = zero_code(lo, safe, rcp, levels, HAS_SHIFT)
    tl.store(scale_ptr + rows, s, mask=smask)
    tl.store(lo_ptr + rows, lo + z * s, mask=smask)
    for c in tl.range(0, K, CHUNK):
        y = _piece(x_ptr, rows, rmask, stride_xm, hscale, c, CHUNK, BM, B, LOGB, HAD, ACT)
        _store(y, out_ptr, rows, smask, stride_om, s, safe, rcp, lo, z, c, CHUNK, SYM, DEQUANT, HAS_SHIFT)


@triton.jit(do_not_specialize=["M", "M_STORE"])
def act_quant_bfly_kernel(x_ptr, out_ptr, scale_ptr, lo_ptr, M, M_STORE, stride_xm, stride_om,
                          hscale, levels,
                          W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr,
                          BM: tl.constexpr, B: tl.constexpr, LOGB: tl.constexpr, HAD: tl.constexpr,
                          SYM: tl.constexpr, DEQUANT: tl.constexpr, HAS_SHIFT: tl.constexpr,
                          CHUNK: tl.constexpr, clip_c=0.0, SIGMA: tl.constexpr = False, ACT: tl.constexpr = 0):
    """W0..W3: widths (columns) of the pieces, powers of two, multiples of B, summing to K (unused = 0).
    CHUNK > 0: two passes over the row in chunks of CHUNK columns instead (range, then codes; the second pass
    re-reads and re-rotates the row, mostly from cache), for rows too long to keep in registers."""
    # float scalars arrive as fp32 from a direct launch but as fp64 from Inductor's wrapper (it types Python
    # floats fp64): computing in fp32 either way keeps the codes those of the eager kernel
    hscale = tl.cast(hscale, tl.float32)
    levels = tl.cast(levels, tl.float32)
    clip_c = tl.cast(clip_c, tl.float32)
    row0 = tl.program_id(0) * BM
    rows = (row0 + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < M
    smask = rows < M_STORE
    if CHUNK > 0:
        _two_pass(x_ptr, out_ptr, scale_ptr, lo_ptr, rows, rmask, smask, stride_xm, stride_om, hscale, levels,
                  W0 + W1 + W2 + W3, CHUNK, BM, B, LOGB, HAD, SYM, DEQUANT, HAS_SHIFT, ACT)
        return
    y0 = _piece(x_ptr, rows, rmask, stride_xm, hscale, 0, W0, BM, B, LOGB, HAD, ACT)
    a, b = _range(y0, SYM)
    if W1 > 0:
        y1 = _piece(x_ptr, rows, rmask, stride_xm, hscale, W0, W1, BM, B, LOGB, HAD, ACT)
        a1, b1 = _range(y1, SYM)
        a = tl.minimum(a, a1)
        b = tl.maximum(b, b1)
    if W2 > 0:
        y2 = _piece(x_ptr, rows, rmask, stride_xm, hscale, W0 + W1, W2, BM, B, LOGB, HAD, ACT)
        a2, b2 = _range(y2, SYM)
        a = tl.minimum(a, a2)
        b = tl.maximum(b, b2)
    if W3 > 0:
        y3 = _piece(x_ptr, rows, rmask, stride_xm, hscale, W0 + W1 + W2, W3, BM, B, LOGB, HAD, ACT)
        a3, b3 = _range(y3, SYM)
        a = tl.minimum(a, a3)
        b = tl.maximum(b, b3)
    if SIGMA and BM == 1:  # mu +- c sigma of the rotated row, kept inside [min, max]; one row a program (the
        # sigma plans'): the exact two passes over the registers (mean, then squared deviations) as scalar sums
        kk = tl.full((), W0 + W1 + W2 + W3, tl.float32)
        tot = _total(y0)
        if W1 > 0:
            tot += _total(y1)
        if W2 > 0:
            tot += _total(y2)
        if W3 > 0:
            tot += _total(y3)
        mu = tl.div_rn(tot, kk)
        m2 = _dev2(y0, mu)
        if W1 > 0:
            m2 += _dev2(y1, mu)
        if W2 > 0:
            m2 += _dev2(y2, mu)
        if W3 > 0:
            m2 += _dev2(y3, mu)
        sd = tl.sqrt_rn(tl.div_rn(m2, kk))
    elif SIGMA:  # several rows a program: one Welford reduction a piece (no row statistic broadcast back)
        mu, m2, n = _moments(y0)
        if W1 > 0:
            mu, m2, n = _welford_combine(mu, m2, n, *_moments(y1))
        if W2 > 0:
            mu, m2, n = _welford_combine(mu, m2, n, *_moments(y2))
        if W3 > 0:
            mu, m2, n = _welford_combine(mu, m2, n, *_moments(y3))
        sd = tl.sqrt_rn(tl.div_rn(m2, tl.zeros_like(m2) + (W0 + W1 + W2 + W3)))
    if SIGMA:
        if SYM:
            b = tl.minimum(tl.abs(mu) + clip_c * sd, b)
        else:
            a = tl.maximum(mu - clip_c * sd, a)
            b = tl.minimum(mu + clip_c * sd, b)
    s, lo, safe, rcp = scale_of(a, b, levels, SYM)
    z = zero_code(lo, safe, rcp, levels, HAS_SHIFT)
    tl.store(scale_ptr + rows, s, mask=smask)
    tl.store(lo_ptr + rows, lo + z * s, mask=smask)
    _store(y0, out_ptr, rows, smask, stride_om, s, safe, rcp, lo, z, 0, W0, SYM, DEQUANT, HAS_SHIFT, levels,
           SIGMA)
    if W1 > 0:
        _store(y1, out_ptr, rows, smask, stride_om, s, safe, rcp, lo, z, W0, W1, SYM, DEQUANT, HAS_SHIFT,
               levels, SIGMA)
    if W2 > 0:
        _store(y2, out_ptr, rows, smask, stride_om, s, safe, rcp, lo, z, W0 + W1, W2, SYM,
               DEQUANT, HAS_SHIFT, levels, SIGMA)
    if W3 > 0:
        _store(y3, out_ptr, rows, smask, stride_om, s, safe, rcp, lo, z, W0 + W1 + W2, W3, SYM,
               DEQUANT, HAS_SHIFT, levels, SIGMA)


def launch_act_quant(x, out, scale, lo, m, m_store, hscale, levels, shift, block, plan, sym, dequant,
                     clip_c: float = 0.0, launcher=launch, act: str = ""):
    """x (>= m, K), out (m_store, K) codes (fp8) or Q_a(x H) (x's dtype); scale / lo (m_store,) fp32.
    plan = (piece widths, BM, num_warps, chunk) from `quantizer.make_plan`; block 0 = no Hadamard.
    clip_c > 0: `sigma` ranges mu +- clip_c sigma (one-pass plans only), as `quantizers.act_range`.
    shift (asymmetric codes only): store them centred on each row's code of 0, lo' = lo + z s (module docstring).
    launcher: `triton_launch.launch` (eager) or `triton_launch.traced` (inside a triton_op, for torch.compile)."""
    launcher(*act_quant_launch(x, out, scale, lo, m, m_store, hscale, levels, shift, block, plan, sym, dequant, clip_c,
                               act))


def act_quant_launch(x, out, scale, lo, m, m_store, hscale, levels, shift, block, plan, sym, dequant, clip_c=0.0,
                     act: str = ""):
    """(kernel, grid, runtime args, constexprs, options, no_specialize) of `launch_act_quant`'s launch; the runtime
    args start with x, out, scale, lo (what `fastcall` replaces per call)."""
    if clip_c and plan[3]:
        raise ValueError("sigma clipping needs a one-pass plan (chunk = 0)")
    widths, bm, warps, chunk = plan
    ws = list(widths) + [0] * (4 - len(widths))
    b = block if block > 1 else 2
    return (act_quant_bfly_kernel, ((m_store + bm - 1) // bm,),
            (x, out, scale, lo, m, m_store, x.stride(0), out.stride(0), float(hscale), float(levels)),
            dict(W0=ws[0], W1=ws[1], W2=ws[2], W3=ws[3], BM=bm, B=b, LOGB=b.bit_length() - 1, HAD=block > 1,
                 SYM=bool(sym), DEQUANT=bool(dequant), HAS_SHIFT=bool(shift) and not dequant and not sym, CHUNK=chunk,
                 clip_c=float(clip_c), SIGMA=bool(clip_c), ACT=act_code(act)),
            dict(num_warps=warps), (4, 5))
