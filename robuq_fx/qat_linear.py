"""`QATLinear`: the QAT form of one linear *module* of the user's model (the drop-in path of `robuq_fx.quantize`).

It holds the module's own weight and bias (the same Parameter objects, so ties such as an LM head shared with its
embedding stay tied) plus the trainable low-rank branch, and runs `layer.qat_forward` (METHOD.md §1):

    nn.Linear                 weight (N, K)      y = Q_a(x H) Q_w(R)^T + (x H)(A B)^T + bias,  R = W H - A B
    transformers' Conv1D      weight (K, N)      the same with W = weight^T (GPT-2's projections: x @ W + b)

Casts: weight, bias and branch are master weights and keep their dtype on `.to(torch.bfloat16)` / `.half()`
(device moves apply). The cast dtype becomes `compute_dtype`: inputs of that dtype are computed in it (Q_w(R) from
the fp32 masters, then cast), and `lower()` packs from the masters and casts the result to it, so lowering then
casting and casting then lowering give the same packed model (codes, scales, bias, branch).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import layer
from .ops import plain_eager
from .spec import LayerSpec

_MASTERS = ("weight", "bias", "lrb_down", "lrb_up")
_CAPTURING = [False]


def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, transposed) of a linear module a QATLinear can stand in for: nn.Linear, or a
    Conv1D (transformers' `pytorch_utils.Conv1D`, x @ W + b on a (K, N) weight; matched by class name, like policy
    `type` rules). A subclass with its own forward is not one: swapping it would drop what that forward adds."""
    if isinstance(module, nn.Linear):
        return (module.in_features, module.out_features, False) if type(module).forward is nn.Linear.forward else None
    if is_linear_type(module) and type(module).forward.__qualname__ == "Conv1D.forward":
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and getattr(module, "nf", w.shape[1]) == w.shape[1]:
            return w.shape[0], w.shape[1], True
    return None


def is_linear_type(module: nn.Module) -> bool:
    """An nn.Linear or a Conv1D, own forward or not."""
    return isinstance(module, nn.Linear) or any(c.__name__ == "Conv1D" for c in type(module).__mro__)


@torch.library.custom_op("robuq::leaf_linear", mutates_args=())
def leaf_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """A QATLinear call as one node while torch.export captures a submodule (`capturing()`): the capture turns it
    back into a call of the module (capture.py). Never left in a graph robuq_fx returns."""
    return F.linear(x, weight.t() if transposed else weight, bias)


@leaf_linear.register_fake
def _(x, weight, bias, transposed):
    n = weight.shape[1] if transposed else weight.shape[0]
    return x.new_empty((*x.shape[:-1], n))


@contextlib.contextmanager
def capturing():
    """QATLinear modules show up as `robuq::leaf_linear(x, weight, bias)` nodes (torch.export has no leaf modules)."""
    _CAPTURING[0] = True
    try:
        yield
    finally:
        _CAPTURING[0] = False


def _cast_target(fn, device) -> torch.dtype | None:
    """The floating dtype `fn` (what Module._apply hands down) casts to, or None for a move without a cast: two
    empty probes of different dtypes come back in one dtype only when fn casts."""
    try:
        a = fn(torch.empty(0, dtype=torch.float16, device=device)).dtype
        b = fn(torch.empty(0, dtype=torch.bfloat16, device=device)).dtype
    except Exception:  # noqa: BLE001 - an fn that takes no such tensor does not cast floating tensors either
        return None
    return a if a == b and a.is_floating_point else None


def apply_keeping_dtypes(module: nn.Module, apply, fn, names) -> None:
    """Run `apply(fn)` (the module's own nn.Module._apply) so that the parameters / buffers `names` follow device
    moves but keep their dtype through casts (`.to(torch.bfloat16)`, `.half()`): QATLinear's fp32 masters,
    PackedLinear's codes and scales."""
    before = {}
    for k in names:
        t = module._parameters.get(k) if k in module._parameters else module._buffers.get(k)
        if t is not None:
            before[k] = t.data  # a parameter's .data may be swapped in place by apply
    apply(fn)
    for k, old in before.items():
        if k in module._parameters:
            p = module._parameters[k]
            if p.dtype != old.dtype:
                p.data = old.to(p.device)
                if p.grad is not None:
                    p.grad = p.grad.to(old.dtype)
        elif module._buffers[k].dtype != old.dtype:
            module._buffers[k] = old.to(module._buffers[k].device)


