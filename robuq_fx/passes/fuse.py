"""Activation fusion: a GELU whose only reader is a quantized layer moves into that layer's `robuq::qlinear` call
(`act="gelu"` / `"gelu_tanh"`), so a kernel that supports it applies the activation while it quantizes the input
(the DiT / ViT / Llama-style MLP: fc1 -> GELU -> fc2). The activation tensor is then never written: the GELU pass
(read + write of M x 4K values in bf16) disappears. Kernels without the fusion get act(x) computed first by the op,
so the result is the same as the unfused graph on every kernel.

Recognised producers: `aten.gelu` (torch.export graphs), `F.gelu` / `torch._C._nn.gelu` (traced and Dynamo graphs)
and `nn.GELU` modules (symbolic_trace graphs), with approximate "none" or "tanh".
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

_GELU_FNS = {torch.ops.aten.gelu.default, F.gelu, torch._C._nn.gelu}
_N_ARGS = 13  # robuq::qlinear's arguments before `act`


def _gelu_kind(gm: fx.GraphModule, node) -> tuple | None:
    """(act name, input node) when `node` is a GELU call, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in _GELU_FNS:
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        inp = node.args[0] if node.args else node.kwargs.get("input")
    elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.GELU) and len(node.args) == 1:
        approx, inp = gm.get_submodule(node.target).approximate, node.args[0]
    else:
        return None
    if approx not in ("none", "tanh") or not isinstance(inp, fx.Node):
        return None
    return ("gelu_tanh" if approx == "tanh" else "gelu"), inp


def fuse_activations(gm: fx.GraphModule) -> int:
    """Fuse every GELU that feeds only a robuq::qlinear into it; returns how many were fused."""
    fused = 0
    for q in list(gm.graph.nodes):
        if q.op != "call_function" or q.target is not torch.ops.robuq.qlinear.default:
            continue
        if len(q.args) != _N_ARGS or q.kwargs.get("act", "none") != "none":
            continue
        x = q.args[0]
        kind = _gelu_kind(gm, x)
        if kind is None or len(x.users) != 1:
            continue
        act, inp = kind
        q.args = (inp, *q.args[1:])
        q.kwargs = {**q.kwargs, "act": act}
        gm.graph.erase_node(x)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused
