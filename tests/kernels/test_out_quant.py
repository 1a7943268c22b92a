"""`fp8_gemm_kernel`'s OUT_QUANT store (session 17, a building block not yet wired into robuq::qlinear): the layer's
output fake-quantized per row and head, as the 8-bit attention's row kernel quantizes q / k / v after the qkv
layer, so that a producer-quantized attention could run SDPA alone (docs/gpu.md, the producer design). A tile steps
by whole heads (three heads of 72 in a 256-wide tile). CPU, where triton imports: Triton's interpreter against
`quantizers.fake_quant_act(y, 8, group=D)` on the unfused output, bit for bit; the sm_90 builds."""
from __future__ import annotations

import re

import pytest

from tests.kernels.sm90 import import_or_none, run_interpreted

G = import_or_none("triton_fp8_kernels")

SCRIPT = r"""
import json
import torch
from robuq_fx import quantizers as Q
from robuq_fx.kernels import triton_launch
triton_launch._ENABLED = False
from robuq_fx.kernels import triton_fp8_kernels as G
res = {}
for d, heads, cfg, bits in ((72, 6, (32, 256, 128, 8, 4, 2), 8), (64, 4, (32, 128, 128, 8, 4, 2), 8),
                            (72, 3, (16, 128, 128, 8, 4, 2), 4)):
    torch.manual_seed(d + heads)
    m, k, n = 40, 256, heads * d                      # a ragged M tail; N in whole heads
    a = torch.randint(-7, 8, (m, k)).float().to(torch.float8_e4m3fn)
    b = torch.randint(-7, 8, (n, k)).float().to(torch.float8_e4m3fn)
    sx, sw = torch.rand(m) * 0.1, torch.rand(n) * 0.1
    bias = torch.randn(n).half()
    c = torch.full((m, n), float("nan"), dtype=torch.float16)
    G.launch_fp8_gemm(a, b, c, sx, sw, bias, None, None, None, None, m, cfg, out_quant=(d, bits))
    y = ((a.float() @ b.float().t()) * sx[:, None] * sw[None, :] + bias.float()).half()
    want = Q.fake_quant_act(y, bits, True, "absmax", group=d)
    res[f"{d}x{heads} {bits}b"] = [bool(torch.equal(c, want)), float((c.float() - want.float()).abs().max()),
                                   float((want != y).float().mean())]
print(json.dumps(res))
"""


@pytest.mark.skipif(G is None, reason="triton does not import here")
def test_output_fake_quantized_per_head_equals_the_row_math():
    res = run_interpreted(SCRIPT)
    assert len(res) == 3
    for key, (equal, err, moved) in res.items():
        assert equal, (key, err)
        assert moved > 0.3, key  # the quantization did move values (8 bits: most of them by a bf16 step or more)


@pytest.mark.skipif(G is None, reason="triton does not import here")
def test_out_quant_refuses_what_it_cannot_store():
    class B:
        shape = (432, 256)
    for bad in ((72, 8, "gelu_tanh"), (70, 8, ""), (96, 8, ""), (72, 9, "")):
        d, bits, act = bad
        with pytest.raises(ValueError, match="out_quant"):
            G.launch_fp8_gemm(None, B(), None, None, None, None, None, None, None, None, 16,
                              (64, 256, 128, 8, 8, 3), launcher=lambda *a: None, out_act=act, out_quant=(d, bits))


@pytest.mark.skipif(G is None, reason="triton does not import here")
@pytest.mark.parametrize("i", range(9))
def test_out_quant_builds_unspilled_offline_sm90(i):
    """Every shipped config wide enough for a head of 72 (and 64 x 256 on 8 warps), with the per-head store: no
    local stores on sm_90 (unlike the GELU store, the launcher needs no `two_tiles_ok` config for it)."""
    from tests.kernels.sm90 import FP8_GEMM_ALIGNED, FP8_GEMM_SIG, compile_sm90, sass
    configs = [c for c in G.GEMM_CONFIGS if c[1] >= 72] + [(64, 256, 128, 8, 8, 3)]
    if i >= len(configs):
        pytest.skip("fewer configs")
    bm, bn, bk, gm, warps, stages, *early = configs[i]
    const = dict(BM=bm, BN=bn, BK=bk, GROUP_M=gm, RP=16, HAS_BIAS=True, ASYM=False, HAS_LRB=False,
                 EARLY=bool(early and early[0]), DOWN=False, OUT_ACT=0, BLOCK_SCALE=False, OUT_QUANT=72,
                 NSTEP=(bn // 72) * 72, QLEVELS=127.0)
    text, regs = sass(compile_sm90(G.fp8_gemm_kernel, FP8_GEMM_SIG, const, {"num_warps": warps, "num_stages": stages},
                                   aligned=FP8_GEMM_ALIGNED, gluon=False))
    assert not re.search(r"\bSTL\b", text), (configs[i], regs)
    assert re.search(r"GMMA", text), configs[i]
