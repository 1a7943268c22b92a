"""What the drop-in path (passes/dropin.py) needs to know about a model before it rewrites anything:

    which module's own forward calls scaled_dot_product_attention          (attention rules apply to that module)
    which linear calls are functional, F.linear(x, <parameter>) outside     (no module to swap: the whole-graph path)
    the linear module that owns the weight
    which linear modules ran at all                                         (nn.MultiheadAttention reads its
                                                                             out_proj weight without calling it)
    what (args, kwargs) a given module was called with                      (torch.export of that module alone)

`discover` runs one eager forward on `example_inputs` (eval mode, no grad, the caller's RNG untouched) with forward
hooks keeping a module stack and a TorchFunctionMode watching linear and SDPA calls. Without example inputs it reads
the same facts from `torch.fx.symbolic_trace` of the whole model, and when that fails too it knows nothing
(`Discovery.known` False): linear modules are then swapped without a check, and attention rules need inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .capture import LINEAR_TARGETS, _first_line, _split_inputs, find_linears
from .errors import CaptureError
from .passes.attention import SDPA_TARGETS, find_attention


@dataclass
class Discovery:
    known: bool  # False: no example inputs and symbolic_trace failed (`why`)
    sdpa: set[str] = field(default_factory=set)  # modules whose own forward calls SDPA ("" = the root)
    functional: dict[str, str] = field(default_factory=dict)  # weight owner -> the module whose forward calls it
    called: set[str] = field(default_factory=set)  # linear modules that ran as modules
    calls: dict[str, tuple] = field(default_factory=dict)  # module -> (args, kwargs) of its first call
    why: str = ""


def call_model(model: nn.Module, example_inputs):
    args, kwargs = _split_inputs(example_inputs)
    return model(*args, **kwargs)


class _Stack:
    """Module stack from forward hooks; keeps the (args, kwargs) of a frame only when asked to (`mark`)."""

    def __init__(self, model: nn.Module, record: set[str] | None = None):
        self.frames: list[list] = []  # [path, args, kwargs, keep]
        self.calls: dict[str, tuple] = {}
        self.ran: set[str] = set()
        self.record = record or set()
        self.handles = []
        for path, mod in model.named_modules(remove_duplicate=False):
            self.handles.append(mod.register_forward_pre_hook(self._push(path), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._pop, always_call=True))

    def _push(self, path):
        def hook(mod, args, kwargs):
            self.frames.append([path, args, kwargs, path in self.record])
            self.ran.add(path)
        return hook

    def _pop(self, mod, args, out):
        path, a, k, keep = self.frames.pop()
        if keep and path not in self.calls:
            self.calls[path] = (a, dict(k))

    @property
    def top(self) -> str:
        return self.frames[-1][0] if self.frames else ""

    def mark(self):
        if self.frames:
            self.frames[-1][3] = True

    def close(self):
        for h in self.handles:
            h.remove()


class _Watch(TorchFunctionMode):
    def __init__(self, stack: _Stack, weights: dict[int, list[str]], disc: Discovery, linear_modules: set[str]):
        super().__init__()
        self.stack, self.weights, self.disc, self.linear_modules = stack, weights, disc, linear_modules

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SDPA_TARGETS:
            self.disc.sdpa.add(self.stack.top)
            self.stack.mark()
        elif func in LINEAR_TARGETS:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            owners = self.weights.get(id(w))
            top = self.stack.top
            if owners and not (top in owners and top in self.linear_modules):  # tied weights have several owners
                self.disc.functional.setdefault(owners[0], top)
                self.stack.mark()
        return func(*args, **kwargs)


def discover(model: nn.Module, example_inputs=None, linear_modules: set[str] = frozenset()) -> Discovery:
    """See the module docstring. `model` is the caller's private copy (hooks are removed again). A GraphModule
    (e.g. one torch.export made, whose linears are aten.linear calls the function mode does not see) is read from
    its graph."""
    if example_inputs is None or isinstance(model, fx.GraphModule):
        return _from_trace(model)
    weights: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if n.endswith("weight") and p.dim() == 2:
            weights.setdefault(id(p), []).append(n[: -len("weight")].rstrip("."))
    disc = Discovery(True)
    stack = _Stack(model)
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _Watch(stack, weights, disc, set(linear_modules)):
            call_model(model, example_inputs)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own error, named as such
        raise CaptureError(f"running {type(model).__name__} on example_inputs failed ({type(e).__name__}: "
                           f"{_first_line(e)}): pass inputs the model takes, as a tuple of positional inputs or a "
                           "dict of keyword inputs") from e
    finally:
        stack.close()
        model.train(was)
    disc.called = stack.ran & set(linear_modules)
    disc.calls = stack.calls
    return disc


def _from_trace(model: nn.Module) -> Discovery:
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure: nothing known without example inputs
        return Discovery(False, why=f"symbolic_trace could not trace {type(model).__name__}: "
                                    f"{type(e).__name__}: {_first_line(e)}")
    disc = Discovery(True)
    for node, name in find_attention(gm):
        disc.sdpa.add(name or "")
    for site in find_linears(gm, model):
        stack = site.node.meta.get("nn_module_stack") or {}
        disc.functional.setdefault(site.name, list(stack.values())[-1][0] if stack else "")
    # modules that ran: called as leaves, or traced through (a Conv1D is an addmm inside its own module's scope)
    disc.called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    disc.called |= {v[0] for n in gm.graph.nodes for v in (n.meta.get("nn_module_stack") or {}).values()}
    return disc


def record_calls(model: nn.Module, example_inputs, paths: set[str]) -> dict[str, tuple]:
    """{path: (args, kwargs)} of the first call of each module in `paths`, from one eager forward (eval, no grad).
    Tensors of `example_inputs` go to the device of the model's first parameter or buffer first."""
    t = next(iter(model.parameters()), None)
    t = next(iter(model.buffers()), None) if t is None else t
    if t is not None:
        example_inputs = pytree.tree_map(lambda v: v.to(t.device) if isinstance(v, torch.Tensor) else v,
                                         example_inputs)
    stack = _Stack(model, record=set(paths))
    try:
        _eval_forward(model, example_inputs)
    finally:
        stack.close()
    return stack.calls


def _eval_forward(model: nn.Module, example_inputs) -> None:
    """One forward in eval mode, without grad, leaving the RNG and the train/eval flag as they were."""
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        model.train(was)


def outside_calls(model: nn.Module, example_inputs, blocks: list[str]) -> list[str]:
    """Submodules of a block that run while that block is not running (DiT's root calls block 0's timestep
    embedder for the final layer's conditioning): FSDP2 must shard them in their own group (distributed.shard).
    Outermost ones only, in call order; from one eager forward (eval, no grad)."""
    found: list[str] = []
    stack: list[str] = []

    def push(path):
        def hook(mod, args):
            block = next((b for b in blocks if path.startswith(b + ".")), None)
            if block is not None and block not in stack and not any(path.startswith(f + ".") for f in found) \
                    and path not in found:
                found.append(path)
            stack.append(path)
        return hook

    def pop(mod, args, out):  # returns None: a forward hook's return value would replace the output
        stack.pop()

    handles = []
    for path, mod in model.named_modules(remove_duplicate=False):
        handles.append(mod.register_forward_pre_hook(push(path)))
        handles.append(mod.register_forward_hook(pop, always_call=True))
    try:
        _eval_forward(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return found
