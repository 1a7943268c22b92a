"""Kernel registry: automatic choice only among kernels that compute the spec exactly; opt-in kernels run only when
forced; the table says what each kernel takes."""
import pytest
import torch

from robuq_fx import kernels
from robuq_fx.kernels import registry
from robuq_fx.kernels.registry import QLinearArgs


def _args():
    return QLinearArgs(torch.zeros(8, dtype=torch.uint8), torch.ones(4, 1), None, None, None, 4, 4, 4.0, 4, 0,
                       True, "absmax")


@pytest.fixture
def fake_kernels(monkeypatch):
    saved = dict(registry._KERNELS)
    calls = []
    registry.register("fake_opt_in", priority=99, auto=False, takes="approximates everything")(
        lambda x, a: calls.append("opt_in") or x)
    registry.register("fake_auto", priority=50, takes="everything exactly")(lambda x, a: calls.append("auto") or x)
    yield calls
    registry._KERNELS.clear()
    registry._KERNELS.update(saved)


def test_opt_in_kernel_is_never_picked_automatically(fake_kernels, monkeypatch):
    monkeypatch.delenv("ROBUQ_KERNEL", raising=False)
    x = torch.zeros(2, 4)
    assert registry.select(x, _args()).name == "fake_auto"  # the higher-priority opt-in one is skipped
    monkeypatch.setenv("ROBUQ_KERNEL_DISABLE", "fake_auto")
    assert registry.select(x, _args()).name == "reference"


def test_opt_in_kernel_runs_when_forced(fake_kernels, monkeypatch):
    monkeypatch.delenv("ROBUQ_KERNEL", raising=False)
    with kernels.use("fake_opt_in"):
        assert registry.select(torch.zeros(2, 4), _args()).name == "fake_opt_in"
    monkeypatch.setenv("ROBUQ_KERNEL", "fake_opt_in")
    assert registry.select(torch.zeros(2, 4), _args()).name == "fake_opt_in"


def test_table_says_how_each_kernel_is_picked_and_what_it_takes(fake_kernels):
    rows = {r["kernel"]: r for r in kernels.available()}
    assert rows["fake_opt_in"]["picked"] == "only when forced"
    assert rows["fake_auto"]["picked"] == "automatically"
    text = kernels.table()
    assert "fake_opt_in: approximates everything" in text and "fake_auto: everything exactly" in text


def test_nunchaku_is_opt_in():
    # It quantizes activations per token and per 64 inputs (not RobuQ's per token) and has never been run
    # against the reference on hardware: it must not replace an exact kernel behind the user's back.
    k = registry._KERNELS["nunchaku"]
    assert k.auto is False and "approximates" in k.takes
    for name in ("reference", "triton_fp8", "cuda_dequant"):
        assert registry._KERNELS[name].auto and registry._KERNELS[name].takes


def test_op_path_selection_cache_follows_the_registry(monkeypatch):
    """robuq::qlinear remembers its kernel choice per call form (registry.select_cached); a kernel registered later,
    a forced one and a disabled one change the choice on the next call, as with no cache."""
    import dataclasses

    import robuq_fx
    from robuq_fx.kernels import registry as R
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    m = PackedLinear.from_float(lin.weight, lin.bias, None, None, LayerSpec(w_bits=4, a_bits=4).resolve(64, 32))
    x = torch.randn(3, 64)

    def op():
        return torch.ops.robuq.qlinear(x, m.qweight, m.w_scale, m.bias, None, None, *m.op_args())
    ref = op()
    assert torch.equal(op(), ref)  # cached
    marker = dataclasses.replace(R._KERNELS["reference"], name="marker", priority=99,
                                 fn=lambda x, a: torch.full((*x.shape[:-1], a.out_features), 7.0))
    monkeypatch.setitem(R._KERNELS, "marker", marker)
    assert (op() == 7).all()
    monkeypatch.setenv("ROBUQ_KERNEL_DISABLE", "marker")
    assert torch.equal(op(), ref)
    monkeypatch.delenv("ROBUQ_KERNEL_DISABLE")
    with robuq_fx.kernels.use("reference"):
        assert torch.equal(op(), ref)
    assert (op() == 7).all()
    x = torch.randn(5, 64)  # another shape: its own entry
    assert (op() == 7).all()
