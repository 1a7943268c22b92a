"""The weight-side hooks `robuq_fx.quantize` puts on every QAT model (robuq_fx/qat_step_hooks.py): they engage only
while torch.compile traces the whole model's training forward with graph breaks allowed and its QAT layers on CUDA
(here the device check is widened to the CPU: `_device_ok`), and then compute what `weight_sides_per_forward` does;
eager forwards, eval mode, fullgraph=True, ROBUQ_QAT_STEP_WEIGHTS=0, CUDA graph modes and the real CPU device leave
the per-layer path as it was (ROBUQ_QAT_STEP_WEIGHTS=cudagraphs engages them under CUDA graph modes, with fixed
forward buffers). A deep copy gets a plan of its own layers; the model pickles; an explicit call replaces them."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn

import robuq_fx
from robuq_fx import qat_step, qat_step_hooks as H
from robuq_fx.qat_linear import QATLinear
from tests.qat_testing import train as _train, train_compiled as _compiled
from tests.test_qat_step import Net

POLICY = {"rules": [{"match": "*", "w_bits": 1.58, "a_bits": 4, "hadamard": True, "hadamard_block": 64,
                     "lora_rank": 8}]}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))


@pytest.fixture
def counted(monkeypatch):
    """Plan.run_forward calls (one a forward where the hooks engaged), as (plan, calls)."""
    calls = []
    real = qat_step.Plan.run_forward
    monkeypatch.setattr(qat_step.Plan, "run_forward", lambda self, ms: calls.append(self) or real(self, ms))
    return calls


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(H, "_device_ok", lambda t: True)



def _hooks(mod):
    return set(mod._forward_pre_hooks.values()) | set(mod._forward_hooks.values())


def test_quantize_puts_the_automatic_hooks_on(counted, on_cpu):
    q = robuq_fx.quantize(_mlp(), POLICY).train()
    assert _hooks(q) == {H._pre_compiled, H._post_compiled}
    q(torch.randn(2, 5, 128)).sum().backward()  # eager: the per-layer path
    assert counted == []


def _explicit_then_auto(counted, inductor_patch: dict | None = None):
    """(two compiled steps of Net with the explicit hooks, the same with the automatic hooks, that model); Dynamo's
    counters cleared just before the second, which runs under `inductor_patch` (Inductor config)."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters
    base = Net()
    x = torch.randn(3, 10, 128)
    explicit = copy.deepcopy(base)
    robuq_fx.weight_sides_per_forward(explicit)
    want = _compiled(explicit, x, 2)
    counted.clear()
    auto = copy.deepcopy(base)
    H.install_auto(auto)
    counters.clear()
    with inductor_config.patch(inductor_patch or {}):
        got = _compiled(auto, x, 2)
    return want, got, auto


def test_they_engage_under_torch_compile_and_equal_the_explicit_hooks(counted, on_cpu):
    from torch._dynamo.utils import counters
    want, got, auto = _explicit_then_auto(counted)
    assert len(counted) == 2 and all(p.modules[0] is auto.a for p in counted)  # one a forward, of auto's layers
    # the only graph breaks: the two eager calls (the conditions fold to constants in the trace)
    assert counters["graph_break"] and all("disable" in k for k in counters["graph_break"]), counters["graph_break"]
    for (ya, ga), (yb, gb) in zip(got, want):
        assert torch.equal(ya, yb) and all(torch.equal(ga[k], gb[k]) for k in gb)
    assert all(m._prepared is None for m in auto.modules() if isinstance(m, QATLinear))  # cleared after


