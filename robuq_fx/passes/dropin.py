"""The drop-in path: `quantize` / `lower` return the user's model (its class, config, methods, state_dict keys) with
only the parts that change replaced, each rewrite on the smallest submodule that holds it:

    a linear module the policy matches         -> QATLinear (QAT) -> PackedLinear (lowered)      (module swap)
    a module whose forward calls SDPA, with    -> that module captured (RegionModule), q/k/v fake-quant
      an attention rule (attn_bits)               (passes/attention.py) -> robuq::attention8 when lowered
    a module whose forward feeds one tensor    -> at lowering: that module captured, siblings fused
      to >= 2 sibling layers                      (passes/fuse.py) into one robuq::qlinear

Which path a model takes (quantize() decides; robuq_info(q)["form"] says which):
- "modules" (this file): every matched linear is an nn.Linear / Conv1D module called as a module.
- "graph" (passes/qat.py, the whole model as one GraphModule): when a matched linear is a functional call,
  F.linear(x, <parameter>), so there is no module to swap, or the model's own forward calls attention with an
  attention rule, or the model itself is one linear layer, or `quantize(..., whole_graph=True)`.
"""
from __future__ import annotations

import copy
import inspect
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..capture import LinearSite
from ..capture_region import capture_submodule
from ..errors import CaptureError, PolicyError
from ..modules import PackedLinear, use_device_layout
from ..policy import Policy
from ..probe import discover, record_calls
from ..qat_linear import QATLinear, is_linear_type, linear_dims
from ..qat_step_hooks import strip as strip_weight_side_hooks
from .attention import apply_attention, find_attention, lower_attention
from .fuse import fuse_siblings, qlinear_node
from .qat import ROBUQ_META, plan_layers, set_robuq_info
from .region import make_region, regions

INPUTS = "_robuq_inputs"  # example inputs kept on the model: lower() captures sibling parents with them
# a forward that takes a KV cache updates a Python object a captured graph cannot update: never captured for fusion
_CACHE_ARGS = {"cache", "past_key_value", "past_key_values", "layer_past", "kv_cache", "cache_params"}


# ---- quantize ------------------------------------------------------------------------------------------------------
def quantize_modules(root: nn.Module, policy: Policy, example_inputs, init_lrb: bool, model_name: str):
    """QAT form of `root` (the caller's private copy, edited in place), or (None, why) when the model needs the
    whole-graph path (module docstring)."""
    linears = {n: m for n, m in root.named_modules() if n and linear_dims(m) is not None}
    disc = discover(root, example_inputs, set(linears))
    functional = [o for o in disc.functional if _matched(policy, root, o)]
    if functional:
        return None, (f"matched linear layers {functional[:5]} are functional calls (F.linear on a parameter, or "
                      "an nn.Linear subclass with its own forward), not modules that can be swapped")
    if not disc.known and policy.attention_rules:
        raise CaptureError(f"the policy has attention rules (attn_bits): robuq_fx runs the model once to find the "
                           f"modules that call scaled_dot_product_attention, and {disc.why}. Pass example_inputs")
    attention = _plan_attention(disc, root, policy)
    if "" in attention:
        return None, "the model's own forward calls scaled_dot_product_attention with an attention rule"
    sites, unused = [], []
    for name, mod in linears.items():
        if disc.known and name not in disc.called:
            unused.append(name)
            continue
        k, n, _ = linear_dims(mod)
        sites.append(LinearSite(None, name, mod, k, n))
    custom = [n for n, m in root.named_modules() if n and n not in linears and is_linear_type(m)
              and _matched(policy, root, n)]
    layers = plan_layers(sites, policy, model_name, allow_empty=True)
    if not disc.known and (custom or not layers):
        seen = f"nn.Linear subclasses with their own forward {custom[:5]}" if custom else "no linear module matches"
        return None, f"{disc.why}, and without example inputs functional linear calls cannot be found ({seen})"
    if not layers and not attention:
        plan_layers(sites, policy, model_name)  # raises: the policy matches no linear layer
    if not disc.known:
        warnings.warn(f"robuq_fx: {disc.why}; without example_inputs it swaps the matched linear modules without "
                      "running the model, so it cannot see a forward that reads a linear's weight directly (such "
                      "a call would stay in full precision). Pass example_inputs to check", stacklevel=3)
    unused = [n for n in unused if policy.match(n, linears[n])[1] is not None]
    if unused:
        warnings.warn(f"robuq_fx: the policy matches {unused[:5]}, which the example forward never called as "
                      "modules (e.g. nn.MultiheadAttention reads its out_proj weight directly): left in full "
                      "precision", stacklevel=3)
    swap_modules(root, {id(linears[n]): QATLinear.from_module(linears[n], s, init_lrb) for n, s in layers.items()})
    info_regions = {}
    for path in _outermost(attention):
        frame = root.get_submodule(path)
        gm, method, spec = capture_submodule(frame, disc.calls.get(path), path)
        plan = []
        for node, rel in find_attention(gm):
            full = ".".join(p for p in (path, rel) if p)
            if full in attention:
                plan.append((node, full, attention[full]))
        apply_attention(gm, plan)
        _install(root, path, make_region(gm, spec, {"path": path, "capture": method, "why": "attention"}))
        info_regions[path] = {"capture": method, "why": "attention"}
    set_robuq_info(root, {"stage": "qat", "form": "modules", "capture": "modules", "policy": policy.to_dict(),
                          "layers": {n: s.to_dict() for n, s in layers.items()}, "attention": attention,
                          "regions": info_regions})
    if example_inputs is not None:
        setattr(root, INPUTS, example_inputs)
    return root, ""


