"""The activation quantizer with the rotation on tensor cores (kernels/triton_mma_quant.py, ROBUQ_QUANT_KERNEL=mma):
on a GPU its codes and scales equal the Triton quantizer's up to the order of the rotation's fp32 sums (a code may
flip at an exact tie: >= 99.9% equal), padding rows are zeros, and a layer run with it matches its own codes' float64
reference; offline (triton with ptxas, no GPU) it compiles for sm_90 without spills."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.fp8_testing import gpu, rel, within


@gpu
@pytest.mark.parametrize("k", [1152, 4608])
@pytest.mark.parametrize("m", [1, 37, 1000])
def test_codes_equal_the_triton_quantizer(k, m, monkeypatch):
    from robuq_fx.kernels.quantizer import act_quant
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
    m_store = max(16, -(-m // 16) * 16)
    monkeypatch.setenv("ROBUQ_QUANT_KERNEL", "triton")
    q0, s0, _ = act_quant(x, 128, 4, True, m_store=m_store)
    monkeypatch.setenv("ROBUQ_QUANT_KERNEL", "mma")
    q1, s1, _ = act_quant(x, 128, 4, True, m_store=m_store)
    assert (q0[:m].float() == q1[:m].float()).float().mean().item() >= 0.999
    assert torch.allclose(s0[:m], s1[:m], rtol=1e-2, atol=0)
    assert bool((q1[m:].float() == 0).all()) and bool((s1[m:] == 0).all())


@gpu
def test_a_layer_with_it_matches_its_own_codes(monkeypatch):
    from robuq_fx import kernels
    from tests.kernels.test_triton_fp8 import _args, _exact_from_own_codes, _layer
    mod = _layer(1152, 3456, 4, 4, True, 128, 0, seed=3).use_device_layout()
    x = torch.randn(300, 1152, device="cuda", dtype=torch.bfloat16) * 2
    monkeypatch.setenv("ROBUQ_QUANT_KERNEL", "mma")
    with kernels.use("triton_fp8"), torch.no_grad():
        y = mod(x)
        own = _exact_from_own_codes(x, _args(mod), "triton_fp8")  # (its act_quant call takes the mma path too)
    assert rel(y, own) < 6e-3 and within(y, own) >= 0.998


def test_compiles_for_sm90_without_spills():
    pytest.importorskip("triton")
    from tests.kernels.sm90 import compile_sm90, import_or_none, sass
    mq = import_or_none("triton_mma_quant")
    if mq is None:
        pytest.skip("triton_mma_quant does not import here")
    sig = {"x_ptr": "*bf16", "h_ptr": "*bf16", "b_ptr": "*bf16", "sx_ptr": "*fp32", "o_ptr": "*fp8e4nv",
           "w_ptr": "*fp8e4nv", "M": "i32", "M_STORE": "i32", "stride_x": "i32", "stride_o": "i32", "levels": "fp32"}
    for lrb in (True, False):
        ce = dict(K=1152, R=32 if lrb else 0, RP=32 if lrb else 16, W=112 if lrb else 0, WP=16, BM=64, HB=128,
                  HAS_LRB=lrb, ACT=0)
        try:
            k = compile_sm90(mq.stacked_quant_kernel, sig, ce, dict(num_warps=8),
                             aligned=("x_ptr", "h_ptr", "b_ptr", "sx_ptr", "o_ptr", "stride_x", "stride_o"),
                             gluon=False)
        except Exception as e:  # noqa: BLE001 - no ptxas / backend here
            pytest.skip(f"no sm_90 compile here: {type(e).__name__}")
        text, regs = sass(k)
        assert "STL" not in text and regs <= 128, (lrb, regs)  # no spills; two programs an SM fit
        assert "HGMMA" in text  # the rotation on wgmma


def test_the_dispatch_reads_the_table_and_the_environment(monkeypatch):
    """Where the tensor-core quantizer and the fused stacked codes run: ROBUQ_QUANT_KERNEL / ROBUQ_STACKED_QUANT force
    them on or off; unset, the table's per-K / per-shape M buckets ("quant_mma", "stacked_fused") decide."""
    from robuq_fx.kernels import dispatch as D, quantizer as AQ
    table = {"quant_mma": {"1152/h": {"256": True}},
             "shapes": {"3456x1152": {"stacked_fused": {"256": False, "16384": True}}}}
    monkeypatch.setattr(AQ, "dispatch_table", lambda: table)
    monkeypatch.setattr(D, "dispatch_table", lambda: table)
    for var in ("ROBUQ_QUANT_KERNEL", "ROBUQ_STACKED_QUANT"):
        monkeypatch.delenv(var, raising=False)
    x = torch.empty(200, 1152)
    assert AQ._mma_here(x, 128) and not AQ._mma_here(torch.empty(2000, 1152), 128) and not AQ._mma_here(x, 0)
    assert not AQ._mma_here(torch.empty(200, 4608), 128)
    assert D.stacked_fused(10000, 3456, 1152) and not D.stacked_fused(100, 3456, 1152)
    assert not D.stacked_fused(10000, 1152, 1152)
    monkeypatch.setenv("ROBUQ_QUANT_KERNEL", "triton")
    monkeypatch.setenv("ROBUQ_STACKED_QUANT", "two")
    assert not AQ._mma_here(x, 128) and not D.stacked_fused(10000, 3456, 1152)
    monkeypatch.setenv("ROBUQ_QUANT_KERNEL", "mma")
    monkeypatch.setenv("ROBUQ_STACKED_QUANT", "fused")
    assert AQ._mma_here(torch.empty(2000, 4608), 128) and D.stacked_fused(100, 1152, 1152)
