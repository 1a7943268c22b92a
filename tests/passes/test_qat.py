"""QAT pass on small models: what changes (QATLinear modules; the graph on the whole-graph path), training behaviour,
bad input (the model left untouched)."""
import copy

import pytest
import torch
import torch.nn as nn

import robuq_fx
from models.conftest import op_counts  # tests/ is on sys.path (rootdir-relative packages)
from robuq_fx import CaptureError, PolicyError

ops = torch.ops.robuq


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10))


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


POL_A3 = {"rules": [{"match": "5", "skip": True}, {"type": "Linear", "w_bits": 1.58, "a_bits": 3}]}


def test_linear_modules_become_qat_layers():
    m = mlp()
    q = robuq_fx.quantize(m, POL_A3)
    assert type(q) is nn.Sequential and robuq_fx.robuq_info(q)["form"] == "modules"
    assert [type(c).__name__ for c in q] == ["QATLinear", "ReLU", "Dropout", "QATLinear", "ReLU", "Linear"]
    assert q[0].weight is not m[0].weight and q[0].spec == robuq_fx.LayerSpec(**robuq_fx.robuq_info(q)["layers"]["0"])
    ran = op_counts(q.eval(), torch.randn(2, 64))
    assert ran[ops.fake_quant_weight.default] == 2 and ran[ops.fake_quant_act.default] == 2
    assert ran[ops.hadamard.default] == 4  # x and W of both quantized layers
    assert robuq_fx.robuq_info(q)["layers"].keys() == {"0", "3"}


def test_ops_in_graph_and_code_on_the_whole_graph_path():
    q = robuq_fx.quantize(mlp(), POL_A3, whole_graph=True)
    assert count(q, ops.fake_quant_weight.default) == 2 and count(q, ops.fake_quant_act.default) == 2
    assert count(q, ops.hadamard.default) == 4  # x and W of both quantized layers
    assert "torch.ops.robuq.fake_quant_act" in q.code
    assert robuq_fx.robuq_info(q)["layers"].keys() == {"0", "3"}
    assert robuq_fx.robuq_info(q)["form"] == "graph" and "whole_graph=True" in robuq_fx.robuq_info(q)["why"]


def test_model_untouched_and_state_dict_keys():
    m = mlp()
    before = copy.deepcopy(m.state_dict())
    q = robuq_fx.quantize(m, {"rules": [{"type": "Linear", "w_bits": 4, "a_bits": 4, "lora_rank": 4}]})
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(type(c) in (nn.Linear, nn.ReLU, nn.Dropout) for c in m)
    lrb = {f"{i}.{p}" for i in (0, 3, 5) for p in ("lrb_down", "lrb_up")}
    assert set(q.state_dict()) == set(m.state_dict()) | lrb


def test_train_step_changes_weights_and_lrb():
    q = robuq_fx.quantize(mlp(), {"rules": [{"type": "Linear", "w_bits": 1.58, "a_bits": 4, "lora_rank": 4}]})
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    before = {k: v.detach().clone() for k, v in q.named_parameters()}
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    loss = nn.functional.cross_entropy(q(x), y)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q.parameters())
    opt.step()
    assert all(not torch.equal(before[k], v) for k, v in q.named_parameters())


def test_train_eval_switch_dropout():
    q = robuq_fx.quantize(mlp(), {"rules": [{"type": "Linear", "w_bits": 8, "a_bits": 8}]})
    x = torch.randn(4, 64)
    q.eval()
    assert torch.equal(q(x), q(x))
    q.train()
    torch.manual_seed(1)
    a = q(x)
    torch.manual_seed(2)
    assert not torch.equal(a, q(x))  # dropout is live again


def test_state_dict_round_trip():
    pol = {"rules": [{"type": "Linear", "w_bits": 1.58, "a_bits": 3, "lora_rank": 4}]}
    q = robuq_fx.quantize(mlp(), pol)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fresh = robuq_fx.quantize(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 32), nn.ReLU(),
                                            nn.Linear(32, 10)), pol, init_lrb=False)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(5, 64)
    assert torch.equal(q.eval()(x), fresh.eval()(x))


