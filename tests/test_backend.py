"""The `robuq` torch.compile backend (robuq_fx/backend/): Dynamo graphs through the QAT / lowering passes.

Reference for every numeric check: the eager pipeline, `robuq_fx.lower(robuq_fx.quantize(model, policy))` (inference)
and `robuq_fx.quantize(model, policy)` (QAT gradients), or the seed API for models torch.export cannot capture.
Tolerances: bit-identical (torch.equal) wherever Inductor is skipped (compiler "eager": the rewritten graph as is,
or "aot_eager": AOTAutograd without Inductor): the same robuq ops run on the same tensors. With Inductor the robuq ops
still run their own kernels (extern calls), but the fused FP ops around them may round differently by ~1 ulp, which
can move an activation code by one step; on these fixed inputs nothing moves, and the checks allow 1e-5 absolute.

Inductor compiles C++ on CPU (~10-20 s per graph with a cold cache): only the MLP tests use it; the model-family tests
use compiler "eager" / "aot_eager". Models: tiny random-init transformers ViT (stands in for timm's vit_tiny, which
cannot be installed here), diffusers DiT and transformers Llama, as in tests/models/.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import robuq_fx
import robuq_fx.backend as B
from robuq_fx.seed import replace_linear_layer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:.*Graph break.*")

W4A4 = {"rules": [{"type": "Linear", "w_bits": 4, "a_bits": 4, "hadamard": True}]}
LRB = {"rules": [{"type": "Linear", "w_bits": 1.58, "a_bits": 4, "hadamard": True, "lora_rank": 4}]}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- models -------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 16)

    def forward(self, x):
        x = self.drop(torch.relu(self.fc1(x)))
        return self.fc3(torch.nn.functional.gelu(self.fc2(x)))


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum().item() > 0:  # data-dependent Python branch: a graph break inside the block
            h = h * 2
        return self.fc2(torch.relu(h))


class Branchy(nn.Module):
    """Data-dependent control flow and a print between layers (graph breaks at the top level and in blocks)."""

    def __init__(self, loop: bool = False):
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.out = nn.Linear(16, 4)
        self.loop = loop

    def forward(self, x):
        x = self.inp(x)
        print("robuq test: a print is a graph break")
        if x.mean().item() > 10:  # never true: only the branch on a tensor's value matters
            x = x + 1
        if self.loop:
            for b in self.blocks:
                x = b(x)
        else:
            x = self.blocks[0](x)
            x = self.blocks[1](x)
        return self.out(x)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return MLP()


def _vit():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=8, num_labels=10))


def _dit():
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, num_layers=2,
                              sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=32)
    for mod in m.modules():  # train-only random class-label dropout (p hard-coded 0.1): off, for comparable grads
        if type(mod).__name__ == "LabelEmbedding":
            mod.dropout_prob = 0.0
    return m


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4, vocab_size=128, intermediate_size=128,
                                        max_position_embeddings=64, tie_word_embeddings=False))


def _gen():
    return torch.Generator().manual_seed(0)


# name: (build, inputs, policy, needs example_inputs). Shipped policies: vit / llama (W4A4 + H, head FP) and DiT-XL/2's
# (W1.58 + H + LRB 32 in the blocks, adaLN W4A4, 8-bit attention q/k/v, embeddings and final layer FP).
MODELS = {
    "mlp": (_mlp, lambda: (torch.randn(4, 32, generator=_gen()),), LRB, False),
    "vit": (_vit, lambda: (torch.randn(2, 3, 16, 16, generator=_gen()),), "vit", True),
    "dit": (_dit, lambda: {"hidden_states": torch.randn(2, 4, 8, 8, generator=_gen()),
                           "timestep": torch.tensor([3, 700]), "class_labels": torch.tensor([1, 7]),
                           "return_dict": False}, "dit-xl-2-robuq", True),
    "llama": (_llama, lambda: {"input_ids": torch.randint(0, 128, (2, 8), generator=_gen()), "use_cache": False},
              "llama", True),
}
_QUANTIZED: dict = {}


def _quantized(name):
    """(FP model, robuq_fx.quantize model, inputs), built once: export capture is the slow part. Do not mutate."""
    if name not in _QUANTIZED:
        build, make_inputs, policy, needs_example = MODELS[name]
        model, inputs = build(), make_inputs()
        _QUANTIZED[name] = (model, robuq_fx.quantize(model, policy, inputs if needs_example else None), inputs)
    return _QUANTIZED[name]


def _run(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return getattr(out, "logits", out)


def _seed_reference(model, specs: dict):
    """Eager reference through the seed API: layer name -> RobuQLinear kwargs (others stay FP), packed."""
    ref = copy.deepcopy(model)
    for name, kw in specs.items():
        parent, _, leaf = name.rpartition(".")
        owner = ref.get_submodule(parent) if parent else ref
        q = replace_linear_layer(getattr(owner, leaf), **kw)
        setattr(owner, leaf, q.prepare_for_inference())
    return ref


def _no_dropout(model):
    """Dropout p=0: eager and compiled dropout draw different random masks; gradients are compared bit for bit."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _compiled_error(fn):
    """Dynamo wraps a backend's exception in BackendCompilerFailed: return the backend's own error."""
    try:
        fn()
    except torch._dynamo.exc.BackendCompilerFailed as e:
        return e.inner_exception
    except B.BackendError as e:
        return e
    raise AssertionError("no error raised")


