"""robuq_fx.quantize_weights_once_per_step (issue 19): with gradient accumulation Q_w(R) is computed once per
optimizer step, the results are those of the uncached path bit for bit, and every change the cache must see (an
optimizer step, an in-place update, another compute dtype) makes it recompute."""
import copy

import pytest
import torch

import robuq_fx
from robuq_fx import qat_fused, qat_weight_cache

POLICY = {"rules": [{"match": "*", "w_bits": 1.58, "a_bits": 4, "hadamard": True, "hadamard_block": 32,
                     "lora_rank": 4}]}


def _model(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64))
    return robuq_fx.quantize(m, POLICY, example_inputs=(torch.randn(4, 64),))


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = qat_fused.fake_quant_weight_impl
    monkeypatch.setattr(qat_fused, "fake_quant_weight_impl", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _train(model, opt, batches, accum, autocast=False):
    outs = []
    for i, x in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        outs.append(y.detach().clone())
        y.float().pow(2).mean().backward()
        if (i + 1) % accum == 0:
            opt.step()
            opt.zero_grad()
    return outs


@pytest.mark.parametrize("autocast", [False, True])
def test_once_per_step_and_bit_identical(counted, autocast):
    batches = [torch.randn(8, 64) for _ in range(6)]
    a, b = _model(), _model()
    oa, ob = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (a, b))
    ref = _train(a, oa, batches, accum=3, autocast=autocast)
    n_plain = len(counted)
    assert n_plain == 2 * 6  # two layers, six forwards
    handle = robuq_fx.quantize_weights_once_per_step(ob)
    try:
        got = _train(b, ob, batches, accum=3, autocast=autocast)
    finally:
        handle.remove()
    assert len(counted) - n_plain == 2 * 2  # two layers, two optimizer steps
    for r, g in zip(ref, got):
        assert torch.equal(r, g)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_what_makes_it_recompute(counted):
    m = _model()
    x = torch.randn(8, 64)
    other = _model(seed=1)
    want = other(x)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    handle = robuq_fx.quantize_weights_once_per_step(opt)
    counted.clear()
    try:
        m(x)
        n = len(counted)
        m(x)
        assert len(counted) == n  # cached
        m.load_state_dict(copy.deepcopy(other.state_dict()))  # in place: versions move
        y = m(x)
        assert len(counted) == n + 2
        assert torch.equal(y, want)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x)  # another compute dtype
        assert len(counted) == n + 4
        m(x).pow(2).mean().backward()
        n = len(counted)
        opt.step()  # an optimizer step: recomputed on the next forward, even where no version moved
        with torch.no_grad():
            for p in m.parameters():
                p.data.zero_()  # .data writes move no version: only the step can tell
        m(x)
        assert len(counted) == n + 2
    finally:
        handle.remove()
    assert not qat_weight_cache._WQ and qat_weight_cache._STEP["hooks"] == 0
    m(x)
    m(x)
    assert len(counted) == n + 2 + 4  # off again: every forward computes Q_w(R)


def test_bad_optimizer_argument_is_named():
    m = _model()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        robuq_fx.quantize_weights_once_per_step(m)
    assert qat_weight_cache._STEP["hooks"] == 0  # nothing registered
