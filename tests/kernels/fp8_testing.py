"""What the GPU tests of the fp8 / dequant CUDA path share (tests/kernels/test_triton_fp8.py, test_act_quant_kernel.py,
test_fp8_gemm_kernels.py): the DiT-XL/2 shapes, odd M, the skip marker, exact reference matmuls, the error measure."""
from __future__ import annotations

import pytest
import torch

from robuq_fx.kernels import triton_fp8

SHAPES = [(1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152), (1152, 6912)]  # DiT-XL/2 (K, N)
ODD_M = [1, 7, 255, 1000]

_why = triton_fp8.fp8_machine_check() if torch.cuda.is_available() else "no CUDA device"
gpu = pytest.mark.skipif(_why is not None, reason=f"fp8 CUDA path unavailable: {_why}")


@pytest.fixture(autouse=True)
def exact_reference_matmuls():
    """cuBLAS may reduce bf16 GEMMs in reduced precision by default; the references' Hadamard (a bf16 matmul) then
    differs from the exactly rounded rotation by more than an ulp and flips ~1% of the codes. Make the GPU
    references accumulate in fp32 like the CPU reference does. (Autouse in each file that imports it.)"""
    if not torch.cuda.is_available():
        yield
        return
    m = torch.backends.cuda.matmul
    old = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    m.allow_bf16_reduced_precision_reduction = m.allow_fp16_reduced_precision_reduction = False
    yield
    m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = old


def rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def within(y, ref) -> float:
    """The fraction of y's elements within 1e-2 |ref| + 1e-2 rms(ref) of ref (the fp8 layer tests' elementwise
    bound)."""
    r = ref.double()
    tol = 1e-2 * r.abs() + 1e-2 * r.pow(2).mean().sqrt()
    return ((y.double() - r).abs() <= tol).double().mean().item()