# ---- inference ----------------------------------------------------------------------------------------------------
def test_string_backend_inductor_mlp_matches_lower():
    model, qmodel, inputs = _quantized("mlp")
    ref = robuq_fx.lower(qmodel)(*inputs)
    compiled = torch.compile(model.eval(), backend="robuq", options={"policy": LRB})
    with torch.no_grad():
        out = compiled(*inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "vit", "dit", "llama"])
def test_inference_is_bit_identical_to_lower_of_quantize(name):
    model, qmodel, inputs = _quantized(name)
    model.eval()
    policy = MODELS[name][2]
    backend = robuq_fx.backend(policy, compiler="eager")
    with torch.no_grad():
        ref = _run(robuq_fx.lower(qmodel), inputs)
        out = _run(torch.compile(model, backend=backend), inputs)
    assert torch.equal(out, ref)
    info = robuq_fx.robuq_info(qmodel)
    quantized = {n for n, d in backend.layers.items() if not d.startswith(("FP", "attention"))}
    assert quantized == set(info["layers"])  # the same layers, no more, no less
    assert {n for n, d in backend.layers.items() if d.startswith("attention")} == set(info.get("attention", {}))
    assert backend.unseen(model) == []


def test_recompiles_and_dynamic_batch_do_not_requantize(monkeypatch):
    calls = []
    real = robuq_fx.PackedLinear.from_float.__func__
    monkeypatch.setattr(robuq_fx.PackedLinear, "from_float",
                        classmethod(lambda cls, *a, **k: calls.append(1) or real(cls, *a, **k)))
    model = _mlp().eval()
    lowered = robuq_fx.lower(robuq_fx.quantize(model, W4A4))
    calls.clear()
    backend = B.make_backend(W4A4, compiler="eager")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for batch in (2, 3, 5, 7):  # 3 makes Dynamo recompile with a dynamic batch; 5 and 7 reuse that graph
            x = torch.randn(batch, 32)
            assert torch.equal(compiled(x), lowered(x))
        model.train()
        compiled(torch.randn(3, 32))  # train/eval switch: a recompile
        model.eval()
        x = torch.randn(2, 5, 32)  # a new rank: another recompile
        assert torch.equal(compiled(x), lowered(x))
    assert backend.graphs == 4
    assert len(calls) == 3  # one quantization per layer, whatever the recompiles
    calls.clear()
    with torch.no_grad():
        model.fc2.weight.mul_(0.5)  # in-place update (an optimizer step, load_state_dict): fc2 alone is repacked
        x = torch.randn(3, 32)
        out = compiled(x)
        assert len(calls) == 1
        assert torch.equal(out, robuq_fx.lower(robuq_fx.quantize(model, W4A4))(x))


