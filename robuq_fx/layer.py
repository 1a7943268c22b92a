"""What one RobuQ linear layer computes (METHOD.md §1), written once as plain functions:

    W_H = W H                  R = W_H - A B                 (A = lrb_up (N, r), B = lrb_down (r, K))
    y   = Q_a(x H) Q_w(R)^T + (x H) B^T A^T + bias  =  [Q_a(x H), t] [Q_w(R), A]^T + bias,   t = (x H) B^T

The branch's up-projection runs stacked into the main product (one GEMM on K + r columns, summed in the
accumulator): in a training step that is one GEMM forward and two backward fewer a layer than adding t A^T as
its own product, and no (M, N) intermediate.

`qat_weight` + `robuq_linear` are what the QAT pass inlines into the model graph (it FX-traces them, so the graph
shows the robuq ops), what the seed API's `RobuQLinear` runs eagerly, and what the reference kernel runs with
Q_w(R) taken from the packed codes instead: bit-identical by construction.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from . import ops  # also registers torch.ops.robuq.*
from . import quantizers as Q
from .spec import LayerSpec

_ops = torch.ops.robuq


def rotate(x: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    return _ops.hadamard.default(x, spec.hadamard_block) if spec.hadamard else x


def rotate_eager(x: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """`rotate` without going through the op (its implementation, called directly: qat_fused.py)."""
    return ops.hadamard_impl(x, spec.hadamard_block) if spec.hadamard else x


def residual(weight, lrb_down, lrb_up, spec: LayerSpec, rotate_fn=rotate):
    """R = W H - A B: the only part of the weight that is quantized (with a branch, in fp32: `wide_difference`)."""
    w, ab = residual_parts(weight, lrb_down, lrb_up, spec, rotate_fn)
    return w if ab is None else wide_difference(w, ab)


def residual_parts(weight, lrb_down, lrb_up, spec: LayerSpec, rotate_fn=rotate):
    """(W H, A B or None): R's two terms, each in the dtype its matmul gives (16-bit under autocast)."""
    w = rotate_fn(weight, spec)
    return w, None if lrb_down is None else torch.mm(lrb_up, lrb_down)


@torch.fx.wrap  # a leaf in the traced QAT graph (its dtypes are known only when it runs)
def wide_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - b in fp32 (or wider). Under autocast W H and A B are bf16: their difference rounded to bf16 eagerly is
    one that Inductor keeps in fp32 inside its fused kernel, which moved ~2% of the ternary codes' rounding inputs
    and made compiled and eager QAT differ (session 23); in fp32 both compute the same R, as the lowered model does
    from its fp32 masters. The quantizer computes in fp32 too (`quantizers.quantize_weight`)."""
    wide = Q._wide(torch.promote_types(a.dtype, b.dtype))
    return a.to(wide) - b.to(wide)


def qat_weight(weight, lrb_down, lrb_up, spec: LayerSpec):
    """Q_w(R) with the STE: what the matmul sees during QAT."""
    r = residual(weight, lrb_down, lrb_up, spec)
    return _ops.fake_quant_weight.default(r, float(spec.w_bits), spec.w_granularity, spec.group_size,
                                          spec.scale_dtype)


def fake_quant_act(xh, spec: LayerSpec):
    """robuq::fake_quant_act of the rotated input with the layer's activation spec (its group as a keyword, only
    where set: graphs of per-token layers keep the four arguments AMPN's sites read)."""
    if spec.a_group:
        return _ops.fake_quant_act.default(xh, spec.a_bits, spec.sym, spec.a_clip, group=spec.a_group)
    return _ops.fake_quant_act.default(xh, spec.a_bits, spec.sym, spec.a_clip)


def rotate_and_quantize(x, spec: LayerSpec) -> tuple:
    """(x H, Q_a(x H)) through the ops (Q_a the identity at 16 bits)."""
    xh = rotate(x, spec)
    return xh, fake_quant_act(xh, spec) if spec.a_bits < 16 else xh


def robuq_linear(x, wq, bias, lrb_down, lrb_up, spec: LayerSpec, splits=None):
    """y = Q_a(x H) wq^T + bias + (x H) (A B)^T, with wq = Q_w(R) already computed.

    splits (a fused layer, passes/fuse.py): the out_features of its members; x is rotated and quantized once, then
    each member's rows run as their own products (lrb_down stacks the members' B, lrb_up is block-diagonal), so the
    result is bit-identical to the members run one by one."""
    xh, xq = rotate_and_quantize(x, spec)
    if splits:
        return _per_member(xq, xh, wq, bias, lrb_down, lrb_up, splits)
    if lrb_down is None:
        return F.linear(xq, wq, bias)
    return stacked_linear(xq, F.linear(xh, lrb_down), wq, lrb_up, bias)


