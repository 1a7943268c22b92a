"""The hooks that run qat_step's weight sides once a forward of a whole QAT model (qat_step.py has the why and how).

Two ways they get onto a model:
- `weight_sides_per_forward(model)`, an explicit request: every forward, eager or compiled.
- `robuq_fx.quantize` puts them on every QAT model of QATLinear modules it returns (not the whole-graph form),
  engaging **only while `torch.compile` traces the whole model's forward in training mode**, with its QAT layers on
  CUDA and graph breaks allowed (`_engage`), where they were measured faster (H200, DiT-XL/2 batch 16: the paper
  policy's compiled step 1.11x the compiled FP step with them in session 24, 1.81x without in session 21; W4A4+H
  105.6 against 125.6 ms per layer in one session-25 run). Elsewhere the layers keep the per-layer path:
  - eager QAT, with its per-layer CUDA graphs (faster eagerly);
  - `fullgraph=True` and `torch.export`, which trace without a break;
  - CUDA graph modes (`mode="reduce-overhead"`, `_cudagraphs`), unless ROBUQ_QAT_STEP_WEIGHTS=cudagraphs
    (experimental, session 28): then they engage there too with the plan's forward buffers at fixed addresses
    (`qat_step.Plan.static_fwd`), which the graphs' replays read in place;
  - DDP / FSDP2 runs (a process group of more than one rank), whose gradients then arrive during the backward, for
    their all-reduce to overlap.
  `ROBUQ_QAT_STEP_WEIGHTS=0` turns the automatic hooks off; an explicit call replaces them.

The hooks are module-level functions and find their `qat_step.Plan` by the module they are called on (`_PLANS`,
held weakly), made at its first forward: a deep copy of the model (an EMA copy) or a pickled one carries the hooks
and gets a plan of its own layers, never the original's."""
from __future__ import annotations

import os
import warnings
import weakref

import torch
import torch.nn as nn

from .qat_linear import QATLinear
from .qat_step import Plan, WeightSides, _per_layer

_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its Plan, or None where not engaged
_PROBE = "_robuq_weight_side_probe"  # the model's first QAT layer (`install_auto`)


def _qat_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, QATLinear)]


def _plan(model: nn.Module):
    """model's Plan (made at its first forward), or None (no QAT layers; the automatic hooks stepped aside)."""
    if model not in _PLANS:
        layers = _qat_layers(model)
        _PLANS[model] = Plan(layers) if layers else None
    return _PLANS[model]


def _prepare(model: nn.Module, explicit: bool, static: bool = False) -> None:
    """Every QAT layer of model gets its weight side for this forward (`qat_step.WeightSides`). static: under a CUDA
    graph mode (ROBUQ_QAT_STEP_WEIGHTS=cudagraphs): the weight sides at the same addresses every forward
    (`qat_step.Plan.static_fwd`)."""
    plan = _plan(model)
    if plan is None:
        return
    plan.static_fwd = static
    masters = plan.masters()
    try:
        plan.check(masters)
    except TypeError:  # sharded masters (FSDP2), at the first forward or since: the automatic hooks step aside
        if explicit:
            raise
        _PLANS[model] = None
        return
    ranks = _ranks() if explicit and not plan.warned_ranks else 1
    if ranks > 1:
        plan.warned_ranks = True
        warnings.warn(f"weight_sides_per_forward on {type(model).__name__} under a process group of {ranks} ranks: "
                      f"every master's gradient arrives at the backward's end, so DDP cannot overlap its all-reduce "
                      f"with the backward (~90% of DiT-XL/2's gradient bytes in its last ~10%; 1.8x on 2 GPUs "
                      f"predicted to need ~176 GB/s): it pays only where its shorter step outweighs that "
                      f"(docs/distributed.md; benchmarks/ddp_overlap.py measures it), else .remove() the handle",
                      RuntimeWarning, stacklevel=3)
    if len({masters[i].device for i in plan.w_at}) > 1:  # one flat tensor on one device holds every weight side
        if explicit and not plan.warned:
            plan.warned = True
            warnings.warn(f"weight_sides_per_forward: the QAT layers of {type(model).__name__} are on several "
                          f"devices; each computes its own weight side instead", RuntimeWarning, stacklevel=3)
        return
    kinds = plan.kinds(masters)
    if len(kinds) > 1:  # one flat tensor holds every layer's weight side: one matmul dtype for all
        if explicit and not plan.warned:
            plan.warned = True
            warnings.warn(f"weight_sides_per_forward: the QAT layers of {type(model).__name__} compute in several "
                          f"dtypes {sorted(str(k[0]) for k in kinds)}; each computes its own weight side instead",
                          RuntimeWarning, stacklevel=3)
        return
    plan.c, plan.ab = kinds.pop()
    plan.set_act(masters[0].device)
    parts = WeightSides.apply(plan, *masters)
    for (layer, wq, down_c, bias_c), fused in zip(_per_layer(plan.layers, parts), plan.act):
        layer.module.__dict__["_prepared"] = (wq, down_c, bias_c, fused)  # (as `_clear`)


