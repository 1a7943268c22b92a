"""Sibling fusion (robuq_fx/passes/fuse.py): q/k/v and gate/up run as one robuq::qlinear, bit-identical (torch.equal,
fp32, CPU) to the unfused lowered model: the reference kernel quantizes the input once and runs each member's rows
as their own products, so no float sum changes order. On the drop-in path the parent of the siblings is captured
(passes/dropin.py); the whole-graph path fuses in its one graph. Also: checkpoints, specs that must not fuse, the
backend."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import robuq_fx
import robuq_fx.backend as B
from models.conftest import CASES, op_counts  # tests/ is on sys.path (rootdir-relative packages)
from robuq_fx.passes.fuse import FusedLinear, layer_modules, unfused_state_dict

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore:.*Graph break.*")]

QLINEAR = torch.ops.robuq.qlinear.default
GROUPS = {  # per block: the siblings each model fuses on the drop-in path
    "dit": [("attn1", ["to_q", "to_k", "to_v"])],
    # Llama's attention takes a KV cache (generate()): it is never captured, so q/k/v stay unfused there
    "llama": [("mlp", ["gate_proj", "up_proj"])],
}
GRAPH_GROUPS = {"dit": GROUPS["dit"],  # the whole-graph path fuses every group
                "llama": [("self_attn", ["q_proj", "k_proj", "v_proj"]), ("mlp", ["gate_proj", "up_proj"])]}
_MODELS: dict = {}


def _models(name: str, kind: str, whole_graph: bool = False):
    """(FP model, QAT model, fused lowered, unfused lowered), built once per module."""
    if (name, kind, whole_graph) not in _MODELS:
        case = CASES[name]
        model = case.build(0).eval()
        q = case.quantize(model, kind, whole_graph=whole_graph).eval()
        _MODELS[name, kind, whole_graph] = (model, q, robuq_fx.lower(q), robuq_fx.lower(q, fuse=False))
    return _MODELS[name, kind, whole_graph]


def _graph_count(gm) -> int:
    return sum(n.op == "call_function" and n.target is QLINEAR for n in gm.graph.nodes)


def _count(model, name: str = "", x=None) -> int:
    """robuq::qlinear calls in one forward (a fused group is one call)."""
    case = CASES[name] if name else None
    if case is None:
        return op_counts(model, x)[QLINEAR]
    return case.run_counts(model, case.make_inputs() if x is None else x)[QLINEAR]


@pytest.mark.parametrize("whole_graph", [False, True])
@pytest.mark.parametrize("kind", ["lrb", "a2"])
@pytest.mark.parametrize("name", ["dit", "llama"])
def test_fused_is_bit_identical_to_unfused(name, kind, whole_graph):
    case = CASES[name]
    model, q, fused, plain = _models(name, kind, whole_graph)
    for batch, seed in ((2, 0), (3, 7)):
        x = case.make_inputs(batch=batch, seed=seed)
        with torch.no_grad():
            ref, out = case.run(plain, x), case.run(fused, x)
        assert torch.equal(out, ref), f"{name}/{kind}: max |diff| {(out - ref).abs().max().item():.3g}"
        with torch.no_grad():
            assert torch.equal(out, case.run(q, x))  # and so to QAT eval
    # fewer calls: one per sibling group instead of one per member
    layers = robuq_fx.robuq_info(fused)["layers"]
    groups = robuq_fx.robuq_info(fused)["fused"]
    n_blocks = 2
    want = (GRAPH_GROUPS if whole_graph else GROUPS)[name]
    assert len(groups) == n_blocks * len(want)
    saved = sum(len(m) - 1 for m in groups.values())
    assert _count(fused, name) == _count(plain, name) - saved < len(layers)
    for path, members in groups.items():
        f = fused.get_submodule(path)
        assert isinstance(f, FusedLinear) and list(f.members) == members
        assert f.splits == tuple(plain.get_submodule(m).out_features for m in members)
        for m in members:  # the members' own modules are gone: one weight copy
            with pytest.raises(AttributeError):
                fused.get_submodule(m)
    parent, leaves = want[0]
    prefix = "transformer_blocks.0" if name == "dit" else "model.layers.0"
    assert f"{prefix}.{parent}.fused_{'_'.join(leaves)}" in groups
    if not whole_graph:
        assert type(fused) is type(model)  # only the sibling parents became graphs
        regions = {n for n, m in fused.named_modules() if isinstance(m, torch.fx.GraphModule)}
        assert regions == {f"{p.rsplit('.', 1)[0]}" for p in groups}
        if name == "llama":
            assert set(robuq_fx.robuq_info(fused)["unfused"]) == {f"model.layers.{i}.self_attn" for i in range(2)}
            assert "KV cache" in robuq_fx.robuq_info(fused)["unfused"]["model.layers.0.self_attn"]


@pytest.mark.parametrize("name", ["dit", "llama"])
def test_members_and_state_dict_round_trip(name):
    """`FusedLinear.member(i)` gives back exactly the unfused PackedLinear (what checkpoints store)."""
    _, _, fused, plain = _models(name, "lrb")
    mods = layer_modules(fused)
    for layer in robuq_fx.robuq_info(fused)["layers"]:
        a, b = mods[layer], plain.get_submodule(layer)
        assert (a.in_features, a.out_features, a.spec) == (b.in_features, b.out_features, b.spec)
        for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(ta, tb), (layer, ka)
    sa, sb = unfused_state_dict(fused), plain.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sb)


def test_fuse_false_keeps_one_call_per_layer():
    model, q, _, plain = _models("llama", "lrb")
    layers = robuq_fx.robuq_info(q)["layers"]
    assert _count(plain, "llama") == len(layers)
    assert "fused" not in robuq_fx.robuq_info(plain)
    assert not any(isinstance(m, FusedLinear) for m in plain.modules())
    assert all(type(plain.get_submodule(n)) is robuq_fx.PackedLinear for n in layers)


@pytest.mark.parametrize("name", ["dit", "llama"])
def test_checkpoint_of_fused_model_loads_into_fresh_model(name, tmp_path):
    case = CASES[name]
    _, _, fused, plain = _models(name, "lrb")
    path = robuq_fx.save_quantized(fused, tmp_path / "m.safetensors")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert not any("fused" in k for k in keys)  # per layer, as an unfused model writes it
    fresh = case.build(seed=5)
    x = case.make_inputs()
    loaded = robuq_fx.load_quantized(path, fresh, case.example(x))
    assert robuq_fx.robuq_info(loaded)["fused"] == robuq_fx.robuq_info(fused)["fused"]
    assert _count(loaded, name) == _count(fused, name)
    with torch.no_grad():
        ref = case.run(fused, x)
        assert torch.equal(case.run(loaded, x), ref)
        unfused = robuq_fx.load_quantized(path, fresh, case.example(x), fuse=False)
        assert _count(unfused, name) == _count(plain, name)
        assert torch.equal(case.run(unfused, x), ref)


def test_size_table_names_fused_layers():
    _, _, fused, plain = _models("llama", "lrb", whole_graph=True)
    rows = robuq_fx.size_table(fused, print_table=False)
    labels = [r["layer"] for r in rows]
    assert "model.layers.0.self_attn.q_proj+k_proj+v_proj" in labels
    assert "model.layers.1.mlp.gate_proj+up_proj" in labels
    total, base = rows[-1], robuq_fx.size_table(plain, print_table=False)[-1]
    assert total["bf16 bytes"] == base["bf16 bytes"]
    assert 0 <= base["codes+scales"] - total["codes+scales"] < 8 * len(rows)  # less padding to a whole byte group
    # the block-diagonal lrb_up holds zeros: more LRB bytes than the members', counted as the checkpoint holds them
    # (the buffers a checkpoint saves; B H, derived from B, is not one of them)
    assert total["packed bytes"] == sum(t.numel() * t.element_size() for m in fused.modules()
                                        if isinstance(m, robuq_fx.PackedLinear) for n, t in m.named_buffers()
                                        if n not in m._non_persistent_buffers_set)


# ---- which siblings fuse --------------------------------------------------------------------------------------------
class Par(nn.Module):
    """Four layers reading one input; `a`'s output goes through a view that a narrowed tensor cannot take."""

    def __init__(self, bias=(True, True, True, True)):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(32, 16, bias=bias[0]), nn.Linear(32, 24, bias=bias[1])
        self.c, self.d = nn.Linear(32, 16, bias=bias[2]), nn.Linear(32, 8, bias=bias[3])

    def forward(self, x):
        return self.a(x).view(-1), self.b(x) * 2, torch.relu(self.c(x)), self.d(x) + 1


