"""GPU tests of the fp8 / dequant CUDA path of robuq::qlinear (robuq_fx/kernels/triton_fp8.py) through the registry;
the quantizer's own tests are in test_act_quant_kernel.py, the GEMMs' in test_fp8_gemm_kernels.py.

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
from tests.kernels.fp8_testing import ODD_M, SHAPES, exact_reference_matmuls, gpu, within, rel as _rel  # noqa: F401

pytestmark = pytest.mark.gpu


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
    frac = within(y, r)
    _report(what, rel_fro=err, within=frac)
    assert err <= fro, f"{what}: rel Frobenius {err:.2e} (<= {fro})"
    if elementwise:
        assert frac >= 0.998, f"{what}: only {frac:.5f} of elements within 1e-2 |y| + 1e-2 rms(y)"
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


def _variants(a_sym, rank, a_clip="absmax"):
    """(kernel, environment) pairs: the fp8 path in each of its GEMM modes, and the dequant path."""
    if not a_sym or rank:
        fp8 = [("triton_fp8", {"ROBUQ_FP8_EPI": "addmm"}), ("triton_fp8", {"ROBUQ_FP8_EPI": "triton"})]
        if a_sym and rank and a_clip == "absmax":  # the branch stacked into _scaled_mm (lrb_stacked.py)
            fp8.append(("triton_fp8", {"ROBUQ_FP8_EPI": "stacked"}))
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
            for kern, env in _variants(a_sym, rank, kw.get("a_clip", "absmax")):
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
