"""`LayerSpec.a_group` (issue 20's option): one activation range per token and g consecutive inputs of x H instead of
one per token, so that a GEMM's K tile can quantize its slice of a row on its own. Checked on the CPU: the spec's
validation, the quantizer against per-slice calls of the per-token math, the op's STE and its compiled form, QAT's
fused path against the op graph (tests/test_qat_fused.py's SPECS), lowering bit-identical to QAT eval, the
integer-product reference, checkpoints and policies. On the GPU the fp8 path takes a_group = 128 (the block quantizer
and the block-scaled GEMM: tests/kernels/test_block_scaled.py); other groups fall back to the reference math with a
warning (below)."""
from __future__ import annotations

import copy

import pytest
import torch

import robuq_fx
from robuq_fx import quantizers as Q
from robuq_fx.errors import SpecError
from robuq_fx.spec import LayerSpec

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]
FORMS = [(4, True, "absmax"), (3, True, "sigma"), (3, False, "absmax"), (2, False, "sigma")]


def test_spec_checks_and_names_the_group():
    for bad in (-1, True, 1.5, "128"):
        with pytest.raises(SpecError, match="a_group="):
            LayerSpec(a_group=bad)
    with pytest.raises(SpecError, match=r"layer 'fc1' .*a_group=96 does not divide in_features=256"):
        LayerSpec(a_group=96).resolve(256, 64, "fc1")
    spec = LayerSpec(w_bits=4, a_bits=4, a_group=128).resolve(256, 64)
    assert spec.a_group == 128 and spec.short().endswith("ag128") and spec.to_dict()["a_group"] == 128
    assert LayerSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("a_bits,sym,clip", FORMS)
def test_quantizer_is_the_per_token_math_on_each_slice(a_bits, sym, clip):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 256) * torch.linspace(0.1, 4, 256)  # slices with different ranges
    g = 64
    q, s, lo = Q.quantize_act(x, a_bits, sym, clip, group=g)
    assert q.shape == x.shape and s.shape == lo.shape == (5, 3, 4)
    for j in range(4):
        qj, sj, loj = Q.quantize_act(x[..., j * g:(j + 1) * g], a_bits, sym, clip)
        assert torch.equal(q[..., j * g:(j + 1) * g], qj)
        assert torch.equal(s[..., j], sj.squeeze(-1)) and torch.equal(lo[..., j], loj.squeeze(-1))
    fq = Q.fake_quant_act(x, a_bits, sym, clip, group=g)
    per = torch.cat([Q.fake_quant_act(x[..., j * g:(j + 1) * g], a_bits, sym, clip) for j in range(4)], -1)
    assert torch.equal(fq, per)
    mask = Q.act_ste_mask(x, a_bits, sym, clip, group=g)
    assert torch.equal(mask, torch.cat([Q.act_ste_mask(x[..., j * g:(j + 1) * g], a_bits, sym, clip)
                                        for j in range(4)], -1))
    # one group as wide as the row is the per-token quantizer
    assert torch.equal(Q.fake_quant_act(x, a_bits, sym, clip, group=256), Q.fake_quant_act(x, a_bits, sym, clip))
    # finer ranges: a smaller error on these rows, whose columns differ in scale by 40x
    assert (fq - x).norm() < (Q.fake_quant_act(x, a_bits, sym, clip) - x).norm()


def test_op_forward_backward_and_compiled():
    torch.manual_seed(0)
    x = torch.randn(6, 128) * 3
    x[0, 5] = 40.0  # an outlier: the sigma range clips it; its group's range, not its row's, moves
    xr = x.clone().requires_grad_()
    y = torch.ops.robuq.fake_quant_act(xr, 2, False, "sigma", 32)
    assert torch.equal(y, Q.fake_quant_act(x, 2, False, "sigma", group=32))
    y.sum().backward()
    assert torch.equal(xr.grad, Q.act_ste_mask(x, 2, False, "sigma", group=32).float())
    assert xr.grad[0, 5] == 0
    assert not torch.equal(xr.grad, Q.act_ste_mask(x, 2, False, "sigma").float())  # not the per-token mask
    torch._dynamo.reset()
    f = torch.compile(lambda t: torch.ops.robuq.fake_quant_act(t, 3, True, "absmax", group=32))
    assert torch.equal(f(x), Q.fake_quant_act(x, 3, True, "absmax", group=32))


