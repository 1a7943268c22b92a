"""robuq_fx's quantization math (quantizers.py, hadamard.py, packing.py) against the independent float64 oracle
(tests/oracle.py), function by function. Integer results (codes, packed bytes) are compared exactly:

- inputs built to be exact in fp32 (oracle.tie_activations / tie_residual: dyadic values, Hadamard blocks whose
  entries are powers of two) put codes exactly on rounding ties; there every code must equal the oracle's
  (round half to even), with no tolerance at all;
- random inputs (normal, outlier channels, zero and constant tokens): codes must equal the oracle's except where the
  oracle's unrounded value lies within its error margin of a rounding boundary (the fp32 implementation's error,
  bounded in oracle.py: 64 ulps of the rotation's summed magnitudes, the scale's error; sigma ranges 5e-5); there
  they may differ by one step, no more.
"""
import pytest
import torch

import oracle as O
from robuq_fx import hadamard as Hd
from robuq_fx import packing
from robuq_fx import quantizers as Q

ACT = [(1, False), (2, False), (3, True), (3, False), (4, True), (4, False), (8, True), (8, False)]
W_BITS = [1.58, 2, 3, 4, 8]
# Max (1960), Table II: step of the MSE-optimal uniform quantizer of N(0, 1) with N levels (4 significant digits)
MAX_1960 = {2: 1.596, 3: 1.224, 4: 0.9957, 7: 0.6508, 8: 0.5860, 15: 0.3534, 16: 0.3352}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_tokens(k, block, seed=0):
    """Normal tokens, tokens with outlier channels (x40), an all-zero token and a token that is constant after the
    rotation (s = 0: its codes must all be 0 and Q_a exactly lo)."""
    g = gen(seed)
    x = torch.randn(12, k, generator=g)
    x[4:8, torch.randint(0, k, (3,), generator=g)] *= 40.0
    x[8] = 0.0
    const = torch.full((1, k), 0.75, dtype=torch.float64)
    x[9] = O.rotate(const, block)[0].float()  # (c 1) H H = c 1: constant once rotated
    x[10] = torch.randn(k, generator=g) * 1e-3
    return x


def assert_codes(impl, quant: O.Quant, what=""):
    """Equal wherever the oracle's value is clear of a rounding boundary; at most one step apart elsewhere."""
    impl = impl.double()
    diff = (impl - quant.q).abs()
    near = quant.near_tie()
    assert diff.max() <= 1, f"{what}: a code differs by {diff.max()} steps"
    bad = (diff > 0) & ~near
    assert not bad.any(), f"{what}: {int(bad.sum())} codes differ away from rounding ties, e.g. impl " \
                          f"{impl[bad][:5].tolist()} vs oracle {quant.q[bad][:5].tolist()} (u {quant.u[bad][:5].tolist()})"
    assert near.float().mean() < 0.05, f"{what}: margin too wide to test anything"


# ---- Hadamard -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [2, 4, 16, 64, 128])
def test_hadamard_matches_oracle(block):
    assert torch.allclose(Hd.hadamard_matrix(block, torch.float64), O.hadamard(block), rtol=0, atol=1e-15)
    x = torch.randn(5, 256, generator=gen(block))
    # fp32 rotation of a block of <= 128 terms: a few ulps of sum |x_j| / sqrt(b)
    assert torch.allclose(Hd.block_hadamard(x, block).double(), O.rotate(x, block), rtol=0, atol=1e-5)
    y = x.double()
    back = O.rotate(O.rotate(y, block), block)  # the oracle itself: H H = I (exactly for blocks 4^j)
    assert torch.equal(back, y) if block in (4, 16, 64) else torch.allclose(back, y, rtol=0, atol=1e-14)


# ---- Gaussian clip ------------------------------------------------------------------------------------------------
def test_gaussian_clip_against_max_1960_and_implementation():
    for levels, step in MAX_1960.items():
        c = O.gaussian_clip(levels)
        assert abs(2 * c / (levels - 1) - step) <= 6e-4 * step, (levels, c)
    for levels in (2, 3, 4, 7, 8, 15, 16, 255, 256):
        # the implementation integrates on a grid (dx 7e-5): measured within 2.4e-5 relative of the closed form
        assert Q.gaussian_clip(levels) == pytest.approx(O.gaussian_clip(levels), rel=5e-5), levels


def test_oracle_rounds_half_to_even():
    t = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 0.51, -3.0], dtype=torch.float64)
    assert O.round_half_even(t).tolist() == [-2, -2, -0, 0, 2, 2, 0, 1, -3]


# ---- weights ------------------------------------------------------------------------------------------------------
WEIGHT_CASES = [dict(w_bits=b) for b in W_BITS] + [
    dict(w_bits=1.58, granularity="tensor"), dict(w_bits=4, granularity="tensor"), dict(w_bits=3, group_size=16),
    dict(w_bits=1.58, group_size=32), dict(w_bits=8, group_size=32), dict(w_bits=4, scale_dtype="bfloat16"),
    dict(w_bits=1.58, scale_dtype="float16")]


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=str)
def test_weight_codes_and_scales(case):
    g = gen(1)
    r = torch.randn(24, 64, generator=g)
    r[3] = 0.0  # a zero row: codes 0, no NaN
    r[5, :8] *= 30.0  # outliers
    codes, scale = Q.quantize_weight(r, case["w_bits"], case.get("granularity", "channel"),
                                     case.get("group_size", 0), case.get("scale_dtype", "float32"))
    o = O.quant_weight(r, **case, err=torch.zeros(r.shape))  # R given exactly: only the scale's division rounds
    assert torch.allclose(scale.double(), o.s, rtol=1e-6, atol=0), "weight scale"
    assert_codes(codes, o, "weight codes")
    assert torch.equal(codes[3], torch.zeros(64, dtype=torch.int8))
    deq = Q.dequantize_weight(codes, scale, torch.float64)
    assert torch.allclose(deq, o.deq, rtol=1e-6, atol=0) or not torch.equal(codes.double(), o.q)


