"""The low-rank branch stacked into the fp8 GEMM (`ROBUQ_FP8_EPI=stacked`, or where the dispatch table's `stacked`
says so: `dispatch.stacked_mode`; timings and what limits them: docs/gpu.md).

y = s_x s_w (q_x q_w^T + u v^T) with u = t / (s_x c), v = A c / s_w (t = (x H) B^T): the branch as extra columns
of one `_scaled_mm`. Those columns, their scale c and range, the asymmetric offset term and the reference
computations are lrb_layout.py's; this module decides which layers and calls take the mode, keeps the extended
weight and runs it.

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

import torch

from .. import quantizers as Q
from .dispatch import stacked_any, stacked_fused, stacked_mode
from .lrb_layout import (MAX_FLAT_RANK, terms_form, ext_width, c_column, asym_enabled, offset_fits, scale_c,
                         ext_columns)
from .registry import QLinearArgs, tensor_key


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
