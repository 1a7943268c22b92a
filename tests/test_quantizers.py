"""The quantization math (robuq_fx/quantizers.py) against METHOD.md §2-3, computed independently here."""
import math

import pytest
import torch

from robuq_fx import quantizers as Q


@pytest.mark.parametrize("w_bits,qmax", [(1.58, 1), (2, 1), (3, 3), (4, 7), (8, 127)])
def test_weight_codes_in_range_and_scale_positive(w_bits, qmax):
    torch.manual_seed(0)
    r = torch.randn(16, 64) * 3
    codes, scale = Q.quantize_weight(r, w_bits)
    assert codes.dtype == torch.int8 and codes.shape == r.shape
    assert int(codes.abs().max()) <= qmax and int(codes.abs().max()) == qmax
    assert scale.shape == (16, 1) and bool((scale > 0).all())


def test_ternary_is_absmean_per_channel():
    r = torch.tensor([[0.1, -0.5, 2.0, 0.0], [1.0, 1.0, -1.0, -1.0]])
    codes, scale = Q.quantize_weight(r, 1.58)
    s0 = (0.1 + 0.5 + 2.0) / 4  # mean |R| of row 0 = 0.65
    assert scale[0, 0].item() == pytest.approx(s0)
    assert codes[0].tolist() == [0, -1, 1, 0]  # 0.1/0.65 -> 0, -0.5/0.65 -> -1, 2/0.65 -> clip 1
    assert codes[1].tolist() == [1, 1, -1, -1]


def test_kbit_is_absmax_over_qmax():
    r = torch.tensor([[0.7, -0.35, 0.1, 0.0]])
    codes, scale = Q.quantize_weight(r, 4)
    assert scale.item() == pytest.approx(0.7 / 7)
    assert codes.tolist() == [[7, -4, 1, 0]]  # -3.5 rounds half to even -> -4


def test_on_grid_weights_round_trip_exactly():
    s = torch.tensor([[0.25], [0.5]])
    codes = torch.tensor([[-7, 3, 0, 7], [1, -7, 7, 2]], dtype=torch.int8)
    r = codes.float() * s
    c2, s2 = Q.quantize_weight(r, 4)
    assert torch.equal(c2, codes) and torch.equal(s2, s)
    assert torch.equal(Q.dequantize_weight(c2, s2), r)


def test_zero_rows_give_zero_not_nan():
    r = torch.zeros(3, 8)
    r[1] = torch.randn(8)
    for bits in (1.58, 2, 3, 4, 8):
        out = Q.fake_quant_weight(r, bits)
        assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(8)) and torch.equal(out[2], torch.zeros(8))


def test_group_and_tensor_granularity():
    torch.manual_seed(1)
    r = torch.randn(4, 16)
    codes, scale = Q.quantize_weight(r, 4, group_size=8)
    assert scale.shape == (4, 2)
    for g in range(2):
        blk = r[:, g * 8:(g + 1) * 8]
        assert torch.allclose(scale[:, g], blk.abs().amax(1) / 7)
    codes_t, scale_t = Q.quantize_weight(r, 1.58, granularity="tensor")
    assert scale_t.shape == (1, 1) and scale_t.item() == pytest.approx(r.abs().mean().item())
    assert torch.allclose(Q.dequantize_weight(codes_t, scale_t), codes_t.float() * scale_t.item())


def test_scale_dtype_rounding_is_consistent():
    torch.manual_seed(2)
    r = torch.randn(8, 32)
    codes, scale = Q.quantize_weight(r, 4, scale_dtype="bfloat16")
    assert scale.dtype == torch.bfloat16
    # codes were computed with the rounded scale: re-deriving them from the stored scale gives the same codes
    assert torch.equal(torch.round(r / scale.float()).clamp(-7, 7).to(torch.int8), codes)


@pytest.mark.parametrize("a_bits", [3, 4, 8])
def test_symmetric_act(a_bits):
    torch.manual_seed(3)
    x = torch.randn(5, 32)
    q, s, _ = Q.quantize_act(x, a_bits, sym=True)
    qmax = 2 ** (a_bits - 1) - 1
    assert torch.allclose(s, x.abs().amax(-1, keepdim=True) / qmax)
    assert q.abs().max() <= qmax and torch.equal(q, torch.round(q))
    assert (Q.fake_quant_act(x, a_bits, True) - x).abs().max() <= s.max() / 2 + 1e-6


@pytest.mark.parametrize("a_bits", [1, 2, 3, 4])
def test_asymmetric_act_float_offset(a_bits):
    torch.manual_seed(4)
    x = torch.randn(6, 40) + 3.0
    q, s, lo = Q.quantize_act(x, a_bits, sym=False)
    assert torch.equal(lo, x.amin(-1, keepdim=True))
    assert torch.allclose(s, (x.amax(-1, keepdim=True) - lo) / (2 ** a_bits - 1))
    assert q.min() >= 0 and q.max() <= 2 ** a_bits - 1
    xq = Q.fake_quant_act(x, a_bits, False)
    # the extreme values are representable exactly-ish: min maps to lo, max to lo + s*(2^k-1)
    assert torch.allclose(xq.amin(-1), x.amin(-1)) and torch.allclose(xq.amax(-1), x.amax(-1), atol=1e-5)
    assert (xq - x).abs().max() <= s.max() / 2 + 1e-5


