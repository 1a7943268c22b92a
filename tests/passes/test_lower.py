"""Lowering on small models: bit-identical to the QAT eval output, packed weights, FP weights dropped, bad input."""
import itertools

import pytest
import torch
import torch.nn as nn

import robuq_fx
from models.conftest import op_counts  # tests/ is on sys.path (rootdir-relative packages)
from robuq_fx import LoweringError, PackedLinear

ops = torch.ops.robuq


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 10, bias=False))


SPECS = [dict(w_bits=w, a_bits=a, hadamard=h, lora_rank=r)
         for (w, a), h, r in itertools.product([(1.58, 1), (1.58, 2), (1.58, 3), (2, 2), (3, 3), (4, 4), (8, 8), (4, 16)],
                                               [True, False], [0, 4])]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "W{w_bits}A{a_bits}-H{hadamard}-r{lora_rank}".format(**s))
def test_lowered_bit_identical_to_qat_eval(spec):
    q = robuq_fx.quantize(mlp(), {"rules": [{"type": "Linear", **spec}]})
    with torch.no_grad():  # move away from the SVD init so the LRB really is a trained parameter
        for n, p in q.named_parameters():
            p.add_(0.01 * torch.randn_like(p))
    low = robuq_fx.lower(q)
    x = torch.randn(3, 7, 64)
    assert torch.equal(low(x), q.eval()(x))


@pytest.mark.parametrize("extra", [{"a_clip": "sigma", "a_bits": 2}, {"a_sym": False, "a_bits": 4},
                                   {"w_granularity": "tensor"}, {"group_size": 32}, {"scale_dtype": "bfloat16"},
                                   {"scale_dtype": "float16", "w_bits": 1.58}])
def test_quantizer_options_lower_bit_identical(extra):
    spec = {"w_bits": 4, "a_bits": 4, "lora_rank": 2, **extra}
    q = robuq_fx.quantize(mlp(), {"rules": [{"type": "Linear", **spec}]})
    low = robuq_fx.lower(q)
    x = torch.randn(5, 64)
    assert torch.equal(low(x), q.eval()(x))


POL_A3 = {"rules": [{"match": "4", "skip": True}, {"type": "Linear", "w_bits": 1.58, "a_bits": 3, "lora_rank": 4}]}


def test_lowered_runs_qlinear_only_and_fp_weights_dropped():
    low = robuq_fx.lower(robuq_fx.quantize(mlp(), POL_A3))
    assert type(low) is nn.Sequential  # the user's model: two linears swapped for PackedLinear, the rest as it was
    assert [type(m) for m in low] == [PackedLinear, nn.GELU, PackedLinear, nn.ReLU, nn.Linear]
    ran = op_counts(low, torch.randn(2, 64))
    assert ran[ops.qlinear.default] == 2
    assert not any(t in ran for t in (ops.fake_quant_act.default, ops.fake_quant_weight.default, ops.hadamard.default))
    sd = low.state_dict()
    assert "0.weight" not in sd and "2.weight" not in sd and "4.weight" in sd
    assert sd["0.qweight"].dtype == torch.uint8 and sd["0.qweight"].numel() == (96 * 64 + 4) // 5
    assert robuq_fx.robuq_info(low)["stage"] == "lowered"


def test_whole_graph_holds_qlinear_only():
    low = robuq_fx.lower(robuq_fx.quantize(mlp(), POL_A3, whole_graph=True))
    targets = [n.target for n in low.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.qlinear.default) == 2
    assert not any(t in (ops.fake_quant_act.default, ops.fake_quant_weight.default, ops.hadamard.default) for t in targets)
    assert isinstance(low.get_submodule("0"), PackedLinear) and "4.weight" in low.state_dict()
    assert "robuq.qlinear" in low.code


def test_lower_does_not_modify_qat_model():
    q = robuq_fx.quantize(mlp())
    keys = set(q.state_dict())
    robuq_fx.lower(q)
    assert set(q.state_dict()) == keys and robuq_fx.robuq_info(q)["stage"] == "qat"


def test_size_goals():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(1152, 1152), nn.ReLU(), nn.Linear(1152, 1152))
    for bits, goal in [(4, 0.27), (1.58, 0.11)]:
        low = robuq_fx.lower(robuq_fx.quantize(m, {"rules": [{"type": "Linear", "w_bits": bits, "a_bits": 4}]}))
        total = robuq_fx.size_table(low, print_table=False)[-1]
        assert total["codes/bf16"] <= goal, total


def test_lower_errors():
    with pytest.raises(LoweringError, match="no robuq nodes"):
        robuq_fx.lower(mlp())
    with pytest.raises(LoweringError, match="no robuq nodes"):
        robuq_fx.lower(torch.fx.symbolic_trace(mlp()))
    for whole_graph in (False, True):
        low = robuq_fx.lower(robuq_fx.quantize(mlp(), whole_graph=whole_graph))
        with pytest.raises(LoweringError, match="already lowered"):
            robuq_fx.lower(low)


def test_lowered_compiles():
    pytest.importorskip("torch._inductor")
    low = robuq_fx.lower(robuq_fx.quantize(mlp(), {"rules": [{"type": "Linear", "w_bits": 1.58, "a_bits": 4}]}))
    x = torch.randn(4, 64)
    ref = low(x)
    out = torch.compile(low, backend="aot_eager")(x)  # the custom op stays opaque: same kernel, same bits
    assert torch.equal(out, ref)


def test_back_to_back_quantized_linears():
    """Lowering the first layer replaces the node the second one reads: the rewrite must follow it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 8))
    q = robuq_fx.quantize(m, {"rules": [{"type": "Linear", "w_bits": 1.58, "a_bits": 4, "lora_rank": 2}]})
    low = robuq_fx.lower(q)
    x = torch.randn(3, 64)
    assert torch.equal(low(x), q.eval()(x))


def test_ops_return_contiguous_like_their_fakes():
    x = torch.randn(2, 8, 4, 64).transpose(1, 2)  # a permuted input, as attention's q/k/v often are
    for out in (ops.hadamard(x, 16), ops.fake_quant_act(x, 8, True, "absmax"), ops.fake_quant_act(x, 16, True, "absmax")):
        assert out.is_contiguous()
    torch.library.opcheck(ops.fake_quant_act.default, (x, 8, True, "absmax"))