def test_lrb_initialised_from_svd_of_rotated_weight():
    q = robuq_fx.quantize(mlp(), {"rules": [{"match": "0", "w_bits": 1.58, "a_bits": 4, "lora_rank": 8},
                                            {"match": "*", "skip": True}]})
    lin = q.get_submodule("0")
    wh = robuq_fx.hadamard.block_hadamard(lin.weight.detach(), 64)
    s = torch.linalg.svdvals(wh)
    resid = wh - lin.lrb_up @ lin.lrb_down
    # Eckart-Young: the residual of the best rank-8 approximation has spectral norm sigma_9
    assert torch.linalg.matrix_norm(resid, 2).item() == pytest.approx(s[8].item(), rel=1e-4)


def test_error_ordering_w8a8_vs_w158a2():
    m = mlp().eval()
    x = torch.randn(64, 64)
    ref = m(x)
    err = {}
    for name, pol in {"w8a8": {"w_bits": 8, "a_bits": 8}, "w158a2": {"w_bits": 1.58, "a_bits": 2}}.items():
        q = robuq_fx.quantize(m, {"rules": [{"type": "Linear", **pol}]}).eval()
        err[name] = ((q(x) - ref).norm() / ref.norm()).item()
    assert err["w8a8"] < 0.02  # 8-bit per-channel/per-token: ~0.4% step per layer, three layers
    assert err["w158a2"] > 5 * err["w8a8"]


class Branchy(nn.Module):
    """Shape-dependent Python control flow: symbolic_trace fails, torch.export handles it (as in HF/diffusers)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        if x.shape[-1] > 8:
            h = h * 2
        return self.b(h)


class DataDependent(Branchy):
    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # depends on values: neither symbolic_trace nor torch.export can capture it
            h = h * 2
        return self.b(h)


def test_uncapturable_whole_graph_without_example_inputs_names_the_construct():
    with pytest.raises(CaptureError, match="(?s)symbolic_trace could not trace Branchy.*control flow.*example_inputs"):
        robuq_fx.quantize(Branchy(), whole_graph=True)


def test_uncapturable_whole_graph_with_example_inputs_reports_both_failures():
    m = DataDependent()
    with pytest.raises(CaptureError, match="(?s)symbolic_trace failed.*torch.export.*failed"):
        robuq_fx.quantize(m, example_inputs=(torch.randn(2, 16),), whole_graph=True)


def test_untraceable_models_need_no_capture_on_the_drop_in_path():
    """Control flow symbolic_trace cannot take, even on values (which torch.export cannot take either), is fine
    when only linear modules change: nothing is captured."""
    pol = {"rules": [{"type": "Linear", "w_bits": 8, "a_bits": 8, "hadamard": False}]}
    for m in (Branchy(), DataDependent()):
        q = robuq_fx.quantize(m, pol, example_inputs=(torch.randn(2, 16),))
        assert type(q) is type(m) and robuq_fx.robuq_info(q)["form"] == "modules"
        x = torch.randn(5, 16)
        assert q(x).shape == (5, 4)
        torch.testing.assert_close(q.eval()(x), m(x), rtol=0.05, atol=0.05)


def test_export_fallback_with_example_inputs():
    m = Branchy()
    q = robuq_fx.quantize(m, {"rules": [{"type": "Linear", "w_bits": 8, "a_bits": 8, "hadamard": False}]},
                          example_inputs=(torch.randn(2, 16),), whole_graph=True)
    assert robuq_fx.robuq_info(q)["capture"] == "torch.export"
    assert count(q, ops.fake_quant_weight.default) == 2
    x = torch.randn(5, 16)  # a different batch size than captured
    assert q(x).shape == (5, 4)
    q.train()
    q.eval()


@pytest.mark.parametrize("pol,msg", [
    ({"rules": [{"match": "nothing*", "w_bits": 4}]}, "matches no linear layer"),
    ({"rules": [{"match": "0", "hadamard_block": 128}]}, "layer '0'.*hadamard_block=128 does not divide in_features=64"),
    ({"rules": [{"match": "5", "lora_rank": 11}]}, "layer '5'.*lora_rank=11 exceeds"),
    ({"rules": [{"match": "0", "group_size": 48}]}, "group_size=48 does not divide"),
])
def test_bad_policy_for_model_leaves_model_untouched(pol, msg):
    m = mlp()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(PolicyError, match=msg):
        robuq_fx.quantize(m, pol)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert set(m.state_dict()) == set(before)


def test_quantize_twice_is_an_error():
    for whole_graph in (False, True):
        q = robuq_fx.quantize(mlp(), whole_graph=whole_graph)
        with pytest.raises(PolicyError, match="already quantized"):
            robuq_fx.quantize(q)
