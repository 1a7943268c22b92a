"""How `weight_sides_per_forward` (qat_step.py) lays out every QAT layer's weight side in one flat tensor: each
layer's masters in a fixed order, its parts' shapes ([Q_w(R), A_c] (N, K + r), then B_c (r, K) with a branch, then
bias_c (N,)), contiguous views of the flat tensor made from a layout computed once (~600 parts a DiT-XL/2 step, each
view ~2 us of the compiled step's Python), and the masters' gradients packed one flat buffer a dtype (a CUDA graph's
replay copies each out in one launch)."""
from __future__ import annotations

import torch

from .qat_linear import QATLinear


class _Layer:
    """One QAT layer's constants for the step's weight sides (m: a QATLinear or what stands in for one, Plan)."""
    __slots__ = ("module", "transposed", "k", "r", "has_bias")

    def __init__(self, m):
        self.module, self.transposed = m, m.transposed
        self.k, self.r, self.has_bias = m.in_features, m.spec.lora_rank, m.bias is not None


def _masters(m: QATLinear) -> list:
    """m's weight, B, A and bias (those it has), read from its parameter dict where it has one: through
    nn.Module.__getattr__ the ~800 lookups a DiT-XL/2 forward cost ~0.4 ms of the compiled step's host time
    (scripts/step_hook_overhead.py). A layer without a branch holds lrb_down / lrb_up = None as plain attributes."""
    d = m.__dict__
    p = d.get("_parameters")
    if p is None or "weight" not in p:  # (qat_step.Plan's stand-ins: plain attributes)
        ts = (m.weight, m.lrb_down, m.lrb_up, m.bias)
    else:
        ts = (p["weight"], p["lrb_down"] if "lrb_down" in p else d.get("lrb_down"),
              p["lrb_up"] if "lrb_up" in p else d.get("lrb_up"), p["bias"] if "bias" in p else d.get("bias"))
    return [t for t in ts if t is not None]


def _unpack(layer: _Layer, masters: list) -> tuple:
    """(W (N, K), B, A, bias) of a layer from its masters in `_masters` order."""
    it = iter(masters)
    w = next(it)
    down, up = (next(it), next(it)) if layer.r else (None, None)
    bias = next(it) if layer.has_bias else None
    return (w.t() if layer.transposed else w), down, up, bias


def _sizes(layer: _Layer) -> list:
    m = layer.module
    n = m.out_features
    sizes = [(n, layer.k + layer.r)]
    if layer.r:
        sizes.append((layer.r, layer.k))
    if layer.has_bias:
        sizes.append((n,))
    return sizes


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _shapes(layers: list) -> list:
    """The shapes of every layer's parts, in the order `_all_sides` lays them out."""
    return [s for layer in layers for s in _sizes(layer)]


def _layout(shapes: list) -> list:
    """(shape, contiguous strides, offset) of consecutive parts of these shapes in one flat tensor."""
    out, o = [], 0
    for s in shapes:
        out.append((s, _contiguous(s), o))
        o += _numel(s)
    return out


def _contiguous(shape: tuple) -> tuple:
    """A contiguous tensor's strides."""
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


def _split(flat: torch.Tensor, layout: list) -> list:
    """flat's consecutive parts laid out by `_layout`, as contiguous views (one tensor made a part: ~600 a step for
    DiT-XL/2, each ~2 us of the compiled step's Python)."""
    base = flat.storage_offset()
    return [flat.as_strided(s, st, base + o) for s, st, o in layout]


def _per_layer(layers: list, parts: list):
    """(layer, its stacked part, B part or None, bias part or None) for each layer, from the parts in `_shapes`
    order (views of `_all_sides`' flat tensor or of its gradient)."""
    parts = iter(parts)
    for layer in layers:
        yield layer, next(parts), next(parts) if layer.r else None, next(parts) if layer.has_bias else None


def _master_spans(layers: list):
    """(layer, the slice of its masters in the list of all layers' masters, `_masters` order) for each layer."""
    i = 0
    for layer in layers:
        n = len(_masters(layer.module))
        yield layer, slice(i, i + n)
        i += n


def _pack_grads(grads: tuple) -> tuple:
    """(one flat tensor a dtype holding the gradients, their layout)."""
    by_dtype: dict = {}
    ends: dict = {}
    layout = []
    for t in grads:
        if t is None:
            layout.append(None)
            continue
        off = ends.get(t.dtype, 0)
        layout.append((t.dtype, off, tuple(t.shape), _contiguous(t.shape)))
        ends[t.dtype] = off + t.numel()
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    dts = sorted(by_dtype, key=str)
    return tuple(torch.cat(by_dtype[d]) for d in dts), (dts, layout)


def _packed(layout, buffers: tuple, compute) -> tuple:
    """`buffers` (the flat buffers of `_pack_grads`' layout, one a dtype in its order) filled by compute(slots)
    (slots: per gradient, its view in them, or None): the gradients compute returns that are not already in their
    slot are copied in."""
    slots = _views(buffers, layout)
    grads = compute(slots)
    for t, slot in zip(grads, slots):
        if t is not None and (t.data_ptr() != slot.data_ptr() or t.stride() != slot.stride()):
            slot.copy_(t)
    return tuple(buffers)


def _views(flats: list, layout) -> tuple:
    """The gradients `_pack_grads` packed, as views of its flat buffers."""
    dts, items = layout
    by_dtype = {d: (flat, flat.storage_offset()) for d, flat in zip(dts, flats)}
    return tuple(None if item is None else by_dtype[item[0]][0].as_strided(item[2], item[3],
                                                                           by_dtype[item[0]][1] + item[1])
                 for item in items)
