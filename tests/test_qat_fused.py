"""The fused eager QAT path (robuq_fx/qat_fused.py): one autograd node per QATLinear whose backward is written out.
It must compute exactly what autograd computes through the op graph (ROBUQ_QAT_FUSED=0 / torch.compile's path):
outputs and every gradient equal bit for bit, for fp32 models, bf16 inputs on fp32 masters, and under autocast
(where autocast rounds the rotations and shares its cast of the branch factors), with and without the low-rank
branch, clipped ranges (whose STE mask is not all ones), weight groups, transposed (Conv1D) weights. (Under DDP and
FSDP2, tests/test_distributed.py compares whole training runs against one process.)"""
from __future__ import annotations

import copy

import pytest
import torch

from robuq_fx import qat_linear as QL
from robuq_fx.qat_linear import QATLinear
from robuq_fx.spec import LayerSpec

SPECS = {
    "W4A4+H": dict(w_bits=4, a_bits=4, hadamard=True, hadamard_block=64),
    "W1.58A4+H+LRB": dict(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=64, lora_rank=8),
    "W1.58A3 asym sigma +H+LRB": dict(w_bits=1.58, a_bits=3, a_sym=False, a_clip="sigma", hadamard=True,
                                      hadamard_block=64, lora_rank=8),
    "W2A4 groups": dict(w_bits=2, a_bits=4, group_size=32),
    "W4A4+H a_group": dict(w_bits=4, a_bits=4, hadamard=True, hadamard_block=64, a_group=32),
    "W1.58A2 sigma +H+LRB a_group": dict(w_bits=1.58, a_bits=2, a_clip="sigma", hadamard=True, hadamard_block=64,
                                         lora_rank=8, a_group=64),
    "W4A16 no bias": dict(w_bits=4, a_bits=16),
}


@pytest.fixture
def fused_switch():
    before = QL._FUSED_OFF[0]

    def use(on: bool):
        QL._FUSED_OFF[0] = not on
    yield use
    QL._FUSED_OFF[0] = before


def _step(mod, x, autocast):
    xx = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = mod(xx)
    (y.float().pow(2).sum() + y.float().sum()).backward()
    return y.detach(), xx.grad, {n: p.grad for n, p in mod.named_parameters()}


