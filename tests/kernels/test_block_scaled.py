"""The fp8 path for per-block activation ranges (`LayerSpec.a_group` = 128, issue 20): the one-pass block quantizer
(kernels/triton_block_quant.py) and `fp8_gemm_kernel`'s BLOCK_SCALE form, which scales each K step's exact product
of codes by its block's row scales.

CPU, where triton imports: both kernels in Triton's interpreter (the quantizer with either rotation; fp16; a
subprocess with TRITON_INTERPRET=1): the quantizer's codes and scales against `quantizers.quantize_act(x H,
group=128)` (>= 99.9% of the codes equal: the rotation's fp32 sums may round differently), the GEMM against the
float64 product of the same codes and scales; and the sm_90 builds of both without local stores. GPU: the layer
against the reference and `integer_qlinear`, through both GEMMs (cuBLAS's 1 x 128 blockwise `_scaled_mm` and ours:
kernels/block_scaled.py)."""
from __future__ import annotations

import re

import pytest
import torch

from tests.kernels.sm90 import import_or_none, run_interpreted

SCRIPT = r"""
import json
import torch
from robuq_fx.kernels import triton_launch
triton_launch._ENABLED = False
from robuq_fx import quantizers as Q
from robuq_fx.hadamard import block_hadamard, hadamard_matrix
from robuq_fx.kernels import triton_block_quant as BQ, triton_fp8_kernels as G
torch.manual_seed(0)
m, n, k, m_store = 40, 64, 256, 48
x = (torch.randn(m, k) * torch.linspace(0.2, 3.0, k)).half()
x[3, 130] = 25.0                                      # an outlier in the second block only
h = hadamard_matrix(128, torch.float16)
xh = block_hadamard(x, 128)
q_ref, s_ref, _ = Q.quantize_act(xh, 4, True, "absmax", group=128)
res = {}
for rot in ("butterfly", "mma"):
    codes, scales = BQ.block_quant(x, h, m_store, 7.0, bm=16, warps=4, rot=rot)
    res[rot] = {"codes_equal": float((codes[:m].float() == q_ref).float().mean()),
                "scales_equal": float((scales[:, :m].t() == s_ref).float().mean()),
                "pad_zero": bool((codes[m:].float() == 0).all() and (scales[:, m:] == 0).all())}
w = torch.randint(-7, 8, (n, k)).float().to(torch.float8_e4m3fn)
sw, bias = torch.rand(n) * 0.1 + 0.01, torch.randn(n).half()
c = torch.empty(m, n, dtype=torch.float16)
G.launch_fp8_gemm(codes, w, c, scales, sw, bias, None, None, None, None, m, (16, 64, 128, 8, 4, 2),
                  block_scale=True)
qa = codes[:m].double().reshape(m, k // 128, 128)
wb = w.double().reshape(n, k // 128, 128)
want = (torch.einsum("mbk,nbk->mnb", qa, wb) * scales[:, :m].t().double()[:, None, :]).sum(-1) \
       * sw.double()[None, :] + bias.double()
res["gemm_rel_err"] = float((c.double() - want).abs().max() / want.abs().max())
print(json.dumps(res))
"""


@pytest.mark.skipif(import_or_none("triton_fp8_kernels") is None, reason="triton does not import here")
def test_block_quantizer_and_block_scaled_gemm_in_the_interpreter():
    res = run_interpreted(SCRIPT)
    for rot in ("butterfly", "mma"):
        assert res[rot]["codes_equal"] >= 0.999 and res[rot]["scales_equal"] >= 0.99, res
        assert res[rot]["pad_zero"], res
    assert res["gemm_rel_err"] < 2e-3, res  # fp16 output of an exact product (2^-11 a rounding)