def _ranks() -> int:
    """The default process group's size (1 where none is initialized)."""
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def _clear(modules) -> None:
    """The layers back to their masters (set through __dict__: nn.Module.__setattr__'s checks, ~200 a step)."""
    for m in modules:
        m.__dict__["_prepared"] = None


@torch.compiler.disable
def _pre_always(module, args, kwargs):
    _prepare(module, True)


@torch.compiler.disable
def _pre_fixed(module, args, kwargs):  # weight_sides_per_forward(fixed_buffers=True)
    _prepare(module, True, static=True)


@torch.compiler.disable
def _release(module) -> None:
    """The layers of module's plan back to their masters (both post-hooks)."""
    plan = _PLANS.get(module)
    if plan is not None:
        _clear(plan.modules)


def _post_always(module, args, kwargs, output):
    _release(module)


OFF, ON, STATIC = 0, 1, 2  # what `_engage` answers: no hooks; hooks; hooks with fixed forward buffers (CUDA graphs)


@torch._dynamo.assume_constant_result
def _engage() -> int:
    """Whether the automatic hooks may run in this trace (OFF / ON / STATIC): called while Dynamo traces (its result a
    constant of the trace; no arguments, which it would have to turn into constants). Under CUDA graph modes they
    stay OFF unless ROBUQ_QAT_STEP_WEIGHTS=cudagraphs (experimental): then STATIC, the weight sides at fixed
    addresses (`qat_step.Plan.static_fwd`), which the compiled graphs' replays read in place."""
    try:
        switch = os.environ.get("ROBUQ_QAT_STEP_WEIGHTS", "auto")
        if switch == "0":
            return OFF
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
        if tx.one_graph or bool(getattr(tx, "error_on_graph_break", False)):  # fullgraph=True / no breaks allowed
            return OFF
        if _ranks() > 1:
            return OFF
        if _cudagraphs(tx.output.compiler_fn):
            return STATIC if switch == "cudagraphs" else OFF
        return ON
    except Exception:  # a torch whose tracer looks otherwise: the per-layer path, as before
        return OFF


