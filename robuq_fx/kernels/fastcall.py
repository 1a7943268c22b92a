"""Eager calls of the fp8 qlinear path with the per-call Python cut to what changes between calls.

A `PackedLinear` called eagerly at small M spends more CPU than GPU time: `triton_fp8.fp8_qlinear` re-derives per
call what depends only on the layer, the input's shape, dtype and device (the quantizer tiling, scalars, the weight
cache lookups, Triton's specialization key of ~16 arguments). `bind(x, a)` does that once, after one ordinary call,
and returns a callable that per call only checks what could make the binding wrong, allocates the outputs and
launches the kernels the ordinary call launched, with the same compiled kernels and the same arguments except the
input and output tensors. It binds two paths:

    small-M single kernel (`triton_qgemm_small`, when the dispatch sends this M there)
    symmetric, no low-rank branch: the activation quantizer + `torch._scaled_mm`

Anything else (LRB or asymmetric terms through the Triton GEMM / addmm epilogue, launch hooks, Triton's own launch
path) is not bound: the caller keeps calling `fp8_qlinear`. A bound call returns None instead of a result when its
checks fail (a weight or bias updated in place, an input with other strides or alignment, another current device);
the caller then drops it and calls `fp8_qlinear`, which re-binds on the next plan miss.
"""
from __future__ import annotations

import os
import weakref

import torch

from . import fused_quant
from . import triton_launch as TL
from ..ops import plain_eager
from .registry import QLinearArgs, env_values, version_of


# what fp8_qlinear reads from the environment on every call: a binding holds for one setting of them
_ENV = ("ROBUQ_FP8_SMALL_M", "ROBUQ_FP8_EPI", "ROBUQ_FP8_GEMM", "ROBUQ_FP8_GEMM_KERNEL", "ROBUQ_FP8_MIN_M",
        "ROBUQ_QUANT_KERNEL", "ROBUQ_FP8_FUSED_QUANT", "ROBUQ_GELU_FORM", "ROBUQ_GLUON_SIGMA",
        "ROBUQ_STACKED_ASYM", "ROBUQ_STACKED_WIDE")


def _env() -> tuple:
    return env_values(_ENV)


def _versions(a: QLinearArgs) -> tuple:
    """(tensor, version) of the buffers a binding reads besides qweight (which it holds only weakly: a binding kept
    on the weight's cache entry must not keep the weight alive, or the entry would never be dropped)."""
    return tuple((t, version_of(t)) for t in (a.w_scale, a.bias, a.lrb_down, a.lrb_up) if t is not None)


class _Call:
    """What every bound path checks per call."""
    __slots__ = ("k", "n", "m", "lead", "dtype", "dev", "aligned", "vers", "env", "qw", "qw_ver")

    def __init__(self, x: torch.Tensor, a: QLinearArgs):
        self.k, self.n = a.in_features, a.out_features
        self.m = x.numel() // self.k
        self.lead = tuple(x.shape[:-1])
        self.dtype, self.dev = x.dtype, x.device.index
        self.aligned = x.data_ptr() % 16 == 0
        self.vers = _versions(a)
        self.env = _env()
        self.qw = weakref.ref(a.qweight)
        self.qw_ver = version_of(a.qweight)

    def _input(self, x: torch.Tensor):
        """x as (M, K) rows when this binding still holds for it, else None."""
        if not x.is_contiguous() or (x.data_ptr() % 16 == 0) != self.aligned:
            return None
        for t, v in self.vers:
            if version_of(t) != v:
                return None
        qw = self.qw()
        if qw is None or version_of(qw) != self.qw_ver or _env() != self.env:
            return None
        drv, rt = TL._TRITON
        if TL.hook(rt.launch_enter_hook) is not None or drv.get_current_device() != self.dev:
            return None
        return x.view(self.m, self.k)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        return y if len(self.lead) == 1 else y.view(*self.lead, self.n)


class _SmallM(_Call):
    __slots__ = ("hit", "grid", "args", "xpos")

    def __init__(self, x, a, spec):
        super().__init__(x, a)
        fn, grid, args, constexprs, options, nospec = spec
        self.hit = TL.compiled(fn, args, constexprs, options, nospec)
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        x2, y = args[0], args[3]
        self.xpos = tuple(i for i, t in enumerate(args) if t is x2)  # x2 also stands in for absent tensors
        self.args = [None if (t is x2 or t is y) else t for t in args]

    def __call__(self, x: torch.Tensor):
        x2 = self._input(x)
        if x2 is None:
            return None
        y = torch.empty(self.m, self.n, device=x.device, dtype=self.dtype)
        args = self.args.copy()
        for i in self.xpos:
            args[i] = x2
        args[3] = y
        TL.run(self.hit, self.grid, tuple(args), self.dev)
        return self._out(y)


