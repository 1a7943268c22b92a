"""The activation quantizer (x -> x H -> per-token fp8 codes) in Gluon, with layouts chosen by hand (issue 20).

Same contract and arithmetic as `triton_act_quant.act_quant_bfly_kernel` for its common case (Hadamard block 128,
absmax or `sigma` ranges, symmetric or asymmetric, codes out, no input activation): the codes equal the Triton
kernel's wherever the fp32 butterfly sums are exact (always, for bf16 inputs whose row spans less than 2^16 in
magnitude: each output is a sum of 128 bf16 values), and so do the scales (H200: its GPU tests pass). With `sigma`
ranges (mu +- c sigma of the rotated row, kept inside [min, max], session 18) the row's sums run in another order
than the Triton kernel's, so a scale may differ in its last bit and a code sitting on a rounding boundary by one.
Used where the dispatch table's `quant_gluon` (measured by `bench_linear.py --write-dispatch`) or
`ROBUQ_QUANT_KERNEL=gluon` chooses it.

Why: Triton picks the layouts of the Triton kernel itself. Its butterfly stages (constant geometry, a permute per
stage) cost shared-memory round trips and shuffles: ptxas counts 32.7 SASS instructions an element at K = 1152,
and at K = 4608 its one-warp rows hold 144 values a thread in 196 registers (27.0 an element, few warps an SM); it
runs at ~2 TB/s of the H200's ~4.8. Here every thread owns VT contiguous columns of one row (VT = 32 for the
1024-wide piece of K = 1152): loads and stores are 16-byte vectors, the butterflies on the low log2(VT) index bits
are additions between registers (reshape / permute / split / join only relabel registers in Gluon), and the
remaining bits of the 128-block are lane bits, exchanged with one `shfl.bfly` and one FMA each: y = fma(own, sign,
partner), sign = +1 where the bit is 0 (a + c), -1 where it is 1 (a - c). The butterflies run in place, so the
result is x H_128 in natural (Sylvester) order, as the reference's matmul gives it. `scripts/sass_stats.py` prints
both kernels' counts.

A row is split into at most two contiguous power-of-two pieces (1152 = 1024 + 128, 4608 = 4096 + 512), each with
its own layout; a row takes LANES lanes of WPR warps (`gluon_plan`; default all 32 lanes).
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.extra import libdevice


@gluon.constexpr_function
def _shfl_bfly(mask):
    return f"shfl.sync.bfly.b32 $0, $1, {mask}, 0x1f, 0xffffffff;"


@gluon.jit
def _partner(y, MASK: gl.constexpr):
    """The value of y in lane (lane ^ MASK)."""
    return gl.inline_asm_elementwise(_shfl_bfly(MASK), "=f,f", [y], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _bfly_lanes(y3, chunk, LANE_BIT: gl.constexpr):
    """One butterfly stage on a lane bit of y3 (ROWS, chunks, VT): (a, c) -> (a + c, a - c) in place across lanes
    l and l ^ 2^LANE_BIT, as fma(own, +1, partner) where the bit is 0 and fma(own, -1, partner) where it is 1 (exact:
    one rounding each). chunk: (1, chunks, 1) chunk indices (= lane + 32 * warp), one value a thread."""
    sign = 1.0 - 2.0 * ((chunk >> LANE_BIT) & 1).to(gl.float32)
    return gl.fma(y3, sign, _partner(y3, 1 << LANE_BIT))


@gluon.jit
def _bfly_regs(y, ROWS: gl.constexpr, W: gl.constexpr, S: gl.constexpr):
    """One butterfly stage on an in-thread index bit (stride S): reshape / permute / split / join only relabel
    registers here."""
    t = gl.permute(gl.reshape(y, (ROWS, W // (2 * S), 2, S)), (0, 1, 3, 2))
    a, c = gl.split(t)
    t = gl.permute(gl.join(a + c, a - c), (0, 1, 3, 2))
    return gl.reshape(t, (ROWS, W))


@gluon.jit
def _piece(x_ptr, rows, rmask, stride_xm, hscale, OFF: gl.constexpr, W: gl.constexpr, ROWS: gl.constexpr,
           LOGVT: gl.constexpr, layout: gl.constexpr):
    """(ROWS, W) columns [OFF, OFF + W) of the rows times H_128 blockwise and hscale, rounded to x's dtype. A thread
    owns 2^LOGVT contiguous columns: index bits below LOGVT are registers, bits LOGVT..6 lane bits 0..6-LOGVT."""
    cols = OFF + gl.arange(0, W, layout=gl.SliceLayout(0, layout))
    ptrs = x_ptr + gl.expand_dims(rows * stride_xm, 1) + gl.expand_dims(cols, 0)
    y = gl.load(ptrs, mask=gl.expand_dims(rmask, 1), other=0.0).to(gl.float32)
    for b in gl.static_range(LOGVT):
        y = _bfly_regs(y, ROWS, W, 1 << b)
    # (ROWS, chunks, VT): a thread's VT registers on the last axis, so that the sign of a lane stage is one value a
    # thread, broadcast (computed per element it cost ~2 instructions an element)
    y3 = gl.reshape(y, (ROWS, W >> LOGVT, 1 << LOGVT))
    l3: gl.constexpr = y3.type.layout
    chunk = gl.expand_dims(gl.expand_dims(gl.arange(0, W >> LOGVT, layout=gl.SliceLayout(0, gl.SliceLayout(2, l3))),
                                          0), 2)
    for j in gl.static_range(LOGVT, 7):
        y3 = _bfly_lanes(y3, chunk, j - LOGVT)
    return (gl.reshape(y3, (ROWS, W)) * hscale).to(x_ptr.dtype.element_ty)


@gluon.jit
def _maxf(a, b):
    return gl.maximum(a, b)


@gluon.jit
def _minf(a, b):
    return gl.minimum(a, b)


@gluon.jit
def _addf(a, b):
    return a + b


@gluon.jit
def _scale_of(a, b, levels, SYM: gl.constexpr):
    """As triton_rowquant.scale_of: (s, lo, safe, 1/safe), s = RN(range / levels). (Its @triton.jit body cannot be
    re-jitted as Gluon, the way Gluon imports triton.language's reductions: tl.zeros_like has no layout to give.)"""
    if SYM:
        s = gl.div_rn(b, gl.zeros_like(b) + levels)
        lo = -b
    else:
        s = gl.div_rn(b - a, gl.zeros_like(b) + levels)
        lo = a
    safe = gl.where(s > 0, s, 1.0)
    return s, lo, safe, gl.div_rn(gl.zeros_like(safe) + 1.0, safe)


@gluon.jit
def _round_quotient(y, safe, rcp):
    """As triton_rowquant.round_quotient: rint(y / safe) correctly rounded (Markstein)."""
    q0 = y * rcp
    return libdevice.rint(gl.fma(gl.fma(-q0, safe, y), rcp, q0))


@gluon.jit
def _store(y, out_ptr, rows, smask, stride_om, s, safe, rcp, lo, z, levels, OFF: gl.constexpr, W: gl.constexpr,
           SYM: gl.constexpr, HAS_SHIFT: gl.constexpr, CLAMP: gl.constexpr, layout: gl.constexpr):
    row_l: gl.constexpr = gl.SliceLayout(1, layout)
    cols = OFF + gl.arange(0, W, layout=gl.SliceLayout(0, layout))
    y = y.to(gl.float32)
    if not SYM:
        y = y - gl.expand_dims(gl.convert_layout(lo, row_l), 1)
    q = _round_quotient(y, gl.expand_dims(gl.convert_layout(safe, row_l), 1),
                       gl.expand_dims(gl.convert_layout(rcp, row_l), 1))
    if CLAMP:  # sigma ranges leave values outside [lo, hi] (triton_act_quant._store)
        q = gl.minimum(gl.maximum(q, -levels if SYM else 0.0), levels)
    if HAS_SHIFT:  # centred codes: q - (the row's code of 0), as triton_act_quant
        q = q - gl.expand_dims(gl.convert_layout(z, row_l), 1)
    ptrs = out_ptr + gl.expand_dims(gl.convert_layout(rows, row_l) * stride_om, 1) + gl.expand_dims(cols, 0)
    gl.store(ptrs, q.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(gl.convert_layout(smask, row_l), 1))


@gluon.jit(do_not_specialize=["M", "M_STORE"])
def act_quant_gluon_kernel(x_ptr, out_ptr, scale_ptr, lo_ptr, M, M_STORE, stride_xm, stride_om, hscale, levels,
                           clip_c, W0: gl.constexpr, W1: gl.constexpr, VT0: gl.constexpr, VT1: gl.constexpr,
                           LOGVT0: gl.constexpr, LOGVT1: gl.constexpr, LANES: gl.constexpr, WROWS: gl.constexpr,
                           WPR: gl.constexpr, SYM: gl.constexpr, HAS_SHIFT: gl.constexpr,
                           SIGMA: gl.constexpr = False):
    """W0 (and W1 > 0): the row's piece widths; a row on LANES lanes of each of WPR warps, VTi = Wi / (LANES WPR)
    columns a thread; 32 / LANES rows a warp, WROWS warps along the rows (num_warps = WROWS * WPR). SIGMA: the range
    is mu +- clip_c sigma of the rotated (bf16-rounded) row, kept inside its [min, max] (`quantizers.act_range`)."""
    ROWS: gl.constexpr = (32 // LANES) * WROWS
    hscale = hscale.to(gl.float32)
    levels = levels.to(gl.float32)
    clip_c = clip_c.to(gl.float32)
    l0: gl.constexpr = gl.BlockedLayout([1, VT0], [32 // LANES, LANES], [WROWS, WPR], [1, 0])
    l1: gl.constexpr = gl.BlockedLayout([1, VT1], [32 // LANES, LANES], [WROWS, WPR], [1, 0])
    rl0: gl.constexpr = gl.SliceLayout(1, l0)
    row0 = gl.program_id(0) * ROWS
    rows0 = (row0 + gl.arange(0, ROWS, layout=rl0)).to(gl.int64)
    y0 = _piece(x_ptr, rows0, rows0 < M, stride_xm, hscale, 0, W0, ROWS, LOGVT0, l0)
    # the row's range (gl.reduce with our combine: the imported gl.max did not verify in an offline sm_90 compile)
    f0 = y0.to(gl.float32)
    if SYM:
        b = gl.reduce(gl.abs(f0), 1, _maxf)
        a = -b
    else:
        a = gl.reduce(f0, 1, _minf)
        b = gl.reduce(f0, 1, _maxf)
    if W1 > 0:
        rl1: gl.constexpr = gl.SliceLayout(1, l1)
        rows1 = (row0 + gl.arange(0, ROWS, layout=rl1)).to(gl.int64)
        y1 = _piece(x_ptr, rows1, rows1 < M, stride_xm, hscale, W0, W1, ROWS, LOGVT1, l1)
        f1 = y1.to(gl.float32)
        if SYM:
            b = gl.maximum(b, gl.convert_layout(gl.reduce(gl.abs(f1), 1, _maxf), rl0))
            a = -b
        else:
            a = gl.minimum(a, gl.convert_layout(gl.reduce(f1, 1, _minf), rl0))
            b = gl.maximum(b, gl.convert_layout(gl.reduce(f1, 1, _maxf), rl0))
    if SIGMA:  # two passes over the registers: the row mean, then the squared deviations from it (the mean is a
        # per-row value in the reduction's own slice layout: broadcasting it back moves no data)
        kk = gl.zeros_like(b) + (W0 + W1)
        tot = gl.reduce(f0, 1, _addf)
        if W1 > 0:
            tot = tot + gl.convert_layout(gl.reduce(f1, 1, _addf), rl0)
        mu = gl.div_rn(tot, kk)
        d0 = f0 - gl.expand_dims(mu, 1)
        m2 = gl.reduce(d0 * d0, 1, _addf)
        if W1 > 0:
            d1 = f1 - gl.expand_dims(gl.convert_layout(mu, rl1), 1)
            m2 = m2 + gl.convert_layout(gl.reduce(d1 * d1, 1, _addf), rl0)
        sd = gl.sqrt_rn(gl.div_rn(m2, kk))
        if SYM:
            b = gl.minimum(gl.abs(mu) + clip_c * sd, b)
            a = -b
        else:
            a = gl.maximum(mu - clip_c * sd, a)
            b = gl.minimum(mu + clip_c * sd, b)
    s, lo, safe, rcp = _scale_of(a, b, levels, SYM)
    if HAS_SHIFT:  # the row's code of 0, clamped to the codes (triton_rowquant.zero_code, restated as
        # _round_quotient is: Gluon cannot call a @triton.jit helper)
        z = gl.minimum(gl.maximum(_round_quotient(-lo, safe, rcp), 0.0), levels)
    else:
        z = gl.zeros_like(lo)
    smask0 = rows0 < M_STORE
    gl.store(scale_ptr + rows0, s, mask=smask0)
    gl.store(lo_ptr + rows0, lo + z * s, mask=smask0)
    _store(y0, out_ptr, rows0, smask0, stride_om, s, safe, rcp, lo, z, levels, 0, W0, SYM, HAS_SHIFT, SIGMA, l0)
    if W1 > 0:
        _store(y1, out_ptr, rows0, smask0, stride_om, s, safe, rcp, lo, z, levels, W0, W1, SYM, HAS_SHIFT, SIGMA,
               l1)


def gluon_plan(k: int, lanes: int = 32, warps: int = 4, max_vt: int = 32) -> tuple | None:
    """(W0, W1, LANES, WPR, WROWS) for K columns, or None where this kernel does not take K with `lanes` threads a
    row: K = W0 + W1, powers of two, multiples of 128 (W1 may be 0), each piece 4 to max_vt columns a thread and at
    least 128 / lanes (the Hadamard block within one row's lanes); rows spread over `warps` warps a program. Fewer
    lanes (32 / lanes rows a warp) or a larger max_vt: fewer shuffle stages, more registers."""
    if k % 128 or k <= 0 or lanes not in (8, 16, 32):
        return None
    n = k // 128
    bits = [i for i in reversed(range(n.bit_length())) if n >> i & 1]
    if len(bits) > 2:
        return None
    w0 = 128 << bits[0]
    w1 = 128 << bits[1] if len(bits) > 1 else 0
    for wpr in ((1, 2, 4, 8, 16) if lanes == 32 else (1,)):
        vts = [w // (lanes * wpr) for w in (w0, w1) if w]
        if all(4 <= v <= max_vt and v * lanes >= 128 for v in vts) and wpr <= warps:
            return w0, w1, lanes, wpr, max(1, warps // wpr)
    return None


def act_quant_gluon_launch(x, out, scale, lo, m, m_store, hscale, levels, shift, sym, plan, clip_c: float = 0.0):
    """(kernel, grid, runtime args, constexprs, options, no_specialize), the format of
    `triton_act_quant.act_quant_launch` (the runtime args start with x, out, scale, lo), for `gluon_plan`'s plan.
    clip_c > 0: `sigma` ranges mu +- clip_c sigma."""
    w0, w1, lanes, wpr, wrows = plan
    vt0 = w0 // (lanes * wpr)
    vt1 = w1 // (lanes * wpr) if w1 else vt0
    rows = (32 // lanes) * wrows
    return (act_quant_gluon_kernel, ((m_store + rows - 1) // rows,),
            (x, out, scale, lo, m, m_store, x.stride(0), out.stride(0), float(hscale), float(levels), float(clip_c)),
            dict(W0=w0, W1=w1, VT0=vt0, VT1=vt1, LOGVT0=vt0.bit_length() - 1, LOGVT1=vt1.bit_length() - 1,
                 LANES=lanes, WROWS=wrows, WPR=wpr, SYM=bool(sym), HAS_SHIFT=bool(shift) and not sym,
                 SIGMA=clip_c > 0),
            dict(num_warps=wrows * wpr), (4, 5))