def stacked_linear(xq, t, wq, lrb_up, bias):
    """[xq, t] [wq, A]^T + bias: the quantized product and the branch's up-projection as one GEMM (A in wq's dtype,
    so that the stacked weight is built in the matmul dtype)."""
    return F.linear(torch.cat([xq, t], -1), torch.cat([wq, lrb_up.to(wq.dtype)], 1), bias)


def prepared_linear(x, w_stacked, lrb_down_c, bias_c, act_op: bool, spec: LayerSpec):
    """`robuq_linear` with the weight side already computed (qat_step.py): w_stacked = [Q_w(R), A_c] (just Q_w(R)
    without a branch), lrb_down_c = B, bias_c = bias, all in the matmul dtype; x H and Q_a(x H) go to it first.
    act_op: the activation side is one triton_op (kernels/qat_act.py), and lrb_down_c holds B H."""
    if act_op:
        from .kernels.qat_act import act_side
        x2 = x.reshape(-1, x.shape[-1]).to(w_stacked.dtype).contiguous()
        y = F.linear(act_side(x2, None if lrb_down_c is None else lrb_down_c.contiguous(), spec), w_stacked, bias_c)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    xh, xq = rotate_and_quantize(x, spec)
    if not torch.is_autocast_enabled(x.device.type):
        xh, xq = xh.to(w_stacked.dtype), xq.to(w_stacked.dtype)
    if lrb_down_c is None:
        return F.linear(xq, w_stacked, bias_c)
    return F.linear(torch.cat([xq, F.linear(xh, lrb_down_c)], -1), w_stacked, bias_c)


def act_op_linear(x, weight, bias, lrb_down, lrb_up, spec: LayerSpec, c: torch.dtype):
    """`qat_forward` with the activation side as kernels/qat_act.py's op (a compiled layer under CUDA graphs or with
    ROBUQ_QAT_ACT_KERNEL=1, qat_linear._act_supported): the weight side as the op graph computes it (Q_w(R) from the
    masters, A and B cast to the matmul dtype c, B H for the op), then `prepared_linear` as the step path runs it."""
    from .kernels.qat_act import through_h
    wq = qat_weight(weight, lrb_down, lrb_up, spec).to(c)
    bias_c = None if bias is None else bias.to(c)
    if lrb_down is None:
        return prepared_linear(x, wq, None, bias_c, True, spec)
    return prepared_linear(x, torch.cat([wq, lrb_up.to(c)], 1), through_h(lrb_down.to(c), spec), bias_c, True, spec)


def _per_member(xq, xh, wq, bias, lrb_down, lrb_up, splits):
    ys, o = [], 0
    r = 0 if lrb_down is None else lrb_down.shape[0] // len(splits)
    for i, n in enumerate(splits):
        b = None if bias is None else bias[o:o + n]
        if lrb_down is None:
            ys.append(F.linear(xq, wq[o:o + n], b))
        else:
            t = F.linear(xh, lrb_down[i * r:(i + 1) * r])
            ys.append(stacked_linear(xq, t, wq[o:o + n], lrb_up[o:o + n, i * r:(i + 1) * r], b))
        o += n
    return torch.cat(ys, dim=-1)


def qat_forward(x, weight, bias, lrb_down, lrb_up, spec: LayerSpec):
    return robuq_linear(x, qat_weight(weight, lrb_down, lrb_up, spec), bias, lrb_down, lrb_up, spec)


def trace_qat_forward(spec: LayerSpec, has_bias: bool, has_lrb: bool) -> torch.fx.Graph:
    """`qat_forward` for one spec as an FX graph with placeholders x, weight[, bias][, lrb_down, lrb_up]."""
    def fn(x, weight, bias, lrb_down, lrb_up):
        return qat_forward(x, weight, bias, lrb_down, lrb_up, spec)

    concrete = {}
    if not has_bias:
        concrete["bias"] = None
    if not has_lrb:
        concrete["lrb_down"] = None
        concrete["lrb_up"] = None
    return torch.fx.symbolic_trace(fn, concrete_args=concrete).graph


@torch.no_grad()
def lrb_init(weight: torch.Tensor, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r SVD of W H: A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T (METHOD.md §1). Deterministic."""
    r = spec.lora_rank
    w = rotate(weight.detach().float(), spec)
    n, k = w.shape
    if min(n, k) > 1024:
        # A full SVD of a 4608x1152 matrix takes ~1 s on 2 cores; 112 of them in DiT-XL/2 would blow the
        # 30 s quantize budget. Randomised SVD with a fixed seed and 4 power iterations is accurate for the top 32.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(w, q=min(r + 16, min(n, k)), niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:r].sqrt()
    up = (u[:, :r] * root).to(weight.dtype)
    down = (root[:, None] * vh[:r]).to(weight.dtype)
    return down.contiguous(), up.contiguous()
