"""The low-rank branch stacked into the fp8 GEMM (`ROBUQ_FP8_EPI=stacked`, or where the dispatch table's `stacked`
says so: `dispatch.stacked_mode`; timings and what limits them: docs/gpu.md).

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

The weight side, [v1, v2, v1, c slot, q_w] (N, W + K) fp8 with W = 3r + 1 rounded up to 16, holds the only copy of
the codes, in its last K columns (the activation side matches: [u1, u1, u2, 0.., q_x]). On the fp8 layout the
module's `qweight` buffer is re-pointed (`Tensor.set_`) to those columns: same values, row stride W + K, storage
offset W. Codes last, so that qweight's own extent ends where the matrix ends: a fake tensor made from it (Dynamo,
AOTAutograd) gets a storage of the matrix's full size and `is_extended` holds for it (a storage is faked at the size
its tensor spans; with the codes first that would miss the last row's W bytes). The compiled graph itself holds no
view beyond qweight: `lrb_split` reads c through qweight's pointer and `robuq::stacked_mm` makes `full_weight`.
`PackedLinear.set_layout("fp8")` / `use_device_layout` extend the weight up front (`prepare`), so compiled graphs see
the final strides; `_save_to_state_dict` packs the codes as always; a device move makes qweight contiguous again and
use_device_layout re-extends it; the kernels that assume K-byte weight rows -- the TMA GEMM, the small-M and
quantize-in-GEMM kernels -- check for it and step aside. The packed layout (opt-in on fp8 GPUs) keeps the cache's
codes and this matrix apart. The W extra columns are rewritten in place when the branch factors or the scales change
(keyed on their versions).
"""
from __future__ import annotations

import math
import os

import torch

from .. import quantizers as Q
from .dispatch import stacked_any, stacked_fused, stacked_mode
from .registry import QLinearArgs, tensor_key

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


def stacked_reason(a: QLinearArgs) -> str | None:
    """Why a layer cannot take the stacked mode (None: it can)."""
    if a.lrb_down is None:
        return "no low-rank branch"
    if terms_form(a.lrb_down.shape[0]):  # (sibling-fused q/k/v: 3 x 32) 3r + 16 extra columns cost +26% of K = 1152
        return "rank above 64 in the warp-specialized kernel's terms form (ROBUQ_STACKED_WIDE=0)"
    if a.lrb_down.shape[0] > MAX_FLAT_RANK:
        return f"rank above {MAX_FLAT_RANK} (lrb_split's tile)"
    if a.a_sym and a.a_clip != "absmax":
        return "symmetric sigma-clipped activations do not bound |x H| by s_x qmax"
    if not a.a_sym:
        r = a.lrb_down.shape[0]
        if not asym_enabled():
            return "asymmetric activations with ROBUQ_STACKED_ASYM=0"
        if not offset_fits(r):
            return f"rank {r} leaves no padding columns for the offset term's digits"
    return None


def takes_stacked(a: QLinearArgs, m) -> bool:
    """This call runs the stacked mode: the layer can (`stacked_reason`) and the dispatch picks it for this shape and
    M (`dispatch.stacked_mode`). The eager path and the Inductor decomposition both ask this."""
    return stacked_reason(a) is None and stacked_mode(m, a.out_features, a.in_features)


def is_extended(qweight: torch.Tensor, k: int, r: int) -> bool:
    """qweight (fp8, N x K) is the last K columns of the extended weight for rank r (`prepare` or an earlier call
    made it)."""
    w = ext_width(r)
    return (qweight.dtype == torch.float8_e4m3fn and qweight.dim() == 2 and qweight.stride() == (k + w, 1)
            and qweight.storage_offset() == w and qweight.untyped_storage().nbytes() >= qweight.shape[0] * (k + w))


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


class _Ext:
    __slots__ = ("key", "w", "c")

    def __init__(self, key, w, c):
        self.key, self.w, self.c = key, w, c