BASE = {"w_bits": 1.58, "a_bits": 4, "hadamard": True, "lora_rank": 2}


class Host(nn.Module):
    """Par as a submodule: siblings in the root's own forward are not fused on the drop-in path (capturing the root
    would turn your model into a GraphModule)."""

    def __init__(self, bias=(True, True, True, True)):
        super().__init__()
        self.par = Par(bias)

    def forward(self, x):
        return self.par(x)


def _lower_par(rules, bias=(True, True, True, True)):
    q = robuq_fx.quantize(Host(bias), {"rules": [*rules, {"type": "Linear", **BASE}]})
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return robuq_fx.lower(q), robuq_fx.lower(q, fuse=False)


def _par(groups):
    return [[f"par.{m}" for m in g] for g in groups]


@pytest.mark.parametrize("rules, bias, groups", [
    ([], (True, True, True, True), [["a", "b", "c", "d"]]),
    ([], (True, False, True, False), [["a", "b", "c", "d"]]),  # missing biases: zeros, still exact
    # a per-tensor scale repeated over its rows: the same products
    ([{"match": "b", **BASE, "w_granularity": "tensor"}], (True,) * 4, [["a", "b", "c", "d"]]),
    ([{"match": "b", **BASE, "a_bits": 3}], (True,) * 4, [["a", "c", "d"]]),
    ([{"match": "b", **BASE, "a_clip": "sigma"}], (True,) * 4, [["a", "c", "d"]]),
    ([{"match": "b", **BASE, "hadamard_block": 8}], (True,) * 4, [["a", "c", "d"]]),
    ([{"match": "b", **BASE, "w_bits": 4}, {"match": "d", **BASE, "w_bits": 4}], (True,) * 4,
     [["a", "c"], ["b", "d"]]),
    ([{"match": "a", **BASE, "lora_rank": 4}, {"match": "b", **BASE, "lora_rank": 0}], (True,) * 4, [["c", "d"]]),
    ([{"match": "b", **BASE, "group_size": 8}], (True,) * 4, [["a", "c", "d"]]),
    ([{"match": "[bd]", "skip": True}], (True,) * 4, [["a", "c"]]),
])
def test_which_siblings_fuse(rules, bias, groups):
    rules = [dict(r, match=f"par.{r['match']}") for r in rules]
    fused, plain = _lower_par(rules, bias)
    assert sorted(robuq_fx.robuq_info(fused).get("fused", {}).values()) == sorted(_par(groups))
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        for a, b in zip(fused(x), plain(x)):
            assert torch.equal(a, b)


