"""`RegionModule`: a captured submodule standing where the user's submodule stood (the drop-in path).

The graph passes (attention fake-quant and its lowering, sibling fusion) need a graph. On the drop-in path only the
smallest submodule that holds such a rewrite is captured (capture_region.capture_submodule); the region replaces it
in its parent and everything around it stays the user's code.

A region captured by torch.export was traced for one call structure: which arguments are tensors and which are None,
the values of non-tensor arguments (baked into the graph). Every call is checked against it (not while torch.compile
traces), and a different call raises CaptureError naming the argument, instead of silently running the captured
branch: e.g. an HF attention module captured without a KV cache and then called with one by `generate()`.
Regions from symbolic_trace take any call their code takes (FX checks the arguments that were None).
"""
from __future__ import annotations

import weakref

import torch
import torch.fx as fx
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.utils import _pytree as pytree

from ..capture_region import describe, leaf_key
from ..errors import CaptureError
from . import region_pickle

CALL = "_robuq_call"  # the call structure a torch.export region was captured for (capture_region._export_call)
REGION = "_robuq_region"  # {"path", "capture", "why"}
TARGET = "_robuq_target"  # (dtype name, device) the graph's baked literals are for


class RegionModule(fx.GraphModule):
    def recompile(self):
        # the generated forward takes a torch.export region's flat inputs: it becomes `_graph_forward`, and
        # `forward` takes the user's call (what torch.compile traces too; plain Python it can inline)
        # the generated code goes on a class of the region's own, never on a shared one; a plain region then takes
        # the class shared by regions of the same code. One whose class something else derived (FSDP2's
        # fully_shard mixes FSDPModule in) keeps a subclass of that, unshared
        plain = type(self).__bases__ == (RegionModule,)
        own = type("GraphModuleImpl", (RegionModule,), {})
        self.__class__ = own if plain else type(type(self).__name__, tuple(
            own if b.__bases__ == (RegionModule,) else b for b in type(self).__bases__), {})
        out = super().recompile()
        cls = type(self)
        cls._graph_forward, cls.forward = cls.forward, _region_forward
        if plain:
            self.__class__ = _shared_class(cls, self._code)
        return out

    def __reduce__(self):
        """Pickled as its graph and attributes (region_pickle.py), not as code traced again on load, which a
        torch.export region's tracer cannot do. A region whose class something derived (FSDP2) keeps GraphModule's."""
        if type(self).__bases__ != (RegionModule,):
            return super().__reduce__()
        where = "region '" + getattr(self, REGION, {}).get("path", "?") + "'"
        return region_pickle.reduce(self, where, finish=_share_guards)

    def _apply(self, fn, recurse=True):
        """torch.export bakes the capture's dtype and device into some nodes (diffusers' attention casts back with
        `x.to(query.dtype)`, recorded as `to(x, torch.float32)`): a cast or a move of the model retargets those
        literals, so that the region follows `.to(torch.bfloat16)` / `.to("cuda")` as the eager module would. A
        literal upcast in the module's own code (`x.float()`) is retargeted too: capture in the dtype you run in to
        keep it."""
        from ..qat_linear import _cast_target
        spec = getattr(self, CALL, None)
        where = getattr(self, TARGET, None)
        cast = _cast_target(fn, torch.device(where[1])) if spec is not None and where else None
        super()._apply(fn, recurse)
        if spec is None or not where:
            return self
        t = next((x for x in (*self.parameters(), *self.buffers())), None)
        dtype = cast or torch.__dict__[where[0]]
        device = t.device if t is not None else torch.device(where[1])
        old = (torch.__dict__[where[0]], torch.device(where[1]))
        if (dtype, device) != old:
            _retarget(self.graph, {old[0]: dtype, old[1]: device})
            self.recompile()
            preserve(self, TARGET, (str(dtype).removeprefix("torch."), str(device)))
        return self


# Regions whose generated code is the same share one class (the code lives on the class, as GraphModule puts it):
# torch.compile of one transformer block then serves every block (regional compilation), where a class a region
# made every block a type-guard miss and a compile of its own. A class is only shared once built; a recompile gives
# the region a new one first, so no region's change reaches another.
_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_LITERALS = (int, float, str, bool, type(None), torch.dtype, torch.device)


