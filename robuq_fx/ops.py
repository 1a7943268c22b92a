"""`robuq::` custom ops of the QAT graph: each a thin wrapper over quantizers.py / hadamard.py with a fake
(meta) implementation and a straight-through-estimator backward.

    robuq::hadamard(x, block)                               x H            grad: g H   (H symmetric orthonormal)
    robuq::fake_quant_weight(w, w_bits, gran, group, sdt)   Q_w(w)         grad: g     (STE)
    robuq::fake_quant_act(x, a_bits, sym, clip, group=0)    Q_a(x)         grad: g * [lo <= x <= hi]
            (group g > 0: one range per token and g consecutive inputs, LayerSpec.a_group)
"""
from __future__ import annotations

import importlib
import os

import torch

from . import hadamard as _had
from . import quantizers as Q


def hadamard_impl(x: torch.Tensor, block: int) -> torch.Tensor:
    """What robuq::hadamard computes (also called directly by the fused eager QAT path, qat_fused.py)."""
    return _had.block_hadamard(x, block).contiguous()


@torch.library.custom_op("robuq::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    return hadamard_impl(x, block)


# Outputs are always contiguous, and the fakes say so: a fake that kept a permuted input's strides (empty_like)
# would disagree with the real kernel, and AOTAutograd / Inductor reject that (e.g. attention q/k/v inputs).
def _contiguous_like(x):
    return x.new_empty(x.shape)


def plain_eager(x: torch.Tensor) -> bool:
    """x is an eager tensor that no compiler, torch.export, functorch transform or TorchDispatchMode is watching:
    there, calling an op's implementation directly computes what calling the op does (the eager fast paths of
    PackedLinear and QATLinear)."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def _compiling() -> None:
    """A fake kernel runs: Dynamo is tracing a model with this op. Let torch.compile decompose our ops into what
    Inductor can fuse and launch (kernels/inductor.py)."""
    from .kernels import inductor
    inductor.register()


@hadamard.register_fake
def _(x, block):
    _compiling()
    return _contiguous_like(x)


def _hadamard_backward(ctx, grad):
    return hadamard(grad, ctx.block), None


def _hadamard_setup(ctx, inputs, output):
    ctx.block = inputs[1]


hadamard.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)


def _register_hadamard_autocast() -> None:
    """x H's matmul is autocast-eligible. Run eagerly, autocast reaches the matmul inside the op and x H comes back in
    autocast's dtype; a compiled graph decomposes the op below the dispatcher's autocast step, so it rotated in fp32
    (fp32 GEMMs: the bf16-autocast DiT QAT step's GEMM time doubled under torch.compile). An autocast kernel for the
    op casts its input as autocast would cast the matmul's (to the current autocast dtype), then runs the op with
    autocast off: eager results unchanged (the same casts), and compiled graphs see the cast."""
    for device_type in ("cpu", "cuda"):
        if not torch.amp.is_autocast_available(device_type):
            continue
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_, x, block, device_type=device_type, keyset=keyset):
            if x.is_floating_point() and x.device.type == device_type and x.dtype is not torch.float64:
                x = x.to(torch.get_autocast_dtype(device_type))
            with torch._C._ExcludeDispatchKeyGuard(keyset):
                return torch.ops.robuq.hadamard.default(x, block)
        _AUTOCAST_LIB.impl("hadamard", kernel, key, with_keyset=True)


_AUTOCAST_LIB = torch.library.Library("robuq", "FRAGMENT")  # kept alive: it holds the registrations
_register_hadamard_autocast()


@torch.library.custom_op("robuq::fake_quant_weight", mutates_args=())
def fake_quant_weight(w: torch.Tensor, w_bits: float, granularity: str, group_size: int,
                      scale_dtype: str) -> torch.Tensor:
    return fake_quant_weight_impl(w, w_bits, granularity, group_size, scale_dtype, w.dtype)


def fake_quant_weight_impl(w: torch.Tensor, w_bits: float, granularity: str, group_size: int, scale_dtype: str,
                           out_dtype: torch.dtype, minus: torch.Tensor | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Q_w(R) in out_dtype, contiguous, R = w (or w - minus in fp32: `layer.wide_difference`): on CUDA one Triton
    kernel (kernels/triton_wquant.py: the same steps, the difference taken in it; codes equal, a ternary scale's
    last bit may differ, its row mean summed in another order), else the torch math. ROBUQ_QAT_WEIGHT_KERNEL=0 turns
    the kernel off. out: where to write it (a slice of a stacked weight, rows contiguous), else a new tensor."""
    if w.is_cuda and _WKERNEL[0]:
        wk = weight_kernel()
        if wk is not None and wk.supported(w, granularity, group_size, scale_dtype, minus) is None:
            return wk.fake_quant_weight_rows(w, w_bits, scale_dtype, out_dtype, minus, out)[0]
    if minus is not None:
        from .layer import wide_difference  # layer imports this module
        w = wide_difference(w, minus)
    wq = Q.fake_quant_weight(w, w_bits, granularity, group_size, scale_dtype).to(out_dtype)
    return wq.contiguous() if out is None else out.copy_(wq)


# on by default since session 23 (R's fp32 difference taken in it: the ATen form moves twice the bytes it used to)
_WKERNEL = [os.environ.get("ROBUQ_QAT_WEIGHT_KERNEL", "1") == "1"]
_KERNEL_MODULES: dict = {}


def _kernel_module(name: str):
    """robuq_fx.kernels.<name>, or None where triton does not import (imported on the first CUDA call, once)."""
    if name not in _KERNEL_MODULES:
        try:
            _KERNEL_MODULES[name] = importlib.import_module(f".kernels.{name}", __package__)
        except Exception:  # noqa: BLE001 - no usable triton: the torch math runs
            _KERNEL_MODULES[name] = None
    return _KERNEL_MODULES[name]


def weight_kernel():
    """kernels/triton_wquant (the QAT weight fake-quant kernel), or None."""
    return _kernel_module("triton_wquant")


@fake_quant_weight.register_fake
def _(w, w_bits, granularity, group_size, scale_dtype):
    _compiling()
    return _contiguous_like(w)


fake_quant_weight.register_autograd(lambda ctx, grad: (grad, None, None, None, None))


def fake_quant_act_impl(x: torch.Tensor, a_bits: int, sym: bool, clip: str, group: int = 0) -> torch.Tensor:
    """What robuq::fake_quant_act computes (also called directly by the fused eager QAT path, qat_fused.py)."""
    # a_bits=16 is the identity: clone, since a custom op's output may not alias its input
    if a_bits >= 16:
        return x.clone().contiguous()
    if group:  # each (token, group) slice a row of its own: the same math, the row kernel included
        return fake_quant_act_impl(Q._act_groups(x, group), a_bits, sym, clip).reshape(x.shape)
    if x.is_cuda and clip == "absmax":
        rows = row_kernel()
        if rows is not None and rows.supported(x, a_bits) is None:
            return rows.fake_quant_rows(x, a_bits, sym)  # one Triton kernel, bit-identical to the torch math
    return Q.fake_quant_act(x, a_bits, sym, clip).contiguous()


@torch.library.custom_op("robuq::fake_quant_act", mutates_args=())
def fake_quant_act(x: torch.Tensor, a_bits: int, sym: bool, clip: str, group: int = 0) -> torch.Tensor:
    return fake_quant_act_impl(x, a_bits, sym, clip, group)


def row_kernel():
    """kernels/triton_rowquant (the per-row activation fake-quant kernel), or None."""
    return _kernel_module("triton_rowquant")


def weight_side_kernel():
    """kernels/triton_wside (the QAT layers' forward weight sides in one grouped kernel), or None."""
    return _kernel_module("triton_wside")


def weight_grad_kernel():
    """kernels/triton_wgrad (the step plan's backward weight sides in one grouped kernel), or None."""
    return _kernel_module("triton_wgrad")


@fake_quant_act.register_fake
def _(x, a_bits, sym, clip, group=0):
    _compiling()
    return _contiguous_like(x)


def _act_setup(ctx, inputs, output):
    x, a_bits, sym, clip, *group = inputs
    ctx.save_for_backward(x if clip != "absmax" else None)  # absmax needs no mask (see _act_backward)
    ctx.args = (a_bits, sym, clip, group[0] if group else 0)


def _act_backward(ctx, grad):
    a_bits, sym, clip, group = ctx.args
    if clip == "absmax":
        # the absmax range [min x, max x] (or [-max|x|, max|x|]) holds every finite x: the mask is all ones
        return grad, None, None, None, None
    (x,) = ctx.saved_tensors
    mask = Q.act_ste_mask(x, a_bits, sym, clip, group)
    return grad * mask.to(grad.dtype), None, None, None, None


fake_quant_act.register_autograd(_act_backward, setup_context=_act_setup)
