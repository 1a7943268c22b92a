"""8-bit attention (METHOD.md §5): policy rules with `attn_bits` put per-token fake-quant on the query, key and value
inputs of `scaled_dot_product_attention`. The unit is the last dimension of SDPA's inputs, i.e. one scale per token
and head. P.V's probabilities stay inside SDPA (they are never materialised outside the fused kernel).

Lowering (`lower_attention`) replaces each "fake-quant q, k, v -> SDPA" by one `robuq::attention8` call (its
reference is exactly those calls, so lowered output stays bit-identical; on CUDA it runs the 8-bit flash kernel).
"""
from __future__ import annotations

import warnings

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


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _literal(v, kind):
    """A Python literal argument as `kind` (None -> its default); a graph value (e.g. the module's own `is_causal`
    argument) passes through as the node, to be read at run time, never truth-tested here."""
    if isinstance(v, fx.Node):
        return v
    return kind(v) if v is not None else kind()


def _static_fallback(node: fx.Node, args: dict, bits: int) -> str | None:
    """Why the GPU kernel will not take this call, from what the graph knows (None if it may)."""
    mask = args.get("attn_mask")
    if mask is not None:
        # a placeholder: the module's own argument (capture inlines the ones its example call left None)
        how = "may pass" if isinstance(mask, fx.Node) and mask.op == "placeholder" else "passes"
        return f"it {how} an attn_mask (the kernel takes none, or is_causal)"
    drop = args.get("dropout_p")
    if drop and not isinstance(drop, fx.Node):
        return f"dropout_p={drop}"
    if bits != 8:
        return f"attn_bits={bits} (the kernel is 8-bit)"
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if val is not None and hasattr(val, "shape"):
        d = val.shape[-1]
        if isinstance(d, int) and (d % 8 or d > 256):
            return f"head_dim={d} (the kernel takes multiples of 8 up to 256)"
    return None


def lower_attention(gm: fx.GraphModule) -> dict[str, str]:
    """Replace every quantized-attention site (fake-quant q, k, v feeding one SDPA) by `robuq::attention8`.
    Returns {module: why it falls back to the reference on GPU} and warns once per such module."""
    fallbacks: dict[str, str] = {}
    g = gm.graph
    changed = False
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        args = dict(zip(_SDPA_ARGS, node.args))
        args.update(node.kwargs)
        qkv = [args.get(key) for key in _QKV]
        tags = [n.meta.get("robuq_attn") if isinstance(n, fx.Node) else None for n in qkv]
        if not all(tags):
            continue
        bits = {n.args[1] for n in qkv}
        if len(bits) != 1:
            continue
        bits = bits.pop()
        name = tags[0]["layer"]
        srcs = [n.args[0] for n in qkv]
        with g.inserting_before(node):
            new = g.call_function(torch.ops.robuq.attention8.default,
                                  (*srcs, args.get("attn_mask"), _literal(args.get("dropout_p", 0.0), float),
                                   _literal(args.get("is_causal", False), bool), args.get("scale"),
                                   _literal(args.get("enable_gqa", False), bool), int(bits)))
        new.meta = source_meta(node)
        new.meta["robuq_attention8"] = name
        node.replace_all_uses_with(new)
        g.erase_node(node)
        for n in qkv:
            if not n.users:
                g.erase_node(n)
        why = _static_fallback(new, args, bits)
        if why and name not in fallbacks:
            fallbacks[name] = why
            warnings.warn(f"robuq: attention '{name}': {why}; the 8-bit GPU kernel does not take it, so this "
                          "module runs the reference math (fake-quant q, k, v + SDPA)", stacklevel=2)
        changed = True
    if changed:
        g.lint()
        gm.recompile()
    return fallbacks
