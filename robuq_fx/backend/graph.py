"""Graph side of the `robuq` torch.compile backend: what Dynamo hands a backend, and the few edits the backend makes
before the passes of passes/qat.py and passes/lower.py run on it.

What torch 2.13 gives a backend (`inline_inbuilt_nn_modules`, the default): parameters are graph *placeholders*,
the matching entries of `example_inputs` are the model's own `nn.Parameter` objects, and each placeholder's
`meta["grapharg"].source.name` spells where Dynamo found it, e.g. `L['self']._modules['blocks']._modules['0']
._parameters['weight']`. Linear layers arrive as `torch._C._nn.linear(x, weight, bias)`.

Because parameters are inputs, Dynamo reuses one compiled graph for every module instance that runs the same code
(a block's `forward` compiled on its own after a graph break serves all the blocks). So nothing here bakes a
particular weight into the graph: a graph only knows its *slots* (which input is the weight of which linear calls),
and the backend decides per call which layer (name, spec, packed tensors) each slot holds.
"""
from __future__ import annotations

import copy
import operator
import re
import sys
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from ..capture import LINEAR_TARGETS

HOLDER = "robuq_layers"  # submodule of the graph module that holds each slot's layer while the passes run


@dataclass
class Site:
    """One call of a linear layer in the graph: `node` computes x W^T (+ b) for the slot's weight W."""
    node: str  # node name (stable across `copy_graph_module`)
    x: str
    bias: str | None  # node name of the bias, None without one
    bias_index: int | None  # input position of the bias placeholder; None: no bias or a computed one
    form: str  # "linear", or "mm" / "addmm" / "matmul" with W^T as the second operand


@dataclass
class Slot:
    """A weight placeholder that feeds linear calls: the unit the policy is applied to."""
    index: int  # position in the graph's inputs
    path: tuple[str, ...]  # Dynamo's source of the weight, as attribute names ("fc2", "weight")
    module_ref: Callable[[], nn.Module | None]  # weak: the owning module Dynamo saw at compile time, if reachable
    in_features: int
    out_features: int
    sites: list[Site] = field(default_factory=list)

    @property
    def module(self) -> nn.Module | None:
        return self.module_ref()

    @property
    def bias_index(self) -> int | None:
        return self.sites[0].bias_index

    @property
    def bias_problem(self) -> str | None:
        """Why the bias cannot go into a PackedLinear (inference), or None."""
        biases = {(s.bias, s.bias_index) for s in self.sites}
        if len(biases) > 1:
            return "its linear calls use different biases"
        b, index = biases.pop()
        return "its bias is computed in the graph, not a graph input" if b is not None and index is None else None

    @property
    def fallback_name(self) -> str | None:
        """The layer name relative to the compiled frame's root, when the compiled model itself is not reachable."""
        return layer_name(".".join(self.path)) if self.path else None


def layer_name(param_name: str) -> str | None:
    """`blocks.0.fc1.weight` -> `blocks.0.fc1`; None when the parameter is not called weight. The same rule as
    `capture.find_linears` (weight attribute minus `weight`), so policies match the same names in both paths."""
    return param_name[: -len("weight")].rstrip(".") if param_name.endswith("weight") else None


# ---- finding slots -----------------------------------------------------------------------------------------------
_MM_TARGETS = {torch.mm: "mm", torch.addmm: "addmm", torch.matmul: "matmul", operator.matmul: "matmul"}
_MM_METHODS = {"mm": "mm", "matmul": "matmul", "__matmul__": "matmul"}


def find_slots(gm: fx.GraphModule, example_inputs) -> list[Slot]:
    """Linear calls whose weight is a 2-D `nn.Parameter` input of the graph, grouped by weight, in graph order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}
    slots: dict[fx.Node, Slot] = {}
    for node in gm.graph.nodes:
        found = _linear_operands(node)
        if found is None:
            continue
        form, x, w, b = found
        if w not in index or not isinstance(x, fx.Node):
            continue
        weight = example_inputs[index[w]]
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            continue
        if w not in slots:
            root, path = _source_path(w)
            module = _module_at(root, path)
            ref = weakref.ref(module) if module is not None else (lambda: None)
            slots[w] = Slot(index[w], path, ref, weight.shape[1], weight.shape[0])
        bias_index = index.get(b) if isinstance(b, fx.Node) else None
        slots[w].sites.append(Site(node.name, x.name, b.name if isinstance(b, fx.Node) else None, bias_index, form))
    return list(slots.values())


def _linear_operands(node: fx.Node):
    """(form, x, weight, bias) when `node` computes x W^T (+ b), else None."""
    if node.op == "call_function" and node.target in LINEAR_TARGETS:
        x = node.args[0] if node.args else node.kwargs.get("input")
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return "linear", x, w, b
    if node.kwargs:  # addmm's beta/alpha, out=: not a plain linear
        return None
    if node.op == "call_function" and node.target in _MM_TARGETS:
        form = _MM_TARGETS[node.target]
    elif node.op == "call_method" and node.target in _MM_METHODS:
        form = _MM_METHODS[node.target]
    else:
        return None
    args = node.args
    if form == "addmm":
        if len(args) != 3 or not _is_vector(args[0]):
            return None
        b, x, wt = args
    elif len(args) == 2:
        b, (x, wt) = None, args
    else:
        return None
    w = _transposed(wt)
    return None if w is None else (form, x, w, b)


def _is_vector(n) -> bool:
    v = n.meta.get("example_value") if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dim() == 1


def _transposed(n):
    """W when `n` is W.t() / W.T / W.transpose(0, 1) / torch.t(W) / W.permute(1, 0) of a placeholder W."""
    if not isinstance(n, fx.Node) or len(n.users) != 1:
        return None
    a = n.args
    if not a or not isinstance(a[0], fx.Node) or a[0].op != "placeholder" or n.kwargs:
        return None
    if n.op == "call_method" and n.target == "t" and len(a) == 1:
        return a[0]
    if n.op == "call_function" and n.target is torch.t and len(a) == 1:
        return a[0]
    if n.op == "call_function" and n.target is getattr and a[1:] in (("T",), ("mT",)):
        return a[0]
    swap = ((0, 1), (1, 0), (-1, -2), (-2, -1), (0, -1), (-1, 0), (1, -2), (-2, 1))
    if n.target in ("transpose", torch.transpose) and tuple(a[1:]) in swap:
        return a[0]
    if n.target in ("permute", torch.permute):
        dims = tuple(a[1]) if len(a) == 2 and isinstance(a[1], (list, tuple)) else tuple(a[1:])
        if dims in ((1, 0), (-1, -2)):
            return a[0]
    return None


def as_linear(gm: fx.GraphModule, node: fx.Node, site: Site) -> fx.Node:
    """Rewrite an mm/addmm/matmul site as `torch._C._nn.linear(x, W, b)` (what the QAT pass expects)."""
    if site.form == "linear":
        return node
    nodes = {n.name: n for n in gm.graph.nodes}
    wt = node.args[-1]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(torch._C._nn.linear, (nodes[site.x], wt.args[0], nodes.get(site.bias)))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    if not wt.users:
        gm.graph.erase_node(wt)
    return new


# ---- names -------------------------------------------------------------------------------------------------------
_ROOT = re.compile(r"""(?:L|G)\[['"]([^'"]+)['"]\]""")
_STEP = re.compile(r"""\._(?:modules|parameters|buffers)\[['"]([^'"]+)['"]\]"""  # ._modules['fc1']
                   r"""|\.([A-Za-z_]\w*)"""  # .fc1
                   r"""|\[['"]?([^'"\]]+)['"]?\]""")  # [0], ['key']


def _source_path(node: fx.Node) -> tuple[str, tuple[str, ...]]:
    """`L['self']._modules['fc1']._parameters['weight']` -> ("L['self']", ("fc1", "weight")); ("", ()) when the
    source is not a chain of attribute / item accesses from a frame local or global (then the path is unknown)."""
    arg = node.meta.get("grapharg")
    src = getattr(getattr(arg, "source", None), "name", None)
    if callable(src):  # Source.name is a property in torch 2.13; a method in some older versions
        src = src()
    if not isinstance(src, str):
        return "", ()
    m = _ROOT.match(src)
    if m is None:
        return "", ()
    parts, pos = [], m.end()
    while pos < len(src):
        s = _STEP.match(src, pos)
        if s is None:
            return "", ()
        parts.append(next(g for g in s.groups() if g is not None))
        pos = s.end()
    return m.group(0), tuple(parts)


def _module_at(root: str, path: tuple[str, ...]) -> nn.Module | None:
    """The module owning the weight at root + path, read from the frame Dynamo is compiling (compile time only)."""
    if not root or not path:
        return None
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
        scope = tx.f_locals if root.startswith("L") else tx.f_globals
    except (ImportError, AttributeError):  # internal API: without it type rules see no module (left FP, as capture)
        return None
    obj = scope.get(_ROOT.match(root).group(1))
    return _walk(obj, path[:-1]) if isinstance(obj, nn.Module) else None


def _walk(obj: nn.Module, path) -> nn.Module | None:
    try:
        m = obj.get_submodule(".".join(path)) if path else obj
    except (AttributeError, TypeError):
        return None
    return m if isinstance(m, nn.Module) else None


def compiled_root() -> nn.Module | None:
    """The module the user passed to `torch.compile` (or called `.compile()` on), found on the Python stack: the
    innermost `OptimizedModule` (or compiled module) frame above us. Names are relative to it, as they are relative
    to the model given to `robuq_fx.quantize`. None when a plain function was compiled."""
    from torch._dynamo.eval_frame import OptimizedModule
    f = sys._getframe(1)
    while f is not None:
        obj = f.f_locals.get("self") if "self" in f.f_code.co_varnames else None
        if isinstance(obj, OptimizedModule):
            return obj._orig_mod
        if isinstance(obj, nn.Module) and obj.__dict__.get("_compiled_call_impl") is not None:
            return obj
        f = f.f_back
    return None


_NAMES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # root module -> {id(param): (weakref(param), [names])}


def param_names(root: nn.Module, p: nn.Parameter) -> list[str]:
    """Every qualified name of `p` in `root` (several when tied). The map is rebuilt when `p` is not in it."""
    for rebuild in (False, True):
        table = _NAMES.get(root)
        if table is None or rebuild:
            table = {}
            for name, q in root.named_parameters(remove_duplicate=False):
                table.setdefault(id(q), (weakref.ref(q), []))[1].append(name)
            _NAMES[root] = table
        hit = table.get(id(p))
        if hit is not None and hit[0]() is p:
            return hit[1]
    return []


def pick_name(names: list[str], path: tuple[str, ...]) -> str:
    """Of a tied parameter's names, the one that ends with the attribute path Dynamo read it through."""
    tail = ".".join(path)
    for n in names:
        if tail and (n == tail or n.endswith("." + tail)):
            return n
    return names[0]


