"""Q_w(R) replayed from a CUDA graph per layer (robuq_fx/qat_graph.py, ROBUQ_QAT_WEIGHT_GRAPH=1).

CPU: the bookkeeping, with a stand-in backend whose "graph" re-runs the captured function (as a replay re-runs its
kernels on the captured addresses): the first call computes eagerly and captures, later calls replay and return a
copy of the shared per-shape buffer; in-place updates of the masters (an optimizer step) show in the next replay;
masters that moved are recaptured, and after MAX_CAPTURES moves, or a failed capture, the layer computes eagerly
with one warning; a fused QAT training step through the graph path equals the plain fused path bit for bit.
GPU: the same steps with real CUDA graphs under bf16 autocast, paper-style layers (W1.58A4+H+LRB), several
optimizer steps: outputs and every gradient equal to the eager computation bit for bit.
"""
from __future__ import annotations

import copy

import pytest
import torch

from robuq_fx import qat_fused, qat_graph
from robuq_fx.qat_linear import QATLinear
from robuq_fx.spec import LayerSpec
from tests.qat_testing import Replays
from tests.qat_testing import train as _train

SPEC = dict(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=64, lora_rank=8)


@pytest.fixture
def stand_in(monkeypatch):
    qat_graph.clear()
    be = Replays()
    monkeypatch.setattr(qat_graph, "_BACKEND", [be])
    yield be
    qat_graph.clear()


def _layer(seed=0, n=96, k=128):
    torch.manual_seed(seed)
    return QATLinear.from_module(torch.nn.Linear(k, n), LayerSpec(**SPEC).resolve(k, n))


def _wq(m, graphed=True):
    args = (m.weight, m.lrb_down, m.lrb_up, m.spec, torch.float32)
    if graphed:
        return qat_graph.graphed_weight(m.weight, qat_fused._quantized_weight, args)
    return qat_fused._quantized_weight(*args)


def test_capture_once_then_replay_a_copy(stand_in):
    a, b = _layer(0), _layer(1)
    first = _wq(a)
    assert stand_in.captures == 1 and stand_in.replays == 0
    assert torch.equal(first[0], _wq(a, graphed=False)[0]) and first[1] == torch.float32
    again = _wq(a)
    assert stand_in.replays == 1 and torch.equal(again[0], first[0])
    buf = qat_graph._STATIC[("forward weight side.out0", a.weight.device, tuple(first[0].shape),
                             tuple(first[0].stride()), first[0].dtype)]
    assert again[0].data_ptr() != buf.data_ptr()  # a copy: what autograd saves is the call's own
    _wq(b)
    other = _wq(b)  # same shape: b's replay rewrites the shared buffer ...
    assert len(qat_graph._STATIC) == 1 and stand_in.captures == 2
    assert torch.equal(again[0], first[0]) and not torch.equal(other[0], again[0])  # ... not a's copy


def test_in_place_updates_show_and_moved_masters_are_recaptured(stand_in):
    m = _layer(2)
    _wq(m)
    with torch.no_grad():
        m.weight.mul_(1.5).add_(0.01)  # an optimizer step: same storage
        m.lrb_up.mul_(0.5)
    got = _wq(m)
    assert stand_in.captures == 1 and stand_in.replays == 1
    assert torch.equal(got[0], _wq(m, graphed=False)[0])
    old = []  # the moved-from storages kept alive: a freed address reused by the allocator would match a kept graph
    for moves in range(1, qat_graph.MAX_CAPTURES):
        old.append(m.weight.data)
        m.weight.data = m.weight.data.clone()  # new storage: the old graph would read freed memory
        assert torch.equal(_wq(m)[0], _wq(m, graphed=False)[0])
        assert stand_in.captures == 1 + moves
    old.append(m.weight.data)
    m.weight.data = m.weight.data.clone()
    assert len(qat_graph._FORWARD[m.weight].graphs) == qat_graph.MAX_KEYS  # the oldest dropped
    with pytest.warns(RuntimeWarning, match=f"captured {qat_graph.MAX_CAPTURES} times"):
        got = _wq(m)
    assert torch.equal(got[0], _wq(m, graphed=False)[0])
    n = stand_in.replays
    _wq(m)
    assert stand_in.replays == n and qat_graph._FORWARD[m.weight].off  # eager from now on