def test_the_comparison_above_can_fail(counted, on_cpu, monkeypatch):
    """A wrong weight side in the engaged path (the stacked weight [Q_w(R), A_c] doubled where it is written) moves
    the output: the test above would see the hooks compute something else."""
    base = Net()
    x = torch.randn(3, 10, 128)
    want = _compiled(copy.deepcopy(base), x, 1)  # no hooks: the per-layer path
    real = qat_step._weight_side
    monkeypatch.setattr(qat_step, "_weight_side", lambda *a, **kw: (lambda r: (r[0].mul_(2), *r[1:]))(real(*a, **kw)))
    auto = copy.deepcopy(base)
    H.install_auto(auto)
    got = _compiled(auto, x, 1)
    assert counted and not torch.allclose(got[0][0], want[0][0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("case", ["eval", "fullgraph", "switched off", "cpu", "reduce-overhead", "cudagraphs config"])
def test_they_stay_off(case, counted, monkeypatch):
    """Eval mode, fullgraph=True (no graph break allowed), ROBUQ_QAT_STEP_WEIGHTS=0, layers not on CUDA and CUDA
    graph modes (mode="reduce-overhead"; Inductor's triton.cudagraphs set globally): the compiled model runs the
    per-layer path in one graph: the hooks' conditions fold to constants, no graph break."""
    if case != "cpu":
        monkeypatch.setattr(H, "_device_ok", lambda t: True)
    if case == "switched off":
        monkeypatch.setenv("ROBUQ_QAT_STEP_WEIGHTS", "0")
    q = robuq_fx.quantize(_mlp(), POLICY)
    q.train(case != "eval")
    x = torch.randn(2, 5, 128)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    import torch._inductor.config as inductor_config
    try:
        with inductor_config.patch({"triton.cudagraphs": case == "cudagraphs config"}):
            fn = (torch.compile(q, mode="reduce-overhead") if case == "reduce-overhead"
                  else torch.compile(q, backend="aot_eager", fullgraph=case == "fullgraph"))
            if case == "eval":
                with torch.no_grad():
                    fn(x)
            else:
                fn(x).sum().backward()
    finally:
        torch._dynamo.reset()
    assert counted == [] and not counters["graph_break"], dict(counters["graph_break"])  # one graph, as before


@pytest.mark.parametrize("cudagraphs", [True, False])
def test_the_cudagraphs_switch_engages_them_with_fixed_buffers(cudagraphs, counted, on_cpu, monkeypatch):
    """ROBUQ_QAT_STEP_WEIGHTS=cudagraphs: under a CUDA graph mode (here Inductor's triton.cudagraphs set globally)
    the hooks engage with the plan's forward buffers fixed (`Plan.static_fwd`), and the step equals the explicit
    hooks' bit for bit; in default mode the same switch engages them as "auto" does, buffers rotating."""
    monkeypatch.setenv("ROBUQ_QAT_STEP_WEIGHTS", "cudagraphs")
    want, got, auto = _explicit_then_auto(counted, {"triton.cudagraphs": cudagraphs})
    assert len(counted) == 2 and all(p.modules[0] is auto.a for p in counted)
    assert H._PLANS[auto].static_fwd is cudagraphs
    for (ya, ga), (yb, gb) in zip(got, want):
        assert torch.equal(ya, yb) and all(torch.equal(ga[k], gb[k]) for k in gb)


def test_a_deep_copy_gets_a_plan_of_its_own_layers(counted, on_cpu):
    """An EMA-style copy of the QAT model carries the hooks; compiled, it computes its own layers' weight sides
    and leaves the original's alone."""
    q = robuq_fx.quantize(_mlp(), POLICY).train()
    ema = copy.deepcopy(q)
    assert _hooks(ema) == {H._pre_compiled, H._post_compiled}
    _compiled(ema, torch.randn(2, 5, 128), 1)
    layers = [m for m in ema.modules() if isinstance(m, QATLinear)]
    assert len(counted) == 1 and counted[0].modules == layers
    assert q not in H._PLANS
    ema2 = pickle.loads(pickle.dumps(q))  # module-level hooks: the model pickles
    assert _hooks(ema2) == {H._pre_compiled, H._post_compiled}


def test_an_explicit_call_replaces_them_and_remove_leaves_none(counted, on_cpu):
    q = robuq_fx.quantize(_mlp(), POLICY).train()
    handle = robuq_fx.weight_sides_per_forward(q)
    assert _hooks(q) == {H._pre_always, H._post_always}
    x = torch.randn(2, 5, 128)
    _compiled(q, x, 2)
    assert len(counted) == 2  # once a forward, not twice
    q(x).sum().backward()  # eager too
    assert len(counted) == 3
    handle.remove()
    assert _hooks(q) == set()
    q(x).sum().backward()
    assert len(counted) == 3


def test_lower_drops_them():
    """The lowered model (no QAT layers left) carries no hooks. The whole-graph form (functional QAT calls, no
    QATLinear modules) never gets them: it keeps the per-layer path."""
    x = torch.randn(2, 5, 128)
    q = robuq_fx.quantize(_mlp(), POLICY, example_inputs=(x,)).train()
    assert _hooks(q) == {H._pre_compiled, H._post_compiled}
    assert _hooks(robuq_fx.lower(q, progress=False)) == set()
    g = robuq_fx.quantize(_mlp(), POLICY, example_inputs=(x,), whole_graph=True).train()
    assert robuq_fx.robuq_info(g)["form"] == "graph" and _hooks(g) == set()
    assert _hooks(robuq_fx.lower(g, progress=False)) == set()


def test_a_forward_that_raises_leaves_the_layers_on_their_masters(counted):
    """The post-hook runs when the model's forward raises (always_call), so a layer called on its own afterwards
    computes from its masters, not from the failed forward's weight sides."""
    q = robuq_fx.quantize(_mlp(), POLICY).train()
    robuq_fx.weight_sides_per_forward(q)
    with pytest.raises(ValueError, match="Hadamard block"):
        q(torch.randn(2, 5, 7))  # wrong width: the first layer raises after the pre-hook ran
    assert counted and all(m._prepared is None for m in q.modules() if isinstance(m, QATLinear))


def test_layers_on_several_devices_compute_their_own(counted, monkeypatch):
    """Masters on two devices (here: a layer's weight on the meta device stands for the second one): the hooks leave
    every layer to its own weight side, the explicit call with one warning, instead of one flat tensor on one."""
    q = robuq_fx.quantize(_mlp(), POLICY).train()
    handle = robuq_fx.weight_sides_per_forward(q)
    second = [m for m in q.modules() if isinstance(m, QATLinear)][1]
    monkeypatch.setattr(second, "weight", nn.Parameter(second.weight.detach().to("meta")))
    with pytest.warns(RuntimeWarning, match="on several devices"):
        H._pre_always(q, (), {})
    assert all(m._prepared is None for m in q.modules() if isinstance(m, QATLinear))
    handle.remove()


@pytest.fixture
def two_ranks():
    """A process group of 2 ranks in this one process (torch's fake backend: no communication)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def test_under_a_process_group_the_explicit_call_warns_once_and_still_runs(counted, two_ranks):
    """weight_sides_per_forward under DDP-sized groups hands every gradient over at the backward's end (no all-reduce
    overlap): one warning naming the cost, and the weight sides still computed once a forward (a choice, not an
    error)."""
    q = robuq_fx.quantize(_mlp(), POLICY).train()
    handle = robuq_fx.weight_sides_per_forward(q)
    x = torch.randn(2, 5, 128)
    with pytest.warns(RuntimeWarning, match="process group of 2 ranks.*cannot overlap"):
        q(x).sum().backward()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q(x).sum().backward()  # once
    assert len(counted) == 2
    handle.remove()


def test_under_a_process_group_the_automatic_hooks_stay_off(counted, on_cpu, two_ranks):
    """The automatic hooks fold to off while a group of 2 ranks is initialized: each layer keeps its weight side in
    its own backward, where DDP's bucket hooks see its gradient early; one graph, no break."""
    q = robuq_fx.quantize(_mlp(), POLICY).train()
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    try:
        torch.compile(q, backend="aot_eager")(torch.randn(2, 5, 128)).sum().backward()
    finally:
        torch._dynamo.reset()
    assert counted == [] and not counters["graph_break"], dict(counters["graph_break"])


def test_masters_sharded_later_turn_the_automatic_hooks_off(counted, monkeypatch):
    """Masters that become sharded after the plan was made (FSDP2 applied after a compiled forward): the automatic
    hooks step aside for good, silently; the explicit call refuses, as at its start."""
    from robuq_fx import qat_step
    q = robuq_fx.quantize(_mlp(), POLICY).train()
    H._prepare(q, False)
    assert len(counted) == 1 and q in H._PLANS
    H._clear(H._PLANS[q].modules)
    monkeypatch.setattr(qat_step, "_is_dtensor", lambda t: True)
    H._PLANS[q]._ids = None  # (the check runs again when the masters are other tensors)
    H._prepare(q, False)
    assert len(counted) == 1 and H._PLANS[q] is None
    with pytest.raises(TypeError, match="sharded DTensors"):
        robuq_fx.weight_sides_per_forward(q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_they_engage_under_inductor_and_equal_the_explicit_hooks(counted):
    """The real condition (layers on CUDA, no widening) under Inductor with bf16 autocast: engaged once a forward,
    and the same outputs and gradients as `weight_sides_per_forward` compiled the same way."""
    base = Net().cuda()
    x = torch.randn(3, 10, 128, device="cuda")
    runs = []
    for explicit in (True, False):
        mod = copy.deepcopy(base)
        if explicit:
            robuq_fx.weight_sides_per_forward(mod)
        else:
            H.install_auto(mod)
        counted.clear()
        torch._dynamo.reset()
        try:
            runs.append(_train(mod, x, 2, True, torch.compile(mod)))
        finally:
            torch._dynamo.reset()
        assert len(counted) == 2
    for (ya, ga), (yb, gb) in zip(*runs):
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        for k in gb:
            torch.testing.assert_close(ga[k], gb[k], rtol=0, atol=0)


def _count_records(monkeypatch) -> list:
    """A list that grows by one each time the cudagraph trees record a graph."""
    from torch._inductor import cudagraph_trees as T
    records = []
    real = T.CUDAGraphNode.__init__

    def counting(self, *a, **kw):
        records.append(1)
        real(self, *a, **kw)
    monkeypatch.setattr(T.CUDAGraphNode, "__init__", counting)
    return records


def _cg_steps(mod, x, steps, records):
    """steps AdamW steps of mod under mode="reduce-overhead" and bf16 autocast: [(output, {name: grad}) as fp32],
    and the cudagraph trees' record count after each step."""
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-3)
    outs, seen = [], []
    torch._dynamo.reset()
    try:
        fn = torch.compile(mod, mode="reduce-overhead")
        for _ in range(steps):
            torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fn(x)
            y.float().pow(2).mean().backward()
            outs.append((y.detach().float().clone(),
                         {n: p.grad.detach().float().clone() for n, p in mod.named_parameters()}))
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen.append(len(records))
    finally:
        torch._dynamo.reset()
    return outs, seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_under_cuda_graphs_they_stay_off_and_nothing_is_recorded_again(counted, monkeypatch):
    """mode="reduce-overhead" on CUDA: the hooks stay off (the per-layer path), and after the warm-up steps the
    cudagraph trees record nothing more. With the hooks on, the tensors they set on the layers were static inputs
    whose addresses moved, and every step recorded the graphs again (session 25, H200: 18.5x the FP step)."""
    records = _count_records(monkeypatch)
    mod = Net().cuda()
    H.install_auto(mod)
    _, seen = _cg_steps(mod, torch.randn(3, 10, 128, device="cuda"), 6, records)
    assert counted == []
    assert seen[2] > 0 and seen[-1] == seen[2], seen  # recorded while warming up, then only replayed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_under_cuda_graphs_the_switch_engages_them_without_recording_again(counted, monkeypatch):
    """ROBUQ_QAT_STEP_WEIGHTS=cudagraphs on CUDA: the hooks engage under mode="reduce-overhead" with fixed forward
    buffers, the cudagraph trees record nothing after the warm-up (the layers' weight-side tensors keep their
    addresses), and the steps follow the per-layer path's to bf16 rounding (the weight sides from the grouped
    kernels there, Inductor's decomposition here)."""
    records = _count_records(monkeypatch)
    base = Net().cuda()
    x = torch.randn(3, 10, 128, device="cuda")
    per_layer = copy.deepcopy(base)
    H.install_auto(per_layer)
    want, _ = _cg_steps(per_layer, x, 6, records)
    assert counted == []
    monkeypatch.setenv("ROBUQ_QAT_STEP_WEIGHTS", "cudagraphs")
    records.clear()
    mod = copy.deepcopy(base)
    H.install_auto(mod)
    got, seen = _cg_steps(mod, x, 6, records)
    assert counted and H._PLANS[mod].static_fwd
    assert seen[2] > 0 and seen[-1] == seen[2], seen  # recorded while warming up, then only replayed
    # the first step's output, then the first two steps' gradients: after an update the outputs drift apart by the
    # codes that flip (session 30, H200: the per-layer path under CUDA graphs is 0.068 from eager at step 1)
    torch.testing.assert_close(got[0][0], want[0][0], rtol=2e-2, atol=2e-2)
    for (_, ga), (_, gb) in zip(got[:2], want[:2]):
        for k in gb:
            torch.testing.assert_close(ga[k], gb[k], rtol=5e-2, atol=2e-3)
