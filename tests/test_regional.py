"""Regional compilation (`robuq_fx.compile_repeated_blocks`) and the shared region classes that let one compiled
graph serve every block."""
import copy

import pytest
import torch
import torch.nn as nn

import robuq_fx
from robuq_fx.errors import RobuQError
from robuq_fx.passes import region as R
from robuq_fx.regional import repeated_blocks

pytest.importorskip("diffusers")

TINY4 = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=4,
             sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=32)


def _dit():
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    return DiTTransformer2DModel(**TINY4)


def _inputs(b=2):
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(b, 4, 8, 8, generator=g), "timestep": torch.randint(0, 1000, (b,), generator=g),
            "class_labels": torch.randint(0, 10, (b,), generator=g), "return_dict": False}


def _step(model, x):
    torch.manual_seed(0)  # (DiT's label embedding drops labels at random in train mode)
    out = model(**x)[0]
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _negate_output(region):
    """Change region's graph (its first output negated) and recompile it."""
    node = next(n for n in region.graph.nodes if n.op == "output")
    outs = node.args[0]  # (the flat outputs)
    with region.graph.inserting_before(node):
        neg = region.graph.call_function(torch.neg, (outs[0],))
    node.args = (type(outs)([neg, *outs[1:]]),)
    region.recompile()


@pytest.fixture
def qat_dit():
    return robuq_fx.quantize(_dit().train(), "dit-xl-2-robuq", example_inputs=_inputs()).train()


def test_blocks_found():
    m = _dit()
    assert repeated_blocks(m) == [f"transformer_blocks.{i}" for i in range(4)]
    m._repeated_blocks = ["BasicTransformerBlock"]  # diffusers' own attribute, where a class sets it
    assert repeated_blocks(m) == [f"transformer_blocks.{i}" for i in range(4)]
    mixed = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.ReLU()]), nn.ModuleList([nn.Linear(2, 2)]))
    assert repeated_blocks(mixed) == []
    with pytest.raises(RobuQError, match="Sequential has no repeated blocks"):
        robuq_fx.compile_repeated_blocks(mixed)


def test_one_graph_serves_the_blocks_and_trains_as_eager(qat_dit):
    """The paper policy's QAT DiT (each block's attention a captured region, every linear a QAT layer) with its
    blocks compiled: the outputs and every gradient equal eager's bit for bit (aot_eager: no kernel reorders its
    sums), and the four blocks compile twice (the first block's input has other strides), not four times: a region
    class or a guard function of each block's own would make each block a guard miss."""
    from torch._dynamo.testing import CompileCounter
    x = _inputs()
    want = _step(qat_dit, x)
    model = copy.deepcopy(qat_dit)
    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        names = robuq_fx.compile_repeated_blocks(model, backend=counter)
        got = _step(model, x)
        _step(model, x)
    finally:
        torch._dynamo.reset()
    assert len(names) == 4 and counter.frame_count == 2
    assert torch.equal(got[0], want[0])
    assert got[1].keys() == want[1].keys()
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k


def test_weight_sides_once_a_forward_feed_the_compiled_blocks(qat_dit, monkeypatch):
    """weight_sides_per_forward, then the blocks compiled: the model's own forward runs eagerly, so its hook computes
    every layer's weight side once a forward (one plan call a step) and the blocks' graphs take them; still one graph
    for the blocks after the first, and the step equals eager's bit for bit (aot_eager)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from robuq_fx import qat_step
    x = _inputs()
    want = _step(qat_dit, x)
    model = copy.deepcopy(qat_dit)
    robuq_fx.weight_sides_per_forward(model)
    calls = []
    real = qat_step.Plan.run_forward
    monkeypatch.setattr(qat_step.Plan, "run_forward", lambda self, ms: calls.append(self) or real(self, ms))
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    try:
        robuq_fx.compile_repeated_blocks(model, backend=counter)
        got = _step(model, x)
        _step(model, x)
    finally:
        torch._dynamo.reset()
    assert len(calls) == 2 and counter.frame_count == 2
    assert torch.equal(got[0], want[0]) and got[1].keys() == want[1].keys()
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k


def test_regions_share_a_class_only_while_their_code_is_the_same(qat_dit):
    attn = [b.attn1 for b in qat_dit.transformer_blocks]
    assert all(isinstance(a, R.RegionModule) for a in attn)
    assert len({type(a) for a in attn}) == 1
    guards = [a._guards_fn for a in attn if hasattr(a, "_guards_fn")]  # (torch.export's; a module each, one code)
    assert len({id(g) for g in guards}) == len(guards) and len({id(g.forward) for g in guards}) <= 1
    x = torch.randn(2, 16, 64)
    before = [a(x) for a in attn]
    # change one region's graph: it gets a class of its own, and the others keep their code
    _negate_output(attn[0])
    assert type(attn[0]) is not type(attn[1]) and type(attn[1]) is type(attn[2])
    assert torch.equal(attn[0](x), -before[0])
    for a, b in zip(attn[1:], before[1:]):
        assert torch.equal(a(x), b)


def test_a_derived_region_class_recompiles_apart(qat_dit):
    """FSDP2's fully_shard mixes FSDPModule into a module's class: such a region, recompiled (a dtype cast retargets
    its literals), keeps the mixin, gets a class of its own and leaves the others' code alone (a subclass of the
    shared class would recurse in GraphModule's call wrapper; the shared class mutated would change every block)."""
    attn = [b.attn1 for b in qat_dit.transformer_blocks]
    shared = type(attn[0])

    class Mixin:
        pass
    attn[0].__class__ = type("FSDPGraphModuleImpl", (Mixin, shared), {})
    x = torch.randn(2, 16, 64)
    before = [a(x) for a in attn]
    _negate_output(attn[0])
    assert isinstance(attn[0], Mixin) and shared not in type(attn[0]).__mro__
    assert all(type(a) is shared for a in attn[1:])
    assert torch.equal(attn[0](x), -before[0])
    for a, b in zip(attn[1:], before[1:]):
        assert torch.equal(a(x), b)


def test_a_lowered_model_compiles_its_blocks_once_too(qat_dit):
    """After `lower` (each attention region's fused q/k/v and 8-bit attention rewritten, its graph recompiled): the
    regions still share a class, the four blocks compile twice, and the outputs equal the eager lowered model's."""
    from torch._dynamo.testing import CompileCounter
    low = robuq_fx.lower(qat_dit.eval())
    assert len({type(b.attn1) for b in low.transformer_blocks}) == 1
    x = _inputs()
    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = low(**x)[0]
            robuq_fx.compile_repeated_blocks(low, backend=counter)
            got = low(**x)[0]
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 2 and torch.equal(got, want)
