"""Q_w(R) of the eager QAT path replayed from a CUDA graph (issue 19; opt-in, ROBUQ_QAT_WEIGHT_GRAPH=1, until its
GPU test has passed).

An eager QAT step recomputes every layer's Q_w(R) = Q_w(W H - A B) from the masters: ~29 ATen calls under autocast,
0.82 ms of CPU a layer against ~0.09 ms of GPU work on the H200's host (session 19's profile: 161 of the paper
policy's 485 ms a step). The masters keep their storage from step to step (optimizers update them in place), so a
layer runs the same kernels on the same addresses on every call: captured once into a CUDA graph, a call is one
replay and one copy out. The graph runs the kernels the eager call runs, so Q_w(R) is the same bit for bit.
The backward's weight side (`qat_fused._weight_grads`: g_W = g_R H and the branch factors' gradients, ~18 ATen
calls) is replayed the same way (`graphed_grads`), its two activation-dependent inputs copied into buffers the
graph reads.

- The graph writes into a buffer per (device, shape, dtype), shared by the layers of that shape, and each call
  copies it out at once: what autograd saves is the call's own tensor, whatever replays after it.
- The graphs share one memory pool; nothing of it outlives a replay (their intermediates are dead when it ends).
- Keyed on the masters' addresses, shapes, strides and dtypes, the spec, compute dtype and autocast dtype: masters
  that moved (`param.data = ...`, `.to()`, FSDP2's re-allocated unsharded storage) are recaptured; a layer
  recaptured MAX_CAPTURES times, or whose capture fails, computes eagerly from then on (one warning).
- Not inside another capture (the caller's own CUDA graph): the eager computation runs.
- autocast's cast cache is off inside the capture (a cached cast would be a tensor of the graph's pool).
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch.utils.weak import WeakIdKeyDictionary

ENABLED = [os.environ.get("ROBUQ_QAT_WEIGHT_GRAPH", "0") == "1"]
MAX_CAPTURES = 3


class CudaGraphs:
    """Capture and replay through torch.cuda.CUDAGraph (one pool a device; no synchronize / gc / empty_cache a
    capture, which torch.cuda.graph does and which would cost seconds over a model's layers)."""

    def __init__(self):
        self._pools: dict = {}

    def capture(self, fn, device: torch.device, autocast_dtype):
        pool = self._pools.get(device)
        if pool is None:
            pool = self._pools[device] = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        cur = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(cur)
        with torch.cuda.device(device), torch.cuda.stream(side), torch.no_grad(), _no_cast_cache(device,
                                                                                                  autocast_dtype):
            g.capture_begin(pool=pool, capture_error_mode="thread_local")  # (a loader's pin-memory thread may run)
            try:
                fn()
            finally:
                g.capture_end()
        cur.wait_stream(side)
        return g

    def replay(self, g) -> None:
        g.replay()


def _no_cast_cache(device: torch.device, autocast_dtype):
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=False)


class _Entry:
    __slots__ = ("key", "graph", "out", "r_dtype", "captures", "off")

    def __init__(self, key=None, graph=None, out=None, r_dtype=None, captures=0, off=False):
        self.key, self.graph, self.out, self.r_dtype, self.captures, self.off = key, graph, out, r_dtype, captures, off


_ENTRIES = WeakIdKeyDictionary()  # master weight (held weakly) -> _Entry (its Q_w(R) graph)
_GRADS = WeakIdKeyDictionary()  # master weight -> _Entry (its backward weight-side graph: g_W, g_A, g_B)
_STATIC: dict = {}  # (role, device, shape, dtype) -> the buffer the graphs of such layers read or write
_BACKEND: list = [None]


def backend():
    if _BACKEND[0] is None:
        _BACKEND[0] = CudaGraphs()
    return _BACKEND[0]


def usable(w: torch.Tensor) -> bool:
    return ENABLED[0] and w.is_cuda and not torch.cuda.is_current_stream_capturing()


def _sig(t: torch.Tensor | None):
    return None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _static(device: torch.device, like: torch.Tensor, role: str = "wq") -> torch.Tensor:
    """The buffer of this role, device, shape and dtype that the graphs of such layers read or write."""
    key = (role, device, tuple(like.shape), like.dtype)
    buf = _STATIC.get(key)
    if buf is None:
        buf = _STATIC[key] = torch.empty(like.shape, dtype=like.dtype, device=device)
    return buf


