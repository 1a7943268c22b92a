"""Capture a model, or one of its submodules, as an FX GraphModule; find its linear layers.

Whole model (`capture`, the whole-graph path of passes/qat.py):
1. `torch.fx.symbolic_trace`: keeps `call_module` nodes (dropout, norms still follow train/eval) and works on MLPs,
   ViTs and most plain models.
2. When tracing fails (data-dependent Python control flow, as in diffusers/HF models): `torch.export`
   (non-strict, dynamic batch) on `example_inputs`, then `ExportedProgram.module()`. Its parameters keep their
   qualified names; dropout nodes are turned back into `nn.Dropout` modules so `.train()/.eval()` work. The graph
   is captured in eval mode: train-only Python branches (e.g. DiT's class-label dropout) are not in it.
   HF models are captured as called: `config.use_cache` is off during the capture, so no KV-cache object is in it.

One submodule (`capture_submodule`, the drop-in path: an attention module, a parent of sibling layers): the same two
tools on that module alone, QATLinear / PackedLinear children kept as calls of those modules; torch.export runs on
the inputs the module received in one forward of the whole model (probe.py), all dimensions dynamic where they can be.
The GraphModule keeps the submodule's own children, parameters and buffers, so state_dict keys do not change.
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


# ---- one submodule (the drop-in path) -------------------------------------------------------------------------------
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
