"""Kernels that torch.compile traces (our triton_ops) must also build with their integer arguments as constants.

Inductor's mutation analysis (`torch._higher_order_ops.triton_kernel_wrap`) builds each traced kernel's TTIR to see
which tensors it writes; torch 2.11's (the GPU machine's) passes the integer arguments as constants, ignoring
do_not_specialize. A kernel that calls a tensor method on such an argument (`(j * M).to(...)`) fails to build there,
and Inductor then assumes it writes every tensor it takes (clones them; session 17's batch-1 census logged it for
`lrb_down_reduce_kernel`). Offline sm_90 builds with M a constexpr, as that analysis makes them (CPU, where triton
imports)."""
from __future__ import annotations

import pytest

from tests.kernels.sm90 import compile_sm90, import_or_none

L = import_or_none("triton_lowrank")


@pytest.mark.skipif(L is None, reason="triton does not import here")
@pytest.mark.parametrize("m", [1, 300])
def test_down_projection_kernels_build_with_m_a_constant(m):
    cases = [
        (L.lrb_down_reduce_kernel, {"p_ptr": "*fp32", "t_ptr": "*bf16", "stride_t": "i32"},
         dict(M=m, R=32, RP=32, SPLIT=4, BM=64)),
        (L.lrb_down_kernel, {"x_ptr": "*bf16", "b_ptr": "*bf16", "t_ptr": "*fp32", "stride_x": "i32",
                             "stride_t": "i32"},
         dict(M=m, K=1152, R=32, RP=32, BM=64, BK=128, ACT=0, SPLIT=4)),
    ]
    for fn, sig, const in cases:
        assert compile_sm90(fn, sig, const, {"num_warps": 4}, gluon=False).asm["cubin"], fn.__name__
