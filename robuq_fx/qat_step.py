"""Every QAT layer's weight side computed once a forward, for the whole model at once (issue 19; the hooks that do
it, `weight_sides_per_forward` and the ones `robuq_fx.quantize` adds for `torch.compile`, are in qat_step_hooks.py),
so that a compiled QAT step launches no weight-side kernels per layer.

Under torch.compile each QAT linear's graph holds its weight side: the masters' casts, W H, A B, Q_w(R) into the
stacked weight [Q_w(R), A_c] forward, and g_R H, the branch factors' products and their casts backward: ~11 of
the ~23 kernels one W1.58A4+H+LRB32 layer launches (CPU Inductor, session 19), against a bf16 linear's 5. The
compiled paper step is bound by those launches on the H200's host (157 ms wall, 70 ms of kernels). With this
module, session 21's H200 run: DiT-XL/2 batch 16, the paper policy's compiled step 1.60x the compiled FP step (1.81x
without; GPU tests: the graphs bit-equal to the graph-less run, compiled matches eager).

Here a forward pre-hook on the model computes, before its forward, every layer's
    [Q_w(R), A_c] (N, K + r), B_c (r, K), bias_c (N,)          in the matmul dtype c
through one autograd node (`WeightSides`), and each QATLinear's forward takes them instead of its masters:
    y = [Q_a(x H), (x H) B_c^T] [Q_w(R), A_c]^T + bias_c        (`layer.prepared_linear`)
Autograd gives the graph's gradients for the three tensors; the node's backward turns them into the masters'
gradients with the fused path's formulas (`qat_fused._weight_grads`: g_W = g_R H, g_A, g_B; the bias's cast back).
On CUDA (unless ROBUQ_QAT_WEIGHT_GRAPH=0) the node's forward and backward each replay one CUDA graph for all the
layers (`qat_graph.CudaGraphs`): one launch and one copy out a step each way, whatever the number of layers.

Costs: the compiled step breaks its graph at the model's start and end (the hooks run eagerly: two breaks a forward,
not one a layer). Every master's gradient arrives when the whole backward is done, so DDP cannot overlap their
all-reduce with the backward. The weight sides are computed once a forward, as before (with gradient accumulation
each micro-batch recomputes them).

The layers take the prepared tensors only while the model's forward runs (the post-hook clears them): a layer
called on its own computes from its masters as usual.

The layers the act op covers on CUDA (kernels/qat_act.py: symmetric absmax activations in a 16-bit matmul dtype,
with or without a branch; ROBUQ_QAT_ACT_KERNEL=0 turns it off) take B H in place of B_c and compute
[Q_a(x H), x (B H)^T] with one triton_op (`set_act` picks them once per matmul dtype and device; the node maps B H's
gradient back through H). H200, DiT-XL/2 paper policy, compiled: 1.41x the FP step with it, 1.53-1.60x without.
"""
from __future__ import annotations

import warnings

import torch

from . import qat_graph, qat_step_kernels
from .kernels import qat_act
from .qat_fused import _to, _weight_grads, _weight_side, _wside_on
from .qat_linear import QATLinear
from .qat_step_layout import (_Layer, _layout, _master_spans, _masters, _numel, _pack_grads, _packed,
                              _per_layer, _shapes, _split, _unpack, _views)


def dtypes(m: QATLinear) -> tuple[torch.dtype, torch.dtype]:
    """(c, ab) of qat_fused's docstring for a layer whose input is not seen yet: autocast's dtype where it is on,
    else the layer's cast dtype (compute_dtype) or its masters'."""
    dev = m.weight.device.type
    if torch.is_autocast_enabled(dev):
        ac = torch.get_autocast_dtype(dev)
        return ac, ac
    return m.compute_dtype or m.weight.dtype, m.weight.dtype


