"""Reference qlinear: pure torch on any device, the source of truth.

unpack -> integer codes -> s_w * q_w (the exact values QAT's fake-quant produced) -> `layer.robuq_linear`, the same
function the QAT graph inlines, so a lowered model is bit-identical to its QAT model in eval mode.
`integer_qlinear` below is the form fast kernels compute (integer matmul, scales and offset in the epilogue); tests
check that both agree.
"""
from __future__ import annotations

import torch

from .. import layer, packing
from .. import quantizers as Q
from ..spec import LayerSpec
from .registry import QLinearArgs, register


def spec_of(a: QLinearArgs) -> LayerSpec:
    return LayerSpec(w_bits=a.w_bits, a_bits=a.a_bits, hadamard=a.hadamard_block > 1,
                     hadamard_block=a.hadamard_block or None, lora_rank=0 if a.lrb_down is None else
                     a.lrb_down.shape[0], a_sym=a.a_sym, a_clip=a.a_clip, a_group=a.a_group)


def weight_codes(a: QLinearArgs) -> torch.Tensor:
    """int8 codes (N, K) from either qweight layout (modules.PackedLinear: packed bytes or fp8 codes)."""
    return packing.codes_of(a.qweight, a.w_bits, (a.out_features, a.in_features))


@register("reference", priority=0, takes="every spec, any device: the source of truth (the QAT math on unpacked "
                                         "codes, bit-identical to QAT eval)")
def reference_qlinear(x: torch.Tensor, a: QLinearArgs) -> torch.Tensor:
    wq = Q.dequantize_weight(weight_codes(a), a.w_scale, x.dtype)
    return layer.robuq_linear(x, wq, a.bias, a.lrb_down, a.lrb_up, spec_of(a), a.splits)


def integer_qlinear(x: torch.Tensor, a: QLinearArgs) -> torch.Tensor:
    """y = s_x * (q_x @ (s_w q_w)^T) [+ lo_x * c] + bias + LRB, with q_x @ q_w^T exact (float64 accumulation).

    This is the epilogue form of METHOD.md §3 that fp8/int kernels implement: the integer product is exact,
    only the scale multiplications round. Used by tests as the target for GPU kernels."""
    spec = spec_of(a)
    xh = layer.rotate(x, spec)
    codes = weight_codes(a).to(torch.float64)
    n, k = codes.shape
    g = 1 if a.w_scale.shape == (1, 1) else a.w_scale.shape[1]
    if a.a_bits >= 16:
        y = torch.nn.functional.linear(xh.double(), Q.dequantize_weight(weight_codes(a), a.w_scale, torch.float64))
    elif a.a_group:  # per-group activation scales: s_x q_x (+ lo) per (token, group), exact in float64
        qx, sx, lo = Q.quantize_act(xh, a.a_bits, a.a_sym, a.a_clip, a.a_group)
        per_col = (lambda t: t.double().repeat_interleave(a.a_group, dim=-1))
        xd = per_col(sx) * qx.double() + (0 if a.a_sym else per_col(lo))
        y = torch.nn.functional.linear(xd, Q.dequantize_weight(weight_codes(a), a.w_scale, torch.float64))
    else:
        qx, sx, lo = Q.quantize_act(xh, a.a_bits, a.a_sym, a.a_clip)
        qx = qx.double().reshape(*qx.shape[:-1], g, k // g)
        sw = a.w_scale.double().reshape(-1, g) if g > 1 else a.w_scale.double().reshape(-1, 1)
        # per weight-group partial sums of exact integer products, then the per-channel (per-group) scales
        acc = torch.einsum("...gk,ngk->...ng", qx, codes.reshape(n, g, k // g))
        y = sx.double() * (acc * sw.expand(n, g)).sum(-1)
        if not a.a_sym:
            y = y + lo.double() * Q.weight_code_colsum(weight_codes(a), a.w_scale).double()
    if a.bias is not None:
        y = y + a.bias.double()
    if a.lrb_down is not None:
        y = y + torch.nn.functional.linear(torch.nn.functional.linear(xh, a.lrb_down), a.lrb_up).double()
    return y.to(x.dtype)
