"""One autograd node per QAT linear in eager mode (issue 19): `layer.qat_weight` + `layer.robuq_linear` as a single
`torch.autograd.Function` whose backward is written out, instead of five custom ops and their autograd wrappers
(~35 us of Python each) per layer and call. torch.compile, torch.export and capture keep the op graph
(QATLinear.forward chooses); under torch.compile that graph is decomposed for Inductor (kernels/inductor.py).

Forward, from the masters W, A (lrb_up), B (lrb_down) (METHOD.md §1), with c the dtype the matmuls run in (autocast's
when autocast is on, else the input's) and ab the dtype of the A B product (autocast's when on, else the masters'):
    R = W H - (A B in ab),  Wq = Q_w(R) -> c       (no autograd graph: its gradient is written out below)
    xh = x H,  xq = Q_a(xh)
    t = xh_c B_c^T,  y = [xq_c, t] [Wq, A_c]^T + bias_c       (one GEMM on K + r columns: layer.stacked_linear)
Autocast is left on where the caller has it, as for the op graph, where it also rounds the rotations' matmuls (x H,
W H) to its dtype. Backward (the ops' straight-through estimators: Q_w passes the gradient, Q_a inside the range):
    [g_xq, g_t] = g [Wq, A_c],  [g_R, g_Ac] = g^T [xq_c, t]   (the stacked GEMM's two products, split by columns)
    g_xh = mask * (g_xq -> xh's dtype) + (g_t B_c -> xh's dtype),  g_x = g_xh H    (H symmetric orthonormal)
    g_R -> R's dtype,  g_W = g_R H -> masters',
    g_A = (-g_R -> ab) B_ab^T + g_Ac,  g_B = A_ab^T (-g_R -> ab) + g_t^T xh_c   (-> masters': each term; for B their
        sum where autocast shares one cast of B between its two products, see forward)
    g_bias = sum of g -> the bias dtype
These are the products, dtypes and operand orders autograd takes through the op graph (linear folded to a 2-D
addmm / mm; autograd casting each gradient to its input's dtype), so the gradients are equal to it: tested bit for
bit on CPU, fp32, bf16 and under autocast.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import qat_graph, quantizers as Q
from .layer import residual_parts, rotate_eager as _rotate, wide_difference
from .ops import fake_quant_act_impl, fake_quant_weight_impl, row_kernel
from .qat_weight_cache import _STEP, _cached_weight, _master
from .kernels.weight_cache import scale_vec
from .spec import LayerSpec


def _2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype) without the dispatcher call where t already has it (`.to` returns t itself then): ~20-30 such
    calls a layer and step, each a few microseconds of the CPU time that bounds an eager QAT step on a GPU."""
    return t if t.dtype == dtype else t.to(dtype)


def quantized_weight(w, down, up, spec: LayerSpec, c: torch.dtype, compute=None) -> tuple:
    """compute(w, down, up, spec, c) (default `_quantized_weight`: (Q_w(R) in c, the dtype R was computed in)),
    without an autograd graph. Computed on every call, as the op graph does, unless `quantize_weights_once_per_step`
    is on: a cache keyed only on the masters' storage and version counter went stale under FSDP2, whose all-gathers
    rewrite the unsharded weights in place without moving their version (a CPU test caught it); that one also keys
    on the optimizer's steps."""
    compute = compute or _quantized_weight
    if _STEP["hooks"]:
        return _cached_weight(w, down, up, spec, c, compute)
    return compute(w, down, up, spec, c)


def weight_side(w, down, up, bias, spec: LayerSpec, c: torch.dtype, graph_owner=None) -> tuple:
    """(the stacked weight [Q_w(R), A_c] (Q_w(R) alone without a branch), R's dtype, B_c, bias_c): everything the
    forward takes from the masters, in the matmul dtype c. With a graph_owner (on CUDA, unless ROBUQ_QAT_WEIGHT_GRAPH=0:
    `_master(w)`) replayed from that layer's CUDA graph (qat_graph.py: the same kernels, a few launches instead of
    ~33 ATen calls), unless `quantize_weights_once_per_step` keeps Q_w(R) itself."""
    if graph_owner is not None and not _STEP["hooks"]:
        return qat_graph.graphed_weight(graph_owner, _weight_side, (w, down, up, bias, spec, c))
    return _weight_side(w, down, up, bias, spec, c)


