"""Q_w(R) once per optimizer step (opt-in, `quantize_weights_once_per_step`): with gradient accumulation the eager
fused path (qat_fused.py) computes each layer's weight fake-quant once a step instead of once a micro-batch. The
cache is keyed on the optimizer's steps (a step post-hook), the masters' identities and version counters, the
compute dtype and autocast."""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .kernels.registry import tensor_key
from .spec import LayerSpec


def _master(w: torch.Tensor) -> torch.Tensor:
    """The master weight itself: a transposed (Conv1D) weight arrives as a fresh view each call."""
    return w if w._base is None else w._base


_STEP = {"epoch": 0, "hooks": 0}
_WQ = WeakIdKeyDictionary()  # master weight (by identity, held weakly) -> (key, Q_w(R), R's dtype)


class StepCacheHandle:
    """What `quantize_weights_once_per_step` returns: `.remove()` turns the cache off again for this optimizer."""

    def __init__(self, hook):
        self._hook = hook

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            _STEP["hooks"] -= 1
            if not _STEP["hooks"]:
                _WQ.clear()


def quantize_weights_once_per_step(optimizer: torch.optim.Optimizer) -> StepCacheHandle:
    """Compute each QAT layer's Q_w(R) once per step of `optimizer` instead of on every forward: with gradient
    accumulation (k micro-batches a step) the weight fake-quant runs once instead of k times. Eager QAT only (the
    fused path); under torch.compile Inductor fuses the weight math into the step's own kernels.

    A layer's cached Q_w(R) is used while nothing it depends on has changed: no `optimizer.step()` since (a step
    post-hook counts steps: FSDP2's all-gathers rewrite the unsharded masters in place without moving their version
    counters, so versions alone cannot tell), the same master tensors with the same version counters (in-place
    updates such as `load_state_dict` move them), the same compute dtype and autocast state. Writes that bypass both
    (`p.data.copy_(...)` between steps outside the optimizer) are not seen: call `handle.remove()` and register again,
    or do them before the step. Memory: one Q_w(R) per layer in the compute dtype, kept until its weight is freed.

        handle = robuq_fx.quantize_weights_once_per_step(opt)
        for i, batch in enumerate(loader):
            loss_fn(qmodel(batch)).backward()
            if (i + 1) % accum == 0:
                opt.step(); opt.zero_grad()
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"quantize_weights_once_per_step() takes the torch.optim.Optimizer whose step() changes the "
                        f"QAT weights, got {type(optimizer).__name__}")

    def bump(*_):
        _STEP["epoch"] += 1
    handle = StepCacheHandle(optimizer.register_step_post_hook(bump))
    _STEP["hooks"] += 1
    return handle


def _cached_weight(w, down, up, spec: LayerSpec, c: torch.dtype, compute) -> tuple:
    """compute(w, down, up, spec, c), kept per master weight until a step or a change
    (`quantize_weights_once_per_step`)."""
    owner = _master(w)
    dev = w.device.type
    ac = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    key = (_STEP["epoch"], tensor_key(owner), tuple(w.shape), tuple(w.stride()), tensor_key(down), tensor_key(up),
           spec, c, ac,
           compute)
    hit = _WQ.get(owner)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = compute(w, down, up, spec, c)
    _WQ[owner] = (key, out)
    return out
