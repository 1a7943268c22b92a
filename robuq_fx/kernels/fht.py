"""Block Hadamard rotation on CUDA through Dao-AILab's `fast_hadamard_transform` (optional; see docs/backends.md).

    block_hadamard_fht(x, b) == robuq_fx.hadamard.block_hadamard(x, b)     up to float rounding

x (..., K) is viewed as (..., K/b, b) and each block gets the Sylvester-ordered Walsh-Hadamard transform scaled by
1/sqrt(b) (`hadamard_transform(x, scale)` transforms the last dimension; its reference is scipy.linalg.hadamard,
the same Sylvester order as robuq_fx.hadamard), in O(b log b) per block instead of a (b x b) matmul. Not
bit-identical to the matmul form: the butterflies sum in another order (the parity test states the tolerance).

`available()` is None when this machine can use it, else why not. robuq_fx.hadamard does not call it yet; the hook it
needs is described in docs/backends.md.
"""
from __future__ import annotations

import functools

import torch

MAX_BLOCK = 2 ** 15  # fast_hadamard_transform's largest transform size


@functools.lru_cache(maxsize=None)
def _import_reason() -> str | None:
    try:
        import fast_hadamard_transform  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure (missing, built for another torch/CUDA) means "no"
        return (f"fast_hadamard_transform is not importable ({type(e).__name__}: {e}); "
                "pip install fast-hadamard-transform (builds a CUDA extension: needs nvcc)")
    return None


@functools.lru_cache(maxsize=None)
def available() -> str | None:
    """None if `block_hadamard_fht` can run on this machine, else the reason."""
    why = _import_reason()
    if why:
        return why
    if not torch.cuda.is_available():
        return "no CUDA device (fast_hadamard_transform is CUDA-only)"
    return None


def supports(x: torch.Tensor, block: int) -> str | None:
    """None if `block_hadamard_fht(x, block)` takes this call, else why not."""
    if not x.is_cuda:
        return "input is not on a CUDA device"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} is not float32/float16/bfloat16"
    if block < 2 or block & (block - 1) or block > MAX_BLOCK:
        return f"block {block} is not a power of two in [2, {MAX_BLOCK}]"
    if x.shape[-1] % block:
        return f"block {block} does not divide the last dimension {x.shape[-1]}"
    return None


def block_hadamard_fht(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., K) -> x H with H block-diagonal of Sylvester blocks of order `block` / sqrt(block)."""
    why = available() or supports(x, block)
    if why:
        raise RuntimeError(f"block_hadamard_fht: {why}")
    from fast_hadamard_transform import hadamard_transform
    k = x.shape[-1]
    blocks = x.reshape(*x.shape[:-1], k // block, block)
    return hadamard_transform(blocks.contiguous(), block ** -0.5).reshape(x.shape)