def cached_weight_ext(a: QLinearArgs, e, bh: torch.Tensor) -> _Ext:
    """The weight side of the stacked mode on the layer's cache entry `e` (weight_cache._Entry), keyed on the
    branch factors' and scales' versions; .w None where the layer cannot take it. One copy of the codes: see the
    module docstring."""
    key = (tensor_key(a.lrb_up), tensor_key(a.lrb_down), tensor_key(a.w_scale), a.a_bits, a.a_sym, a.a_clip)
    x = e.stk
    if x is not None and x.key == key:
        return x
    c = scale_c(bh, a.in_features, a.a_bits, a.a_sym, a.a_clip)
    colsum = None if a.a_sym else e.fp8.float().sum(1)  # S_n: the codes' integer column sums (exact in fp32)
    cols = ext_columns(e.sw, a.lrb_up, c, colsum)
    if cols is None:
        e.stk = _Ext(key, None, c)
        return e.stk
    full = _extended_storage(a, e, cols.shape[1])
    full[:, :cols.shape[1]] = cols  # through .data views: no version bump of the module's buffer
    e.stk = _Ext(key, full, c)
    return e.stk


def _extended_storage(a: QLinearArgs, e, w: int) -> torch.Tensor:
    """(N, W + K) fp8 whose last K columns are the layer's codes: on the fp8 layout made once, with qweight
    re-pointed into it (its values and shape unchanged; later calls get a `.data` view, which shares no version
    counter with the buffer); on the packed layout a copy next to the cache's codes."""
    n, k = a.out_features, a.in_features
    qw = a.qweight
    if is_extended(qw, k, a.lrb_down.shape[0]):
        return full_weight(qw.data, w)  # already extended (an earlier call)
    full = torch.empty(n, k + w, device=e.fp8.device, dtype=torch.float8_e4m3fn)
    full[:, w:] = e.fp8
    if qw.dtype == torch.float8_e4m3fn:
        with torch.no_grad():
            qw.set_(full.untyped_storage(), w, (n, k), (k + w, 1))  # the old storage goes with the cache entry
        e.fp8 = qw.detach()
    return full


def _ws_may_run(a: QLinearArgs) -> bool:
    """The warp-specialized quantize-in-GEMM kernel, which reads the extended weight, may take this layer's calls
    (`dispatch.fused_ws_any` and `gluon_qgemm_ws.supported`)."""
    from .dispatch import fused_ws_any
    if not fused_ws_any(a.out_features, a.in_features, a.lrb_down.shape[0]):
        return False
    try:
        from .gluon_qgemm_ws import supported
    except ImportError:  # no Gluon in this triton
        return False
    return supported(a.lrb_down, a.in_features, a.hadamard_block, a.a_bits, a.a_sym, a.a_clip,
                     a.lrb_down.shape[0]) is None


def prepare(mod) -> bool:
    """Extend an fp8-layout PackedLinear's weight now, where the stacked mode (`dispatch.stacked_any`) or the
    warp-specialized quantize-in-GEMM kernel (`_ws_may_run`) may run for its shape, so that torch.compile sees
    qweight with its final strides: a graph compiled before the first eager call re-pointed it would fail Inductor's
    stride check of its inputs after it (neither can extend the weight inside a compiled graph).
    `PackedLinear.set_layout("fp8")` calls it; True where it extended."""
    if getattr(mod, "layout", None) != "fp8" or mod.lrb_down is None or not mod.qweight.is_cuda:
        return False
    a = QLinearArgs(mod.qweight, mod.w_scale, mod.bias, mod.lrb_down, mod.lrb_up, *mod.op_args(),
                    lrb_down_h=mod.lrb_down_h)
    if not ((stacked_reason(a) is None and stacked_any(a.out_features, a.in_features)) or _ws_may_run(a)):
        return False
    from .weight_cache import _fp8_weights, _rot_down, down_dtype
    return cached_weight_ext(a, _fp8_weights(a), _rot_down(a, down_dtype(a.lrb_down))).w is not None


def stacked_or_none(x2: torch.Tensor, a: QLinearArgs, e, bh: torch.Tensor, m_pad: int) -> torch.Tensor | None:
    """`stacked_qlinear` for a call `takes_stacked` admitted, or None (with one warning naming the layer's shape and
    why) where it cannot run: the caller then takes the Triton epilogue GEMM."""
    from .registry import warn_once
    from .triton_lowrank import lrb_down_ok
    why = None if lrb_down_ok(x2, bh) else "the down-projection kernel does not take x"
    ext = cached_weight_ext(a, e, bh) if why is None else None
    if why is None and ext.w is None:
        why = "A c / s_w or c leaves fp8's range" + ("" if a.a_sym else ", or the column sums need more digits")
    if why is not None:
        warn_once(f"robuq_fx: stacked LRB mode: a {a.out_features}x{a.in_features} layer keeps the Triton epilogue "
                  f"GEMM ({why})")
        return None
    return stacked_qlinear(x2, a, e, bh, ext, m_pad)


