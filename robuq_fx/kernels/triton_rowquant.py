"""Per-row fake quantization on the GPU, one Triton kernel: `quantizers.fake_quant_act` (absmax ranges, symmetric or
asymmetric, any 1-8 bits) for tensors of up to 4 dimensions with any strides, the row being the last dimension.

Used where the rows are not a linear layer's input (the attention's q, k, v, one scale per token and head, head dims
such as 72 that the linear-layer quantizer's power-of-two tiling does not take) and by `robuq::fake_quant_act` on
CUDA. The math is the reference's, step for step, in fp32:

    r = max|x| (sym) or [lo, hi] = [min x, max x];   s = RN(r / levels)   (IEEE division, as quantizers._div)
    q = rint(x / s) (or rint((x - lo) / s)),   the quotient correctly rounded (Markstein: one reciprocal, two FMAs)
    out = RN(s q) (or RN(lo + RN(s q))) rounded to x's dtype

(compiled with `enable_fp_fusion=False`: a contracted lo + s q would round once where the reference rounds twice),
so the codes and the output are bit-identical to `quantizers.fake_quant_act` on the same values (tested on the GPU).
No clamp: |x| <= r gives |x / s| <= levels (1 + 2^-23), so rint <= levels; s == 0 only for a constant row (q = 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

import contextlib
import os

from . import triton_launch

_nullctx = contextlib.nullcontext

MAX_D = 16384  # longest row one program holds (BLOCK_D values spread over its warps)


# ---- the per-row quantization math, shared with the linear-layer quantizer (triton_act_quant.py) -----------------
@triton.jit
def _rint_interpretable(t):
    """Round half to even of fp32 |t| < 2^22 (codes are at most 255): adding and removing 1.5 * 2^23 leaves no
    fraction bits, and IEEE addition rounds to nearest even. Same result as libdevice.rint."""
    return (t + 12582912.0) - 12582912.0


# rint is one instruction on the GPU; Triton's CPU interpreter (TRITON_INTERPRET=1, where these kernels are debugged)
# has no libdevice, so there the same rounding comes from _rint_interpretable
_RINT = _rint_interpretable if os.environ.get("TRITON_INTERPRET") == "1" else libdevice.rint


@triton.jit
def scale_of(a, b, levels, SYM: tl.constexpr):
    """(s, lo, safe, 1/safe) of rows with range [a, b] (symmetric: [-b, b]): s = RN(range / levels) by IEEE
    division, as quantizers._div; safe = 1 where s == 0 (a constant row: its codes are 0)."""
    if SYM:
        s = tl.div_rn(b, tl.zeros_like(b) + levels)
        lo = -b
    else:
        s = tl.div_rn(b - a, tl.zeros_like(b) + levels)
        lo = a
    safe = tl.where(s > 0, s, 1.0)
    return s, lo, safe, tl.div_rn(tl.zeros_like(safe) + 1.0, safe)


@triton.jit
def zero_code(lo, safe, rcp, levels, CENTRE: tl.constexpr):
    """Per row, the code of 0 of an asymmetric range starting at lo (rint(-lo / s), clamped to [0, levels]): what
    centred codes q - z subtract (triton_act_quant's module docstring); zeros when not CENTRE."""
    if CENTRE:
        return tl.minimum(tl.maximum(round_quotient(-lo, safe, rcp), 0.0), levels)
    return tl.zeros_like(lo)


@triton.jit
def round_quotient(y, safe, rcp):
    """rint(y / safe), the quotient correctly rounded (Markstein): q0 = RN(y r), e = fma(-q0, s, y) exact,
    q = RN(q0 + e r) with r = RN(1 / s); safe and rcp broadcast against y."""
    q0 = y * rcp
    return _RINT(tl.fma(tl.fma(-q0, safe, y), rcp, q0))


@triton.jit
def _row_range(x, mask, SYM: tl.constexpr):
    """(a, b) per row of a [R, D] fp32 block, masked entries ignored: (-max|x|, max|x|) or (min x, max x) (rows with
    no valid entry: -inf / +inf, which `_range_done` turns into an empty range)."""
    if SYM:
        b = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
        return -b, b
    return tl.min(tl.where(mask, x, float("inf")), axis=1), tl.max(tl.where(mask, x, float("-inf")), axis=1)


@triton.jit
def _range_done(a, b, SYM: tl.constexpr):
    if SYM:
        return a, b
    return tl.where(a <= b, a, 0.0), tl.where(a <= b, b, 0.0)  # rows with no valid entry (padding)


@triton.jit
def _codes(x, lo, safe, rcp, SYM: tl.constexpr):
    y = x if SYM else x - lo[:, None]
    return round_quotient(y, safe[:, None], rcp[:, None])


@triton.jit
def quantize_rows(x, mask, levels, SYM: tl.constexpr):
    """Codes (fp32 holding integers), s and lo of the rows of a [R, D] fp32 block; masked entries are ignored."""
    q, _, s, lo = quantize_row_pieces(x, mask, x, mask, levels, SYM, False)
    return q, s, lo


@triton.jit
def quantize_row_pieces(x, mask, x2, mask2, levels, SYM: tl.constexpr, TWO: tl.constexpr):
    """`quantize_rows` of rows held as two blocks [x | x2] (x2 only where TWO; else it is returned as is), one range
    over both: (codes of x, codes of x2, s, lo). Rows of a width that is no power of two, unpadded (72 = 64 + 8 here,
    64 + 32 in `triton_attention8`)."""
    a, b = _row_range(x, mask, SYM)
    if TWO:
        a2, b2 = _row_range(x2, mask2, SYM)
        a, b = tl.minimum(a, a2), tl.maximum(b, b2)
    a, b = _range_done(a, b, SYM)
    s, lo, safe, rcp = scale_of(a, b, levels, SYM)
    q2 = _codes(x2, lo, safe, rcp, SYM) if TWO else x2
    return _codes(x, lo, safe, rcp, SYM), q2, s, lo


@triton.jit
def _dequant(q, s, lo, SYM: tl.constexpr):
    sq = s[:, None] * q
    if SYM:
        return sq
    return lo[:, None] + sq


@triton.jit
def fake_quant_rows_kernel(x_ptr, out_ptr, n_rows, n1, n2, sx0, sx1, sx2, sxd, levels, codes_ptr, scale_ptr,
                           D: tl.constexpr, SYM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                           CODES: tl.constexpr = False, ALIGN: tl.constexpr = 1, TAIL: tl.constexpr = 0,
                           VALUES: tl.constexpr = True):
    """out = Q_a(x) per row; with CODES also the codes (codes_ptr, (rows, D) row-major) and the scales
    (scale_ptr, (rows,)), symmetric only (what the fp8 GEMM of the QAT forward reads). D is a constexpr so that the
    column mask is known constant over aligned groups, and ALIGN (the launcher's check that every row starts on a
    multiple of ALIGN elements, 16-byte aligned) tells Triton so: rows of 72 (DiT-XL/2's heads) then load and store
    as 16-byte vectors instead of one element a thread. TAIL > 0: the row is two pieces, columns [0, BLOCK_D) and
    [BLOCK_D, BLOCK_D + TAIL) = D, both powers of two (72 = 64 + 8), held without the padding a power-of-two block
    of 128 would give (44% of the lanes idle at 72). VALUES = False (with CODES): codes and scales only."""
    levels = tl.cast(levels, tl.float32)  # fp64 when Inductor launches it (see triton_act_quant)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    i0 = rows // (n1 * n2)
    i1 = (rows // n2) % n1
    i2 = rows % n2
    base = i0.to(tl.int64) * sx0 + i1.to(tl.int64) * sx1 + i2.to(tl.int64) * sx2
    obase = rows.to(tl.int64) * D
    if ALIGN > 1:
        base = tl.multiple_of(base, ALIGN)
        obase = tl.multiple_of(obase, ALIGN)
    mask = rmask[:, None] & (cols[None, :] < D)
    x = tl.load(x_ptr + base[:, None] + cols[None, :].to(tl.int64) * sxd, mask=mask, other=0.0).to(tl.float32)
    if TAIL == 0:
        q, s, lo = quantize_rows(x, mask, levels, SYM)
    else:
        cols2 = BLOCK_D + tl.arange(0, TAIL)
        mask2 = rmask[:, None] & (cols2[None, :] < D)
        x2 = tl.load(x_ptr + base[:, None] + cols2[None, :].to(tl.int64) * sxd, mask=mask2,
                     other=0.0).to(tl.float32)
        q, q2, s, lo = quantize_row_pieces(x, mask, x2, mask2, levels, SYM, True)
        if VALUES:
            tl.store(out_ptr + obase[:, None] + cols2[None, :],
                     _dequant(q2, s, lo, SYM).to(out_ptr.dtype.element_ty), mask=mask2)
        if CODES:
            tl.store(codes_ptr + obase[:, None] + cols2[None, :], q2.to(codes_ptr.dtype.element_ty), mask=mask2)
    if VALUES:
        tl.store(out_ptr + obase[:, None] + cols[None, :], _dequant(q, s, lo, SYM).to(out_ptr.dtype.element_ty),
                 mask=mask)
    if CODES:
        tl.store(codes_ptr + obase[:, None] + cols[None, :], q.to(codes_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + rows, s, mask=rmask)


def supported(x: torch.Tensor, a_bits: int) -> str | None:
    if not x.is_cuda:
        return "not a CUDA tensor"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {x.dtype}"
    if not 1 <= a_bits <= 8:
        return f"a_bits={a_bits}"
    if x.dim() == 0 or x.dim() > 4 or x.shape[-1] > MAX_D:
        return f"shape {tuple(x.shape)} (up to 4 dims, rows of at most {MAX_D})"
    return None


def _pieces(d: int) -> tuple[int, int]:
    """(BLOCK_D, TAIL): a row of d as one power-of-two block (padded), or as two unpadded powers of two where d is
    their sum with the tail at least 8 values (72 = 64 + 8, 80 = 64 + 16, 96 = 64 + 32)."""
    if d >= 16 and d & (d - 1):
        head = 1 << (d.bit_length() - 1)
        tail = d - head
        if tail >= 8 and not tail & (tail - 1):
            return head, tail
    return max(16, triton.next_power_of_2(d)), 0


def _tiling(d: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_D, TAIL, num_warps) of the kernel for rows of d (`_pieces` for BLOCK_D and TAIL)."""
    block_d = max(16, triton.next_power_of_2(d))  # the padded width, which the rows / warps choice is measured on
    head, tail = _pieces(d)
    env = os.environ.get("ROBUQ_ROWQ_TILING")  # "rows,warps": for tuning sweeps (benchmarks/bench_attention.py)
    if env:
        r, w = (int(v) for v in env.split(","))
        return r, head, tail, w
    # measured on the H200 (benchmarks/sweep_rowquant.py): ~1024 values a warp, one warp a program up to rows of
    # 2048; 72-wide rows: 8 rows x 1 warp 39.7 us vs 91.8 us at 16 x 4 (q of DiT-XL/2 at batch 64);
    # 1152-wide rows: 1 row x 1 warp 24.8 us (3.0 TB/s)
    block_r = max(1, 1024 // block_d)
    warps = max(1, min(8, block_d // 2048))
    if tail and warps == 1:  # rows held unpadded (`_pieces`): as many values a warp as 8 padded rows of 128 took
        block_r = 1  # (72: 16 rows, 1152 values; offline sm_90: 58.5 instructions a row against 111 padded, the
        while 2 * block_r * d <= 1280:  # same 63 registers; not yet timed)
            block_r *= 2
    return block_r, head, tail, warps


def _align(x: torch.Tensor, out: torch.Tensor, d: int, strides: tuple, sxd: int) -> int:
    """8 where every row of x and of out starts a multiple of 8 elements (16 bytes) after a 16-byte aligned first
    element (16-bit x, contiguous rows, D and the row strides multiples of 8), else 1 (no vector hint)."""
    if x.element_size() != 2 or sxd != 1 or d % 8 or any(st % 8 for st in strides):
        return 1
    return 8 if _aligned16(x) and _aligned16(out) else 1


def _aligned16(t: torch.Tensor) -> bool:
    """t's first element is 16-byte aligned. While Inductor traces the launch (fake tensors, no address) by its
    storage offset, a concrete int, over the allocators' aligned storage."""
    if type(t) is torch.Tensor:
        return t.data_ptr() % 16 == 0
    off = t.storage_offset()  # a FakeTensor / FunctionalTensor: no address to read
    return type(off) is int and off * t.element_size() % 16 == 0


def fake_quant_rows(x: torch.Tensor, a_bits: int, sym: bool, keep_layout: bool = False,
                    traced: bool = False) -> torch.Tensor:
    """Q_a(x) per row of the last dimension (absmax range), in x's dtype; contiguous, or with keep_layout with its
    rows dense in x's own memory order (x's layout where x is dense), reading and writing every row in that order.
    `traced`: record the launch for torch.compile (inside the `robuq::rowquant` triton_op; symmetric only, see
    `triton_launch.traced`)."""
    from .. import quantizers as Q
    if traced and not sym:
        raise ValueError("the traced row kernel is symmetric only (its asymmetric form needs enable_fp_fusion=False)")
    launcher = triton_launch.traced if traced else triton_launch.launch
    if keep_layout and 2 <= x.dim() <= 4 and x.stride(-1) == 1 and not x.is_contiguous():
        # rows read in memory order and written dense in that order, x's shape over them: a dense permuted x (q as
        # (b, h, s, d) on (b, s, h, d) memory) keeps its layout; rows that are not dense (q, k, v as narrow views
        # of a fused qkv GEMM's output) come out as (b, h, s, d) on (b, s, h, d) memory, the layout SDPA's flash
        # kernels take and write, not a transposing copy before and after them
        order = sorted(range(x.dim() - 1), key=lambda i: -x.stride(i))  # stable: ties keep their order
        xp = x.permute(*order, x.dim() - 1)
        out = torch.empty(xp.shape, device=x.device, dtype=x.dtype)
        _launch(xp, out, a_bits, sym, Q, launcher)
        inv = sorted(range(len(order)), key=lambda i: order[i])
        return out.permute(*inv, x.dim() - 1)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _launch(x, out, a_bits, sym, Q, launcher)
    return out


def fake_quant_rows_codes(x: torch.Tensor, a_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_a(x) in x's dtype and shape, its codes (rows, D) in fp8 e4m3 (exact: |q| <= 2^(a_bits-1) - 1 <= 7 for
    a_bits <= 4), the per-row scales (rows,) fp32) of a contiguous x, symmetric absmax, one kernel: the values of
    `fake_quant_rows` plus what an fp8 GEMM needs to compute with them exactly."""
    from .. import quantizers as Q
    if not x.is_contiguous() or a_bits > 4:
        raise ValueError("fake_quant_rows_codes takes a contiguous x and a_bits <= 4")
    d = x.shape[-1]
    rows = x.numel() // max(d, 1)
    out = torch.empty_like(x)
    codes = torch.empty(rows, d, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, device=x.device, dtype=torch.float32)
    _launch(x, out, a_bits, True, Q, triton_launch.launch, codes=(codes, scale))
    return out, codes, scale


def quantize_rows_int8(x: torch.Tensor, a_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8, x's shape, contiguous in x's logical order; per-row scales fp32, x's shape without the last
    dim) of symmetric absmax rows, one kernel that writes no fake-quant values (the 8-bit attention's k:
    `triton_attention8.attention8_prequant`)."""
    from .. import quantizers as Q
    if a_bits > 8:
        raise ValueError("int8 codes hold at most 8 bits")
    d = x.shape[-1]
    rows = x.numel() // max(d, 1)
    codes = torch.empty(x.shape, device=x.device, dtype=torch.int8)
    scale = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    if rows:
        _launch(x, codes.view(rows, d), a_bits, True, Q, triton_launch.launch, codes=(codes, scale), values=False)
    return codes, scale


def _launch(x, out, a_bits, sym, Q, launcher, codes=None, values=True):
    d = x.shape[-1]
    if x.is_contiguous():  # x and out (contiguous, x's shape): one (rows, D) matrix in memory order
        shape, strides, sxd = (1, 1, x.numel() // max(d, 1), d), (0, 0, d), 1
    else:
        pad = 4 - x.dim()
        shape = (1,) * pad + tuple(x.shape)  # three leading dims
        strides = (0,) * pad + tuple(x.stride()[:-1])
        sxd = x.stride(-1)
    n_rows = out.numel() // max(d, 1)
    if n_rows == 0 or d == 0:
        return
    block_r, block_d, tail, warps = _tiling(d)
    grid = ((n_rows + block_r - 1) // block_r,)
    c_out, s_out = codes if codes is not None else (x, x)  # neither read nor written without CODES
    args = (x, out, n_rows, shape[1], shape[2], strides[0], strides[1], strides[2], sxd,
            float(Q.act_levels(a_bits, sym)), c_out, s_out)
    kw = (dict(D=d, SYM=bool(sym), BLOCK_R=block_r, BLOCK_D=block_d, CODES=codes is not None,
               ALIGN=_align(x, out, d, strides, sxd), TAIL=tail, VALUES=values),
          dict(num_warps=warps, enable_fp_fusion=False))
    traced = launcher is triton_launch.traced  # a traced launch has no device to switch to
    with (torch.cuda.device(x.device) if x.is_cuda and not traced else _nullctx()):
        launcher(fake_quant_rows_kernel, grid, args, *kw)