def test_graph_breaks_keep_every_layer_quantized():
    torch.manual_seed(0)
    model = Branchy().eval()
    backend = B.make_backend(W4A4, compiler="eager")
    x = torch.randn(3, 16)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    spec = {"nbits": 4, "w_bits": 4, "if_hadamard": True}
    ref = _seed_reference(model, {n: spec for n in ("inp", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1",
                                                    "blocks.1.fc2", "out")})
    with torch.no_grad():
        assert torch.equal(out, ref(x))
    assert backend.graphs >= 4  # inp | rest of forward | each block's two halves (one graph serves both blocks)
    assert backend.unseen(model) == []


def test_graph_break_inside_a_loop_leaves_the_frame_to_python_and_unseen_says_so():
    # Dynamo cannot resume a frame after a graph break inside a loop body's call: it runs the rest of that frame in
    # plain Python, so `out` never reaches the backend. The blocks still compile (their own frames, one graph for
    # both instances) and each uses its own packed weights.
    torch.manual_seed(0)
    model = Branchy(loop=True).eval()
    backend = B.make_backend(W4A4, compiler="eager")
    x = torch.randn(3, 16)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    spec = {"nbits": 4, "w_bits": 4, "if_hadamard": True}
    ref = _seed_reference(model, {n: spec for n in ("inp", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1",
                                                    "blocks.1.fc2")})
    with torch.no_grad():
        assert torch.equal(out, ref(x))
    assert backend.unseen(model) == ["out"]


def test_one_graph_for_blocks_with_different_specs_gets_a_variant():
    torch.manual_seed(0)
    model = Branchy(loop=True).eval()
    policy = {"rules": [{"match": "blocks.1.fc1", "w_bits": 4, "a_bits": 8, "hadamard": True}, *W4A4["rules"]]}
    backend = B.make_backend(policy, compiler="aot_eager")
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning, match="quantizes differently"), torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    w4a4, w4a8 = {"nbits": 4, "w_bits": 4, "if_hadamard": True}, {"nbits": 8, "w_bits": 4, "if_hadamard": True}
    ref = _seed_reference(model, {"inp": w4a4, "blocks.0.fc1": w4a4, "blocks.0.fc2": w4a4, "blocks.1.fc1": w4a8,
                                  "blocks.1.fc2": w4a4})
    with torch.no_grad():
        assert torch.equal(out, ref(x))
    assert backend.layers["blocks.1.fc1"] == "W4A8 H16"