def _fused_ok(x: torch.Tensor, m: "QATLinear") -> bool:
    """The fused eager path runs where it computes what the op graph computes and nothing watches the ops: plain
    eager tensors (no compile, export, functorch transform, tensor subclass or active TorchDispatchMode), floating
    point, and ROBUQ_QAT_FUSED not 0. (The switch is read after the compile check: a trace that read it while it
    was still unset would guard on that and compile the model again at its next call.)"""
    if not plain_eager(x) or not x.is_floating_point():
        return False
    if _FUSED_OFF[0] is None:
        import os
        _FUSED_OFF[0] = os.environ.get("ROBUQ_QAT_FUSED", "1") == "0"
    if _FUSED_OFF[0]:
        return False
    return type(m.weight) is nn.Parameter or type(m.weight) is torch.Tensor


_FUSED_OFF: list = [None]

# ---- the activation side as one triton_op in the per-layer compiled path --------------------------------------
# Where quantize's automatic weight-side hooks do not run (mode="reduce-overhead", fullgraph=True, DDP, the compile
# backend's per-layer form) each layer's compiled graph holds the op graph's activation side: x H (a GEMM), Q_a's
# range and values, t = (x H) B^T and their concatenation. The layers kernels/qat_act.py covers compute it with that
# op instead, as the step path does (`layer.act_op_linear`), under CUDA graph modes by default (session 28: their
# replays launch nothing from Python, and the op's one kernel replaces the rotation GEMM's round trip through memory;
# H200, the paper policy at DiT-XL/2 batch 16: 1.488x the FP step with it, 1.520x and 1.528x without in two earlier
# calls, FP within 1% across the three) and anywhere with ROBUQ_QAT_ACT_KERNEL=1; ROBUQ_QAT_ACT_KERNEL=0 keeps the
# op graph everywhere. In default-mode compiles the op's launches go through Triton's launcher (~19 us each).
_ACT_SPECS: list = []  # (spec, in_features) of the layers, by the key `_act_key` gives them
_ACT_KEYS: dict = {}


def _act_key(spec: LayerSpec, k: int) -> int:
    key = (spec, k)
    if key not in _ACT_KEYS:
        _ACT_KEYS[key] = len(_ACT_SPECS)
        _ACT_SPECS.append(key)
    return _ACT_KEYS[key]


@torch._dynamo.assume_constant_result
def _act_supported(key: int, device: str, dtype: torch.dtype) -> bool:
    """Whether a layer (`_act_key`) takes the activation op on this device type and matmul dtype: in force
    (ROBUQ_QAT_ACT_KERNEL=1, or unset under a CUDA-graph compile) and covered (`qat_act.unsupported`). Called while
    Dynamo traces (its result a constant of the trace, from constant arguments); defines the op where it answers
    yes. Uncovered layers are named in a warning only where the switch is 1 explicitly."""
    from .kernels import qat_act
    from .qat_step_hooks import tracing_for_cudagraphs
    explicit = qat_act.requested()
    if not explicit and not (qat_act.enabled() and tracing_for_cudagraphs()):
        return False
    spec, k = _ACT_SPECS[key]
    why = qat_act.unsupported(spec, k, torch.device(device), dtype)
    if why is not None:
        if explicit and (why, spec.short(), k) not in _ACT_WARNED:  # one warning a reason and kind of layer
            _ACT_WARNED.add((why, spec.short(), k))
            warnings.warn(f"ROBUQ_QAT_ACT_KERNEL=1: compiled QAT layers {spec.short()} with in_features={k} keep "
                          f"the op graph's activation side ({why})", RuntimeWarning, stacklevel=2)
        return False
    qat_act.define()
    return True


_ACT_WARNED: set = set()


def _define_act_op() -> None:
    """Where the op may be used (not switched off), define it now, before torch.compile traces a layer
    (`_act_supported` would otherwise define it during a trace)."""
    from .kernels import qat_act
    if qat_act.enabled():
        try:
            qat_act.define()
        except ImportError:  # no triton: `_act_supported` says no
            pass


