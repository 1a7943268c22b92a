"""The host (CPU) time of the step weight sides' bookkeeping for a model of DiT-XL/2's layer count (196 QAT layers,
~600 masters), without their GPU work: what `weight_sides_per_forward`'s hooks add to a compiled step's Python
besides the two graph breaks. The weight sides' computation is replaced by a ready result (what a CUDA graph replay
hands out), so this runs anywhere in a few seconds.

    python scripts/step_hook_overhead.py [--layers 196] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import torch.nn as nn

import robuq_fx
from robuq_fx import qat_step, qat_step_hooks as H
from robuq_fx.qat_linear import QATLinear
from robuq_fx.spec import LayerSpec


def _ms(fn, n):
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=196)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=16, lora_rank=4).resolve(32, 32)
    model = nn.Sequential(*[QATLinear.from_module(nn.Linear(32, 32), spec) for _ in range(args.layers)])
    robuq_fx.weight_sides_per_forward(model)
    plan = H._PLANS[model]
    model(torch.randn(4, 32)).sum().backward()
    ready = {}
    real_sides, real_grads = qat_step._all_sides, qat_step._all_grads

    def sides(*a, **kw):  # the forward replay's result
        if "f" not in ready:
            ready["f"] = real_sides(*a, **kw)
        return ready["f"]

    def grads(*a, **kw):  # the backward replay's result
        if "g" not in ready:
            ready["g"] = real_grads(*a, **kw)
        return ready["g"]
    qat_step._all_sides, qat_step._all_grads = sides, grads
    masters = plan.masters()

    def hooks():
        H._prepare(model, True)
        H._clear(plan.modules)
    parts = qat_step.WeightSides.apply(plan, *masters)
    ones = [torch.ones_like(p) for p in parts]

    def node_backward():
        out = qat_step.WeightSides.apply(plan, *masters)
        torch.autograd.backward(out, ones)
    print(f"{torch.__version__} | {args.layers} layers, {len(masters)} masters")
    print(f"  pre + post hook (masters, checks, the node's forward, the layers' tensors): {_ms(hooks, 50):.2f} ms")
    print(f"  the node forward + backward (with AccumulateGrad into {len(masters)} .grad): "
          f"{_ms(node_backward, 10):.2f} ms")
    if args.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            hooks()
        pr.disable()
        pstats.Stats(pr).sort_stats("cumtime").print_stats(15)


if __name__ == "__main__":
    main()
