"""`fuse_activations(model)`: hand a GELU to the quantized layer that reads it (inference-time, opt-in).

In a transformer MLP, fc1 -> GELU -> fc2, the GELU is a full pass over the widest activation (M x 4 d): it reads
fc1's output and writes its own, which fc2's activation quantizer then reads again. When fc2 is a `PackedLinear`
and the GELU's only reader, the GELU can be applied by fc2 while it loads its input (`robuq::qlinear`'s
`input_act`): the GPU quantizer computes it in registers (kernels/triton_act_quant.py), other kernels compute it
first, exactly as the model did. The result is unchanged: the reference kernel's output is bit-identical
(tests/passes/test_act_fuse.py).

Recognized (the model's modules are edited in place, parameters and state-dict keys untouched):
  - diffusers `FeedForward` whose `net` is [GELU(proj), Dropout(p=0), fc2, ...]: the GELU module keeps its
    projection and stops applying the activation;
  - an MLP module with `fc1`, `act` (nn.GELU), `drop1` (p=0), `norm` (Identity) and `fc2` (timm's `Mlp`);
  - transformers' `ViTMLP` (fc1, activation_fn, fc2) whose activation is torch's GELU (exact or tanh);
  - an nn.Sequential [..., nn.GELU, Dropout(p=0)*, fc2]: the GELU becomes an Identity.
fc2 must have no input activation yet; a low-rank branch reads the activation as the quantizer does (on the GPU its
down-projection kernel applies it while loading x: kernels/triton_lowrank.py). Apply it to
a lowered model after `lower` or `load_quantized` (it is not saved with the checkpoint: a loaded model is unfused
until this runs again).
"""
from __future__ import annotations

import functools

import torch.nn as nn
import torch.nn.functional as F

from ..modules import PackedLinear


def _identity(x):
    return x


def _path(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _act_name(approximate: str) -> str:
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _takes(m) -> bool:
    return isinstance(m, PackedLinear) and not m.input_act


def _no_op_dropout(m) -> bool:
    return isinstance(m, nn.Dropout) and m.p == 0 or isinstance(m, nn.Identity)


def _hf_gelu(act) -> str | None:
    """The input_act of a transformers activation module that is torch's GELU (exact or tanh), else None (their
    Python formulas, NewGELU and friends, round differently: not fused)."""
    if type(act) is nn.GELU:
        return _act_name(act.approximate)
    fn = getattr(act, "act", None)
    if type(act).__name__ == "GELUActivation" and fn is F.gelu:
        return "gelu"
    if (type(act).__name__ in ("GELUTanh", "PytorchGELUTanh") and isinstance(fn, functools.partial)
            and fn.func is F.gelu and fn.keywords == {"approximate": "tanh"} and not fn.args):
        return "gelu_tanh"
    return None


def fuse_activations(model: nn.Module) -> list[str]:
    """Fuse every recognized GELU into the quantized layer after it (module docstring); returns the names of the
    layers that now apply it."""
    fused = []
    for name, mod in list(model.named_modules()):
        net = getattr(mod, "net", None)
        if type(mod).__name__ == "FeedForward" and isinstance(net, nn.ModuleList) and len(net) >= 3:
            g, drop, fc2 = net[0], net[1], net[2]
            if (type(g).__name__ == "GELU" and hasattr(g, "proj") and hasattr(g, "approximate")
                    and "gelu" not in g.__dict__ and _no_op_dropout(drop) and _takes(fc2)):
                g.gelu = _identity  # instance attribute: GELU.forward's self.gelu(...) now passes x through
                fc2.input_act = _act_name(g.approximate)
                fused.append(_path(name, "net.2"))
            continue
        if type(mod).__name__ == "ViTMLP" and all(hasattr(mod, a) for a in ("fc1", "activation_fn", "fc2")):
            act = _hf_gelu(mod.activation_fn)  # transformers' ViT: fc2(activation_fn(fc1(x)))
            if act and _takes(mod.fc2):
                mod.fc2.input_act = act
                mod.activation_fn = nn.Identity()
                fused.append(_path(name, "fc2"))
            continue
        if all(hasattr(mod, a) for a in ("fc1", "act", "drop1", "norm", "fc2")):
            if (type(mod.act) is nn.GELU and _no_op_dropout(mod.drop1) and isinstance(mod.norm, nn.Identity)
                    and _takes(mod.fc2)):
                mod.fc2.input_act = _act_name(mod.act.approximate)
                mod.act = nn.Identity()
                fused.append(_path(name, "fc2"))
            continue
        if isinstance(mod, nn.Sequential):
            kids = list(mod)
            for i, k in enumerate(kids):
                if type(k) is not nn.GELU:
                    continue
                j = i + 1
                while j < len(kids) and _no_op_dropout(kids[j]):
                    j += 1
                if j < len(kids) and _takes(kids[j]):
                    kids[j].input_act = _act_name(k.approximate)
                    mod[i] = nn.Identity()
                    fused.append(_path(name, str(j)))
    return fused
