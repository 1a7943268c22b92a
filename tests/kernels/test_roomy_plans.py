"""The activation quantizer's tilings for its register-hungry forms (kernels/quantizer.py `_roomy_plan`): sigma
ranges keep the whole row in registers for its mean and deviation, and an input activation (robuq::qlinear's
input_act: GELU) computes erf / tanh on every value, so a plan must not give a thread more values than fit.
Session 13: the dispatch table's absmax plan for K = 4608 (one warp a row, 144 values a thread) made both spill in
the offline sm_90 build (sigma: 255 registers, 183 local stores; GELU: 255, 18-22) on every fc2 call of the -a3 /
-a2 policies and of a `fuse_activations` model."""
import re

import pytest
import torch

from robuq_fx.kernels import quantizer
from tests.kernels.sm90 import import_or_none

KS = (256, 1152, 2304, 4096, 4608, 8192)  # DiT-XL/2 (1152, 4608), ViT / Llama widths
LIMIT = 72 * 32  # values a warp: 72 a thread compiled without spills at K = 4608 (2 warps), 144 spilled


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", [16, 256, 1024, 4096, 16384])
def test_roomy_plans_keep_rows_in_registers(k, m):
    plan = quantizer._sigma_plan(k, 128, m)
    assert plan is not None and plan[3] == 0, plan  # sigma: one pass
    widths, bm, warps, _ = plan
    assert sum(widths) == k and k * bm <= LIMIT * warps, plan
    assert quantizer.quant_supported(k, 128, 3, torch.bfloat16, "sigma", m) is None
    widths, bm, warps, chunk = quantizer._roomy_plan(k, 128, m, one_pass=False)  # GELU: two passes allowed
    assert sum(widths) == k and (chunk or k * bm <= LIMIT * warps)


def test_rows_too_long_for_one_pass_are_refused_by_name():
    why = quantizer.quant_supported(16384, 128, 3, torch.bfloat16, "sigma", 256)
    assert why and "sigma" in why and "16384" in why


def _build_offline(A, plan, sym: bool, shift: bool, sigma: bool, act: int) -> tuple[str, int]:
    """(SASS, registers) of `act_quant_bfly_kernel` built for sm_90 on `plan` (Hadamard 128), as the launcher
    specializes it."""
    from tests.kernels.sm90 import compile_sm90, sass
    widths, bm, warps, chunk = plan
    ws = list(widths) + [0] * (4 - len(widths))
    sig = {"x_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "lo_ptr": "*fp32", "M": "i32",
           "M_STORE": "i32", "stride_xm": "i32", "stride_om": "i32", "hscale": "fp32", "levels": "fp32",
           "clip_c": "fp32"}
    const = dict(W0=ws[0], W1=ws[1], W2=ws[2], W3=ws[3], BM=bm, B=128, LOGB=7, HAD=True, SYM=sym,
                 DEQUANT=False, HAS_SHIFT=shift, CHUNK=chunk, SIGMA=sigma, ACT=act)
    kern = compile_sm90(A.act_quant_bfly_kernel, sig, const, {"num_warps": warps},
                        aligned=("x_ptr", "out_ptr", "stride_xm", "stride_om"), gluon=False)
    return sass(kern)


@pytest.mark.parametrize("k", [1152, 4608])
@pytest.mark.parametrize("form", ["sigma", "gelu", "gelu_tanh"])
def test_quantizer_does_not_spill_offline_sm90(k, form):
    """Offline sm_90 build of the kernel on the plan the quantizer picks for the form (Hadamard 128): no
    local-memory stores."""
    A = import_or_none("triton_act_quant")
    if A is None:
        pytest.skip("triton does not import here")
    sigma = form == "sigma"
    plan = quantizer._roomy_plan(k, 128, 16384, one_pass=sigma)
    text, regs = _build_offline(A, plan, not sigma, sigma, sigma, 0 if sigma else A.ACTS[form])
    assert not re.search(r"\bSTL\b", text), f"K={k} {form} plan {plan[:3]}: {regs} registers, spills"


@pytest.mark.parametrize("k", [1152, 4608])
def test_sigma_moments_keep_the_row_layout_offline_sm90(k):
    """The sigma form's row mean and deviation add no layout conversion of the row: offline sm_90 on its plan, at
    most twice the shared-memory stores of the absmax form on the same plan. Session 15's profile of -a3 on the
    H200: 216 us a call against 41 for absmax (30 of 61 ms a forward); a row mean broadcast back against each
    piece (two passes) had Triton convert the whole piece through shared memory (306 stores against 30 at
    K = 1152, 1239 and 219 barriers at K = 4608); one Welford reduction a piece needs no broadcast."""
    A = import_or_none("triton_act_quant")
    if A is None:
        pytest.skip("triton does not import here")
    plan = quantizer._sigma_plan(k, 128, 16384)
    counts = {sigma: len(re.findall(r"\bSTS\b", _build_offline(A, plan, False, True, sigma, 0)[0]))
              for sigma in (False, True)}
    assert counts[True] <= 2 * counts[False], f"K={k}: sigma {counts[True]} shared stores, absmax {counts[False]}"
