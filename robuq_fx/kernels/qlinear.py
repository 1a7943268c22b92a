"""`robuq::qlinear`: one quantized linear layer on packed weights, dispatched through the kernel registry.

    qlinear(x (..., K), qweight uint8 packed codes of W' = (W H - A B) as (N, K), w_scale (N, G) | (1, 1),
            bias (N)?, lrb_down B (r, K)?, lrb_up A (N, r)?, out_features N, in_features K, w_bits, a_bits,
            hadamard_block (0 = none), a_sym, a_clip, act = "none") -> y (..., N)

    y = Q_a(u H) (s_w q_w)^T + bias + (u H) B^T A^T,   u = act(x)

`act` ("none", "gelu", "gelu_tanh") is the activation of the op that produced x, fused by `lower()` when that op
had no other reader (`passes/fuse.py`): u = F.gelu(x, approximate=...) in x's dtype. Kernels that fuse it read x once;
for the others `qlinear_impl` applies F.gelu first, so every kernel computes the same u.

Packed layout: `robuq_fx.packing` (flat, row-major codes, little-endian). Kernels: `robuq_fx.kernels.available()`.

The op is an inference op (no autograd formula: QAT trains the fake-quant graph, not this one). It is defined with
the low-level `torch.library.Library` API and one CompositeExplicitAutograd kernel rather than
`torch.library.custom_op`, whose Python wrappers (autograd shim, redispatch, aliasing check) cost ~35 us per eager
call on the H100 machine, a third of the whole call at small M.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .registry import QLinearArgs, select

_LIB = torch.library.Library("robuq", "FRAGMENT")
_LIB.define("qlinear(Tensor x, Tensor qweight, Tensor w_scale, Tensor? bias, Tensor? lrb_down, Tensor? lrb_up, "
            "SymInt out_features, SymInt in_features, float w_bits, SymInt a_bits, SymInt hadamard_block, "
            "bool a_sym, str a_clip, str act=\"none\") -> Tensor")

ACTS = ("none", "gelu", "gelu_tanh")


def apply_act(x: torch.Tensor, act: str) -> torch.Tensor:
    """u = act(x), exactly as the unfused graph computed it (F.gelu in x's dtype)."""
    if act == "none":
        return x
    return torch.nn.functional.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


def qlinear_impl(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 lrb_down: torch.Tensor | None, lrb_up: torch.Tensor | None, out_features: int, in_features: int,
                 w_bits: float, a_bits: int, hadamard_block: int, a_sym: bool, a_clip: str,
                 act: str = "none") -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"robuq::qlinear: input has {x.shape[-1]} features, the layer expects {in_features}")
    if act not in ACTS:
        raise ValueError(f"robuq::qlinear: act={act!r}, expected one of {ACTS}")
    args = QLinearArgs(qweight, w_scale, bias, lrb_down, lrb_up, out_features, in_features, w_bits, a_bits,
                       hadamard_block, a_sym, a_clip, act)
    kern = select(x, args)
    if act != "none" and act not in kern.acts:
        x, args = apply_act(x, act), replace(args, act="none")
    return kern.fn(x, args)


_LIB.impl("qlinear", qlinear_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("robuq::qlinear", lib=_LIB)
def _(x, qweight, w_scale, bias, lrb_down, lrb_up, out_features, in_features, w_bits, a_bits, hadamard_block,
      a_sym, a_clip, act="none"):
    return x.new_empty(*x.shape[:-1], out_features)


qlinear = torch.ops.robuq.qlinear