def _all_sides(layers: list, layout: list, c: torch.dtype, act: tuple, *masters, flat=None, group=None) -> tuple:
    """Every layer's (stacked weight, B_c, bias_c) in one flat tensor in c (each written into its slice as it is
    made: no layer's parts outlive it), and their R dtypes. layout: the layers' `_layout` (the plan's). act: per
    layer, whether its activation side is the triton_op (kernels/qat_act.py), which takes B H in place of B.
    flat: the tensor to write (a graph's output buffer), else a new one. group: the one-kernel form's tables for
    these masters (`Plan._group`), which write all the parts of the layers they cover into flat first (one launch
    a Hadamard block size; the rest, a few kernels a layer, go op by op)."""
    if flat is None:
        flat = torch.empty(sum(_numel(s) for s, _, _ in layout), dtype=c, device=masters[0].device)
    written = group.run(flat) if group is not None else frozenset()
    r_dtypes = []
    parts = _per_layer(layers, _split(flat, layout))
    for i, ((layer, span), (_, *dsts), fused) in enumerate(zip(_master_spans(layers), parts, act)):
        if i in written:
            r_dtypes.append(c)  # R's gradient dtype: W H's and A B's (`_weight_side`)
            continue
        w, down, up, bias = _unpack(layer, list(masters[span]))
        # the stacked weight written in its slice (no copy); B (or B H) and the bias copied in, cast as they go
        _, r_dtype, _, _ = _weight_side(w, down, up, bias, layer.module.spec, c, out=dsts[0], casts=False)
        if fused and down is not None:
            down = qat_act.through_h(_to(down, c), layer.module.spec)  # B H, what the layer's op takes
        for dst, t in zip(dsts[1:], (down, bias)):
            if t is not None:
                dst.copy_(t)
        r_dtypes.append(r_dtype)
    return flat, tuple(r_dtypes)


def _all_grads(layers: list, layout: list, flat_g: torch.Tensor, c: torch.dtype, ab: torch.dtype, r_dtypes: tuple,
               needs: tuple, act: tuple, *masters, slots: list | None = None, group=None, fp32=None) -> tuple:
    """Every master's gradient (None where not needed), from the flat gradient of `_all_sides`' output. slots: per
    gradient, where it is to go (`_packed`); a weight's gradient is written there as it is cast. group: the
    one-kernel backward's tables (`Plan._grad_group`), run first on flat_g into fp32 (the packed fp32 gradients that
    slots view): the layers it covers have g_W, A's and the bias's gradients written, B's is left."""
    grads = []
    covered = frozenset()
    if group is not None:
        group.run(flat_g, fp32)
        covered = group.covered
    parts = _per_layer(layers, _split(flat_g, layout))
    for i, ((layer, span), (_, g_wide, p_down, g_bias_c), r_dtype, fused) in enumerate(
            zip(_master_spans(layers), parts, r_dtypes, act)):
        if fused and p_down is not None:  # the gradient of B H: B's is it times H (H symmetric and orthonormal)
            p_down = qat_act.through_h(p_down, layer.module.spec)
        w, down, up, bias = _unpack(layer, list(masters[span]))
        need = needs[span]
        need_w = need[0]
        # this layer's slots (g_W, then g_B and g_A with a branch, then the bias's), None where none
        mine = slots[len(grads):len(grads) + len(need)] if slots is not None else (None,) * len(need)
        g_w_out = mine[0] if need_w and not layer.transposed else None
        g_w, g_up, g_down = _weight_grads(g_wide, p_down, down, up, layer.module.spec, layer.k, r_dtype, w.dtype,
                                          ab, ab == c, need_w, g_w_out,
                                          g_up_out=mine[2] if layer.r and need[2] else None,
                                          g_down_out=mine[1] if layer.r and need[1] else None,
                                          wup_written=i in covered)
        if g_w is not None and layer.transposed:
            g_w = g_w.t()
        out = [g_w if need_w else None]
        if layer.r:
            out += [g_down if need[1] else None, g_up if need[2] else None]
        if layer.has_bias:
            g_bias = None
            if need[-1] and i in covered:
                g_bias = mine[-1]  # (written by the group)
            elif need[-1]:
                g_bias = _to(g_bias_c, bias.dtype) if mine[-1] is None else mine[-1].copy_(g_bias_c)
            out.append(g_bias)
        grads += out
    return tuple(grads)


