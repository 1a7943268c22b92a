"""The opaque ops a compiled graph calls at run time, each running our eager kernels inside (kernels/inductor.py
decomposes `robuq::qlinear` into them where Inductor cannot launch or trace what the eager path runs): the Gluon
quantizer under CUDA graphs, and the stacked LRB mode's codes and GEMM. Under CUDA graphs an opaque op costs nothing
at replay. `define()` (called by `inductor.register()`) defines all of them: a graph loaded from Inductor's on-disk
cache calls them without the decomposition having run in the process.
"""
from __future__ import annotations

import functools
import os

import torch

from .registry import QLinearArgs

_DEFS: list = []  # the ops' definitions, kept alive


def define() -> None:
    """Define every op of this module (idempotent)."""
    _gluon_quant_op(), _stacked_codes_op(), _stacked_mm_op()


@functools.lru_cache(maxsize=None)
def _gluon_quant_op():
    """robuq::act_quant_gluon: the eager quantizer (`quantizer.act_quant`, which runs the Gluon kernel where the
    dispatch table picks it) as an opaque op. Inductor's generated code launches Triton kernels only, so a compiled
    graph would otherwise always take the Triton quantizer; under CUDA graphs (mode="reduce-overhead") an opaque
    op costs nothing at replay, so there the graph keeps the table's choice (`_gluon_quant_here`). Codes, scales and
    offsets equal the triton_op's wherever the table picks Gluon (it does so only where they are equal)."""
    from torch.library import custom_op
    from .quantizer import act_quant

    @custom_op("robuq::act_quant_gluon", mutates_args=())
    def act_quant_gluon_op(x2: torch.Tensor, block: int, a_bits: int, sym: bool, m_store: int,
                           shift: bool, act: str = "", clip: str = "absmax"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return act_quant(x2, block, a_bits, sym, m_store=m_store, shift=shift, act=act, clip=clip)

    @act_quant_gluon_op.register_fake
    def _(x2, block, a_bits, sym, m_store, shift, act="", clip="absmax"):
        return (x2.new_empty(m_store, x2.shape[1], dtype=torch.float8_e4m3fn),
                x2.new_empty(m_store, dtype=torch.float32), x2.new_empty(m_store, dtype=torch.float32))

    _DEFS.append(act_quant_gluon_op)
    return torch.ops.robuq.act_quant_gluon


@functools.lru_cache(maxsize=None)
def _stacked_codes_op():
    """robuq::stacked_codes: `lrb_stacked.stacked_codes` run eagerly as one opaque op (its kernels, the fused one
    where the table picks it, or the Gluon quantizer, write into one buffer). Traced instead, the quantizer's write
    into the buffer's last K columns became a graph-level copy that Inductor filled with an fp8 NaN Triton 3.6 does
    not compile (H200, session 11); under CUDA graphs the op costs no launch time."""
    from torch.library import custom_op
    from .lrb_layout import ext_width
    from .lrb_stacked import stacked_codes

    @custom_op("robuq::stacked_codes", mutates_args=())
    def op(x2: torch.Tensor, bh: torch.Tensor, w_codes: torch.Tensor, block: int, a_bits: int, clip: str,
           m_store: int, act: str = "", sym: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return stacked_codes(x2, bh, w_codes, block, a_bits, clip, m_store, act, sym)

    @op.register_fake
    def _(x2, bh, w_codes, block, a_bits, clip, m_store, act="", sym=True):
        return (x2.new_empty(m_store, x2.shape[1] + ext_width(bh.shape[0]), dtype=torch.float8_e4m3fn),
                x2.new_empty(m_store, dtype=torch.float32))

    _DEFS.append(op)
    return torch.ops.robuq.stacked_codes


@functools.lru_cache(maxsize=None)
def _stacked_mm_op():
    """robuq::stacked_mm: `_scaled_mm` over the extended weight, made from its code columns (qweight) inside the op.
    Opaque: in a compiled graph a view of qweight reaching outside its own extent (its storage's first W columns)
    made Inductor materialize a copy with those bytes missing (H200, session 10); eagerly it is a plain view."""
    from torch.library import custom_op
    from . import triton_fp8 as T
    from .lrb_stacked import full_weight

    @custom_op("robuq::stacked_mm", mutates_args=())
    def op(wide: torch.Tensor, w_codes: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
        return T._scaled_mm(wide, full_weight(w_codes, wide.shape[1] - w_codes.shape[1]), sx, sw, bias)

    @op.register_fake
    def _(wide, w_codes, sx, sw, bias):
        return wide.new_empty(wide.shape[0], w_codes.shape[0], dtype=torch.bfloat16)

    _DEFS.append(op)
    return torch.ops.robuq.stacked_mm


def _gluon_quant_here(x2: torch.Tensor, a: QLinearArgs) -> bool:
    """The compiled graph replays under CUDA graphs and the table picks the Gluon quantizer for this call."""
    from torch._inductor import config
    if not config.triton.cudagraphs or os.environ.get("ROBUQ_INDUCTOR_GLUON_QUANT", "1") == "0":
        return False
    from .quantizer import _gluon_plan
    return _gluon_plan(x2, a.hadamard_block, a.a_clip, False, a.input_act) is not None
