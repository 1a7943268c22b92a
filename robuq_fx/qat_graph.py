"""The eager QAT path replayed from per-layer CUDA graphs (issue 19; on by default: ROBUQ_QAT_WEIGHT_GRAPH=0 turns it
off, ROBUQ_QAT_LAYER_GRAPH=0 keeps the weight sides only). Session 20's H200 runs, DiT-XL/2 batch 16, bf16 autocast,
AdamW, eager QAT step over FP in the same run: W4A4+H 2.22x without graphs, 1.64-1.85x with the weight sides, 1.12x
with whole layers; W1.58A4+H 1.87x / 1.88-1.95x / 1.05x; the paper's policy 2.98x / 1.97-2.44x / 1.53x. GPU tests:
bit-equal to the eager computation.

An eager QAT step recomputes every layer's Q_w(R) = Q_w(W H - A B) from the masters: ~29 ATen calls under autocast,
0.82 ms of CPU a layer against ~0.09 ms of GPU work on the H200's host (session 19's profile: 161 of the paper
policy's 485 ms a step). The masters keep their storage from step to step (optimizers update them in place), so a
layer runs the same kernels on the same addresses on every call: captured once into a CUDA graph, a call is one
replay and a copy out of each output. The graph runs the kernels the eager call runs: the same bits.
- Forward (`graphed_weight` of `qat_fused.weight_side`): Q_w(R) stacked with the branch's A in the matmul dtype,
  B and the bias cast to it.
- Backward (`graphed_grads` of `qat_fused._weight_grads`): g_W = g_R H and the branch factors' gradients (~18 ATen
  calls), its two activation-dependent inputs copied into buffers the graph reads.
- Whole layers (`graphed_layer_forward` / `graphed_layer_backward` of `qat_fused._forward_parts` / `_backward_parts`,
  the default): the forward's Q_a(x H), branch and GEMM as well, x copied in; the backward's every gradient, g and
  the saved tensors copied in. One graph a layer and key (x's shape ...), up to MAX_KEYS of them.

- A graph writes into buffers per (role, device, shape, dtype), shared by the layers of that shape, and each call
  copies them out at once: what autograd saves is the call's own tensor, whatever replays after it.
- The graphs share one memory pool; nothing of it outlives a replay (their intermediates are dead when it ends).
- Keyed on the masters' addresses, shapes, strides and dtypes, the spec, compute dtype and autocast dtype: masters
  that moved (`param.data = ...`, `.to()`, FSDP2's re-allocated unsharded storage) and new input shapes are
  captured anew; a layer captured MAX_CAPTURES times, or whose capture fails, computes eagerly from then on (one
  warning).
- Not inside another capture (the caller's own CUDA graph): the eager computation runs.
- autocast's cast cache is off inside the capture (a cached cast would be a tensor of the graph's pool).
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch.utils.weak import WeakIdKeyDictionary

ENABLED = [os.environ.get("ROBUQ_QAT_WEIGHT_GRAPH", "1") == "1"]
# whole layers (forward: Q_a(x H), the branch and the GEMM as well; backward: every gradient), x and the saved
# tensors copied in; on by default (ROBUQ_QAT_LAYER_GRAPH=0: the weight sides alone). Session 20's H200 run, DiT-XL/2
# batch 16: eager QAT W4A4+H 1.12x FP, W1.58A4+H 1.05x, the paper's policy 1.53x (weight sides alone: 1.85x / 1.95x /
# 1.97x in the same call); its GPU tests (bit-equal, two batch shapes, three kinds of layer) pass
LAYERS = [os.environ.get("ROBUQ_QAT_LAYER_GRAPH", "1") == "1"]
MAX_CAPTURES = 8  # a layer's captures of one kind before it computes eagerly for good
MAX_KEYS = 4  # graphs kept a layer and kind (a training loop's batch shapes, an eval batch)


class CudaGraphs:
    """Capture and replay through torch.cuda.CUDAGraph (one pool and one side stream a device; no synchronize / gc /
    empty_cache a capture, which torch.cuda.graph does and which would cost seconds over a model's layers).

    The pool is kept alive by a one-kernel graph captured into it first and held here: a private pool whose graphs
    have all been freed (a model trained and dropped, `clear()`) is released by the caching allocator, and sharing
    its handle again fails an internal assert inside capture_begin, which leaves PyTorch's CUDA generator in capture
    mode (every later torch.rand on the device raises)."""

    def __init__(self, mode: str = "thread_local"):
        self.mode = mode  # cudaStreamCaptureMode: "thread_local" (a loader's pin-memory thread may run), "relaxed"
        self._pools: dict = {}  # device -> (pool handle, the graph that keeps it alive, side stream)

    def _pool(self, device: torch.device) -> tuple:
        entry = self._pools.get(device)
        if entry is None:
            side = torch.cuda.Stream(device)  # one side stream a device: one cuBLAS workspace
            pool = torch.cuda.graph_pool_handle()
            keeper = self._capture(lambda: torch.zeros(1, device=device), device, pool, side, None)
            entry = self._pools[device] = (pool, keeper, side)
        return entry

    def capture(self, fn, device: torch.device, autocast_dtype):
        pool, _, side = self._pool(device)
        return self._capture(fn, device, pool, side, autocast_dtype)

    def _capture(self, fn, device, pool, side, autocast_dtype):
        g = torch.cuda.CUDAGraph()
        cur = torch.cuda.current_stream(device)
        side.wait_stream(cur)
        with torch.cuda.device(device), torch.cuda.stream(side), torch.no_grad(), _no_cast_cache(device,
                                                                                                  autocast_dtype):
            g.capture_begin(pool=pool, capture_error_mode=self.mode)
            try:
                fn()
            finally:
                g.capture_end()
        cur.wait_stream(side)
        return g

    def replay(self, g, device: torch.device) -> None:
        # a graph captured on another device than the current one (a model spread over GPUs) replays on its own:
        # its pool and streams are that device's
        if device.index is not None and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                g.replay()
        else:
            g.replay()


def generator_usable(device: torch.device) -> bool:
    """Whether the device's CUDA generator still draws (a capture that failed inside PyTorch can leave it in capture
    mode). Draws one number: called only after a failed capture."""
    if device.type != "cuda":
        return True
    try:
        torch.empty(1, device=device).uniform_()
        return True
    except RuntimeError:
        return False


def _no_cast_cache(device: torch.device, autocast_dtype):
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=False)


class _Graph:
    __slots__ = ("graph", "inputs", "out", "base")

    def __init__(self, graph, inputs: tuple, out: tuple):
        self.graph, self.inputs, self.out = graph, inputs, out
        self.base = _holders(out)  # (own output buffers) how many hold them when nothing outside does

    def free(self) -> bool:
        """Nothing but the graph holds its output buffers (no view of them alive): a replay may write them and hand
        out views without a copy (`replay_graph(..., clone=False)`)."""
        return _holders(self.out) == self.base


def _holders(out: tuple) -> tuple:
    """The use count of each output tensor's storage (every tensor or view made of it holds one)."""
    return tuple(torch._C._storage_Use_Count(t.untyped_storage()._cdata) for t in out if isinstance(t, torch.Tensor))


