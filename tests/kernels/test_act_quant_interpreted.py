"""The activation quantizer's `sigma` ranges run in Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1,
where triton imports; no GPU): codes and scales against `quantizers.quantize_act`. The GPU test
(test_act_quant_kernel.py) checks the same on the device; this one lets a CPU machine catch a wrong moment formula
(session 15 replaced the two-pass mean / deviation by one Welford reduction a piece), including rows far from 0,
where E[y^2] - mu^2 would cancel."""

import pytest

from tests.kernels.sm90 import import_or_none, run_interpreted

SCRIPT = r"""
import json, sys
import torch
from robuq_fx import quantizers as Q
from robuq_fx.hadamard import block_hadamard
from robuq_fx.kernels import quantizer, triton_launch
triton_launch._ENABLED = False  # the interpreter launches through triton's own path
quantizer.on_device = lambda dev: quantizer._NULL  # CPU tensors: no device to switch to
res = []
for k, block in ((256, 128), (384, 0)):  # one piece / two pieces (256 + 128) of the row
    torch.manual_seed(k)
    m = 6
    x = torch.randn(m, k) * torch.rand(m, 1) * 3
    x[1] = 0.75                                   # a constant row: deviation 0
    x[2] = 100 + torch.randn(k)                   # far from 0
    x[3] = -300 + 0.01 * torch.randn(k)
    x = x.to(torch.float16)                       # (the interpreter's bf16 is broken; fp16 takes the same path)
    xh = block_hadamard(x, block) if block else x
    for a_bits, sym in ((3, False), (2, False), (4, True)):
        out, s, lo = quantizer.act_quant(x, block, a_bits, sym, clip="sigma")
        rq, rs, rlo = Q.quantize_act(xh, a_bits, sym, "sigma")
        rel = ((s - rs.squeeze(-1)).abs() / rs.squeeze(-1).clamp_min(1e-30)).max().item()
        res.append({"k": k, "block": block, "a_bits": a_bits, "sym": sym,
                    "agree": (out.float() == rq).float().mean().item(), "scale_rel": rel})
print(json.dumps(res))
"""


@pytest.mark.skipif(import_or_none("triton_act_quant") is None, reason="triton does not import here")
def test_sigma_codes_in_the_interpreter_match_the_reference():
    rows = run_interpreted(SCRIPT)
    assert len(rows) == 6
    for r in rows:
        assert r["agree"] >= 0.999, r
        assert r["scale_rel"] <= 1e-5, r


FAST_GELU = r"""
import json, os
import torch
from robuq_fx.kernels import quantizer, triton_launch
triton_launch._ENABLED = False
quantizer.on_device = lambda dev: quantizer._NULL
torch.manual_seed(0)
x = (torch.randn(24, 512) * 2).to(torch.float16)
x[3] = -6 + torch.randn(512) * 0.1                   # the far negative tail, where 1 + tanh cancels in ATen's form
res = {}
for form in ("exact", "fast"):
    os.environ["ROBUQ_GELU_FORM"] = form
    got, s, _ = quantizer.act_quant(x, 128, 4, True, act="gelu_tanh")
    want, ws, _ = quantizer.act_quant(torch.nn.functional.gelu(x.float(), approximate="tanh").half(), 128, 4, True)
    res[form] = [float((got.float() == want.float()).float().mean()),
                 float(((s - ws).abs() / ws.clamp_min(1e-30)).max())]
print(json.dumps(res))
"""


@pytest.mark.skipif(import_or_none("triton_act_quant") is None, reason="triton does not import here")
def test_fused_tanh_gelu_in_both_forms_against_torchs_gelu_then_the_quantizer():
    """input_act = "gelu_tanh" inside the quantizer (fc2's GELU, `fuse_activations`): ATen's form gives the codes
    of the quantizer run on torch's GELU exactly; the sigmoid form (ROBUQ_GELU_FORM=fast) all but a rare one."""
    res = run_interpreted(FAST_GELU)
    assert res["exact"] == [1.0, 0.0], res
    assert res["fast"][0] >= 0.999 and res["fast"][1] <= 2e-3, res
