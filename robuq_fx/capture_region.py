"""Capture one submodule as an FX GraphModule (`capture_submodule`, the drop-in path: an attention module, a parent
of sibling layers): capture.py's two tools on that module alone, QATLinear / PackedLinear children kept as calls of
those modules; torch.export runs on the inputs the module received in one forward of the whole model (probe.py), all
dimensions dynamic where they can be. The GraphModule keeps the submodule's own children, parameters and buffers, so
state_dict keys do not change.
"""
from __future__ import annotations

import copy
import inspect
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .capture import _drop_metadata_asserts, _dropout_to_modules, _first_line
from .errors import CaptureError


_PLAIN = (torch.Tensor, type(None), bool, int, float, str, torch.dtype, torch.device)


def unplain_input(call) -> str | None:
    """Why a recorded call cannot be captured: the first value that is not a tensor, a constant or a container of
    them (an HF `DynamicCache`, a scheduler object, ...), or None."""
    def walk(v, where):
        if isinstance(v, (tuple, list)):
            return next((r for i, x in enumerate(v) if (r := walk(x, f"{where}[{i}]"))), None)
        if isinstance(v, dict):
            return next((r for k, x in v.items() if (r := walk(x, f"{where}[{k!r}]"))), None)
        return None if isinstance(v, _PLAIN) else f"{where} is a {type(v).__name__}"
    args, kwargs = call
    return walk(list(args), "argument") or next((r for k, v in kwargs.items() if (r := walk(v, f"argument '{k}'"))),
                                                 None)


class _LeafTracer(fx.Tracer):
    """symbolic_trace that keeps robuq's layer modules as call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .modules import PackedLinear
        from .qat_linear import QATLinear
        return isinstance(m, (QATLinear, PackedLinear)) or super().is_leaf_module(m, qualname)


def capture_submodule(module: nn.Module, call=None, path: str = "") -> tuple[fx.GraphModule, str, dict | None]:
    """(GraphModule, method, call_spec) for `module` alone. call: the (args, kwargs) it got in one forward of the
    model (probe.py), needed when symbolic_trace fails. call_spec (torch.export only): how a call maps to the
    graph's flat inputs and the structure it was captured for (passes/region.py checks every call against it)."""
    where = f"'{path}' ({type(module).__name__})" if path else type(module).__name__
    concrete = None
    if call is not None:  # arguments that were None stay None (FX inserts a check), not proxies
        bound = _bind(module, call)
        concrete = {k: None for k, v in bound.arguments.items() if v is None} or None
    try:
        graph = _LeafTracer().trace(module, concrete_args=concrete)
        _keep_argument_names(graph, concrete)
        gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
        method, spec = "symbolic_trace", None
    except Exception as trace_err:  # noqa: BLE001 - any tracing failure means: try export
        if call is None:
            raise CaptureError(f"could not capture {where}: symbolic_trace failed ({type(trace_err).__name__}: "
                               f"{_first_line(trace_err)}) and there are no example inputs for torch.export: pass "
                               "example_inputs=(args...) or a dict of keyword arguments") from trace_err
        why = unplain_input(call)
        if why:
            raise CaptureError(f"could not capture {where}: its {why}, which a captured graph can neither take nor "
                               f"update (symbolic_trace failed too: {_first_line(trace_err)})") from trace_err
        try:
            gm, spec = _export_call(module, call)
        except Exception as export_err:  # noqa: BLE001
            raise CaptureError(f"could not capture {where}: symbolic_trace failed with '{_first_line(trace_err)}', "
                               f"and torch.export(strict=False) failed with {type(export_err).__name__}: "
                               f"'{_first_line(export_err)}'") from export_err
        method = "torch.export"
    _leaf_calls_to_modules(gm, module)
    _adopt(gm, module)
    gm.train(module.training)
    return gm, method, spec


def _keep_argument_names(graph: fx.Graph, concrete: dict | None) -> None:
    """FX renames the placeholder of an argument specialised to None (`attn_mask` -> `attn_mask_1`), so the captured
    forward would refuse `attn_mask=None` by keyword, as timm's blocks pass it: give it its name back (the body
    keeps the renamed variable)."""
    targets = {n.target for n in graph.nodes if n.op == "placeholder"}
    for n in graph.nodes:
        if n.op != "placeholder" or not concrete:
            continue
        base, _, suffix = str(n.target).rpartition("_")
        if base in concrete and suffix.isdigit() and base not in targets:
            n.target = base
            targets.add(base)