class _Owner:
    """One layer's graphs of one kind: up to MAX_KEYS of them by key (input shapes, masters' addresses, ...), the
    oldest dropped first; after MAX_CAPTURES captures, or one that failed, `off` (eager from then on)."""
    __slots__ = ("graphs", "captures", "off")

    def __init__(self):
        self.graphs: dict = {}
        self.captures = 0
        self.off = False


# master weight (held weakly) -> _Owner
_FORWARD = WeakIdKeyDictionary()  # its forward weight side (Q_w(R), casts)
_GRADS = WeakIdKeyDictionary()  # its backward's weight side (g_W, g_A, g_B)
_LAYER_FORWARD = WeakIdKeyDictionary()  # its whole forward (ROBUQ_QAT_LAYER_GRAPH=1)
_LAYER_BACKWARD = WeakIdKeyDictionary()  # its whole backward (ROBUQ_QAT_LAYER_GRAPH=1)
_STATIC: dict = {}  # (role, device, shape, strides, dtype) -> the buffer the graphs of such layers read or write
_BACKEND: list = [None]


def backend():
    if _BACKEND[0] is None:
        _BACKEND[0] = CudaGraphs()
    return _BACKEND[0]


def usable(w: torch.Tensor) -> bool:
    return ENABLED[0] and w.is_cuda and not torch.cuda.is_current_stream_capturing()


