"""GPU tests of the fp8 / dequant CUDA path of robuq::qlinear (robuq_fx/kernels/triton_fp8.py).

Skipped without CUDA (CI has no GPU); the first two tests run everywhere (CPU import, machine check, table).

Tolerances. The activation codes are compared with the CPU reference `quantizers.quantize_act` applied to
`hadamard.block_hadamard` (fp32 input: rotation in fp32, as the issue states; bf16 input: rotation in bf16 as
`layer.rotate` does for a bf16 model): >= 99.9% of codes must agree (the kernel's butterfly sums +-x in another order
than the reference's matmul; where an fp32 sum is inexact it may round differently and flip a code sitting on a
rounding boundary; without a Hadamard the codes must be equal) and scales to 1e-5
relative. Layer outputs are bf16 (rounding 2^-9 relative per element), so a layer is checked twice: against the
float64 product of the codes its own quantizer produced (GEMM + epilogue exact up to bf16 roundings and fp8 fast
accumulation: relative Frobenius <= 6e-3, 99.8% of elements within 1e-2 |y| + 1e-2 rms(y)), and end to end against
`reference.integer_qlinear` and the `reference` kernel, which quantize their own rotation: there >= 99.9% of the
activation codes must agree with the CPU reference, and since one flipped code shifts a whole output row by
s_x s_w q_w (0.1% flips give ~1-5% relative error), the end-to-end bound is 8e-2 relative Frobenius. The
GEMM-only test (same codes in, no quantizer) must match to 4e-3. See OWN_TOL / E2E_TOL below.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import robuq_fx  # noqa: F401  (registers the ops and kernels)
from robuq_fx import kernels
from robuq_fx import quantizers as Q
from robuq_fx.hadamard import block_hadamard
from robuq_fx.kernels import QLinearArgs, dispatch, quantizer, reference, triton_fp8
from robuq_fx.modules import PackedLinear
from robuq_fx.spec import LayerSpec

SHAPES = [(1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152), (1152, 6912)]  # DiT-XL/2 (K, N)
ODD_M = [1, 7, 255, 1000]

_why = triton_fp8.fp8_machine_check() if torch.cuda.is_available() else "no CUDA device"
gpu = pytest.mark.skipif(_why is not None, reason=f"fp8 CUDA path unavailable: {_why}")
pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _exact_reference_matmuls():
    """cuBLAS may reduce bf16 GEMMs in reduced precision by default; the references' Hadamard (a bf16 matmul) then
    differs from the exactly rounded rotation by more than an ulp and flips ~1% of the codes. Make the GPU
    references accumulate in fp32 like the CPU reference does."""
    if not torch.cuda.is_available():
        yield
        return
    m = torch.backends.cuda.matmul
    old = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    m.allow_bf16_reduced_precision_reduction = m.allow_fp16_reduced_precision_reduction = False
    yield
    m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = old


def test_module_imports_and_reports_reason(monkeypatch):
    """Runs everywhere: the module imports without triton/CUDA, and the machine check names the missing piece (or
    returns None exactly when the machine has all of them); `kernels.available()` reports the same."""
    monkeypatch.delenv("ROBUQ_KERNEL_DISABLE", raising=False)
    rows = {r["kernel"]: r for r in kernels.available()}
    why = triton_fp8.fp8_machine_check()
    if not torch.cuda.is_available():
        assert why == "no CUDA device (torch.cuda.is_available() is False)"
    else:
        cap = torch.cuda.get_device_capability(torch.cuda.current_device())
        if cap < (8, 9):
            assert why.startswith(f"CUDA capability {cap[0]}.{cap[1]} < 8.9")
        elif not (hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm")):
            assert "float8_e4m3fn" in why
        elif triton_fp8._triton_reason() is not None:
            assert why.startswith("triton is not importable")
        else:
            assert why is None
    assert rows["triton_fp8"]["available"] is (why is None) and rows["triton_fp8"]["why not"] == (why or "")
    assert rows["cuda_dequant"]["available"] is torch.cuda.is_available()


def test_dispatch_table_parses(monkeypatch):
    """Runs everywhere: every threshold in dispatch_table.json is the one its own measurements give (the rule of
    `bench_linear.py --write-dispatch`: the smallest measured M from which triton_fp8 beats cuda_dequant at every
    larger measured M; 2^31 if never), shapes it does not list get the recorded medians, the environment override
    wins, and every tuned quantizer tiling is a valid plan that covers K."""
    monkeypatch.delenv("ROBUQ_FP8_MIN_M", raising=False)
    t = dispatch.dispatch_table()
    assert t["shapes"], "dispatch_table.json is missing or has no shapes"
    for key, row in t["shapes"].items():
        n, k = map(int, key.split("x"))
        for variant, field in (("plain", "fp8_min_m"), ("epi", "epi_fp8_min_m")):
            meas = {int(m): v for m, v in row["measured"][variant].items()}
            want = 2 ** 31
            for m in sorted(meas, reverse=True):
                if meas[m]["triton_fp8"] >= meas[m]["cuda_dequant"]:
                    break
                want = m
            assert row[field] == want, (key, variant)
            assert dispatch.fp8_min_m(n, k, variant == "epi") == want
    for field in ("fp8_min_m", "epi_fp8_min_m"):
        thr = sorted(r[field] for r in t["shapes"].values())
        assert t["default_" + field] == thr[len(thr) // 2]
    assert dispatch.fp8_min_m(12345, 678, False) == t["default_fp8_min_m"]
    assert dispatch.fp8_min_m(12345, 678, True) == t["default_epi_fp8_min_m"]
    monkeypatch.setenv("ROBUQ_FP8_MIN_M", "77")
    assert dispatch.fp8_min_m(1152, 1152, False) == 77
    for key, buckets in t["quant"].items():
        k, had = int(key.split("/")[0]), key.split("/")[1]
        block = 128 if had == "h" else 0
        for m, tuned in buckets.items():
            plan = quantizer.quant_plan(k, block, int(m))
            assert plan == quantizer.make_plan(k, block, *tuned), (key, m)  # the table's choice, not a fallback
            widths, bm, warps, chunk = plan
            assert sum(widths) == k and all(w % max(block, 16) == 0 for w in widths)


def test_dispatch_choices_per_shape_and_m(monkeypatch):
    """Runs everywhere: the table's per-shape, per-M-bucket choices (epilogue mode, TMA GEMM config, the GEMM
    config's nearest bucket, the small-M limit) are what the lookups return, the environment overrides them, and
    shapes the table does not list get the global entries."""
    for v in ("ROBUQ_FP8_EPI", "ROBUQ_FP8_SMALL_M", "ROBUQ_FP8_GEMM_KERNEL", "ROBUQ_TMA_GEMM_CFG"):
        monkeypatch.delenv(v, raising=False)
    table = {"epilogue": "addmm", "gemm_kernel": "tma", "small_m_fused_max_m": 32,
             "shapes": {"64x32": {"epi_mode": {"256": "triton", "1024": "addmm", "4096": "triton", "16384": "addmm"},
                                  "gemm_cfg": {"256": 3, "16384": 0}}}}
    monkeypatch.setattr(dispatch, "dispatch_table", lambda: table)
    assert [dispatch.epilogue_mode(m, 64, 32) for m in (16, 300, 4000, 99999)] == ["triton", "addmm", "triton",
                                                                                  "addmm"]
    assert dispatch.epilogue_mode(16, 128, 32) == "addmm" and dispatch.epilogue_mode() == "addmm"
    monkeypatch.setenv("ROBUQ_FP8_EPI", "triton")
    assert dispatch.epilogue_mode(300, 64, 32) == "triton"
    assert dispatch.gemm_kernel((9, 0)) == "tma" and dispatch.gemm_kernel((8, 9)) == "pointer"
    assert dispatch.small_m_max() == 32
    monkeypatch.setenv("ROBUQ_FP8_SMALL_M", "0")
    assert dispatch.small_m_max() == 0
    # the nearest bucket on a log scale: the boundary is the geometric mean, sqrt(256 * 16384) = 2048
    assert dispatch._nearest(2048, [256, 16384]) == 256 and dispatch._nearest(2049, [256, 16384]) == 16384


# ---------------------------------------------------------------------------------------------------------------
# activation quantizer vs the CPU reference

def _ref_codes(x, block, a_bits, sym, fp32_rotation):
    xc = x.float().cpu() if fp32_rotation else x.cpu()
    xh = block_hadamard(xc, block) if block else xc
    return Q.quantize_act(xh, a_bits, sym)


def _zero_code(lo, s, a_bits):
    """The code of 0 of asymmetric rows (lo, s as (M, 1)): what the fp8 path's centred codes subtract."""
    return torch.where(s > 0, torch.round(-lo / torch.where(s > 0, s, 1.0)), 0.0).clamp(0, 2 ** a_bits - 1)