def tracing_for_cudagraphs() -> bool:
    """Whether the frame Dynamo traces now is compiled for a backend that replays CUDA graphs (`_cudagraphs`); False
    outside a trace or where the tracer looks otherwise."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        return _cudagraphs(InstructionTranslator.current_tx().output.compiler_fn)
    except Exception:
        return False


def _cudagraphs(backend) -> bool:
    """Whether the compile backend replays its graphs from CUDA graphs (mode="reduce-overhead" / "max-autotune",
    Inductor's triton.cudagraphs, the "cudagraphs" backend). There the automatic hooks step aside: Dynamo takes the
    tensors they hand the layers (module attributes) as static inputs, whose addresses must not move, while a plan's
    buffers rotate (`qat_step.Plan._free_graph`): every step re-recorded the graphs (H200, session 25: 18.5x the FP
    step); and where launches cost nothing at replay the per-layer weight sides lose little (1.21x FP, 4 DiT-XL/2
    blocks)."""
    for _ in range(16):  # down the chain of wrappers torch.compile puts around the backend
        if backend is None:
            break
        config = getattr(backend, "config", None)
        if isinstance(config, dict) and config.get("triton.cudagraphs"):
            return True
        if getattr(backend, "__name__", "") == "cudagraphs":
            return True
        backend = getattr(backend, "_torchdynamo_orig_backend", None)
    import torch._inductor.config as inductor_config
    return bool(inductor_config.triton.cudagraphs)  # (set globally: in force in every mode)


def _device_ok(t: torch.Tensor) -> bool:
    """The automatic hooks' device, and the compile backend's for weight_sides="auto": CUDA, where the step form's
    CUDA graphs and kernels were measured (tests widen it)."""
    return t.is_cuda


@torch.compiler.disable
def _pre_compiled_run(module, static: bool = False) -> None:
    _prepare(module, False, static)


def _engaged(module) -> int:
    """OFF / ON / STATIC (`_engage`). Traced by Dynamo (a condition it folds to a constant, guarding on the mode and
    the probe's device); in eager forwards one call."""
    if not (torch.compiler.is_compiling() and module.training):
        return OFF
    mode = _engage()
    return mode if mode != OFF and _device_ok(getattr(module, _PROBE).weight) else OFF


def _pre_compiled(module, args, kwargs):
    mode = _engaged(module)
    if mode != OFF:
        _pre_compiled_run(module, mode == STATIC)  # (a graph break: runs eagerly before the compiled forward)


def _post_compiled(module, args, kwargs, output):
    if _engaged(module) != OFF:
        _release(module)


def _remove(model: nn.Module, fns: tuple) -> None:
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, f in hooks.items() if f in fns]:
            del hooks[key]
            model._forward_hooks_with_kwargs.pop(key, None)
            model._forward_pre_hooks_with_kwargs.pop(key, None)
            model._forward_hooks_always_called.pop(key, None)


def strip(model: nn.Module) -> None:
    """No weight-side hooks on model (a lowered copy of a QAT model: no QAT layers left)."""
    _remove(model, (_pre_compiled, _post_compiled, _pre_always, _pre_fixed, _post_always))
    model.__dict__.pop(_PROBE, None)


def install_auto(model: nn.Module) -> None:
    """The automatic hooks on a QAT model `robuq_fx.quantize` returns (module docstring)."""
    layers = _qat_layers(model)
    if layers:
        # the probe whose device the trace checks: a plain attribute (not a submodule: state_dict, modules() and
        # the printed model are unchanged; a deep copy or pickle maps it to the copy's layer)
        model.__dict__[_PROBE] = layers[0]
        model.register_forward_pre_hook(_pre_compiled, with_kwargs=True)
        # (always_call: a forward that raises leaves no layer holding this forward's tensors)
        model.register_forward_hook(_post_compiled, with_kwargs=True, always_call=True)


class WeightSidesHandle:
    """What `weight_sides_per_forward` returns: `.remove()` takes the hooks off again (the automatic ones stay off)."""

    def __init__(self, model: nn.Module, modules: list):
        self._model, self._modules = weakref.ref(model), modules

    def remove(self) -> None:
        model = self._model()
        if model is not None:
            _remove(model, (_pre_always, _pre_fixed, _post_always))
            _PLANS.pop(model, None)
        _clear(self._modules)


def weight_sides_per_forward(model: nn.Module, *, fixed_buffers: bool = False) -> WeightSidesHandle:
    """Compute every QAT layer's weight side once a forward of `model`, for all its layers at once, instead of
    inside each layer (qat_step's docstring), in every forward, eager or compiled. `robuq_fx.quantize` already does
    this where it was measured faster, while `torch.compile` traces a training forward on CUDA (this module's
    docstring); call this to have it in the other cases too (eager forwards, the CPU, under a process group).
    Replaces the automatic hooks. Returns a handle; `.remove()` undoes it (no hooks left, automatic ones neither).

        qmodel = robuq_fx.quantize(model, "dit-xl-2-robuq", example_inputs=...).train()
        handle = robuq_fx.weight_sides_per_forward(qmodel)
        step = torch.compile(qmodel)

    fixed_buffers: every forward's weight sides at the same addresses from the second forward on (on CUDA, where
    they come from graph replays), for CUDA graphs that read them as static inputs and would record again for new
    addresses: `compile_repeated_blocks(qmodel, mode="reduce-overhead")` after this call. The values are rewritten
    in place each forward, the same while the masters have not moved (gradient accumulation).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"weight_sides_per_forward takes the QAT model (an nn.Module), got {type(model).__name__}")
    modules = _qat_layers(model)
    if not modules:
        raise ValueError(f"weight_sides_per_forward: {type(model).__name__} has no QAT layers (QATLinear modules, what "
                         f"robuq_fx.quantize makes in training mode)")
    plan = Plan(modules)
    plan.check(plan.masters())  # (refuses sharded masters now, not at the first forward)
    strip(model)
    _PLANS[model] = plan
    model.register_forward_pre_hook(_pre_fixed if fixed_buffers else _pre_always, with_kwargs=True)
    model.register_forward_hook(_post_always, with_kwargs=True, always_call=True)
    return WeightSidesHandle(model, modules)
