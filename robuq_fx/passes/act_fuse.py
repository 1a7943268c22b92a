"""`fuse_activations(model, into=...)`: hand a GELU to a quantized layer beside it (inference-time, opt-in).

In a transformer MLP, fc1 -> GELU -> fc2, the GELU is a full pass over the widest activation (M x 4 d): it reads
fc1's output and writes its own, which fc2's activation quantizer then reads again. When fc2 is a `PackedLinear`
and the GELU's only reader, the GELU can be applied by fc2 while it loads its input (`robuq::qlinear`'s
`input_act`): the GPU quantizer computes it in registers (kernels/triton_act_quant.py), other kernels compute it
first, exactly as the model did. The result is unchanged: the reference kernel's output is bit-identical
(tests/passes/test_act_fuse.py).

into="producer" hands it to the layer before it instead (fc1: `robuq::qlinear`'s `output_act`): the Triton fp8
GEMM applies it in its store (kernels/triton_fp8_kernels.py OUT_ACT: y rounded to the output dtype, GELU in fp32,
rounded again, as the unfused pair computes it; the exact form to one bf16 step on rare elements: robuq::qlinear),
every other kernel runs the GELU after the layer. This also covers transformers' `*Intermediate` modules (dense,
intermediate_act_fn), whose reader lives in another module. Measured on the H200 (session 16) it loses: DiT-XL/2
W4A4+H at batch 64 1.02x bf16 with the GELU in fc1's store against 1.24x without (docs/gpu.md): an opt-in.

Recognized (the model's modules are edited in place, parameters and state-dict keys untouched), producer / reader:
  - diffusers `FeedForward` whose `net` is [GELU(proj), Dropout(p=0), fc2, ...]: net.0.proj / net.2; the GELU module
    keeps its projection and stops applying the activation;
  - an MLP module with `fc1`, `act` (nn.GELU), `drop1`, `norm` and `fc2` (timm's `Mlp`): fc1 / fc2 (the reader only
    where drop1 has p = 0 and norm is an Identity);
  - transformers' `ViTMLP` (fc1, activation_fn, fc2) whose activation is torch's GELU (exact or tanh): fc1 / fc2;
  - transformers' `*Intermediate` (dense, intermediate_act_fn, torch's GELU): dense / none (the producer only);
  - an nn.Sequential [..., layer, nn.GELU, Dropout(p=0)*, layer, ...]: the GELU becomes an Identity.
The receiving layer must have no activation on that side yet (a layer can take one of each). A low-rank branch reads
the input activation as the quantizer does (on the GPU its down-projection kernel applies it while loading x:
kernels/triton_lowrank.py). Apply it to a lowered model after `lower` or `load_quantized` (it is not saved with the
checkpoint: a loaded model is unfused until this runs again).
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


def _sites(mod: nn.Module):
    """The GELUs of `mod` this pass recognizes (module docstring): (activation, (producer path, module) or None,
    (reader path, module) or None, remove) each; a reader only where nothing but no-op dropouts lies between."""
    net = getattr(mod, "net", None)
    if type(mod).__name__ == "FeedForward" and isinstance(net, nn.ModuleList) and len(net) >= 3:
        g, drop, fc2 = net[0], net[1], net[2]
        if type(g).__name__ == "GELU" and hasattr(g, "proj") and hasattr(g, "approximate") and "gelu" not in g.__dict__:
            # instance attribute: GELU.forward's self.gelu(...) then passes x through
            yield (_act_name(g.approximate), ("net.0.proj", g.proj), ("net.2", fc2) if _no_op_dropout(drop) else None,
                   functools.partial(setattr, g, "gelu", _identity))
        return
    if type(mod).__name__ == "ViTMLP" and all(hasattr(mod, a) for a in ("fc1", "activation_fn", "fc2")):
        act = _hf_gelu(mod.activation_fn)  # transformers' ViT: fc2(activation_fn(fc1(x)))
        if act:
            yield (act, ("fc1", mod.fc1), ("fc2", mod.fc2),
                   functools.partial(setattr, mod, "activation_fn", nn.Identity()))
        return
    if type(mod).__name__.endswith("Intermediate") and hasattr(mod, "dense") and hasattr(mod, "intermediate_act_fn"):
        act = _hf_gelu(mod.intermediate_act_fn)  # transformers' ViT / BERT: intermediate_act_fn(dense(x)); the reader
        if act:                                  # is the next module's dense, after a residual-free handoff
            yield act, ("dense", mod.dense), None, functools.partial(setattr, mod, "intermediate_act_fn", nn.Identity())
        return
    if all(hasattr(mod, a) for a in ("fc1", "act", "drop1", "norm", "fc2")):
        if type(mod.act) is nn.GELU:
            reader = ("fc2", mod.fc2) if _no_op_dropout(mod.drop1) and isinstance(mod.norm, nn.Identity) else None
            yield (_act_name(mod.act.approximate), ("fc1", mod.fc1), reader,
                   functools.partial(setattr, mod, "act", nn.Identity()))
        return
    if isinstance(mod, nn.Sequential):
        kids = list(mod)
        for i, k in enumerate(kids):
            if type(k) is not nn.GELU:
                continue
            j = i + 1
            while j < len(kids) and _no_op_dropout(kids[j]):
                j += 1
            yield (_act_name(k.approximate), (str(i - 1), kids[i - 1]) if i else None,
                   (str(j), kids[j]) if j < len(kids) else None, functools.partial(mod.__setitem__, i, nn.Identity()))


INTO = {"reader": "input_act", "producer": "output_act"}


def fuse_activations(model: nn.Module, into: str = "reader") -> list[str]:
    """Fuse every recognized GELU into the quantized layer after it (into="reader": its input_act) or before it
    (into="producer": its output_act; module docstring); returns the names of the layers that now apply it."""
    if into not in INTO:
        raise ValueError(f"fuse_activations: into={into!r}; expected one of {sorted(INTO)}")
    attr, fused = INTO[into], []
    for name, mod in list(model.named_modules()):
        for act, producer, reader, remove in list(_sites(mod)):
            site = producer if into == "producer" else reader
            if site is None or not isinstance(site[1], PackedLinear) or getattr(site[1], attr):
                continue
            setattr(site[1], attr, act)
            remove()
            fused.append(_path(name, site[0]))
    return fused