def layers_usable(w: torch.Tensor) -> bool:
    """Whole layers graphed (forward and backward), not just their weight sides."""
    return LAYERS[0] and usable(w)


def _sig(t: torch.Tensor | None, address: bool = True):
    if t is None:
        return None
    return ((t.data_ptr(),) if address else ()) + (tuple(t.shape), tuple(t.stride()), t.dtype)


def _static(device: torch.device, like: torch.Tensor, role: str) -> torch.Tensor:
    """The buffer of this role, device, shape, strides and dtype that the graphs of such layers read or write (a
    dense input's strides kept: the graph runs the kernels the eager call ran on it)."""
    key = (role, device, tuple(like.shape), tuple(like.stride()), like.dtype)
    buf = _STATIC.get(key)
    if buf is None:
        with torch.inference_mode(False):  # a normal tensor even when made under inference_mode: written later
            buf = _STATIC[key] = torch.empty_like(like, device=device, memory_format=torch.preserve_format)
    return buf


def _autocast_dtype(device: torch.device):
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _give_up(name: str, owner, o: _Owner, why: str) -> None:
    o.off = True
    o.graphs.clear()
    warnings.warn(f"ROBUQ_QAT_WEIGHT_GRAPH: a QAT layer ({tuple(owner.shape)} weight) computes its {name} eagerly "
                  f"from now on: {why}", RuntimeWarning, stacklevel=5)


def _copy_in(bufs: tuple, tensors: tuple) -> None:
    for buf, t in zip(bufs, tensors):
        if buf is not None:
            buf.copy_(t)


def capture_graph(name: str, fn, copy_in: tuple, result: tuple, what: str, into: bool = False,
                  own_outs: bool = False) -> tuple:
    """(a _Graph of fn, None) or (None, the exception) where the capture failed. The graph reads per-shape buffers
    like copy_in's tensors (filled from them now; Nones stay None) and writes per-shape buffers like result's tensors
    (its constants kept as they are): fn(*inputs) must return what result holds. into: fn is called with outs= those
    buffers and may write its results there itself (a result that is its buffer is not copied again: the step plan's
    flat weight sides and packed gradients, 1.35 and 2.7 GB for DiT-XL/2). own_outs: the graph writes buffers of its
    own, not the per-shape ones graphs of other layers share (a replay may then hand them out uncopied while they
    are free: `_Graph.free`). A failed capture that left the CUDA generator in capture mode raises instead, naming
    `what`."""
    dev = next(t.device for t in (*copy_in, *result) if isinstance(t, torch.Tensor))
    inputs = tuple(None if t is None else _static(dev, t, f"{name}.in{i}") for i, t in enumerate(copy_in))
    _copy_in(inputs, copy_in)
    with torch.inference_mode(False):  # normal tensors even when made under inference_mode: written later
        outs = tuple((torch.empty_like(r) if own_outs else _static(dev, r, f"{name}.out{i}"))
                     if isinstance(r, torch.Tensor) else r for i, r in enumerate(result))

    def run():
        for t, r in zip(outs, fn(*inputs, outs=outs) if into else fn(*inputs)):
            if isinstance(t, torch.Tensor) and r is not t:
                t.copy_(r)
    try:
        graph = backend().capture(run, dev, _autocast_dtype(dev))
    except Exception as exc:  # noqa: BLE001 - the caller computes eagerly instead
        if not generator_usable(dev):
            raise RuntimeError(f"ROBUQ_QAT_WEIGHT_GRAPH: capturing {what} failed ({type(exc).__name__}: "
                               f"{str(exc)[:300]}), and PyTorch left the CUDA generator of {dev} in capture mode: "
                               f"random draws there would fail. Set ROBUQ_QAT_WEIGHT_GRAPH=0 and report the error "
                               f"above") from exc
        return None, exc
    return _Graph(graph, inputs, outs), None


