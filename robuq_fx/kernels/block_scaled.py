"""The fp8 path of a layer with per-block activation ranges (`LayerSpec.a_group` = the Hadamard block = 128; the
calls `triton_fp8` takes for it, and how it runs them). docs/gpu.md, "Per-group activation ranges".

    codes, s = block quantizer (kernels/triton_block_quant.py: one pass, no row-wide reduction)
    y = sum_kb s[kb, m] (codes_kb w8_kb^T) s_w[n] + bias [+ t A^T] [-> output activation]

Two GEMMs run it:
  - cuBLAS's 1 x 128 blockwise `_scaled_mm` (CUDA >= 12.9 on sm_90; torch's BLOCK_1x128_1x128 recipe, the weight's
    per-channel scale given as the same value in every K block): layers without a low-rank branch or output
    activation, bf16. Session 17 (H200, M = 16384): 206 / 174 / 310 us on fc1 / fc2 / adaLN against our Triton
    BLOCK_SCALE GEMM's 280 / 261 / 430 (benchmarks/results/block_scale_diag_NVIDIA_H200.txt).
  - `fp8_gemm_kernel`'s BLOCK_SCALE form (the pointer kernel): everything else, with the branch's t A^T and the
    output activation in its epilogue. ROBUQ_BLOCK_GEMM=triton picks it for every call.
Both are slower than per-token codes on rowwise `_scaled_mm` (136 / 121 / 200 us on the same shapes): on Hopper the
per-K-block rescale costs the GEMM ~1.5x, more than the block quantizer saves. The option exists for its accuracy
(bench_accuracy --only a_group), not for speed.
"""
from __future__ import annotations

import os

import torch

from .. import quantizers as Q
from .registry import QLinearArgs

BLOCK = 128
_CUBLAS_OK = [True]  # False once this torch / cuBLAS refused the blockwise recipe (then the Triton GEMM runs)


def takes(a: QLinearArgs) -> bool:
    """Per-block activation ranges the fp8 path runs: a_group = Hadamard block = 128, symmetric absmax codes,
    K % 128 == 0 (a branch's t from `down_proj`, added in the Triton GEMM's epilogue)."""
    return (a.a_group == a.hadamard_block == BLOCK and a.a_sym and a.a_clip == "absmax"
            and a.in_features % BLOCK == 0)


def cublas_ok(x2: torch.Tensor, a: QLinearArgs) -> bool:
    """Whether cuBLAS's blockwise `_scaled_mm` runs this call (module docstring): no branch, no output activation,
    bf16 on an sm_90 GPU, not switched off (ROBUQ_BLOCK_GEMM=triton) or refused before."""
    if not (_CUBLAS_OK[0] and x2.is_cuda and x2.dtype == torch.bfloat16 and a.lrb_down is None
            and not a.output_act and os.environ.get("ROBUQ_BLOCK_GEMM", "") != "triton"):
        return False
    from .fp8_gemms import _capability
    return _capability(x2.device.index if x2.device.index is not None else torch.cuda.current_device())[0] == 9


def block_weight_scales(e) -> torch.Tensor:
    """The weight's per-channel scales as cuBLAS's 1 x 128 block scales: (K / 128, N) fp32, s_w[n] in every row, kept
    on the weight's cache entry (kernels/weight_cache.py; K / 128 x 4 bytes a channel: 3% of the fp8 codes)."""
    if e.swb is None:
        k = e.fp8.shape[1]
        e.swb = e.sw[None, :].expand(k // BLOCK, -1).contiguous()
    return e.swb


def cublas_gemm(codes: torch.Tensor, bs: torch.Tensor, e, bias: torch.Tensor | None, m: int) -> torch.Tensor | None:
    """y (m, N) bf16 from the block codes (m_store, K) and scales (K / 128, m_store) through cuBLAS, or None where
    this torch refuses the recipe (remembered: the Triton GEMM runs from then on, with a one-time warning)."""
    if bias is not None and bias.dtype != torch.bfloat16:
        bias = bias.to(torch.bfloat16)
    try:
        y = torch._scaled_mm(codes, e.fp8.t(), scale_a=bs.t(), scale_b=block_weight_scales(e), bias=bias,
                             out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, ValueError) as err:
        from .registry import warn_once
        _CUBLAS_OK[0] = False
        warn_once(f"robuq: cuBLAS's 1 x 128 blockwise _scaled_mm is not available here ({type(err).__name__}: "
                  f"{str(err)[:160]}); a_group = 128 layers take the Triton block-scaled GEMM")
        return None
    return y if y.shape[0] == m else y[:m]


def qlinear(x2: torch.Tensor, a: QLinearArgs, e, m: int) -> torch.Tensor:
    """y (m, N) of a per-block-range layer (`takes(a)`): the one-pass block quantizer, then cuBLAS's blockwise GEMM
    (`cublas_ok`) or the block-scaled Triton GEMM (with the branch's t A^T and the output activation in its
    epilogue where the layer has them). e: the layer's fp8 weight cache entry."""
    from ..hadamard import hadamard_matrix
    from .fp8_gemms import run_fp8_gemm
    from .quantizer import on_device
    from .triton_block_quant import block_quant
    from .triton_fp8 import _rot_down, _up16, down_proj, m_store
    lrb = a.lrb_down is not None
    t = down_proj(x2, _rot_down(a, x2.dtype)) if lrb and m else None
    with on_device(x2.device):
        codes, bs = block_quant(x2, hadamard_matrix(BLOCK, x2.dtype, x2.device), m_store(m),
                                Q.act_levels(a.a_bits, True))
        if m and cublas_ok(x2, a):
            y = cublas_gemm(codes, bs, e, a.bias, m)
            if y is not None:
                return y
        y = torch.empty(m, a.out_features, device=x2.device, dtype=x2.dtype)
        if m:
            run_fp8_gemm(codes, e.fp8, y, bs, e.sw, a.bias, None, None, t, _up16(a, x2.dtype) if lrb else None, m,
                         out_act=a.output_act, block_scale=True)
    return y
