"""Packed checkpoints: safetensors with the packed tensors of a lowered model and, in its metadata, the format
version, the policy and every layer's spec and true shape.

`load_quantized(path, model)` rebuilds the structure from a freshly built FP model of the same class (random init is
fine): quantize with the saved policy (no SVD), lower with empty buffers, check every name/shape/spec against the
file, and only then load. FP weights of quantized layers are never read from the file (they are not in it). The
result has the form `quantize` gives that model: your model's class with PackedLinear layers (drop-in), or one
GraphModule (whole-graph); the file is the same either way (tensors per layer, under the model's own names).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError
from .passes.dropin import fuse_modules
from .passes.fuse import fuse_lowered, layer_modules, unfused_state_dict
from .passes.lower import lower, packed_path
from .passes.qat import ROBUQ_META, quantize
from .policy import Policy
from .qat_linear import QATLinear
from .spec import LayerSpec

FORMAT = "robuq_fx.packed"
FORMAT_VERSION = 1


def _dedup(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU tensors to write, each storage once: a tied weight (e.g. an LM's embedding and lm_head) is stored under
    its first key and the others are recorded as aliases; other views of a shared storage are copied (safetensors
    refuses tensors that share memory)."""
    tensors, aliases, same, storages = {}, {}, {}, set()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        ptr = (v.device, v.untyped_storage().data_ptr())
        key = (*ptr, v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if v.numel() and key in same:
            aliases[k] = same[key]
            continue
        same[key] = k
        t = v.detach().cpu().contiguous()
        if v.numel() and ptr in storages and t.untyped_storage().data_ptr() == v.untyped_storage().data_ptr():
            t = t.clone()
        storages.add(ptr)
        tensors[k] = t
    return tensors, aliases


def save_quantized(lowered: nn.Module, path) -> Path:
    from safetensors.torch import save_file
    info = getattr(lowered, ROBUQ_META, None)
    if info is None or info.get("stage") != "lowered":
        raise CheckpointError("save_quantized() takes the output of robuq_fx.lower()")
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise CheckpointError(f"cannot write {path}: directory {path.parent} does not exist")
    tensors, aliases = _dedup(unfused_state_dict(lowered))  # per layer: files do not depend on sibling fusion
    mods = layer_modules(lowered)
    layers = {}
    for n, spec in info["layers"].items():
        m = mods[packed_path(n)]
        layers[n] = {"spec": spec, "shape": list(m.qweight.shape), "in_features": m.in_features,
                     "out_features": m.out_features}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "policy": json.dumps(info["policy"]),
            "layers": json.dumps(layers), "capture": info["capture"], "torch": torch.__version__,
            "aliases": json.dumps(aliases)}
    try:
        save_file(tensors, str(path), metadata=meta)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e}") from e
    return path


def read_metadata(path) -> dict:
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a robuq_fx packed checkpoint (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: unknown format version {meta.get('format_version')!r}; this robuq_fx reads "
                              f"version {FORMAT_VERSION}")
    return meta


def load_quantized(path, model: nn.Module, example_inputs=None, *, fuse: bool = True) -> nn.Module:
    """Inference module with the packed weights of `path`, built on `model`'s architecture (not modified).
    fuse: as `lower(fuse=...)`; the file holds every layer on its own either way."""
    from safetensors import safe_open
    meta = read_metadata(path)
    saved = json.loads(meta["layers"])
    policy = Policy.from_dict(json.loads(meta["policy"]), source=f"{path} (policy)")
    qmodel = quantize(model, policy, example_inputs, init_lrb=False)
    built = getattr(qmodel, ROBUQ_META)["layers"]
    for name in list(built) + [n for n in saved if n not in built]:  # model order: the first difference is named
        if name not in built:
            raise CheckpointError(f"{path}: layer '{name}' is quantized in the checkpoint but not in this model")
        if name not in saved:
            raise CheckpointError(f"{path}: layer '{name}' of this model is not in the checkpoint")
        n_in, n_out = _features(qmodel, name)
        if (saved[name]["in_features"], saved[name]["out_features"]) != (n_in, n_out):
            raise CheckpointError(f"{path}: layer '{name}' was saved as {saved[name]['in_features']}->"
                                  f"{saved[name]['out_features']} features, this model has {n_in}->{n_out}")
        if saved[name]["spec"] != built[name]:
            raise CheckpointError(f"{path}: layer '{name}' was saved as {LayerSpec(**saved[name]['spec']).short()} "
                                  f"but this model builds it as {LayerSpec(**built[name]).short()}")
    lowered = lower(qmodel, compute=False, fuse=False)
    expected = {k: v for k, v in lowered.state_dict().items() if isinstance(v, torch.Tensor)}
    try:
        aliases = json.loads(meta.get("aliases", "{}"))
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys()) | set(aliases)
            missing = sorted(set(expected) - keys)
            extra = sorted(keys - set(expected))
            if missing or extra:
                raise CheckpointError(f"{path}: tensors do not match the model: missing {missing[:5]}, "
                                      f"unexpected {extra[:5]}")
            state = {}
            for k in sorted(expected):
                t = state[aliases[k]] if k in aliases and aliases[k] in state else f.get_tensor(aliases.get(k, k))
                if t.shape != expected[k].shape or t.dtype != expected[k].dtype:
                    raise CheckpointError(f"{path}: '{k}' has shape {tuple(t.shape)} {t.dtype}, the model expects "
                                          f"{tuple(expected[k].shape)} {expected[k].dtype}")
                state[k] = t
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: could not read tensors (truncated or corrupt?): {e}") from e
    lowered.load_state_dict(state, strict=False)
    if fuse:
        if getattr(lowered, ROBUQ_META).get("form") == "modules":
            fuse_modules(lowered)  # captures sibling parents again, on the example inputs quantize() kept
        else:
            fuse_lowered(lowered)
    return lowered


def _features(qmodel: nn.Module, name: str) -> tuple[int, int]:
    """(in_features, out_features) of a quantized layer: a QATLinear (drop-in form), or the module holding the
    weight a graph reads (whole-graph form)."""
    mod = qmodel.get_submodule(name)
    if isinstance(mod, QATLinear):
        return mod.in_features, mod.out_features
    n_out, n_in = mod.weight.shape
    return n_in, n_out


def file_size(path) -> int:
    return os.path.getsize(path)
