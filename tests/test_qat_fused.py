"""The fused eager QAT path (robuq_fx/qat_fused.py): one autograd node per QATLinear whose backward is written out.
It must compute exactly what autograd computes through the op graph (ROBUQ_QAT_FUSED=0 / torch.compile's path):
outputs and every gradient equal bit for bit, for fp32 models, bf16 inputs on fp32 masters, and under autocast
(where autocast rounds the rotations and shares its cast of the branch factors), with and without the low-rank
branch, clipped ranges (whose STE mask is not all ones), weight groups, transposed (Conv1D) weights. (Under DDP and
FSDP2, tests/test_distributed.py compares whole training runs against one process.)"""
from __future__ import annotations

import copy

import pytest
import torch

from robuq_fx import qat_linear as QL
from robuq_fx.qat_linear import QATLinear
from robuq_fx.spec import LayerSpec

SPECS = {
    "W4A4+H": dict(w_bits=4, a_bits=4, hadamard=True, hadamard_block=64),
    "W1.58A4+H+LRB": dict(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=64, lora_rank=8),
    "W1.58A3 asym sigma +H+LRB": dict(w_bits=1.58, a_bits=3, a_sym=False, a_clip="sigma", hadamard=True,
                                      hadamard_block=64, lora_rank=8),
    "W2A4 groups": dict(w_bits=2, a_bits=4, group_size=32),
    "W4A16 no bias": dict(w_bits=4, a_bits=16),
}


@pytest.fixture
def fused_switch():
    before = QL._FUSED_OFF[0]

    def use(on: bool):
        QL._FUSED_OFF[0] = not on
    yield use
    QL._FUSED_OFF[0] = before


def _step(mod, x, autocast):
    xx = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = mod(xx)
    (y.float().pow(2).sum() + y.float().sum()).backward()
    return y.detach(), xx.grad, {n: p.grad for n, p in mod.named_parameters()}


def _assert_same(a, b, what):
    assert torch.equal(a[0], b[0]), f"{what}: output"
    assert torch.equal(a[1], b[1]), f"{what}: input gradient"
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), f"{what}: gradient of {k} (max diff {(a[2][k] - b[2][k]).abs().max()})"


@pytest.mark.parametrize("mode", ["fp32", "bf16 input", "autocast"])
@pytest.mark.parametrize("name", list(SPECS))
def test_fused_equals_the_op_graph(name, mode, fused_switch):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias="no bias" not in name)
    mod = QATLinear.from_module(lin, LayerSpec(**SPECS[name]).resolve(128, 96))
    x = torch.randn(3, 17, 128)
    if mode == "bf16 input":
        x = x.bfloat16()
    out = {}
    for on in (True, False):
        fused_switch(on)
        out[on] = _step(copy.deepcopy(mod), x, mode == "autocast")
    _assert_same(out[True], out[False], f"{name}, {mode}")


def test_fused_conv1d_weight_and_2d_input(fused_switch):
    """A transposed (K, N) weight (transformers' Conv1D) gets its gradient through the view; 2-D inputs."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 64)
    spec = LayerSpec(**SPECS["W1.58A4+H+LRB"]).resolve(128, 64)
    mod = QATLinear(torch.nn.Parameter(lin.weight.detach().t().contiguous()), lin.bias, spec, transposed=True)
    x = torch.randn(40, 128)
    out = {}
    for on in (True, False):
        fused_switch(on)
        out[on] = _step(copy.deepcopy(mod), x, False)
    _assert_same(out[True], out[False], "Conv1D")
    assert out[True][2]["weight"].shape == (128, 64)
