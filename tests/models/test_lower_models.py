"""Lowering pass (`robuq_fx.lower`) on real model families: the packed model (the user's class, PackedLinear layers)
must reproduce the QAT model in eval mode bit for bit (fp32, CPU), run one `robuq::qlinear` per quantized call site
and no fake-quant op, and keep no FP master weight for quantized layers. Models: see conftest.py (the HF ViT stands in for timm's vit_tiny,
which cannot be installed here)."""
from __future__ import annotations

import copy

import pytest
import torch

import robuq_fx

from .conftest import CASES, cached, cached_lowered

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.export's deprecated LeafSpec on deepcopy
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # torch.jit.script_method inside inductor

ROBUQ = torch.ops.robuq
QAT_OPS = (ROBUQ.fake_quant_weight.default, ROBUQ.fake_quant_act.default, ROBUQ.hadamard.default)


@pytest.mark.parametrize("kind", ["lrb", "a2"])
def test_lowered_is_bit_identical_to_qat_eval(case, kind):
    """Exact equality holds because the reference qlinear kernel runs the very function the QAT graph inlines
    (`layer.robuq_linear`) on Q_w(R) rebuilt from the packed codes, which are the exact values fake-quant produced."""
    _, qmodel = cached(case, kind)
    lowered = cached_lowered(case, kind)
    for batch, seed in ((2, 0), (3, 7)):  # also a batch size other than the captured one
        x = case.make_inputs(batch=batch, seed=seed)
        with torch.no_grad():
            ref = case.run(qmodel.eval(), x)
            out = case.run(lowered, x)
        assert out.dtype == torch.float32
        assert torch.equal(out, ref), f"{case.name}/{kind}: max |diff| {(out - ref).abs().max().item():.3g}"


@pytest.mark.parametrize("kind", ["lrb", "a2"])
def test_lowered_model_runs_qlinear_and_no_fake_quant(case, kind):
    model, qmodel = cached(case, kind)
    lowered = cached_lowered(case, kind, fuse=False)  # one call per site; fused siblings: tests/passes/test_fuse.py
    layers = list(robuq_fx.robuq_info(qmodel)["layers"])
    x = case.make_inputs()
    sites = sum(case.call_counts(model, x)[n] for n in layers)
    ops = case.run_counts(lowered, x)
    assert ops[ROBUQ.qlinear.default] == sites
    assert not [t for t in ops if t in QAT_OPS]
    assert type(lowered) is type(model) and robuq_fx.robuq_info(lowered)["stage"] == "lowered"
    # every layer is its own PackedLinear, where the user's linear was
    assert all(type(lowered.get_submodule(n)) is robuq_fx.PackedLinear for n in layers)
    # the QAT model still runs its fake-quant layers (lower works on a copy)
    assert case.run_counts(qmodel, x)[ROBUQ.fake_quant_weight.default] == sites


@pytest.mark.parametrize("kind", ["lrb", "a2"])
def test_lowered_state_dict_drops_fp_weights(case, kind):
    model, qmodel = cached(case, kind)
    lowered = cached_lowered(case, kind, fuse=False)  # per-layer keys (a fused model's: unfused_state_dict)
    sd = lowered.state_dict()
    layers = list(robuq_fx.robuq_info(qmodel)["layers"])
    for name in layers:
        assert f"{name}.weight" not in sd, name
        assert sd[f"{name}.qweight"].dtype == torch.uint8
        assert f"{name}.w_scale" in sd
        assert (f"{name}.lrb_down" in sd) == (kind == "lrb")
        assert isinstance(lowered.get_submodule(name), robuq_fx.PackedLinear)
    # everything that is not a quantized layer's weight is still there (embeddings, norms, skipped lm_head, ...)
    quantized = {f"{n}.{p}" for n in layers for p in ("weight", "bias", "lrb_down", "lrb_up")}
    assert set(model.state_dict()) - quantized <= set(sd)
    if case.name == "llama":
        assert "lm_head.weight" in sd and "model.embed_tokens.weight" in sd
    # packed weights are smaller than the fp32 ones they replace
    packed = sum(sd[f"{n}.qweight"].numel() for n in layers)
    fp_bytes = sum(4 * model.get_submodule(n).weight.numel() for n in layers)
    assert packed < fp_bytes / 8


def _inductor_usable() -> str | None:
    try:
        from torch._inductor import cpp_builder
        cpp_builder.get_cpp_compiler()
    except Exception as e:  # noqa: BLE001
        return f"no C++ compiler for the inductor CPU backend: {e}"
    return None


def test_torch_compile_lowered_mlp():
    why = _inductor_usable()
    if why:
        pytest.skip(why)
    case = CASES["mlp"]
    lowered = copy.deepcopy(cached_lowered(case, "lrb"))
    x = case.make_inputs(batch=5, seed=3)
    with torch.no_grad():
        ref = case.run(lowered, x)
        compiled = torch.compile(lowered, backend="inductor", fullgraph=True)
        out = case.run(compiled, x)
    # robuq::qlinear is an opaque custom op (inductor calls its eager kernel); only the GELUs between layers are
    # generated code, whose vectorised erf may differ from ATen's in the last bits.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_llama_return_dict_false_static_batch():
    """`return_dict=False` goes into LlamaForCausalLM.forward's **kwargs; torch.export (2.13) then rejects every
    dynamic_shapes spec (it flattens **kwargs differently in two places), so the whole-graph capture falls back to a
    static batch. The model must still quantize, return the tuple form, and lower bit-identically (both forms)."""
    case = CASES["llama"]
    x = {**case.make_inputs(), "return_dict": False}
    for whole_graph in (False, True):
        qmodel = case.quantize(case.build(0), "a2", x, whole_graph=whole_graph).eval()
        lowered = robuq_fx.lower(qmodel)
        with torch.no_grad():
            out = qmodel(**x)
            assert isinstance(out, tuple) and out[0].shape == (2, 8, 128)
            assert torch.equal(lowered(**x)[0], out[0])