QCASES = [(a, s) for a in (2, 3, 4) for s in (True, False) if not (s and a <= 2)] + [(1, False), (8, True)]


@gpu
@pytest.mark.parametrize("k", [1152, 4608])
@pytest.mark.parametrize("block", [0, 8, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_kernel_matches_cpu_reference(k, block, dtype):
    torch.manual_seed(k + block)
    m = 1000
    x = torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 3
    x[:, 5] *= 20  # an outlier channel
    x[3] = 0.0  # all-zero row: scale 0, codes 0
    x[4] = 0.75  # constant row
    x = x.to(dtype)
    for a_bits, sym in QCASES:
        if a_bits > 4 and dtype != torch.float32:
            continue
        out, s, lo = quantizer.act_quant(x, block, a_bits, sym, m_store=m + 9)
        rq, rs, rlo = _ref_codes(x, block, a_bits, sym, fp32_rotation=dtype == torch.float32)
        q = out[:m].float().cpu() if a_bits <= 4 else None
        if a_bits <= 4:
            agree = (q == rq).float().mean().item()
            assert agree >= 0.999, f"a_bits={a_bits} sym={sym}: only {agree:.5f} of codes agree"
            assert torch.isfinite(out[m:].float()).all() and (out[m:].float() == 0).all()
        torch.testing.assert_close(s[:m].cpu(), rs.squeeze(-1), rtol=1e-5, atol=0)
        if not sym:
            torch.testing.assert_close(lo[:m].cpu(), rlo.squeeze(-1), rtol=1e-5, atol=1e-6)
        assert s[3].item() == 0 and (sym or block or s[4].item() == 0)
        # DEQUANT mode: Q_a(x H) in x's dtype, as quantizers.fake_quant_act computes it
        xq, _, _ = quantizer.act_quant(x, block, a_bits, sym, dequant=True)
        ref = Q.dequantize_act(rq, rs, rlo, sym, dtype)
        close = torch.isclose(xq.cpu().float(), ref.float(), rtol=1e-2, atol=1e-6).float().mean().item()
        assert close >= 0.999, f"dequant mode a_bits={a_bits} sym={sym}: {close:.5f}"
        assert torch.isfinite(xq).all()


@gpu
@pytest.mark.parametrize("k", [1152, 4608])
@pytest.mark.parametrize("block", [0, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_kernel_sigma_matches_cpu_reference(k, block, dtype):
    """`sigma` ranges: mu and sigma summed in another order than torch's, so scales agree to ~1e-6 relative
    typically and to 1e-4 at worst (an fp32 sum of K terms in two orders differs by up to ~K 2^-24 relative in the
    worst case; the H200 run saw 2.1e-5 on 1 row in 1000), and >= 99.9% of codes agree (a code on a rounding tie may
    flip); values outside the range are clamped."""
    torch.manual_seed(k + block + 1)
    m = 1000
    x = torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 3
    x[:, 5] *= 20
    x[3] = 0.0
    x[4] = 0.75
    x = x.to(dtype)
    for a_bits, sym in [(2, False), (3, False), (4, False), (1, False), (3, True), (4, True)]:
        out, s, lo = quantizer.act_quant(x, block, a_bits, sym, m_store=m + 3, clip="sigma")
        xc = x.float().cpu() if dtype == torch.float32 else x.cpu()
        xh = block_hadamard(xc, block) if block else xc
        rq, rs, rlo = Q.quantize_act(xh, a_bits, sym, "sigma")
        agree = (out[:m].float().cpu() == rq).float().mean().item()
        assert agree >= 0.999, f"sigma a_bits={a_bits} sym={sym}: only {agree:.5f} of codes agree"
        torch.testing.assert_close(s[:m].cpu(), rs.squeeze(-1), rtol=1e-4, atol=0)
        if not sym:
            torch.testing.assert_close(lo[:m].cpu(), rlo.squeeze(-1), rtol=1e-4, atol=1e-6)
        assert out[:m].float().abs().max().item() <= 2 ** a_bits  # clamped codes (asym codes stored unshifted)


def _shipped_plans(k, block):
    """The table's / defaults' tilings plus others the table sweep can pick (rows per program x warps x chunk)."""
    plans = {quantizer.quant_plan(k, block, m) for m in (1, 256, 1024, 4096, 16384)}
    plans |= {quantizer.make_plan(k, block, bm, w) for bm, w in ((1, 1), (1, 2), (2, 1), (2, 2), (4, 4))}
    plans |= {quantizer.make_plan(k, block, bm, w, c) for bm, w in ((1, 1), (2, 2)) for c in (128, 512)}
    return sorted(p for p in plans if p is not None)


@gpu
@pytest.mark.parametrize("k", [1152, 4608])
@pytest.mark.parametrize("block", [0, 128])
def test_every_quant_plan_odd_m(k, block):
    """Every activation-kernel tiling the table or the defaults can pick, on odd M, bf16, sym A4 / asym A2."""
    for plan in _shipped_plans(k, block):
        for m in ODD_M:
            torch.manual_seed(m)
            x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
            for a_bits, sym in ((4, True), (2, False)):
                out, s, lo = quantizer.act_quant(x, block, a_bits, sym, m_store=-(-m // 16) * 16, plan=plan)
                rq, rs, rlo = _ref_codes(x, block, a_bits, sym, fp32_rotation=False)
                bad = (out[:m].float().cpu() != rq).sum().item()
                assert bad <= max(1, rq.numel() // 1000), f"plan {plan} M={m} a{a_bits}: {bad} codes differ"
                torch.testing.assert_close(s[:m].cpu(), rs.squeeze(-1), rtol=1e-5, atol=0)
                assert (out[m:].float() == 0).all()


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_codes_exact_without_rotation_ties_included(dtype):
    """Without a Hadamard the kernel's only arithmetic is the scale (an IEEE division) and the FMA-corrected
    quotient rint(RN(q0 + fma(-q0, s, y) RN(1/s))): codes and scales must equal the CPU reference exactly. Half of the
    rows sit on rounding ties: entries (j + 1/2) c with c = n/8 and absmax 7c, so A4 has s = c and y / s = j + 1/2
    exactly (round half to even decides)."""
    torch.manual_seed(0)
    m, k = 4000, 1152
    x = torch.randn(m, k) * torch.rand(m, 1) * 3
    x[:, 9] *= 25  # an outlier channel
    c = torch.randint(1, 9, (m // 2, 1)).float() / 8
    x[: m // 2] = (torch.randint(-7, 7, (m // 2, k)).float() + 0.5) * c
    x[: m // 2, 0] = 7 * c[:, 0]
    x[m - 1] = 0.0
    x = x.to(dtype)
    xg = x.cuda()
    for a_bits, sym, plan in [(a, sy, p) for a, sy in QCASES if a <= 4
                              for p in (None, quantizer.make_plan(k, 0, 2, 2, 128))]:
        out, s, lo = quantizer.act_quant(xg, 0, a_bits, sym, plan=plan)
        rq, rs, rlo = Q.quantize_act(x, a_bits, sym)
        bad = int((out.float().cpu() != rq).sum())
        assert bad == 0, f"A{a_bits} sym={sym} {dtype}: {bad} codes differ from the CPU reference"
        assert torch.equal(s.cpu(), rs.squeeze(-1)), f"A{a_bits} sym={sym}: scales differ"
        if not sym:
            assert torch.equal(lo.cpu(), rlo.squeeze(-1))
        xq, _, _ = quantizer.act_quant(xg, 0, a_bits, sym, dequant=True, plan=plan)
        ref = Q.dequantize_act(rq, rs, rlo, sym, dtype)
        if sym:  # s * q: one rounding on both sides
            assert torch.equal(xq.cpu(), ref), f"A{a_bits} sym={sym}: DEQUANT values differ"
        else:  # lo + s * q may be contracted into one fma on the GPU
            torch.testing.assert_close(xq.cpu(), ref, rtol=1e-2, atol=1e-6)


@gpu
def test_fast_launch_matches_triton_launch_and_respects_alignment():
    """kernels/triton_launch.py reuses a compiled kernel per specialization. The first call of a specialization goes
    through Triton, later ones through the cached kernel: outputs must be identical, and inputs Triton would
    specialize differently (a misaligned view, a row stride that is not a multiple of 16) must not reuse it."""
    from robuq_fx.kernels import triton_launch
    triton_launch.clear()
    torch.manual_seed(0)
    base = (torch.randn(300, 1160, device="cuda") * 3).to(torch.bfloat16)
    views = {"aligned": base[:, :1152].contiguous(), "misaligned": base.flatten()[4:4 + 300 * 1152].view(300, 1152),
             "odd stride": base[:, 3:1155]}
    for name, x in views.items():
        for a_bits, sym in ((4, True), (2, False)):
            first = quantizer.act_quant(x, 128, a_bits, sym, m_store=304, shift=not sym)
            again = quantizer.act_quant(x, 128, a_bits, sym, m_store=304, shift=not sym)
            for u, v in zip(first, again):
                assert torch.equal(u.float(), v.float()), f"{name} A{a_bits}: cached launch differs"
            rq, rs, rlo = _ref_codes(x, 128, a_bits, sym, fp32_rotation=False)
            if not sym:  # stored centred: minus each row's code of 0
                rq = rq - _zero_code(rlo, rs, a_bits)
            bad = int((again[0][:300].float().cpu() != rq).sum())
            assert bad <= rq.numel() // 1000, f"{name} A{a_bits}: {bad} codes differ from the CPU reference"
    assert len(triton_launch._CACHE) >= 3


@gpu
@pytest.mark.parametrize("k", [1152, 4608, 16384])
@pytest.mark.parametrize("a_bits,clip", [(2, "absmax"), (3, "absmax"), (4, "absmax"), (2, "sigma")])
def test_centred_asymmetric_codes(k, a_bits, clip):
    """shift=True stores q - z (z = each row's code of 0) and lo + z s: the same dequantized values as the plain
    codes, codes within +-(2^b - 1) (exact in fp8), |lo'| <= s / 2 on rows whose range holds 0, padding rows 0.
    (A constant shift 2^(b-1) left lo' c and the GEMM term large and of opposite sign: the addmm epilogue lost
    ~1% of rms(y) on 0.4% of the outputs at K = 4608, A2.)"""
    if clip == "sigma" and k == 16384:
        pytest.skip("sigma ranges take one-pass plans")
    torch.manual_seed(k + a_bits)
    m = 300
    x = (torch.randn(m, k, device="cuda") * 2 + 0.3).to(torch.bfloat16)
    x[7] = 0.0
    q, sc, lo = quantizer.act_quant(x, 128, a_bits, False, m_store=304, clip=clip)
    qc, scc, loc = quantizer.act_quant(x, 128, a_bits, False, m_store=304, shift=True, clip=clip)
    assert torch.equal(sc, scc)
    levels = 2 ** a_bits - 1
    z = _zero_code(lo[:m, None], sc[:m, None], a_bits)
    assert torch.equal(qc[:m].float(), q[:m].float() - z)
    assert qc.float().abs().max() <= levels and (qc[m:].float() == 0).all() and (loc[m:] == 0).all()
    torch.testing.assert_close(loc[:m], lo[:m] + z[:, 0] * sc[:m], rtol=0, atol=1e-6 * float(lo.abs().max()))
    holds0 = (lo[:m] <= 0) & (lo[:m] + levels * sc[:m] >= 0) & (sc[:m] > 0)
    assert holds0.sum() > m // 2 and (loc[:m][holds0].abs() <= sc[:m][holds0] * (0.5 + 1e-6)).all()


# ---------------------------------------------------------------------------------------------------------------
# GEMM: every shipped Triton config, and _scaled_mm, on odd M and all five shapes

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


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


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
@pytest.mark.parametrize("cfg", list(range(4)))
def test_every_gemm_config(cfg):
    kmod = triton_fp8._k()
    assert len(kmod.GEMM_CONFIGS) == 4, "update this test's parametrization with the shipped configs"
    c = kmod.GEMM_CONFIGS[cfg]
    _check_gemm(lambda *args: kmod.launch_fp8_gemm(*args, c), f"cfg {c}")


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
def test_qlinear_on_the_tma_gemm_matches_the_pointer_gemm(monkeypatch):
    """Through the registry (W1.58A4+H+LRB32, asymmetric A3): the TMA GEMM and the pointer GEMM give the same layer
    up to the order of fp32 sums (same codes, same epilogue)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the TMA GEMM needs Hopper")
    monkeypatch.setenv("ROBUQ_FP8_EPI", "triton")
    for a_bits, a_sym in ((4, True), (3, False)):
        mod = _layer(1152, 3456, 1.58, a_bits, a_sym, 128, 32)
        x = torch.randn(3, 333, 1152, device="cuda").to(torch.bfloat16)
        out = {}
        for kern in ("pointer", "tma"):
            monkeypatch.setenv("ROBUQ_FP8_GEMM_KERNEL", kern)
            with torch.no_grad(), kernels.use("triton_fp8"):
                out[kern] = mod(x).float()
        assert _rel(out["tma"], out["pointer"].double()) < 1e-2


@gpu
@pytest.mark.parametrize("w_bits,a_bits,a_sym,block,rank", [(4, 4, True, 128, 0), (1.58, 4, True, 128, 32),
                                                            (1.58, 3, False, 128, 32), (2, 4, True, 0, 0),
                                                            (1.58, 2, False, 64, 16)])
def test_small_m_single_kernel(w_bits, a_bits, a_sym, block, rank, monkeypatch):
    """triton_qgemm_small (quantize + GEMM + epilogue in one kernel, ROBUQ_FP8_SMALL_M) against the two-kernel fp8
    path and the reference kernel on the same layer, odd M up to 64, all DiT-XL/2 K (1152, 4608): the codes differ
    only where the rotation's fp32 sums round differently (as between the two-kernel path and the reference), so
    the bound is E2E_TOL; a wrong scale, offset or branch term is off by far more."""
    for k, n in ((1152, 1152), (4608, 1152)):
        mod = _layer(k, n, w_bits, a_bits, a_sym, block, rank)
        for m in (1, 7, 16, 64):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            with torch.no_grad(), kernels.use("triton_fp8"):
                monkeypatch.setenv("ROBUQ_FP8_SMALL_M", "64")
                one = mod(x).double()
                monkeypatch.setenv("ROBUQ_FP8_SMALL_M", "0")
                two = mod(x).double()
            with torch.no_grad(), kernels.use("reference"):
                ref = mod(x).double()
            assert torch.isfinite(one).all()
            for other, name in ((two, "two-kernel path"), (ref, "reference")):
                err = _rel(one, other)
                assert err < E2E_TOL, f"K={k} M={m}: {err:.3g} from the {name}"


# ---------------------------------------------------------------------------------------------------------------
# qlinear through the registry

def _layer(k, n, w_bits, a_bits, a_sym, block, rank, dtype=torch.bfloat16, seed=0, **kw):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(n, device="cuda", generator=g) * 0.1).to(dtype)
    spec = LayerSpec(w_bits=w_bits, a_bits=a_bits, hadamard=block > 0, hadamard_block=block or None,
                     lora_rank=rank, a_sym=a_sym, **kw).resolve(k, n)
    down = up = None
    if rank:
        down = (torch.randn(rank, k, device="cuda", generator=g) * 0.05).to(dtype)
        up = (torch.randn(n, rank, device="cuda", generator=g) * 0.05).to(dtype)
    return PackedLinear.from_float(w, b, down, up, spec)


def _args(mod):
    return QLinearArgs(mod.qweight, mod.w_scale, mod.bias, mod.lrb_down, mod.lrb_up, *mod.op_args())


def _report(what, **vals):
    """Append measured errors to $ROBUQ_TEST_REPORT (a JSON-lines file) when set: docs/gpu.md quotes them."""
    path = os.environ.get("ROBUQ_TEST_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"what": what, **vals}) + "\n")


def _check(y, ref, fro, what, elementwise=True):
    assert y.shape == ref.shape, what
    assert torch.isfinite(y).all(), f"{what}: non-finite output"
    r = ref.double()
    err = _rel(y, r)
    tol = 1e-2 * r.abs() + 1e-2 * r.pow(2).mean().sqrt()
    within = ((y.double() - r).abs() <= tol).double().mean().item()
    _report(what, rel_fro=err, within=within)
    assert err <= fro, f"{what}: rel Frobenius {err:.2e} (<= {fro})"
    if elementwise:
        assert within >= 0.998, f"{what}: only {within:.5f} of elements within 1e-2 |y| + 1e-2 rms(y)"
    return err


def _exact_from_own_codes(x, a, kern):
    """float64 y from the codes/values this path's quantizer produces for x (same call, deterministic): isolates
    the GEMM and epilogue, which must then be exact up to the bf16 output rounding."""
    k, n = a.in_features, a.out_features
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    codes = reference.weight_codes(a)
    wq = Q.dequantize_weight(codes, a.w_scale, torch.float64)
    if kern == "triton_fp8":
        q, sx, lo = quantizer.act_quant(x2, a.hadamard_block, a.a_bits, a.a_sym, clip=a.a_clip)
        y = sx[:m, None].double() * (q[:m].double() @ wq.t())
        if not a.a_sym:
            y = y + lo[:m, None].double() * Q.weight_code_colsum(codes, a.w_scale).double()
    else:
        xq, _, _ = quantizer.act_quant(x2, a.hadamard_block, a.a_bits, a.a_sym, dequant=True, clip=a.a_clip)
        y = xq.double() @ wq.t()
    if a.bias is not None:
        y = y + a.bias.double()
    if a.lrb_down is not None:
        xh = block_hadamard(x2.double(), a.hadamard_block) if a.hadamard_block > 1 else x2.double()
        y = y + xh @ a.lrb_down.double().t() @ a.lrb_up.double().t()
    return y.reshape(*x.shape[:-1], n)


def _code_mismatches(x, a):
    """How many of this kernel's activation codes differ from the CPU reference's (the quantizer applied to
    `layer.rotate` on the CPU, as integer_qlinear computes it), and out of how many. The CPU reference divides
    exactly; on CUDA, torch divides by the Python scalar qmax through a reciprocal, which alone moves ~0.1% of the
    bf16 codes that sit exactly on a rounding tie."""
    from robuq_fx import layer
    x2 = x.reshape(-1, a.in_features)
    xh = layer.rotate(x2.cpu(), reference.spec_of(a))
    rq, _, _ = Q.quantize_act(xh, a.a_bits, a.a_sym, a.a_clip)
    q, _, _ = quantizer.act_quant(x2, a.hadamard_block, a.a_bits, a.a_sym, clip=a.a_clip)
    return int((q[:rq.shape[0]].float().cpu() != rq).sum()), rq.numel()


LAYER_CASES = [  # (w_bits, a_bits, a_sym, block, rank)
    (4, 4, True, 128, 0), (4, 4, True, 0, 0), (1.58, 4, True, 128, 0), (1.58, 4, True, 128, 32),
    (1.58, 3, True, 128, 32), (1.58, 2, False, 128, 32), (1.58, 2, False, 128, 0), (2, 3, True, 64, 0),
    (3, 4, False, 128, 0), (3, 3, False, 0, 16), (2, 2, False, 32, 32), (4, 4, False, 128, 32),
]


def _variants(a_sym, rank):
    """(kernel, environment) pairs: the fp8 path in each of its GEMM modes, and the dequant path."""
    if not a_sym or rank:
        fp8 = [("triton_fp8", {"ROBUQ_FP8_EPI": "addmm"}), ("triton_fp8", {"ROBUQ_FP8_EPI": "triton"})]
    else:
        fp8 = [("triton_fp8", {}), ("triton_fp8", {"ROBUQ_FP8_GEMM": "triton"})]
    return fp8 + [("cuda_dequant", {})]


# Output tolerances. Against the float64 product of the path's own codes (GEMM + epilogue only): 6e-3 relative
# Frobenius and 99.8% of elements within 1e-2 |y| + 1e-2 rms(y) -- up to three bf16 roundings of 2^-9 each
# (the LRB's t = x (B H)^T, the GEMM output, the in-place addmm of the LRB / offset terms) and fp8 fast
# accumulation; measured worst 4.1e-3 (dequant path + LRB, K=4608). Against the references (which quantize their
# own rotation): <= 0.1% of the codes may differ (checked against the CPU reference), and one flipped code moves a
# whole output row by s_x s_w q_w -- a full step of 4 levels for A2 -- so 0.1% flips give up to ~5% relative error
# (sqrt(flip fraction / E[q^2])): 8e-2 relative Frobenius end to end, no elementwise bound.
OWN_TOL = 6e-3
E2E_TOL = 8e-2


@gpu
@pytest.mark.parametrize("w_bits,a_bits,a_sym,block,rank", LAYER_CASES)
def test_qlinear_matches_references(w_bits, a_bits, a_sym, block, rank, monkeypatch):
    _layer_case(w_bits, a_bits, a_sym, block, rank, monkeypatch)


# the -a3 / -a2 paper policies: asymmetric sigma ranges (mu +- c sigma inside [min, max], codes clamped)
SIGMA_CASES = [(1.58, 3, False, 128, 32), (1.58, 2, False, 128, 32), (4, 4, True, 128, 0), (2, 3, True, 0, 0)]


@gpu
@pytest.mark.parametrize("w_bits,a_bits,a_sym,block,rank", SIGMA_CASES)
def test_qlinear_sigma_clipping_matches_references(w_bits, a_bits, a_sym, block, rank, monkeypatch):
    mod = _layer(1152, 1152, w_bits, a_bits, a_sym, block, rank, a_clip="sigma")
    assert triton_fp8._fp8_supports(torch.zeros(4096, 1152, device="cuda", dtype=torch.bfloat16), _args(mod)) is None
    _layer_case(w_bits, a_bits, a_sym, block, rank, monkeypatch, a_clip="sigma")


def _layer_case(w_bits, a_bits, a_sym, block, rank, monkeypatch, **kw):
    for k, n in [(1152, 1152), (4608, 1152)]:
        mod = _layer(k, n, w_bits, a_bits, a_sym, block, rank, seed=k, **kw)
        a = _args(mod)
        for m in (7, 1000):
            torch.manual_seed(m + k)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
            ref_int = reference.integer_qlinear(x, a)
            with kernels.use("reference"):
                ref_k = mod(x)
            bad, total = _code_mismatches(x, a)
            tag = f"W{w_bits}A{a_bits}{'' if a_sym else 'asym'} H{block} LRB{rank} K={k} M={m} {kw}"
            _report("code agreement " + tag, agree=1 - bad / total)
            assert bad <= max(1, total // 1000), f"{tag}: {bad} of {total} activation codes differ from the CPU's"
            for kern, env in _variants(a_sym, rank):
                with monkeypatch.context() as mp:
                    for key, val in env.items():
                        mp.setenv(key, val)
                    with kernels.use(kern):
                        y = mod(x)
                what = f"{kern} {env} {tag}"
                _check(y, _exact_from_own_codes(x, a, kern), OWN_TOL, what + " vs own codes")
                _check(y, ref_int, E2E_TOL, what + " vs integer_qlinear", elementwise=False)
                _check(y, ref_k, E2E_TOL, what + " vs reference kernel", elementwise=False)
            y = mod(x)  # automatic dispatch
            _check(y, ref_int, E2E_TOL, "auto dispatch " + tag, elementwise=False)


@gpu
def test_all_shapes_odd_m_and_3d_input():
    for k, n in SHAPES:
        mod = _layer(k, n, 1.58, 4, True, 128, 0, seed=n)
        a = _args(mod)
        for m in ODD_M:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            with kernels.use("triton_fp8"):
                y = mod(x)
            _check(y, _exact_from_own_codes(x, a, "triton_fp8"), OWN_TOL, f"K={k} N={n} M={m} vs own codes")
            _check(y, reference.integer_qlinear(x, a), E2E_TOL, f"K={k} N={n} M={m}", elementwise=False)
    x = torch.randn(2, 37, 1152, device="cuda", dtype=torch.bfloat16)
    mod = _layer(1152, 1152, 4, 2, False, 128, 32)
    for kern in ("triton_fp8", "cuda_dequant"):
        with kernels.use(kern):
            y = mod(x)
        assert y.shape == (2, 37, 1152)
        _check(y, _exact_from_own_codes(x, _args(mod), kern), OWN_TOL, f"3-D input {kern}")


@gpu
def test_unsupported_calls_fall_back_to_dequant():
    x = torch.randn(300, 1152, device="cuda", dtype=torch.bfloat16)
    for kw in (dict(group_size=128),):
        mod = _layer(1152, 1152, 4, 4, True, 128, 0, **kw)
        a = _args(mod)
        assert triton_fp8._fp8_supports(x, a) is not None
        assert kernels.select(x, a).name == "cuda_dequant"
        with kernels.use("reference"):
            ref = mod(x)
        _check(mod(x), ref, E2E_TOL, f"fallback {kw}", elementwise=False)
    mod = _layer(1152, 1152, 8, 8, True, 128, 0)
    assert kernels.select(x, _args(mod)).name == "cuda_dequant"
    mod = _layer(1152, 1152, 4, 4, True, 128, 0, dtype=torch.float32)
    xf = x.float()
    assert kernels.select(xf, _args(mod)).name == "cuda_dequant"
    with kernels.use("reference"):
        ref = mod(xf)
    _check(mod(xf), ref, E2E_TOL, "fp32 dequant", elementwise=False)


@gpu
def test_dispatch_follows_table(monkeypatch):
    mod = _layer(1152, 3456, 1.58, 4, True, 128, 0)
    a = _args(mod)
    thr = dispatch.fp8_min_m(3456, 1152, False)
    for m in (16, 256, 4096, 16384):
        x = torch.empty(m, 1152, device="cuda", dtype=torch.bfloat16)
        assert kernels.select(x, a).name == ("triton_fp8" if m >= thr else "cuda_dequant")
    monkeypatch.setenv("ROBUQ_FP8_MIN_M", "0")
    assert kernels.select(torch.empty(16, 1152, device="cuda", dtype=torch.bfloat16), a).name == "triton_fp8"


@gpu
def test_weight_cache_invalidated_by_inplace_update():
    mod = _layer(1152, 1152, 4, 4, True, 128, 0, seed=1)
    other = _layer(1152, 1152, 4, 4, True, 128, 0, seed=2)
    x = torch.randn(64, 1152, device="cuda", dtype=torch.bfloat16)
    for kern in ("triton_fp8", "cuda_dequant"):
        with kernels.use(kern):
            y1 = mod(x).clone()
            mod.qweight.copy_(other.qweight)
            mod.w_scale.copy_(other.w_scale)
            y2 = mod(x)
        _check(y2, _exact_from_own_codes(x, _args(mod), kern), OWN_TOL, f"after update {kern}")
        _check(y2, reference.integer_qlinear(x, _args(mod)), E2E_TOL, f"after update {kern}", elementwise=False)
        assert not torch.allclose(y1, y2)
        mod = _layer(1152, 1152, 4, 4, True, 128, 0, seed=1)


@gpu
def test_cuda_graph_capture():
    mod = _layer(1152, 3456, 1.58, 2, False, 128, 32)
    x = torch.randn(512, 1152, device="cuda", dtype=torch.bfloat16)
    for kern in ("triton_fp8", "cuda_dequant"):
        with kernels.use(kern):
            y0 = mod(x).clone()  # warm-up fills the caches
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y = mod(x)
            g.replay()
            torch.cuda.synchronize()
        assert torch.equal(y, y0)
