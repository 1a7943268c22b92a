"""GPU tests of the fp8 GEMMs of the qlinear path: every shipped Triton config (pointer and persistent TMA kernels)
and `_scaled_mm`, on odd M and all five DiT-XL/2 shapes, with and without the epilogue terms (offset, bias, LRB),
against the float64 product of the same codes (<= 4e-3 relative). Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

import robuq_fx  # noqa: F401  (registers the ops and kernels)
from robuq_fx.kernels import triton_fp8
from tests.kernels.fp8_testing import ODD_M, SHAPES, exact_reference_matmuls, gpu  # noqa: F401 (autouse fixture)
from tests.kernels.fp8_testing import rel as _rel

pytestmark = pytest.mark.gpu


def _gemm_ref(a8, wq8, sx, sw, bias, lo, cs, t, up, m):
    acc = a8[:m].double() @ wq8.double().t()
    y = acc * sx[:m, None].double() * sw[None, :].double()
    if lo is not None:
        y = y + lo[:m, None].double() * cs[None, :].double()
    if bias is not None:
        y = y + bias.double()
    if t is not None:
        y = y + t.double() @ up.double().t()
    return y


def _check_gemm(run, what):
    """run(a8, wq8, y, sx, sw, bias, lo, cs, t, up, m) on all five shapes, odd M, with and without the epilogue."""
    for k, n in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(k * 7 + n)
        wq8 = torch.randint(-7, 8, (n, k), device="cuda", generator=g).to(torch.bfloat16).to(torch.float8_e4m3fn)
        sw = torch.rand(n, device="cuda", generator=g) * 0.01 + 1e-3
        cs = torch.randn(n, device="cuda", generator=g)
        bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
        up = torch.randn(n, 32, device="cuda", generator=g).to(torch.bfloat16)
        for m in ODD_M:
            mp = -(-m // 16) * 16
            a8 = torch.randint(-15, 16, (mp, k), device="cuda", generator=g).to(torch.bfloat16) \
                .to(torch.float8_e4m3fn)
            sx = torch.rand(mp, device="cuda", generator=g) * 0.01 + 1e-3
            lo = torch.randn(mp, device="cuda", generator=g)
            t = torch.randn(m, 32, device="cuda", generator=g).to(torch.bfloat16)
            for full in (False, True):
                y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                args = (a8, wq8, y, sx, sw, bias if full else None, lo if full else None, cs if full else None,
                        t if full else None, up if full else None, m)
                run(*args)
                ref = _gemm_ref(a8, wq8, sx, sw, *args[5:10], m)
                assert torch.isfinite(y).all(), f"{what} K={k} N={n} M={m} full={full}: non-finite"
                err = _rel(y, ref)
                assert err < 4e-3, f"{what} K={k} N={n} M={m} full={full}: rel err {err:.2e}"
            # the _scaled_mm path on the same codes
            y = torch._scaled_mm(a8, wq8.t(), scale_a=sx.view(-1, 1), scale_b=sw.view(1, -1), bias=bias,
                                 out_dtype=torch.bfloat16, use_fast_accum=True)[:m]
            err = _rel(y, _gemm_ref(a8, wq8, sx, sw, bias, None, None, None, None, m))
            assert err < 4e-3, f"_scaled_mm K={k} N={n} M={m}: rel err {err:.2e}"


@gpu
@pytest.mark.parametrize("cfg", list(range(8)))
def test_every_gemm_config(cfg):
    kmod = triton_fp8._k()
    assert len(kmod.GEMM_CONFIGS) == 8, "update this test's parametrization with the shipped configs"
    c = kmod.GEMM_CONFIGS[cfg]
    _check_gemm(lambda *args: kmod.launch_fp8_gemm(*args, c), f"cfg {c}")


@gpu
@pytest.mark.parametrize("cfg", list(range(8)))
def test_every_gemm_config_with_the_down_projection_inside(cfg):
    """DOWN: the kernel makes t = x (B H)^T in its K loop from x's bf16 rows (strided) and B H, rounded to bf16 as
    lrb_down rounds it; against the float64 product of the same t (and of the codes) on all shapes, odd M."""
    kmod = triton_fp8._k()
    c = kmod.GEMM_CONFIGS[cfg]
    if kmod.down_config(c, 32) is None:
        pytest.skip(f"cfg {c} takes no DOWN form (down_config: its accumulators would spill)")

    def run(a8, wq8, y, sx, sw, bias, lo, cs, t, up, m):
        if t is None:
            return kmod.launch_fp8_gemm(a8, wq8, y, sx, sw, bias, lo, cs, t, up, m, c)
        k = a8.shape[1]
        g = torch.Generator(device="cuda").manual_seed(m + k)
        xs = torch.randn(m, k + 64, device="cuda", generator=g).to(torch.bfloat16)
        x = xs[:, 32:32 + k]  # rows strided
        bh = (torch.randn(t.shape[1], k, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
        kmod.launch_fp8_gemm(a8, wq8, y, sx, sw, bias, lo, cs, None, up, m, c, down=(x, bh))
        t.copy_((x.double() @ bh.double().t()).to(torch.bfloat16))  # the reference's t (one rounding; the kernel's
        # fp32 sum may round to the neighbouring bf16 value: within the check's tolerance)
    _check_gemm(run, f"cfg {c} DOWN")


@gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="the TMA GEMM needs Hopper")
@pytest.mark.parametrize("cfg", list(range(5)))
def test_every_tma_gemm_config(cfg):
    """The persistent TMA-fed GEMM (triton_fp8_kernels.fp8_gemm_tma_kernel), every shipped config, also with fewer
    programs than tiles (each program loops over several tiles)."""
    kmod = triton_fp8._k()
    assert len(kmod.TMA_GEMM_CONFIGS) == 5, "update this test's parametrization with the shipped configs"
    c = kmod.TMA_GEMM_CONFIGS[cfg]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for programs in (sms, 3):
        _check_gemm(lambda *args: kmod.launch_fp8_gemm_tma(*args, c, programs), f"TMA cfg {c}, {programs} programs")


@gpu
def test_lowrank_add_kernel():
    """kernels/triton_lowrank.py: y + t A^T + lo c in one fp32 sum per element, rounded once, in place or not; odd M
    and N, ranks 32 / 8 / 5 (unaligned rows), each term alone."""
    from robuq_fx.kernels.triton_lowrank import lowrank_add
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, n in ((1, 1152), (37, 3456), (1000, 130), (4096, 1152)):
        for r, asym in ((32, True), (32, False), (8, True), (5, False), (0, True)):
            y = torch.randn(m, n, device="cuda", generator=g).to(torch.bfloat16)
            t = torch.randn(m, r, device="cuda", generator=g).to(torch.bfloat16) if r else None
            up = torch.randn(n, r, device="cuda", generator=g).to(torch.bfloat16) if r else None
            lo = torch.randn(m + 5, device="cuda", generator=g) * 3 if asym else None
            cs = torch.randn(n, device="cuda", generator=g) * 40 if asym else None
            terms = [y.double()]
            if r:
                terms.append(t.double() @ up.double().t())
            if asym:
                terms.append(lo[:m, None].double() * cs.double())
            ref = sum(terms)
            scale = max(tm.abs().max().item() for tm in terms)
            out = torch.empty_like(y)
            lowrank_add(y, out, t, up, lo, cs)
            err = (out.double() - ref).abs()
            bound = 2 ** -8 * ref.abs() + 1e-5 * scale  # one bf16 rounding of an fp32 sum
            assert (err <= bound).all(), f"m={m} n={n} r={r} asym={asym}: max err {err.max().item():.3g}"
            lowrank_add(y, y, t, up, lo, cs)  # in place: the same values
            assert torch.equal(y, out), f"m={m} n={n} r={r} asym={asym}: in place differs"


@gpu
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_lrb_down_applies_the_input_activation(act):
    """With the layer's input activation the kernel reads act(x) rounded to x's dtype, as the model's GELU module
    writes it (the quantizer's own activation code, `triton_act_quant._input_act`): t equals down_proj of the
    materialized act(x) to one rounding."""
    from robuq_fx.kernels.qlinear import apply_input_act
    g = torch.Generator(device="cuda").manual_seed(1)
    for k, m in ((4608, 1000), (1152, 37)):
        x = (torch.randn(m, k, device="cuda", generator=g) * 3).to(torch.bfloat16)
        bh = (torch.randn(32, k, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
        t = triton_fp8.down_proj(x, bh, act=act)
        ref = apply_input_act(x, act).double() @ bh.double().t()
        err = (t.double() - ref).abs()
        # one rounding of t, plus the rare input whose fp32 GELU rounds to the other bf16 neighbour of ATen's
        assert (err <= 2 ** -8 * ref.abs() + 1e-3 * ref.abs().max()).all(), f"{act} K={k}: {err.max().item():.3g}"


@gpu
def test_lrb_down_kernel():
    """kernels/triton_lowrank.py: t = x (B H)^T accumulated in fp32 and rounded once to x's dtype (float64 bound of
    one rounding), rows of x strided or not, odd M, ranks 32 / 8 / 5 / 96 (fused q/k/v); `triton_fp8.down_proj` takes
    it. Few rows split K over programs (`down_split`: fp32 partials added in a fixed order), the same t every call."""
    from robuq_fx.kernels.triton_lowrank import down_split, lrb_down_ok
    assert down_split(256, 1152) == 9 and down_split(1000, 4608) == 6 and down_split(16384, 4608) == 1
    g = torch.Generator(device="cuda").manual_seed(0)
    for k in (1152, 4608):
        for m in (1, 37, 1000, 16384):
            for r in (32, 8, 5, 96):
                xs = torch.randn(m, k + 128, device="cuda", generator=g).to(torch.bfloat16)
                for x in (xs[:, :k].contiguous(), xs[:, 64:64 + k]):
                    bh = (torch.randn(r, k, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
                    assert lrb_down_ok(x, bh)
                    t = triton_fp8.down_proj(x, bh)
                    ref = x.double() @ bh.double().t()
                    err = (t.double() - ref).abs()
                    bound = 2 ** -8 * ref.abs() + 1e-5 * ref.abs().max()
                    assert t.dtype == x.dtype and (err <= bound).all(), \
                        f"K={k} M={m} r={r} stride {x.stride(0)}: max err {err.max().item():.3g}"
                    assert torch.equal(triton_fp8.down_proj(x, bh), t)
