"""PackedLinear's eager fast path (modules.PackedLinear._direct): in plain eager inference it calls the kernel that
`robuq::qlinear` would pick without going through the dispatcher, caching the registry's choice. It must return what
the op returns, follow every change of what the choice depends on (registered, forced and disabled kernels, buffers,
input shape), raise the op's errors, and step aside (the op runs) where anything watches the ops."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import robuq_fx
from robuq_fx import modules
from robuq_fx.kernels import registry
from robuq_fx.modules import PackedLinear
from robuq_fx.spec import LayerSpec


def _layer(rank=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    spec = LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=32, lora_rank=rank).resolve(64, 48)
    dn = torch.randn(rank, 64, generator=g) * 0.1 if rank else None
    up = torch.randn(48, rank, generator=g) * 0.1 if rank else None
    return PackedLinear.from_float(w, b, dn, up, spec)


def _op(m, x):
    return torch.ops.robuq.qlinear(x, m.qweight, m.w_scale, m.bias, m.lrb_down, m.lrb_up, *m.op_args())


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rank", [0, 8])
def test_direct_equals_the_op(rank):
    m = _layer(rank)
    for shape in ((5, 64), (2, 7, 64), (1, 64)):
        x = torch.randn(*shape)
        with torch.no_grad():
            assert torch.equal(m(x), _op(m, x))
    assert "_direct_plans" in m.__dict__  # the fast path ran


@pytest.mark.parametrize("rank", [0, 8])
def test_fused_siblings_take_it_too(rank):
    from robuq_fx.passes.fuse import fuse_packed
    f = fuse_packed([_layer(rank, seed=i) for i in range(3)], ["q", "k", "v"])
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(f(x), _op(f, x))
    assert "_direct_plans" in f.__dict__


def test_choice_follows_the_registry(monkeypatch):
    """A kernel registered later, a forced kernel, a disabled one: the next call sees each change."""
    m = _layer()
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = m(x)
        marker = dataclasses.replace(registry._KERNELS["reference"], name="marker", priority=99,
                                     fn=lambda x, a: torch.full((*x.shape[:-1], a.out_features), 7.0))
        monkeypatch.setitem(registry._KERNELS, "marker", marker)
        assert (m(x) == 7).all()
        monkeypatch.setenv("ROBUQ_KERNEL_DISABLE", "marker")
        assert torch.equal(m(x), ref)
        monkeypatch.delenv("ROBUQ_KERNEL_DISABLE")
        with robuq_fx.kernels.use("reference"):
            assert torch.equal(m(x), ref)
        assert (m(x) == 7).all()


def test_buffers_replaced_and_bad_input():
    m = _layer()
    x = torch.randn(3, 64)
    with torch.no_grad():
        m(x)
        other = _layer(seed=1)
        m.load_state_dict(other.state_dict())  # in place: the plan holds the same tensors, the kernels see new values
        assert torch.equal(m(x), other(x))
        m._buffers["qweight"] = other.qweight.clone()  # a new buffer object: a new plan
        assert torch.equal(m(x), other(x))
        with pytest.raises(ValueError, match="input has 32 features, the layer expects 64"):
            m(torch.randn(3, 32))


def test_the_op_runs_where_something_watches(monkeypatch):
    """Under a TorchDispatchMode, with an input that requires grad, or with ROBUQ_DIRECT_CALL=0, the op is called."""
    m = _layer()
    x = torch.randn(3, 64)
    with Recorder() as rec, torch.no_grad():
        m(x)
    assert "robuq.qlinear.default" in rec.ops
    calls = []
    orig = torch.ops.robuq.qlinear
    monkeypatch.setattr(torch.ops.robuq, "qlinear", lambda *a: calls.append(1) or orig(*a))
    with torch.no_grad():
        m(x)
    assert not calls  # plain eager inference: the fast path
    m(x.clone().requires_grad_(True))
    assert len(calls) == 1
    before, modules._DIRECT[0] = modules._DIRECT[0], False
    try:
        with torch.no_grad():
            m(x)
    finally:
        modules._DIRECT[0] = before
    assert len(calls) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rank,a_sym,small_m", [(0, True, False), (0, True, True), (8, True, False),
                                               (0, False, False)])
def test_bound_calls_on_the_gpu_equal_the_op(rank, a_sym, small_m, monkeypatch):
    """Repeated eager calls (the second and later run the bound form, kernels/fastcall.py) return what the op
    returns, for each input shape, before and after an in-place weight update."""
    if small_m:
        monkeypatch.setenv("ROBUQ_FP8_SMALL_M", "64")
    torch.manual_seed(0)
    k, n = 256, 128
    spec = LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=rank,
                     a_sym=a_sym).resolve(k, n)
    w, b = torch.randn(n, k, device="cuda") / 16, torch.randn(n, device="cuda") / 10
    dn = torch.randn(rank, k, device="cuda") / 10 if rank else None
    up = torch.randn(n, rank, device="cuda") / 10 if rank else None
    from robuq_fx.kernels import triton_launch
    m = PackedLinear.from_float(*(t if t is None else t.bfloat16() for t in (w, b, dn, up)), spec).use_device_layout()

    def unbound(x):  # the op with bound calls off: every launch through the ordinary function
        monkeypatch.setattr(triton_launch, "_ENABLED", False)
        try:
            return _op(m, x)
        finally:
            monkeypatch.setattr(triton_launch, "_ENABLED", True)
    with torch.no_grad():
        for shape in ((16, k), (3, 7, k), (300, k)):
            x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
            want = unbound(x)
            for _ in range(3):  # the module: ordinary, then bound; the op: the same on the weight's entry
                assert torch.equal(m(x), want) and torch.equal(_op(m, x), want)
            if rank == 0 and a_sym and not small_m:  # the quantizer + _scaled_mm path: it must have been bound
                plans = [p for key, p in m.__dict__["_direct_plans"].items() if key[0] == x.shape]
                assert plans and all(p[2] is not None for p in plans), f"{tuple(x.shape)}: no bound call"
        m.bias.mul_(2)  # in place: the bindings must let go
        x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
        want = unbound(x)
        for _ in range(2):
            assert torch.equal(m(x), want) and torch.equal(_op(m, x), want)


def test_a_compiled_model_compiles_once(monkeypatch):
    """torch.compile of packed layers whose switch (ROBUQ_DIRECT_CALL) is not read yet: three calls, one graph. The
    trace must not read the lazily set switch (it did: the first trace guarded on it being unset, so the second call
    compiled the model again, and under CUDA graphs recorded it again)."""
    import torch.nn as nn
    from torch._dynamo.testing import CompileCounter
    monkeypatch.setattr(modules, "_DIRECT", [None])
    torch._dynamo.reset()
    second = PackedLinear.from_float(torch.randn(48, 48), None, torch.randn(4, 48) * 0.1, torch.randn(48, 4) * 0.1,
                                     LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=16,
                                               lora_rank=4).resolve(48, 48))
    model = nn.Sequential(_layer(), nn.GELU(), second).eval()
    counter = CompileCounter()
    step = torch.compile(model, backend=counter)
    x = torch.randn(3, 64)
    with torch.no_grad():
        for _ in range(3):
            step(x)
        model(x)  # an eager call afterwards reads the switch
    assert counter.frame_count == 1, counter.frame_count
    assert modules._DIRECT[0] is True