class MatmulForms(nn.Module):
    """Linear layers written as addmm(b, x, W.t()) and x @ W.T."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 16, bias=False)

    def forward(self, x):
        h = torch.addmm(self.a.bias, x, self.a.weight.t())
        return torch.relu(h) @ self.b.weight.T


def test_addmm_and_matmul_with_transposed_weights_are_linears():
    torch.manual_seed(0)
    model = MatmulForms().eval()
    plain = nn.Sequential(model.a, nn.ReLU(), model.b)  # the same weights as nn.Linear calls
    x = torch.randn(4, 32)
    backend = B.make_backend(W4A4, compiler="eager")
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        ref = robuq_fx.lower(robuq_fx.quantize(plain, W4A4))(x)
    assert set(backend.layers) == {"a", "b"}
    assert torch.equal(out, ref)


def test_lowered_qat_model_compiles_and_a_qat_graph_is_refused_in_inference_mode():
    model, qmodel, inputs = _quantized("mlp")
    qmodel = copy.deepcopy(qmodel).eval()
    with torch.no_grad():  # "learned" weights that differ from the FP model's
        qmodel.fc1.weight.add_(0.01)
        qmodel.fc1.lrb_up.mul_(1.5)
    lowered = robuq_fx.lower(qmodel)
    backend = B.make_backend(compiler="eager")  # default policy: must not touch the lowered model's FP layers
    with torch.no_grad():
        assert torch.equal(torch.compile(lowered, backend=backend)(*inputs), lowered(*inputs))
        assert torch.equal(torch.compile(qmodel, backend=B.make_backend(mode="qat", compiler="eager"))(*inputs),
                           qmodel(*inputs))
        err = _compiled_error(lambda: torch.compile(qmodel, backend=backend)(*inputs))
    assert isinstance(err, B.BackendError) and "robuq_fx.lower(qmodel)" in str(err) and "mode='qat'" in str(err)


# ---- QAT ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "vit", "dit", "llama"])
def test_qat_gradients_through_aot_autograd_equal_quantize(name):
    model, qmodel, inputs = _quantized(name)
    policy = MODELS[name][2]
    ref_model = _no_dropout(copy.deepcopy(qmodel).train())
    _run(ref_model, inputs).square().mean().backward()
    ref = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}

    mine = _no_dropout(B.prepare_qat(copy.deepcopy(model).train(), policy))
    backend = B.make_backend(policy, mode="qat", compiler="aot_eager")
    _run(torch.compile(mine, backend=backend), inputs).square().mean().backward()
    got = {n: p.grad for n, p in mine.named_parameters() if p.grad is not None}
    assert set(got) == set(ref)  # the same trainable tensors get gradients (weights, biases, low-rank branches)
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


def test_qat_training_step_through_inductor():
    model = _mlp()
    x, target = torch.randn(8, 32, generator=_gen()), torch.randn(8, 16, generator=_gen())
    ref_model = _no_dropout(robuq_fx.quantize(model, LRB).train())
    mine = _no_dropout(B.prepare_qat(copy.deepcopy(model).train(), LRB))
    compiled = torch.compile(mine, backend=robuq_fx.backend(LRB, mode="qat"))
    for m in (ref_model, compiled):
        torch.nn.functional.mse_loss(m(x), target).backward()
    ref = dict(ref_model.named_parameters())
    for n, p in mine.named_parameters():
        torch.testing.assert_close(p.grad, ref[n].grad, rtol=1e-5, atol=1e-6, msg=n)
    before = mine.fc1.lrb_up.detach().clone()
    torch.optim.SGD(mine.parameters(), lr=0.1).step()  # the low-rank branch is a parameter of *your* model
    assert not torch.equal(mine.fc1.lrb_up, before)


def _count_sides(monkeypatch) -> list:
    """Counts qat_step._all_sides calls (the step weight sides computed eagerly: on the CPU, every call)."""
    from robuq_fx import qat_step
    calls, real = [], qat_step._all_sides
    monkeypatch.setattr(qat_step, "_all_sides", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("name", ["mlp", "vit", "dit", "llama"])
def test_qat_step_weight_sides_equal_quantize(name, monkeypatch):
    """weight_sides="step" (backend/weight_sides.py): every layer's weight side computed once a call through one
    WeightSides node, the graph's sites taking it as inputs; the gradients of every trainable tensor (weights, biases,
    branches) equal robuq_fx.quantize's up to summation order (its backward sums the branch terms in another order,
    as weight_sides_per_forward's, tests/test_qat_step.py)."""
    model, qmodel, inputs = _quantized(name)
    policy = MODELS[name][2]
    ref_model = _no_dropout(copy.deepcopy(qmodel).train())
    _run(ref_model, inputs).square().mean().backward()
    ref = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    calls = _count_sides(monkeypatch)
    mine = _no_dropout(B.prepare_qat(copy.deepcopy(model).train(), policy))
    backend = B.make_backend(policy, mode="qat", compiler="aot_eager", weight_sides="step")
    compiled = torch.compile(mine, backend=backend)
    out = _run(compiled, inputs)
    out.square().mean().backward()
    assert calls, "the weight sides were not hoisted"
    n_calls = len(calls)
    got = {n: p.grad for n, p in mine.named_parameters() if p.grad is not None}
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)
    _run(compiled, inputs)  # a second call: its weight sides computed again (one WeightSides node a graph and call)
    assert len(calls) > n_calls


