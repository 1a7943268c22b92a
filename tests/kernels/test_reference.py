"""The reference kernel and the integer/epilogue form that fast kernels implement; the kernel registry."""
import pytest
import torch

import robuq_fx
from robuq_fx import kernels
from robuq_fx.kernels.reference import integer_qlinear, reference_qlinear
from robuq_fx.kernels.registry import QLinearArgs
from robuq_fx.layer import lrb_init
from robuq_fx.modules import PackedLinear
from robuq_fx.spec import LayerSpec


def packed(spec_kw, k=256, n=48, bias=True):
    torch.manual_seed(0)
    spec = LayerSpec(**spec_kw).resolve(k, n)
    w = torch.randn(n, k)
    down, up = lrb_init(w, spec) if spec.lora_rank else (None, None)
    return PackedLinear.from_float(w, torch.randn(n) if bias else None, down, up, spec)


def args_of(m):
    return QLinearArgs(m.qweight, m.w_scale, m.bias, m.lrb_down, m.lrb_up, *m.op_args())


@pytest.mark.parametrize("spec_kw", [
    dict(w_bits=1.58, a_bits=4), dict(w_bits=1.58, a_bits=2, lora_rank=8), dict(w_bits=4, a_bits=1),
    dict(w_bits=3, a_bits=3, a_sym=False), dict(w_bits=2, a_bits=4, hadamard=False), dict(w_bits=4, a_bits=4, group_size=64),
    dict(w_bits=1.58, a_bits=3, w_granularity="tensor"), dict(w_bits=8, a_bits=8), dict(w_bits=4, a_bits=2, a_clip="sigma"),
])
def test_integer_epilogue_form_matches_reference(spec_kw):
    m = packed(spec_kw)
    x = torch.randn(2, 9, 256)
    ref = reference_qlinear(x, args_of(m))
    y = integer_qlinear(x, args_of(m))
    # exact integer products, scales applied after: differs from the dequantize-then-fp32-matmul reference only
    # by fp32 accumulation rounding (K=256 terms), hence the tolerance
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


def test_integer_products_are_exact_in_fp64():
    m = packed(dict(w_bits=4, a_bits=4, hadamard=False))
    from robuq_fx import quantizers as Q
    x = torch.randn(5, 256)
    qx, _, _ = Q.quantize_act(x, 4, True)
    qw = m.weight_codes()
    assert torch.equal((qx.double() @ qw.double().T).long(), qx.long() @ qw.long().T)


def test_registry_reference_always_available_and_forcing(monkeypatch):
    rows = kernels.available()
    assert any(r["kernel"] == "reference" and r["available"] for r in rows)
    m = packed(dict(w_bits=4, a_bits=4))
    x = torch.randn(3, 256)
    with kernels.use("reference"):
        assert torch.equal(m(x), reference_qlinear(x, args_of(m)))
    monkeypatch.setenv("ROBUQ_KERNEL", "nope")
    with pytest.raises(ValueError, match="not a registered kernel"):
        m(x)
    with pytest.raises(ValueError, match="unknown kernel"):
        with kernels.use("nope"):
            pass


def test_registry_plugs_in_new_kernel_without_touching_passes():
    calls = []

    @kernels.register("test_double", priority=100, supports=lambda x, a: None if x.shape[0] == 7 else "only M=7")
    def _k(x, a):
        calls.append(x.shape)
        return reference_qlinear(x, a) * 2

    try:
        low = robuq_fx.lower(robuq_fx.quantize(torch.nn.Linear(256, 8), {"rules": [{"type": "Linear"}]}))
        x7, x3 = torch.randn(7, 256), torch.randn(3, 256)
        with kernels.use("reference"):
            ref7 = low(x7)
        assert torch.equal(low(x7), 2 * ref7) and calls == [(7, 256)]
        low(x3)
        assert calls == [(7, 256)]  # predicate declined M=3: reference ran
    finally:
        kernels.registry._KERNELS.pop("test_double")


def test_wrong_input_width_is_clear():
    m = packed(dict(w_bits=4, a_bits=4))
    with pytest.raises(ValueError, match="input has 100 features, the layer expects 256"):
        m(torch.randn(2, 100))


def test_disable_env_skips_a_kernel(monkeypatch):
    @kernels.register("test_top", priority=1000)
    def _k(x, a):
        return reference_qlinear(x, a) + 1

    try:
        m = packed(dict(w_bits=4, a_bits=4))
        x = torch.randn(2, 256)
        assert torch.equal(m(x), reference_qlinear(x, args_of(m)) + 1)
        monkeypatch.setenv("ROBUQ_KERNEL_DISABLE", "test_top,other")
        assert torch.equal(m(x), reference_qlinear(x, args_of(m)))
        assert any(r["kernel"] == "test_top" and "ROBUQ_KERNEL_DISABLE" in r["why not"] for r in kernels.available())
    finally:
        kernels.registry._KERNELS.pop("test_top")
