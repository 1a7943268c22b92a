"""Shared by test_inductor.py (compiled on the GPU) and test_inductor_traced.py (traced on fake CUDA tensors, no GPU
needed): the fixtures that switch the decompositions on and Inductor's caches off, the fake sm_90 machine, fake
qlinear arguments and the names of the Triton kernels a functionalized trace launches."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from robuq_fx import packing
from robuq_fx.kernels import inductor, registry, triton_fp8


@pytest.fixture(autouse=True)
def no_compile_caches():
    """Compile from scratch: Inductor's and AOTAutograd's caches key on the Dynamo graph, which is the same with and
    without our decompositions (they happen inside AOTAutograd), so a warm cache would answer for the other case."""
    import torch._inductor.config as ic
    with ic.patch(force_disable_caches=True):
        yield


@pytest.fixture
def all_ops(monkeypatch):
    """Decompose qlinear and attention8 (ROBUQ_INDUCTOR_DECOMPOSE=1; the default leaves attention8 opaque)."""
    monkeypatch.setenv("ROBUQ_INDUCTOR_DECOMPOSE", "1")


def triton_imports() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def kernel_names(code: str) -> set:
    """The Triton kernels a functionalized trace launches (its wrapper nodes name them by side-table index)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    names = set()
    for i in set(re.findall(r"kernel_idx = (\d+)", code)):
        k = kernel_side_table.get_kernel(int(i))
        names.add(getattr(getattr(k, "fn", k), "__name__", str(k)))
    return names


def fake_sm90(monkeypatch):
    """Trace our kernels for an sm_90 target with or without a GPU: the TTIR analysis asks the active driver for its
    target and the dispatch asks the device, which a CPU machine cannot answer; the fp8 kernel's machine check."""
    import triton
    from triton.backends.compiler import GPUTarget
    if packing.FP8 is None:
        pytest.skip("no float8 dtype in this torch")

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
    if not torch.cuda.is_available():
        monkeypatch.setattr(triton.runtime.driver, "_active", Sm90())
        from robuq_fx.kernels import fp8_gemms
        for mod in (triton_fp8, fp8_gemms):
            monkeypatch.setattr(mod, "_capability", lambda index: (9, 0))
        monkeypatch.setattr(fp8_gemms, "_sms", lambda index: 132)
    k8 = registry._KERNELS["triton_fp8"]
    monkeypatch.setitem(registry._KERNELS, "triton_fp8", dataclasses.replace(k8, machine_check=lambda: None))
    inductor.register()


def fake_w158_lrb_inputs(extended_cols: int = 0, colsum: bool = False) -> tuple:
    """Fake CUDA arguments of a 256 -> 512 W1.58A4+H+LRB32 qlinear call: x (8, 256), qweight (512, 256) fp8,
    w_scale, bias, lrb_down, lrb_up; with extended_cols, also a (512, extended_cols) fp8 weight made in the same
    fake mode (make_fx takes inputs of one mode only); with colsum, also the (512,) fp32 column sums."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out = (torch.empty(8, 256, dtype=torch.bfloat16, device="cuda"),
               torch.empty(512, 256, dtype=packing.FP8, device="cuda"),
               torch.empty(512, 1, dtype=torch.float32, device="cuda"),
               torch.empty(512, dtype=torch.bfloat16, device="cuda"),
               torch.empty(32, 256, dtype=torch.bfloat16, device="cuda"),
               torch.empty(512, 32, dtype=torch.bfloat16, device="cuda"))
        if extended_cols:
            out += (torch.empty(512, extended_cols, dtype=packing.FP8, device="cuda"),)
        if colsum:
            out += (torch.empty(512, dtype=torch.float32, device="cuda"),)
    return out