@pytest.mark.skipif(import_or_none("triton_fp8_kernels") is None, reason="triton does not import here")
def test_sm90_builds_without_local_stores():
    from tests.kernels.sm90 import FP8_GEMM_ALIGNED, FP8_GEMM_SIG, compile_sm90, sass
    G = import_or_none("triton_fp8_kernels")
    from robuq_fx.kernels import triton_block_quant as BQ
    for cfg in G.GEMM_CONFIGS:  # a second (BM, BN) fp32 tile beside the accumulator: the OUT_ACT store's bound
        bm, bn, bk, gm, warps, stages, *early = cfg
        const = dict(BM=bm, BN=bn, BK=bk, GROUP_M=gm, RP=16, HAS_BIAS=True, ASYM=False, HAS_LRB=False,
                     EARLY=bool(early and early[0]), DOWN=False, OUT_ACT=0, BLOCK_SCALE=True)
        text, regs = sass(compile_sm90(G.fp8_gemm_kernel, FP8_GEMM_SIG, const,
                                       {"num_warps": warps, "num_stages": stages},
                                       aligned=FP8_GEMM_ALIGNED + ("stride_sk",), gluon=False))
        assert G.two_tiles_ok(cfg) == (not re.search(r"\bSTL\b", text)), (cfg, regs)
        assert re.search(r"GMMA", text), cfg  # wgmma for the products
        if G.two_tiles_ok(cfg):  # and with the branch's t A^T in the epilogue (the paper policy's layers)
            lrb = dict(const, HAS_LRB=True, RP=32)
            text, regs = sass(compile_sm90(G.fp8_gemm_kernel, FP8_GEMM_SIG, lrb,
                                           {"num_warps": warps, "num_stages": stages},
                                           aligned=FP8_GEMM_ALIGNED + ("stride_sk",), gluon=False))
            assert not re.search(r"\bSTL\b", text), (cfg, "LRB", regs)
        else:
            with pytest.raises(ValueError, match="block_scale"):
                G.launch_fp8_gemm(None, _Shape(), None, _Scales(), None, None, None, None, None, None, 16, cfg,
                                  launcher=lambda *a: None, block_scale=True)
    sig = {"x_ptr": "*bf16", "h_ptr": "*bf16", "o_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32", "M_STORE": "i32",
           "stride_x": "i32", "stride_o": "i32", "levels": "fp32", "hscale": "fp32"}
    for mma in (False, True):
        text, regs = sass(compile_sm90(BQ.block_quant_kernel, sig, dict(BM=64, HB=128, LOGB=7, MMA=mma),
                                       {"num_warps": 4},
                                       aligned=("x_ptr", "h_ptr", "o_ptr", "s_ptr", "stride_x", "stride_o"),
                                       gluon=False))
        assert not re.search(r"\bSTL\b", text), (mma, regs)


WIRING = r"""
import json, torch
from robuq_fx.kernels import triton_launch
triton_launch._ENABLED = False
from robuq_fx.kernels import quantizer, triton_fp8 as T
quantizer.on_device = lambda dev: quantizer._NULL
T.on_device = quantizer.on_device
from robuq_fx.kernels.reference import integer_qlinear
from robuq_fx.kernels.registry import QLinearArgs
from robuq_fx.modules import PackedLinear
from robuq_fx.spec import LayerSpec
torch.manual_seed(0)
k, n, m = 256, 64, 20
x = torch.randn(m, k).half()
res = {}
for rank in (0, 8):
    spec = LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128, a_group=128,
                     lora_rank=rank).resolve(k, n)
    down, up = (torch.randn(rank, k) * 0.05, torch.randn(n, rank) * 0.05) if rank else (None, None)
    layer = PackedLinear.from_float(torch.randn(n, k) / 16, torch.randn(n) * 0.1, down, up, spec).half()
    layer.set_layout("fp8")
    buf = (layer.qweight, layer.w_scale, layer.bias, layer.lrb_down, layer.lrb_up)
    for act in ("", "gelu_tanh"):
        a = QLinearArgs(*buf, *layer.op_args(), a_group=128, output_act=act)
        y = T._fp8_qlinear(x, a)
        want = integer_qlinear(x, QLinearArgs(*buf, *layer.op_args(), a_group=128)).float()
        if act:
            want = torch.nn.functional.gelu(want.half().float(), approximate="tanh")
        res[f"r{rank} {act or 'none'}"] = float((y.float() - want).abs().max() / want.abs().max())
print(json.dumps(res))
"""


@pytest.mark.skipif(import_or_none("triton_fp8_kernels") is None, reason="triton does not import here")
def test_fp8_path_runs_both_kernels_for_an_a_group_layer_in_the_interpreter():
    """triton_fp8's own path for an a_group = 128 layer, with and without a low-rank branch (block quantizer, the
    branch's t, block-scaled pointer GEMM with its config rule, the output activation in its store) equals
    `integer_qlinear` (fp16 in the interpreter; its tanh is computed through exp there, hence the GELU's small
    difference; the branch's t is rounded to fp16 as the kernels round it)."""
    res = run_interpreted(WIRING)
    assert set(res) == {"r0 none", "r0 gelu_tanh", "r8 none", "r8 gelu_tanh"}
    assert all(v < (2e-3 if "gelu" in key else 1e-3) for key, v in res.items()), res


class _Shape:
    shape = (64, 256)


class _Scales:
    shape = (2, 16)

    def stride(self, i):
        return (16, 1)[i]


gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                         reason="needs a Hopper GPU")


@gpu
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
@pytest.mark.parametrize("k,n,m,rank", [(1152, 3456, 4096, 0), (4608, 1152, 300, 0), (1152, 1152, 37, 0),
                                        (1152, 1152, 300, 32)])
