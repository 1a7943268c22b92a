"""The opt-in quantize-in-GEMM kernels on the fp8 path (issue 20): which calls they take and how they are launched.

ROBUQ_FP8_FUSED_QUANT=1: `gluon_qgemm.py` (v0: one partition quantizes a row block, then multiplies it; a branch of
rank <= 64 in its epilogue). ROBUQ_FP8_FUSED_QUANT=ws: `gluon_qgemm_ws.py` (warp-specialized: quantizer, loader and
MMA partitions; a branch of rank 32 or 65..96 stacked into the GEMM as extra k-steps). Both Hopper-only,
symmetric absmax A <= 4 with Hadamard block 128, K <= 1152; anything else takes `triton_fp8`'s two-kernel path.
Unset, the dispatch table may pick the warp-specialized one per shape and M bucket where its sweep measured it faster.
"""
from __future__ import annotations

import torch

from .. import quantizers as Q
from .dispatch import fused_quant_mode
from .quantizer import on_device
from .registry import QLinearArgs
from .registry import warn_once as _warn_once
from .weight_cache import _rot_down


def _hopper(x: torch.Tensor) -> bool:
    from .triton_fp8 import _capability  # (a test stands in for it where no GPU is)
    return _capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) >= (9, 0)


def kernel_mode(x2: torch.Tensor, a: QLinearArgs) -> str | None:
    """The quantize-in-GEMM kernel for this call ("1": gluon_qgemm, "ws": gluon_qgemm_ws), or None: the one
    ROBUQ_FP8_FUSED_QUANT forces or the dispatch table picks (`dispatch.fused_quant_mode`), where it takes the call
    (Hopper; symmetric absmax, Hadamard 128, no input activation, K <= 1152; v0: a branch of rank <= 64 or none, ws:
    rank 32, 65..96 or none). The weight's layout is `takes`' check; the Inductor decomposition asks only this."""
    if a.input_act or a.a_group:
        return None
    rank = 0 if a.lrb_down is None else a.lrb_down.shape[0]
    mode = fused_quant_mode(x2.shape[0], a.out_features, a.in_features, rank)
    if mode is None or not _hopper(x2):
        return None
    try:
        if mode == "ws":
            from .gluon_qgemm_ws import supported
        else:
            from .gluon_qgemm import supported
    except ImportError:  # no Gluon in this triton
        return None
    return mode if supported(x2, a.in_features, a.hadamard_block, a.a_bits, a.a_sym, a.a_clip, rank) is None else None


def takes(x2: torch.Tensor, a: QLinearArgs, e) -> str | None:
    """`kernel_mode`, where the layer's fp8 codes suit it too: contiguous 16-byte-aligned rows, except for the
    warp-specialized kernel with a branch, which reads the stacked mode's extended weight (strided code columns)."""
    mode = kernel_mode(x2, a)
    if mode is None:
        return None
    ok = (mode == "ws" and a.lrb_down is not None) or (e.fp8.is_contiguous() and e.fp8.data_ptr() % 16 == 0)
    return mode if ok else None


def run(x2: torch.Tensor, a: QLinearArgs, e, m: int, n: int, mode: str) -> torch.Tensor | None:
    """y (M, N) from the quantize-in-GEMM kernel `mode` (what `takes` returned), or None where the
    warp-specialized one cannot stack this layer's branch (then the two-kernel path, with one warning)."""
    from .quantizer import _hscale
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    hscale, levels = _hscale(a.hadamard_block, x2.dtype), float(Q.act_levels(a.a_bits, True))
    if mode == "ws":  # warp-specialized
        from .gluon_qgemm_ws import launch_qgemm_ws
        ext = down = None
        if a.lrb_down is not None:  # the branch stacked into the GEMM: the stacked mode's extended weight
            from .lrb_stacked import cached_weight_ext
            ext = cached_weight_ext(a, e, _rot_down(a, x2.dtype)).w
            if ext is None:
                _warn_once(f"robuq_fx: ROBUQ_FP8_FUSED_QUANT=ws: a {n}x{a.in_features} layer keeps the two-kernel "
                           "path (A c / s_w or c leaves fp8's range in the stacked form)")
                return None
            down = a.lrb_down if a.lrb_down.dtype == x2.dtype and a.lrb_down.is_contiguous() \
                else a.lrb_down.to(x2.dtype).contiguous()
        with on_device(x2.device):
            launch_qgemm_ws(x2, e.fp8, y, e.sw, a.bias, hscale, levels, ext=ext, down=down)
        return y
    from .gluon_qgemm import launch_qgemm_fused
    down = up = None
    if a.lrb_down is not None:  # the branch's factors in x's dtype (B unrotated: the kernel reads x H)
        down, up = (f if f.dtype == x2.dtype and f.is_contiguous() else f.to(x2.dtype).contiguous()
                    for f in (a.lrb_down, a.lrb_up))
    with on_device(x2.device):
        launch_qgemm_fused(x2, e.fp8, y, e.sw, a.bias, hscale, levels, down, up)
    return y
