"""Capture a model, or one of its submodules, as an FX GraphModule; find its linear layers.

Whole model (`capture`, the whole-graph path of passes/qat.py):
1. `torch.fx.symbolic_trace`: keeps `call_module` nodes (dropout, norms still follow train/eval) and works on MLPs,
   ViTs and most plain models.
2. When tracing fails (data-dependent Python control flow, as in diffusers/HF models): `torch.export`
   (non-strict, dynamic batch) on `example_inputs`, then `ExportedProgram.module()`. Its parameters keep their
   qualified names; dropout nodes are turned back into `nn.Dropout` modules so `.train()/.eval()` work. The graph
   is captured in eval mode: train-only Python branches (e.g. DiT's class-label dropout) are not in it.
   HF models are captured as called: `config.use_cache` is off during the capture, so no KV-cache object is in it.

One submodule (the drop-in path): capture_region.py.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .errors import CaptureError

LINEAR_TARGETS = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)


@dataclass
class LinearSite:
    node: fx.Node  # call_function linear(x, weight, bias)
    name: str  # qualified module name (weight attribute minus ".weight")
    module: nn.Module | None  # the user's module object, for type matching
    in_features: int
    out_features: int


def capture(model: nn.Module, example_inputs=None) -> tuple[fx.GraphModule, str]:
    """Returns (graph module, method). `model` must already be the caller's private copy."""
    try:
        return fx.symbolic_trace(model), "symbolic_trace"
    except Exception as trace_err:  # noqa: BLE001 - any tracing failure means: try export
        if example_inputs is None:
            raise CaptureError(
                f"torch.fx.symbolic_trace could not trace {type(model).__name__}: "
                f"{type(trace_err).__name__}: {_first_line(trace_err)}\n"
                "Pass example_inputs=(args...) or a dict of keyword arguments so robuq_fx can capture it with "
                "torch.export instead.") from trace_err
        try:
            return _export(model, example_inputs), "torch.export"
        except Exception as export_err:  # noqa: BLE001
            raise CaptureError(
                f"could not capture {type(model).__name__}: symbolic_trace failed with "
                f"'{_first_line(trace_err)}', and torch.export(strict=False) failed with "
                f"{type(export_err).__name__}: '{_first_line(export_err)}'. Make the failing construct traceable "
                "(see torch.export's error above), or quantize the submodules that contain the linear layers "
                "separately.") from export_err


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _split_inputs(example_inputs):
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
                       f"inputs, got {type(example_inputs).__name__}")


def _export(model: nn.Module, example_inputs) -> fx.GraphModule:
    args, kwargs = _split_inputs(example_inputs)
    was_training = model.training
    model.eval()

    def batch_dim(x):
        return {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    cfg = getattr(model, "config", None)
    cache = getattr(cfg, "use_cache", None) if kwargs.get("use_cache") is None else None
    try:
        if cache:  # an HF model builds a KV cache object by default: torch.export can neither take nor return it
            cfg.use_cache = False
        try:
            # torch.export matches `dynamic_shapes` against the inputs bound to forward()'s signature (one entry
            # per bound argument, by name), not against the (args, kwargs) pair: a spec shaped like
            # (args, kwargs) never matched, so every model silently fell back to a static batch size.
            bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
            dyn = {name: pytree.tree_map(batch_dim, value) for name, value in bound.items()}
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dyn)
        except Exception as e:  # noqa: BLE001 - some models cannot take a dynamic batch: fall back to static shapes
            ep = torch.export.export(model, args, kwargs, strict=False)
            warnings.warn(f"torch.export could not capture {type(model).__name__} with a dynamic batch "
                          f"({type(e).__name__}: {_first_line(e)}); the graph only accepts the example inputs' "
                          "shapes. A batch of 1 in example_inputs always does this (export specialises sizes "
                          "0 and 1): capture with a batch of 2 or more.", stacklevel=4)
    finally:
        model.train(was_training)
        if cache:
            cfg.use_cache = cache
    gm = ep.module()
    # ExportedProgram.module() forbids train()/eval(); we make dropout a real module again so both work.
    for attr in ("train", "eval"):
        if attr in gm.__dict__:
            delattr(gm, attr)
    _dropout_to_modules(gm)
    _drop_metadata_asserts(gm)
    _as_captured_graph(gm)
    gm.train(was_training)
    return gm


def _as_captured_graph(gm: fx.GraphModule) -> None:
    """export's module as a CapturedGraph, which pickles as its graph, without export's two hooks that only act where
    a graph input is an nn.Module (closures over the empty set of such inputs here; closures do not pickle)."""
    from .passes.region_pickle import CapturedGraph
    for hooks in (gm._forward_pre_hooks, gm._forward_hooks):
        for k, hook in list(hooks.items()):
            cells = [c.cell_contents for c in getattr(hook, "__closure__", None) or ()]
            if getattr(hook, "__name__", "") == "<lambda>" and cells == [set()]:
                del hooks[k]
                gm._forward_hooks_always_called.pop(k, None)
    gm.__class__ = type("GraphModuleImpl", (CapturedGraph,), {})
    gm.recompile()  # (GraphModule keeps the generated forward on the instance's class)


def _drop_metadata_asserts(gm: fx.GraphModule) -> None:
    """torch.export records the dtype/device of some intermediates as runtime asserts; they would forbid autocast
    and reject a graph captured in fp32 but run in bf16. (Other ops still bake the capture device in: capture on
    the device you run on.)"""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default \
                and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def _dropout_to_modules(gm: fx.GraphModule) -> None:
    k = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.dropout.default:
            x, p = node.args[0], node.args[1]
            name = f"_robuq_dropout_{k}"
            k += 1
            gm.add_submodule(name, nn.Dropout(p))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (x,))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    gm.recompile()


def source_meta(node: fx.Node) -> dict:
    """The meta entries that tie a node to the user's source (module path, stack trace): copied onto the nodes a
    pass inserts in its place, so later passes and error messages still know where it came from."""
    return {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}


def _arg(node: fx.Node, i: int, key: str):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key)


def normalize_linear_modules(gm: fx.GraphModule) -> None:
    """call_module(Linear) -> linear(x, get_attr weight, get_attr bias), so every path sees one node form."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, nn.Linear) or node.kwargs or len(node.args) != 1:
            continue
        with gm.graph.inserting_before(node):
            w = gm.graph.get_attr(f"{node.target}.weight")
            b = gm.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            lin = gm.graph.call_function(F.linear, (node.args[0], w, b))
        lin.meta = dict(node.meta)
        node.replace_all_uses_with(lin)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()


def find_linears(gm: fx.GraphModule, root: nn.Module) -> list[LinearSite]:
    """Linear calls whose weight is a module attribute, in graph order. `root`: the module the graph came from."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        w = _arg(node, 1, "weight")
        if not isinstance(w, fx.Node) or w.op != "get_attr" or not str(w.target).endswith("weight"):
            continue
        name = w.target[: -len("weight")].rstrip(".")
        try:
            module = root.get_submodule(name)
        except AttributeError:
            module = None
        weight = gm.get_parameter(w.target) if _is_param(gm, w.target) else None
        if weight is None or weight.dim() != 2:
            continue
        sites.append(LinearSite(node, name, module, weight.shape[1], weight.shape[0]))
    return sites


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def private_copy(model: nn.Module) -> nn.Module:
    """robuq_fx never mutates the user's model: passes work on a deep copy."""
    try:
        return copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"could not copy {type(model).__name__} (robuq_fx works on a copy so your model is "
                           f"never mutated): {e}") from e
