"""Block-diagonal Walsh-Hadamard rotation along the last dimension.

H = diag(H_b, ..., H_b) with H_b the Sylvester Hadamard matrix of order b divided by sqrt(b): orthonormal and
symmetric, so H H = I and, for a linear layer, x W^T = (x H)(W H)^T. QAT rotates activations online and the weight
before it is quantized; lowering folds H into the packed weight once and keeps only the online x H.
"""
from __future__ import annotations

import functools
import os

import torch


def sylvester(b: int, device=None) -> torch.Tensor:
    """The normalised Sylvester matrix of order b in float64, from tensor ops only; `hadamard_matrix` caches it per
    dtype and device (a traced graph holds that cached matrix as a constant, or builds it where the device is fake:
    kernels/inductor.py)."""
    h = torch.ones(1, 1, dtype=torch.float64, device=device)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / (b ** 0.5)


@functools.lru_cache(maxsize=None)
def _sylvester(b: int) -> torch.Tensor:
    return sylvester(b)


_CACHE: dict = {}


def hadamard_matrix(b: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix of order b (a power of two), cached per dtype and device."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"Hadamard block must be a power of two, got {b}")
    key = (b, dtype, torch.device(device) if device is not None else torch.device("cpu"))
    h = _CACHE.get(key)
    if h is None:
        h = _sylvester(b).to(dtype=dtype, device=key[2])
        _CACHE[key] = h
    return h


def block_hadamard(x: torch.Tensor, block: int, h: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) -> x H with H block-diagonal of order `block` (block must divide K). h: H_block in x's dtype
    (default: the cached `hadamard_matrix`; a traced graph passes one it built)."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"Hadamard block {block} does not divide the last dimension {k}")
    if x.is_cuda and os.environ.get("ROBUQ_HADAMARD") == "fht":
        # opt-in: Dao-AILab's fast-hadamard-transform, equal up to rounding (not bit-identical to the QAT graph)
        from .kernels import fht
        if fht.available() is None and fht.supports(x, block) is None:
            return fht.block_hadamard_fht(x, block)
    if h is None:
        h = hadamard_matrix(block, x.dtype, x.device)
    return (x.reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)
