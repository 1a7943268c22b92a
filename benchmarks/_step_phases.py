"""Where a training step's wall time goes between the host and the GPU, phase by phase (profile_dit.py --train).

Each phase (forward, loss and zero_grad, backward, optimizer) is run with the GPU idle at its start, and timed twice:
    host ms      the Python that enqueues it (perf_counter from its call to its return, no synchronize)
    GPU tail ms  from its return until the GPU has finished it (a synchronize)
A phase whose GPU tail is near zero is host-bound: the GPU kept up with the launches, and the phase costs what its
Python costs. A long tail means the GPU work outlasts the launches (GPU-bound). The free-running step overlaps one
phase's tail with the next one's launches, so it takes less than the phases' sum; the table gives both."""
from __future__ import annotations

import time

import torch

PHASES = ("forward", "loss + zero_grad", "backward", "optimizer")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def phase_times(phases: list, steps: int, device: str) -> list[dict]:
    """phases: (name, fn) in step order; fn() runs the phase. Median host and GPU-tail ms per phase over `steps`
    steps, a row each, then their sum."""
    host: dict = {n: [] for n, _ in phases}
    tail: dict = {n: [] for n, _ in phases}
    for _ in range(steps):
        for name, fn in phases:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            _sync(device)
            t2 = time.perf_counter()
            host[name].append((t1 - t0) * 1e3)
            tail[name].append((t2 - t1) * 1e3)
    rows = []
    for name, _ in phases:
        h, w = sorted(host[name])[steps // 2], sorted(tail[name])[steps // 2]
        rows.append({"phase": name, "host ms": round(h, 3), "GPU tail ms": round(w, 3),
                     "bound by": "host" if w < 0.1 * h else "GPU"})
    rows.append({"phase": "sum", "host ms": round(sum(r["host ms"] for r in rows), 3),
                 "GPU tail ms": round(sum(r["GPU tail ms"] for r in rows), 3), "bound by": ""})
    return rows


def cpu_ops(averages, steps: int, top: int = 20) -> list[dict]:
    """The CPU-side rows of a profile with the most self time (ATen ops, CUDA runtime calls such as cudaLaunchKernel,
    autograd nodes, Dynamo's cache lookups and compiled regions), per step."""
    rows = []
    for e in averages:
        if str(getattr(e, "device_type", "")).endswith("CPU") and e.self_cpu_time_total > 0:
            rows.append({"CPU op": e.key[:80], "calls per step": round(e.count / steps, 1),
                         "self CPU ms per step": round(e.self_cpu_time_total / 1e3 / steps, 3)})
    return sorted(rows, key=lambda r: -r["self CPU ms per step"])[:top]
