"""The compile backend's qat mode with every layer's weight side computed once a call, outside the compiled graph
(`robuq_fx.backend(policy, mode="qat", weight_sides="step")`): what `robuq_fx.weight_sides_per_forward` does for a
`robuq_fx.quantize` model, for the models this backend quantizes itself (issue 19: both entry points fast).

In the plain qat mode each layer's weight side (R = W H - A B, Q_w(R), the casts) is part of the graph Inductor
compiles: ~4 launches a layer and call forward, more backward. Here the graph's QAT layers (one a slot: a weight used
at several sites is one layer) stand in for QATLinears in `qat_step.Plan`; each site becomes

    layer.prepared_linear(x, [Q_w(R), A_c], B_c, bias_c, act, spec)        (B_c is B H where the act op applies)

with the three tensors as inputs of the compiled graph, and every call computes them for all layers at once through
one `qat_step.WeightSides` node (one CUDA graph replay each way on the GPU) before the compiled graph runs. The
gradients reach the weights, branches and biases Dynamo passed in through that node.

Not hoisted (the plain qat mode instead, no warning: same results): graphs that enter autocast themselves (the
matmul dtype is then not the one in force when the backend compiles), layers in several matmul dtypes, a bias
computed in the graph, sharded (FSDP2) weights.
"""
from __future__ import annotations

import torch.fx as fx

from .. import layer, qat_step_hooks
from ..qat_step import Plan, WeightSides, _is_dtensor
from ..spec import LayerSpec


class GraphLayer:
    """One QAT layer of a compiled graph, with the attributes of a QATLinear that `qat_step.Plan` reads; its tensors
    are the ones Dynamo passes in this call (`GraphSides.parts`)."""
    transposed = False
    compute_dtype = None

    def __init__(self, spec: LayerSpec, k: int, n: int, weight, bias, lrb):
        self.spec, self.in_features, self.out_features = spec, k, n
        self.set(weight, bias, lrb)

    def set(self, weight, bias, lrb) -> None:
        self.weight, self.bias = weight, bias
        self.lrb_down, self.lrb_up = lrb if lrb is not None else (None, None)


class _Site:
    """The call a linear site becomes (a callable FX target: AOTAutograd traces through it)."""

    def __init__(self, spec: LayerSpec, act: bool):
        self.spec, self.act = spec, act
        self.__name__ = "robuq_prepared_linear"

    def __call__(self, x, wq, down_c, bias_c):
        return layer.prepared_linear(x, wq, down_c, bias_c, self.act, self.spec)


def _enters_autocast(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and "autocast" in getattr(n.target, "__name__", "") for n in gm.graph.nodes)


class GraphSides:
    """The weight sides of one compiled graph's QAT layers (module docstring)."""

    def __init__(self, plan: Plan, sources: list):
        self.plan, self.sources = plan, sources  # per layer: (slot, weight's input index, bias's or None)

    @classmethod
    def make(cls, gm: fx.GraphModule, slots: list, key: tuple, args, payloads,
             cuda_only: bool = False) -> "GraphSides | None":
        """None where the graph cannot hoist its weight sides (module docstring), or (cuda_only: weight_sides="auto")
        where its layers are not on CUDA."""
        if _enters_autocast(gm):
            return None
        layers, sources = [], []
        for i, (slot, spec) in enumerate(zip(slots, key)):
            if spec is None:
                continue
            if slot.bias_problem:
                return None
            bias = args[slot.bias_index] if slot.bias_index is not None else None
            layers.append(GraphLayer(spec, slot.in_features, slot.out_features, args[slot.index], bias, payloads[i]))
            sources.append((i, slot.index, slot.bias_index))
        if not layers:
            return None
        plan = Plan(layers)
        masters = plan.masters()
        if any(_is_dtensor(t) for t in masters) or (cuda_only and not qat_step_hooks._device_ok(masters[0])):
            return None
        kinds = plan.kinds(masters)
        if len(kinds) > 1:
            return None
        plan.c, plan.ab = kinds.pop()  # fixed for this graph: Dynamo recompiles where autocast's state changes
        plan.set_act(masters[0].device)
        return cls(plan, sources)

    def rewrite(self, gm: fx.GraphModule, slots: list, as_linear, nodes: dict) -> None:
        """Each QAT site -> `_Site` on new graph inputs (after the existing ones, in the order `parts` returns)."""
        g = gm.graph
        last = [n for n in g.nodes if n.op == "placeholder"][-1]
        for (i, _, _), lay, fused in zip(self.sources, self.plan.layers, self.plan.act):
            names = ["w", *(["down"] if lay.r else []), *(["bias"] if lay.has_bias else [])]
            phs = {}
            for name in names:
                with g.inserting_after(last):
                    last = phs[name] = g.placeholder(f"robuq_step_slot{i}_{name}")
            target = _Site(lay.module.spec, fused)
            for site in slots[i].sites:
                node = as_linear(gm, nodes[site.node], site)
                x = node.args[0] if node.args else node.kwargs["input"]
                with g.inserting_before(node):
                    new = g.call_function(target, (x, phs["w"], phs.get("down"), phs.get("bias")))
                new.meta = {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")}
                node.replace_all_uses_with(new)
                g.erase_node(node)
        g.lint()
        gm.recompile()

    def example_parts(self, args, payloads) -> tuple:
        """`parts` as the compile's example inputs: fake tensors with static shapes in Dynamo's fake mode. Fakeified
        by AOTAutograd instead, these plain tensors (not parameters or buffers) would get symbolic sizes in Dynamo's
        shape env that no source of its guards can name (DiT's graph failed there)."""
        parts = self.parts(args, payloads)
        from torch._guards import detect_fake_mode
        mode = detect_fake_mode()
        if mode is None:
            return parts
        return tuple(mode.from_tensor(p, static_shapes=True) for p in parts)

    def parts(self, args, payloads) -> tuple:
        """Every layer's ([Q_w(R), A_c], B_c, bias_c) from this call's tensors, through one WeightSides node."""
        for lay, (i, w, b) in zip(self.plan.modules, self.sources):
            lay.set(args[w], args[b] if b is not None else None, payloads[i])
        masters = self.plan.masters()
        self.plan.check(masters)
        return WeightSides.apply(self.plan, *masters)