def _matched(policy: Policy, root: nn.Module, name: str) -> bool:
    try:
        module = root.get_submodule(name)
    except AttributeError:
        module = None
    return policy.match(name, module)[1] is not None


def _plan_attention(disc, root: nn.Module, policy: Policy) -> dict[str, int]:
    """{module path: attn_bits} for the modules calling SDPA that an attention rule matches; a rule matching none
    is an error (as on the whole-graph path), checked before anything is edited."""
    plan, used = {}, set()
    for path in sorted(disc.sdpa):
        i, bits = policy.match_attention(path, root.get_submodule(path))
        if bits is not None:
            plan[path] = bits
            used.add(i)
    for i, rule in policy.attention_rules:
        if i not in used:
            raise PolicyError(f"policy rule {i} ({rule.raw}) sets attn_bits but matches no module that calls "
                              f"scaled_dot_product_attention; modules with attention calls: "
                              f"{sorted(disc.sdpa)[:10] or 'none'}")
    return plan


def _outermost(paths) -> list[str]:
    return [p for p in paths if not any(p != o and p.startswith(o + ".") for o in paths)]


def _install(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def swap_modules(root: nn.Module, new: dict[int, nn.Module]) -> None:
    """Replace every occurrence of each module (by id) under `root`, a module registered twice included."""
    for _, parent in list(root.named_modules(remove_duplicate=False)):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                parent._modules[name] = new[id(child)]


# ---- lower ---------------------------------------------------------------------------------------------------------
def lower_modules(qmodel: nn.Module, *, compute: bool = True, progress: bool | None = None,
                  fuse: bool = True) -> nn.Module:
    """lower() of a drop-in QAT model: QATLinear -> PackedLinear, attention regions -> robuq::attention8, then
    sibling fusion (`fuse_modules`). `qmodel` is not modified."""
    model = copy.deepcopy(qmodel)
    info = getattr(model, ROBUQ_META)
    qat = {}
    for m in model.modules():
        if isinstance(m, QATLinear) and id(m) not in qat:
            qat[id(m)] = m
    show = progress if progress is not None else len(qat) > 32
    with torch.no_grad():
        packed = {i: _packed(m, compute) for i, m in tqdm(qat.items(), desc="lower", disable=not show, unit="layer")}
    swap_modules(model, packed)
    for region in regions(model).values():
        lower_attention(region)
        packed_calls_to_ops(region)
    set_robuq_info(model, dict(info, stage="lowered"))
    strip_weight_side_hooks(model)  # (the QAT model's, copied with it)
    if fuse:
        fuse_modules(model)
    use_device_layout(model)
    model.eval()
    return model


@torch.no_grad()
def _packed(q: QATLinear, compute: bool) -> PackedLinear:
    w = q.weight_nk()
    if compute:
        p = PackedLinear.from_float(w, q.bias, q.lrb_down, q.lrb_up, q.spec)
    else:
        p = PackedLinear(q.in_features, q.out_features, q.spec, q.bias is not None, w.dtype, w.device)
    if q.compute_dtype is not None:  # a cast QAT model: the same packed layer as lowering first, then casting
        p.to(q.compute_dtype)
    return p.train(q.training)


def packed_calls_to_ops(gm: fx.GraphModule) -> None:
    """call_module(PackedLinear) -> robuq::qlinear(x, <its buffers>, ...): the form passes/fuse.py reads."""
    g, changed = gm.graph, False
    for node in list(g.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not PackedLinear:
            continue
        mod = gm.get_submodule(node.target)
        with g.inserting_before(node):
            new = qlinear_node(g, node.args[0], node.target, mod)
        new.meta = dict(node.meta)
        new.meta["robuq_lowered"] = node.target
        node.replace_all_uses_with(new)
        g.erase_node(node)
        changed = True
    if changed:
        g.lint()
        gm.recompile()


def fuse_modules(model: nn.Module) -> dict[str, list[str]]:
    """Sibling fusion on a drop-in lowered model, in place: inside the attention regions, then in every other
    submodule with >= 2 PackedLinear children of one width (captured; kept only when something fused).
    Records {fused path: [member paths]} under robuq_info "fused", the new regions under "regions", and why a
    candidate was left alone under "unfused"."""
    info = getattr(model, ROBUQ_META)
    fused, unfused, new_regions = {}, {}, {}
    for path, region in regions(model).items():
        fused.update(_fuse_in(region, path))
    todo, skipped = _fusion_candidates(model)
    unfused.update(skipped)
    inputs = getattr(model, INPUTS, None)
    calls = {}
    if todo and inputs is not None:
        try:
            calls = record_calls(model, inputs, set(todo))
        except Exception as e:  # noqa: BLE001 - fusion is optional: say why it was not done, and go on
            warnings.warn(f"robuq_fx: running the model on the example inputs quantize() kept failed ({e}); "
                          "sibling layers whose parent needs torch.export stay unfused", stacklevel=3)
    for path in todo:
        if any(r.startswith(path + ".") for r in regions(model)):
            continue  # a deeper region is installed inside it (candidates come deepest first)
        frame = model.get_submodule(path)
        try:
            gm, method, spec = capture_submodule(frame, calls.get(path), path)
        except CaptureError as e:
            unfused[path] = str(e)
            continue
        packed_calls_to_ops(gm)
        done = _fuse_in(gm, path)
        if done:
            _install(model, path, make_region(gm, spec, {"path": path, "capture": method, "why": "fusion"}))
            fused.update(done)
            new_regions[path] = {"capture": method, "why": "fusion"}
    set_robuq_info(model, dict(info, fused={**info.get("fused", {}), **fused},
                               unfused={**info.get("unfused", {}), **unfused},
                               regions={**info.get("regions", {}), **new_regions}))
    return fused


def _fuse_in(gm: fx.GraphModule, prefix: str) -> dict[str, list[str]]:
    """fuse_siblings on one region; member and fused paths made relative to the whole model."""
    full = (lambda p: f"{prefix}.{p}" if prefix else p)
    out = {}
    for path, members in fuse_siblings(gm).items():
        f = gm.get_submodule(path)
        f.members = tuple(full(m) for m in members)
        out[full(path)] = list(f.members)
    return out


def _fusion_candidates(model: nn.Module) -> list[str]:
    """Submodules (not the root: that would replace your model by a GraphModule) outside the regions, with >= 2
    PackedLinear children of one in_features, deepest first; and {path: why} for ones left alone because their
    forward takes a KV cache."""
    inside = [p for p in regions(model)]
    out, skipped = [], {}
    for path, mod in model.named_modules():
        if not path or isinstance(mod, fx.GraphModule) or any(path == r or path.startswith(r + ".") for r in inside):
            continue
        widths = [c.in_features for c in mod.children() if type(c) is PackedLinear]
        if len(widths) - len(set(widths)) < 1:
            continue
        cache = sorted(_CACHE_ARGS & set(inspect.signature(type(mod).forward).parameters))
        if cache:
            skipped[path] = (f"its forward takes a KV cache ('{cache[0]}'), which a captured graph could not update "
                             "(generate()): its layers stay unfused")
            continue
        out.append(path)
    return sorted(out, key=lambda p: -p.count(".")), skipped

