"""Weight-side tensors the CUDA qlinear paths derive from a layer's buffers, kept per weight (`triton_fp8.py` uses
them): the fp8 codes (none where the buffer already is them), fp32 per-channel scales, the asymmetric column sums,
a dequantized 16-bit weight for `cuda_dequant` (packed layout only), B H of the low-rank branch and the addmm
epilogue's right factor.

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
    __slots__ = ("key", "ref", "fp8", "sw", "cs", "deq", "bh")

    def __init__(self, key, ref):
        self.key, self.ref = key, ref
        self.fp8 = self.sw = self.cs = None
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
    unrotated x. Cached on the qweight entry, keyed on lrb_down's version."""
    e = _entry(a)
    key = (_ver(a.lrb_down), dtype, a.hadamard_block)
    bh = e.bh.get(key)
    if bh is None:
        bh = e.bh[key] = rotated_down(a, dtype)
    return bh


def clear_caches():
    _WCACHE.clear()


def _split16(v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 v as hi + lo in 16-bit dtype (~16 significant bits together). For bf16, hi is v truncated to its top 16
    bits by a bit mask (exact in bf16), not v rounded: Inductor keeps bf16 intermediates of a fused kernel in fp32
    (`emulate_precision_casts` off), so under torch.compile `v - v.to(bf16).float()` is 0 and the lo part, with
    it the asymmetric term's low bits, vanished (compiled != eager by a bf16 ulp; kernels/inductor.py). A bit
    mask is not elided, so eager and compiled calls split alike."""
    if dtype == torch.bfloat16 and v.dtype == torch.float32:
        hi = (v.view(torch.int32) & -65536).view(torch.float32)
        return hi.to(dtype), (v - hi).to(dtype)
    hi = v.to(dtype)
    return hi, (v - hi.float()).to(dtype)


def _ext_up(a: QLinearArgs, e: _Entry, dtype: torch.dtype) -> torch.Tensor:
    """`ext_up` cached on the weight's entry (keyed on lrb_up's version)."""
    key = ("ext", _ver(a.lrb_up), dtype, a.a_sym)
    v = e.bh.get(key)
    if v is None:
        v = e.bh[key] = ext_up(a.lrb_up, None if a.a_sym else e.cs, dtype)
    return v


# ---- the same tensors computed outright (what the caches hold; the Inductor decomposition calls these) ----------

def scale_vec(w_scale: torch.Tensor, n: int) -> torch.Tensor:
    """The weight scales as an fp32 (N,) vector (a per-tensor scale repeated)."""
    s = w_scale.float().reshape(-1)
    return (s.expand(n) if s.numel() == 1 else s).contiguous()


def rotated_down(a: QLinearArgs, dtype: torch.dtype) -> torch.Tensor:
    """B H (r, K) in `dtype`, so that (x H) B^T = x (B H)^T (H is symmetric)."""
    b = a.lrb_down.to(dtype)
    if a.hadamard_block > 1:
        b = layer.rotate(b, spec_of(a))
    return b.contiguous()


def ext_up(lrb_up: torch.Tensor | None, cs: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[A, c_hi, c_lo, c_hi, 0...] (N, r + 3 rounded up to a multiple of 8), or A alone when symmetric (cs None):
    right factor of the addmm epilogue.
    With `ext_left`'s [t, lo_hi, lo_hi, lo_lo], lo' c is carried to ~2^-16 although the GEMM's inputs are 16-bit."""
    parts = [] if lrb_up is None else [lrb_up.to(dtype)]
    if cs is not None:
        ch, cl = _split16(cs, dtype)
        parts += [ch[:, None], cl[:, None], ch[:, None]]
    return torch.cat(_pad8(parts), 1).contiguous()


def _pad8(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """parts, plus zero columns up to a multiple of 8: the addmm's inner dimension r + 3 is then aligned as
    Inductor's pad_mm would make it, so eager and compiled calls run the same cuBLAS kernel (an unaligned K made
    Inductor pad it, cuBLAS pick another kernel, and the output differ by a bf16 ulp on the H200). Zeros add zero."""
    width = sum(p.shape[1] for p in parts)
    if width % 8 and len(parts) > 1:
        parts = parts + [parts[0].new_zeros(parts[0].shape[0], 8 - width % 8)]
    return parts


def ext_left(t: torch.Tensor | None, lo: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[t, lo_hi, lo_hi, lo_lo, 0...] (M, as `ext_up`), or t alone when symmetric (lo None): left factor matching
    `ext_up`."""
    left = [] if t is None else [t.to(dtype)]
    if lo is not None:
        lh, ll = _split16(lo, dtype)
        left += [lh[:, None], lh[:, None], ll[:, None]]
    return left[0] if len(left) == 1 else torch.cat(_pad8(left), 1)
