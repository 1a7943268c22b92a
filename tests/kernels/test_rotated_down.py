"""The layer's own B H (`lrb_down_h`, robuq::qlinear's optional argument; PackedLinear keeps it) replaces
the product the kernels and the compiled graph would otherwise make on every call: outputs are unchanged, the
buffer follows every change of B, and a wrong one is refused.

CPU: the op with and without it (reference kernel), a wrong shape. GPU (fp8 layout): the buffer equals
`weight_cache.rotated_down` bit for bit after moves, casts and loads; outputs equal the op's without it; it is not in
the checkpoint. The compiled graph's side: tests/kernels/test_inductor_traced.py (the trace holds no B H product)."""
from __future__ import annotations

import pytest
import torch

import robuq_fx
from robuq_fx.layer import rotate
from robuq_fx.modules import PackedLinear


def _layer(device="cpu", rank=8, k=256, n=96, dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(n, k, device=device, generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(n, device=device, generator=g) * 0.1).to(dtype)
    dn = (torch.randn(rank, k, device=device, generator=g) * 0.05).to(dtype)
    up = (torch.randn(n, rank, device=device, generator=g) * 0.05).to(dtype)
    spec = robuq_fx.LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=rank).resolve(k, n)
    return PackedLinear.from_float(w, b, dn, up, spec)


def _op(m, x, **kw):
    return torch.ops.robuq.qlinear(x, m.qweight, m.w_scale, m.bias, m.lrb_down, m.lrb_up, *m.op_args(), **kw)


def test_op_with_the_rotated_down_projection_cpu():
    m = _layer()
    x = torch.randn(5, 256)
    bh = rotate(m.lrb_down, m.spec).contiguous()
    # kept on every device (a graph built here reads the buffer a move to the GPU remakes), in bf16 for an fp32 B
    assert torch.equal(m.lrb_down_h, rotate(m.lrb_down.bfloat16(), m.spec))
    assert torch.equal(_op(m, x, lrb_down_h=bh), _op(m, x)) and torch.equal(m(x), _op(m, x))
    with pytest.raises(ValueError, match=r"lrb_down_h has shape \(8, 128\), expected lrb_down's \(8, 256\)"):
        _op(m, x, lrb_down_h=bh[:, :128].contiguous())
    assert "lrb_down_h" not in m.state_dict()


gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                         reason="needs a GPU with fp8 tensor cores")


@gpu
def test_layer_keeps_b_h_in_step_with_b():
    from robuq_fx.kernels.registry import QLinearArgs
    from robuq_fx.kernels.weight_cache import rotated_down

    def expected(m, dt):
        a = QLinearArgs(m.qweight, m.w_scale, m.bias, m.lrb_down, m.lrb_up, *m.op_args()[:7])
        return rotated_down(a, dt)

    m = _layer(dtype=torch.bfloat16).cuda()
    assert m.layout == "fp8" and m.lrb_down_h is not None
    assert m.lrb_down_h.dtype == torch.bfloat16 and torch.equal(m.lrb_down_h, expected(m, torch.bfloat16))
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(m(x), _op(m, x))  # the op without it rotates B itself: the same product
    m.half()  # a cast: made again from the cast B, not the cast of the bf16 product
    assert m.lrb_down_h.dtype == torch.float16 and torch.equal(m.lrb_down_h, expected(m, torch.float16))
    m.bfloat16()
    other = _layer(dtype=torch.bfloat16, seed=1)
    m.load_state_dict(other.state_dict())  # a new B: a new B H
    assert torch.equal(m.lrb_down_h, expected(m, torch.bfloat16))
    assert "lrb_down_h" not in m.state_dict()
    m.cpu()  # kept on every device (lowered graphs read it): made again there
    assert m.lrb_down_h.device.type == "cpu" and torch.equal(m.lrb_down_h, expected(m, torch.bfloat16))


def test_a_layer_pickled_before_the_buffer_existed_still_runs():
    import pickle
    m = _layer()
    x = torch.randn(3, 256)
    ref = m(x)
    del m._buffers["lrb_down_h"]  # what a module pickled by an earlier version holds
    m._non_persistent_buffers_set.discard("lrb_down_h")
    old = pickle.loads(pickle.dumps(m))
    assert old.lrb_down_h is None and "lrb_down_h" not in old.state_dict()
    assert torch.equal(old(x), ref)


@pytest.mark.parametrize("policy,buffer,has", [("dit-xl-2-robuq", "lrb_down_h", lambda m: m.lrb_down is not None),
                                               ("dit-xl-2-robuq-a3", "w_colsum", lambda m: not m.spec.sym)])
def test_lowered_graphs_read_the_layers_derived_buffers(policy, buffer, has):
    """Every qlinear call a lowered model makes from a graph (the sibling-fused q/k/v of a drop-in model's captured
    attention; every layer of a whole-graph one) passes its layer's B H (lrb_down_h) and column sums (w_colsum), as
    PackedLinear.forward does: on the H200 (session 13) the fused q/k/v recomputed B H every forward (a GEMM and two
    kernels a block at batch 1); the -a3 / -a2 graphs summed every asymmetric layer's codes (session 14)."""
    import torch.fx as fx
    from tests.models.conftest import CASES
    case = CASES["dit"]
    pol = robuq_fx.Policy.load(policy)
    for whole_graph in (False, True):
        q = robuq_fx.quantize(case.build(0), pol, example_inputs=case.make_inputs(), whole_graph=whole_graph)
        low = robuq_fx.lower(q, progress=False)
        calls = [(gm, n) for gm in low.modules() if isinstance(gm, fx.GraphModule) for n in gm.graph.nodes
                 if n.op == "call_function" and n.target is torch.ops.robuq.qlinear.default]
        assert calls and robuq_fx.robuq_info(low)["fused"]
        passed = 0
        for gm, n in calls:
            path = n.args[1].target.rpartition(".")[0]
            mod = gm.get_submodule(path)
            if not has(mod):  # (adaLN: no branch; symmetric layers: no offset term)
                assert getattr(mod, buffer) is None
                continue
            given = n.kwargs.get(buffer)
            assert isinstance(given, fx.Node) and given.target == f"{path}.{buffer}", (whole_graph, n.format_node())
            passed += 1
        assert passed
        with torch.no_grad():
            x = case.make_inputs()
            assert torch.equal(case.run(low, x), case.run(q, x))
