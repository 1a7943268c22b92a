"""A compiled QAT layer's activation side in one `triton_op` (issue 19; for the layers of
`robuq_fx.weight_sides_per_forward` on CUDA; on by default since session 22, ROBUQ_QAT_ACT_KERNEL=0 turns it off;
also in compiled layers that compute their own weight side, where the step hooks stay off: under CUDA graph modes by
default since session 28, and in every mode (fullgraph=True, DDP) with ROBUQ_QAT_ACT_KERNEL=1 set explicitly,
`qat_linear._act_supported`).

H200, DiT-XL/2 paper policy, batch 16, compiled: the QAT step 1.413x the FP step with it (104.3 vs 73.8 ms), 1.53x
and 1.60x without it in two other calls (the host's speed moves between calls: each ratio is against its own run's FP
step).

With the weight side out of the compiled graph (qat_step.py), a layer with a low-rank branch still launches, per
call, x H (a GEMM), Q_a's range and its values (two Inductor kernels, the second also writing [Q_a(x H), t]) and
t = (x H) B^T (a GEMM) before the stacked GEMM: five launches forward where a linear launches one (CPU Inductor's
code, session 21). Here the stacked input is written by the two Triton kernels the inference path already has:

    xcat = [Q_a(x H), x (B H)^T]   (M, K + r) in x's dtype
           `act_quant` in dequant mode (x H by an in-register butterfly, per-token absmax range, Q_a = s q) into the
           first K columns, `lrb_down` (t with fp32 sums, rounded once) into the last r

so the layer is that op and the stacked GEMM. The weight side hands over B H instead of B, and
its gradient goes back through H (both `through_h`): t = (x H) B^T = x (B H)^T, since H is symmetric.

Backward (METHOD.md §3's STE is the identity for absmax ranges, which hold every value):
    g_x = g_q H + g_t (B H)        one kernel, `robuq::qat_act_lrb_grad` (triton_qat_act.py: the butterfly and the
                                   rank-r product, rounded once), where the op graph copies the strided g_q, rotates
                                   it with a GEMM and adds g_t (B H) with an addmm
    g_(B H) = g_t^T x              a GEMM

What may differ from the op graph: t is x (B H)^T summed in fp32 and rounded once, where the op graph rounds x H to
bf16 first. x H is the butterfly's fp32 sums times 1/sqrt(b) as H holds it in x's dtype, rounded to that dtype, as
the op graph's GEMM writes it: the same codes but where the two sums' orders round to either side of a bf16 value
(`act_side_reference`: the same math in torch ops, what the GPU tests compare with). Covered: symmetric absmax
activations of 1-8 bits, a power-of-two Hadamard block (or none), 16-bit inputs, K a multiple of 128, rank
<= 128 (or no branch: then the op is Q_a(x H) alone and its backward g H); anything else keeps the op graph
(`unsupported` says why).
"""
from __future__ import annotations

import os

import torch

from ..spec import LayerSpec

_OPS: list = []


def enabled() -> bool:
    return os.environ.get("ROBUQ_QAT_ACT_KERNEL", "1") != "0"


def requested() -> bool:
    """Set to 1 explicitly: then layers left on the op graph are named even off CUDA (`qat_step.Plan.set_act`)."""
    return os.environ.get("ROBUQ_QAT_ACT_KERNEL") == "1"


