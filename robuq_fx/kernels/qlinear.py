"""`robuq::qlinear`: one quantized linear layer on packed weights, dispatched through the kernel registry.

    qlinear(x (..., K), qweight uint8 packed codes of W' = (W H - A B) as (N, K), w_scale (N, G) | (1, 1),
            bias (N)?, lrb_down B (r, K)?, lrb_up A (N, r)?, out_features N, in_features K, w_bits, a_bits,
            hadamard_block (0 = none), a_sym, a_clip) -> y (..., N)

    y = Q_a(x H) (s_w q_w)^T + bias + (x H) B^T A^T

Packed layout: `robuq_fx.packing` (flat, row-major codes, little-endian). Kernels: `robuq_fx.kernels.available()`.
"""
from __future__ import annotations

import torch

from .registry import QLinearArgs, select


@torch.library.custom_op("robuq::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
            lrb_down: torch.Tensor | None, lrb_up: torch.Tensor | None, out_features: int, in_features: int,
            w_bits: float, a_bits: int, hadamard_block: int, a_sym: bool, a_clip: str) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"robuq::qlinear: input has {x.shape[-1]} features, the layer expects {in_features}")
    args = QLinearArgs(qweight, w_scale, bias, lrb_down, lrb_up, out_features, in_features, w_bits, a_bits,
                       hadamard_block, a_sym, a_clip)
    return select(x, args).fn(x, args)


@qlinear.register_fake
def _(x, qweight, w_scale, bias, lrb_down, lrb_up, out_features, in_features, w_bits, a_bits, hadamard_block,
      a_sym, a_clip):
    return x.new_empty(*x.shape[:-1], out_features)