RULES = {"W4A4+H ag16": {"w_bits": 4, "a_bits": 4, "hadamard": True, "a_group": 16},
         "W1.58A3 asym sigma +H+LRB ag8": {"w_bits": 1.58, "a_bits": 3, "a_sym": False, "a_clip": "sigma",
                                            "hadamard": True, "lora_rank": 4, "a_group": 8}}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("whole_graph", [False, True])
def test_lowered_dit_equals_qat_eval_and_checkpoint_round_trip(rule, whole_graph, tmp_path):
    from tests.models.conftest import CASES
    case = CASES["dit"]
    pol = robuq_fx.Policy.from_dict({"rules": [{"type": "Linear", **RULES[rule]}]})
    q = robuq_fx.quantize(case.build(0), pol, example_inputs=case.make_inputs(), whole_graph=whole_graph).eval()
    x = case.make_inputs()
    low = robuq_fx.lower(copy.deepcopy(q), progress=False)
    with torch.no_grad():
        ref, out = case.run(q, x), case.run(low, x)
    assert torch.equal(out, ref)
    path = robuq_fx.save_quantized(low, tmp_path / "ag.safetensors")
    loaded = robuq_fx.load_quantized(path, case.build(1), example_inputs=case.make_inputs())
    specs = {m.spec for m in loaded.modules() if hasattr(m, "spec") and hasattr(m, "qweight")}
    assert specs and all(s.a_group == RULES[rule]["a_group"] for s in specs)
    with torch.no_grad():
        assert torch.equal(case.run(loaded, x), ref)


def test_integer_reference_agrees():
    from robuq_fx.kernels.reference import integer_qlinear, reference_qlinear
    from robuq_fx.kernels.registry import QLinearArgs
    from robuq_fx.modules import PackedLinear
    torch.manual_seed(0)
    for rule in RULES.values():
        spec = LayerSpec(**{k: v for k, v in rule.items()}).resolve(128, 48)
        r = spec.lora_rank
        m = PackedLinear.from_float(torch.randn(48, 128) / 11, torch.randn(48) * 0.1,
                                    torch.randn(r, 128) * 0.05 if r else None,
                                    torch.randn(48, r) * 0.05 if r else None, spec)
        a = QLinearArgs(m.qweight, m.w_scale, m.bias, m.lrb_down, m.lrb_up, *m.op_args(), a_group=spec.a_group)
        x = torch.randn(7, 128, dtype=torch.float64).float()
        ref, integer = reference_qlinear(x, a), integer_qlinear(x, a)
        assert ((ref - integer).norm() / ref.norm()).item() < 1e-5
        assert torch.equal(m(x), ref)


def test_policy_files_take_it(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("rules:\n  - type: Linear\n    w_bits: 4\n    a_bits: 4\n    a_group: 128\n")
    pol = robuq_fx.Policy.load(p)
    assert pol.rules[0].spec.a_group == 128
    p.write_text("rules:\n  - type: Linear\n    a_group: -2\n")
    with pytest.raises(robuq_fx.PolicyError, match=r"p.yaml: rule 0 .*a_group=-2"):
        robuq_fx.Policy.load(p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_calls_fall_back_to_the_reference_with_a_warning():
    """Groups the fp8 path does not take (it takes a_group = the Hadamard block = 128: tests/kernels/
    test_block_scaled.py) run the reference math on the GPU (equal to the forced reference kernel), eagerly and
    compiled, and say so once."""
    from robuq_fx import kernels
    from robuq_fx.kernels import registry
    from robuq_fx.modules import PackedLinear
    torch.manual_seed(0)
    spec = LayerSpec(w_bits=4, a_bits=4, hadamard=True, a_group=64).resolve(1152, 512)
    m = PackedLinear.from_float(torch.randn(512, 1152) / 34, torch.randn(512) * 0.1, None, None, spec)
    m = m.cuda().to(torch.bfloat16)
    x = torch.randn(4096, 1152, device="cuda", dtype=torch.bfloat16)
    registry._WARNED.clear()
    with pytest.warns(UserWarning, match="a_group=64"), torch.no_grad():
        got = m(x)
    with kernels.use("reference"), torch.no_grad():
        want = m(x)
    assert torch.equal(got, want)
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.equal(torch.compile(m)(x), want)
