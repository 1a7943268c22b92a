"""robuq::qlinear's input_act on the GPU (issue 20's producer fusion): the fp8 path applies the GELU while its
quantizer loads x. Against the unfused layer (torch's GELU, then the same layer) codes may differ only where the
kernel's fp32 GELU and ATen's round to different bf16 neighbours: >= 99% of output rows are equal (a flipped code
moves its whole row), the rest within a code step. Layers that materialize the activation (LRB) are bit-identical.
CPU equality of the reference path: tests/passes/test_act_fuse.py."""
import pytest
import torch
import torch.nn.functional as F

from robuq_fx.modules import PackedLinear
from robuq_fx.spec import LayerSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _layer(k, n, rank=0, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    b = torch.randn(n, device="cuda") * 0.1
    dn = torch.randn(rank, k, device="cuda") * 0.02 if rank else None
    up = torch.randn(n, rank, device="cuda") * 0.02 if rank else None
    spec = LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=rank).resolve(k, n)
    return PackedLinear.from_float(w.bfloat16(), b.bfloat16(), None if dn is None else dn.bfloat16(),
                                   None if up is None else up.bfloat16(), spec).use_device_layout()


@pytest.mark.parametrize("act,approx", [("gelu_tanh", "tanh"), ("gelu", "none")])
@pytest.mark.parametrize("k,n,m", [(4608, 1152, 300), (1152, 1152, 4096), (1152, 4608, 37)])
def test_fused_activation_equals_the_unfused_layer(act, approx, k, n, m):
    layer = _layer(k, n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
    with torch.no_grad():
        want = layer(F.gelu(x, approximate=approx))
        layer.input_act = act
        got = layer(x)
        again = layer(x)  # the bound call
    assert torch.equal(got, again)
    # one flipped activation code changes its whole output row: count rows, not elements
    rows_equal = (got == want).all(dim=1).float().mean().item()
    assert rows_equal >= 0.99, rows_equal
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_branch_layers_materialize_the_activation_bit_for_bit():
    layer = _layer(1152, 1152, rank=16)
    x = torch.randn(512, 1152, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = layer(F.gelu(x, approximate="tanh"))
        layer.input_act = "gelu_tanh"
        assert torch.equal(layer(x), want)