def test_a_failed_capture_falls_back(monkeypatch):
    qat_graph.clear()
    monkeypatch.setattr(qat_graph, "_BACKEND", [Replays(fail=True)])
    m = _layer(3)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        got = _wq(m)
    assert torch.equal(got[0], _wq(m, graphed=False)[0])
    assert torch.equal(_wq(m)[0], got[0])
    qat_graph.clear()


def test_a_capture_that_broke_the_generator_raises_a_clear_error(monkeypatch):
    qat_graph.clear()
    monkeypatch.setattr(qat_graph, "_BACKEND", [Replays(fail=True)])
    monkeypatch.setattr(qat_graph, "generator_usable", lambda device: False)
    m = _layer(3)
    with pytest.raises(RuntimeError, match="ROBUQ_QAT_WEIGHT_GRAPH=0"):
        _wq(m)
    qat_graph.clear()


def test_backward_weight_side_replays_with_its_inputs_copied_in(stand_in):
    """graphed_grads: g_wide and p_down (the activation-dependent inputs) are copied into the buffers the graph
    reads on every call; what it returns are copies, not the shared output buffers."""
    a, b = _layer(5), _layer(6)
    k, r = a.in_features, a.spec.lora_rank
    args = lambda m: (m.lrb_down, m.lrb_up, m.spec, k, torch.float32, torch.float32, torch.float32, False, True)
    calls = []
    for m, seed in ((a, 0), (a, 1), (b, 2), (a, 3)):
        g = torch.Generator().manual_seed(seed)
        g_wide = torch.randn(a.out_features, k + r, generator=g)
        p_down = torch.randn(r, k, generator=g)
        want = qat_fused._weight_grads(g_wide, p_down, *args(m))
        got = qat_graph.graphed_grads(m.weight, qat_fused._weight_grads, (g_wide, p_down), args(m))
        assert all(torch.equal(u, v) for u, v in zip(got, want)), seed
        calls.append(got)
    assert stand_in.captures == 2 and stand_in.replays == 2
    statics = {t.data_ptr() for t in qat_graph._STATIC.values()}
    assert not statics & {t.data_ptr() for got in calls for t in got}
    assert torch.equal(calls[1][0], qat_fused._weight_grads(*_inputs(a, k, r, 1), *args(a))[0])  # not overwritten


def _inputs(m, k, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m.out_features, k + r, generator=g), torch.randn(r, k, generator=g)


# the paper's linear, a sigma-clipped asymmetric one (its backward reads x H for the mask), one without a branch
SPECS = [SPEC, dict(w_bits=2, a_bits=3, a_sym=False, a_clip="sigma", hadamard=True, hadamard_block=64, lora_rank=8),
         dict(w_bits=4, a_bits=4, hadamard=True, hadamard_block=64)]


def _model(device, specs=(SPEC, SPEC, SPEC)):
    torch.manual_seed(4)
    layers = [QATLinear.from_module(torch.nn.Linear(128, 128), LayerSpec(**sp).resolve(128, 128)) for sp in specs]
    return torch.nn.Sequential(layers[0], torch.nn.GELU(), layers[1], torch.nn.GELU(), layers[2]).to(device)


def _compare(a, b):
    for i, ((ya, ga), (yb, gb)) in enumerate(zip(a, b)):
        assert torch.equal(ya, yb), f"step {i}: output"
        for k in ga:
            assert torch.equal(ga[k], gb[k]), f"step {i}: gradient of {k}"


