"""The activation op in the per-layer compiled path (ROBUQ_QAT_ACT_KERNEL=1; qat_linear._act_supported,
layer.act_op_linear): where quantize's weight-side hooks do not run (fullgraph=True here, as under CUDA graphs or
DDP), a compiled QAT layer covered by kernels/qat_act.py computes its activation side with that op. On the CPU the op
is stood in for by `qat_act.act_side_reference` (its math in torch ops) and the coverage check is widened; the GPU
test compares the real op with the step path, which has used it since session 22."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import robuq_fx
from robuq_fx import qat_linear
from robuq_fx.kernels import qat_act
from tests.qat_testing import train as _train, train_compiled as _compiled

POLICY = {"rules": [{"match": "*", "w_bits": 1.58, "a_bits": 4, "hadamard": True, "hadamard_block": 64,
                     "lora_rank": 8}]}


def _model():
    torch.manual_seed(0)
    return robuq_fx.quantize(nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)), POLICY).train()


@pytest.fixture
def op_on_cpu(monkeypatch):
    """The op's coverage widened to the CPU, its kernels stood in for by their torch math; calls counted."""
    calls = []
    monkeypatch.setattr(qat_act, "unsupported", lambda spec, k, device, dtype: None)
    monkeypatch.setattr(qat_act, "define", lambda: None)
    monkeypatch.setattr(qat_act, "act_side", lambda x2, bh, spec: calls.append(bh is not None)
                        or qat_act.act_side_reference(x2, bh, spec))
    return calls



def test_requested_compiled_layers_take_the_op_and_train_as_the_op_graph(op_on_cpu, monkeypatch):
    """With the switch at 1 each layer's compiled forward calls the op (with B H: the branch), in one graph
    (fullgraph=True), and two AdamW steps follow the op graph's run: t = x (B H)^T is (x H) B^T summed in another
    order, so outputs and gradients agree to fp32 rounding, not bit for bit."""
    base = _model()
    x = torch.randn(3, 10, 128)
    want = _compiled(copy.deepcopy(base), x, 2, fullgraph=True)
    assert op_on_cpu == []  # the switch unset: the op graph
    monkeypatch.setenv("ROBUQ_QAT_ACT_KERNEL", "1")
    got = _compiled(copy.deepcopy(base), x, 2, fullgraph=True)
    assert op_on_cpu and all(op_on_cpu)  # traced once a layer, each with its branch's B H
    for (ya, ga), (yb, gb) in zip(got, want):
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
        for k in gb:
            torch.testing.assert_close(ga[k], gb[k], rtol=1e-3, atol=1e-5)


def test_uncovered_layers_keep_the_op_graph_with_one_warning(monkeypatch):
    """The real coverage check on the CPU ("not on CUDA"): the switch at 1 changes no number there, and one warning
    per kind of layer says why (the two layers here: in_features 128 and 128, one spec: one warning)."""
    monkeypatch.setenv("ROBUQ_QAT_ACT_KERNEL", "1")
    monkeypatch.setattr(qat_linear, "_ACT_WARNED", set())
    calls = []
    monkeypatch.setattr(qat_act, "act_side", lambda *a: calls.append(1))
    with pytest.warns(RuntimeWarning, match=r"ROBUQ_QAT_ACT_KERNEL=1: .*W1\.58A4 H64 LRB8.*not on CUDA") as rec:
        _compiled(_model(), torch.randn(2, 4, 128), 1, fullgraph=True)
    assert calls == [] and sum("ROBUQ_QAT_ACT_KERNEL" in str(w.message) for w in rec) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_per_layer_op_follows_the_step_path(monkeypatch):
    """Inductor, bf16 autocast: the per-layer path with the op (fullgraph=True: the hooks stay off) against the step
    path with it (quantize's hooks). Both run the same kernels for the activation side; the weight side is Inductor's
    decomposition in one and the weight kernel in the other (both fp32), so outputs agree to bf16 rounding."""
    monkeypatch.setenv("ROBUQ_QAT_ACT_KERNEL", "1")
    calls = []
    real = qat_act.act_side
    monkeypatch.setattr(qat_act, "act_side", lambda *a: calls.append(1) or real(*a))
    base = _model().cuda()
    x = torch.randn(4, 64, 128, device="cuda")
    runs = []
    for fullgraph in (True, False):
        torch._dynamo.reset()
        try:
            mod = copy.deepcopy(base)
            runs.append(_train(mod, x, 2, True, torch.compile(mod, fullgraph=fullgraph)))
        finally:
            torch._dynamo.reset()
        if fullgraph:
            assert calls, "the per-layer path did not take the op"
    for (ya, ga), (yb, gb) in zip(*runs):
        torch.testing.assert_close(ya, yb, rtol=2e-2, atol=2e-2)
        for k in gb:
            torch.testing.assert_close(ga[k], gb[k], rtol=5e-2, atol=1e-3)


def test_a_layer_from_an_older_pickle_keeps_the_op_graph(op_on_cpu, monkeypatch):
    """A QATLinear unpickled from before the switch existed has no `_act` key: it compiles with the op graph, no
    AttributeError."""
    monkeypatch.setenv("ROBUQ_QAT_ACT_KERNEL", "1")
    q = _model()
    for m in q.modules():
        m.__dict__.pop("_act", None)
    _compiled(q, torch.randn(2, 4, 128), 1, fullgraph=True)
    assert op_on_cpu == []


def test_cuda_graph_compiles_take_the_op_unless_switched_off(op_on_cpu, monkeypatch):
    """With the switch unset the per-layer path takes the op only in a compile for CUDA graphs (here Inductor's
    global triton.cudagraphs, which mode="reduce-overhead" sets for its own compile); ROBUQ_QAT_ACT_KERNEL=0 keeps
    the op graph there too. Outside a trace the check answers no."""
    import torch._inductor.config as ic
    from robuq_fx.qat_step_hooks import tracing_for_cudagraphs
    monkeypatch.delenv("ROBUQ_QAT_ACT_KERNEL", raising=False)
    x = torch.randn(2, 4, 128)
    _compiled(_model(), x, 1, fullgraph=True)
    assert op_on_cpu == []  # default mode: the op graph
    with ic.patch({"triton.cudagraphs": True}):
        assert not tracing_for_cudagraphs()
        _compiled(_model(), x, 1, fullgraph=True)
        assert op_on_cpu and all(op_on_cpu)
        op_on_cpu.clear()
        monkeypatch.setenv("ROBUQ_QAT_ACT_KERNEL", "0")
        _compiled(_model(), x, 1, fullgraph=True)
        assert op_on_cpu == []


def test_cuda_graph_default_leaves_uncovered_layers_quietly(monkeypatch):
    """The default under CUDA graphs names no layer it leaves (the real coverage check on the CPU: not on CUDA);
    only ROBUQ_QAT_ACT_KERNEL=1 set explicitly warns (test above)."""
    import warnings
    import torch._inductor.config as ic
    monkeypatch.delenv("ROBUQ_QAT_ACT_KERNEL", raising=False)
    monkeypatch.setattr(qat_linear, "_ACT_WARNED", set())
    with ic.patch({"triton.cudagraphs": True}), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _compiled(_model(), torch.randn(2, 4, 128), 1, fullgraph=True)
    assert not [w for w in rec if "ROBUQ_QAT_ACT_KERNEL" in str(w.message)]