def _weight_side(w, down, up, bias, spec: LayerSpec, c: torch.dtype, out: torch.Tensor | None = None,
                 casts: bool = True) -> tuple:
    """(stacked weight [Q_w(R), A_c], R's gradient dtype, B_c, bias_c). out: where the stacked weight goes ((N, K + r)
    in c, rows contiguous: qat_step's flat buffer), written in place (Q_w(R) straight from its kernel, A_c beside
    it), else a new tensor. casts=False: B_c and bias_c not made (None; qat_step copies the masters into its buffer
    straight, one kernel each)."""
    bias_c = None if bias is None or not casts else _to(bias, c)
    down_c = None if down is None or not casts else _to(down, c)
    if _STEP["hooks"] or (out is None and down is None):
        wq, r_dtype = quantized_weight(w, down, up, spec, c)
        stacked = wq if down is None else torch.cat([wq, _to(up, c)], 1)
        return (stacked if out is None else out.copy_(stacked)), r_dtype, down_c, bias_c
    k = w.shape[1]
    stacked = out if out is not None else torch.empty(w.shape[0], k + up.shape[1], dtype=c, device=w.device)
    r_dtype = _quantized_weight(w, down, up, spec, c, out=stacked.narrow(1, 0, k))[1]
    if down is not None:
        stacked.narrow(1, k, up.shape[1]).copy_(up)
    return stacked, r_dtype, down_c, bias_c


def _quantized_weight(w, down, up, spec: LayerSpec, c: torch.dtype, out: torch.Tensor | None = None) -> tuple:
    """(Q_w(R) in c (in `out` where given), the dtype R's gradient takes)."""
    with torch.no_grad():
        wh, ab = residual_parts(w, down, up, spec, rotate_fn=_rotate)  # A B in ab: autocast rounds it as the op graph
        # on CUDA one Triton kernel reading W H and A B, writing Q_w(R) in c (ops.fake_quant_weight_impl; the op graph
        # computes the same)
        return fake_quant_weight_impl(wh, float(spec.w_bits), spec.w_granularity, spec.group_size, spec.scale_dtype,
                                      c, minus=ab, out=out), _r_dtype(wh, ab)


def _r_dtype(wh: torch.Tensor, ab) -> torch.dtype:
    """The dtype R's gradient takes in the backward: its terms' (bf16 under autocast), although R itself is formed
    in fp32 (`layer.wide_difference`), as the op graph's autograd does (the fp32 cast's backward)."""
    return wh.dtype if ab is None else torch.promote_types(wh.dtype, ab.dtype)