@pytest.mark.parametrize("widened", [False, True])
def test_qat_auto_weight_sides_are_the_step_form_on_cuda_only(widened, monkeypatch):
    """weight_sides="auto" (the default): the step form where the graph's layers are on CUDA (here the device check
    widened to the CPU: the same calls and gradients as "step"), the per-layer form elsewhere (no hoisting)."""
    from robuq_fx import qat_step_hooks
    if widened:
        monkeypatch.setattr(qat_step_hooks, "_device_ok", lambda t: True)
    model = _mlp()
    x = torch.randn(8, 32, generator=_gen())
    grads = {}
    for sides in ("auto", "step" if widened else "layer"):
        calls = _count_sides(monkeypatch)
        mine = _no_dropout(B.prepare_qat(copy.deepcopy(model).train(), LRB))
        backend = B.make_backend(LRB, mode="qat", compiler="aot_eager", weight_sides=sides)
        assert repr(backend).count("weight_sides=") == (sides != "auto")
        torch._dynamo.reset()
        torch.compile(mine, backend=backend)(x).square().mean().backward()
        torch._dynamo.reset()
        assert bool(calls) == widened, sides
        grads[sides] = {n: p.grad for n, p in mine.named_parameters()}
    a, b = grads.values()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_qat_step_weight_sides_train_through_inductor(monkeypatch):
    """The MLP's training steps through Inductor with weight_sides="step" follow the plain qat mode's."""
    model = _mlp()
    x, target = torch.randn(8, 32, generator=_gen()), torch.randn(8, 16, generator=_gen())
    calls = _count_sides(monkeypatch)
    runs = {}
    for sides in ("layer", "step"):
        mine = _no_dropout(B.prepare_qat(copy.deepcopy(model).train(), LRB))
        compiled = torch.compile(mine, backend=robuq_fx.backend(LRB, mode="qat", weight_sides=sides))
        opt = torch.optim.AdamW(mine.parameters(), lr=1e-2)
        outs = []
        for _ in range(3):
            y = compiled(x)
            torch.nn.functional.mse_loss(y, target).backward()
            outs.append((y.detach(), {n: p.grad.clone() for n, p in mine.named_parameters()}))
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs[sides] = outs
        torch._dynamo.reset()
    assert len(calls) == 4  # step: one at the build, one a step (layer: none)
    (y0, g0), (y1, g1) = runs["layer"][0], runs["step"][0]
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)
    assert all(torch.isfinite(y).all() for y, _ in runs["step"])


def test_qat_step_weight_sides_leave_a_graph_entering_autocast_to_the_plain_mode(monkeypatch):
    """A graph that enters autocast itself keeps each layer's weight side inside (its matmul dtype is not the one in
    force when the backend compiles): no WeightSides node, the same output as the plain qat mode."""
    model = _mlp()
    x = torch.randn(8, 32, generator=_gen())
    calls = _count_sides(monkeypatch)
    outs = []
    for sides in ("layer", "step"):
        mine = _no_dropout(B.prepare_qat(copy.deepcopy(model).train(), LRB))

        def fn(x, mine=mine):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return mine(x)
        outs.append(torch.compile(fn, backend=B.make_backend(LRB, mode="qat", compiler="aot_eager",
                                                             weight_sides=sides))(x))
        torch._dynamo.reset()
    assert not calls
    assert torch.equal(outs[0], outs[1])


