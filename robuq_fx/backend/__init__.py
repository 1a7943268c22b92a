"""torch.compile backend `robuq`: RobuQ layers through Dynamo + Inductor, no FX capture of your own.

    torch.compile(model, backend="robuq")                                       # default policy, inference
    torch.compile(model, backend="robuq", options={"policy": "dit", "mode": "qat", "strict": False})
    torch.compile(model, backend=robuq_fx.backend(policy, mode="qat"))         # the same, as a callable

For every graph Dynamo captures: the linear calls whose weight is a parameter -> the layer names (relative to the
module given to torch.compile, as in `robuq_fx.quantize`) -> the policy (`plan_layers`) -> the QAT pass
(`inline_sites`: `layer.qat_forward` with fake-quant + STE) and, in inference mode, the lowering pass
(`PackedLinear.from_float` + `rewrite_sites`: one `robuq::qlinear` per layer) -> Inductor, which fuses everything
around the robuq ops. Attention rules (`attn_bits`) insert the same q/k/v fake-quant as `quantize`.

- inference: each weight is quantized and packed once (cached per parameter; redone only after it changed), on
  recompiles too (train/eval switch, new shapes). A model trained with `robuq_fx.quantize` is compiled after
  `robuq_fx.lower(qmodel)` (robuq::qlinear is a custom op; any backend runs it): this backend leaves graphs that
  already hold robuq ops as they are, and refuses a QAT graph in inference mode.
- qat: fake-quant forward, STE backward through AOTAutograd; the same gradients as `robuq_fx.quantize`. Layers with
  a low-rank branch need its trainable parameters on your model: call `prepare_qat(model, policy)` first.
- A layer the policy matches that cannot be quantized raises `BackendError` (Dynamo reports it as
  BackendCompilerFailed); with `strict: False` in the policy (or strict=False) it stays FP with one warning.
- Graph breaks: every graph Dynamo compiles is quantized. A frame Dynamo gives up on (a graph break inside a loop
  body's call) runs in plain Python and its layers stay FP: `backend.unseen(model)` lists them. One graph reused for
  module instances the policy treats differently (AMPN bits per block, compiled per block after a graph break)
  gets a second variant, run without Inductor, with a warning.
"""
from __future__ import annotations

import json
import re
import sys
import types
import warnings
from functools import partial

import torch.fx as fx
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from .graph import (HOLDER, Slot, as_linear, compiled_root, copy_graph_module,
                            find_slots, layer_name, lift_holder_attrs, param_names, pick_name, robuq_ops)
from .prepare import prepare_qat  # noqa: F401 (robuq_fx.backend.prepare_qat)
from .runtime import (CompiledGraph, LayerPlan, SlotMemo, Variant, _tensor, clear_cache,  # noqa: F401
                              lifted_tensor, lrb_params, packed)
from ..capture import LinearSite
from ..errors import BackendError, PolicyError  # noqa: F401 (BackendError: robuq_fx.backend.BackendError)
from ..modules import PackedLinear
from ..passes.attention import SDPA_TARGETS, apply_attention, lower_attention
from ..passes.fuse import fuse_siblings, fused_of
from ..passes.lower import rewrite_sites
from ..passes.qat import inline_sites, plan_layers
from ..policy import Policy

MODES = ("inference", "qat")
COMPILERS = ("inductor", "aot_eager", "eager")  # eager: the rewritten graph as is (tests of the rewrite itself)
OPTIONS = ("policy", "mode", "strict", "compiler", "inductor", "weight_sides")
# qat: each layer's weight side in the graph ("layer"), all of them once a call before it ("step"), or "step" where the
# graph's layers are on CUDA, where it was measured faster (H200, DiT-XL/2 paper step 1.36x vs ~1.8x), else "layer"
WEIGHT_SIDES = ("auto", "layer", "step")


