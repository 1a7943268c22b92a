"""The Gluon fp8 GEMM with the qlinear epilogue (robuq_fx/kernels/gluon_fp8_gemm.py, opt-in
ROBUQ_FP8_GEMM_KERNEL=gluon).

CPU (where triton imports): every config compiles for sm_90 with fp8 wgmma (QGMMA), TMA loads, and the bf16 wgmma of
the low-rank term. GPU: against the Triton fused-epilogue GEMM on the same codes (the integer products are exact in
both, the epilogue runs in the same order; only the low-rank dot may sum its 32 products in another order, so
>= 99.9% of outputs must be equal and none may differ by more than one bf16 ulp of its value), and against the
float64 product of the codes; a W1.58A4+H+LRB32 layer with and without it.
"""
from __future__ import annotations

import pytest
import torch

import robuq_fx  # noqa: F401
from tests.kernels.sm90 import compile_sm90, import_or_none, opcodes, sass

GG = import_or_none("gluon_fp8_gemm")
VARIANTS = [dict(bias=False, asym=False, rank=0), dict(bias=True, asym=False, rank=32),
            dict(bias=True, asym=True, rank=32), dict(bias=True, asym=True, rank=0)]


@pytest.mark.skipif(GG is None, reason="triton with Gluon does not import here")
@pytest.mark.parametrize("cfg", range(4))
def test_compiles_for_sm90(cfg):
    from triton.experimental.gluon import language as gl
    bm, bn, bk, stages, gm, warps = GG.CONFIGS[cfg]
    la = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.float8e4nv)
    lb = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.float8e4nv)
    sig = {"a_desc": f"tensordesc<fp8e4nv[{bm}, {bk}],{la!r}>", "b_desc": f"tensordesc<fp8e4nv[{bn}, {bk}],{lb!r}>",
           "y_ptr": "*bf16", "sx_ptr": "*fp32", "sw_ptr": "*fp32", "bias_ptr": "*bf16", "lo_ptr": "*fp32",
           "cs_ptr": "*fp32", "t_ptr": "*bf16", "up_ptr": "*bf16", "M": "i32", "N": "i32", "stride_ym": "i32",
           "stride_tm": "i32", "stride_un": "i32", "R": "i32"}
    const = dict(RP=32, HAS_BIAS=True, ASYM=False, HAS_LRB=True, STAGES=stages, GROUP_M=gm, num_warps=warps)
    text, _ = sass(compile_sm90(GG.fp8_gemm_gluon_kernel, sig, const, {"num_warps": warps}))
    ops = opcodes(text)
    assert {"QGMMA", "HGMMA", "UTMALDG"} <= ops, ops  # fp8 wgmma, bf16 wgmma (the branch), TMA loads


cuda = pytest.mark.skipif(not torch.cuda.is_available() or GG is None
                          or torch.cuda.get_device_capability() < (9, 0), reason="needs a Hopper GPU and Gluon")


def _operands(m, n, k, bias, asym, rank, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randint(-7, 8, (m + 13, k), device="cuda", generator=g).to(torch.bfloat16).to(torch.float8_e4m3fn)
    b = torch.randint(-1, 2, (n, k), device="cuda", generator=g).to(torch.bfloat16).to(torch.float8_e4m3fn)
    sx = torch.rand(m + 13, device="cuda", generator=g) * 0.1
    sw = torch.rand(n, device="cuda", generator=g) * 0.05 + 0.01
    bi = (torch.randn(n, device="cuda", generator=g) * 0.1).bfloat16() if bias else None
    lo = torch.randn(m + 13, device="cuda", generator=g) * 0.1 if asym else None
    cs = torch.randn(n, device="cuda", generator=g) if asym else None
    t = (torch.randn(m, rank, device="cuda", generator=g) * 0.3).bfloat16() if rank else None
    up = (torch.randn(n, rank, device="cuda", generator=g) * 0.1).bfloat16() if rank else None
    return a, b, sx, sw, bi, lo, cs, t, up


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("cfg", range(4))
@pytest.mark.parametrize("var", range(len(VARIANTS)))
@pytest.mark.parametrize("m,n,k", [(37, 3456, 1152), (1000, 1152, 4608), (4096, 6912, 1152)])
def test_equals_the_triton_gemm(cfg, var, m, n, k):
    from robuq_fx.kernels import triton_fp8_kernels as TK
    a, b, sx, sw, bi, lo, cs, t, up = _operands(m, n, k, **VARIANTS[var])
    want = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    TK.launch_fp8_gemm(a, b, want, sx, sw, bi, lo, cs, t, up, m, TK.GEMM_CONFIGS[0])
    got = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    GG.launch_fp8_gemm_gluon(a, b, got, sx, sw, bi, lo, cs, t, up, m, GG.CONFIGS[cfg])
    assert not got.isnan().any(), "rows or columns left unwritten"
    same = (got == want).float().mean().item()
    ulp = want.float().abs().clamp_min(1e-30) * 2 ** -7
    assert same >= 0.999 and bool(((got.float() - want.float()).abs() <= ulp).all()), same
    # and the float64 product of the codes, as the epilogue defines it
    ref = (a[:m].double() @ b.double().t()) * sx[:m].double()[:, None] * sw.double()[None, :]
    if lo is not None:
        ref += lo[:m].double()[:, None] * cs.double()[None, :]
    if bi is not None:
        ref += bi.double()[None, :]
    if t is not None:
        ref += t.double() @ up.double().t()
    err = (got.double() - ref).norm() / ref.norm()
    assert err < 4e-3, err


@cuda
@pytest.mark.gpu
def test_lrb_layer_with_the_gluon_gemm(monkeypatch):
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    torch.manual_seed(0)
    k, n, r = 1152, 3456, 32
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
    dn = (torch.randn(r, k, device="cuda") * 0.05).bfloat16()
    up = (torch.randn(n, r, device="cuda") * 0.05).bfloat16()
    spec = LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=r).resolve(k, n)
    mod = PackedLinear.from_float(w, None, dn, up, spec).use_device_layout()
    x = torch.randn(4, 300, k, device="cuda").bfloat16()
    monkeypatch.setenv("ROBUQ_FP8_EPI", "triton")
    with torch.no_grad():
        monkeypatch.delenv("ROBUQ_FP8_GEMM_KERNEL", raising=False)
        want = mod(x)
        monkeypatch.setenv("ROBUQ_FP8_GEMM_KERNEL", "gluon")
        got = mod(x)
    assert (got == want).float().mean() >= 0.999
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all()