def test_qat_step_weight_sides_keep_a_cuda_graph_per_block_of_a_shared_graph(monkeypatch):
    """Branchy's graph breaks inside each block make Dynamo run one graph for both blocks' halves: in step mode that
    graph's weight sides get a CUDA graph per block (keyed by the masters), replayed on later calls instead of captured
    again at every call (which a single graph per plan did); outputs and gradients equal the graph-less run's bit for
    bit. CPU, with qat_graph's stand-in backend (tests/qat_testing.py)."""
    from robuq_fx import qat_graph, qat_step
    from tests.qat_testing import Replays
    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(3, 16)

    be = Replays()

    def run(calls):
        mine = B.prepare_qat(copy.deepcopy(model).train(), LRB)
        compiled = torch.compile(mine, backend=B.make_backend(LRB, mode="qat", compiler="aot_eager",
                                                              weight_sides="step"))
        outs, counts = [], []
        for _ in range(calls):
            y = compiled(x)
            y.square().mean().backward()
            outs.append((y.detach(), {n: p.grad.clone() for n, p in mine.named_parameters()}))
            counts.append((be.captures, be.replays))
            mine.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        return outs, counts
    want, _ = run(3)
    monkeypatch.setattr(qat_graph, "_BACKEND", [be])
    monkeypatch.setattr(qat_step, "_use_graphs", lambda t: True)
    got, counts = run(3)
    for (y1, g1), (y0, g0) in zip(got, want):
        assert torch.equal(y1, y0) and g1.keys() == g0.keys()
        assert all(torch.equal(g1[k], g0[k]) for k in g0)
    # a call runs 6 weight-side graphs each way (inp, out, and the blocks' two shared halves for each block): all
    # captured on the first call, then only replayed (with one graph a plan, the halves were captured at every call)
    assert counts[1][0] == counts[2][0] == counts[0][0] >= 12, counts
    assert counts[2][1] - counts[1][1] == counts[1][1] - counts[0][1] == 12, counts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_qat_step_weight_sides_on_cuda_follow_weight_sides_per_forward():
    """On CUDA under bf16 autocast weight_sides="step" runs what `robuq_fx.weight_sides_per_forward` runs for a
    quantize model (the weight sides from one CUDA graph replay each way, the act op on both layers): the Inductor-
    compiled step through the backend against that model run eagerly, first step (output to 4e-3, gradients to 1e-2,
    the branch factors' to 3e-2: tests/test_qat_step.py's act-op bounds), and three steps train to finite values."""
    policy = {"rules": [{"type": "Linear", "w_bits": 1.58, "a_bits": 4, "hadamard": True, "hadamard_block": 128,
                         "lora_rank": 32}]}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 256)).cuda().train()
    x = torch.randn(4, 33, 256, device="cuda")
    ref_model = robuq_fx.quantize(copy.deepcopy(model), policy).train()
    robuq_fx.weight_sides_per_forward(ref_model)
    mine = B.prepare_qat(copy.deepcopy(model), policy)
    mine.load_state_dict(ref_model.state_dict(), strict=False)
    compiled = torch.compile(mine, backend=B.make_backend(policy, mode="qat", weight_sides="step"))
    outs = []
    for m, params in ((ref_model, dict(ref_model.named_parameters())), (compiled, dict(mine.named_parameters()))):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        outs.append((y.detach().float(), {k: p.grad.clone() for k, p in params.items()}))
    (y0, g0), (y1, g1) = outs
    from tests.qat_testing import rel
    assert rel(y1, y0) <= 4e-3
    assert set(g1) == set(g0)
    for k in g0:
        assert rel(g1[k], g0[k]) <= (3e-2 if "lrb_" in k else 1e-2), k
    opt = torch.optim.AdamW(mine.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = compiled(x)
        y.float().square().mean().backward()
        opt.step()
        assert torch.isfinite(y).all()


def test_prepare_qat_registers_trainable_branch_once():
    model = _mlp()
    B.prepare_qat(model, LRB)
    names = {n for n, _ in model.named_parameters()}
    assert {"fc1.lrb_down", "fc1.lrb_up", "fc3.lrb_down", "fc3.lrb_up"} <= names
    assert model.fc1.lrb_down.shape == (4, 32) and model.fc1.lrb_up.shape == (64, 4)
    before = model.fc1.lrb_down
    B.prepare_qat(model, LRB)  # idempotent: the trained branch is kept
    assert model.fc1.lrb_down is before
    with pytest.raises(B.BackendError, match="lora_rank=8"):
        B.prepare_qat(model, {"rules": [{"type": "Linear", "lora_rank": 8}]})


def test_inference_uses_the_prepared_branch():
    model = B.prepare_qat(_mlp().eval(), LRB)
    with torch.no_grad():
        model.fc1.lrb_up.mul_(2)  # as if trained
    qmodel = robuq_fx.quantize(model, LRB)
    with torch.no_grad():
        qmodel.fc1.lrb_up.copy_(model.fc1.lrb_up)
        x = torch.randn(4, 32)
        out = torch.compile(model, backend=B.make_backend(LRB, compiler="eager"))(x)
        assert torch.equal(out, robuq_fx.lower(qmodel)(x))


# ---- errors and warnings ------------------------------------------------------------------------------------------
BAD_FC2 = [{"match": "fc2", "w_bits": 4, "a_bits": 4, "hadamard_block": 128}]  # 128 does not divide 64 inputs


def test_a_matched_layer_that_cannot_be_quantized_is_an_error():
    model = _mlp().eval()
    backend = B.make_backend({"rules": BAD_FC2 + W4A4["rules"]}, compiler="eager")
    err = _compiled_error(lambda: torch.compile(model, backend=backend)(torch.randn(2, 32)))
    assert isinstance(err, B.BackendError) and "fc2" in str(err) and "hadamard_block=128" in str(err)
    assert '"strict": false' in str(err)


def test_qat_lrb_without_prepare_qat_is_an_error():
    err = _compiled_error(lambda: torch.compile(_mlp(), backend=B.make_backend(LRB, "qat", compiler="eager"))(
        torch.randn(2, 32)))
    assert "prepare_qat" in str(err) and "fc1" in str(err)


def test_strict_false_keeps_the_layer_fp_with_one_warning():
    model = _mlp().eval()
    policy = {"rules": BAD_FC2 + W4A4["rules"], "strict": False}
    backend = B.make_backend(policy, compiler="eager")
    compiled = torch.compile(model, backend=backend)
    with pytest.warns(UserWarning, match=r"full precision:\n  fc2: .*hadamard_block=128") as record, torch.no_grad():
        x = torch.randn(2, 32)
        out = compiled(x)
        model.train()
        compiled(torch.randn(3, 32))  # recompiles: no second warning
        model.eval()
    assert sum("full precision" in str(w.message) for w in record) == 1
    assert backend.layers["fc2"].startswith("FP (")
    skip_fc2 = {"rules": [{"match": "fc2", "skip": True}, *W4A4["rules"]]}
    with torch.no_grad():
        assert torch.equal(out, robuq_fx.lower(robuq_fx.quantize(model, skip_fc2))(x))


def test_configuration():
    b = robuq_fx.backend.make_backend("llama", mode="qat", strict=False)
    assert (b.mode, b.strict) == ("qat", False)
    assert isinstance(B("vit", "inference"), B.RobuQBackend)  # the module itself is the factory
    with pytest.raises(B.BackendError, match="mode="):
        B.make_backend(mode="train")
    with pytest.raises(B.BackendError, match="unknown robuq backend option"):
        b.with_options({"polcy": "vit"})
    with pytest.raises(B.BackendError, match="weight_sides="):
        B.make_backend(mode="qat", weight_sides="once")
    assert b.with_options({"weight_sides": "step"}).weight_sides == "step"
    assert b.with_options({"mode": "inference"}).policy is b.policy


def test_backend_name_works_without_importing_robuq_fx():
    # backend="robuq" resolves through the torch_dynamo_backends entry point (pyproject.toml), which imports us
    code = ("import sys, torch\n"
            "m = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()\n"
            "assert 'robuq_fx' not in sys.modules\n"
            "c = torch.compile(m, backend='robuq', options={'compiler': 'eager'})\n"
            "with torch.no_grad(): c(torch.randn(2, 8))\n"
            "from robuq_fx.backend import _INSTANCES\n"
            "print(*[b.layers for b in _INSTANCES.values()])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "{'0': 'W4A4 H8'}"
