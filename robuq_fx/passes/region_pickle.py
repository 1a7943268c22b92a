"""Pickling the GraphModules torch.export made for us (a `RegionModule`, or a whole-graph model as `CapturedGraph`), so
that `torch.save(model)` / `pickle` of a QAT or lowered model works.

GraphModule pickles its generated code and traces that code again on load, with the tracer class that made the
graph; torch.export's tracer (proxy_tensor's `_ModuleStackTracer`) cannot be built again that way, and export's input
guard module holds a function made by `exec`. These modules pickle their graph instead: each node's op, name,
target, arguments and the meta entries that pickle (a fake tensor's shape and dtype as a meta tensor: the lowering
reads them), with ATen and custom operators by their names; the guard function by its code object (`marshal`: the same
Python version loads it, another raises a RobuQError that says what to do).
"""
from __future__ import annotations

import inspect
import marshal
import math
import pickle
import sys

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import RobuQError

GUARDS = "_guards_fn"


class Tag:
    """A stand-in in the pickled state: "node" (a node argument by its name: the node made before it), "op" (an
    operator by (namespace, name, overload), "" for a packet) or "spec" (a pytree TreeSpec by its JSON form: unpickling
    a TreeSpec object warns on torch 2.13)."""
    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value):
        self.kind, self.value = kind, value

    def __reduce__(self):
        return Tag, (self.kind, self.value)


def _op_name(op) -> tuple | None:
    """(namespace, name, overload) of an OpOverload / OpOverloadPacket ("" overload for a packet), else None."""
    if isinstance(op, torch._ops.OpOverload):
        ns, name = op._schema.name.split("::")
        return ns, name, op._overloadname
    if isinstance(op, torch._ops.OpOverloadPacket):
        ns, name = op._qualified_op_name.split("::")
        return ns, name, ""
    return None


def _resolve_op(ns: str, name: str, overload: str):
    packet = getattr(getattr(torch.ops, ns), name)
    return packet if overload == "" else getattr(packet, overload)


def _map(v, fn):
    """fn applied to the leaves of v's dicts, lists, tuples (named ones too) and slices."""
    if isinstance(v, dict):
        return {k: _map(x, fn) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        items = [_map(x, fn) for x in v]
        return type(v)(*items) if hasattr(v, "_fields") else type(v)(items)
    if isinstance(v, slice):
        return slice(_map(v.start, fn), _map(v.stop, fn), _map(v.step, fn))
    return fn(v)


def _spec_leaf(v):
    if isinstance(v, pytree.TreeSpec):
        try:
            return Tag("spec", pytree.treespec_dumps(v))
        except Exception:  # a node type without a serialized name: the object itself
            return v
    return v


def pack_specs(v):
    """v with its TreeSpecs as Tag("spec") where their JSON form exists."""
    return _map(v, _spec_leaf)


def unpack_specs(v):
    return _map(v, lambda x: pytree.treespec_loads(x.value) if isinstance(x, Tag) and x.kind == "spec" else x)


def _arg_leaf(a):
    if isinstance(a, fx.Node):
        return Tag("node", a.name)
    key = _op_name(a)
    return Tag("op", key) if key is not None else a


def _decode(a, env: dict):
    def leaf(x):
        if not isinstance(x, Tag):
            return x
        return env[x.value] if x.kind == "node" else _resolve_op(*x.value)
    return _map(a, leaf)


def _size(d) -> int | None:
    """A dimension as an int: a symbolic one by its hint (the size in the capture's example), else None."""
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) else None


def _meta(meta: dict) -> dict:
    """The entries that pickle; a (fake) tensor as a meta tensor of its dtype and shape, symbolic sizes by their
    hints (what the passes read: attention.py's head dimension)."""
    out = {}
    for k, v in meta.items():
        if isinstance(v, torch.Tensor):
            shape = [_size(d) for d in v.shape]
            if None not in shape:
                out[k] = torch.empty(shape, dtype=v.dtype, device="meta")
            continue
        try:  # (protocol 2: torch.save's)
            pickle.dumps(v, protocol=2)
        except Exception:  # symbolic sizes, tensor metadata with fake tensors, ...: dropped
            continue
        out[k] = v
    return out


