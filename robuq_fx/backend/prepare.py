"""`prepare_qat`: the trainable low-rank branch on your model's linears, before the robuq backend's qat mode."""
from __future__ import annotations

import torch.nn as nn

from .. import layer
from ..capture import LinearSite
from ..errors import BackendError
from ..passes.qat import plan_layers
from ..policy import Policy
from .runtime import register_lrb_owner


def prepare_qat(model: nn.Module, policy=None) -> nn.Module:
    """Register the trainable low-rank branch (`lrb_down`, `lrb_up`, SVD-initialised as in `robuq_fx.quantize`) on
    every nn.Linear of `model` whose spec has lora_rank > 0, so that mode="qat" can train it and your optimizer
    sees it in `model.parameters()`. Modifies `model` in place (unlike quantize) and returns it; idempotent. The
    uncompiled model ignores the branch: it is only used by the compiled one."""
    policy = Policy.coerce(policy)
    todo = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or policy.match(name, mod)[1] is None:
            continue
        spec = plan_layers([LinearSite(None, name, mod, mod.in_features, mod.out_features)], policy)[name]
        if not spec.lora_rank:
            continue
        want = ((spec.lora_rank, mod.in_features), (mod.out_features, spec.lora_rank))
        have = getattr(mod, "lrb_down", None), getattr(mod, "lrb_up", None)
        if all(isinstance(p, nn.Parameter) for p in have):
            if (tuple(have[0].shape), tuple(have[1].shape)) != want:
                raise BackendError(f"layer '{name}' already has a low-rank branch of shapes {tuple(have[0].shape)}, "
                                   f"{tuple(have[1].shape)}; the policy's lora_rank={spec.lora_rank} needs {want}")
            todo.append((mod, None))
        else:
            todo.append((mod, spec))
    for mod, spec in todo:  # every check passed: now edit
        if spec is not None:
            down, up = layer.lrb_init(mod.weight, spec)
            mod.register_parameter("lrb_down", nn.Parameter(down, requires_grad=mod.weight.requires_grad))
            mod.register_parameter("lrb_up", nn.Parameter(up, requires_grad=mod.weight.requires_grad))
        register_lrb_owner(mod)
    return model
