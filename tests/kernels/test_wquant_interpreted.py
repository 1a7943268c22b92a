"""The QAT weight fake-quant kernel (kernels/triton_wquant.py) in Triton's CPU interpreter (a subprocess with
TRITON_INTERPRET=1; no GPU): Q_w(R) and the scales against `quantizers.fake_quant_weight` of R, with R given whole
or as its two terms W H and A B (the kernel takes their difference in fp32, as `layer.wide_difference` does). The
GPU test (test_triton_wquant.py) checks the same on the device; this one lets a CPU machine catch a wrong formula,
such as a quotient or a difference rounded to R's 16-bit dtype (what session 23 moved to fp32)."""

import pytest

from tests.kernels.sm90 import import_or_none, run_interpreted

SCRIPT = r"""
import json
import torch
from robuq_fx import quantizers as Q
from robuq_fx.layer import wide_difference
from robuq_fx.kernels import triton_launch, triton_wquant as WQ
triton_launch._ENABLED = False  # the interpreter launches through triton's own path
WQ.on_device = lambda dev: __import__("contextlib").nullcontext()  # CPU tensors: no device to switch to
res = []
for bits in (1.58, 2, 4):
    for rdt in (torch.float16, torch.float32):  # (the interpreter's bf16 is broken; fp16 takes the same path)
        for split in (False, True):
            torch.manual_seed(int(bits * 100) + split)
            wh = (torch.randn(24, 200) * 0.05)
            wh[0, :5] = 0.4          # outliers in one row
            ab = torch.randn(24, 200) * 0.01
            if not split:
                wh[1] = 0            # an all-zero row: scale eps, codes 0
            wh, ab = wh.to(rdt), ab.to(rdt)
            r = wide_difference(wh, ab) if split else wh
            # written into a slice of a wider (stacked) buffer, as the QAT step's weight side does
            wide_buf = torch.full((24, 200 + 8), 7.0)
            out, s = WQ.fake_quant_weight_rows(wh, bits, "float32", torch.float32, ab if split else None,
                                               out=wide_buf[:, :200])
            assert out.data_ptr() == wide_buf.data_ptr() and bool((wide_buf[:, 200:] == 7).all())
            codes, s_ref = Q.quantize_weight(r, bits, "channel", 0, "float32")
            ref = Q.fake_quant_weight(r, bits, "channel", 0, "float32").float()
            got_codes = torch.round(out / s[:, None]).clamp(-15, 15)
            res.append({"bits": bits, "rdt": str(rdt), "split": split,
                        "codes": (got_codes == codes.float()).float().mean().item(),
                        # (a ternary scale's last bits carry into q s: compared to 2^-20 relative)
                        "values": torch.isclose(out, ref, rtol=2 ** -20, atol=0).float().mean().item(),
                        "exact": (out == ref).float().mean().item(),
                        "scale_rel": ((s - s_ref.reshape(-1)).abs() / s_ref.reshape(-1)).max().item()})
print(json.dumps(res))
"""


@pytest.mark.skipif(import_or_none("triton_wquant") is None, reason="triton does not import here")
def test_weight_kernel_in_the_interpreter_matches_the_reference():
    rows = run_interpreted(SCRIPT)
    assert len(rows) == 12
    for r in rows:
        # a ternary scale is a row mean summed in another order (last bits); the others are exact
        assert r["scale_rel"] <= (1e-6 if r["bits"] == 1.58 else 0.0), r
        assert r["codes"] >= 0.999 and r["values"] >= 0.999, r
        assert r["bits"] == 1.58 or r["exact"] == 1.0, r


@pytest.mark.skipif(import_or_none("triton_wquant") is None, reason="triton does not import here")
@pytest.mark.parametrize("has_ab", [True, False])
def test_weight_kernel_builds_for_sm90_with_fp64_scalars(has_ab):
    """Offline sm_90 build (no GPU), with qmax / eps as fp64, as Inductor passes a user Triton kernel's floats."""
    from tests.kernels.sm90 import compile_sm90
    wq = import_or_none("triton_wquant")
    sig = {"r_ptr": "*bf16", "ab_ptr": "*bf16", "out_ptr": "*bf16", "scale_ptr": "*fp32", "K": "i32",
           "stride_r": "i32", "stride_ab": "i32", "stride_o": "i32", "qmax": "fp64", "eps": "fp64"}
    k = compile_sm90(wq.wquant_rows_kernel, sig, dict(TERNARY=True, HAS_AB=has_ab, RDT=0 if has_ab else 1, SDT=0,
                                                      BLOCK=2048), dict(num_warps=8), gluon=False)
    assert k.asm["cubin"]
