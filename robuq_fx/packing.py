"""Bit-packing of signed integer weight codes into ``uint8`` bytes.

This is the only packing implementation in ``robuq_fx``: every exporter,
loader and kernel reads and writes these exact layouts.

Codes are flattened in row-major (C) order, shifted to an unsigned value
``u = c + offset`` and packed in fixed-size groups.  The flat length is padded
with code 0 up to a multiple of the group size; the true shape is not stored,
callers keep it and pass it back to :func:`unpack`.

====== ============= ====== ============== ========= ===============
bits   codes         offset group          bytes     bits / weight
====== ============= ====== ============== ========= ===============
1.58   [-1, 1]       +1     5 codes        1         1.6
2      [-1, 1]       +2     4 codes        1         2
3      [-3, 3]       +4     8 codes        3         3
4      [-7, 7]       +8     2 codes        1         4
8      [-127, 127]   --     1 code         1         8
====== ============= ====== ============== ========= ===============

Layouts (bit 7 on the left, ``u0`` is the first code of the group):

1.58 (ternary): base 3, not bit fields, first code least significant::

    byte = u0 + 3*u1 + 9*u2 + 27*u3 + 81*u4          (0 <= byte <= 242)

    codes [1, -1, 0, 1, 1] -> u [2, 0, 1, 2, 2] -> 2 + 0 + 9 + 54 + 162 = 227

2-bit: four 2-bit fields::

    byte = u3 u2 u1 u0
    codes [0, 1, -1, 0] -> u [2, 3, 1, 2] -> 10 01 11 10 = 0x9E

3-bit: eight 3-bit fields in a 24-bit little-endian word
``v = sum(u_i << 3*i)``; fields straddle byte boundaries::

    byte0 = u2[1:0] u1 u0          (v & 0xFF)
    byte1 = u5[0] u4 u3 u2[2]      ((v >> 8) & 0xFF)
    byte2 = u7 u6 u5[2:1]          ((v >> 16) & 0xFF)

    codes [-3, -2, -1, 0, 1, 2, 3, 0] -> u [1, 2, 3, 4, 5, 6, 7, 4]
      -> 11 010 001 | 0 101 100 0 | 100 111 11 = 0xD1 0x58 0x9F

4-bit: two nibbles::

    byte = u1 u0
    codes [-7, 7] -> u [1, 15] -> 1111 0001 = 0xF1

8-bit: the int8 code reinterpreted as uint8 (two's complement)::

    byte = c7 c6 c5 c4 c3 c2 c1 c0
    code -1 -> 1111 1111 = 0xFF

:func:`unpack` does not validate byte contents (that would need a device
sync); bytes never produced by :func:`pack` (e.g. ternary > 242, or u = 0 for
2/3/4-bit) decode to codes outside :func:`code_range`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "SUPPORTED_BITS",
    "normalize_bits",
    "code_range",
    "packed_numel",
    "pack",
    "unpack",
    "bits_per_weight",
]

SUPPORTED_BITS = (1.58, 2, 3, 4, 8)

# bits -> (max |code|, codes per group, bytes per group)
_FORMATS = {
    1.58: (1, 5, 1),
    2: (1, 4, 1),
    3: (3, 8, 3),
    4: (7, 2, 1),
    8: (127, 1, 1),
}
_OFFSET = {1.58: 1, 2: 2, 3: 4, 4: 8}
# Widest unsigned dtypes lack min/max kernels, so they are widened first.
_WIDE_UNSIGNED = {torch.uint16, torch.uint32, torch.uint64}


def normalize_bits(bits) -> float | int:
    """Return the canonical key for ``bits`` (``1.58`` or an ``int``)."""
    # bool is an int subclass; True must not silently mean 1-bit.
    if isinstance(bits, numbers.Real) and not isinstance(bits, bool):
        value = float(bits)
        if value == 1.58:
            return 1.58
        if value.is_integer() and int(value) in _FORMATS:
            return int(value)
    raise ValueError(
        f"unsupported bits={bits!r}; supported values are {SUPPORTED_BITS}"
    )


def code_range(bits) -> tuple[int, int]:
    """Inclusive ``(min, max)`` of the signed codes for ``bits``."""
    qmax = _FORMATS[normalize_bits(bits)][0]
    return -qmax, qmax


def packed_numel(numel: int, bits) -> int:
    """Number of ``uint8`` bytes that :func:`pack` produces for ``numel`` codes."""
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    _, group, nbytes = _FORMATS[normalize_bits(bits)]
    return -(-int(numel) // group) * nbytes


def bits_per_weight(bits) -> float:
    """Storage cost in bits per code, group padding ignored (1.58 -> 1.6)."""
    _, group, nbytes = _FORMATS[normalize_bits(bits)]
    return 8 * nbytes / group


def _check_codes(codes: torch.Tensor, bits) -> torch.Tensor:
    """Validate dtype and range; return the codes flattened as int16."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(
            f"codes must have an integer dtype, got {codes.dtype}; "
            "round and cast (e.g. .to(torch.int8)) before packing"
        )
    lo, hi = code_range(bits)
    flat = codes.reshape(-1)
    if flat.numel():
        wide = flat
        if flat.dtype in _WIDE_UNSIGNED:
            # int64 is exact for uint16/32; float64 keeps uint64 >= 2**63
            # positive, and only has to be exact near the (tiny) bounds.
            wide = flat.to(torch.float64 if flat.dtype == torch.uint64 else torch.int64)
        cmin, cmax = int(wide.min().item()), int(wide.max().item())
        if cmin < lo or cmax > hi:
            raise ValueError(
                f"codes out of range for bits={bits}: allowed [{lo}, {hi}], "
                f"got min={cmin}, max={cmax}"
            )
    return flat.to(torch.int16)