def test_layer_on_the_fp8_path_equals_the_reference(k, n, m, rank, gemm, monkeypatch):
    """Both GEMMs (cuBLAS's 1 x 128 blockwise _scaled_mm for layers without a branch, else / with
    ROBUQ_BLOCK_GEMM=triton our BLOCK_SCALE GEMM) against the reference math and `integer_qlinear`; which one ran is
    checked, not assumed."""
    from robuq_fx import kernels
    from robuq_fx.kernels import block_scaled
    from robuq_fx.kernels.reference import integer_qlinear
    from robuq_fx.kernels.registry import QLinearArgs, select
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    if gemm == "triton":
        monkeypatch.setenv("ROBUQ_BLOCK_GEMM", "triton")
    ran = []
    real = block_scaled.cublas_gemm
    monkeypatch.setattr(block_scaled, "cublas_gemm", lambda *args: ran.append(1) or real(*args))
    torch.manual_seed(0)
    spec = LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128, a_group=128,
                     lora_rank=rank).resolve(k, n)
    down = up = None
    if rank:
        down, up = (torch.randn(rank, k) * 0.05).cuda().bfloat16(), (torch.randn(n, rank) * 0.05).cuda().bfloat16()
    layer = PackedLinear.from_float((torch.randn(n, k) / k ** 0.5).cuda().bfloat16(),
                                    (torch.randn(n) * 0.1).cuda().bfloat16(), down, up, spec).use_device_layout()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a = QLinearArgs(layer.qweight, layer.w_scale, layer.bias, layer.lrb_down, layer.lrb_up, *layer.op_args(),
                    a_group=128)
    assert select(x, a).name == "triton_fp8"
    with torch.no_grad():
        got = layer(x)
        with kernels.use("reference"):
            ref = layer(x)
    assert got.shape == (m, n)
    assert bool(ran) == (gemm == "cublas" and not rank) and block_scaled._CUBLAS_OK[0]
    exact = integer_qlinear(x, a)
    rows_equal = ((got.float() - exact.float()).abs() <= 2e-2 * exact.float().abs() + 1e-2).all(1).float().mean()
    assert rows_equal >= 0.99, rows_equal  # a flipped code moves its row
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def _block_args(**kw):
    from robuq_fx.kernels.registry import QLinearArgs
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    spec = LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128, a_group=128, **kw).resolve(256, 32)
    layer = PackedLinear.from_float(torch.randn(32, 256), torch.randn(32), None, None, spec)
    return QLinearArgs(layer.qweight, layer.w_scale, layer.bias, None, None, *layer.op_args(), a_group=128)


def test_which_block_scaled_gemm_a_call_takes(monkeypatch):
    """The rules of kernels/block_scaled.py: the layers the fp8 path takes, and where cuBLAS's blockwise GEMM may
    run (never on a CPU tensor, never with an output activation or a branch, never when switched off)."""
    import dataclasses
    from robuq_fx.kernels import block_scaled as B
    a = _block_args()
    assert B.takes(a)
    assert not B.takes(dataclasses.replace(a, a_group=64))
    assert not B.takes(dataclasses.replace(a, a_sym=False))
    assert not B.takes(dataclasses.replace(a, a_clip="sigma"))
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    assert not B.cublas_ok(x, a)  # a CPU tensor
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        xc = x.cuda()
        assert B.cublas_ok(xc, a)
        assert not B.cublas_ok(xc.half(), a)
        assert not B.cublas_ok(xc, dataclasses.replace(a, output_act="gelu_tanh"))
        monkeypatch.setenv("ROBUQ_BLOCK_GEMM", "triton")
        assert not B.cublas_ok(xc, a)


def test_refused_blockwise_gemm_falls_back_with_one_warning(monkeypatch):
    """A torch / cuBLAS that refuses the 1 x 128 recipe: cublas_gemm returns None (the Triton GEMM runs), warns once
    and is not asked again; the weight's block scales are s_w in every K block."""
    import warnings
    from types import SimpleNamespace
    from robuq_fx.kernels import block_scaled as B
    from robuq_fx.kernels import registry
    e = SimpleNamespace(fp8=torch.zeros(32, 384), sw=torch.rand(32), swb=None)
    swb = B.block_weight_scales(e)
    assert swb.shape == (3, 32) and swb.is_contiguous() and torch.equal(swb, e.sw.expand(3, 32))
    assert B.block_weight_scales(e) is swb  # kept on the entry

    def refuse(*args, **kw):
        raise RuntimeError("Invalid scaling configuration")
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    monkeypatch.setattr(B, "_CUBLAS_OK", [True])
    monkeypatch.setattr(registry, "_WARNED", set(), raising=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert B.cublas_gemm(torch.zeros(16, 384), torch.ones(3, 16), e, None, 16) is None
    assert not B._CUBLAS_OK[0]
    assert any("blockwise" in str(x.message) for x in w)