class RobuQBackend:
    """A configured `robuq` backend: pass it as `torch.compile(model, backend=...)`.

    After compiling, `.layers` maps every linear layer seen so far to its spec (or "FP ..."), and
    `.unseen(model)` lists the policy's layers that no compiled graph contained (see "Graph breaks" in the docs).
    """

    def __init__(self, policy=None, mode: str = "inference", strict: bool | None = None, *,
                 compiler: str = "inductor", inductor: dict | None = None, weight_sides: str = "auto"):
        if mode not in MODES:
            raise BackendError(f"mode={mode!r}: expected one of {MODES}")
        if weight_sides not in WEIGHT_SIDES:
            raise BackendError(f"weight_sides={weight_sides!r}: expected one of {WEIGHT_SIDES}")
        if compiler not in COMPILERS:
            raise BackendError(f"compiler={compiler!r}: expected one of {COMPILERS}")
        if strict is not None and not isinstance(strict, bool):
            raise BackendError(f"strict={strict!r}: expected true, false or None (the policy's 'strict')")
        self.policy = Policy.coerce(policy)
        self.mode, self.compiler, self.inductor = mode, compiler, dict(inductor or {})
        self.weight_sides = weight_sides
        self.strict = self.policy.strict if strict is None else strict
        self._strict_arg = strict
        self.layers: dict[str, str] = {}
        self.graphs = 0
        self._plans: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> LayerPlan
        self._warned: set = set()
        self._derived: dict = {}

    def __repr__(self):
        step = f", weight_sides={self.weight_sides!r}" if self.weight_sides != "auto" else ""
        return (f"robuq_fx.backend(mode={self.mode!r}, strict={self.strict}, compiler={self.compiler!r}{step}, "
                f"{self.policy})")

    # ---- Dynamo entry -----------------------------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None):
        """mode: torch.compile's (e.g. "max-autotune"), forwarded to Inductor. options: torch.compile's options=."""
        if options:
            return self.with_options(options)(gm, example_inputs, mode=mode)
        ops = robuq_ops(gm)
        if ops:
            if self.mode == "inference" and "fake_quant_weight" in ops:
                raise BackendError("this graph already holds RobuQ QAT layers (robuq::fake_quant_weight): the model "
                                   "comes from robuq_fx.quantize() or the seed API. For inference compile its lowered "
                                   "form, torch.compile(robuq_fx.lower(qmodel), backend='robuq') (seed API: "
                                   "RobuQLinear.prepare_for_inference()), or use mode='qat'")
            return self._compile(gm, example_inputs, mode)  # quantized by robuq_fx already: its policy decided
        slots = find_slots(gm, example_inputs)
        attention = self._plan_attention(gm)
        if not slots and not attention:
            return self._compile(gm, example_inputs, mode)
        self.graphs += 1
        return CompiledGraph(partial(self._resolve, slots), partial(self._build, gm, slots, attention, mode),
                             len(slots), example_inputs)

    def with_options(self, options: dict) -> "RobuQBackend":
        """This backend with torch.compile's `options=` applied (cached, so recompiles reuse its state)."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise BackendError(f"unknown robuq backend option(s) {unknown}; expected any of {list(OPTIONS)}")
        key = _options_key(options)
        if key not in self._derived:
            cfg = {"policy": self.policy, "mode": self.mode, "strict": self._strict_arg, "compiler": self.compiler,
                   "inductor": self.inductor, "weight_sides": self.weight_sides, **options}
            self._derived[key] = RobuQBackend(cfg["policy"], cfg["mode"], cfg["strict"], compiler=cfg["compiler"],
                                              inductor=cfg["inductor"], weight_sides=cfg["weight_sides"])
        return self._derived[key]

    def unseen(self, model: nn.Module) -> list[str]:
        """nn.Linear layers of `model` the policy quantizes that no compiled graph has shown this backend."""
        return [n for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and self.policy.match(n, m)[1] is not None and n not in self.layers]

    # ---- per weight: which layer, which spec --------------------------------------------------------------------
    def _plan(self, weight: nn.Parameter, slot: Slot, root) -> LayerPlan:
        """Name the layer `weight` belongs to (relative to the compiled model), match the policy, check the spec."""
        name, module = None, slot.module
        names = param_names(root, weight) if root is not None else []
        if names:
            name = layer_name(pick_name(names, slot.path))
            if name is None:
                return LayerPlan(None, None)
            try:
                module = root.get_submodule(name)
            except AttributeError:
                module = None
        else:
            name = slot.fallback_name
        if name is None:
            return LayerPlan(None, None)
        _, spec = self.policy.match(name, module)
        if spec is None:
            return LayerPlan(name, None)
        site = LinearSite(None, name, module, slot.in_features, slot.out_features)
        try:
            spec = plan_layers([site], self.policy)[name]
        except PolicyError as e:
            return LayerPlan(name, None, str(e))
        lrb = lrb_params(weight, module) if spec.lora_rank else None
        if self.mode == "qat" and spec.lora_rank:
            want = ((spec.lora_rank, slot.in_features), (slot.out_features, spec.lora_rank))
            if lrb is None:
                return LayerPlan(name, None, f"lora_rank={spec.lora_rank} needs a trainable low-rank branch on your "
                                 "model: call robuq_fx.backend.prepare_qat(model, policy) before torch.compile (or "
                                 "train with robuq_fx.quantize)")
            if (tuple(lrb[0].shape), tuple(lrb[1].shape)) != want:
                return LayerPlan(name, None, f"its low-rank branch has shapes {tuple(lrb[0].shape)}, "
                                 f"{tuple(lrb[1].shape)} but the policy's lora_rank={spec.lora_rank} needs {want}")
        return LayerPlan(name, spec)

    def _layer(self, slot: Slot, w, bias, root) -> tuple[LayerPlan, object, tuple | None]:
        """(plan, payload, lrb) of the slot's weight: payload = PackedLinear (inference) or LRB params (qat)."""
        plan = self._plans.get(w)
        if plan is None:
            plan = self._plans[w] = self._plan(w, slot, root())
            if plan.name is not None:
                self.layers[plan.name] = plan.describe()
        if plan.spec is None:
            return plan, None, None
        lrb = lrb_params(w) if plan.spec.lora_rank else None
        if self.mode == "qat":
            return plan, lrb, lrb
        try:
            if slot.bias_problem:
                raise BackendError(slot.bias_problem)
            return plan, packed(w, bias, lrb, plan.spec), lrb
        except Exception as e:  # noqa: BLE001 - any packing failure: strict error or FP, never silent
            plan = LayerPlan(plan.name, None, f"{type(e).__name__}: {e}")
            self.layers[plan.name] = plan.describe()
            return plan, None, None

    def _resolve(self, slots: list[Slot], memo: list, args) -> tuple[tuple, list]:
        """Per call: the spec each slot holds (the variant key) and its tensors (PackedLinear / LRB params)."""
        key, payloads, failed = [], [], []
        root = _Lazy(compiled_root)  # the stack walk, only when a weight is new
        for i, slot in enumerate(slots):
            w = args[slot.index]
            bias = args[slot.bias_index] if slot.bias_index is not None else None
            hit = memo[i].get(w, bias) if memo[i] is not None else None
            if hit is not None:
                plan, payload = hit
            else:
                plan, payload, lrb = self._layer(slot, w, bias, root)
                memo[i] = None if plan.error else SlotMemo(w, bias, plan, payload, lrb)
            if plan.error:
                failed.append(plan)
            key.append(plan.spec)
            payloads.append(payload)
        if failed:
            self._report(failed)
        return tuple(key), payloads

    def _report(self, failed: list[LayerPlan]) -> None:
        lines = "\n".join(f"  {p.name}: {p.error}" for p in failed)
        if self.strict:
            raise BackendError(f"the policy matches these layers but they could not be quantized:\n{lines}\n"
                               "Fix the policy, or set \"strict\": false in it (or strict=False) to keep them in "
                               "full precision with a warning.")
        new = [p for p in failed if p.name not in self._warned]
        if new:
            self._warned.update(p.name for p in new)
            warnings.warn("robuq backend (strict: false): these layers stay in full precision:\n"
                          + "\n".join(f"  {p.name}: {p.error}" for p in new), stacklevel=2)

    # ---- building a variant ---------------------------------------------------------------------------------
    def _build(self, template: fx.GraphModule, slots: list[Slot], attention: list, torch_mode, key: tuple, args,
               payloads: list, compile_it: bool) -> Variant:
        gm = copy_graph_module(template)
        nodes = {n.name: n for n in gm.graph.nodes}
        sides = None
        if self.mode == "qat" and self.weight_sides != "layer":
            from .weight_sides import GraphSides
            sides = GraphSides.make(gm, slots, key, args, payloads, cuda_only=self.weight_sides == "auto")
        if sides is not None:
            sides.rewrite(gm, slots, as_linear, nodes)
        inline = (None,) * len(key) if sides is not None else key  # (the rewritten layers are done)
        holder, layers, sites = nn.Module(), {}, []
        for i, (slot, spec, payload) in enumerate(zip(slots, inline, payloads)):
            if spec is None:
                continue
            path = f"{HOLDER}.slot{i}"
            holder.add_module(f"slot{i}", payload if isinstance(payload, PackedLinear) else _lrb_holder(payload))
            layers[path] = spec
            for site in slot.sites:
                node = as_linear(gm, nodes[site.node], site)
                sites.append(LinearSite(node, path, None, slot.in_features, slot.out_features))
        gm.add_module(HOLDER, holder)
        if layers:
            inline_sites(gm, sites, layers)
            if self.mode == "inference":
                rewrite_sites(gm)
                fuse_siblings(gm, build=fused_of)  # q/k/v, gate/up -> one call (cached per member layers)
        if attention:
            nodes = {n.name: n for n in gm.graph.nodes}
            apply_attention(gm, [(nodes[n], name, bits) for n, name, bits in attention])
            if self.mode == "inference":
                lower_attention(gm)
        lifted = lift_holder_attrs(gm)
        if compile_it:
            parts = sides.example_parts(args, payloads) if sides is not None else ()
            extras = [lifted_tensor(payloads, s, a) for s, a in lifted]
            return Variant(self._compile(gm, [*args, *parts, *extras], torch_mode), lifted, sides)
        warnings.warn("robuq backend: Dynamo reused a compiled graph for module instances that the policy quantizes "
                      f"differently ({_describe(key)}); this variant runs without Inductor. Avoid graph breaks "
                      "inside repeated blocks to get one graph per model.", stacklevel=3)
        return Variant(gm.forward, lifted, sides)

    def _compile(self, gm: fx.GraphModule, inputs, torch_mode):
        if self.compiler == "eager":
            return gm.forward
        if self.compiler == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager
            return aot_eager(gm, inputs)
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx
        patches = {**(list_mode_options(torch_mode) if torch_mode else {}), **self.inductor}
        return compile_fx(gm, inputs, config_patches=patches or None)

    def _plan_attention(self, gm: fx.GraphModule) -> list[tuple[str, str, int]]:
        """(node name, module name, bits) for the SDPA calls an attention rule (`attn_bits`) matches."""
        if not self.policy.attention_rules:
            return []
        root, plan = compiled_root(), []
        ids = {str(id(m)): n for n, m in root.named_modules()} if root is not None else {}
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in SDPA_TARGETS or not node.meta.get("nn_module_stack"):
                continue
            key, (path, _) = list(node.meta["nn_module_stack"].items())[-1]
            name = ids.get(str(key).split("@")[0])  # Dynamo keys inlined modules by str(id(module))
            module = root.get_submodule(name) if name is not None else None
            if name is None:
                name = _strip_root(str(path))
            _, bits = self.policy.match_attention(name, module)
            if bits is not None:
                plan.append((node.name, name, bits))
                self.layers[name] = f"attention q/k/v A{bits}"
        return plan


