"""`PackedLinear`: the inference form of one RobuQ layer. Holds the packed residual codes, their scales, the bias and
the full-precision low-rank branch; its forward (and the lowered graph) is one `robuq::qlinear` call.

Weight layouts of the `qweight` buffer (one copy of the weight, whichever it is):
    packed  uint8, flat (robuq_fx.packing): ternary 5 codes a byte, 2-bit 4, 3-bit 8 in 3 bytes, 4-bit 2, int8
    fp8     float8_e4m3fn (N, K) holding the integer codes (|q| <= 15 is exact in e4m3): what Hopper/Ada fp8 tensor
            cores read directly, so the GPU kernels keep no second copy. Used on CUDA devices with fp8 tensor cores
            (capability >= 8.9) for codes of at most 4 bits: `lower()`, `.to(device)` and `load_state_dict` switch
            to it there (ROBUQ_WEIGHT_LAYOUT=packed keeps the packed bytes).
`state_dict()` always holds the packed bytes, so checkpoints do not depend on the device. Moves and casts
(`.to(torch.bfloat16)`, `.half()`) never change qweight's or w_scale's dtype: only the bias and the low-rank branch
follow the model's dtype.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn

from . import kernels  # also registers torch.ops.robuq.qlinear
from .kernels.qlinear import call_kernel, colsum_or_none
from .kernels.weight_cache import down_dtype
from . import layer, packing
from . import quantizers as Q
from .ops import plain_eager
from .qat_linear import apply_keeping_dtypes
from .spec import LayerSpec


FP8 = packing.FP8
_DIRECT = [None]  # ROBUQ_DIRECT_CALL=0 sends every eager call through the op


def _direct_ok(x: torch.Tensor) -> bool:
    """A plain eager inference call, which no compiler, dispatch mode or autograd needs to see as the op. (The
    switch is read after the compile check: a trace that read it while still unset would guard on that and compile
    the model again at its next call.)"""
    if (x.requires_grad and torch.is_grad_enabled()) or not plain_eager(x):
        return False
    if _DIRECT[0] is None:
        _DIRECT[0] = os.environ.get("ROBUQ_DIRECT_CALL", "1") != "0"
    return _DIRECT[0]


def fp8_layout_ok(device: torch.device, w_bits) -> bool:
    """fp8 codes on this device: CUDA with fp8 tensor cores (capability >= 8.9), codes of at most 4 bits."""
    if FP8 is None or device.type != "cuda" or float(w_bits) > 4 or os.environ.get("ROBUQ_WEIGHT_LAYOUT") == "packed":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def use_device_layout(model: nn.Module) -> nn.Module:
    """Every PackedLinear of `model` in the layout its device's kernels read best (in place)."""
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.use_device_layout()
    return model


def _bound_call(fn, x, qa):
    """fn's bound form for calls like fn(x, qa) (`fn.bind`: kernels/fastcall.py), or None where it offers none; made
    after an ordinary call, when its kernels are compiled and its caches full."""
    bind = getattr(fn, "bind", None)
    return bind(x, qa) if bind is not None else None


class PackedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: LayerSpec, has_bias: bool,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        n, k = out_features, in_features
        if spec.w_granularity == "tensor":
            g_shape = (1, 1)
        else:
            g_shape = (n, k // spec.group_size if spec.group_size else 1)
        sdt = getattr(torch, spec.scale_dtype)
        self.register_buffer("qweight", torch.zeros(packing.packed_numel(n * k, spec.w_bits), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("w_scale", torch.zeros(g_shape, dtype=sdt, device=device))
        self.register_buffer("bias", torch.zeros(n, dtype=dtype, device=device) if has_bias else None)
        r = spec.lora_rank
        self.register_buffer("lrb_down", torch.zeros(r, k, dtype=dtype, device=device) if r else None)
        self.register_buffer("lrb_up", torch.zeros(n, r, dtype=dtype, device=device) if r else None)
        # B H, kept beside B so that no GPU call, eager or compiled, rotates B again; derived state, not in the
        # checkpoint, remade by every method here that changes B (`_refresh_rotated_down`)
        self.register_buffer("lrb_down_h", torch.zeros(r, k, dtype=down_dtype(self.lrb_down), device=device)
                             if r and spec.hadamard else None, persistent=False)  # (B = 0 so far)
        # the asymmetric layers' column sums c = sum_k s_w q_w (fp32, N), for the same reason (robuq::qlinear's
        # w_colsum: a compiled graph would otherwise sum the codes every forward); derived, remade with the weight
        self.register_buffer("w_colsum", torch.zeros(n, dtype=torch.float32, device=device)
                             if not spec.sym else None, persistent=False)

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, bias, lrb_down, lrb_up, spec: LayerSpec) -> "PackedLinear":
        """Quantize R = W H - A B once (the same code path as QAT's fake-quant) and pack it."""
        n, k = weight.shape
        m = cls(k, n, spec, bias is not None, weight.dtype, weight.device)
        r = layer.residual(weight.detach(), None if lrb_down is None else lrb_down.detach(),
                           None if lrb_up is None else lrb_up.detach(), spec)
        codes, scale = Q.quantize_weight(r, spec.w_bits, spec.w_granularity, spec.group_size, spec.scale_dtype)
        m.qweight.copy_(packing.pack(codes, spec.w_bits))
        m.w_scale.copy_(scale)
        if bias is not None:
            m.bias.copy_(bias.detach())
        if lrb_down is not None:
            m.lrb_down.copy_(lrb_down.detach())
            m.lrb_up.copy_(lrb_up.detach())
        m._refresh_derived()
        return m

    def op_args(self) -> tuple:
        """The scalar arguments of robuq::qlinear after the tensors (cached per spec object: specs are frozen)."""
        c = self.__dict__.get("_op_args")
        s = self.spec
        if c is None or c[0] is not s:
            c = self.__dict__["_op_args"] = (s, (self.out_features, self.in_features, float(s.w_bits), s.a_bits,
                                                 s.hadamard_block or 0, bool(s.sym), s.a_clip))
        return c[1]

    # an activation the layer reads its input through ("gelu", "gelu_tanh"; robuq::qlinear's input_act), set by
    # robuq_fx.fuse_activations where it removed that activation from the model; not part of the checkpoint
    input_act: str = ""
    # an activation applied to the layer's output (robuq::qlinear's output_act), set by
    # robuq_fx.fuse_activations(model, into="producer") where it removed the activation after this layer
    output_act: str = ""

    def forward(self, x):
        if _direct_ok(x):
            return self._direct(x)
        if (self.input_act or self.output_act or self.lrb_down_h is not None or self.w_colsum is not None
                or self.spec.a_group):
            return torch.ops.robuq.qlinear(x, self.qweight, self.w_scale, self.bias, self.lrb_down, self.lrb_up,
                                           *self.op_args(), input_act=self.input_act, lrb_down_h=self.lrb_down_h,
                                           output_act=self.output_act, w_colsum=self.w_colsum,
                                           a_group=self.spec.a_group)
        return torch.ops.robuq.qlinear(x, self.qweight, self.w_scale, self.bias, self.lrb_down, self.lrb_up,
                                       *self.op_args())

    def __getstate__(self):
        """Pickled / deep-copied without the eager call plans (they hold compiled kernels and are rebuilt)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.pop("_direct_plans", None)
        return state

    def __setstate__(self, state):
        """Modules pickled before lrb_down_h / w_colsum existed get them (None, not in the checkpoint) on unpickling."""
        super().__setstate__(state)
        for name in ("lrb_down_h", "w_colsum"):
            if name not in self._buffers:
                self._buffers[name] = None
                self._non_persistent_buffers_set.add(name)

    def _direct(self, x):
        """Eager inference: the kernel `robuq::qlinear` would pick, called without the dispatcher, the argument
        record and the registry's choice rebuilt on every call (together ~15-20 us of Python a call at M = 16); the
        choice is kept per input shape, dtype and device, buffers and registry state (`registry.state_key`), with
        the kernel's bound call where it offers one (`fn.bind`: kernels/fastcall.py, the fp8 path)."""
        b = self._buffers
        qw, ws, bias, dn, up, dh = b["qweight"], b["w_scale"], b["bias"], b["lrb_down"], b["lrb_up"], b["lrb_down_h"]
        cs = b.get("w_colsum")
        key = (x.shape, x.dtype, x.device, id(qw), id(ws), id(bias), id(dn), id(up), id(dh), id(cs), self.input_act,
               self.output_act, kernels.registry.state_key())
        plans = self.__dict__.get("_direct_plans")
        if plans is None:
            plans = self.__dict__["_direct_plans"] = {}
        plan = plans.get(key)
        if plan is not None:
            if plan[2] is not None:  # a bound call (kernels/fastcall.py): None when it no longer holds
                y = plan[2](x)
                if y is not None:
                    return y
                # it let go (a buffer updated in place, a dispatch variable changed): the ordinary call, then one
                # new binding for the state now (fastcall.call's rule), none after a second let-go
                y = plan[0](x, plan[1])
                plans[key] = (plan[0], plan[1], _bound_call(plan[0], x, plan[1]) if plan[3] == 0 else None,
                              plan[3] + 1)
                return y
            return plan[0](x, plan[1])
        args = self.op_args()
        if x.shape[-1] != self.in_features:  # the op's own error
            return torch.ops.robuq.qlinear(x, qw, ws, bias, dn, up, *args)
        qa = kernels.QLinearArgs(qw, ws, bias, dn, up, *args[:7], tuple(args[7]) if len(args) > 7 and args[7]
                                 else None, self.input_act, dh, self.output_act,
                                 colsum_or_none(cs, qw, self.out_features), self.spec.a_group)
        fn = kernels.select(x, qa).fn
        if (qa.input_act and not getattr(fn, "fuses_input_act", False)
                or qa.output_act and not getattr(fn, "fuses_output_act", False)):
            fn = functools.partial(call_kernel, fn)  # the activations around it, as the op runs them
        y = fn(x, qa)
        if len(plans) >= 8:  # a few input shapes are kept (e.g. two batch sizes in turn), not every one seen
            plans.clear()
        plans[key] = (fn, qa, _bound_call(fn, x, qa), 0)  # (.., times its binding let go)
        return y

    def weight_codes(self) -> torch.Tensor:
        return packing.codes_of(self.qweight, self.spec.w_bits, (self.out_features, self.in_features))

    # ---- weight layout (see the module docstring) -------------------------------------------------------------
    @property
    def layout(self) -> str:
        return "fp8" if self.qweight.dtype == FP8 else "packed"

    @torch.no_grad()
    def set_layout(self, layout: str) -> "PackedLinear":
        """Store qweight as "packed" bytes or as "fp8" codes (N, K); the codes are unchanged."""
        if layout == self.layout:
            return self
        codes = self.weight_codes()
        w = packing.to_fp8_codes(codes) if layout == "fp8" else packing.pack(codes, self.spec.w_bits)
        self._buffers["qweight"] = w.contiguous()
        self.__dict__.pop("_op_args", None)
        self._prepare_device()
        return self

    def _prepare_device(self) -> None:
        """What the GPU kernels read beside the codes, made now, before torch.compile sees the layer: B H
        (`_refresh_rotated_down`) and the stacked LRB mode's extended weight (fp8 layout on a GPU, where the dispatch
        may pick the mode: kernels/lrb_stacked.py)."""
        self._refresh_derived()
        if self.layout == "fp8" and self.lrb_down is not None and self.qweight.is_cuda:
            from .kernels.lrb_stacked import prepare
            prepare(self)

    def _refresh_derived(self) -> None:
        """The buffers derived from the weight and the branch: B H and the column sums."""
        self._refresh_rotated_down()
        self._refresh_colsum()

    @torch.no_grad()
    def _refresh_colsum(self) -> None:
        """w_colsum = c = sum_k s_w q_w (`quantizers.weight_code_colsum`, as the eager kernels' cache makes it) for
        asymmetric layers, None for symmetric ones (no offset term)."""
        self._buffers["w_colsum"] = (Q.weight_code_colsum(self.weight_codes(), self.w_scale).contiguous()
                                     if not self.spec.sym else None)

    @torch.no_grad()
    def _refresh_rotated_down(self) -> None:
        """lrb_down_h = B H (in `weight_cache.down_dtype`, as the stacked mode's extension is made) wherever the
        branch is rotated, on every device (r x K: ~1% of the layer's bytes; the CPU kernels do not read it, but a
        graph built on the CPU reads the buffer that a later move to the GPU remakes: passes/fuse.py `qlinear_node`);
        None without a rotated branch. The same product `weight_cache.rotated_down` makes, so outputs do not change;
        it only stops every GPU call (and every compiled forward) from making it."""
        dn = self.lrb_down
        h = None
        if dn is not None and self.spec.hadamard:
            from .kernels.weight_cache import rotated_down
            h = rotated_down(kernels.QLinearArgs(self.qweight, self.w_scale, self.bias, dn, self.lrb_up,
                                                 *self.op_args()[:7]), down_dtype(dn))
        self._buffers["lrb_down_h"] = h

    def use_device_layout(self) -> "PackedLinear":
        """The layout the kernels of qweight's device read best: fp8 where fp8 tensor cores take the codes."""
        layout = "fp8" if fp8_layout_ok(self.qweight.device, self.spec.w_bits) else "packed"
        if layout == self.layout:  # (a device move of an extended weight made it contiguous again)
            self._prepare_device()
        return self.set_layout(layout)

    def _apply(self, fn, recurse=True):
        # qweight holds codes and w_scale their scales in a chosen precision: device moves apply, casts do not
        before = self.qweight.device
        apply_keeping_dtypes(self, lambda f: super(PackedLinear, self)._apply(f, recurse), fn,
                             ("qweight", "w_scale", "w_colsum"))
        if self.qweight.device != before:
            self.use_device_layout()
        elif self.lrb_down_h is not None:  # a cast: B H again from the cast B, not the cast of the old product
            self._refresh_rotated_down()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == "fp8":
            destination[prefix + "qweight"] = packing.pack(self.weight_codes(), self.spec.w_bits)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "qweight"
        t = state_dict.get(key)
        if not self.qweight.is_contiguous():  # the stacked LRB mode's extended rows (kernels/lrb_stacked.py): drop
            self._buffers["qweight"] = self.qweight.contiguous()  # them; re-extended below from what loads
        if self.layout == "fp8" and isinstance(t, torch.Tensor) and t.dtype == torch.uint8:
            self.set_layout("packed")
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            self.set_layout("fp8")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._prepare_device()

    def packed_bytes(self) -> int:
        """Bytes of the module's buffers as they sit in memory now (fp8 layout: one byte a weight)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self):
        act = f", input_act={self.input_act}" if self.input_act else ""
        act += f", output_act={self.output_act}" if self.output_act else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.short()}{act}"
