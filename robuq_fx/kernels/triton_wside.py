"""A QAT layer's forward weight side in one Triton kernel (opt-in, `ROBUQ_QAT_WSIDE_KERNEL=1`; used by
`weight_sides_per_forward` and the backend's step mode): from the fp32 master W and the branch factors A (up, N x r)
and B (down, r x K) straight to Q_w(R) in the matmul dtype, written into the stacked weight's slice, and the fp32
scales. One program a row of W:

    W H  = rnd_c(rnd_c(W) . H_c)      per Hadamard block of the row, on the tensor cores (fp32 sums)
    A B  = rnd_c(sum_j rnd_c(A[n, j]) rnd_c(B[j, :]))   fp32 sums over the rank
    R    = W H - A B in fp32          (`layer.wide_difference`)
    Q_w(R) as `quantizers.quantize_weight` / `dequantize_weight` compute it (fp32; kernels/triton_wquant.py)

rnd_c: rounded to the autocast dtype c, as the op-by-op path's autocast matmuls round their inputs and outputs. The
op-by-op path (`qat_fused._quantized_weight`: two cuBLAS matmuls, then the weight kernel) reads W, writes W H and A B
and reads them again, and casts W to c first: ~16 bytes an element against this kernel's 6 (session 23's profile:
7.7 ms of forward weight-side kernels a DiT-XL/2 step). Its sums run in another order than cuBLAS's, so W H or A B
can differ from the op-by-op path's in their last bit, and a code at a rounding tie can flip: the tests ask for
>= 99.9% equal codes, as for the other quantizers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import quantizers as Q
from ..hadamard import hadamard_matrix
from .quantizer import on_device
from .triton_launch import launch
from .triton_rowquant import _RINT
from .triton_wquant import _CODE, _round_to

MAX_K = 16384  # one row a program, held in registers
MAX_RANK = 128


@triton.jit
def wside_rows_kernel(w_ptr, up_ptr, down_ptr, h_ptr, out_ptr, scale_ptr, K, RANK, stride_w, stride_up,
                      stride_down, stride_o, qmax, eps,
                      TERNARY: tl.constexpr, HAS_AB: tl.constexpr, CDT: tl.constexpr, SDT: tl.constexpr,
                      HB: tl.constexpr, NB: tl.constexpr):
    qmax = tl.cast(qmax, tl.float32)  # fp64 when Inductor launches it (see triton_act_quant)
    eps = tl.cast(eps, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, NB)[:, None] * HB + tl.arange(0, HB)[None, :]  # the row as (blocks, HB)
    mask = offs < K
    w = tl.load(w_ptr + row * stride_w + offs, mask=mask, other=0.0)
    h = tl.load(h_ptr + tl.arange(0, HB)[:, None] * HB + tl.arange(0, HB)[None, :])  # H in c
    r = _round_to(tl.dot(w.to(h.dtype), h, out_dtype=tl.float32), CDT)
    if HAS_AB:
        ab = tl.zeros([NB, HB], dtype=tl.float32)
        for j in range(RANK):
            u = _round_to(tl.load(up_ptr + row * stride_up + j).to(tl.float32), CDT)
            d = _round_to(tl.load(down_ptr + j * stride_down + offs, mask=mask, other=0.0).to(tl.float32), CDT)
            ab += u * d
        r = r - _round_to(ab, CDT)
    a = tl.abs(r)
    if TERNARY:
        s = tl.maximum(tl.div_rn(tl.sum(tl.sum(a, axis=1), axis=0), tl.cast(K, tl.float32)), eps)
    else:
        s = tl.div_rn(tl.maximum(tl.max(tl.max(a, axis=1), axis=0), eps), qmax)
    s = _round_to(s, SDT)  # the scale's storage dtype
    safe = tl.where(s > 0, s, 1.0)
    q = _RINT(tl.div_rn(r, tl.zeros_like(r) + safe))
    q = tl.minimum(tl.maximum(q, -qmax), qmax)
    tl.store(out_ptr + row * stride_o + offs, (q * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, s)


def supported(w: torch.Tensor, down, up, spec, c: torch.dtype) -> str | None:
    """None where the kernel computes this layer's forward weight side, else why not."""
    if not w.is_cuda:
        return "not a CUDA tensor"
    if w.dtype != torch.float32 or w.dim() != 2 or w.stride(-1) != 1:
        return "not an fp32 master with contiguous rows"
    if c not in (torch.bfloat16, torch.float16) or not torch.is_autocast_enabled("cuda") \
            or torch.get_autocast_dtype("cuda") != c:
        return "not under 16-bit autocast"
    if not spec.hadamard or spec.hadamard_block not in (16, 32, 64, 128):
        return "no Hadamard block of 16-128"
    if spec.w_granularity != "channel" or spec.group_size:
        return "not per-channel weight scales"
    k = w.shape[1]
    if k % spec.hadamard_block or k > MAX_K:
        return f"in_features {k}"
    if spec.scale_dtype not in ("float32", "bfloat16", "float16"):
        return f"scale dtype {spec.scale_dtype}"
    if down is not None and (down.shape[0] > MAX_RANK or down.stride(-1) != 1 or up.stride(-1) != 1
                             or down.dtype not in _CODE or up.dtype not in _CODE):
        return "branch factors"
    return None


def weight_side_rows(w: torch.Tensor, down, up, spec, c: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """Q_w(W H - A B) (or Q_w(W H)) in c written into `out` ((N, K), rows contiguous); returns the fp32 scales."""
    n, k = w.shape
    if out.shape != (n, k) or out.dtype != c or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype}: expected ({n}, {k}) {c} with contiguous rows")
    hb = spec.hadamard_block
    h = hadamard_matrix(hb, torch.float32, w.device).to(c)
    scale = torch.empty(n, device=w.device, dtype=torch.float32)
    nb = max(16, triton.next_power_of_2(k // hb))  # (tl.dot takes >= 16 rows)
    has_ab = down is not None
    with on_device(w.device):
        launch(wside_rows_kernel, (n,), (w, up if has_ab else w, down if has_ab else w, h, out, scale, k,
                                         down.shape[0] if has_ab else 0, w.stride(0),
                                         up.stride(0) if has_ab else 0, down.stride(0) if has_ab else 0,
                                         out.stride(0), float(Q.weight_qmax(spec.w_bits)), Q._EPS),
               dict(TERNARY=float(spec.w_bits) == 1.58, HAS_AB=has_ab, CDT=_CODE[c],
                    SDT=_CODE[getattr(torch, spec.scale_dtype)], HB=hb, NB=nb),
               dict(num_warps=4 if nb * hb <= 2048 else 8))
    return scale
