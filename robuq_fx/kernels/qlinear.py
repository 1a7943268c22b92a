"""`robuq::qlinear`: one quantized linear layer on packed weights, dispatched through the kernel registry.

    qlinear(x (..., K), qweight uint8 packed codes of W' = (W H - A B) as (N, K), w_scale (N, G) | (1, 1),
            bias (N)?, lrb_down B (r, K)?, lrb_up A (N, r)?, out_features N, in_features K, w_bits, a_bits,
            hadamard_block (0 = none), a_sym, a_clip, splits (int[])?, input_act, lrb_down_h?, output_act,
            w_colsum?, a_group) -> y (..., N)

    y = out_act(Q_a(in_act(x) H) (s_w q_w)^T + bias + (in_act(x) H) B^T A^T)

lrb_down_h (optional): B H, the branch's down-projection rotated, as the layer keeps it (PackedLinear):
the GPU kernels read it instead of rotating B on every call (which a compiled graph would otherwise redo each
forward). It must be B H for this B (`weight_cache.rotated_down`); a kernel whose dtype differs rotates B itself.

input_act ("gelu" / "gelu_tanh", default "": none): x is first replaced by act(x), computed as torch's GELU computes
it in x's dtype (`apply_input_act`); set on the layer that reads a GELU's output when that is the GELU's only
reader (`robuq_fx.fuse_activations`), so that a kernel can apply it while loading x instead of the model writing and
re-reading the activation. Kernels that do not fuse it get act(x) (`call_kernel`).

a_group (default 0: one activation range per token): one range per token and a_group consecutive inputs of x H
(`LayerSpec.a_group`, issue 20's option for quantization local to a GEMM's K tile). The fp8 path takes a_group = the
Hadamard block = 128 with symmetric absmax codes (kernels/triton_block_quant.py and the block-scaled GEMM); other
groups run the reference math on the GPU (a warning says so once).

w_colsum (optional): the weight's column sums c[n] = sum_k s_w q_w (fp32, (N,)), the asymmetric layers' offset term
(y += lo_x c), as the layer keeps it (PackedLinear): a compiled graph reads it instead of summing the codes every
forward. It must be that of this weight (`quantizers.weight_code_colsum`); the reference kernel does not read it.

output_act (same values): the layer's output goes through that activation, computed as the model's GELU module
computes it on the layer's rounded output (y rounded to x's dtype, then `apply_input_act`); set on the layer that
produces a GELU's input when the GELU reads nothing else (`robuq_fx.fuse_activations(model, into="producer")`), so
that the GEMM applies it in its store instead of a separate pass over the widest activation. Kernels that do not
fuse it get act(y) after the call (`call_kernel`): the output is the unfused pair's either way, except that the exact
(erf) GELU in a GPU GEMM's store may put a rare element one bf16 step away (libdevice's erf against the erff ATen's
kernel is built with; the tanh form is bit-identical: tests/kernels/test_input_act.py).

splits: set on a fused layer (passes/fuse.py: siblings reading one input, e.g. q/k/v): the members' out_features,
summing to N. The tensors are the members' stacked along N (lrb_down stacked along r, lrb_up block-diagonal), so the
formula above holds as is; the reference computes each member's rows as their own products to stay bit-identical
to the unfused layers, a GPU kernel may run one GEMM and skip lrb_up's zero blocks.

Packed layout: `robuq_fx.packing` (flat, row-major codes, little-endian). Kernels: `robuq_fx.kernels.available()`.

The op is an inference op (no autograd formula: QAT trains the fake-quant graph, not this one). It is defined with
the low-level `torch.library.Library` API and one CompositeExplicitAutograd kernel rather than
`torch.library.custom_op`, whose Python wrappers (autograd shim, redispatch, aliasing check) cost ~35 us per eager
call on the H100 machine, a third of the whole call at small M.
"""
from __future__ import annotations

import dataclasses

import torch

from .registry import QLinearArgs, select_cached

_LIB = torch.library.Library("robuq", "FRAGMENT")
_LIB.define("qlinear(Tensor x, Tensor qweight, Tensor w_scale, Tensor? bias, Tensor? lrb_down, Tensor? lrb_up, "
            "SymInt out_features, SymInt in_features, float w_bits, SymInt a_bits, SymInt hadamard_block, "
            "bool a_sym, str a_clip, SymInt[]? splits=None, str input_act=\"\", Tensor? lrb_down_h=None, "
            "str output_act=\"\", Tensor? w_colsum=None, SymInt a_group=0) -> Tensor")

