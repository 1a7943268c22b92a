"""Where a layer's activation bits live in a QAT model, for AMPN (ampn.py) to set and count them in place:

    drop-in form      the layer's QATLinear: its `spec` (a_bits, a_sym) decides; a forward pre-hook counts rows
    whole-graph form  its robuq::fake_quant_act(x, a_bits, sym, clip) nodes (also functional sites of a region):
                      their arguments decide; a counting op is swapped in for one pass

No re-capture and no new SVD per measurement: bits change in place and the graph modules touched are recompiled.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.fx as fx
import torch.nn as nn

from .passes.qat import robuq_info
from .qat_linear import QATLinear
from .spec import LayerSpec

_FQA = torch.ops.robuq.fake_quant_act.default


def _sym(spec: LayerSpec, bits: int) -> bool:
    """Symmetric codes at `bits`? The rule's a_sym (automatic: bits >= 3), and never at 1-2 bits (METHOD.md §3)."""
    return bits >= 3 and (spec.a_sym if spec.a_sym is not None else True)


def act_handles(q: nn.Module) -> dict[str, list]:
    """Per layer, what quantizes its input: its QATLinear (drop-in form: the spec decides) or its
    robuq::fake_quant_act nodes as (graph module, node) (whole-graph form, and functional sites in regions)."""
    out: dict[str, list] = {}
    for name in robuq_info(q)["layers"]:
        try:
            m = q.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(m, QATLinear) and m.spec.a_bits < 16:
            out[name] = [m]
    for path, gm in q.named_modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            tag = node.meta.get("robuq")
            if node.op == "call_function" and node.target is _FQA and tag is not None:
                out.setdefault(".".join(p for p in (path, tag["layer"]) if p), []).append((gm, node))
    return out


def set_bits(q: nn.Module, nodes: dict, name: str, bits: int, spec: LayerSpec) -> None:
    """Set the layer's activation bits in place (a QATLinear's spec, or its fake_quant_act(x, a_bits, sym, clip)
    nodes) and keep the layer's entry in robuq_info(q)["layers"] consistent with them (lower() reads it)."""
    sym = _sym(spec, bits)
    graphs = {}
    for h in nodes[name]:
        if isinstance(h, QATLinear):
            h.spec = dataclasses.replace(h.spec, a_bits=bits, a_sym=sym)
        else:
            gm, node = h
            node.args = (node.args[0], bits, sym, *node.args[3:])
            graphs[id(gm)] = gm
    for gm in graphs.values():
        gm.recompile()
    entry = robuq_info(q)["layers"][name]
    entry["a_bits"], entry["a_sym"] = bits, sym


def site_shape(q: nn.Module, name: str) -> tuple[int, int]:
    m = q.get_submodule(name) if name else q
    if isinstance(m, QATLinear):
        return m.in_features, m.out_features
    w = q.get_parameter(f"{name}.weight" if name else "weight")
    return int(w.shape[1]), int(w.shape[0])


_TOKENS: dict | None = None


def _counting_fake_quant_act(x, a_bits, sym, clip, layer, group=0):
    """fake_quant_act that also counts the rows (tokens) it sees: swapped in for one pass to get MACs."""
    _TOKENS[layer] += x.numel() // max(x.shape[-1], 1)
    return _FQA(x, a_bits, sym, clip, group=group) if group else _FQA(x, a_bits, sym, clip)


class counting:
    def __init__(self, gm, nodes, names, tokens):
        self.gm, self.nodes, self.names, self.tokens = gm, nodes, names, tokens
        self.hooks = []

    def __enter__(self):
        global _TOKENS
        _TOKENS = self.tokens
        graphs = {}
        for n in self.names:
            for h in self.nodes[n]:
                if isinstance(h, QATLinear):
                    self.hooks.append(h.register_forward_pre_hook(partial(_count_rows, n)))
                else:
                    gm, node = h
                    node.target, node.args = _counting_fake_quant_act, (*node.args, n)
                    graphs[id(gm)] = gm
        for gm in graphs.values():
            gm.recompile()

    def __exit__(self, *exc):
        global _TOKENS
        _TOKENS = None
        for hook in self.hooks:
            hook.remove()
        graphs = {}
        for n in self.names:
            for h in self.nodes[n]:
                if not isinstance(h, QATLinear):
                    gm, node = h
                    node.target, node.args = _FQA, node.args[:-1]
                    graphs[id(gm)] = gm
        for gm in graphs.values():
            gm.recompile()


def _count_rows(layer, module, args):
    x = args[0]
    _TOKENS[layer] += x.numel() // max(x.shape[-1], 1)
