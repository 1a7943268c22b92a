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
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = mod(xx)
    (y.float().pow(2).sum() + y.float().sum()).backward()
    return y.detach(), xx.grad, {n: p.grad for n, p in mod.named_parameters()}


def _assert_same(a, b, what):
    assert torch.equal(a[0], b[0]), f"{what}: output"
    assert torch.equal(a[1], b[1]), f"{what}: input gradient"
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), f"{what}: gradient of {k} (max diff {(a[2][k] - b[2][k]).abs().max()})"


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["fp32", "bf16 input", "autocast"])
@pytest.mark.parametrize("name", list(SPECS))
def test_fused_equals_the_op_graph(name, mode, device, fused_switch):
    """On CUDA both paths run the same kernels (cuBLAS for the rotations, the Triton row kernel for Q_a, the Triton
    Q_w kernel: ops.fake_quant_weight_impl)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias="no bias" not in name)
    mod = QATLinear.from_module(lin, LayerSpec(**SPECS[name]).resolve(128, 96)).to(device)
    x = torch.randn(3, 17, 128, device=device)
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


@pytest.mark.parametrize("autocast", [False, True])
def test_whole_tiny_dit_step_equals_the_op_graph(autocast, fused_switch, monkeypatch):
    """A QAT training step of the tiny DiT with the paper's policy (W1.58A4 + Hadamard + LRB, 8-bit attention on
    the region path): loss and every parameter's gradient equal with and without the fused layers."""
    import robuq_fx
    import robuq_fx.models as M
    pytest.importorskip("diffusers")
    model = M.build("dit-tiny")
    inputs = M.example_inputs("dit-tiny", batch=2)
    q = robuq_fx.quantize(model, "dit-xl-2-robuq", example_inputs=inputs).train()
    from robuq_fx import qat_fused
    calls = []
    apply = qat_fused.QATLinearFunction.apply
    monkeypatch.setattr(qat_fused.QATLinearFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    out = {}
    for on in (True, False):
        fused_switch(on)
        m = copy.deepcopy(q)
        torch.manual_seed(0)  # train mode draws (the class-label dropout): the same draws for both
        kw = inputs if isinstance(inputs, dict) else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(**kw) if kw is not None else m(*inputs)
        y = y[0] if isinstance(y, (tuple, list)) else getattr(y, "sample", y)
        loss = y.float().pow(2).mean()
        loss.backward()
        out[on] = (loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    n_layers = sum(isinstance(mod, QATLinear) for mod in q.modules())
    assert n_layers > 4 and len(calls) == n_layers  # every QAT layer ran fused once (and none in the op-graph run)
    assert torch.equal(out[True][0], out[False][0])
    assert out[True][1].keys() == out[False][1].keys() and len(out[True][1]) > 10
    for k in out[True][1]:
        assert torch.equal(out[True][1][k], out[False][1][k]), k


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with fp8 (sm_89+)")
@pytest.mark.parametrize("rank", [0, 8])
def test_fp8_forward_gemm_matches_the_bf16_path(rank, monkeypatch):
    """ROBUQ_QAT_FP8=1 (issue 19): the forward product on fp8 tensor cores is the exact product of the fake-quant
    values (the bf16 path multiplies their bf16 roundings), the backward reads the same Q_w(R) and Q_a(x H): outputs
    within bf16 rounding, gradients close (the LRB factors' gradients are differences of near-equal terms, hence the
    looser bound). Also checks that the fp8 path ran."""
    from robuq_fx import qat_fused
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128)
    mod = QATLinear.from_module(lin, LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128,
                                               lora_rank=rank).resolve(256, 128)).cuda()
    x = torch.randn(4, 33, 256, device="cuda")
    ran = []
    real = qat_fused._fp8_forward
    monkeypatch.setattr(qat_fused, "_fp8_forward", lambda *a: ran.append(1) or real(*a))
    out = {}
    for on in (True, False):
        monkeypatch.setattr(qat_fused, "_QAT_FP8", [on])
        out[on] = _step(copy.deepcopy(mod), x, True)
    assert ran, "the fp8 forward did not run"
    (y1, gx1, g1), (y0, gx0, g0) = out[True], out[False]
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()  # noqa: E731
    assert rel(y1, y0) < 1e-2 and rel(gx1, gx0) < 2e-2
    for k in g0:
        assert rel(g1[k], g0[k]) < (1e-1 if k.startswith("lrb") else 2e-2), k
