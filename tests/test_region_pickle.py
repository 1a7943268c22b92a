"""A model holding captured regions pickles whole (`torch.save(model)`, `pickle`): RegionModule pickles its graph
node by node (robuq_fx/passes/region_pickle.py), not as code traced again, which torch.export's tracer cannot do."""
import io
import pickle

import pytest
import torch

import robuq_fx
from robuq_fx.errors import RobuQError
from robuq_fx.passes import region as R
from robuq_fx.passes import region_pickle as RP
from tests.test_regional import _dit, _inputs, _step

pytest.importorskip("diffusers")


@pytest.fixture
def qat_dit():
    return robuq_fx.quantize(_dit().train(), "dit-xl-2-robuq", example_inputs=_inputs()).train()


def _roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_a_qat_model_with_regions_saves_and_trains_the_same(qat_dit):
    assert len(R.regions(qat_dit)) == 4
    back = _roundtrip(qat_dit)
    regions = R.regions(back)
    assert sorted(regions) == sorted(R.regions(qat_dit))
    assert len({type(m) for m in regions.values()}) == 1  # the loaded regions share one class again
    assert all(isinstance(m._guards_fn, torch.nn.Module) for m in regions.values())
    (ya, ga), (yb, gb) = _step(qat_dit, _inputs()), _step(back, _inputs())
    assert torch.equal(ya, yb)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    # the loaded blocks still share one compiled graph (one region class, one guard function): two frames for four
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        robuq_fx.compile_repeated_blocks(back, backend=counter)
        _step(back, _inputs())
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 2


def test_a_loaded_qat_model_lowers_as_the_original(qat_dit):
    """The nodes' tags (which q / k / v feed the 8-bit attention) and shapes survive: lowering after loading gives
    the same layers, attention kernels and outputs."""
    x = _inputs()
    back = pickle.loads(pickle.dumps(qat_dit))
    qkv = [n.args[0] for m in R.regions(back).values() for n in m.graph.nodes
           if n.target == torch.ops.robuq.fake_quant_act.default]
    # (batch, heads, tokens, head dim): the symbolic batch and token counts by the example's
    assert len(qkv) == 12 and all(tuple(n.meta["val"].shape) == (2, 2, 16, 32) for n in qkv)
    low = robuq_fx.lower(qat_dit.eval())
    low_back = robuq_fx.lower(back.eval())
    assert robuq_fx.robuq_info(low_back) == robuq_fx.robuq_info(low)
    assert any(n.target == torch.ops.robuq.attention8.default for m in R.regions(low_back).values()
               for n in m.graph.nodes)
    with torch.no_grad():
        want = low(**x)[0]
        assert torch.equal(low_back(**x)[0], want)
        assert torch.equal(pickle.loads(pickle.dumps(low))(**x)[0], want)  # a lowered model pickles too


def test_a_whole_graph_model_pickles_too():
    """torch.export's whole-model capture (the graph form) comes back as a CapturedGraph that pickles as its graph:
    the same training step after loading, and its lowered form pickles with the same outputs."""
    from robuq_fx.capture import capture
    from robuq_fx.passes.region_pickle import CapturedGraph
    gm, how = capture(_dit().eval(), _inputs())  # (the capture alone runs as the model: its forward moved along)
    with torch.no_grad():
        assert how == "torch.export" and torch.equal(gm(**_inputs())[0], _dit().eval()(**_inputs())[0])
    q = robuq_fx.quantize(_dit().train(), "dit-xl-2-robuq", example_inputs=_inputs(), whole_graph=True).train()
    assert isinstance(q, CapturedGraph) and robuq_fx.robuq_info(q)["form"] == "graph"
    (ya, ga), (yb, gb) = _step(q, _inputs()), _step(_roundtrip(q), _inputs())
    assert torch.equal(ya, yb) and ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    low = robuq_fx.lower(q.eval())
    with torch.no_grad():
        assert torch.equal(pickle.loads(pickle.dumps(low))(**_inputs())[0], low(**_inputs())[0])


def test_the_input_guards_come_back_and_check(qat_dit):
    from torch.export._unlift import _convert_guards_code_to_fn
    from torch.utils._pytree import MappingKey
    guards = _convert_guards_code_to_fn(["L['x'].size()[1] == 3"], [(MappingKey("x"),)])
    state = pickle.loads(pickle.dumps(RP.guards_state(guards, "m")))
    back = RP.guards_from_state(state, "m")
    back(torch.zeros(2, 3))
    with pytest.raises(AssertionError, match="Guard failed"):
        back(torch.zeros(2, 4))
    with pytest.raises(RobuQError, match="'m' was pickled under Python 2.7"):
        RP.guards_from_state(dict(state, python=(2, 7)), "m")


def test_a_node_that_does_not_pickle_names_the_region(qat_dit):
    region = R.regions(qat_dit)["transformer_blocks.1.attn1"]
    out = next(n for n in region.graph.nodes if n.op == "output")
    with region.graph.inserting_before(out):
        extra = region.graph.call_function(lambda t: t, (out.args[0][0],))
    out.args = ((extra, *out.args[0][1:]),)
    region.recompile()
    with pytest.raises(pickle.PicklingError, match="region 'transformer_blocks.1.attn1'.*node '_lambda_'"):
        pickle.dumps(qat_dit)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_captured_on_cuda_saves_and_trains_the_same():
    """Captured on the GPU (export bakes the device into some nodes), saved, loaded: the same bf16 autocast step."""
    x = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _inputs().items()}
    q = robuq_fx.quantize(_dit().cuda().train(), "dit-xl-2-robuq", example_inputs=x).train()
    back = _roundtrip(q)

    def step(m):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _step(m, x)
    (ya, ga), (yb, gb) = step(q), step(back)
    assert torch.equal(ya, yb) and ga.keys() == gb.keys()
    for k in ga:  # (fp32 defaults: SDPA's backward may add in another order on the GPU)
        torch.testing.assert_close(gb[k], ga[k])