class _Lazy:
    def __init__(self, fn):
        self.fn, self.done, self.value = fn, False, None

    def __call__(self):
        if not self.done:
            self.value, self.done = self.fn(), True
        return self.value


def _lrb_holder(lrb) -> nn.Module:
    m = nn.Module()
    if lrb is not None:
        m.register_parameter("lrb_down", lrb[0])
        m.register_parameter("lrb_up", lrb[1])
    return m


def _strip_root(path: str) -> str:
    """Dynamo's `L['self'].blocks.0.attn` -> `blocks.0.attn`."""
    return re.sub(r"^(?:L|G)\[[^\]]*\]\.?", "", path)


def _describe(key: tuple) -> str:
    return ", ".join("FP" if s is None else s.short() for s in key)


def _options_key(options: dict) -> str:
    def norm(v):
        if isinstance(v, Policy):
            return v.to_dict()
        return v
    return json.dumps({k: norm(v) for k, v in options.items()}, sort_keys=True, default=repr)


# ---- public API --------------------------------------------------------------------------------------------------
def make_backend(policy=None, mode: str = "inference", strict: bool | None = None, *, compiler: str = "inductor",
                 inductor: dict | None = None, weight_sides: str = "auto") -> RobuQBackend:
    """A `robuq` backend for `torch.compile(model, backend=...)`.

    policy: as for `robuq_fx.quantize` (default: every nn.Linear W4A4 + Hadamard). mode: "inference" (packed
    weights, robuq::qlinear) or "qat" (fake-quant + STE, trainable). strict: error (True) or FP + one warning (False)
    for matched layers that cannot be quantized; None: the policy's "strict" (default True). compiler: "inductor",
    "aot_eager" (AOTAutograd without Inductor) or "eager" (the rewritten graph as is). inductor: Inductor config
    patches. weight_sides (qat): "layer", each layer's weight side inside the compiled graph, "step", every
    layer's computed once a call before it (backend/weight_sides.py; as `robuq_fx.weight_sides_per_forward`), or
    "auto" (default): "step" for graphs whose QAT layers are on CUDA, "layer" elsewhere.
    """
    return RobuQBackend(policy, mode, strict, compiler=compiler, inductor=inductor, weight_sides=weight_sides)