def _use_graphs(t: torch.Tensor) -> bool:
    """Replay the step's weight sides from CUDA graphs (qat_graph's switch and conditions)."""
    return qat_graph.usable(t)


MAX_GRAPH_KEYS = qat_step_kernels.MAX_KEYS  # keys with CUDA graphs a direction per Plan (`Plan._room`)
GRAPHS_PER_KEY = 3  # graphs (each with its own output buffers) a key: `Plan._free_graph`


class WeightSides(torch.autograd.Function):
    """masters -> every layer's (stacked weight, B_c, bias_c) in c, one output each (views of one flat tensor).

    One output a part, not the flat tensor itself: the layers' slices of a single output would each send back a
    gradient of the flat tensor's whole size (autograd's slice backward: zeros and a copy), ~600 of them for
    DiT-XL/2 (1.35 GB each in bf16): the first H200 run took 883 ms a step for it. The parts' gradients are
    concatenated once here instead."""

    @staticmethod
    def forward(ctx, plan: "Plan", *masters):
        flat, r_dtypes = plan.run_forward(masters)
        ctx.plan, ctx.r_dtypes, ctx.act = plan, r_dtypes, plan.act
        ctx.save_for_backward(*masters)
        return tuple(_split(flat, plan.layout))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *g_parts):
        # (an output no layer used comes as zeros: autograd materializes its gradient)
        grads = ctx.plan.run_backward(g_parts, ctx.r_dtypes, tuple(ctx.needs_input_grad[1:]), ctx.act,
                                      ctx.saved_tensors)
        return (None, *grads)


