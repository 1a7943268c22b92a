"""Activation fusion (passes/fuse.py): a GELU read only by a quantized layer moves into its robuq::qlinear call."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import robuq_fx
from robuq_fx.kernels import use
from robuq_fx.passes.fuse import fuse_activations

ops = torch.ops.robuq
POLICY = {"rules": [{"type": "Linear", "w_bits": 4, "a_bits": 4, "hadamard": True, "hadamard_block": 32}]}


class FunctionalMLP(nn.Module):
    def __init__(self, approximate="none", share=False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(128, 64)
        self.approximate, self.share = approximate, share

    def forward(self, x):
        h = F.gelu(self.fc1(x), approximate=self.approximate)
        y = self.fc2(h)
        return y + self.fc3(h) if self.share else y  # share: the GELU output has two readers


def _qlinear_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.qlinear.default]


def _gelus(gm):
    return [n for n in gm.graph.nodes if (n.op == "call_function" and "gelu" in str(n.target))
            or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.GELU))]


@pytest.mark.parametrize("model, act", [
    (lambda: nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10)), "gelu"),
    (lambda: nn.Sequential(nn.Linear(64, 128), nn.GELU(approximate="tanh"), nn.Linear(128, 10)), "gelu_tanh"),
    (lambda: FunctionalMLP(), "gelu"),
    (lambda: FunctionalMLP("tanh"), "gelu_tanh"),
])
def test_gelu_fused_into_next_layer_same_output(model, act):
    torch.manual_seed(0)
    q = robuq_fx.quantize(model(), POLICY)
    fused, plain = robuq_fx.lower(q), robuq_fx.lower(q, fuse=False)
    assert not _gelus(fused) and len(_gelus(plain)) == 1
    acts = [n.kwargs.get("act", "none") for n in _qlinear_nodes(fused)]
    assert acts == ["none", act]
    x = torch.randn(4, 9, 64)
    assert torch.equal(fused(x), plain(x))  # the reference kernel applies F.gelu itself: bit-identical


def test_gelu_with_two_readers_is_not_fused():
    q = robuq_fx.quantize(FunctionalMLP(share=True), POLICY)
    low = robuq_fx.lower(q)
    assert len(_gelus(low)) == 1
    assert all(n.kwargs.get("act", "none") == "none" for n in _qlinear_nodes(low))
    x = torch.randn(3, 64)
    assert torch.equal(low(x), robuq_fx.lower(q, fuse=False)(x))


def test_aten_gelu_of_exported_graphs_is_fused():
    """torch.export graphs carry aten.gelu.default(x, approximate=...): swap the module call for it and fuse."""
    q = robuq_fx.quantize(nn.Sequential(nn.Linear(64, 128), nn.GELU(approximate="tanh"), nn.Linear(128, 10)), POLICY)
    low = robuq_fx.lower(q, fuse=False)
    x = torch.randn(5, 64)
    ref = low(x)
    (g,) = _gelus(low)
    with low.graph.inserting_before(g):
        a = low.graph.call_function(torch.ops.aten.gelu.default, (g.args[0],), {"approximate": "tanh"})
    g.replace_all_uses_with(a)
    low.graph.erase_node(g)
    low.recompile()
    assert fuse_activations(low) == 1
    assert [n.kwargs.get("act", "none") for n in _qlinear_nodes(low)] == ["none", "gelu_tanh"]
    assert torch.equal(low(x), ref)
    assert fuse_activations(low) == 0  # idempotent


def test_checkpoint_round_trip_keeps_fusion(tmp_path):
    q = robuq_fx.quantize(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10)), POLICY)
    low = robuq_fx.lower(q)
    robuq_fx.save_quantized(low, tmp_path / "m.safetensors")
    back = robuq_fx.load_quantized(tmp_path / "m.safetensors",
                                   nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10)))
    x = torch.randn(2, 64)
    assert torch.equal(back(x), low(x))
    assert [n.kwargs.get("act", "none") for n in _qlinear_nodes(back)] == ["none", "gelu"]


def test_op_act_argument():
    low = robuq_fx.lower(robuq_fx.quantize(nn.Linear(64, 32), POLICY))
    (node,) = _qlinear_nodes(low)
    p = low.get_submodule(node.args[1].target.rsplit(".", 1)[0])
    x = torch.randn(3, 64)
    for act, approx in (("gelu", "none"), ("gelu_tanh", "tanh")):
        with use("reference"):
            y = ops.qlinear(x, p.qweight, p.w_scale, p.bias, p.lrb_down, p.lrb_up, *p.op_args(), act=act)
        assert torch.equal(y, p(F.gelu(x, approximate=approx)))
    with pytest.raises(ValueError, match="act='relu'"):
        ops.qlinear(x, p.qweight, p.w_scale, p.bias, p.lrb_down, p.lrb_up, *p.op_args(), act="relu")
