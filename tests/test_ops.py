"""robuq:: custom ops: schema/fake/autograd registration (opcheck) and STE gradients."""
import pytest
import torch

import robuq_fx  # noqa: F401
from robuq_fx import quantizers as Q
from robuq_fx.hadamard import block_hadamard

ops = torch.ops.robuq


@pytest.mark.parametrize("args", [
    lambda: (ops.hadamard.default, (torch.randn(3, 64, requires_grad=True), 32)),
    lambda: (ops.fake_quant_weight.default, (torch.randn(8, 64, requires_grad=True), 1.58, "channel", 0, "float32")),
    lambda: (ops.fake_quant_weight.default, (torch.randn(8, 64, requires_grad=True), 4.0, "channel", 16, "float32")),
    lambda: (ops.fake_quant_act.default, (torch.randn(2, 3, 64, requires_grad=True), 4, True, "absmax")),
    lambda: (ops.fake_quant_act.default, (torch.randn(5, 64, requires_grad=True), 2, False, "sigma")),
])
def test_opcheck(args):
    op, a = args()
    torch.library.opcheck(op, a)


def _qlinear_args(bits=1.58, a_bits=3, sym=True, block=32, lrb=True, bias=True):
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    spec = LayerSpec(w_bits=bits, a_bits=a_bits, a_sym=sym if a_bits > 2 else None, hadamard=block > 0,
                     hadamard_block=block or None, lora_rank=4 if lrb else 0).resolve(64, 24)
    w = torch.randn(24, 64)
    from robuq_fx.layer import lrb_init
    down, up = lrb_init(w, spec) if lrb else (None, None)
    m = PackedLinear.from_float(w, torch.randn(24) if bias else None, down, up, spec)
    return (torch.randn(3, 64), m.qweight, m.w_scale, m.bias, m.lrb_down, m.lrb_up, *m.op_args())


@pytest.mark.parametrize("kw", [{}, {"bits": 4, "a_bits": 2, "lrb": False, "bias": False}, {"block": 0, "bits": 3}])
def test_opcheck_qlinear(kw):
    torch.library.opcheck(ops.qlinear.default, _qlinear_args(**kw))


def test_weight_ste_is_identity():
    w = torch.randn(8, 32, requires_grad=True)
    g = torch.randn(8, 32)
    ops.fake_quant_weight(w, 1.58, "channel", 0, "float32").backward(g)
    assert torch.equal(w.grad, g)


def test_act_ste_masks_outside_range():
    x = torch.randn(4, 1024, requires_grad=True)
    g = torch.ones(4, 1024)
    ops.fake_quant_act(x, 2, False, "sigma").backward(g)
    mask = Q.act_ste_mask(x.detach(), 2, False, "sigma")
    assert torch.equal(x.grad, mask.float())
    assert not mask.all()


def test_hadamard_backward_is_hadamard():
    x = torch.randn(3, 64, requires_grad=True)
    g = torch.randn(3, 64)
    ops.hadamard(x, 16).backward(g)
    assert torch.allclose(x.grad, block_hadamard(g, 16))


def test_linear_backward_uses_quantized_weight():
    """grad_x of linear(x, Q_w(W)) must be g @ Q_w(W), not g @ W."""
    from robuq_fx.layer import qat_forward
    from robuq_fx.spec import LayerSpec
    spec = LayerSpec(w_bits=1.58, a_bits=16, hadamard=False).resolve(32, 8)
    x = torch.randn(2, 32, requires_grad=True)
    w = torch.randn(8, 32, requires_grad=True)
    g = torch.randn(2, 8)
    qat_forward(x, w, None, None, None, spec).backward(g)
    assert torch.allclose(x.grad, g @ Q.fake_quant_weight(w.detach(), 1.58))
    assert not torch.allclose(x.grad, g @ w.detach())