def _bind(module: nn.Module, call) -> inspect.BoundArguments:
    bound = inspect.signature(module.forward).bind(*call[0], **call[1])
    bound.apply_defaults()
    return bound


def _export_call(module: nn.Module, call) -> tuple[fx.GraphModule, dict]:
    """torch.export of `module` on its recorded call, through a forward that takes every argument positionally:
    torch.export (2.13) cannot match dynamic_shapes to a **kwargs forward (HF attention modules), and a flat call
    is what passes/region.py replays anyway."""
    from .qat_linear import capturing

    bound = _bind(module, call)
    names, flat = list(bound.arguments), tuple(bound.arguments.values())
    sig, cls = bound.signature, type(module)

    def forward(self, *values):
        ba = inspect.BoundArguments(sig, dict(zip(names, values)))
        return cls.forward(self, *ba.args, **ba.kwargs)
    flat_mod = copy.copy(module)
    flat_mod.__class__ = type(cls.__name__, (cls,), {"forward": forward})

    def dims(x):
        return {i: torch.export.Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None
    was = module.training
    module.eval()
    flat_mod.eval()
    try:
        with capturing(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*specialized.*")  # 0/1 sizes: expected, the call decides
            try:
                ep = torch.export.export(flat_mod, flat, strict=False,
                                         dynamic_shapes=(tuple(pytree.tree_map(dims, v) for v in flat),))
            except Exception:  # noqa: BLE001 - some modules cannot take dynamic sizes: static ones
                ep = torch.export.export(flat_mod, flat, strict=False)
    finally:
        module.train(was)
    gm = ep.module()
    for attr in ("train", "eval"):
        if attr in gm.__dict__:
            delattr(gm, attr)
    # export's hooks check calls against the flat signature (and a deep copy drops them anyway): the region's own
    # forward maps and checks each call (passes/region.py)
    gm._forward_pre_hooks.clear()
    gm._forward_hooks.clear()
    _dropout_to_modules(gm)
    _drop_metadata_asserts(gm)
    first = next((t for t in pytree.tree_leaves(flat) if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
    params = [(q.name, int(q.kind), q.default is not q.empty, None if q.default is q.empty else q.default)
              for q in sig.parameters.values()]
    spec = {"names": names, "params": params, "forward": f"{cls.__module__}.{cls.__qualname__}.forward",
            "args": [arg_structure(v) for v in flat],  # the activations' dtype and device: what export bakes in
            "target": (str(first.dtype).removeprefix("torch."), str(first.device)) if first is not None else None}
    return gm, spec


def arg_structure(v) -> tuple[str, list, str]:
    """What torch.export bakes into a graph about one argument: its pytree structure, its leaves (("tensor",), or
    ("value", x) for a constant) and, for messages, what it was."""
    leaves, tree = pytree.tree_flatten(v)
    return str(tree), [leaf_key(x) for x in leaves], describe(v)


def leaf_key(x) -> tuple:
    return ("tensor",) if isinstance(x, torch.Tensor) else ("value", type(x).__name__, x)


def describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return "a tensor"
    if v is None or isinstance(v, (bool, int, float, str)):
        return repr(v)
    return f"a {type(v).__name__}"


def _leaf_calls_to_modules(gm: fx.GraphModule, module: nn.Module) -> None:
    """robuq::leaf_linear(x, <path>.weight, ...) nodes (a QATLinear under torch.export) -> call_module(<path>)."""
    g, changed = gm.graph, False
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not torch.ops.robuq.leaf_linear.default:
            continue
        w = node.args[1]
        path = str(w.target)[: -len(".weight")]
        with g.inserting_before(node):
            call = g.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        g.erase_node(node)
        changed = True
    if changed:
        for n in list(g.nodes):
            if n.op == "get_attr" and not n.users:
                g.erase_node(n)
        g.lint()
        gm.recompile()


def _adopt(gm: fx.GraphModule, module: nn.Module) -> None:
    """Give `gm` the module's own children, parameters and buffers (the graph reads them by the same paths): no
    state_dict key changes, unused entries stay, and robuq's layer modules are the real objects again."""
    gm._modules.update(module._modules)
    gm._parameters.update(module._parameters)
    gm._buffers.update(module._buffers)
    gm._non_persistent_buffers_set.update(module._non_persistent_buffers_set)
