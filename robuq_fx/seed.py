"""Seed-compatible API (same names and arguments as the RobuQ reference code):

    from robuq_fx.quant.replace import replace_linear_layer
    model.fc1 = replace_linear_layer(model.fc1, nbits=3, w_bits=1.58, if_hadamard=True, if_lora=True)
    ... QAT ...
    for m in model.modules():
        if isinstance(m, RobuQLinear): m.prepare_for_inference()

`nbits` = activation bits, `w_bits` = weight bits (1.58 = ternary), `if_lora` = the full-precision low-rank branch
of METHOD.md §1 (rank 32). The math is `layer.qat_forward` and, after `prepare_for_inference()`, a `PackedLinear`:
the same code the FX passes use.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import layer
from .errors import CheckpointError
from .modules import PackedLinear
from .spec import DEFAULT_LRB_RANK, LayerSpec


class RobuQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, nbits: int = 4, w_bits=4,
                 if_hadamard: bool = False, if_lora: bool = False, lora_rank: int = DEFAULT_LRB_RANK, **spec_kw):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # A rank-min(K, N) branch would hold the whole weight and leave nothing quantized: cap at half of it.
        rank = max(1, min(lora_rank, min(in_features, out_features) // 2)) if if_lora else 0
        self.spec = LayerSpec(w_bits=w_bits, a_bits=nbits, hadamard=if_hadamard, lora_rank=rank,
                              **spec_kw).resolve(in_features, out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        if rank:
            self.lrb_down = nn.Parameter(torch.zeros(rank, in_features))
            self.lrb_up = nn.Parameter(torch.zeros(out_features, rank))
        else:
            self.lrb_down = self.lrb_up = None
        self.packed: PackedLinear | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, nbits: int = 4, w_bits=4, if_hadamard: bool = False,
                    if_lora: bool = False, **kw) -> "RobuQLinear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, nbits, w_bits, if_hadamard,
                if_lora, **kw).to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(linear.weight)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
            if m.lrb_down is not None:
                down, up = layer.lrb_init(m.weight, m.spec)
                m.lrb_down.copy_(down)
                m.lrb_up.copy_(up)
        return m

    def forward(self, x):
        if self.packed is not None:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError("RobuQLinear was prepared for inference (FP weights dropped); it cannot train. "
                                   "Call .eval() (and use torch.no_grad()) for packed inference.")
            return self.packed(x)
        return layer.qat_forward(x, self.weight, self.bias, self.lrb_down, self.lrb_up, self.spec)

    @torch.no_grad()
    def prepare_for_inference(self) -> "RobuQLinear":
        """Quantize and pack the residual weight once, keep the low-rank branch in FP, drop the FP weight.
        Idempotent: a second call does nothing."""
        if self.packed is not None:
            return self
        self.packed = PackedLinear.from_float(self.weight, self.bias, self.lrb_down, self.lrb_up, self.spec)
        del self.weight, self.bias, self.lrb_down, self.lrb_up
        self.weight = self.bias = self.lrb_down = self.lrb_up = None
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A packed checkpoint holds packed.* tensors instead of weight/bias: pack first so its keys line up.
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict) and extra.get("packed") and self.packed is None:
            if extra.get("spec") == self.spec.to_dict():
                self.prepare_for_inference()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self):
        return {"spec": self.spec.to_dict(), "packed": self.packed is not None}

    def set_extra_state(self, state):
        if state["spec"] != self.spec.to_dict():
            raise CheckpointError(
                f"RobuQLinear({self.in_features}->{self.out_features}): checkpoint spec {LayerSpec(**state['spec']).short()}"
                f" does not match this layer's {self.spec.short()}; rebuild with the arguments used for training")
        if state["packed"] and self.packed is None:
            self.prepare_for_inference()

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.short()}, "
                f"packed={self.packed is not None}")


def replace_linear_layer(module: nn.Module, nbits: int = 4, w_bits=4, if_hadamard: bool = False,
                         if_lora: bool = False, **kw):
    """nn.Linear -> RobuQLinear (a copy of its weights). Given any other module, replaces every nn.Linear inside
    it in place and returns it."""
    if isinstance(module, nn.Linear):
        return RobuQLinear.from_linear(module, nbits, w_bits, if_hadamard, if_lora, **kw)
    if isinstance(module, RobuQLinear):
        raise TypeError("replace_linear_layer got a RobuQLinear: it is already replaced")
    targets = [(n, c) for n, c in module.named_modules() if isinstance(c, nn.Linear)]
    if not targets:
        raise TypeError(f"replace_linear_layer expects an nn.Linear (or a module containing some), "
                        f"got {type(module).__name__} with none")
    new = {n: RobuQLinear.from_linear(c, nbits, w_bits, if_hadamard, if_lora, **kw) for n, c in targets}
    for n, m in new.items():  # all built first: a bad argument leaves `module` untouched
        parent, _, leaf = n.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, m)
    return module
