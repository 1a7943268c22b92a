"""Quantization inside the GEMM (robuq_fx/kernels/gluon_qgemm.py, opt-in ROBUQ_FP8_FUSED_QUANT=1).

CPU (where triton imports): the kernel compiles for sm_90 with fp8 wgmma and TMA loads and fits shared memory at
K = 1152; `supported` refuses what it does not take. GPU: a W4A4+H layer with it equals the two-kernel path (the
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
    assert QG.supported(x, 1152, 128, 4, True, "absmax", False) is None
    assert "symmetric absmax" in QG.supported(x, 1152, 128, 4, False, "absmax", False)
    assert "symmetric absmax" in QG.supported(x, 1152, 128, 4, True, "absmax", True)   # LRB
    assert "symmetric absmax" in QG.supported(x, 1152, 0, 4, True, "absmax", False)    # no Hadamard
    assert "up to 1152" in QG.supported(x, 4608, 128, 4, True, "absmax", False)
    assert "activation dtype" in QG.supported(x.float(), 1152, 128, 4, True, "absmax", False)


@pytest.mark.skipif(QG is None, reason="triton with Gluon does not import here")
@pytest.mark.parametrize("k,cfg", [(1152, 0), (1152, 1), (256, 0)])
def test_compiles_for_sm90(k, cfg):
    from triton.experimental.gluon import language as gl
    bn, stages = QG.CONFIGS[cfg]
    lb = gl.NVMMASharedLayout.get_default_for([bn, 128], gl.float8e4nv)
    sig = {"x_ptr": "*bf16", "b_desc": f"tensordesc<fp8e4nv[{bn}, 128],{lb!r}>", "y_ptr": "*bf16",
           "sw_ptr": "*fp32", "bias_ptr": "*bf16", "M": "i32", "N": "i32", "stride_xm": "i32", "stride_ym": "i32",
           "hscale": "fp32", "levels": "fp32"}
    kern = compile_sm90(QG.qgemm_fused_kernel, sig, dict(K=k, HAS_BIAS=True, STAGES=stages, num_warps=8),
                        {"num_warps": 8}, aligned=("x_ptr", "y_ptr", "sw_ptr", "bias_ptr", "stride_xm", "stride_ym"))
    text, _ = sass(kern)
    assert {"QGMMA", "UTMALDG", "SHFL"} <= opcodes(text)
    assert "STL" not in text
    assert kern.metadata.shared <= 227 * 1024, kern.metadata.shared  # Hopper's shared memory per block


cuda = pytest.mark.skipif(not torch.cuda.is_available() or QG is None
                          or torch.cuda.get_device_capability() < (9, 0), reason="needs a Hopper GPU and Gluon")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(1152, 3456), (1152, 1152), (1152, 6912), (256, 208)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_equals_the_two_kernel_path(k, n, bias, monkeypatch):
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    torch.manual_seed(k + n)
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
    b = (torch.randn(n, device="cuda") * 0.1).bfloat16() if bias else None
    spec = LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128).resolve(k, n)
    mod = PackedLinear.from_float(w, b, None, None, spec).use_device_layout()
    for m in (1, 37, 300, 4097):
        x = (torch.randn(m, k, device="cuda") * 2).bfloat16()
        with torch.no_grad():
            monkeypatch.delenv("ROBUQ_FP8_FUSED_QUANT", raising=False)
            want = mod(x)
            monkeypatch.setenv("ROBUQ_FP8_FUSED_QUANT", "1")
            got = [mod(x) for _ in range(2)]  # the ordinary call, then what a bound call would run
        for g in got:
            assert (g == want).float().mean() >= 0.999, f"M={m}"
            assert ((g.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all(), f"M={m}"