def _shared_class(cls: type, code: str) -> type:
    """The class of an earlier region with the same code and the same objects behind its names, else cls (then
    registered). The key holds ids of the generated forward's globals: the registered class's forward keeps them
    alive as long as the entry lives."""
    g = cls._graph_forward.__globals__
    key = (code, tuple(sorted((k, v if isinstance(v, _LITERALS) else id(v)) for k, v in g.items()
                              if k != "__builtins__")))
    try:
        return _SHARED.setdefault(key, cls)
    except TypeError:  # an unhashable literal: keep the region's own class
        return cls


_GUARDS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _share_guards(gm: fx.GraphModule) -> None:
    """torch.export's `_guards_fn` (the input shape checks it calls first) is a function generated per export:
    compiled code guards on its code object, so each block's region would compile again. Regions whose check
    functions have the same code share the first one's function (the code is all it holds; each region keeps its own
    module: a module under two parents would be one module to FSDP2's fully_shard, applied twice)."""
    guards = gm._modules.get(region_pickle.GUARDS)
    inner = region_pickle.guard_function(guards)
    if inner is None:
        return
    fn, code = guards.forward, inner.__code__
    key = (fn.__code__, code.co_code, code.co_consts, code.co_names)
    try:
        guards.forward = _GUARDS.setdefault(key, fn)
    except TypeError:  # an unhashable constant: keep its own
        pass


def preserve(gm: fx.GraphModule, name: str, value) -> None:
    """setattr that survives copy.deepcopy (GraphModule.__deepcopy__ keeps only the attributes listed here)."""
    setattr(gm, name, value)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[name] = value


def make_region(gm: fx.GraphModule, call_spec: dict | None, info: dict) -> RegionModule:
    """`gm` (in place) as a RegionModule; call_spec: capture_region.capture_submodule's (None for symbolic_trace)."""
    gm.__class__ = type("GraphModuleImpl", (RegionModule,), {})  # what GraphModule.__new__ builds for a subclass
    _share_guards(gm)
    gm.recompile()
    preserve(gm, REGION, dict(info))
    if call_spec is not None:
        preserve(gm, CALL, dict(call_spec))
        preserve(gm, TARGET, call_spec.get("target"))
    return gm


def _retarget(graph: fx.Graph, new: dict) -> None:
    """Replace dtype / device literals in node arguments (`new`: old -> new)."""
    def swap(a):
        return new.get(a, a) if isinstance(a, (torch.dtype, torch.device)) else a
    for node in graph.nodes:
        node.args = fx.node.map_aggregate(node.args, swap)
        node.kwargs = fx.node.map_aggregate(node.kwargs, swap)


def regions(model: torch.nn.Module) -> dict[str, RegionModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, RegionModule)}


def _region_forward(self, *args, **kwargs):
    spec = getattr(self, CALL, None)
    if spec is None:
        return self._graph_forward(*args, **kwargs)
    return self._graph_forward(*_flat_call(self, spec, args, kwargs))


def _bind(params, args, kwargs) -> list:
    """The value of every parameter of the user's forward for this call, defaults filled in (inspect's
    Signature.bind, in plain Python that torch.compile traces). params: (name, kind, has_default, default)."""
    pos, named, values = list(args), {p[0] for p in params if p[1] in (0, 1, 3)}, []
    for name, kind, has_default, default in params:
        if kind in (0, 1):  # positional only, positional or keyword
            if pos:
                v = pos.pop(0)
            elif name in kwargs:
                v = kwargs[name]
            elif has_default:
                v = default
            else:
                raise TypeError(f"missing argument '{name}'")
        elif kind == 2:  # *args
            v, pos = tuple(pos), []
        elif kind == 3:  # keyword only
            v = kwargs[name] if name in kwargs else default
        else:  # **kwargs
            v = {k: x for k, x in kwargs.items() if k not in named}
        values.append(v)
    if pos:
        raise TypeError(f"{len(pos)} positional arguments too many")
    return values


def _flat_call(region, spec: dict, args, kwargs) -> list:
    values = _bind(spec["params"], args, kwargs)
    if torch.compiler.is_compiling():
        return values
    for name, v, (tree, consts, was) in zip(spec["names"], values, spec["args"]):
        leaves, t = pytree.tree_flatten(v)
        if str(t) != tree or [leaf_key(x) for x in leaves] != consts:
            where = getattr(region, REGION, {}).get("path", "?")
            raise CaptureError(
                f"robuq_fx: '{where}' runs as a graph that torch.export captured for another call: its argument "
                f"'{name}' was {was} in the example forward and is {describe(v)} now. Quantize with example_inputs "
                "that call it the way you run it (every call is checked, so a captured branch never runs silently "
                "for other inputs)")
    return values