def test_no_fusion_across_inputs():
    """Layers in a chain (each reads the previous output) are not siblings."""
    torch.manual_seed(0)
    q = robuq_fx.quantize(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)), {"rules": [{"type": "Linear", **BASE}]})
    low = robuq_fx.lower(q)
    assert robuq_fx.robuq_info(low)["fused"] == {} and _count(low, x=torch.randn(2, 32)) == 2


def test_root_siblings_fuse_on_the_whole_graph_path_only():
    q = robuq_fx.quantize(Par(), {"rules": [{"type": "Linear", **BASE}]})
    assert type(robuq_fx.lower(q)) is Par and robuq_fx.robuq_info(robuq_fx.lower(q))["fused"] == {}
    g = robuq_fx.quantize(Par(), {"rules": [{"type": "Linear", **BASE}]}, whole_graph=True)
    assert list(robuq_fx.robuq_info(robuq_fx.lower(g))["fused"].values()) == [["a", "b", "c", "d"]]


def test_fused_module_runs_on_its_own():
    """A FusedLinear's forward is its robuq::qlinear call: the members' outputs side by side."""
    fused, plain = _lower_par([])
    f = next(m for m in fused.modules() if isinstance(m, FusedLinear))
    x = torch.randn(4, 32)
    with torch.no_grad():
        want = torch.cat([plain.get_submodule(m)(x) for m in f.members], dim=-1)
        assert torch.equal(f(x), want)
    assert "splits=[16, 24, 16, 8]" in repr(f)


# ---- the compile backend --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dit", "llama"])
def test_backend_inference_fuses_siblings(name, monkeypatch):
    case = CASES[name]
    model, q, fused, plain = _models(name, "lrb", whole_graph=True)  # Dynamo graphs fuse every group, as it does
    graphs = []
    real = B.RobuQBackend._compile

    def spy(self, gm, inputs, torch_mode):
        graphs.append(gm)
        return real(self, gm, inputs, torch_mode)
    monkeypatch.setattr(B.RobuQBackend, "_compile", spy)
    torch._dynamo.reset()
    backend = robuq_fx.backend(case.policy("lrb"), compiler="eager")
    x, x3 = case.make_inputs(), case.make_inputs(batch=3, seed=1)
    try:
        with torch.no_grad():
            compiled = torch.compile(copy.deepcopy(model), backend=backend)
            assert torch.equal(case.run(compiled, x), case.run(plain, x))
            first = list(graphs)
            assert torch.equal(case.run(compiled, x3), case.run(plain, x3))  # another batch size: recompiles
    finally:
        torch._dynamo.reset()
    assert first
    assert sum(map(_graph_count, first)) == _graph_count(fused) < _graph_count(plain)  # one call per group, as lower()
    with_splits = [n for n in first[0].graph.nodes if n.op == "call_function" and n.target is QLINEAR
                   and len(n.args) == 14]
    assert len(with_splits) == 2 * len(GRAPH_GROUPS[name])