def compute_dtypes(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(c, ab) of the module docstring."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        ac = torch.get_autocast_dtype(dev)
        return ac, ac
    return x.dtype, w.dtype


def _ranged(name: str, fn, *args):
    """fn(*args), inside a profiler range named `name` while a profiler records (profile_dit.py --train reads the
    robuq ranges: the fused path runs no robuq op it could see otherwise); a flag check when none does."""
    if torch._C._autograd._profiler_enabled():
        with torch.profiler.record_function(name):
            return fn(*args)
    return fn(*args)


def _rotate_and_quantize(x, spec: LayerSpec):
    xh = _rotate(x, spec)
    return xh, fake_quant_act_impl(xh, spec.a_bits, spec.sym, spec.a_clip, spec.a_group) if spec.a_bits < 16 else xh


# ---- the forward GEMM on fp8 tensor cores (opt-in: ROBUQ_QAT_FP8=1) -------------------------------------------------
# Q_a(x H) = s_x q_x and Q_w(R) = s_w q_w exactly, with |q| <= 7 (4 bits) exact in fp8 e4m3, so the forward product
# runs as _scaled_mm(q_x, q_w) with the scales applied to the fp32 accumulator: the exact product of the fake-quant
# values, where the bf16 path multiplies their bf16 roundings. The backward is unchanged (it reads the same Q_w(R)
# and Q_a(x H) as before). Opt-in until its GPU test has passed (tests/test_qat_fused.py).
_QAT_FP8 = [os.environ.get("ROBUQ_QAT_FP8", "0") == "1"]
# the step plan's weight sides in one grouped kernel each way (kernels/triton_wside.py, triton_wgrad.py): on by
# default since session 27 (H200: forward and backward through the plan's graphs 14.9 against 21.4 ms of GPU time,
# 12.3 against 19.5 ms of host time, the paper policy); ROBUQ_QAT_WSIDE_KERNEL=0 keeps the op-by-op forms.
# None: the variable decides, read at each use (a bench's --env-variant sets it for one row); tests set it.
_WSIDE: list = [None]


def _wside_on() -> bool:
    return _WSIDE[0] if _WSIDE[0] is not None else os.environ.get("ROBUQ_QAT_WSIDE_KERNEL", "1") != "0"


def _wside_requested() -> bool:
    """ROBUQ_QAT_WSIDE_KERNEL=1 set explicitly (or a test's switch): then every layer the grouped kernels leave is
    named, even for the setting's own reasons (CPU tensors, no 16-bit autocast)."""
    return bool(_WSIDE[0]) or os.environ.get("ROBUQ_QAT_WSIDE_KERNEL") == "1"


def _fp8_forward_ok(x, w, spec: LayerSpec, c: torch.dtype) -> bool:
    # without a low-rank branch: the bf16 path stacks the branch's up-projection into its GEMM, and the backward
    # (shared) splits that stacked product
    if not (_QAT_FP8[0] and x.is_cuda and c == torch.bfloat16 and spec.a_bits <= 4 and spec.sym and not spec.lora_rank
            and spec.a_clip == "absmax" and float(spec.w_bits) <= 4 and not spec.group_size and not spec.a_group
            and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0):
        return False
    from .kernels.triton_fp8 import _capability  # cached per device
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _capability(idx) >= (8, 9) and row_kernel() is not None


def _weight_with_codes(w, down, up, spec: LayerSpec, c: torch.dtype) -> tuple:
    """(Q_w(R) in c, R's dtype, the codes in fp8 (N, K), the fp32 scales (N,)): Q_w(R) as `fake_quant_weight`
    computes it (the same quantize / dequantize calls)."""
    with torch.no_grad():
        wh, ab = residual_parts(w, down, up, spec, rotate_fn=_rotate)
        r = wh if ab is None else wide_difference(wh, ab)
        codes, scale = Q.quantize_weight(r, float(spec.w_bits), spec.w_granularity, spec.group_size, spec.scale_dtype)
        wq = Q.dequantize_weight(codes, scale, r.dtype).contiguous().to(c)
        return wq, _r_dtype(wh, ab), codes.to(torch.float8_e4m3fn), scale_vec(scale, codes.shape[0])


def _fp8_forward(x, w, bias, down, up, spec: LayerSpec, c: torch.dtype) -> tuple:
    """(x Q_w(R)^T + bias through the fp8 GEMM, xh, Q_a(xh), Q_w(R) in c, R's dtype)."""
    from .kernels.triton_fp8 import _scaled_mm
    wq, r_dtype, w8, sw = _ranged("robuq::qat Q_w(R)", quantized_weight, w, down, up, spec, c, _weight_with_codes)
    xh = _rotate(x, spec).contiguous()
    xq, codes, sx = _ranged("robuq::qat Q_a(x H)", row_kernel().fake_quant_rows_codes, xh, spec.a_bits)
    y = _scaled_mm(codes, w8, sx, sw, None if bias is None else bias.to(torch.bfloat16))
    return y.view(*x.shape[:-1], w.shape[0]), xh, xq, wq, r_dtype


class QATLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, down, up, spec: LayerSpec, c: torch.dtype, ab: torch.dtype):
        return _ranged("robuq::qat_linear forward (fused)", QATLinearFunction._forward, ctx, x, w, bias, down, up,
                       spec, c, ab)

    @staticmethod
    def _forward(ctx, x, w, bias, down, up, spec: LayerSpec, c: torch.dtype, ab: torch.dtype):
        # autocast stays as the caller set it, as it does for the op graph: it also rounds the rotations' matmuls
        xh_c = down_c = xh = None
        owner = _master(w) if qat_graph.usable(w) else None  # the layer's CUDA graphs (qat_graph.py)
        ctx.graph_owner, ctx.layer_graph = owner, False
        if _fp8_forward_ok(x, w, spec, c):
            y, xh, xq, wq, r_dtype = _fp8_forward(x, w, bias, down, up, spec, c)
            xq_c, xd = _to(xq, c), xh.dtype
            xh = xh if _masked(spec) else None
        else:
            if owner is not None and qat_graph.layers_usable(x) and not _STEP["hooks"]:
                ctx.layer_graph = True  # the whole forward replayed, x copied in
                parts = qat_graph.graphed_layer_forward(owner, _forward_parts, (x,), (w, bias, down, up, spec, c, None))
            else:
                parts = _forward_parts(x, w, bias, down, up, spec, c, owner)
            y, xq_c, wq, xh, xh_c, down_c, r_dtype, xd = parts
        ctx.spec, ctx.xh_dtype, ctx.r_dtype, ctx.ab, ctx.w_dtype = spec, xd, r_dtype, ab, w.dtype
        # B in the matmul dtype where that is a new tensor (the g_t B term; a graph's copy of B is not kept)
        ctx.down_c = None if down is None or down.dtype == c else down_c
        ctx.bias_dtype = None if bias is None else bias.dtype
        # autocast caches its cast of a leaf master within its region: where the op graph would take the uncast
        # masters (x in their dtype), A B and the branch share one cast of A and of B, and their gradients add up
        # in the cast dtype before the cast back
        ctx.shared_cast = torch.is_autocast_enabled(x.device.type) and x.dtype == w.dtype
        ctx.save_for_backward(xq_c, wq, xh, xh_c, down, up)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return _ranged("robuq::qat_linear backward (fused)", QATLinearFunction._backward, ctx, g)

    @staticmethod
    def _backward(ctx, g):
        xq_c, wq, xh, xh_c, down, up = ctx.saved_tensors  # with a branch: [xq_c, t] and [Wq, A_c]
        args = (down, up, ctx.spec, ctx.xh_dtype, ctx.r_dtype, ctx.w_dtype, ctx.ab, ctx.shared_cast, ctx.bias_dtype,
                tuple(ctx.needs_input_grad[:5]))
        if ctx.layer_graph and qat_graph.layers_usable(g):  # the whole backward replayed, g and the saved copied in
            grads = qat_graph.graphed_layer_backward(ctx.graph_owner, _backward_parts,
                                                     (g, xq_c, wq, xh, xh_c, ctx.down_c), args + (None,))
        else:
            grads = _backward_parts(g, xq_c, wq, xh, xh_c, ctx.down_c, *args, ctx.graph_owner)
        return (*grads, None, None, None)