def unsupported(spec: LayerSpec, k: int, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a layer cannot take `act_side` (None: it can)."""
    if device.type != "cuda":
        return "not on CUDA"
    if spec.lora_rank > 128:
        return f"rank {spec.lora_rank} > 128"
    if not 1 <= spec.a_bits <= 8:
        return f"a_bits={spec.a_bits} (1-8 covered)"
    if not spec.a_sym or spec.a_clip != "absmax" or spec.a_group:
        return "asymmetric, sigma-clipped or grouped activations (their STE masks values)"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"matmul dtype {dtype} (16-bit covered)"
    try:
        from . import quantizer, triton_lowrank  # (need triton)
    except ImportError as exc:
        return f"triton does not import ({exc})"
    if k % triton_lowrank.DOWN_BK:
        return f"in_features {k} not a multiple of {triton_lowrank.DOWN_BK}"
    if quantizer.quant_plan(k, _block(spec)) is None:
        return f"no quantizer tiling for K = {k}"
    return None


def _block(spec: LayerSpec) -> int:
    return spec.hadamard_block if spec.hadamard else 0


def through_h(t: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """t H (rows along K): B H from B in the matmul dtype, what `act_side` takes; and B's gradient from B H's
    (H symmetric and orthonormal: g_B = g_(B H) H)."""
    from ..layer import rotate
    return rotate(t, spec)


def act_side(x2: torch.Tensor, bh: torch.Tensor | None, spec: LayerSpec) -> torch.Tensor:
    """[Q_a(x2 H), x2 (B H)^T] (M, K + r) for x2 (M, K) with contiguous rows and bh = B H (r, K), both in the matmul
    dtype; Q_a(x2 H) alone (M, K) without a branch (bh None). Check `unsupported` first."""
    define()
    return torch.ops.robuq.qat_act_lrb(x2, bh, _block(spec), int(spec.a_bits))


def act_side_reference(x2: torch.Tensor, bh: torch.Tensor | None, spec: LayerSpec) -> torch.Tensor:
    """What `act_side` computes, in torch ops (differentiable: the ops' STE): Q_a of x H as the op graph computes it
    in x2's dtype (H rounded to it, fp32 sums, rounded once), t = x (B H)^T summed in fp32 and rounded once. The
    backward rounds g_q H before adding g_t (B H), where the kernel rounds once. Run it eagerly to compare with."""
    from ..layer import rotate_and_quantize
    with torch.autocast(x2.device.type, enabled=False):
        xq = rotate_and_quantize(x2, spec)[1]
        if bh is not None:
            xq = torch.cat([xq, (x2.float() @ bh.float().t()).to(x2.dtype)], 1)
    return xq


def define() -> None:
    """Define the triton_op and its autograd (once; needs triton). Call it eagerly before torch.compile traces a
    layer that uses it (qat_step does, in its hook)."""
    if _OPS:
        return
    from torch.library import triton_op

    from .quantizer import _hscale, act_quant
    from .triton_launch import traced
    from .triton_lowrank import lrb_down
    from .triton_qat_act import rot_lowrank

    @triton_op("robuq::qat_act_lrb", mutates_args=())
    def qat_act_lrb(x2: torch.Tensor, bh: torch.Tensor | None, block: int, a_bits: int) -> torch.Tensor:
        m, k = x2.shape
        out = torch.empty(m, k + (0 if bh is None else bh.shape[0]), device=x2.device, dtype=x2.dtype)
        # both kernels write into `out` itself, at their columns (no views of it: functionalized, a write into a
        # view becomes a slice_scatter copy of the whole buffer)
        act_quant(x2, block, a_bits, True, dequant=True, traced=True, out=out)  # columns [0, K), row stride K + r
        if bh is not None:
            lrb_down(x2, bh, out, traced, col=k)                                 # columns [K, K + r)
        return out

    @triton_op("robuq::qat_act_lrb_grad", mutates_args=())
    def qat_act_lrb_grad(g: torch.Tensor, bh: torch.Tensor | None, block: int, k: int) -> torch.Tensor:
        """g_x = g[:, :K] H + g[:, K:] (B H) in one kernel (triton_qat_act.py); g H without a branch."""
        out = torch.empty(g.shape[0], k, device=g.device, dtype=g.dtype)
        rot_lowrank(g, bh, out, block, _hscale(block, g.dtype), traced)
        return out

    def setup(ctx, inputs, output):
        x2, bh, block, _ = inputs
        ctx.save_for_backward(None if bh is None else x2, bh)  # (x only for B H's gradient)
        ctx.block, ctx.k = block, x2.shape[1]

    def backward(ctx, g):
        x2, bh = ctx.saved_tensors
        g = g.contiguous()  # (it is: the stacked GEMM's input gradient)
        g_x = torch.ops.robuq.qat_act_lrb_grad(g, bh, ctx.block, ctx.k)
        g_bh = None if bh is None else g[:, ctx.k:].t().mm(x2)
        return g_x, g_bh, None, None

    qat_act_lrb.register_autograd(backward, setup_context=setup)
    _OPS.append(qat_act_lrb)