INPUT_ACTS = ("", "gelu", "gelu_tanh")


def apply_input_act(x: torch.Tensor, act: str) -> torch.Tensor:
    """The activation a layer reads its input through (`input_act`), as the model's own module computes it."""
    if act == "gelu":
        return torch.nn.functional.gelu(x)
    if act == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if act:
        raise ValueError(f"robuq::qlinear: input_act={act!r}; expected one of {INPUT_ACTS}")
    return x


def qlinear_impl(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 lrb_down: torch.Tensor | None, lrb_up: torch.Tensor | None, out_features: int, in_features: int,
                 w_bits: float, a_bits: int, hadamard_block: int, a_sym: bool, a_clip: str,
                 splits=None, input_act: str = "", lrb_down_h: torch.Tensor | None = None,
                 output_act: str = "", w_colsum: torch.Tensor | None = None, a_group: int = 0) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"robuq::qlinear: input has {x.shape[-1]} features, the layer expects {in_features}")
    for name, act in (("input_act", input_act), ("output_act", output_act)):
        if act not in INPUT_ACTS:
            raise ValueError(f"robuq::qlinear: {name}={act!r}; expected one of {INPUT_ACTS}")
    args = QLinearArgs(qweight, w_scale, bias, lrb_down, lrb_up, out_features, in_features, w_bits, a_bits,
                       hadamard_block, a_sym, a_clip, tuple(splits) if splits else None, input_act,
                       rotated_down_or_none(lrb_down_h, lrb_down, hadamard_block), output_act,
                       colsum_or_none(w_colsum, qweight, out_features), a_group)
    return call_kernel(select_cached(x, args).fn, x, args)


def colsum_or_none(w_colsum, qweight, out_features: int):
    """w_colsum where the kernels can read it (fp32, contiguous, on the weight's device), else None (they sum the
    codes themselves); a wrong shape is an error naming both shapes."""
    if w_colsum is None:
        return None
    if tuple(w_colsum.shape) != (out_features,):
        raise ValueError(f"robuq::qlinear: w_colsum has shape {tuple(w_colsum.shape)}, expected ({out_features},) "
                         "(the weight's column sums)")
    ok = w_colsum.dtype == torch.float32 and w_colsum.is_contiguous() and w_colsum.device == qweight.device
    return w_colsum if ok else None


def rotated_down_or_none(lrb_down_h, lrb_down, hadamard_block: int):
    """lrb_down_h where it can be B H for this layer (the shape of B, a Hadamard rotation, B's device), else None
    (the kernels then rotate B themselves); a wrong shape is an error naming both shapes."""
    if lrb_down_h is None or lrb_down is None or not hadamard_block:
        return None
    if lrb_down_h.shape != lrb_down.shape:
        raise ValueError(f"robuq::qlinear: lrb_down_h has shape {tuple(lrb_down_h.shape)}, expected lrb_down's "
                         f"{tuple(lrb_down.shape)} (B H)")
    return lrb_down_h if lrb_down_h.device == lrb_down.device and lrb_down_h.is_contiguous() else None


def call_kernel(fn, x: torch.Tensor, args: QLinearArgs) -> torch.Tensor:
    """fn(x, args); where the layer has an input activation that fn does not fuse (`fn.fuses_input_act`), the
    activation runs first, and an output activation it does not fuse (`fn.fuses_output_act`) after, exactly as the
    unfused model ran them."""
    if args.input_act and not getattr(fn, "fuses_input_act", False):
        x = apply_input_act(x, args.input_act)
        args = dataclasses.replace(args, input_act="")
    if args.output_act and not getattr(fn, "fuses_output_act", False):
        act = args.output_act
        return apply_input_act(fn(x, dataclasses.replace(args, output_act="")), act)
    return fn(x, args)


_LIB.impl("qlinear", qlinear_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("robuq::qlinear", lib=_LIB)
def _(x, qweight, w_scale, bias, lrb_down, lrb_up, out_features, in_features, w_bits, a_bits, hadamard_block,
      a_sym, a_clip, splits=None, input_act="", lrb_down_h=None, output_act="", w_colsum=None, a_group=0):
    from . import inductor
    inductor.register()  # Dynamo is tracing a model with this op: let Inductor decompose it (kernels/inductor.py)
    return x.new_empty(*x.shape[:-1], out_features)


qlinear = torch.ops.robuq.qlinear