def test_one_bit_act_has_two_levels_per_token():
    x = torch.randn(4, 64)
    xq = Q.fake_quant_act(x, 1, False)
    for row, xr in zip(xq, x):
        levels = torch.unique(row)
        assert len(levels) == 2  # lo and lo + (hi - lo): hi up to one float rounding
        assert levels[0].item() == xr.min().item() and levels[1].item() == pytest.approx(xr.max().item(), rel=1e-6)


def test_constant_and_zero_tokens_never_nan():
    x = torch.zeros(3, 16)
    x[1] = 2.5
    for bits, sym in [(4, True), (2, False), (1, False), (8, True), (4, False)]:
        for clip in ("absmax", "sigma"):
            out = Q.fake_quant_act(x, bits, sym, clip)
            assert torch.isfinite(out).all()
            assert torch.equal(out[0], torch.zeros(16))
            if not sym:
                assert torch.equal(out[1], x[1])  # hi == lo: output exactly lo


def test_nan_inf_propagate_per_token_without_crash():
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    out = Q.fake_quant_act(x, 4, True)
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1]).any()
    assert not torch.isfinite(out[2]).all()


def test_gaussian_clip_matches_max_1960():
    # Max (1960), optimal uniform quantizer for N(0,1): step * (L-1)/2 = outermost level
    for levels, step in [(2, 1.596), (4, 0.9957), (8, 0.5860), (16, 0.3352)]:
        assert Q.gaussian_clip(levels) == pytest.approx(step * (levels - 1) / 2, rel=2e-3)


def test_gaussian_clip_is_a_number_to_tracers():
    """Its first call inside a trace (an Inductor decomposition runs under fake / functional tensor modes; Dynamo
    traces act_range) computes the number instead of recording its integration grid: before session 13 the grid's
    float() failed the trace, which left every sigma-clipped qlinear opaque under torch.compile, and Dynamo broke
    the graph five times in act_range."""
    from torch.fx.experimental.proxy_tensor import make_fx
    cached = getattr(Q, "_gaussian_clip_grid", Q.gaussian_clip)
    cached.cache_clear()
    code = make_fx(lambda x: x * Q.gaussian_clip(8), tracing_mode="fake")(torch.randn(4)).code
    assert "linspace" not in code and "exp" not in code
    assert Q.gaussian_clip(8) == pytest.approx(2.051 * 2 / 7 * 3.5, rel=2e-3)  # Max (1960), 8 levels
    cached.cache_clear()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x: Q.act_range(x, 3, False, "sigma"))(torch.randn(4, 64))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_sigma_clip_range():
    torch.manual_seed(5)
    x = torch.randn(4, 4096)
    lo, hi = Q.act_range(x, 2, sym=False, clip="sigma")
    mu, sd = x.mean(-1, keepdim=True), x.std(-1, keepdim=True, unbiased=False)
    c = Q.gaussian_clip(4)
    assert torch.allclose(hi, mu + c * sd) and torch.allclose(lo, mu - c * sd)
    # sigma clipping beats absmax in MSE on Gaussian data at 2 bits
    mse = lambda clip: ((Q.fake_quant_act(x, 2, False, clip) - x) ** 2).mean()  # noqa: E731
    assert mse("sigma") < mse("absmax")


def test_ste_mask():
    x = torch.randn(4, 4096)
    assert Q.act_ste_mask(x, 4, True, "absmax").all()
    m = Q.act_ste_mask(x, 2, False, "sigma")
    assert 0.5 < m.float().mean() < 1.0  # sigma clipping leaves the tails outside


def test_weight_code_colsum_is_epilogue_term():
    torch.manual_seed(6)
    r = torch.randn(8, 32)
    codes, scale = Q.quantize_weight(r, 4)
    c = Q.weight_code_colsum(codes, scale)
    assert torch.allclose(c, (codes.double() * scale.double()).sum(1).float())
    assert math.isclose(float(c[0]), float((codes[0].double() * scale[0, 0].double()).sum()), rel_tol=1e-6)


def test_zero_row_with_fp16_scale_gives_zero_codes():
    # eps 1e-8 underflows to 0 in fp16: the codes must still be 0 (not NaN cast to int8, which is undefined)
    r = torch.randn(4, 32)
    r[1] = 0.0
    for bits in (1.58, 4):
        codes, scale = Q.quantize_weight(r, bits, scale_dtype="float16")
        assert scale[1].item() == 0.0 and torch.equal(codes[1], torch.zeros(32, dtype=torch.int8))
        assert torch.equal(Q.fake_quant_weight(r, bits, scale_dtype="float16")[1], torch.zeros(32))