def _assert_same(a, b, what):
    assert torch.equal(a[0], b[0]), f"{what}: output"
    assert torch.equal(a[1], b[1]), f"{what}: input gradient"
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), f"{what}: gradient of {k} (max diff {(a[2][k] - b[2][k]).abs().max()})"


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["fp32", "bf16 input", "autocast"])
@pytest.mark.parametrize("name", list(SPECS))
def test_fused_equals_the_op_graph(name, mode, device, fused_switch):
    """On CUDA both paths run the same kernels (cuBLAS for the rotations, the Triton row kernel for Q_a, the Triton
    Q_w kernel: ops.fake_quant_weight_impl)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias="no bias" not in name)
    mod = QATLinear.from_module(lin, LayerSpec(**SPECS[name]).resolve(128, 96)).to(device)
    x = torch.randn(3, 17, 128, device=device)
    if mode == "bf16 input":
        x = x.bfloat16()
    out = {}
    for on in (True, False):
        fused_switch(on)
        out[on] = _step(copy.deepcopy(mod), x, mode == "autocast")
    _assert_same(out[True], out[False], f"{name}, {mode}")


def test_fused_conv1d_weight_and_2d_input(fused_switch):
    """A transposed (K, N) weight (transformers' Conv1D) gets its gradient through the view; 2-D inputs."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 64)
    spec = LayerSpec(**SPECS["W1.58A4+H+LRB"]).resolve(128, 64)
    mod = QATLinear(torch.nn.Parameter(lin.weight.detach().t().contiguous()), lin.bias, spec, transposed=True)
    x = torch.randn(40, 128)
    out = {}
    for on in (True, False):
        fused_switch(on)
        out[on] = _step(copy.deepcopy(mod), x, False)
    _assert_same(out[True], out[False], "Conv1D")
    assert out[True][2]["weight"].shape == (128, 64)


@pytest.mark.parametrize("autocast", [False, True])
def test_whole_tiny_dit_step_equals_the_op_graph(autocast, fused_switch, monkeypatch):
    """A QAT training step of the tiny DiT with the paper's policy (W1.58A4 + Hadamard + LRB, 8-bit attention on
    the region path): loss and every parameter's gradient equal with and without the fused layers."""
    import robuq_fx
    import robuq_fx.models as M
    pytest.importorskip("diffusers")
    model = M.build("dit-tiny")
    inputs = M.example_inputs("dit-tiny", batch=2)
    q = robuq_fx.quantize(model, "dit-xl-2-robuq", example_inputs=inputs).train()
    from robuq_fx import qat_fused
    calls = []
    apply = qat_fused.QATLinearFunction.apply
    monkeypatch.setattr(qat_fused.QATLinearFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    out = {}
    for on in (True, False):
        fused_switch(on)
        m = copy.deepcopy(q)
        torch.manual_seed(0)  # train mode draws (the class-label dropout): the same draws for both
        kw = inputs if isinstance(inputs, dict) else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(**kw) if kw is not None else m(*inputs)
        y = y[0] if isinstance(y, (tuple, list)) else getattr(y, "sample", y)
        loss = y.float().pow(2).mean()
        loss.backward()
        out[on] = (loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    n_layers = sum(isinstance(mod, QATLinear) for mod in q.modules())
    assert n_layers > 4 and len(calls) == n_layers  # every QAT layer ran fused once (and none in the op-graph run)
    assert torch.equal(out[True][0], out[False][0])
    assert out[True][1].keys() == out[False][1].keys() and len(out[True][1]) > 10
    for k in out[True][1]:
        assert torch.equal(out[True][1][k], out[False][1][k]), k


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with fp8 (sm_89+)")
@pytest.mark.parametrize("rank", [0, 8])
def test_fp8_forward_gemm_matches_the_bf16_path(rank, monkeypatch):
    """ROBUQ_QAT_FP8=1 (issue 19): the forward product on fp8 tensor cores is the exact product of the fake-quant
    values (the bf16 path multiplies their bf16 roundings), the backward reads the same Q_w(R) and Q_a(x H): outputs
    within bf16 rounding, gradients close. Also checks that the fp8 path ran, and that a layer with a low-rank
    branch stays on the bf16 path (its up-projection is stacked into the bf16 GEMM): bit-identical there."""
    from robuq_fx import qat_fused
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128)
    mod = QATLinear.from_module(lin, LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128,
                                               lora_rank=rank).resolve(256, 128)).cuda()
    x = torch.randn(4, 33, 256, device="cuda")
    ran = []
    real = qat_fused._fp8_forward
    monkeypatch.setattr(qat_fused, "_fp8_forward", lambda *a: ran.append(1) or real(*a))
    out = {}
    for on in (True, False):
        monkeypatch.setattr(qat_fused, "_QAT_FP8", [on])
        out[on] = _step(copy.deepcopy(mod), x, True)
    (y1, gx1, g1), (y0, gx0, g0) = out[True], out[False]
    if rank:
        assert not ran, "a layer with a low-rank branch took the fp8 forward"
        assert torch.equal(y1, y0) and torch.equal(gx1, gx0) and all(torch.equal(g1[k], g0[k]) for k in g0)
        return
    assert ran, "the fp8 forward did not run"
    from tests.qat_testing import rel
    assert rel(y1, y0) < 1e-2 and rel(gx1, gx0) < 2e-2
    for k in g0:
        assert rel(g1[k], g0[k]) < (1e-1 if k.startswith("lrb") else 2e-2), k


@pytest.mark.parametrize("name", ["W4A4+H", "W1.58A4+H+LRB", "W1.58A3 asym sigma +H+LRB"])
def test_compiled_qat_rotates_as_eager_under_autocast(name, fused_switch):
    """robuq::hadamard's matmul is autocast-eligible: eagerly, autocast reaches it inside the op (x H in bf16). A
    compiled graph decomposes the op below the dispatcher's autocast step, so it used to rotate activations and
    weights in fp32 -- fp32 GEMMs (the H200's compiled DiT QAT step spent twice FP's GEMM time) and results that
    differed from eager. The op's autocast kernel casts first: every matmul of the traced step runs in bf16, and
    the step (AOTAutograd's graphs run as traced) equals the eager op graph's bit for bit."""
    from torch._dynamo.backends.common import aot_autograd
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96)
    mod = QATLinear.from_module(lin, LayerSpec(**SPECS[name]).resolve(128, 96))
    x = torch.randn(3, 17, 128)
    fused_switch(False)
    want = _step(copy.deepcopy(mod), x, True)
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    try:
        got = _step(torch.compile(copy.deepcopy(mod), backend=aot_autograd(fw_compiler=keep, bw_compiler=keep)), x,
                    True)
    finally:
        torch._dynamo.reset()
    got = got[:2] + ({k.removeprefix("_orig_mod."): v for k, v in got[2].items()},)
    mms = [n for g in graphs for n in g.graph.nodes if n.op == "call_function"
           and n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)]
    assert len(graphs) == 2 and len(mms) >= 6
    dtypes = {a.meta["val"].dtype for n in mms for a in n.args
              if isinstance(a, torch.fx.Node) and a.meta["val"].dim() > 1}
    assert dtypes == {torch.bfloat16}, dtypes
    # The branch factors are read twice (the LRB product and R = W H - A B); eager autocast casts each once (its
    # cast cache) and sums their two bf16 gradients before the cast back, a compiled graph casts twice and sums in
    # fp32: those two gradients agree to bf16 rounding, everything else bit for bit.
    lrb = {k: got[2].pop(k) for k in ("lrb_down", "lrb_up") if k in got[2]}
    _assert_same(got, want, f"{name}: compiled vs eager under autocast")
    for k, g in lrb.items():
        torch.testing.assert_close(g, want[2][k], rtol=2 ** -7, atol=2 ** -7 * float(want[2][k].abs().max()))


