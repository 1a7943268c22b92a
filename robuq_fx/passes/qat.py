"""QAT pass: `quantize(model, policy)`. Drop-in path (passes/dropin.py, most models): the matched linear modules
become QATLinear modules of your model. Whole-graph path (below): the model is captured as one GraphModule and
`layer.qat_forward` (Hadamard, fake-quant with STE, low-rank branch) is inlined in place of every linear call the
policy matches. The user's model is never touched: both work on a deep copy, and every check runs before an edit."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from .. import layer
from ..capture import (LinearSite, capture, find_linears, normalize_linear_modules, private_copy,
                       source_meta)
from ..errors import CaptureError, PolicyError, SpecError
from ..policy import Policy
from ..qat_linear import linear_dims
from ..qat_step_hooks import install_auto
from ..spec import LayerSpec
from .attention import apply_attention, plan_attention

ROBUQ_META = "_robuq"  # model attribute: {"stage", "form", "layers": {name: spec dict}, "policy", "capture", ...}


def quantize(model: nn.Module, policy=None, example_inputs=None, *, init_lrb: bool = True,
             whole_graph: bool = False) -> nn.Module:
    """Return a QAT copy of `model` whose matched linear layers compute RobuQ's quantized forward.

    The copy is your model (same class, config, methods, state_dict keys plus the low-rank branches) with each
    matched linear module replaced by a QATLinear and each module that an attention rule matches captured
    (passes/dropin.py). Models whose matched linears are functional calls, not modules, come back as one
    GraphModule of the whole model (`robuq_info(q)["form"]` is "graph"; `whole_graph=True` forces it).

    policy: a `Policy`, its dict form, a JSON/YAML path or a shipped policy name (default: all Linear W4A4 + H).
    example_inputs: a tuple of positional inputs or a dict of keyword inputs, as you call the model. robuq_fx runs
    the model on them once to find attention and functional linear calls, and captures submodules (or the whole
    graph) from them when `symbolic_trace` cannot. Without them it symbolic-traces the model to find those; when
    that fails too, linear modules are still swapped, but attention rules need example inputs.
    init_lrb: initialise low-rank branches from the SVD (False when a state_dict will be loaded right after).
    """
    policy = Policy.coerce(policy)
    check_module(model, "quantize")
    if getattr(model, ROBUQ_META, None) is not None:
        raise PolicyError("this model was already quantized by robuq_fx; quantize the original model instead")
    root = private_copy(model)
    why = "whole_graph=True"
    if not whole_graph and linear_dims(root) is None:
        from .dropin import quantize_modules
        out, why = quantize_modules(root, policy, example_inputs, init_lrb, type(model).__name__)
        if out is not None:
            install_auto(out)  # the whole model's weight sides once a forward under torch.compile (qat_step_hooks)
            return out
    elif not whole_graph:
        why = "the model itself is one linear layer"
    gm, method = capture(root, example_inputs)
    normalize_linear_modules(gm)
    sites = find_linears(gm, root)
    attn_plan = plan_attention(gm, root, policy)
    layers = plan_layers(sites, policy, type(model).__name__, allow_empty=bool(attn_plan))
    apply_layers(gm, sites, layers, init_lrb)
    attention = apply_attention(gm, attn_plan)
    set_robuq_info(gm, {"stage": "qat", "form": "graph", "why": why, "capture": method, "policy": policy.to_dict(),
                        "layers": {n: s.to_dict() for n, s in layers.items()}, "attention": attention})
    return gm


def check_module(model, what: str) -> None:
    """A clear error for what is not an nn.Module (a diffusers/transformers pipeline, a scheduler, ...)."""
    if isinstance(model, nn.Module):
        return
    hint = ""
    parts = getattr(model, "components", None)
    if isinstance(parts, dict):
        mods = [k for k, v in parts.items() if isinstance(v, nn.Module)]
        hint = (f" It looks like a pipeline: {what} one of its nn.Module components ({', '.join(mods) or 'none'}) "
                f"and put the result back, e.g. pipe.transformer = robuq_fx.{what}(pipe.transformer, ...)")
    raise CaptureError(f"robuq_fx.{what}() takes a torch.nn.Module; got a {type(model).__name__}.{hint}")


def plan_layers(sites: list[LinearSite], policy: Policy, model_name: str = "model",
                allow_empty: bool = False) -> dict[str, LayerSpec]:
    """Resolve every matched layer's spec (all shape checks) before anything is edited."""
    layers: dict[str, LayerSpec] = {}
    for site in sites:
        if site.name in layers:
            continue
        _, spec = policy.match(site.name, site.module)
        if spec is None:
            continue
        try:
            layers[site.name] = spec.resolve(site.in_features, site.out_features, site.name)
        except SpecError as e:
            raise PolicyError(str(e)) from None
    if not layers and not allow_empty:
        found = sorted({s.name for s in sites})
        raise PolicyError(f"the policy matches no linear layer of {model_name}; its linear layers are: "
                          f"{found[:20]}{' ...' if len(found) > 20 else ''}")
    return layers