def _matmul_dtype(m: "QATLinear", x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else (m.compute_dtype or x.dtype)


class QATLinear(nn.Module):
    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, spec: LayerSpec, transposed: bool = False,
                 lrb: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.transposed = transposed
        k, n = weight.shape if transposed else weight.shape[::-1]
        self.in_features, self.out_features, self.spec = k, n, spec
        self.weight = weight
        self.register_parameter("bias", bias)
        if spec.lora_rank:
            down, up = lrb if lrb is not None else (weight.new_zeros(spec.lora_rank, k), weight.new_zeros(n, spec.lora_rank))
            self.lrb_down = nn.Parameter(down, requires_grad=weight.requires_grad)
            self.lrb_up = nn.Parameter(up, requires_grad=weight.requires_grad)
        else:
            self.lrb_down = self.lrb_up = None
        self.compute_dtype: torch.dtype | None = None
        # (stacked [Q_w(R), A_c], B_c (B H with the activation op), bias_c, whether the activation side is that op)
        # while a model forward under `weight_sides_per_forward` runs (qat_step.py)
        self._prepared: tuple | None = None
        self._act = _act_key(spec, k)  # (`_act_supported`)
        if torch.cuda.is_available():
            _define_act_op()

    @classmethod
    def from_module(cls, module: nn.Module, spec: LayerSpec, init_lrb: bool = True) -> "QATLinear":
        """The QAT layer of an nn.Linear / Conv1D (`spec` already resolved); init_lrb: branch from the SVD of W H."""
        _, _, transposed = linear_dims(module)
        m = cls(module.weight, module.bias, spec, transposed)
        if spec.lora_rank and init_lrb:
            down, up = layer.lrb_init(m.weight_nk(), spec)
            with torch.no_grad():
                m.lrb_down.copy_(down)
                m.lrb_up.copy_(up)
        return m

    def weight_nk(self) -> torch.Tensor:
        """The weight as (out_features, in_features)."""
        return self.weight.t() if self.transposed else self.weight

    def forward(self, x):
        if _CAPTURING[0]:
            return leaf_linear(x, self.weight, self.bias, self.transposed)
        prepared = getattr(self, "_prepared", None)
        if prepared is not None:  # the weight side computed for the whole model (qat_step.py)
            return layer.prepared_linear(x, *prepared, self.spec)
        w = self.weight_nk()
        act = self.__dict__.get("_act")  # (None: a layer pickled before it existed keeps the op graph)
        if act is not None and torch.compiler.is_compiling() and x.is_floating_point():
            c = _matmul_dtype(self, x)
            if _act_supported(act, x.device.type, c):
                return layer.act_op_linear(x, w, self.bias, self.lrb_down, self.lrb_up, self.spec, c)
        if _fused_ok(x, self):  # eager: one autograd node (qat_fused.py); compile / export: the op graph below
            from .qat_fused import qat_linear
            return qat_linear(x, w, self.bias, self.lrb_down, self.lrb_up, self.spec)
        if x.dtype == w.dtype:
            return layer.qat_forward(x, w, self.bias, self.lrb_down, self.lrb_up, self.spec)
        # a cast model: Q_w(R) from the masters (the values lower() packs), everything else in the input's dtype
        wq = layer.qat_weight(w, self.lrb_down, self.lrb_up, self.spec).to(x.dtype)
        cast = [None if t is None else t.to(x.dtype) for t in (self.bias, self.lrb_down, self.lrb_up)]
        return layer.robuq_linear(x, wq, *cast, self.spec)

    def _apply(self, fn, recurse=True):
        # master weights keep their dtype (device moves apply); a cast sets compute_dtype instead (module docstring)
        cast = _cast_target(fn, self.weight.device)
        apply_keeping_dtypes(self, lambda f: super(QATLinear, self)._apply(f, recurse), fn, _MASTERS)
        if cast is not None:
            self.compute_dtype = None if cast == self.weight.dtype else cast
        return self

    def extra_repr(self):
        kind = ", Conv1D weight (in, out)" if self.transposed else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.short()}{kind}"