def pack(codes: torch.Tensor, bits) -> torch.Tensor:
    """Pack integer ``codes`` (any shape) into a 1-D ``uint8`` tensor.

    The result lives on ``codes.device`` and has
    ``packed_numel(codes.numel(), bits)`` elements.
    """
    key = normalize_bits(bits)
    flat = _check_codes(codes, key)
    if key == 8:
        return flat.to(torch.int8).view(torch.uint8)

    _, group, _ = _FORMATS[key]
    n = flat.numel()
    pad = -n % group
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # 3-bit groups form a 24-bit word; every other format fits one byte, so
    # uint8 arithmetic keeps temporaries small for large weights.
    work = torch.int32 if key == 3 else torch.uint8
    u = (flat + _OFFSET[key]).to(work).reshape(-1, group)

    if key == 1.58:
        out = u[:, 4]
        for i in (3, 2, 1, 0):  # Horner: first code ends up least significant
            out = out * 3 + u[:, i]
        return out

    width = 3 if key == 3 else key
    v = u[:, 0]
    for i in range(1, group):
        v = v | (u[:, i] << (width * i))
    if key == 3:
        v = torch.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], dim=1)
        return v.reshape(-1).to(torch.uint8)
    return v


def _normalize_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (Sequence, torch.Size)) or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"shape must be a sequence of non-negative ints, got {shape!r}")
    return tuple(int(d) for d in shape)


def unpack(packed: torch.Tensor, bits, shape) -> torch.Tensor:
    """Inverse of :func:`pack`: return ``int8`` codes of ``shape`` on ``packed.device``."""
    key = normalize_bits(bits)
    shape = _normalize_shape(shape)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        got = (
            f"dtype={packed.dtype}, shape={tuple(packed.shape)}"
            if isinstance(packed, torch.Tensor)
            else type(packed).__name__
        )
        raise ValueError(f"packed must be a 1-D torch.uint8 tensor, got {got}")
    n = math.prod(shape)
    expected = packed_numel(n, key)
    if packed.numel() != expected:
        raise ValueError(
            f"packed length mismatch for bits={key} and shape={shape}: "
            f"expected {expected} bytes for {n} codes, got {packed.numel()}"
        )
    if key == 8:
        return packed.view(torch.int8).reshape(shape).clone()

    _, group, _ = _FORMATS[key]
    dev = packed.device
    if key == 1.58:
        pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8, device=dev)
        u = (packed.unsqueeze(1) // pow3) % 3
    else:
        width = 3 if key == 3 else key
        if key == 3:
            b = packed.reshape(-1, 3).to(torch.int32)
            src = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        else:
            src = packed
        shifts = torch.arange(0, width * group, width, dtype=src.dtype, device=dev)
        u = (src.unsqueeze(1) >> shifts) & ((1 << width) - 1)
    codes = u.reshape(-1)[:n].to(torch.int8) - _OFFSET[key]
    return codes.reshape(shape)


# ---- the fp8 layout of a resident weight (modules.PackedLinear) ---------------------------------------------------
FP8 = getattr(torch, "float8_e4m3fn", None)  # codes |q| <= 15 are exact in e4m3


def to_fp8_codes(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes as float8_e4m3fn values (exact for |q| <= 15, i.e. weights of at most 4 bits)."""
    return codes.to(torch.float16).to(FP8).contiguous()


def codes_of(qweight: torch.Tensor, bits, shape) -> torch.Tensor:
    """int8 codes of `shape` from a weight in either layout: packed bytes (`pack`) or fp8 codes (`to_fp8_codes`)."""
    if FP8 is not None and qweight.dtype == FP8:
        return qweight.to(torch.float16).to(torch.int8).reshape(shape)
    return unpack(qweight, bits, shape)