@pytest.mark.parametrize("w_bits", W_BITS)
@pytest.mark.parametrize("group", [0, 16])
def test_weight_ties_round_half_to_even(w_bits, group):
    r = O.tie_residual(16, 64, w_bits, gen(2), group)
    codes, scale = Q.quantize_weight(r.float(), w_bits, group_size=group)
    o = O.quant_weight(r, w_bits, group_size=group)
    assert (O.tie_distance(o.u) == 0).float().mean() > 0.2  # the input really is tie-heavy
    assert torch.equal(scale.double(), o.s)
    assert torch.equal(codes.double(), o.q)


# ---- activations --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a_bits,sym", ACT)
@pytest.mark.parametrize("clip", ["absmax", "sigma"])
def test_activation_codes(a_bits, sym, clip):
    block = 64
    x = random_tokens(256, block, seed=a_bits)
    xh = Hd.block_hadamard(x, block)
    q, s, lo = Q.quantize_act(xh, a_bits, sym, clip)
    o = O.quant_act(O.rotate(x, block), a_bits, sym, clip, err=O.rotation_error(x, block))
    assert ((s.double() - o.s).abs() <= o.rel_s * o.s).all(), "scale"
    assert ((lo.double() - o.lo).abs() <= o.dlo + O.ROT * o.lo.abs()).all() or sym, "offset"
    assert_codes(q, o, f"A{a_bits} sym={sym} {clip}")
    out = Q.fake_quant_act(xh, a_bits, sym, clip)
    assert torch.isfinite(out).all()
    # s = 0 tokens (all zero; asymmetric: constant after the rotation): every code 0, Q_a exactly lo (0 if sym)
    assert torch.equal(q[8:9 if sym else 10], torch.zeros_like(q[8:9 if sym else 10]))
    assert torch.equal(out[8], torch.zeros_like(out[8]))
    if not sym:  # (symmetric: a constant token c is not s = 0; its codes are all qmax)
        assert torch.equal(out[9].double(), o.lo[9].expand(256))


@pytest.mark.parametrize("a_bits,sym", [c for c in ACT])
@pytest.mark.parametrize("block", [0, 4, 64])
def test_activation_ties_round_half_to_even(a_bits, sym, block):
    x = O.tie_activations(16, 64, a_bits, sym, block, gen(a_bits))
    xh = Hd.block_hadamard(x, block) if block else x
    o = O.quant_act(O.rotate(x, block), a_bits, sym)
    assert torch.equal(xh.double(), o.lo + o.u * o.s if not sym else o.u * o.s)  # the rotation is exact here
    assert (O.tie_distance(o.u) == 0).float().mean() > 0.3
    q, s, lo = Q.quantize_act(xh, a_bits, sym)
    assert torch.equal(s.double(), o.s)
    assert torch.equal(q.double(), o.q)
    assert torch.equal(Q.fake_quant_act(xh, a_bits, sym).double(), o.deq)


@pytest.mark.parametrize("a_bits,sym,clip", [(4, True, "absmax"), (2, False, "absmax"), (3, True, "sigma"),
                                             (2, False, "sigma"), (8, False, "sigma")])
def test_ste_mask(a_bits, sym, clip):
    x = random_tokens(128, 0, seed=3)
    mask = Q.act_ste_mask(x, a_bits, sym, clip)
    want = O.ste_mask(x, a_bits, sym, clip)
    lo, hi = O.act_range(x, a_bits, sym, clip)
    xd = x.double()
    near = ((xd - lo).abs() < 1e-4 * (hi - lo + 1e-30)) | ((xd - hi).abs() < 1e-4 * (hi - lo + 1e-30))
    if clip == "absmax":
        near = torch.zeros_like(near)  # the range ends are data values: no rounding, the ends are inside
        assert bool(want[:8].all())
    else:
        assert not bool(want[:8].all())  # sigma clips: some values really are outside
    assert torch.equal(mask & ~near, want & ~near)
    assert torch.equal(Q.act_ste_mask(x, 16, True, clip), torch.ones_like(mask))


# ---- packing: the bytes of the documented format ------------------------------------------------------------------
@pytest.mark.parametrize("bits", W_BITS)
def test_packed_bytes_match_documented_layout(bits):
    qmax = O.weight_qmax(bits)
    codes = torch.randint(-qmax, qmax + 1, (7, 41), generator=gen(4), dtype=torch.int8)  # 287 codes: padding
    packed = packing.pack(codes, bits)
    assert bytes(packed.tolist()) == O.pack(codes, bits)
    assert torch.equal(O.unpack(O.pack(codes, bits), bits, (7, 41)), codes.double())
    assert torch.equal(packing.unpack(packed, bits, (7, 41)), codes)