_INSTANCES: dict = {}  # options -> backend, so that recompiles of backend="robuq" share plans and warnings


def robuq_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """`backend="robuq"` (the torch_dynamo_backends entry point). Options come from torch.compile(options=...)."""
    key = _options_key(options or {})
    if key not in _INSTANCES:
        _INSTANCES[key] = make_backend().with_options(options) if options else make_backend()
    return _INSTANCES[key](gm, example_inputs, mode=mode)


def _register() -> None:
    """Make backend="robuq" work after `import robuq_fx.backend` even where the entry point is not installed. When
    Dynamo itself loads the entry point (which imports this module), it registers the name: do not do it twice."""
    from torch._dynamo.backends import registry
    if "robuq" not in registry._COMPILER_FNS and registry._BACKENDS.get("robuq") is None:
        registry.register_backend(robuq_backend, name="robuq")


_register()


class _CallableModule(types.ModuleType):
    """`robuq_fx.backend(policy, mode=...)` is `make_backend(...)`, while `robuq_fx.backend.prepare_qat` etc. stay
    reachable: the package exports this module, and the module is callable."""

    def __call__(self, policy=None, mode: str = "inference", strict: bool | None = None, **kw) -> RobuQBackend:
        return make_backend(policy, mode, strict, **kw)


sys.modules[__name__].__class__ = _CallableModule