def stacked_qlinear(x2: torch.Tensor, a: QLinearArgs, e, bh: torch.Tensor, ext: _Ext, m_pad: int) -> torch.Tensor:
    """y (M, N) in bf16 for a layer with a branch: `lrb_split` writes the first W code columns, the quantizer the
    last K, one `_scaled_mm` over both (asymmetric layers: the offset term among the W, module docstring)."""
    from .triton_fp8 import _scaled_mm, on_device
    m, k = x2.shape
    with on_device(x2.device):
        wide, sx = stacked_codes(x2, bh, ext.w[:, ext.w.shape[1] - k:], a.hadamard_block, a.a_bits, a.a_clip,
                                 m_pad, a.input_act, a.a_sym)
    bias = None if a.bias is None else a.bias.to(torch.bfloat16)
    y = _scaled_mm(wide, ext.w, sx, e.sw, bias)
    y = y[:m] if m != m_pad else y
    return y if y.dtype == x2.dtype else y.to(x2.dtype)


def c_slot(full: torch.Tensor, r: int) -> torch.Tensor:
    """The extended weight's element that holds c (row 0, `c_column`), as a 1-element view (the warp-specialized
    kernel's pointer to it; `lrb_split_kernel`, ranks <= 64, reads it W - 3r bytes before the code columns)."""
    return full[0, c_column(r):c_column(r) + 1]


def full_weight(w_codes: torch.Tensor, w: int) -> torch.Tensor:
    """The extended weight (N, W + K) from its code columns (qweight once extended): a view over their storage."""
    n, k = w_codes.shape
    return w_codes.as_strided((n, w + k), (w + k, 1), w_codes.storage_offset() - w)


def stacked_codes(x2, bh, w_codes, block: int, a_bits: int, clip: str, m_pad: int,
                  act: str = "", sym: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (m_pad, W + K) fp8, row scales (m_pad,)): `lrb_split`'s columns in [0, W), the quantizer's codes in the
    last K; both kernels write into the one buffer (compiled: inside the opaque `robuq::stacked_codes`). w_codes:
    the extended weight's code columns, where `lrb_split` finds c. Asymmetric (sym False): centred codes, and
    `lrb_split` adds the offset term and rescues rows in place (the row scales it returns are then g, not s_x)."""
    from . import triton_launch
    from .quantizer import act_quant
    from .triton_lowrank import lrb_split
    k, w = x2.shape[1], ext_width(bh.shape[0])
    wide = torch.empty(m_pad, w + k, device=x2.device, dtype=torch.float8_e4m3fn)
    if not sym:
        _, sx, lo = act_quant(x2, block, a_bits, False, m_store=m_pad, shift=True, clip=clip, act=act,
                              out=wide[:, w:])
        lrb_split(x2, bh, sx, wide, w_codes, m_pad, triton_launch.launch, act=act, lo=lo)
        return wide, sx
    if clip == "absmax" and stacked_fused(x2.shape[0], w_codes.shape[0], k):  # one kernel
        from ..hadamard import hadamard_matrix
        from .triton_mma_quant import stacked_quant, stacked_quant_ok
        if stacked_quant_ok(x2, bh, block):
            sx = torch.empty(m_pad, device=x2.device, dtype=torch.float32)
            stacked_quant(x2, hadamard_matrix(block, x2.dtype, x2.device), bh, sx, wide, w_codes, m_pad,
                          Q.act_levels(a_bits, True), act=act)
            return wide, sx
    _, sx, _ = act_quant(x2, block, a_bits, True, m_store=m_pad, clip=clip, act=act, out=wide[:, w:])
    lrb_split(x2, bh, sx, wide, w_codes, m_pad, triton_launch.launch, act=act)
    return wide, sx
