"""`robuq::qat_act_lrb` (kernels/qat_act.py) traced as AOTAutograd traces it for Inductor, on fake CUDA tensors for
an sm_90 target (no GPU needed where triton imports): the op leaves the graph, its two Triton kernels stay as
functional kernel nodes writing one buffer (no view of it, so no slice_scatter copy). Its backward (torch ops) is
checked by value in test_qat_act_interpreted.py."""
from __future__ import annotations

import re

import pytest
import torch

from tests.kernels.inductor_testing import fake_sm90, kernel_names, triton_imports
from tests.kernels.sm90 import import_or_none


@pytest.mark.skipif(not triton_imports(), reason="triton does not import here")
def test_act_op_traces_to_two_kernels_into_one_buffer(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    from robuq_fx.kernels import qat_act
    from robuq_fx.spec import LayerSpec
    fake_sm90(monkeypatch)
    spec = LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=32).resolve(256, 512)
    qat_act.define()
    with FakeTensorMode():
        x = torch.empty(64, 256, dtype=torch.bfloat16, device="cuda")
        bh = torch.empty(32, 256, dtype=torch.bfloat16, device="cuda")

    def fwd(x, bh):
        return qat_act.act_side(x, bh, spec)
    code = make_fx(dispatch_functionalize(fwd), tracing_mode="fake")(x, bh).code
    assert "qat_act_lrb" not in code and "slice_scatter" not in code and "copy_" not in code, code
    assert kernel_names(code) == {"act_quant_bfly_kernel", "lrb_down_kernel"}, code
    assert code.count("higher_order.triton_kernel_wrapper_functional(") == 2, code
    assert "'T_COL': 256" in code and "'DEQUANT': True" in code, code
    # each kernel clones (functionally) only what it stores to: the buffer and the quantizer's scales; an input in
    # the list (Triton's mutation analysis giving up: every pointer) would be a copy of it a call
    clones = re.findall(r"tensors_to_clone = (\[[^]]*\])", code)
    assert len(clones) == 2 and all(set(eval(c)) <= {"out_ptr", "scale_ptr", "lo_ptr", "t_ptr"} for c in clones), clones
    # a layer without a branch: the quantizer alone
    code = make_fx(dispatch_functionalize(lambda x: qat_act.act_side(x, None, spec)), tracing_mode="fake")(x).code
    assert kernel_names(code) == {"act_quant_bfly_kernel"} and "copy_" not in code, code



@pytest.mark.skipif(not triton_imports(), reason="triton does not import here")
def test_backward_op_traces_to_one_kernel(monkeypatch):
    """`robuq::qat_act_lrb_grad` (g_x = g_q H + g_t (B H)): one functional kernel node writing its output alone."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    from robuq_fx.kernels import qat_act
    fake_sm90(monkeypatch)
    qat_act.define()
    with FakeTensorMode():
        g = torch.empty(64, 256 + 32, dtype=torch.bfloat16, device="cuda")
        bh = torch.empty(32, 256, dtype=torch.bfloat16, device="cuda")
        g0 = torch.empty(64, 256, dtype=torch.bfloat16, device="cuda")
    for args in ((g, bh), (g0, None)):  # with a branch, and without (g H alone: no dot)
        code = make_fx(dispatch_functionalize(lambda g, bh: torch.ops.robuq.qat_act_lrb_grad(g, bh, 128, 256)),
                       tracing_mode="fake")(*args).code
        assert "qat_act_lrb_grad" not in code and kernel_names(code) == {"rot_lowrank_kernel"}, code
        assert re.findall(r"tensors_to_clone = (\[[^]]*\])", code) == ["['out_ptr']"], code
        assert f"'HAS_T': {args[1] is not None}" in code, code


@pytest.mark.skipif(import_or_none("triton_qat_act") is None, reason="triton does not import here")
@pytest.mark.parametrize("block,r", [(128, 32), (64, 8), (0, 32), (128, 0)])
@pytest.mark.parametrize("float_arg", ["fp32", "fp64"])
def test_backward_kernel_builds_for_sm90_without_spills(block, r, float_arg):
    """Offline sm_90 build (ptxas) of the backward kernel at the paper's shapes: it compiles (the interpreter runs
    no layout or dot lowering) and keeps its tiles in registers. hscale fp64: Inductor passes a user kernel's Python
    floats as fp64 (codegen/triton_utils.signature_of), which made the rotated block an fp64 accumulator that
    tl.dot refused in session 22's first DiT-XL/2 compile; the eager launcher passes fp32."""
    from tests.kernels.sm90 import compile_sm90, sass
    from robuq_fx.kernels import triton_qat_act as T
    from robuq_fx.kernels.triton_launch import rank_pad
    w = block or 128
    sig = {"g_ptr": "*bf16", "bh_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "stride_g": "i32",
           "stride_o": "i32", "hscale": float_arg}
    const = dict(K=1152, R=r, RP=rank_pad(r), B=w, LOGB=w.bit_length() - 1, HAD=block > 0, BM=T.BM, HAS_T=r > 0)
    text, regs = sass(compile_sm90(T.rot_lowrank_kernel, sig, const, {"num_warps": T.WARPS},
                                   aligned=("g_ptr", "bh_ptr", "out_ptr"), gluon=False))
    assert "STL" not in text, regs  # no local-memory spills
