"""Weight-side tensors the CUDA qlinear paths derive from a layer's buffers, kept per weight (`triton_fp8.py` uses
them): the fp8 codes (none where the buffer already is them), fp32 per-channel scales, the asymmetric column sums,
a dequantized 16-bit weight for `cuda_dequant` (packed layout only), B H of the low-rank branch, the stacked
mode's extended weight (lrb_stacked.py) and the a_group layers' 1 x 128 weight scales (block_scaled.py).

Entries are keyed on the qweight tensor (identity, data_ptr and `_version`, and the same for w_scale / lrb_down): an
in-place update (load_state_dict, copy_) invalidates them. Fill them (one warm-up call) before capturing a CUDA
graph. `clear_caches()` drops them all.
"""
from __future__ import annotations

import functools
import weakref

import torch

from .. import layer, packing
from .. import quantizers as Q
from .reference import spec_of, weight_codes
from .registry import QLinearArgs, tensor_key


_ver = tensor_key  # one definition for every weight cache (kernels/registry.py)


class _Entry:
    __slots__ = ("key", "ref", "fp8", "sw", "cs", "deq", "bh", "stk", "swb")

    def __init__(self, key, ref):
        self.key, self.ref = key, ref
        self.fp8 = self.sw = self.cs = self.stk = self.swb = None
        self.deq = {}
        self.bh = {}


_WCACHE: dict[int, _Entry] = {}


def _drop(wid: int, ref) -> None:
    e = _WCACHE.get(wid)
    if e is not None and e.ref is ref:
        del _WCACHE[wid]


def _entry(a: QLinearArgs) -> _Entry:
    qw = a.qweight
    key = (_ver(qw), _ver(a.w_scale), a.w_bits, a.out_features, a.in_features)
    e = _WCACHE.get(id(qw))
    if e is None or e.key != key or e.ref() is not qw:
        wid = id(qw)
        e = _Entry(key, weakref.ref(qw, functools.partial(_drop, wid)))
        _WCACHE[wid] = e
    return e


def _fp8_weights(a: QLinearArgs) -> _Entry:
    e = _entry(a)
    if e.fp8 is None:
        codes = weight_codes(a)
        n = a.out_features
        if _fp8_layout(a):  # the module's buffer already is the fp8 codes: no second copy
            # through detach(): a plain view would keep the qweight tensor alive (its _base), so the entry, keyed
            # on a weak reference to it, would never be dropped; the detached alias shares storage and version
            e.fp8 = a.qweight.detach().reshape(n, a.in_features)
        else:
            e.fp8 = packing.to_fp8_codes(codes)
        e.sw = scale_vec(a.w_scale, n)
        e.cs = Q.weight_code_colsum(codes, a.w_scale).contiguous()
    return e


def _fp8_layout(a: QLinearArgs) -> bool:
    return a.qweight.dtype == packing.FP8


def _deq_weight(a: QLinearArgs, dtype: torch.dtype) -> torch.Tensor:
    if _fp8_layout(a):  # one resident copy: dequantize per call rather than keep a 16-bit weight
        return Q.dequantize_weight(weight_codes(a), a.w_scale, dtype)
    e = _entry(a)
    w = e.deq.get(dtype)
    if w is None:
        w = e.deq[dtype] = Q.dequantize_weight(weight_codes(a), a.w_scale, dtype).contiguous()
    return w


def _rot_down(a: QLinearArgs, dtype: torch.dtype) -> torch.Tensor:
    """B H (r, K) in `dtype`, so that (x H) B^T = x (B H)^T (H is symmetric): the LRB's first matmul on the
    unrotated x. The layer's own copy where it passed one in this dtype (`QLinearArgs.lrb_down_h`), else cached on
    the qweight entry, keyed on lrb_down's version."""
    own = _layer_bh(a, dtype)
    if own is not None:
        return own
    e = _entry(a)
    key = (_ver(a.lrb_down), dtype, a.hadamard_block)
    bh = e.bh.get(key)
    if bh is None:
        bh = e.bh[key] = rotated_down(a, dtype)
    return bh


def clear_caches():
    _WCACHE.clear()


# ---- the same tensors computed outright (what the caches hold; the Inductor decomposition calls these) ----------

def scale_vec(w_scale: torch.Tensor, n: int) -> torch.Tensor:
    """The weight scales as an fp32 (N,) vector (a per-tensor scale repeated)."""
    s = w_scale.float().reshape(-1)
    return (s.expand(n) if s.numel() == 1 else s).contiguous()


def down_dtype(lrb_down: torch.Tensor) -> torch.dtype:
    """The dtype a layer's B H is kept in ahead of its calls (the layer's buffer, the stacked mode's extension): B's
    own where it is 16-bit, else bf16 (the fp8 kernels run in 16-bit activations)."""
    return lrb_down.dtype if lrb_down.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _layer_bh(a: QLinearArgs, dtype: torch.dtype) -> torch.Tensor | None:
    """The layer's own B H (`QLinearArgs.lrb_down_h`) where it passed one in `dtype`, else None."""
    bh = a.lrb_down_h
    return bh if bh is not None and bh.dtype == dtype else None


def rotated_down(a: QLinearArgs, dtype: torch.dtype) -> torch.Tensor:
    """B H (r, K) in `dtype`, so that (x H) B^T = x (B H)^T (H is symmetric): the layer's copy where it passed one in
    this dtype (under torch.compile a graph input, not a product the graph recomputes every call)."""
    own = _layer_bh(a, dtype)
    if own is not None:
        return own
    b = a.lrb_down.to(dtype)
    if a.hadamard_block > 1:
        b = layer.rotate(b, spec_of(a))
    return b.contiguous()
