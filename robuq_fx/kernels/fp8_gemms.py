"""Which of our fp8 GEMMs runs a `triton_fp8` call, with which config, and what it takes into its K loop or store
(the LRB down-projection, DOWN; an output activation, OUT_ACT): the one set of rules the eager path (triton_fp8.py)
and the Inductor decomposition (inductor.py) both ask. The kernels: triton_fp8_kernels.py, gluon_fp8_gemm.py."""
from __future__ import annotations

import functools

import torch

from .dispatch import epilogue_mode, gemm_config, gemm_kernel, gluon_gemm_config, tma_gemm_config
from .lrb_stacked import takes_stacked
from .registry import QLinearArgs


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


_kmod = None


def _k():
    """The Triton kernels module, imported on first use."""
    global _kmod
    if _kmod is None:
        from . import triton_fp8_kernels
        _kmod = triton_fp8_kernels
    return _kmod


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def run_fp8_gemm(codes, w8, y, sx, sw, bias, lo, cs, t, up, m: int, launcher=None, down=None,
                 out_act: str = "", block_scale: bool = False) -> None:
    """y (m, N) = our Triton fp8 GEMM with the fused epilogue: the persistent TMA kernel or the pointer one
    (`dispatch.gemm_kernel`), each with its measured config. launcher: None (eager) or `triton_launch.traced`.
    down: (x, B H) for the branch's down-projection inside the pointer kernel (t None; `down_in_gemm_ok`).
    out_act: an output activation in the store (robuq::qlinear's output_act; the pointer kernel with the nearest
    config that holds it unspilled, `two_tiles_config`). block_scale: sx holds per-block scales (`LayerSpec.a_group`:
    `triton_block_quant.block_quant`'s), the pointer kernel's BLOCK_SCALE form."""
    n, k = w8.shape
    dev = codes.device
    kw = {} if launcher is None else {"launcher": launcher}
    if down is not None or out_act or block_scale:  # (the pointer kernel: only it has DOWN, OUT_ACT, BLOCK_SCALE)
        _k().launch_fp8_gemm(codes, w8, y, sx, sw, bias, lo, cs, None if down is not None else t, up, m,
                             pointer_config(m, n, k, out_act, block_scale), down=down, out_act=out_act,
                             block_scale=block_scale, **kw)
        return
    which = gemm_kernel(_capability(dev.index if dev.index is not None else torch.cuda.current_device()))
    if which == "gluon" and launcher is None and _gluon_gemm_ok(codes, w8, t):  # eager: Inductor launches Triton
        from .gluon_fp8_gemm import launch_fp8_gemm_gluon
        launch_fp8_gemm_gluon(codes, w8, y, sx, sw, bias, lo, cs, t, up, m, gluon_gemm_config(m, n, k))
    elif which == "tma" and w8.is_contiguous():  # its descriptors take K-byte rows (not a stacked layer's K + W)
        _k().launch_fp8_gemm_tma(codes, w8, y, sx, sw, bias, lo, cs, t, up, m, tma_gemm_config(m, n, k),
                                 _sms(dev.index or 0), **kw)
    else:
        _k().launch_fp8_gemm(codes, w8, y, sx, sw, bias, lo, cs, t, up, m, gemm_config(m, n, k), **kw)


def pointer_config(m: int, n: int, k: int, out_act: str = "", block_scale: bool = False) -> tuple:
    """The pointer GEMM's config for this call: the table's, or with an output activation or block scales the
    nearest one that holds the second tile unspilled (`two_tiles_config`; offline sm_90 with and without the LRB /
    asymmetric / DOWN terms)."""
    cfg = gemm_config(m, n, k)
    return _k().two_tiles_config(cfg) if out_act or block_scale else cfg


def out_act_in_gemm(a: QLinearArgs, m: int) -> bool:
    """Whether this call's GEMM applies its output_act in the store: a call on the Triton GEMM (plain, or the
    asymmetric / LRB epilogue outside the addmm and stacked modes) with K % 128 == 0; the other paths apply it after
    the layer. The one rule for the eager path and the Inductor decomposition."""
    n, k = a.out_features, a.in_features
    if a.a_group:  # per-block ranges: with an output activation always the block-scaled pointer GEMM
        return bool(a.output_act and m and k % 128 == 0)  # (block_scaled.qlinear)
    plain = a.a_sym and a.lrb_down is None
    return bool(a.output_act and m and k % 128 == 0 and (plain or epilogue_mode(m, n, k) != "addmm")
                and not takes_stacked(a, m))


def down_in_gemm_ok(x2: torch.Tensor, bh: torch.Tensor | None, a: QLinearArgs, m: int) -> bool:
    """The epilogue GEMM makes this LRB call's t itself (an LRB layer on the Triton epilogue GEMM, not the addmm mode;
    `dispatch.down_in_gemm` picks it; no input activation, which only `lrb_down` applies; 16-bit x with contiguous
    rows; a rank the epilogue takes; B H in x's dtype). The one rule for the eager path and the traced one."""
    from .dispatch import down_in_gemm
    n, k = a.out_features, a.in_features
    if not (a.lrb_down is not None and epilogue_mode(m, n, k) != "addmm" and not a.input_act
            and x2.dtype in (torch.bfloat16, torch.float16)
            and x2.stride(-1) == 1 and bh.dtype == x2.dtype and bh.is_contiguous() and bh.shape[0] <= 128
            and down_in_gemm(m, n, k)):
        return False
    # (DOWN runs the pointer kernel whichever the table picks)
    return _k().down_config(pointer_config(m, n, k, a.output_act), bh.shape[0]) is not None


def _gluon_gemm_ok(codes: torch.Tensor, w8: torch.Tensor, t: torch.Tensor | None) -> bool:
    """TMA descriptors need 16-byte aligned bases and row strides (the codes and weights this path makes are); the
    branch's tile loads take a rank of at most 128."""
    return all(x.data_ptr() % 16 == 0 and x.stride(0) % 16 == 0 and x.stride(1) == 1 for x in (codes, w8)) \
        and (t is None or t.shape[1] <= 128)
