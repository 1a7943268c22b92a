"""Lowering pass: `lower(qat_model)` turns every RobuQ layer of a QAT graph into one `robuq::qlinear` call on packed
weights. Per layer: R = W H - A B is quantized once (the QAT code path), packed, and stored in a `PackedLinear`
(qweight, w_scale, bias, lrb_down, lrb_up buffers) that replaces the FP module; the FP master weight is dropped."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..capture import source_meta
from ..errors import LoweringError
from ..modules import PackedLinear, use_device_layout
from ..spec import LayerSpec
from .attention import lower_attention
from .fuse import fuse_lowered, qlinear_node
from .qat import ROBUQ_META, check_module, set_robuq_info

ROOT_PACKED = "_robuq_root"


def lower(qmodel: nn.Module, *, compute: bool = True, progress: bool | None = None,
          fuse: bool = True) -> nn.Module:
    """Return an inference copy of a `robuq_fx.quantize` model with packed weights (qmodel is not modified): your
    model with PackedLinear layers (drop-in form, passes/dropin.py) or one GraphModule (whole-graph form, below).

    compute=False builds the packed buffers empty (zeros) instead of quantizing: for `load_quantized`, which fills
    them from a checkpoint. progress: tqdm bar over layers (default: only when there are more than 32 layers).
    fuse: sibling layers that read one input with one activation spec (q/k/v, gate/up) become one qlinear call
    (passes/fuse.py; outputs bit-identical to fuse=False).
    """
    check_module(qmodel, "lower")
    info = getattr(qmodel, ROBUQ_META, None)
    if info is not None and info["stage"] != "qat":
        raise LoweringError("this model is already lowered")
    if info is not None and info.get("form") == "modules":
        from .dropin import lower_modules  # the drop-in path: your model with QATLinear -> PackedLinear
        return lower_modules(qmodel, compute=compute, progress=progress, fuse=fuse)
    if not isinstance(qmodel, fx.GraphModule) or info is None:
        raise LoweringError(f"lower() needs a model returned by robuq_fx.quantize(); got {type(qmodel).__name__} "
                            "with no robuq nodes")
    if info["stage"] != "qat":
        raise LoweringError("this model is already lowered")
    gm = copy.deepcopy(qmodel)
    layers = {n: LayerSpec(**d) for n, d in info["layers"].items()}
    sites = _sites(gm.graph)
    missing = sorted(set(layers) - {n for n, _ in sites})
    if missing:
        raise LoweringError(f"robuq layers {missing[:5]} have no robuq nodes left in the graph "
                            "(was the graph edited after quantize()?)")
    show = progress if progress is not None else len(layers) > 32
    with torch.no_grad():
        for name in tqdm(layers, desc="lower", disable=not show, unit="layer"):
            _pack_layer(gm, name, layers[name], compute)
    rewrite_sites(gm, sites)
    lower_attention(gm)  # fake-quant q, k, v + SDPA -> robuq::attention8
    _drop_unused_weights(gm, layers)
    set_robuq_info(gm, dict(info, stage="lowered"))  # not setattr: must survive deepcopy (see qat.set_robuq_info)
    if fuse:
        fuse_lowered(gm)
    use_device_layout(gm)  # fp8 codes as the one weight copy on fp8-capable GPUs (modules.PackedLinear)
    gm.eval()
    return gm


def rewrite_sites(gm: fx.GraphModule, sites: dict | None = None) -> None:
    """Replace every tagged QAT site of `gm` by one robuq::qlinear call reading the `PackedLinear` already installed
    at `packed_path(layer)`. Also used by the torch.compile backend (robuq_fx/backend/) on Dynamo graphs."""
    for (name, k), nodes in (_sites(gm.graph) if sites is None else sites).items():
        _rewrite_site(gm, name, nodes)
    for n in list(gm.graph.nodes):  # the FP weights' get_attr nodes; a full DCE could drop impure calls
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()


def _sites(graph: fx.Graph) -> dict:
    sites: dict = {}
    for node in graph.nodes:
        tag = node.meta.get("robuq")
        if tag is not None:
            sites.setdefault((tag["layer"], tag["site"]), []).append(node)
    return sites


def _pack_layer(gm: fx.GraphModule, name: str, spec: LayerSpec, compute: bool) -> None:
    old = gm.get_submodule(name)
    w = old.weight
    bias = getattr(old, "bias", None)
    if compute:
        packed = PackedLinear.from_float(w, bias, getattr(old, "lrb_down", None), getattr(old, "lrb_up", None), spec)
    else:
        n, k = w.shape
        packed = PackedLinear(k, n, spec, bias is not None, w.dtype, w.device)
    packed.__dict__["_robuq_fp_weight"] = w  # not registered: kept only until _drop_unused_weights decides
    parent, _, leaf = packed_path(name).rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, packed)


def packed_path(name: str) -> str:
    """Where a layer's PackedLinear lives; a model that *is* one nn.Linear keeps it under `_robuq_root`."""
    return name or ROOT_PACKED


def _site_input(g: fx.Graph, nodes: list[fx.Node], tag: dict) -> fx.Node:
    """The activation a site reads: its only input that is neither its own node nor an attribute. (Not by the name
    recorded at quantize time: lowering the layer before it may have replaced that node.)"""
    inside = set(nodes)
    outer = {a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
    if len(outer) == 1:
        return outer.pop()
    return next(n for n in g.nodes if n.name == tag["x"])


def _rewrite_site(gm: fx.GraphModule, name: str, nodes: list[fx.Node]) -> None:
    g = gm.graph
    tag = next(n.meta["robuq"] for n in nodes)
    out = next(n for n in nodes if n.meta["robuq"]["role"] == "out")
    x = _site_input(g, nodes, tag)
    path = packed_path(name)
    packed: PackedLinear = gm.get_submodule(path)
    with g.inserting_before(out):
        new = qlinear_node(g, x, path, packed)
    new.meta = source_meta(out)
    new.meta["robuq_lowered"] = name
    out.replace_all_uses_with(new)
    for n in reversed(nodes):
        if not n.users:
            g.erase_node(n)
    leftover = [n.name for n in nodes if n in set(g.nodes)]
    if leftover:
        raise LoweringError(f"layer '{name}': robuq nodes {leftover} are still used elsewhere in the graph")


def _drop_unused_weights(gm: fx.GraphModule, layers: dict) -> None:
    """The FP master weight goes unless some other node still reads it (e.g. a weight tied to an embedding)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in layers:
        packed = gm.get_submodule(packed_path(name))
        w = packed.__dict__.pop("_robuq_fp_weight")
        if not name:  # the root was the Linear: its own FP parameters go
            for attr in ("weight", "bias", "lrb_down", "lrb_up"):
                if attr not in used and attr in gm._parameters:
                    del gm._parameters[attr]
        elif f"{name}.weight" in used:
            packed.register_buffer("weight", w.detach())
