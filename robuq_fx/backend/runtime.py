"""Runtime side of the `robuq` torch.compile backend: the per-weight caches and the callable handed back to Dynamo.

A compiled graph takes each quantized layer's tensors as extra inputs, looked up per call from the weights Dynamo
passes in (see graph.py for why nothing is baked in):

    inference:  PackedLinear.from_float(W, b, A, B, spec) once per (weight, spec), redone only when W, b, A or B
                changed (`_version`, data pointer): packed tensors = qweight, w_scale, bias, lrb_down, lrb_up
    qat:        the layer's trainable lrb_down / lrb_up (registered by `prepare_qat`) when it has a low-rank branch

The variant of a graph is chosen by the specs its slots hold in this call; a second variant appears only when
Dynamo reuses one graph for module instances the policy treats differently (it is then run without Inductor).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakIdKeyDictionary

from .. import layer
from ..modules import PackedLinear
from ..spec import LayerSpec


@dataclass(frozen=True)
class LayerPlan:
    """What one weight is: its layer name and spec (None: full precision). Holds no tensors or modules: plans are
    cached per weight in weak dictionaries."""
    name: str | None
    spec: LayerSpec | None
    error: str | None = None  # why a layer the policy matched stays in full precision

    def describe(self) -> str:
        if self.spec is not None:
            return self.spec.short()
        return f"FP ({self.error})" if self.error else "FP"


# ---- packed weights (inference) ---------------------------------------------------------------------------------
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> {spec: (state, PackedLinear)}
PACK_CALLS = [0]  # how many times a weight was quantized and packed (tests count it)


def _state(*tensors) -> tuple:
    """Identity and content version of each tensor: a changed `_version` (in-place update) or data pointer
    (`.data =`, `.to()`) means repack."""
    return tuple((id(t), t._version, t.data_ptr(), t.device) if t is not None else None for t in tensors)


def packed(weight: torch.Tensor, bias, lrb, spec: LayerSpec) -> PackedLinear:
    """The PackedLinear of `weight` under `spec`, quantized once and again only after W, b or the LRB changed.
    lrb: the layer's (lrb_down, lrb_up) parameters, or None to initialise the branch from the SVD (as quantize())."""
    down, up = lrb if lrb is not None else (None, None)
    state = _state(weight, bias, down, up)
    per = _PACKED.get(weight)
    if per is None:
        per = _PACKED[weight] = {}
    hit = per.get(spec)
    if hit is not None and hit[0] == state:
        return hit[1]
    # inference_mode(False): packed tensors must stay usable outside an inference_mode block
    with torch.inference_mode(False), torch.no_grad():
        if spec.lora_rank and down is None:
            down, up = layer.lrb_init(weight, spec)
        p = PackedLinear.from_float(weight, bias, down, up, spec).use_device_layout()
    PACK_CALLS[0] += 1
    per[spec] = (state, p)
    return p


def clear_cache() -> None:
    """Drop every cached PackedLinear (they are also dropped with their weights)."""
    _PACKED.clear()


# ---- low-rank branch parameters (qat) ---------------------------------------------------------------------------
_LRB_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> weakref(module holding lrb_down / lrb_up)


def register_lrb_owner(module: nn.Module) -> None:
    _LRB_OWNERS[module.weight] = weakref.ref(module)


def lrb_params(weight: torch.Tensor, module: nn.Module | None = None):
    """(lrb_down, lrb_up) of the layer owning `weight` (registered by `prepare_qat`, or found on `module`), or None."""
    ref = _LRB_OWNERS.get(weight)
    for m in (ref() if ref is not None else None, module):
        if m is not None and getattr(m, "weight", None) is weight and \
                isinstance(getattr(m, "lrb_down", None), nn.Parameter):
            if m is module and ref is None:
                register_lrb_owner(m)  # e.g. a deep copy of a prepared model: found by name once, then by weight
            return m.lrb_down, m.lrb_up
    return None


class SlotMemo:
    """The last layer a slot held, so that a call with the same, unchanged tensors skips every dictionary lookup
    (~15 us -> ~3 us per layer). Weak references only: the compiled graph outlives models in Dynamo's cache."""
    __slots__ = ("weight", "plan", "payload", "lrb", "state")

    def __init__(self, weight, bias, plan: LayerPlan, payload, lrb):
        self.weight, self.plan, self.lrb = weakref.ref(weight), plan, None
        self.payload = weakref.ref(payload) if isinstance(payload, PackedLinear) else None
        if lrb is not None:
            self.lrb = (weakref.ref(lrb[0]), weakref.ref(lrb[1]))
        self.state = _state(weight, bias, *(lrb or ()))

    def get(self, weight, bias):
        """(plan, payload) when the slot still holds the same, unchanged layer, else None."""
        if self.weight() is not weight:
            return None
        lrb = (self.lrb[0](), self.lrb[1]()) if self.lrb is not None else None
        if _state(weight, bias, *(lrb or ())) != self.state:
            return None
        if self.payload is not None:
            p = self.payload()
            return None if p is None else (self.plan, p)
        return self.plan, lrb if self.plan.spec is not None else None


# ---- the callable returned to Dynamo ----------------------------------------------------------------------------
@dataclass
class Variant:
    fn: Callable
    lifted: list[tuple[int, str]]  # (slot, attribute) of each extra input, in order
    sides: object = None  # weight_sides="step": the GraphSides whose parts come before the lifted inputs

    def __call__(self, args, payloads):
        fused: dict = {}
        parts = self.sides.parts(args, payloads) if self.sides is not None else ()
        extras = [lifted_tensor(payloads, slot, attr, fused) for slot, attr in self.lifted]
        return self.fn(*args, *parts, *extras)


def lifted_tensor(payloads: list, slot, attr: str, memo: dict | None = None):
    """The tensor of a lifted input: slot is an int, or a tuple of slots fused into one layer (passes/fuse.py),
    whose FusedLinear is built once per set of member PackedLinears."""
    if type(slot) is int:
        return _tensor(payloads[slot], attr)
    p = memo.get(slot) if memo is not None else None
    if p is None:
        from ..passes.fuse import fused_of
        p = fused_of([payloads[i] for i in slot])
        if memo is not None:
            memo[slot] = p
    return _tensor(p, attr)


def _tensor(payload, attr: str):
    if isinstance(payload, PackedLinear):
        return getattr(payload, attr)
    return payload[0] if attr == "lrb_down" else payload[1]


class CompiledGraph:
    """Handed to Dynamo for one graph. Per call: which layer each slot holds (`resolve`), the variant for those
    specs (built once), and that layer's tensors as the extra inputs."""

    def __init__(self, resolve: Callable, build: Callable, n_slots: int, example_inputs):
        self._resolve, self._build = resolve, build
        self.memo: list[SlotMemo | None] = [None] * n_slots
        self.variants: dict[tuple, Variant] = {}
        # fake example inputs (DDPOptimizer compiles each piece of a DDP model's graph on fakes): the weights are not
        # the model's, so their layers, branches and packed tensors cannot be looked up; the first call builds
        if not any(isinstance(t, FakeTensor) for t in example_inputs):
            key, payloads = resolve(self.memo, example_inputs)
            self.variants[key] = build(key, example_inputs, payloads, True)

    def __call__(self, *args):
        key, payloads = self._resolve(self.memo, args)
        v = self.variants.get(key)
        if v is None:  # (only the first variant goes through Inductor: see the package docstring)
            v = self.variants[key] = self._build(key, args, payloads, not self.variants)
        return v(args, payloads)
