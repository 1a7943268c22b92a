"""8-bit attention (METHOD.md §5): policy rules with `attn_bits` put per-token fake-quant on the query, key and value
inputs of `scaled_dot_product_attention`. The unit is the last dimension of SDPA's inputs, i.e. one scale per token
and head. P.V's probabilities stay inside SDPA (they are never materialised outside the fused kernel).

Lowering keeps these quantize-dequantize nodes: at inference they are the 8-bit q/k/v the attention consumes.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..capture import source_meta
from ..errors import PolicyError
from ..policy import Policy

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
                torch.ops.aten.scaled_dot_product_attention.default)
_QKV = ("query", "key", "value")


def _module_name(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return str(path)


def find_attention(gm: fx.GraphModule) -> list[tuple[fx.Node, str | None]]:
    return [(n, _module_name(n)) for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


def plan_attention(gm: fx.GraphModule, root: nn.Module, policy: Policy) -> list[tuple[fx.Node, str, int]]:
    """Which SDPA calls get quantized inputs; errors (before any edit) for attention rules that match none."""
    plan, used = [], set()
    for node, name in find_attention(gm):
        if name is None:
            continue
        try:
            module = root.get_submodule(name)
        except AttributeError:
            module = None
        i, bits = policy.match_attention(name, module)
        if bits is not None:
            plan.append((node, name, bits))
            used.add(i)
    for i, rule in policy.attention_rules:
        if i not in used:
            found = sorted({n for _, n in find_attention(gm) if n is not None})
            raise PolicyError(f"policy rule {i} ({rule.raw}) sets attn_bits but matches no module that calls "
                              f"scaled_dot_product_attention; modules with attention calls: {found[:10] or 'none'}")
    return plan


def apply_attention(gm: fx.GraphModule, plan: list[tuple[fx.Node, str, int]]) -> dict[str, int]:
    for node, name, bits in plan:
        args = list(node.args)
        kwargs = dict(node.kwargs)
        for i, key in enumerate(_QKV):
            src = args[i] if i < len(args) else kwargs.get(key)
            with gm.graph.inserting_before(node):
                q = gm.graph.call_function(torch.ops.robuq.fake_quant_act.default, (src, bits, True, "absmax"))
            q.meta = {"robuq_attn": {"layer": name, "input": key}, **source_meta(node)}
            if i < len(args):
                args[i] = q
            else:
                kwargs[key] = q
        node.args, node.kwargs = tuple(args), kwargs
    if plan:
        gm.graph.lint()
        gm.recompile()
    return {name: bits for _, name, bits in plan}