@pytest.mark.parametrize("name", ["W1.58A4+H+LRB", "W1.58A3 asym sigma +H+LRB", "W1.58A4+H"])
def test_inductor_compiled_qat_equals_eager_under_autocast(name, fused_switch):
    """The same step through Inductor (CPU), under bf16 autocast: outputs and the input gradient equal eager's bit
    for bit, every other gradient but the branch factors' too (those as in the test above). Until session 23 they
    were ~2-3% apart in the output: R = W H - A B and `quantize_weight`'s R / s were bf16 eagerly, rounded before
    `round`, and Inductor keeps such intermediates in fp32 (without `emulate_precision_casts`), so 0.065% of the
    ternary codes flipped. Both are fp32 now (`layer.wide_difference`, `quantize_weight`); a bf16 step anywhere in
    the weight's quantization, or a decomposition computing anything else, fails here."""
    torch.manual_seed(0)
    spec = SPECS.get(name, dict(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=64))  # (no branch: R = W H)
    mod = QATLinear.from_module(torch.nn.Linear(128, 96), LayerSpec(**spec).resolve(128, 96))
    x = torch.randn(3, 17, 128)
    fused_switch(False)
    want = _step(copy.deepcopy(mod), x, True)
    torch._dynamo.reset()
    try:
        got = _step(torch.compile(copy.deepcopy(mod)), x, True)
    finally:
        torch._dynamo.reset()
    got = got[:2] + ({k.removeprefix("_orig_mod."): v for k, v in got[2].items()},)
    lrb = {k: got[2].pop(k) for k in ("lrb_down", "lrb_up") if k in got[2]}
    _assert_same(got, want, f"{name}: Inductor vs eager under autocast")
    for k, g in lrb.items():
        torch.testing.assert_close(g, want[2][k], rtol=2 ** -7, atol=2 ** -7 * float(want[2][k].abs().max()))


def test_one_kernel_weight_side_switch(monkeypatch):
    """ROBUQ_QAT_WSIDE_KERNEL is read at each use (bench_dit's --env-variant sets it for one row); an explicit
    setting overrides it; on by default, requested (every left layer named) only when set to 1."""
    from robuq_fx import qat_fused
    monkeypatch.setattr(qat_fused, "_WSIDE", [None])
    monkeypatch.delenv("ROBUQ_QAT_WSIDE_KERNEL", raising=False)
    assert qat_fused._wside_on() and not qat_fused._wside_requested()
    monkeypatch.setenv("ROBUQ_QAT_WSIDE_KERNEL", "0")
    assert not qat_fused._wside_on() and not qat_fused._wside_requested()
    monkeypatch.setenv("ROBUQ_QAT_WSIDE_KERNEL", "1")
    assert qat_fused._wside_on() and qat_fused._wside_requested()
    monkeypatch.setattr(qat_fused, "_WSIDE", [False])
    assert not qat_fused._wside_on()


def test_a_compiled_qat_model_compiles_once(monkeypatch):
    """torch.compile of a QAT model whose switch (ROBUQ_QAT_FUSED) is not read yet: three training steps, one graph.
    The trace must not read the lazily set switch (it did: the first trace guarded on it being unset, so the second
    step compiled the whole model again; a DiT-XL/2 compile takes minutes)."""
    import torch.nn as nn
    from torch._dynamo.testing import CompileCounter
    monkeypatch.setattr(QL, "_FUSED_OFF", [None])
    torch._dynamo.reset()
    mod = nn.Sequential(QATLinear.from_module(nn.Linear(64, 64), LayerSpec(**SPECS["W4A4+H"]).resolve(64, 64)),
                        nn.GELU(), QATLinear.from_module(nn.Linear(64, 32),
                                                         LayerSpec(**SPECS["W1.58A4+H+LRB"]).resolve(64, 32)))
    counter = CompileCounter()
    step = torch.compile(mod, backend=counter)
    opt = torch.optim.SGD(mod.parameters(), lr=0.01)
    x = torch.randn(4, 64)
    for _ in range(3):
        step(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    mod(x)  # an eager call afterwards still reads the switch and takes the fused path
    assert counter.frame_count == 1, counter.frame_count
    assert QL._FUSED_OFF[0] is False