@pytest.mark.parametrize("autocast", [False, True])
def test_training_through_the_graph_path_equals_the_fused_path(stand_in, monkeypatch, autocast):
    """The wiring (qat_fused.quantized_weight) with the stand-in: three optimizer steps, every output and gradient
    equal; the three layers captured once each (their masters updated in place between steps)."""
    base = _model("cpu")
    x = torch.randn(4, 9, 128)
    want = _train(copy.deepcopy(base), x, 3, autocast)
    monkeypatch.setattr(qat_graph, "usable", lambda w: True)
    got = _train(copy.deepcopy(base), x, 3, autocast)
    _compare(got, want)
    assert stand_in.captures == 6 and stand_in.replays == 12  # Q_w(R) and the backward's weight side, 3 layers


@pytest.mark.parametrize("autocast", [False, True])
def test_training_through_whole_layer_graphs_equals_the_fused_path(stand_in, monkeypatch, autocast):
    """ROBUQ_QAT_LAYER_GRAPH: each layer's whole forward (x copied in) and backward (g and the saved tensors copied
    in) from the stand-in's graphs, batches of two shapes in turn: every output and gradient equal over 5 steps; a
    layer's forward and backward captured once a shape (2 kinds x 2 shapes x 3 layers), replayed after."""
    base = _model("cpu", SPECS)
    xs = [torch.randn(4, 9, 128), torch.randn(3, 5, 128)]
    want = _train(copy.deepcopy(base), xs, 5, autocast)
    monkeypatch.setattr(qat_graph, "usable", lambda w: True)
    monkeypatch.setattr(qat_graph, "LAYERS", [True])
    mod = copy.deepcopy(base)
    got = _train(mod, xs, 5, autocast)
    _compare(got, want)
    assert stand_in.captures == 12 and stand_in.replays == 2 * 3 * 3
    assert len(qat_graph._LAYER_FORWARD) == 3 and not qat_graph._FORWARD and not qat_graph._GRADS
    assert all(len(o.graphs) == 2 for o in qat_graph._LAYER_BACKWARD.values())


@pytest.mark.parametrize("layers", [False, True])
def test_tiny_dit_paper_policy_trains_the_same_through_the_graph_path(stand_in, monkeypatch, layers):
    """The whole tiny DiT under the paper's policy (LRB on every linear, 8-bit q/k/v fake-quant), bf16 autocast,
    three AdamW steps: loss and every gradient equal with and without the graph path; each QAT layer captured
    twice (Q_w(R) and the backward's weight side; or, with whole-layer graphs, its forward and backward) and
    replayed in the later steps."""
    import robuq_fx
    import robuq_fx.models as M
    pytest.importorskip("diffusers")
    model = M.build("dit-tiny")
    inputs = M.example_inputs("dit-tiny", batch=2)
    q = robuq_fx.quantize(model, "dit-xl-2-robuq", example_inputs=inputs).train()
    n_layers = sum(isinstance(m, QATLinear) for m in q.modules())

    def run():
        m = copy.deepcopy(q)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        outs = []
        for step in range(3):
            torch.manual_seed(step)  # train mode draws (the class-label dropout): the same draws for both
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = m(**inputs)
            y = y[0] if isinstance(y, (tuple, list)) else getattr(y, "sample", y)
            loss = y.float().pow(2).mean()
            loss.backward()
            outs.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
            opt.step()
            opt.zero_grad(set_to_none=True)
        return outs
    want = run()
    monkeypatch.setattr(qat_graph, "usable", lambda w: True)
    monkeypatch.setattr(qat_graph, "LAYERS", [layers])
    got = run()
    for i, ((la, ga), (lb, gb)) in enumerate(zip(want, got)):
        assert torch.equal(la, lb), f"step {i}: loss"
        assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga), f"step {i}: gradients"
    assert n_layers > 4 and stand_in.captures == 2 * n_layers and stand_in.replays == 4 * n_layers
    assert bool(qat_graph._LAYER_FORWARD) == layers and bool(qat_graph._FORWARD) != layers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("layers", [False, True])
