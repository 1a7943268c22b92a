"""The pointer fp8 GEMM's output activation (`fp8_gemm_kernel` OUT_ACT: robuq::qlinear's output_act, DiT's GELU in
fc1's epilogue) in Triton's CPU interpreter, where triton imports (a subprocess
with TRITON_INTERPRET=1; no GPU): the output equals the unfused pair, y rounded to the output dtype then torch's
GELU in fp32 rounded again, element for element; and the sm_90 build of the largest config keeps it unspilled."""
import re

import pytest

from tests.kernels.sm90 import import_or_none, run_interpreted

SCRIPT = r"""
import json
import torch
from robuq_fx.kernels import triton_launch
triton_launch._ENABLED = False
from robuq_fx.kernels import triton_fp8_kernels as G
torch.manual_seed(0)
m, n, k = 40, 64, 256                                 # a ragged M tail (40 rows in a 64-row tile)
a = torch.randint(-7, 8, (m, k)).float().to(torch.float8_e4m3fn)
b = torch.randint(-1, 2, (n, k)).float().to(torch.float8_e4m3fn)
sx, sw = torch.rand(m) * 0.1, torch.rand(n) * 0.1
bias = torch.randn(n).half()
res = {}
for act in ("", "gelu", "gelu_tanh"):
    c = torch.empty(m, n, dtype=torch.float16)
    G.launch_fp8_gemm(a, b, c, sx, sw, bias, None, None, None, None, m, (64, 64, 128, 8, 4, 4), out_act=act)
    y = ((a.float() @ b.float().t()) * sx[:, None] * sw[None, :] + bias.float()).half()
    if act:
        y = torch.nn.functional.gelu(y.float(), approximate="tanh" if act == "gelu_tanh" else "none").half()
    res[act or "none"] = [bool(torch.equal(c, y)), float((c.float() - y.float()).abs().max())]
import os
os.environ["ROBUQ_GELU_FORM"] = "fast"                # the tanh GELU's sigmoid form (triton_act_quant.act_code)
c = torch.empty(m, n, dtype=torch.float16)
G.launch_fp8_gemm(a, b, c, sx, sw, bias, None, None, None, None, m, (64, 64, 128, 8, 4, 4), out_act="gelu_tanh")
y = ((a.float() @ b.float().t()) * sx[:, None] * sw[None, :] + bias.float()).half()
y = torch.nn.functional.gelu(y.float(), approximate="tanh").half()
step = (c.float() - y.float()).abs() / y.float().abs().clamp_min(2 ** -14)
res["fast"] = [float((c != y).float().mean()), float(step.max())]
print(json.dumps(res))
"""


@pytest.mark.skipif(import_or_none("triton_fp8_kernels") is None, reason="triton does not import here")
def test_output_activation_in_the_interpreter_equals_the_unfused_pair():
    res = run_interpreted(SCRIPT)
    fast = res.pop("fast")
    assert set(res) == {"none", "gelu", "gelu_tanh"}
    assert all(equal for equal, _ in res.values()), res
    # the sigmoid form (ROBUQ_GELU_FORM=fast): the same function, a few fp32 ulp away, so a rare value rounds to the
    # neighbouring fp16 (one step: <= 2^-10 relative); a wrong constant moves most values by far more
    assert fast[0] <= 0.02 and fast[1] <= 2 ** -10 + 1e-6, fast


@pytest.mark.skipif(import_or_none("triton_fp8_kernels") is None, reason="triton does not import here")
@pytest.mark.parametrize("act", [2, 3])
@pytest.mark.parametrize("i", range(8))
def test_output_activation_configs_build_unspilled_offline_sm90(i, act):
    """`two_tiles_ok` says which GEMM configs take the tanh-GELU store, in ATen's form (act 2) and the sigmoid form
    (act 3): exactly those that build without local stores on sm_90 (the 128-values-a-thread accumulators spill 29-43
    with the first, 2-7 with the second), and the launcher refuses the others."""
    G = import_or_none("triton_fp8_kernels")
    if i >= len(G.GEMM_CONFIGS):
        pytest.skip("fewer configs")
    from tests.kernels.sm90 import FP8_GEMM_ALIGNED, FP8_GEMM_SIG, compile_sm90, sass
    cfg = G.GEMM_CONFIGS[i]
    bm, bn, bk, gm, warps, stages, *early = cfg
    const = dict(BM=bm, BN=bn, BK=bk, GROUP_M=gm, RP=16, HAS_BIAS=True, ASYM=False, HAS_LRB=False,
                 EARLY=bool(early and early[0]), DOWN=False, OUT_ACT=act)
    kern = compile_sm90(G.fp8_gemm_kernel, FP8_GEMM_SIG, const, {"num_warps": warps, "num_stages": stages},
                        aligned=FP8_GEMM_ALIGNED, gluon=False)
    text, regs = sass(kern)
    assert G.two_tiles_ok(cfg) == (not re.search(r"\bSTL\b", text)), (cfg, regs)
    if act == 3 and G.two_tiles_ok(cfg):  # the point of the sigmoid form: about half the store's instructions
        exact = compile_sm90(G.fp8_gemm_kernel, FP8_GEMM_SIG, dict(const, OUT_ACT=2),
                             {"num_warps": warps, "num_stages": stages}, aligned=FP8_GEMM_ALIGNED, gluon=False)
        n_fast, n_exact = (len(re.findall(r"^\s+/\*[0-9a-f]+\*/", t, re.M)) for t in (text, sass(exact)[0]))
        assert n_fast < 0.6 * n_exact, (cfg, n_fast, n_exact)
    if not G.two_tiles_ok(cfg):
        with pytest.raises(ValueError, match="spills"):
            G.launch_fp8_gemm(None, _Shape(), None, None, None, None, None, None, None, None, 16, cfg,
                              launcher=lambda *a: None, out_act="gelu_tanh")


@pytest.mark.skipif(import_or_none("triton_fp8_kernels") is None, reason="triton does not import here")
def test_two_tiles_config_keeps_the_tile_where_it_can():
    """The config an output activation runs with: the tuned one where it holds it, else the same tile and K loop on
    8 warps (DiT's tuned (128, 128, 4 warps) -> its 8-warp twin), never one that spills."""
    G = import_or_none("triton_fp8_kernels")
    for cfg in G.GEMM_CONFIGS:
        got = G.two_tiles_config(cfg)
        assert got in G.GEMM_CONFIGS and G.two_tiles_ok(got)
        assert got == cfg if G.two_tiles_ok(cfg) else got[:3] in ((128, 128, 128),)
        assert bool(got[6:7] and got[6]) == bool(cfg[6:7] and cfg[6])  # the early-load form kept
    assert G.two_tiles_config((128, 128, 128, 8, 4, 3, True)) == (128, 128, 128, 8, 8, 4, True)


class _Shape:
    shape = (64, 256)
