"""The all-reduce timeline model of `ddp_overlap.py`: given when each DDP gradient bucket became ready during one
GPU's backward (measured) and its size, how much of an N-GPU all-reduce would run after the backward (exposed).

NCCL runs a process group's all-reduces one after another on one stream, each as soon as its bucket is ready and the
one before it is done; a ring all-reduce of S bytes over N GPUs takes 2 (N - 1) / N * S / busbw (nccl-tests' bus
bandwidth) plus a fixed latency. What the model leaves out, and a real run adds: the all-reduce kernels' use of SMs
and memory bandwidth while the backward runs, stragglers between ranks, and the host (N processes on one CPU).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    ready_ms: float  # when its gradients were all ready, from the backward's start
    nbytes: int


def comm_ms(nbytes: int, busbw_gbs: float, world: int = 2, latency_us: float = 20.0) -> float:
    """One ring all-reduce of nbytes over `world` GPUs at bus bandwidth busbw_gbs (GB/s = 1e9 B/s)."""
    if world < 2:
        return 0.0
    if busbw_gbs <= 0:
        raise ValueError(f"busbw_gbs must be positive, got {busbw_gbs}")
    return 2 * (world - 1) / world * nbytes / (busbw_gbs * 1e9) * 1e3 + latency_us * 1e-3


def simulate(buckets: list[Bucket], backward_ms: float, busbw_gbs: float, world: int = 2,
             latency_us: float = 20.0) -> dict:
    """The all-reduces of `buckets` issued in ready order on one stream; returns comm_ms (their total time),
    finish_ms (when the last ends, from the backward's start) and exposed_ms (what runs after the backward ends)."""
    t = 0.0
    total = 0.0
    for b in sorted(buckets, key=lambda b: b.ready_ms):
        c = comm_ms(b.nbytes, busbw_gbs, world, latency_us)
        t = max(t, b.ready_ms) + c
        total += c
    return {"comm_ms": total, "finish_ms": t, "exposed_ms": max(0.0, t - backward_ms)}


def predicted_scaling(step_ms: float, exposed_ms: float, world: int = 2, one_gpu_ms: float | None = None) -> float:
    """N GPUs' samples/s over one GPU's at the same per-GPU batch, when each step (step_ms) grows by the exposed
    all-reduce; one_gpu_ms: the one GPU's step when it differs (a step without DDP, where step_ms is DDP's)."""
    return world * (step_ms if one_gpu_ms is None else one_gpu_ms) / (step_ms + exposed_ms)


def breakeven_busbw(buckets: list[Bucket], backward_ms: float, step_ms: float, target_x: float, world: int = 2,
                    latency_us: float = 20.0, hi_gbs: float = 1e5) -> float | None:
    """The least bus bandwidth (GB/s) at which `predicted_scaling` reaches target_x; None when no bandwidth does
    (the latencies alone expose too much, or target_x >= world)."""
    def ok(bw):
        return predicted_scaling(step_ms, simulate(buckets, backward_ms, bw, world, latency_us)["exposed_ms"],
                                 world) >= target_x
    if not ok(hi_gbs):
        return None
    lo, hi = 1e-3, hi_gbs
    while hi / lo > 1.001:  # exposed time falls as the bandwidth grows: bisect on a log scale
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def ready_fraction(buckets: list[Bucket], at_ms: float) -> float:
    """The share of the gradient bytes whose buckets were ready by at_ms."""
    total = sum(b.nbytes for b in buckets)
    return sum(b.nbytes for b in buckets if b.ready_ms <= at_ms) / total if total else 0.0
