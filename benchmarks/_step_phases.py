"""Where a training step's wall time goes between the host and the GPU, phase by phase (profile_dit.py --train).

Each phase (forward, loss and zero_grad, backward, optimizer) is run with the GPU idle at its start, and timed twice:
    host ms      the Python that enqueues it (perf_counter from its call to its return, no synchronize)
    GPU tail ms  from its return until the GPU has finished it (a synchronize)
    GC ms        the time Python's garbage collector ran in it, mean per step (gc.callbacks; a process holding
                 millions of compile-time objects pays for them in each collection that reaches them)
A phase whose GPU tail is near zero is host-bound: the GPU kept up with the launches, and the phase costs what its
Python costs. A long tail means the GPU work outlasts the launches (GPU-bound). The free-running step overlaps one
phase's tail with the next one's launches, so it takes less than the phases' sum; the table gives both."""
from __future__ import annotations

import bisect
import gc
import time

import torch

PHASES = ("forward", "loss + zero_grad", "backward", "optimizer")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _GCClock:
    """Seconds Python's garbage collector has run since the start (gc.callbacks), and how many collections."""

    def __init__(self):
        self.seconds, self.collections, self._t0 = 0.0, 0, None

    def __call__(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self.collections += 1
            self._t0 = None

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def time_phase(fn, device: str) -> tuple[float, float]:
    """(host ms, GPU tail ms) of one call of fn, the GPU idle at its start."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    _sync(device)
    return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3


def phase_times(phases: list, steps: int, device: str) -> list[dict]:
    """phases: (name, fn) in step order; fn() runs the phase. Median host and GPU-tail ms per phase over `steps`
    steps and the mean GC ms, a row each, then their sum."""
    host: dict = {n: [] for n, _ in phases}
    tail: dict = {n: [] for n, _ in phases}
    gcs: dict = {n: [] for n, _ in phases}
    with _GCClock() as clock:
        for _ in range(steps):
            for name, fn in phases:
                g0 = clock.seconds
                h, w = time_phase(fn, device)
                host[name].append(h)
                tail[name].append(w)
                gcs[name].append((clock.seconds - g0) * 1e3)
    rows = []
    for name, _ in phases:
        h, w = (sorted(v[name])[steps // 2] for v in (host, tail))
        g = sum(gcs[name]) / steps  # the mean: a collection every few steps shows here, not in the median host ms
        rows.append({"phase": name, "host ms": round(h, 3), "GPU tail ms": round(w, 3), "GC ms": round(g, 3),
                     "bound by": "host" if w < 0.1 * h else "GPU"})
    rows.append({"phase": "sum", **{c: round(sum(r[c] for r in rows), 3) for c in ("host ms", "GPU tail ms", "GC ms")},
                 "bound by": ""})
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


def _is_cpu(e) -> bool:
    return str(getattr(e, "device_type", "")).endswith("CPU")


class _Stab:
    """The innermost CPU event containing a time, over all threads (each thread's events form a tree by time)."""

    def __init__(self, cpu_events):
        self._tops: dict = {}
        for e in cpu_events:
            if e.cpu_parent is None:
                self._tops.setdefault(e.thread, []).append(e)
        self._tops = {th: self._sorted(lst) for th, lst in self._tops.items()}
        self._kids: dict = {}

    @staticmethod
    def _sorted(events) -> tuple:
        events = sorted(events, key=lambda e: e.time_range.start)
        return [e.time_range.start for e in events], events

    @staticmethod
    def _containing(starts_events, t):
        starts, events = starts_events
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and events[i].time_range.end >= t:
            return events[i]
        return None

    def innermost(self, t):
        best = None
        for tree in self._tops.values():
            e = self._containing(tree, t)
            while e is not None:
                if best is None or (e.time_range.end - e.time_range.start) < (best.time_range.end -
                                                                                best.time_range.start):
                    best = e
                kids = self._kids.get(id(e))
                if kids is None:
                    kids = self._kids[id(e)] = self._sorted(e.cpu_children)
                e = self._containing(kids, t)
        return best

    @staticmethod
    def outermost(inner):
        e = inner
        while e is not None and e.cpu_parent is not None:
            e = e.cpu_parent
        return e


def gpu_idle(events, steps: int, is_kernel, min_gap_us: float = 5.0, top: int = 12) -> tuple[float, list, list]:
    """The GPU's idle time between kernels in a profile (gaps of at least min_gap_us between the first kernel and the
    last), ms per step, and what the host was doing at each gap's middle: the innermost CPU event there over all
    threads (a launch, a synchronize, an op's own Python) and its outermost ancestor (the phase: a compiled region,
    an autograd node, the optimizer), each with the gap time summed by name, ms per step. is_kernel(e): a GPU
    kernel's row (profile_dit.is_kernel)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if is_kernel(e))
    gaps, end = [], None
    for s, t in spans:
        if end is not None and s - end >= min_gap_us:
            gaps.append((end, s))
        end = t if end is None else max(end, t)
    stab = _Stab([e for e in events if _is_cpu(e)])
    inner: dict = {}
    outer: dict = {}
    for a, b in gaps:
        e = stab.innermost((a + b) / 2)
        o = stab.outermost(e)
        for table, ev in ((inner, e), (outer, o)):
            name = "(no host op)" if ev is None else ev.name[:80]
            ms, n = table.get(name, (0.0, 0))
            table[name] = (ms + (b - a) / 1e3, n + 1)

    def rows(table, label):
        return [{label: k, "GPU idle ms per step": round(ms / steps, 3), "gaps per step": round(n / steps, 1)}
                for k, (ms, n) in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]]
    idle = sum(b - a for a, b in gaps) / 1e3 / steps
    return round(idle, 3), rows(inner, "host op (innermost)"), rows(outer, "host op (outermost)")