def replay_graph(g: _Graph, copy_in: tuple, device: torch.device, clone: bool = True) -> tuple:
    """g run on copy_in (copied into its buffers): copies of the buffers it writes (the buffers themselves with
    clone=False: the caller checked `g.free()`), and its constants."""
    _copy_in(g.inputs, copy_in)
    backend().replay(g.graph, device)
    return tuple(t.clone() if clone and isinstance(t, torch.Tensor) else t for t in g.out)


def _replayed(table, name: str, owner, compute, copy_in: tuple, args: tuple) -> tuple:
    """compute(*copy_in, *args) -> a tuple of tensors, Nones and constants, from the layer's graph in `table` where it
    has one for this key (module docstring). copy_in: tensors (or Nones) that change from call to call, copied into
    per-shape buffers the graph reads (their shapes, strides and dtypes in the key); args: read where they are (their
    addresses in the key) or constants. The tensors returned are copies of the per-shape buffers the graph writes."""
    key = (tuple(_sig(t, address=False) for t in copy_in),
           tuple(_sig(a) if isinstance(a, torch.Tensor) else a for a in args), _autocast_dtype(owner.device), compute)
    o = table.get(owner)
    if o is None:
        o = table[owner] = _Owner()
    if o.off:
        return compute(*copy_in, *args)
    g = o.graphs.get(key)
    if g is not None:
        return replay_graph(g, copy_in, owner.device)
    # the first call with this key (new input shapes, masters that moved): it computes eagerly (which is also the
    # warm-up a capture needs: lazy inits, Triton compiles), then the graph is captured for the next calls
    result = compute(*copy_in, *args)
    if o.captures >= MAX_CAPTURES:
        _give_up(name, owner, o, f"it was captured {o.captures} times (its masters moved: FSDP2 re-allocating them, "
                                 f"or a weight shared by layers with other branches or biases; or its input shapes "
                                 f"keep changing)")
        return result
    g, exc = capture_graph(name, lambda *inputs: compute(*inputs, *args), copy_in, result,
                           f"the {name} of a QAT layer ({tuple(owner.shape)} weight)")
    if g is None:  # a kernel that cannot be captured: the eager computation stays right
        _give_up(name, owner, o, f"its capture failed ({type(exc).__name__}: {str(exc)[:200]})")
        return result
    o.captures += 1
    o.graphs[key] = g
    if len(o.graphs) > MAX_KEYS:
        del o.graphs[next(iter(o.graphs))]
    return result


def graphed_weight(owner: torch.Tensor, compute, args: tuple) -> tuple:
    """compute(*args) (`qat_fused._weight_side`: Q_w(R) and the casts of the layer's masters, every input a master
    or a constant), from the layer's graph where it has one; owner: the master weight the graphs belong to."""
    return _replayed(_FORWARD, "forward weight side", owner, compute, (), args)


def graphed_grads(owner: torch.Tensor, compute, copy_in: tuple, args: tuple) -> tuple:
    """compute(*copy_in, *args) (`qat_fused._weight_grads`: g_W, g_A, g_B from the stacked GEMM's weight gradient
    and g_t^T xh, copied in on every call, and the masters A, B in args), from the layer's graph where it has one."""
    return _replayed(_GRADS, "backward weight side", owner, compute, copy_in, args)


def graphed_layer_forward(owner: torch.Tensor, compute, copy_in: tuple, args: tuple) -> tuple:
    """compute(*copy_in, *args) (`qat_fused._forward_parts`: the layer's output and what its backward saves, from
    the input x copied in and the masters in args), from the layer's graph for x's shape where it has one."""
    return _replayed(_LAYER_FORWARD, "forward", owner, compute, copy_in, args)


def graphed_layer_backward(owner: torch.Tensor, compute, copy_in: tuple, args: tuple) -> tuple:
    """compute(*copy_in, *args) (`qat_fused._backward_parts`: every gradient, from g and the tensors the forward
    saved, copied in, and the masters in args), from the layer's graph for their shapes where it has one."""
    return _replayed(_LAYER_BACKWARD, "backward", owner, compute, copy_in, args)


def clear() -> None:
    """Drop every layer's graphs and the shared buffers (tests; a process that wants the memory back)."""
    for table in (_FORWARD, _GRADS, _LAYER_FORWARD, _LAYER_BACKWARD):
        table.clear()
    _STATIC.clear()