class _QuantScaledMM(_Call):
    __slots__ = ("hit", "grid", "rest", "m_pad", "w8", "sw", "bias")

    def __init__(self, x, a, spec, w8, sw, bias, m_pad):
        super().__init__(x, a)
        fn, grid, args, constexprs, options, nospec = spec
        self.hit = TL.compiled(fn, args, constexprs, options, nospec)
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.rest = tuple(args[4:])
        self.m_pad, self.w8, self.sw, self.bias = m_pad, w8, sw, bias

    def __call__(self, x: torch.Tensor):
        x2 = self._input(x)
        if x2 is None:
            return None
        from .triton_fp8 import _scaled_mm
        dev = x.device
        codes = torch.empty(self.m_pad, self.k, device=dev, dtype=torch.float8_e4m3fn)
        scale = torch.empty(self.m_pad, device=dev, dtype=torch.float32)
        lo = torch.empty(self.m_pad, device=dev, dtype=torch.float32)
        TL.run(self.hit, self.grid, (x2, codes, scale, lo) + self.rest, self.dev)
        y = _scaled_mm(codes, self.w8, scale, self.sw, self.bias)
        if self.m != self.m_pad:
            y = y[:self.m]
        if y.dtype != self.dtype:
            y = y.to(self.dtype)
        return self._out(y)


_UNBOUND = object()  # kept where binding failed twice for a call form: the ordinary function takes it from then on


def call(x: torch.Tensor, a: QLinearArgs, ordinary):
    """ordinary(x, a), or its bound form kept on the weight's cache entry (`weight_cache._entry`: dropped with the
    weight, re-made when qweight / w_scale change) per input shape, dtype, device and the other tensors' identity.
    Only plain eager calls (no compiler, dispatch mode or tensor subclass watching): the launches are invisible to
    those. A binding that stops holding is made again once after the next ordinary call, then left."""
    if not TL._ENABLED or not plain_eager(x):
        return ordinary(x, a)
    from .weight_cache import _entry
    bh = _entry(a).bh
    key = ("bound", x.shape, x.dtype, x.device, id(a.bias), id(a.lrb_down), id(a.lrb_up), a.w_bits, a.a_bits,
           a.hadamard_block, a.a_sym, a.a_clip, a.splits, a.input_act, a.output_act)
    bound = bh.get(key)
    if bound is _UNBOUND:
        return ordinary(x, a)
    if bound is not None:
        y = bound[0](x)
        if y is not None:
            return y
    y = ordinary(x, a)
    if bound is None or bound[1] == 0:  # first call of this form, or the first time its binding let go
        fresh = bind(x, a)
        bh[key] = _UNBOUND if fresh is None else (fresh, 0 if bound is None else 1)
    else:
        bh[key] = _UNBOUND
    return y


def _is_mma_quant(kernel) -> bool:
    from .triton_mma_quant import stacked_quant_kernel
    return kernel is stacked_quant_kernel


def bind(x: torch.Tensor, a: QLinearArgs):
    """A bound eager call of `triton_fp8.fp8_qlinear(x, a)` for inputs like x, or None where this module does not
    bind that path. Call it after one ordinary call with x (which compiled the kernels and filled the caches)."""
    from . import triton_fp8 as T
    from .quantizer import act_quant_spec
    from .weight_cache import _fp8_weights
    k = a.in_features
    # (x is a CUDA tensor: fp8_qlinear, which the registry picked for it, takes no other)
    if (x.dim() < 2 or not x.is_contiguous() or x.numel() == 0 or x.shape[-1] != k
            or not TL._ENABLED or not TL._TRITON or os.environ.get("ROBUQ_FP8_GEMM") == "triton"
            or a.output_act or a.a_group):  # (their GEMMs are not among the bound forms)
        return None
    m = x.numel() // k
    x2 = x.view(m, k)
    e = _fp8_weights(a)
    if T._small_m_ok(x, a, m):
        if a.input_act:
            return None  # the ordinary call materializes the activation for this kernel
        from . import triton_qgemm_small as S
        args = T._small_m_args(x2, a, e, m, torch.empty(m, a.out_features, device=x.device, dtype=x.dtype))
        if args[5] is not a.bias or args[7] is not a.lrb_down or args[8] is not a.lrb_up:
            return None  # converted copies would go stale unnoticed: leave these to the ordinary call
        call = _SmallM(x, a, S.qgemm_small_launch(*args))
    elif a.a_sym and a.lrb_down is None:
        if fused_quant.takes(x2, a, e):
            return None  # the ordinary call runs the quantize-in-GEMM kernel: not this pair of launches
        m_pad = T.m_store(m)  # as fp8_qlinear's act_quant call: the same launch, other buffers
        codes = torch.empty(m_pad, k, device=x.device, dtype=torch.float8_e4m3fn)
        scale = torch.empty(m_pad, device=x.device, dtype=torch.float32)
        spec = act_quant_spec(x2, codes, scale, torch.empty_like(scale), a.hadamard_block, a.a_bits, True,
                              shift=True, clip=a.a_clip, act=a.input_act)
        if _is_mma_quant(spec[0]):
            return None  # its arguments do not start with x, out, scale, lo (triton_mma_quant.mma_quant_launch)
        bias = None if a.bias is None else a.bias.to(torch.bfloat16)
        if bias is not None and bias is not a.bias:
            return None  # a converted bias would go stale unnoticed
        call = _QuantScaledMM(x, a, spec, e.fp8, e.sw, bias, m_pad)
    else:
        return None
    return call if call.hit is not None else None
