"""Tests for robuq_fx.packing: bit-exact layouts, round trips, sizes, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robuq_fx.packing import (
    SUPPORTED_BITS,
    bits_per_weight,
    code_range,
    normalize_bits,
    pack,
    packed_numel,
    unpack,
)

FAST = settings(max_examples=50, deadline=None)
GROUP = {1.58: 5, 2: 4, 3: 8, 4: 2, 8: 1}


def reference_pack(codes, bits):
    """Scalar, loop-based re-statement of the documented layouts (independent of packing.py)."""
    codes = list(codes)
    codes += [0] * (-len(codes) % GROUP[bits])
    out = []
    for g in range(0, len(codes), GROUP[bits]):
        grp = codes[g : g + GROUP[bits]]
        if bits == 1.58:
            out.append(sum((c + 1) * 3**i for i, c in enumerate(grp)))
        elif bits == 2:
            out.append(sum((c + 2) << (2 * i) for i, c in enumerate(grp)))
        elif bits == 3:
            v = sum((c + 4) << (3 * i) for i, c in enumerate(grp))
            out += [v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF]
        elif bits == 4:
            out.append((grp[0] + 8) | ((grp[1] + 8) << 4))
        else:
            out.append(grp[0] & 0xFF)
    return out


def random_codes(shape, bits, seed, dtype=torch.int64, device="cpu"):
    lo, hi = code_range(bits)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, tuple(shape), generator=gen).to(dtype=dtype, device=device)


# ---------------------------------------------------------------- golden bytes

GOLDEN = [
    # codes [1,-1,0,1,1] -> u [2,0,1,2,2] -> 2+0+9+54+162 = 227
    (1.58, [1, -1, 0, 1, 1], [227]),
    # second group [-1,1,pad 0,0,0] -> u [0,2,1,1,1] -> 0+6+9+27+81 = 123
    (1.58, [1, -1, 0, 1, 1, -1, 1], [227, 123]),
    (1.58, [-1] * 5, [0]),
    (1.58, [1] * 5, [242]),
    (1.58, [0], [1 + 3 + 9 + 27 + 81]),  # padding is code 0 -> u = 1 everywhere: 121
    # u [2,3,1,2] -> 10 01 11 10 = 158
    (2, [0, 1, -1, 0], [158]),
    # u [3,1,3,2] -> 10 11 01 11 = 183 ; u [1,2,2,2] (padded) -> 10 10 10 01 = 169
    (2, [1, -1, 1, 0, -1], [183, 169]),
    # u [1..7,4]: v = 0x9F58D1 -> 11010001 01011000 10011111
    (3, [-3, -2, -1, 0, 1, 2, 3, 0], [209, 88, 159]),
    # u [7,4,4,4,4,4,4,4]: v = 0x924927
    (3, [3], [0x27, 0x49, 0x92]),
    # u [1,15] -> 1111 0001 = 241
    (4, [-7, 7], [241]),
    # u [8,7] -> 0111 1000 = 120 ; u [11, 8 pad] -> 1000 1011 = 139
    (4, [0, -1, 3], [120, 139]),
    (8, [-127, -1, 0, 1, 127], [129, 255, 0, 1, 127]),
]


@pytest.mark.parametrize("bits,codes,expected", GOLDEN)
def test_golden_bytes(bits, codes, expected):
    packed = pack(torch.tensor(codes, dtype=torch.int8), bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.tolist() == expected
    assert reference_pack(codes, bits) == expected  # the test oracle agrees with the hand values
    assert unpack(packed, bits, (len(codes),)).tolist() == codes


def test_golden_ternary_uses_float_key_and_2d_row_major():
    codes = torch.tensor([[1, -1, 0], [1, 1, 0]])  # flat row-major: 1,-1,0,1,1 | 0
    assert pack(codes, 1.58).tolist() == [227, 121]


# ---------------------------------------------------------------- round trips

SHAPES = st.lists(st.integers(0, 11), min_size=0, max_size=3)


@FAST
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    shape=SHAPES,
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64]),
)
def test_round_trip_and_layout_match_reference(bits, shape, seed, dtype):
    codes = random_codes(shape, bits, seed, dtype)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_numel(codes.numel(), bits)
    assert packed.tolist() == reference_pack(codes.reshape(-1).tolist(), bits)
    out = unpack(packed, bits, codes.shape)
    assert out.dtype == torch.int8
    assert out.shape == codes.shape
    assert torch.equal(out, codes.to(torch.int8))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (13,), (0, 3), (3, 0), (2, 3, 5), (4, 1, 9)])
def test_round_trip_edge_shapes(bits, shape):
    codes = random_codes(shape, bits, seed=sum(shape) + 1, dtype=torch.int8)
    packed = pack(codes, bits)
    assert packed.numel() == packed_numel(math.prod(shape), bits)
    assert torch.equal(unpack(packed, bits, shape), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_every_code_at_every_group_position(bits):
    lo, hi = code_range(bits)
    g = GROUP[bits]
    values = torch.arange(lo, hi + 1)
    # every value appears at every position of a group (g consecutive rotations)
    codes = torch.stack([values.roll(k) for k in range(g)], dim=1).reshape(-1)
    packed = pack(codes, bits)
    assert packed.tolist() == reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack(packed, bits, codes.shape), codes.to(torch.int8))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_non_contiguous_input_packs_logical_row_major_order(bits):
    codes = random_codes((6, 7), bits, seed=3).t()
    assert not codes.is_contiguous()
    assert torch.equal(pack(codes, bits), pack(codes.contiguous(), bits))
    packed = pack(codes.contiguous(), bits)
    # a strided (non-contiguous) packed buffer must still unpack
    strided = torch.stack([packed, torch.zeros_like(packed)], dim=1)[:, 0]
    assert torch.equal(unpack(strided, bits, (7, 6)), codes)


def test_unsigned_input_dtype():
    codes = torch.tensor([0, 1, 7], dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, 4), 4, (3,)), codes.to(torch.int8))


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize(
    "bits,nbytes", [(1.58, 200_000), (2, 250_000), (3, 375_000), (4, 500_000), (8, 1_000_000)]
)
def test_packed_size_1000x1000(bits, nbytes):
    assert packed_numel(1000 * 1000, bits) == nbytes
    codes = random_codes((1000, 1000), bits, seed=0, dtype=torch.int8)
    packed = pack(codes, bits)
    assert packed.numel() == nbytes
    assert torch.equal(unpack(packed, bits, (1000, 1000)), codes)


@pytest.mark.parametrize(
    "numel,bits,expected",
    [(0, 1.58, 0), (1, 1.58, 1), (5, 1.58, 1), (6, 1.58, 2), (1, 3, 3), (8, 3, 3), (9, 3, 6),
     (3, 2, 1), (5, 2, 2), (3, 4, 2), (3, 8, 3)],
)
def test_packed_numel_padding(numel, bits, expected):
    assert packed_numel(numel, bits) == expected


def test_bits_per_weight_and_code_range():
    assert [bits_per_weight(b) for b in SUPPORTED_BITS] == [1.6, 2, 3, 4, 8]
    assert [code_range(b) for b in SUPPORTED_BITS] == [(-1, 1), (-1, 1), (-3, 3), (-7, 7), (-127, 127)]


def test_normalize_bits():
    assert normalize_bits(1.58) == 1.58
    assert normalize_bits(4.0) == 4 and type(normalize_bits(4.0)) is int
    assert [normalize_bits(b) for b in SUPPORTED_BITS] == list(SUPPORTED_BITS)
    assert normalize_bits(8) == 8 and normalize_bits(3.0) == 3
    assert code_range(2.0) == (-1, 1)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", [5, 1.5, 0, True, 1.6, 16, "4", None, float("nan")])
def test_unsupported_bits_message(bad):
    for fn in (normalize_bits, code_range, bits_per_weight, lambda b: packed_numel(4, b),
               lambda b: pack(torch.zeros(4, dtype=torch.int8), b),
               lambda b: unpack(torch.zeros(1, dtype=torch.uint8), b, (4,))):
        with pytest.raises(ValueError) as exc:
            fn(bad)
        msg = str(exc.value)
        assert repr(bad) in msg and "1.58" in msg and "supported" in msg


@pytest.mark.parametrize(
    "bits,codes,lo,hi,cmin,cmax",
    [(1.58, [0, 2], -1, 1, 0, 2), (2, [-2, 1], -1, 1, -2, 1), (3, [4, 0], -3, 3, 0, 4),
     (4, [-8, 9], -7, 7, -8, 9), (8, [-128, 5], -127, 127, -128, 5)],
)
def test_out_of_range_codes_message(bits, codes, lo, hi, cmin, cmax):
    with pytest.raises(ValueError) as exc:
        pack(torch.tensor(codes, dtype=torch.int16), bits)
    msg = str(exc.value)
    assert f"bits={bits}" in msg
    assert f"[{lo}, {hi}]" in msg
    assert f"min={cmin}" in msg and f"max={cmax}" in msg


def test_huge_unsigned_codes_rejected():
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([2**63 + 1], dtype=torch.uint64), 8)
    with pytest.raises(ValueError, match="max=300"):
        pack(torch.tensor([300], dtype=torch.uint32), 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.bool])
def test_non_integer_codes_rejected(dtype):
    with pytest.raises(ValueError, match=rf"integer dtype, got {dtype}"):
        pack(torch.zeros(4, dtype=dtype), 4)


def test_wrong_packed_length_message():
    packed = pack(torch.zeros(10, dtype=torch.int8), 3)  # 2 groups -> 6 bytes
    with pytest.raises(ValueError) as exc:
        unpack(packed[:5], 3, (10,))
    msg = str(exc.value)
    assert "expected 6" in msg and "got 5" in msg and "bits=3" in msg
    with pytest.raises(ValueError, match=r"expected 1 bytes for 5 codes, got 2"):
        unpack(torch.zeros(2, dtype=torch.uint8), 1.58, (5,))
    with pytest.raises(ValueError, match=r"expected 0 bytes for 0 codes, got 1"):
        unpack(torch.zeros(1, dtype=torch.uint8), 8, (0, 4))


@pytest.mark.parametrize(
    "packed,desc",
    [(torch.zeros(4, dtype=torch.int8), "torch.int8"), (torch.zeros(4, dtype=torch.int32), "torch.int32"),
     (torch.zeros(2, 2, dtype=torch.uint8), r"shape=\(2, 2\)"), (torch.tensor(3, dtype=torch.uint8), r"shape=\(\)")],
)
def test_wrong_packed_dtype_or_rank_message(packed, desc):
    with pytest.raises(ValueError, match=rf"1-D torch.uint8.*{desc}"):
        unpack(packed, 8, (4,))


def test_bad_shape_message():
    with pytest.raises(ValueError, match="non-negative ints"):
        unpack(torch.zeros(1, dtype=torch.uint8), 8, (-1,))
    assert unpack(torch.zeros(3, dtype=torch.uint8), 8, 3).shape == (3,)


# ---------------------------------------------------------------- devices

@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_cuda_round_trip_matches_cpu(bits):
    codes = random_codes((33, 17), bits, seed=7, dtype=torch.int8)
    packed_gpu = pack(codes.cuda(), bits)
    assert packed_gpu.device.type == "cuda"
    assert torch.equal(packed_gpu.cpu(), pack(codes, bits))
    out = unpack(packed_gpu, bits, codes.shape)
    assert out.device.type == "cuda" and out.dtype == torch.int8
    assert torch.equal(out.cpu(), codes)