def _masked(spec: LayerSpec) -> bool:
    """Q_a's straight-through mask needs x H (a clipped range: the gradient passes inside it only)."""
    return spec.a_bits < 16 and spec.a_clip != "absmax"


def _forward_parts(x, w, bias, down, up, spec: LayerSpec, c: torch.dtype, graph_owner) -> tuple:
    """(y, the stacked [xq_c, t] (xq_c alone without a branch), the stacked [Wq, A_c], xh where the backward's mask
    needs it, xh_c (with a branch), B_c, R's dtype, xh's dtype): one layer's forward from x and the masters (what
    `qat_graph.graphed_layer_forward` replays; graph_owner: its weight side's own graph, outside a layer graph)."""
    wq, r_dtype, down_c, bias_c = _ranged("robuq::qat Q_w(R)", weight_side, w, down, up, bias, spec, c, graph_owner)
    xh, xq = _ranged("robuq::qat Q_a(x H)", _rotate_and_quantize, x, spec)
    xq_c, xh_c = _to(xq, c), None
    if down is not None:  # [xq, t] [Wq, A]^T: the stacked operands are saved, xq / Wq their first K columns
        xh_c = _to(xh, c)
        xq_c = torch.cat([xq_c, F.linear(xh_c, down_c)], -1)
    y = F.linear(xq_c, wq, bias_c)
    return y, xq_c, wq, xh if _masked(spec) else None, xh_c, down_c, r_dtype, xh.dtype


def _backward_parts(g, xq_c, wq, xh, xh_c, down_c, down, up, spec: LayerSpec, xd, r_dtype, w_dtype, ab,
                    shared_cast: bool, bias_dtype, needs: tuple, graph_owner) -> tuple:
    """(g_x, g_W, g_bias, g_B, g_A) from g and what the forward saved (what `qat_graph.graphed_layer_backward`
    replays; graph_owner: the weight side's own graph, outside a layer graph). down_c: B in the matmul dtype where
    the forward made a new tensor of it, else None."""
    c = g.dtype
    g2 = _2d(g)
    need_x, need_w, need_b, need_down, need_up = needs
    g_x = g_w = g_bias = g_down = g_up = None
    k = wq.shape[1] - (0 if down is None else down.shape[0])
    gt2 = None  # g A_c: the stacked input gradient's last r columns, as autograd splits the cat
    if need_x or (down is not None and need_down):
        g_in = g2.mm(wq)
        if down is not None:
            gt2 = g_in.narrow(1, k, g_in.shape[1] - k)
            g_in = g_in.narrow(1, 0, k)
    if need_x:
        g_xh = _to(g_in, xd)
        if xh is not None:  # a clipped range: the gradient passes inside it only
            g_xh = g_xh * _to(Q.act_ste_mask(xh, spec.a_bits, spec.sym, spec.a_clip, spec.a_group)
                              .reshape(g_xh.shape), xd)
        if down is not None:
            g_xh = g_xh + _to(gt2.mm(down_c if down_c is not None else _to(down, c)), xd)
        g_x = _rotate(g_xh.reshape(*g.shape[:-1], g_xh.shape[-1]), spec)
    if need_w or need_down or need_up:
        g_wide = g2.t().mm(_2d(xq_c))
        p_down = None if down is None else gt2.t().mm(_2d(xh_c))
        args = (down, up, spec, k, r_dtype, w_dtype, ab, shared_cast, need_w)
        if graph_owner is not None and qat_graph.usable(g_wide):  # the same ops, replayed (qat_graph.py)
            g_w, g_up, g_down = qat_graph.graphed_grads(graph_owner, _weight_grads, (g_wide, p_down), args)
        else:
            g_w, g_up, g_down = _weight_grads(g_wide, p_down, *args)
    if need_b and bias_dtype is not None:
        g_bias = _to(g2.sum(0), bias_dtype)
    return g_x, g_w, g_bias, g_down, g_up


