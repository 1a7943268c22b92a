"""Seed-compatible API: replace_linear_layer / RobuQLinear / prepare_for_inference, on the shared math."""
import pytest
import torch
import torch.nn as nn

import robuq_fx
from robuq_fx import CheckpointError, RobuQLinear, replace_linear_layer
from robuq_fx.quant.replace import replace_linear_layer as ported


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def build(w_bits=1.58, nbits=3, lora=True, seed=0):
    torch.manual_seed(seed)
    m = MLP()
    m.fc1 = replace_linear_layer(m.fc1, nbits=nbits, w_bits=w_bits, if_hadamard=True, if_lora=lora)
    m.fc2 = replace_linear_layer(m.fc2, nbits=nbits, w_bits=w_bits, if_hadamard=True, if_lora=lora)
    return m


def test_import_path_and_types():
    assert ported is replace_linear_layer
    m = build()
    assert isinstance(m.fc1, RobuQLinear) and m.fc1.spec.w_bits == 1.58 and m.fc1.spec.a_bits == 3
    assert m.fc1.spec.lora_rank == 32 and m.fc1.spec.hadamard_block == 64


def test_matches_fx_quantize_exactly():
    torch.manual_seed(0)
    fp = MLP()
    pol = {"rules": [{"match": "fc[12]", "w_bits": 1.58, "a_bits": 3, "hadamard": True, "lora_rank": 32},
                     {"match": "*", "skip": True}]}
    q = robuq_fx.quantize(fp, pol).eval()
    seed = build()
    seed.load_state_dict(fp.state_dict(), strict=False)  # same FP weights; LRB from the same SVD init
    for n in ("fc1", "fc2"):
        assert torch.equal(getattr(seed, n).lrb_down, q.get_submodule(n).lrb_down)
    x = torch.randn(4, 64)
    assert torch.equal(seed.eval()(x), q(x))


def test_training_then_prepare_bit_identical_and_idempotent():
    m = build()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(3):
        loss = m(torch.randn(8, 64)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.fc1.lrb_down.grad is not None
    x = torch.randn(5, 64)
    m.eval()
    with torch.no_grad():
        ref = m(x)
        for mod in m.modules():
            if isinstance(mod, RobuQLinear):
                mod.prepare_for_inference()
                mod.prepare_for_inference()  # idempotent
        out = m(x)
    assert torch.equal(out, ref)
    assert m.fc1.weight is None and "fc1.packed.qweight" in m.state_dict()
    m.train()
    with pytest.raises(RuntimeError, match="prepared for inference"):
        m(x)


def test_state_dict_reload_and_spec_mismatch():
    a = build(w_bits=4, nbits=4)
    b = build(w_bits=4, nbits=4, seed=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(a.eval()(x), b.eval()(x))
    c = build(w_bits=2, nbits=4, seed=2)
    with pytest.raises(CheckpointError, match="W4A4.*W2A4"):
        c.load_state_dict(a.state_dict())


def test_replace_whole_module_and_errors():
    m = replace_linear_layer(MLP(), nbits=4, w_bits=4)
    assert all(isinstance(getattr(m, n), RobuQLinear) for n in ("fc1", "fc2", "fc3"))
    with pytest.raises(TypeError, match="already replaced"):
        replace_linear_layer(m.fc1)
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        replace_linear_layer(nn.ReLU())
    keep = MLP()
    with pytest.raises(robuq_fx.SpecError, match="w_bits=5"):
        replace_linear_layer(keep, nbits=4, w_bits=5)
    assert all(type(getattr(keep, n)) is nn.Linear for n in ("fc1", "fc2", "fc3"))


def test_packed_state_dict_loads_strictly_into_fresh_replacement():
    a = build()
    for mod in a.modules():
        if isinstance(mod, RobuQLinear):
            mod.prepare_for_inference()
    b = build(seed=5)
    b.load_state_dict(a.state_dict())  # strict: packed.* keys line up because b packs first
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_seed_lrb_rank_leaves_something_to_quantize():
    small = replace_linear_layer(nn.Linear(256, 10), nbits=3, w_bits=1.58, if_lora=True)
    assert small.spec.lora_rank == 5
