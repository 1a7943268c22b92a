"""Q_w(R) for QAT on the GPU in one Triton kernel: per output channel, the range (absmean for ternary weights,
absmax / qmax otherwise), the codes and the dequantized weight, written in the matmul's dtype, plus the fp32 scales.

`quantizers.fake_quant_weight` followed by the cast to the matmul dtype (`qat_fused.quantized_weight`) is ~10 ATen
kernels over the (N, K) weight in eager QAT, every step and layer; this is one read of R (or of its two terms, W H
and A B, whose difference it takes) and one write of Q_w(R). The steps are the reference's, all in fp32 as
`quantize_weight` computes them whatever R's dtype:

    r = W H - A B in fp32 (with a branch: `layer.wide_difference`), else R widened to fp32
    s = mean|r| (ternary) or max|r| (others);  s = max(s, 1e-8);  s = s / qmax (not ternary; IEEE division)
    s -> scale_dtype -> fp32;  q = clamp(rint(r / s), -qmax, qmax);  out = q s rounded to R's dtype, then out dtype

The row sum of the ternary mean is taken in another order than torch's reduction, so a scale can differ in its last
bit and a code sitting on a rounding tie can flip: the GPU test asks for >= 99.9% equal codes, as for the
activation quantizer. Per-channel scales without groups only (`supported`); the rest stays on the torch math.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import quantizers as Q
from .quantizer import on_device
from .triton_launch import launch
from .triton_rowquant import _RINT

MAX_K = 16384  # one row a program, held in registers
_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _round_to(v, DT: tl.constexpr):
    """v (fp32) rounded to the dtype coded DT (0 fp32, 1 bf16, 2 fp16), returned in fp32."""
    if DT == 1:
        v = v.to(tl.bfloat16).to(tl.float32)
    elif DT == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def row_scale(stat, K, qmax, eps, TERNARY: tl.constexpr, SDT: tl.constexpr):
    """A row's scale (fp32, rounded through the scale's storage dtype) from stat = sum |r| (ternary) or max |r|:
    the module docstring's steps, shared by this module's kernel and triton_wside's."""
    if TERNARY:
        s = tl.maximum(tl.div_rn(stat, tl.cast(K, tl.float32)), eps)
    else:
        s = tl.div_rn(tl.maximum(stat, eps), qmax)
    return _round_to(s, SDT)


@triton.jit
def row_codes(r, s, qmax):
    """clamp(rint(r / s), -qmax, qmax) of r (fp32, any shape) with s broadcast against it."""
    safe = tl.where(s > 0, s, 1.0)
    q = _RINT(tl.div_rn(r, tl.zeros_like(r) + safe))
    return tl.minimum(tl.maximum(q, -qmax), qmax)


@triton.jit
def wquant_rows_kernel(r_ptr, ab_ptr, out_ptr, scale_ptr, K, stride_r, stride_ab, stride_o, qmax, eps,
                       TERNARY: tl.constexpr, HAS_AB: tl.constexpr, RDT: tl.constexpr, SDT: tl.constexpr,
                       BLOCK: tl.constexpr):
    qmax = tl.cast(qmax, tl.float32)  # fp64 when Inductor launches it (see triton_act_quant)
    eps = tl.cast(eps, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_AB:
        r = r - tl.load(ab_ptr + row * stride_ab + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(r)
    s = row_scale(tl.sum(a, axis=0) if TERNARY else tl.max(a, axis=0), K, qmax, eps, TERNARY, SDT)
    q = row_codes(r, s, qmax)
    out = _round_to(q * s, RDT)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, s)


def supported(r: torch.Tensor, granularity: str, group_size: int, scale_dtype: str,
              minus: torch.Tensor | None = None) -> str | None:
    if not r.is_cuda:
        return "not a CUDA tensor"
    if r.dim() != 2 or r.stride(-1) != 1:
        return "not a 2-D weight with contiguous rows"
    if minus is not None and (minus.shape != r.shape or minus.stride(-1) != 1 or minus.dtype not in _CODE):
        return f"A B {tuple(minus.shape)} / {minus.dtype} not a contiguous-row match of W H {tuple(r.shape)}"
    if granularity != "channel" or group_size:
        return f"granularity {granularity!r} / group_size {group_size} (per-channel scales only)"
    if r.dtype not in _CODE or scale_dtype not in ("float32", "bfloat16", "float16"):
        return f"dtype {r.dtype} / scale dtype {scale_dtype}"
    if r.shape[1] > MAX_K:
        return f"in_features {r.shape[1]} > {MAX_K}"
    return None


def fake_quant_weight_rows(r: torch.Tensor, w_bits, scale_dtype: str, out_dtype: torch.dtype,
                           minus: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """(Q_w(R) in out_dtype (N, K), fp32 scales (N,)) of a per-channel R = r, or r - minus in fp32 (`supported`);
    written into `out` where given (N, K) in out_dtype, its rows contiguous: a slice of a stacked weight)."""
    n, k = r.shape
    if out is None:
        out = torch.empty(n, k, device=r.device, dtype=out_dtype)
    elif out.shape != (n, k) or out.dtype != out_dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} stride {out.stride()}: expected ({n}, {k}) "
                         f"{out_dtype} with contiguous rows")
    scale = torch.empty(n, device=r.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    warps = 4 if block <= 2048 else 8
    # R's dtype: the wide difference's (fp32 or wider) with a branch, r's own without
    r_dtype = r.dtype if minus is None else Q._wide(torch.promote_types(r.dtype, minus.dtype))
    with on_device(r.device):
        launch(wquant_rows_kernel, (n,), (r, r if minus is None else minus, out, scale, k, r.stride(0),
                                         r.stride(0) if minus is None else minus.stride(0), out.stride(0),
                                         float(Q.weight_qmax(w_bits)), Q._EPS),
               dict(TERNARY=float(w_bits) == 1.58, HAS_AB=minus is not None, RDT=_CODE[r_dtype],
                    SDT=_CODE[getattr(torch, scale_dtype)], BLOCK=block), dict(num_warps=warps))
    return out, scale