def _weight_grads(g_wide, p_down, down, up, spec: LayerSpec, k: int, r_dtype, w_dtype, ab, shared_cast: bool,
                  need_w: bool, g_w_out: torch.Tensor | None = None,
                  g_up_out: torch.Tensor | None = None, g_down_out: torch.Tensor | None = None,
                  wup_written: bool = False) -> tuple:
    """(g_W, g_A, g_B) from the stacked GEMM's weight gradient g_wide = g^T [xq_c, t] and p_down = g_t^T xh_c:
    the backward's weight side, whose other inputs are the masters (what `qat_graph.graphed_grads` replays).
    g_w_out, g_up_out, g_down_out: where g_W, g_A and g_B go (in their masters' dtypes: slots of the step plan's packed
    gradients; the last op of each writes it there, as it casts: the same values, fewer kernels in its CUDA graph).
    wup_written: g_W and g_A are in g_w_out and g_up_out already (the step plan's `kernels/triton_wgrad.GradGroup`);
    only B's is left."""
    g_w = g_up = g_down = None
    g_r = _to(g_wide if down is None else g_wide.narrow(1, 0, k), r_dtype)
    gr = None if down is None else _to(g_r, ab)
    if wup_written:
        g_w, g_up = g_w_out, g_up_out
    else:
        if need_w:
            g_w = _rotate(g_r, spec)
            g_w = _to(g_w, w_dtype) if g_w_out is None else g_w_out.copy_(g_w)
        if down is not None:
            # R = W H - A B: A B's gradient is -g_R. The products are taken of g_R and negated (a few N x r / r x K
            # values; exact: rounding is symmetric) rather than of a negated copy of the whole (N, K) g_R.
            # A enters the stacked weight through its own cast (not autocast's cached one): its two terms add in
            # A's dtype; B's two products share autocast's cast, so theirs add before the cast back (`_b_grad`)
            ab_term = gr.mm(_to(down, ab).t()).neg_()
            tail = g_wide.narrow(1, k, g_wide.shape[1] - k)
            if g_up_out is not None and torch.promote_types(tail.dtype, up.dtype) == up.dtype == g_up_out.dtype:
                g_up = torch.add(_to(ab_term, up.dtype), tail, out=g_up_out)  # (tail cast to A's dtype in the add)
            else:
                g_up = _to(ab_term, up.dtype) + _to(tail, up.dtype)
    if down is not None:
        part = _to(up, ab).t().mm(gr)  # A^T g_R: B's term is its negation
        g_down = _b_grad(part, p_down, down.dtype, shared_cast, g_down_out)
    return g_w, g_up, g_down


def _b_grad(part, p_down, dtype, shared_cast: bool, out) -> torch.Tensor:
    """B's gradient p_down - part (part = A^T g_R) in B's dtype: with autocast's cast of B shared by its two
    products, summed before the cast back (into `out` where given)."""
    if shared_cast:
        g_down = torch.sub(p_down, part)  # (= -part + p_down, exactly)
        return _to(g_down, dtype) if out is None else out.copy_(g_down)
    return _to(part.neg_(), dtype) + _to(p_down, dtype)


def qat_linear(x, w, bias, down, up, spec: LayerSpec) -> torch.Tensor:
    """y of one QAT linear (module docstring); w is (N, K) and may be a transposed view."""
    c, ab = compute_dtypes(x, w)
    return QATLinearFunction.apply(x, w, bias, down, up, spec, c, ab)