class Plan:
    """QAT layers in a fixed order with their shapes, and the CUDA graphs of their weight sides. modules: QATLinears,
    or objects with the attributes of theirs it reads (spec, in_features, out_features, transposed, compute_dtype,
    weight, lrb_down, lrb_up, bias: the compile backend's graph layers, backend/weight_sides.py)."""

    def __init__(self, modules: list):
        self.layers = [_Layer(m) for m in modules]
        self.modules = list(modules)
        self.layout = _layout(_shapes(self.layers))
        self.w_at = [span.start for _, span in _master_spans(self.layers)]  # where each layer's weight is in masters()
        self.c = self.ab = None
        self.warned = self.graphs_off = self.warned_keys = self.warned_ranks = False
        self._ids = None  # the masters' identities when last checked (`check`)
        self.act, self._act_key = (False,) * len(self.layers), None  # (`set_act`)
        # under a CUDA graph mode (qat_step_hooks, ROBUQ_QAT_STEP_WEIGHTS=cudagraphs): each key's forward graph
        # written in place every forward, its buffers at fixed addresses (`run_forward`)
        self.static_fwd = False
        # CUDA graphs per key (the masters' addresses, dtypes, autocast): one key for a model's hook; one a module
        # instance where the compile backend runs one graph for several blocks (backend/weight_sides.py)
        self._fwd_graphs: dict = {}
        self._bwd_graphs: dict = {}
        self._wside_checked: set = set()  # (matmul dtype, autocast dtype) whose uncovered layers were named (`_group`)
        self._groups: dict = {}  # the one-kernel weight side's tables a key (`_group`)
        self._grad_groups: dict = {}  # the one-kernel backward's, a backward graph key (`_grad_group`)

    def masters(self) -> list:
        return [t for m in self.modules for t in _masters(m)]

    def check(self, masters: list) -> None:
        """Refuse sharded masters; checked again only when the masters are other tensors than last time (this runs
        before every forward: its Python is a compiled step's own overhead)."""
        ids = tuple(map(id, masters))
        if ids != self._ids:
            _check_not_sharded(masters)
            self._ids = ids

    def kinds(self, masters: list) -> set:
        """{(c, ab)} of the layers (`dtypes`): autocast's alone where it is on for the one device type they are on."""
        devs = {masters[i].device.type for i in self.w_at}
        if len(devs) == 1:
            dev = devs.pop()
            if torch.is_autocast_enabled(dev):
                ac = torch.get_autocast_dtype(dev)
                return {(ac, ac)}
            # `dtypes` without autocast, from the weights at hand (no module attribute lookups)
            return {(m.compute_dtype or masters[i].dtype, masters[i].dtype) for m, i in zip(self.modules, self.w_at)}
        return {dtypes(m) for m in self.modules}

    def set_act(self, device: torch.device) -> None:
        """Which layers' activation side is the triton_op (kernels/qat_act.py; on unless ROBUQ_QAT_ACT_KERNEL=0) for
        this matmul dtype and device; one warning naming those left on the op graph, and why."""
        key = (self.c, device, qat_act.enabled())
        if self._act_key == key:
            return
        whynot = [qat_act.unsupported(m.spec, m.in_features, device, self.c) if key[2] else "off"
                  for m in self.modules]
        self.act, self._act_key = tuple(w is None for w in whynot), key
        if any(self.act):
            qat_act.define()  # here, eagerly: not while torch.compile traces the layers that call it
        # named in one warning: layers on CUDA the op does not cover (off CUDA only where the switch was set to 1)
        left = {w for w in whynot if w is not None and w != "off" and (qat_act.requested() or w != "not on CUDA")}
        if key[2] and left:
            warnings.warn(f"ROBUQ_QAT_ACT_KERNEL: {sum(w in left for w in whynot)} of {len(whynot)} QAT layers keep "
                          f"the op graph's activation side ({'; '.join(sorted(left))})", RuntimeWarning, stacklevel=3)

    def _group(self, masters: tuple, ptrs: tuple):
        return qat_step_kernels.forward_group(self, masters, ptrs)

    def _grad_group(self, key, masters: tuple, packed: tuple, needs: tuple, r_dtypes: tuple, g_flat: torch.Tensor):
        return qat_step_kernels.grad_group(self, key, masters, packed, needs, r_dtypes, g_flat)

    def run_forward(self, masters: tuple) -> tuple:
        c, act = self.c, self.act
        ptrs = tuple(t.data_ptr() for t in masters)  # (the keys of the tables and the graphs)
        group = self._group(masters, ptrs)
        if self.graphs_off or not _use_graphs(masters[0]):
            return _all_sides(self.layers, self.layout, c, act, *masters, group=group)
        key = (ptrs, c, act, qat_graph._autocast_dtype(masters[0].device),
               group is not None)
        if self.static_fwd and self._fwd_graphs.get(key):
            # CUDA graph modes: always this key's first graph, even while the last forward's parts are held (the
            # compiled graphs read them at fixed addresses; the same values while the masters have not moved)
            graph = self._fwd_graphs[key][0]
        else:
            graph = self._free_graph(self._fwd_graphs, key)
        if graph is not None:  # its buffers handed out as they are: nothing else holds them
            return qat_graph.replay_graph(graph, (), masters[0].device, clone=False)
        result = _all_sides(self.layers, self.layout, c, act, *masters, group=group)
        if self._room(self._fwd_graphs, key):
            self._capture(self._fwd_graphs, key, "step weight sides",
                          lambda outs: _all_sides(self.layers, self.layout, c, act, *masters, flat=outs[0],
                                                  group=group), (), result)
        return result

    def run_backward(self, g_parts: tuple, r_dtypes: tuple, needs: tuple, act: tuple, masters: tuple) -> tuple:
        """Every master's gradient from the gradients of WeightSides' outputs (one flat tensor once concatenated)."""
        c, ab = self.c, self.ab
        flat = [g.reshape(-1) for g in g_parts]

        def compute(g, slots=None, group=None, fp32=None):
            return _all_grads(self.layers, self.layout, g, c, ab, r_dtypes, needs, act, *masters, slots=slots,
                              group=group, fp32=fp32)
        if self.graphs_off or not _use_graphs(g_parts[0]):
            return compute(torch.cat(flat))
        key = (tuple(t.data_ptr() for t in masters), c, ab, r_dtypes, needs, act, g_parts[0].dtype, _wside_on())
        graph = self._free_graph(self._bwd_graphs, key)
        if graph is not None:  # (the gradients' buffers are free: no .grad or other view of them alive)
            torch.cat(flat, out=graph.inputs[0])  # straight into the buffer the graph reads
            *flats, layout = qat_graph.replay_graph(graph, (graph.inputs[0],), g_parts[0].device, clone=False)
            return _views(flats, layout)
        g_flat = torch.cat(flat)
        result = compute(g_flat)
        flats, layout = _pack_grads(result)
        # the gradients packed one flat buffer a dtype: a replay hands out views of them
        if self._room(self._bwd_graphs, key):  # the weights' gradients written in the packed buffers as they are cast
            group = self._grad_group(key, masters, layout, needs, r_dtypes, g_flat)  # (built before the capture)
            at = layout[0].index(torch.float32) if torch.float32 in layout[0] else None

            def fill(buf, outs):
                def fn(slots):
                    return compute(buf, slots, group, outs[at] if group is not None else None)
                return (*_packed(layout, outs[:-1], fn), layout)
            self._capture(self._bwd_graphs, key, "step weight grads", fill, (g_flat,), (*flats, layout))
        return result

    @staticmethod
    def _free_graph(graphs: dict, key):
        """A graph of this key whose output buffers nothing else holds (`qat_graph._Graph.free`), or None. A key
        has up to GRAPHS_PER_KEY graphs, each with buffers of its own: one while each forward's weights are done
        with before the next forward, and each backward's gradients before the next backward (`zero_grad` setting
        them to None); more where they overlap (forwards before a backward, gradients kept across steps)."""
        for g in graphs.get(key, ()):
            if g.free():
                return g
        return None

    def _room(self, graphs: dict, key) -> bool:
        """Whether this key may get another graph: GRAPHS_PER_KEY a key, MAX_GRAPH_KEYS keys a direction; past
        either, one warning and op by op (masters that keep moving, more module instances than that sharing one
        graph, or more forwards before a backward than that)."""
        have = graphs.get(key, ())
        if len(have) < GRAPHS_PER_KEY and (have or len(graphs) < MAX_GRAPH_KEYS):
            return True
        if not self.warned_keys:
            self.warned_keys = True
            why = (f"{GRAPHS_PER_KEY} sets of buffers still in use (forwards before a backward, or gradients kept "
                   f"across steps)" if have else f"CUDA graphs kept for {MAX_GRAPH_KEYS} sets of masters")
            warnings.warn(f"weight_sides_per_forward: {why}; the weight sides are computed op by op for now",
                          RuntimeWarning, stacklevel=4)
        return False

    def _capture(self, graphs: dict, key, name: str, fn, copy_in: tuple, result: tuple) -> None:
        """graphs[key] = the graph of fn(*copy_in, outs) (qat_graph.capture_graph; fn writes into the graph's output
        buffers); a failed capture turns the plan's graphs off."""
        g, _ = qat_graph.capture_graph(name, lambda *a, outs: fn(*a, outs), copy_in, result,
                                       "the weight sides of weight_sides_per_forward", into=True, own_outs=True)
        if g is not None:
            graphs.setdefault(key, []).append(g)
            return
        self.graphs_off = True
        warnings.warn("weight_sides_per_forward: a CUDA graph of the weight sides could not be captured; they are "
                      "computed op by op from now on", RuntimeWarning, stacklevel=4)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def _check_not_sharded(masters: list) -> None:
    """FSDP2 shards the masters (DTensors) and gathers them block by block inside the forward, after this hook."""
    if any(_is_dtensor(t) for t in masters):
        raise TypeError("weight_sides_per_forward: the QAT layers' masters are sharded DTensors (FSDP2), and the "
                        "whole model's weight sides need every master gathered at the model's start: use it on one "
                        "GPU or with DDP")
