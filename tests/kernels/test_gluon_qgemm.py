"""Quantization inside the GEMM (robuq_fx/kernels/gluon_qgemm.py, opt-in ROBUQ_FP8_FUSED_QUANT=1).

CPU (where triton imports): the kernel compiles for sm_90 with fp8 wgmma and TMA loads (and the branch's bf16 wgmma)
and fits shared memory at K = 1152; `supported` refuses what it does not take. GPU: a W4A4+H layer (with and
without a rank-32 branch) with it equals the two-kernel path (the
activation codes are the same quantizer's arithmetic and the integer GEMM is exact, so outputs may differ only where
an fp32 Hadamard sum rounds differently or in the last fp32 bit of the scaling: >= 99.9% equal, the rest within a
bf16 ulp), on odd M and every DiT width it takes, with and without bias.
"""
from __future__ import annotations

import pytest
import torch

import robuq_fx  # noqa: F401
from tests.kernels.sm90 import compile_sm90, import_or_none, opcodes, sass

QG = import_or_none("gluon_qgemm")


@pytest.mark.skipif(QG is None, reason="triton with Gluon does not import here")
def test_supported():
    x = torch.empty(4, 1152, dtype=torch.bfloat16)
    assert QG.supported(x, 1152, 128, 4, True, "absmax", 0) is None
    assert QG.supported(x, 1152, 128, 4, True, "absmax", 32) is None                  # with the branch
    assert "symmetric absmax" in QG.supported(x, 1152, 128, 4, False, "absmax", 0)
    assert "symmetric absmax" in QG.supported(x, 1152, 0, 4, True, "absmax", 0)       # no Hadamard
    assert "up to 64" in QG.supported(x, 1152, 128, 4, True, "absmax", 128)
    assert "up to 1152" in QG.supported(x, 4608, 128, 4, True, "absmax", 0)
    assert "activation dtype" in QG.supported(x.float(), 1152, 128, 4, True, "absmax", 0)


@pytest.mark.skipif(QG is None, reason="triton with Gluon does not import here")
@pytest.mark.parametrize("k,cfg,lrb", [(1152, 0, False), (1152, 1, True), (1152, 1, False), (256, 0, True)])
def test_compiles_for_sm90(k, cfg, lrb):
    from triton.experimental.gluon import language as gl
    bn, stages = QG.CONFIGS[cfg]
    lb = gl.NVMMASharedLayout.get_default_for([bn, 128], gl.float8e4nv)
    sig = {"x_ptr": "*bf16", "b_desc": f"tensordesc<fp8e4nv[{bn}, 128],{lb!r}>", "y_ptr": "*bf16",
           "sw_ptr": "*fp32", "bias_ptr": "*bf16", "down_ptr": "*bf16", "up_ptr": "*bf16", "M": "i32", "N": "i32",
           "stride_xm": "i32", "stride_ym": "i32", "stride_dn": "i32", "stride_un": "i32", "R": "i32",
           "hscale": "fp32", "levels": "fp32", "TPS": "i32"}
    const = dict(K=k, HAS_BIAS=True, HAS_LRB=lrb, RP=32, STAGES=stages, num_warps=8)
    kern = compile_sm90(QG.qgemm_fused_kernel, sig, const, {"num_warps": 8},
                        aligned=("x_ptr", "y_ptr", "sw_ptr", "bias_ptr", "stride_xm", "stride_ym"))
    text, _ = sass(kern)
    assert {"QGMMA", "UTMALDG", "SHFL"} | ({"HGMMA"} if lrb else set()) <= opcodes(text)
    assert "STL" not in text
    assert kern.metadata.shared <= 227 * 1024, kern.metadata.shared  # Hopper's shared memory per block


cuda = pytest.mark.skipif(not torch.cuda.is_available() or QG is None
                          or torch.cuda.get_device_capability() < (9, 0), reason="needs a Hopper GPU and Gluon")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(1152, 3456), (1152, 1152), (1152, 6912), (256, 208)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [0, 32])
def test_layer_equals_the_two_kernel_path(k, n, bias, rank, monkeypatch):
    """Without the branch: >= 99.9% of outputs equal, the rest within a bf16 ulp. With it the fused kernel forms
    t = (x H) B^T from the rotated rows in x's dtype (as QAT does) where the two-kernel path multiplies x by a bf16
    B H: t differs by its roundings (~2^-8 relative), so the layer is compared in relative Frobenius norm (<= 5e-3)."""
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    torch.manual_seed(k + n + rank)
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
    b = (torch.randn(n, device="cuda") * 0.1).bfloat16() if bias else None
    dn = (torch.randn(rank, k, device="cuda") * 0.05).bfloat16() if rank else None
    up = (torch.randn(n, rank, device="cuda") * 0.05).bfloat16() if rank else None
    spec = LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=rank).resolve(k, n)
    mod = PackedLinear.from_float(w, b, dn, up, spec).use_device_layout()
    for m in (1, 37, 300, 4097):
        x = (torch.randn(m, k, device="cuda") * 2).bfloat16()
        with torch.no_grad():
            monkeypatch.delenv("ROBUQ_FP8_FUSED_QUANT", raising=False)
            want = mod(x)
            monkeypatch.setenv("ROBUQ_FP8_FUSED_QUANT", "1")
            got = [mod(x) for _ in range(2)]  # the ordinary call, then what a bound call would run
        for g in got:
            if rank:
                err = (g.float() - want.float()).norm() / want.float().norm()
                assert err <= 5e-3, f"M={m}: {err}"
            else:
                assert (g == want).float().mean() >= 0.999, f"M={m}"
                assert ((g.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all(), f"M={m}"


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("rank", [0, 32])
def test_n_split_changes_nothing_but_the_grid(rank):
    """Splitting N over grid axis 1 (n_split) gives each output tile the same program body: outputs identical for
    one program per row block, the default split, one N tile a program, and a split that does not divide the tiles."""
    from robuq_fx.kernels.quantizer import _hscale
    torch.manual_seed(rank)
    m, k, n = 1000, 1152, 3456
    x = (torch.randn(m, k, device="cuda") * 2).bfloat16()
    w8 = torch.randint(-7, 8, (n, k), device="cuda").bfloat16().to(torch.float8_e4m3fn)
    sw = torch.rand(n, device="cuda") * 0.01
    bias = torch.randn(n, device="cuda").bfloat16()
    dn = (torch.randn(rank, k, device="cuda") * 0.05).bfloat16() if rank else None
    up = (torch.randn(n, rank, device="cuda") * 0.05).bfloat16() if rank else None
    bn = QG.CONFIGS[1 if rank else 0][0]
    n_tiles = -(-n // bn)
    assert QG.n_split(m, n, bn, 132) > 1 and QG.n_split(16384, n, bn, 132) == 1
    outs = []
    for split in (1, None, n_tiles, n_tiles - 1):
        y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        QG.launch_qgemm_fused(x, w8, y, sw, bias, _hscale(128, x.dtype), 7.0, dn, up, split=split)
        outs.append(y)
    assert torch.isfinite(outs[0]).all()
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