def apply_layers(gm: fx.GraphModule, sites: list[LinearSite], layers: dict[str, LayerSpec],
                 init_lrb: bool = True) -> None:
    for name, spec in layers.items():
        if spec.lora_rank:
            owner = gm.get_submodule(name)
            weight = owner.weight
            if init_lrb:
                down, up = layer.lrb_init(weight, spec)
            else:
                n, k = weight.shape
                down = weight.new_zeros(spec.lora_rank, k)
                up = weight.new_zeros(n, spec.lora_rank)
            owner.register_parameter("lrb_down", nn.Parameter(down, requires_grad=weight.requires_grad))
            owner.register_parameter("lrb_up", nn.Parameter(up, requires_grad=weight.requires_grad))
    inline_sites(gm, sites, layers)


def inline_sites(gm: fx.GraphModule, sites: list[LinearSite], layers: dict[str, LayerSpec]) -> None:
    """Inline `layer.qat_forward` at every site of a layer in `layers` (its low-rank branch, if any, is read with
    get_attr from `<layer>.lrb_down/up`). Also used by the torch.compile backend (robuq_fx/backend/)."""
    traced: dict = {}
    counts: dict[str, int] = {}
    for site in sites:
        spec = layers.get(site.name)
        if spec is None:
            continue
        k = counts.get(site.name, 0)
        counts[site.name] = k + 1
        _inline(gm, site, spec, k, traced)
    gm.graph.lint()
    gm.recompile()


def _inline(gm: fx.GraphModule, site: LinearSite, spec: LayerSpec, site_idx: int, traced: dict) -> None:
    g, node, name = gm.graph, site.node, site.name
    x = node.args[0] if node.args else node.kwargs["input"]
    w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    key = (spec, b is not None)
    if key not in traced:
        traced[key] = layer.trace_qat_forward(spec, b is not None, spec.lora_rank > 0)
    sub = traced[key]
    tag = {"layer": name, "site": site_idx, "x": x.name, "bias": None if b is None else b.name}
    with g.inserting_before(node):
        inputs = [x, w, b, None, None]
        if spec.lora_rank:
            inputs[3] = g.get_attr(f"{name}.lrb_down")
            inputs[4] = g.get_attr(f"{name}.lrb_up")
            for n in inputs[3:]:
                n.meta["robuq"] = dict(tag, role="lrb")
        env, out, i = {}, None, 0
        for n in sub.nodes:
            if n.op == "placeholder":
                env[n] = inputs[i]
                i += 1
            elif n.op == "output":
                out = env[n.args[0]]
            elif n.op == "call_function" and n.target is _assert_is_none:
                continue
            else:
                new = g.node_copy(n, lambda a: env[a])
                new.meta = {"robuq": dict(tag, role="op"), **source_meta(node)}
                env[n] = new
    out.meta["robuq"]["role"] = "out"
    node.replace_all_uses_with(out)
    g.erase_node(node)


def robuq_info(model: nn.Module) -> dict | None:
    """What robuq_fx did to `model` (None for a model it did not make): stage ("qat" / "lowered"), form
    ("modules": your model with swapped layers; "graph": one GraphModule), layers and their specs, policy, ..."""
    return getattr(model, ROBUQ_META, None)


def set_robuq_info(gm: nn.Module, info: dict) -> None:
    """Attach the `_robuq` info so that it survives `copy.deepcopy(gm)`.

    GraphModule.__deepcopy__ rebuilds the module from its graph and drops plain instance attributes: a deep-copied
    QAT model (EMA / best-checkpoint copies) lost `_robuq`, so `lower()` refused it and `robuq_info()` returned None.
    FX restores the attributes listed in `gm.meta["_user_preserved_attributes"]` on deepcopy.
    """
    setattr(gm, ROBUQ_META, info)
    if isinstance(gm, fx.GraphModule):
        gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[ROBUQ_META] = info


def trainable_lrb_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith(("lrb_down", "lrb_up"))]
