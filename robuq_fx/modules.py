"""`PackedLinear`: the inference form of one RobuQ layer. Holds the packed residual codes, their scales, the bias and
the full-precision low-rank branch; its forward (and the lowered graph) is one `robuq::qlinear` call."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import kernels  # noqa: F401  (registers torch.ops.robuq.qlinear)
from . import layer, packing
from . import quantizers as Q
from .spec import LayerSpec


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
        return m

    def op_args(self) -> tuple:
        """The scalar arguments of robuq::qlinear after the tensors (cached per spec object: specs are frozen)."""
        c = self.__dict__.get("_op_args")
        s = self.spec
        if c is None or c[0] is not s:
            c = self.__dict__["_op_args"] = (s, (self.out_features, self.in_features, float(s.w_bits), s.a_bits,
                                                 s.hadamard_block or 0, bool(s.sym), s.a_clip))
        return c[1]

    def forward(self, x):
        return torch.ops.robuq.qlinear(x, self.qweight, self.w_scale, self.bias, self.lrb_down, self.lrb_up,
                                       *self.op_args())

    def weight_codes(self) -> torch.Tensor:
        return packing.unpack(self.qweight, self.spec.w_bits, (self.out_features, self.in_features))

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.short()}"