# ---- graph edits ------------------------------------------------------------------------------------------------
def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph can be edited; node meta is copied shallowly (Dynamo's fake tensors are shared)."""
    g = fx.Graph()
    g._codegen = copy.deepcopy(gm.graph._codegen)
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    new = fx.GraphModule(gm, g, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def lift_holder_attrs(gm: fx.GraphModule) -> list[tuple[int, str]]:
    """Turn every `get_attr robuq_layers.slot<i>.<attr>` into a new graph input (after the existing ones), so the
    tensors of whichever layer a slot holds are passed per call; returns (slot, attr) per new input, in order."""
    g = gm.graph
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    lifted: dict[str, fx.Node] = {}
    order = []
    for node in list(g.nodes):
        if node.op != "get_attr" or not str(node.target).startswith(HOLDER + "."):
            continue
        if node.target not in lifted:
            with g.inserting_after(last):
                ph = g.placeholder(node.target.replace(".", "_"))
            val = node.meta.get("example_value")
            if val is not None:
                ph.meta["example_value"] = val
            lifted[node.target] = last = ph
            _, slot, attr = node.target.split(".")
            # slot<i>, or fused_slot<i>_slot<j>... (passes/fuse.py): the tuple of the slots it fuses
            order.append((int(slot[4:]) if slot.startswith("slot") else
                          tuple(int(i) for i in re.findall(r"slot(\d+)", slot)), attr))
        node.replace_all_uses_with(lifted[node.target])
        g.erase_node(node)
    delattr(gm, HOLDER)
    g.lint()
    gm.recompile()
    return order


def robuq_ops(gm: fx.GraphModule) -> set[str]:
    """Names of robuq:: ops already in the graph (a model from robuq_fx.quantize / robuq_fx.lower)."""
    return {str(n.target).split(".")[1] for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("robuq.")}
