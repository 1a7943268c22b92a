"""Shared by the QAT tests: a stand-in for qat_graph's CUDA-graph backend, a few AdamW steps that record each step's
output and gradients, and the relative distance their GPU checks bound."""
from __future__ import annotations

import torch


class Replays:
    """Stand-in for qat_graph.CudaGraphs: a "graph" is the captured function, a replay calls it (as a replay re-runs
    its kernels on the captured addresses). fail: every capture raises, as a kernel that cannot be captured does.
    captures counts the attempts."""

    def __init__(self, fail: bool = False):
        self.captures = self.replays = 0
        self.fail = fail

    def capture(self, fn, device, autocast_dtype):
        self.captures += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return fn

    def replay(self, g, device=None):
        self.replays += 1
        g()


def train(mod, x, steps, autocast, fn=None):
    """steps AdamW steps of `fn` (default: mod) on x (one input, or a list taken in turn: batches of several shapes);
    [(output as fp32, {name: gradient})] a step."""
    fn = mod if fn is None else fn
    xs = x if isinstance(x, list) else [x]
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-2)
    outs = []
    for i in range(steps):
        x = xs[i % len(xs)]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = fn(x)
        y.float().pow(2).mean().backward()
        outs.append((y.detach().float(), {n: p.grad.clone() for n, p in mod.named_parameters()}))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return outs


def train_compiled(mod, x, steps, **compile_kw):
    """`train` through torch.compile(mod, backend="aot_eager", **compile_kw), from a fresh Dynamo state and back."""
    torch._dynamo.reset()
    try:
        return train(mod, x, steps, False, torch.compile(mod, backend="aot_eager", **compile_kw))
    finally:
        torch._dynamo.reset()


def second_step_hooked(base, x, autocast_dtype):
    """A copy of `base` under `weight_sides_per_forward`: two SGD steps (the first one steps, so the second runs on
    moved masters and, with CUDA graphs or their stand-in, from the graphs captured at the first) of the sum of
    squares of its output under autocast; (that second output, {name: gradient}), both in fp32."""
    import copy
    import robuq_fx
    mod = copy.deepcopy(base)
    robuq_fx.weight_sides_per_forward(mod)
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        with torch.autocast(x.device.type, dtype=autocast_dtype):
            y = mod(x)
        y.float().pow(2).sum().backward()
        if step == 0:
            opt.step()
    return y.detach().float(), {n: p.grad.float() for n, p in mod.named_parameters()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius norms, in fp32; b == 0 counts as tiny)."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