def graph_state(graph: fx.Graph, where: str) -> dict:
    nodes = []
    for n in graph.nodes:
        target = n.target
        if n.op == "call_function":
            key = _op_name(target)
            if key is not None:
                target = Tag("op", key)
            else:
                try:
                    pickle.dumps(target, protocol=2)
                except Exception as e:
                    raise pickle.PicklingError(
                        f"robuq_fx: '{where}' cannot be pickled: its node '{n.name}' calls {target!r}, which "
                        f"does not pickle ({e}); save its state_dict instead") from e
        nodes.append((n.op, n.name, target, _map(n.args, _arg_leaf), _map(n.kwargs, _arg_leaf), _meta(n.meta)))
    codegen = graph._codegen
    return {"nodes": nodes, "codegen": (type(codegen), pack_specs(dict(codegen.__dict__)))}


def graph_from_state(state: dict, tracer_cls=None) -> fx.Graph:
    graph = fx.Graph(tracer_cls=tracer_cls)
    cls, attrs = state["codegen"]
    graph._codegen = cls.__new__(cls)
    graph._codegen.__dict__.update(unpack_specs(attrs))
    env: dict = {}
    for op, name, target, args, kwargs, meta in state["nodes"]:
        node = graph.create_node(op, _decode(target, env), _decode(args, env), _decode(kwargs, env), name=name)
        node.meta.update(meta)
        env[name] = node
    return graph


def guard_function(module):
    """The function inside torch.export's guard module (`_guards_fn`): its forward wraps one generated function that
    closes over nothing. None where the module has another form."""
    fn = getattr(module, "forward", None)
    inner = [c.cell_contents for c in getattr(fn, "__closure__", None) or () if inspect.isfunction(c.cell_contents)]
    return inner[0] if len(inner) == 1 and not inner[0].__closure__ else None


def guards_state(module, where: str) -> dict | None:
    """torch.export's guard module as (Python version, its function's marshalled code), None without one."""
    if module is None:
        return None
    inner = guard_function(module)
    if inner is None:
        raise pickle.PicklingError(
            f"robuq_fx: '{where}' cannot be pickled: its torch.export input-guard module is not the form this "
            f"torch version was known to make (a wrapped function); save its state_dict instead")
    return {"python": tuple(sys.version_info[:2]), "code": marshal.dumps(inner.__code__)}


def guards_from_state(state: dict, where: str):
    if tuple(state["python"]) != tuple(sys.version_info[:2]):
        raise RobuQError(
            f"robuq_fx: '{where}' was pickled under Python {'.'.join(map(str, state['python']))} and its "
            f"torch.export input check is Python bytecode: load it under that version, or save the model's "
            f"state_dict and quantize a fresh model to load it into")
    from torch.export._unlift import GuardsFn
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP
    namespace = {**SYMPY_INTERP, "math": math, "inf": float("inf")}  # (as torch.export builds it; torch in it)
    fn = type(lambda: None)(marshal.loads(state["code"]), namespace, "_")
    module = GuardsFn()
    module.forward = torch._dynamo.dont_skip_tracing(fn)
    module._is_impure = True
    return module


def reduce(gm: fx.GraphModule, where: str, finish=None) -> tuple:
    """`__reduce__` of a GraphModule whose class derives `type(gm).__bases__[0]` directly (the per-instance class
    GraphModule makes): its attributes, its graph node by node and export's guard function apart. finish: a picklable
    function called on the rebuilt module before its graph is set."""
    base, = type(gm).__bases__
    body = {k: pack_specs(v) if isinstance(v, pytree.TreeSpec) else v
            for k, v in gm.__dict__.items() if k not in ("_graph", "_code")}
    body["_modules"] = type(gm._modules)((k, m) for k, m in gm._modules.items() if k != GUARDS)
    guards = guards_state(gm._modules.get(GUARDS), where)
    return rebuild, (base, body, graph_state(gm.graph, where), guards, where, finish)


def rebuild(base: type, body: dict, graph: dict, guards: dict | None, where: str, finish=None) -> fx.GraphModule:
    """reduce's inverse: an instance of a new class derived from base, as GraphModule makes one."""
    gm = object.__new__(type("GraphModuleImpl", (base,), {}))
    gm.__dict__.update({k: unpack_specs(v) if isinstance(v, Tag) else v for k, v in body.items()})
    gm._modules = type(body["_modules"])(body["_modules"])
    if guards is not None:
        gm._modules[GUARDS] = guards_from_state(guards, where)
    if finish is not None:
        finish(gm)
    gm.graph = graph_from_state(graph, body.get("_tracer_cls"))  # (the setter recompiles)
    return gm


class CapturedGraph(fx.GraphModule):
    """A whole model torch.export captured (capture._export): pickles as its graph (`reduce`)."""

    def __reduce__(self):
        if len(type(self).__bases__) != 1:
            return super().__reduce__()
        return reduce(self, "the whole-graph model")