def _give_up(owner, e: _Entry, why: str, table=None) -> None:
    e.off, e.graph, e.out = True, None, None
    (_ENTRIES if table is None else table)[owner] = e
    warnings.warn(f"ROBUQ_QAT_WEIGHT_GRAPH: a QAT layer ({tuple(owner.shape)} weight) computes its Q_w(R) eagerly "
                  f"from now on: {why}", RuntimeWarning, stacklevel=4)


def graphed_weight(owner: torch.Tensor, w, down, up, spec, c: torch.dtype, compute) -> tuple:
    """compute(w, down, up, spec, c) -> (Q_w(R) in c, R's dtype), from the layer's graph where it has one (module
    docstring); owner: the master weight the graph belongs to."""
    dev = w.device
    ac = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
    key = (_sig(w), _sig(down), _sig(up), spec, c, ac, compute)
    e = _ENTRIES.get(owner)
    if e is not None and e.off:
        return compute(w, down, up, spec, c)
    be = backend()
    if e is not None and e.key == key:
        be.replay(e.graph)
        return e.out.clone(), e.r_dtype
    # the first call, or masters that moved: this call computes eagerly (which is also the warm-up a capture needs:
    # lazy inits, Triton compiles), then the graph is captured for the next calls
    e = e or _Entry()
    result = compute(w, down, up, spec, c)
    if e.captures >= MAX_CAPTURES:
        _give_up(owner, e, f"its masters moved {e.captures} times (e.g. FSDP2 re-allocating them each step)")
        return result
    out = _static(dev, result[0], "wq")
    try:
        graph = be.capture(lambda: out.copy_(compute(w, down, up, spec, c)[0]), dev, ac)
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot be captured: the eager computation stays right
        _give_up(owner, e, f"its capture failed ({type(exc).__name__}: {str(exc)[:200]})")
        return result
    _ENTRIES[owner] = _Entry(key, graph, out, result[1], e.captures + 1)
    return result


def graphed_grads(owner: torch.Tensor, g_wide: torch.Tensor, p_down, args: tuple, compute) -> tuple:
    """compute(g_wide, p_down, *args) -> (g_W, g_A, g_B) (`qat_fused._weight_grads`: the backward's weight side),
    from the layer's graph where it has one. Its two activation-dependent inputs are copied into per-shape buffers
    the graph reads, its outputs copied out of the ones it writes; args hold the masters A, B (read at their
    addresses, in the key) and constants. Same rules as `graphed_weight`."""
    dev = g_wide.device
    down, up = args[0], args[1]
    key = (_sig(g_wide)[1:], None if p_down is None else _sig(p_down)[1:], _sig(down), _sig(up), args[2:], compute)
    e = _GRADS.get(owner)
    if e is not None and e.off:
        return compute(g_wide, p_down, *args)
    be = backend()
    if e is not None and e.key == key:
        gi, pi = e.out[0], e.out[1]
        gi.copy_(g_wide)
        if pi is not None:
            pi.copy_(p_down)
        be.replay(e.graph)
        return tuple(None if o is None else o.clone() for o in e.out[2])
    e = e or _Entry()
    result = compute(g_wide, p_down, *args)
    if e.captures >= MAX_CAPTURES:
        _give_up(owner, e, f"its masters moved {e.captures} times", _GRADS)
        return result
    gi = _static(dev, g_wide, "g_wide")
    gi.copy_(g_wide)
    pi = None if p_down is None else _static(dev, p_down, "p_down")
    if pi is not None:
        pi.copy_(p_down)
    outs = tuple(None if r is None else _static(dev, r, f"grad{i}") for i, r in enumerate(result))

    def replayed():
        for o, r in zip(outs, compute(gi, pi, *args)):
            if o is not None:
                o.copy_(r)
    try:
        ac = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        graph = be.capture(replayed, dev, ac)
    except Exception as exc:  # noqa: BLE001 - the eager computation stays right
        _give_up(owner, e, f"its backward's capture failed ({type(exc).__name__}: {str(exc)[:200]})", _GRADS)
        return result
    _GRADS[owner] = _Entry(key, graph, (gi, pi, outs), None, e.captures + 1)
    return result


def clear() -> None:
    """Drop every layer's graphs and the shared buffers (tests; a process that wants the memory back)."""
    _ENTRIES.clear()
    _GRADS.clear()
    _STATIC.clear()