def test_cuda_graphs_equal_the_eager_computation(monkeypatch, autocast, layers):
    """Real CUDA graphs (weight sides, or whole layers: ROBUQ_QAT_LAYER_GRAPH), the three kinds of layer, batches of
    two shapes in turn, 5 AdamW steps: bit-equal to the eager computation. Also: a second model trained after the
    first one's graphs were freed captures into the same pool (session 20's H200 run: a released pool's handle
    failed an assert inside capture_begin and broke the CUDA generator)."""
    import gc
    qat_graph.clear()
    base = _model("cuda", SPECS)
    xs = [torch.randn(4, 33, 128, device="cuda"), torch.randn(2, 17, 128, device="cuda")]
    monkeypatch.setattr(qat_graph, "ENABLED", [False])
    want = _train(copy.deepcopy(base), xs, 5, autocast)
    assert not qat_graph._FORWARD
    monkeypatch.setattr(qat_graph, "ENABLED", [True])
    monkeypatch.setattr(qat_graph, "LAYERS", [layers])
    fwd, bwd = ((qat_graph._LAYER_FORWARD, qat_graph._LAYER_BACKWARD) if layers else
                (qat_graph._FORWARD, qat_graph._GRADS))
    shapes = 2 if layers else 1
    for attempt in range(2):
        mod = copy.deepcopy(base)
        got = _train(mod, xs, 5, autocast)
        _compare(got, want)
        for table in (fwd, bwd):
            owners = list(table.values())
            assert len(owners) == 3 and all(len(o.graphs) == shapes == o.captures for o in owners), attempt
        del mod, owners
        gc.collect()
        assert not fwd and not bwd  # the graphs went with the model
    torch.rand(1, device="cuda")  # the generator still draws
    qat_graph.clear()


def test_a_first_call_under_inference_mode_leaves_buffers_training_can_write(stand_in, monkeypatch):
    """An evaluation under torch.inference_mode before training: the per-shape buffers made then are normal
    tensors (an inference tensor could not be written outside inference mode), and training matches."""
    monkeypatch.setattr(qat_graph, "usable", lambda w: True)
    monkeypatch.setattr(qat_graph, "LAYERS", [True])
    base = _model("cpu", SPECS)
    x = torch.randn(2, 5, 128)
    want = _train(copy.deepcopy(base), x, 2, False)
    qat_graph.clear()
    mod = copy.deepcopy(base)
    with torch.inference_mode():
        mod(x)
    assert not any(t.is_inference() for t in qat_graph._STATIC.values())
    _compare(_train(mod, x, 2, False), want)


def test_whole_layer_graphs_with_a_conv1d_style_weight(stand_in, monkeypatch):
    """A transposed (Conv1D) master: its graphs belong to the weight itself (qat_weight_cache._master of the fresh
    view), and training through them equals the fused path under autocast."""
    torch.manual_seed(9)
    spec = LayerSpec(**SPEC).resolve(64, 128)
    w = torch.nn.Parameter(torch.randn(64, 128) / 8)  # (in, out)
    layer = QATLinear(w, torch.nn.Parameter(torch.zeros(128)), spec, transposed=True,
                      lrb=(torch.randn(8, 64) / 8, torch.randn(128, 8) / 8))
    x = torch.randn(3, 10, 64)
    want = _train(copy.deepcopy(layer), x, 3, True)
    monkeypatch.setattr(qat_graph, "usable", lambda w: True)
    monkeypatch.setattr(qat_graph, "LAYERS", [True])
    mod = copy.deepcopy(layer)
    _compare(_train(mod, x, 3, True), want)
    assert list(qat_graph._LAYER_FORWARD.keys()) == [mod.weight] and stand_in.captures == 2
