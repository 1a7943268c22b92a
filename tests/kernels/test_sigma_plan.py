"""The activation quantizer's tilings for sigma-clipped ranges (kernels/quantizer.py `_sigma_plan`): the whole row
stays in registers for the mean and deviation, so a plan must not give a thread more values than fit. Session 13:
the dispatch table's absmax plan for K = 4608 (one warp a row, 144 values a thread) made the sigma kernel spill
(255 registers, 183 local stores in the offline sm_90 build) on every fc2 call of the -a3 / -a2 policies."""
import re

import pytest
import torch

from robuq_fx.kernels import quantizer
from tests.kernels.sm90 import import_or_none

KS = (256, 1152, 2304, 4096, 4608, 8192)  # DiT-XL/2 (1152, 4608), ViT / Llama widths


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", [16, 256, 1024, 4096, 16384])
def test_sigma_plans_keep_rows_in_registers(k, m):
    plan = quantizer._sigma_plan(k, 128, m)
    assert plan is not None and plan[3] == 0, plan  # one pass
    widths, bm, warps, _ = plan
    assert sum(widths) == k and k * bm <= quantizer._SIGMA_PER_THREAD * 32 * warps, plan
    assert quantizer.quant_supported(k, 128, 3, torch.bfloat16, "sigma", m) is None


def test_rows_too_long_for_one_pass_are_refused_by_name():
    why = quantizer.quant_supported(16384, 128, 3, torch.bfloat16, "sigma", 256)
    assert why and "sigma" in why and "16384" in why


@pytest.mark.parametrize("k", [1152, 4608])
def test_sigma_kernel_does_not_spill_offline_sm90(k):
    """Offline sm_90 build of the plan's kernel (asymmetric sigma, Hadamard 128): no local-memory stores."""
    A = import_or_none("triton_act_quant")
    if A is None:
        pytest.skip("triton does not import here")
    from tests.kernels.sm90 import compile_sm90, sass
    widths, bm, warps, chunk = quantizer._sigma_plan(k, 128, 16384)
    ws = list(widths) + [0] * (4 - len(widths))
    sig = {"x_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "lo_ptr": "*fp32", "M": "i32",
           "M_STORE": "i32", "stride_xm": "i32", "stride_om": "i32", "hscale": "fp32", "levels": "fp32",
           "clip_c": "fp32"}
    const = dict(W0=ws[0], W1=ws[1], W2=ws[2], W3=ws[3], BM=bm, B=128, LOGB=7, HAD=True, SYM=False, DEQUANT=False,
                 HAS_SHIFT=True, CHUNK=chunk, SIGMA=True, ACT=0)
    kern = compile_sm90(A.act_quant_bfly_kernel, sig, const, {"num_warps": warps},
                        aligned=("x_ptr", "out_ptr", "stride_xm", "stride_om"), gluon=False)
    text, regs = sass(kern)
    assert not re.search(r"\bSTL\b", text), f"K={k} plan {widths, bm, warps}: {regs} registers, spills"
