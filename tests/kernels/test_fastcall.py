"""Bound eager calls of the fp8 path (kernels/fastcall.py) on the CPU, with Triton's driver replaced by a recorder:
a bound call must launch the same compiled kernel with the same arguments as the ordinary `fp8_qlinear` call (only
the input and the freshly allocated outputs differ), return the same result, and stop holding (return None, so that
the ordinary call runs) when a buffer is updated in place, the dispatch environment changes, the input's alignment
differs, or a launch hook is set. The real launches are checked on the GPU (tests/test_direct_call.py)."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")  # the kernel modules import triton; the kernels never run here

import robuq_fx.kernels as K  # noqa: E402
from robuq_fx.kernels import fastcall, registry, triton_act_quant as A, triton_fp8 as T, triton_launch as TL  # noqa: E402,E501
from robuq_fx.modules import PackedLinear  # noqa: E402
from robuq_fx.spec import LayerSpec  # noqa: E402


class _Rec:
    """Stands for every compiled kernel: records (kernel, grid, params) and writes deterministic outputs (codes from
    the input, unit scales) so that results can be compared."""
    function = packed_metadata = None

    def __init__(self, log):
        self.log = log

    def run(self, g0, g1, g2, stream, function, meta, launch_meta, enter, exit_, *params):
        self.log.append(((g0, g1, g2), params, (launch_meta, enter, exit_)))
        x, out = params[0], params[1]
        if out.dtype == torch.float8_e4m3fn:  # the activation quantizer: codes, scale, lo
            out[:x.shape[0]] = x.float().clamp(-7, 7).round().to(out.dtype)
            params[2].fill_(1.0)
            params[3].zero_()
        else:  # the small-M kernel writes y (params[3])
            params[3].copy_(x.float().sum(-1, keepdim=True).expand_as(params[3]))


class _Cache(dict):
    def __init__(self, kern):
        super().__init__()
        self.kern, self.keys = kern, []

    def get(self, key, default=None):
        self.keys.append(key)
        return (self.kern, ())


class _Drv:
    def get_current_device(self):
        return None  # a CPU tensor's device index, as a CUDA tensor's index is the current device's

    def get_current_stream(self, dev):
        return 0


class _RT:
    launch_enter_hook = launch_exit_hook = None


def _no_hook(kind: str):
    """'no launch hook' as a Triton version spells it: None (before 3.5), or an empty HookChain (3.6), which is
    never None -- a check for None alone made every bound call let go on the GPU."""
    if kind == "none":
        return None
    from triton.knobs import HookChain
    return HookChain()


@pytest.fixture(params=["none", "empty-chain"])
def fake_triton(monkeypatch, request):
    log = []
    cache = _Cache(_Rec(log))
    monkeypatch.setattr(TL, "_CACHE", cache)
    monkeypatch.setattr(TL, "_ENABLED", True)
    if request.param == "empty-chain":
        pytest.importorskip("triton.knobs", reason="this triton has no knobs.HookChain")
    monkeypatch.setattr(_RT, "launch_enter_hook", _no_hook(request.param))
    monkeypatch.setattr(_RT, "launch_exit_hook", _no_hook(request.param))
    monkeypatch.setattr(TL, "_TRITON", [_Drv(), _RT()])
    monkeypatch.setattr(T, "_scaled_mm", lambda codes, w8, sx, sw, bias: (
        (codes.float() @ w8.float().t()) * sx[:, None] * sw[None, :] + (0 if bias is None else bias.float())
    ).to(torch.bfloat16))
    fp8 = registry._KERNELS["triton_fp8"]
    monkeypatch.setattr(K, "select", lambda x, a: fp8)
    for v in fastcall._ENV:
        monkeypatch.delenv(v, raising=False)
    return log, cache


def _layer(small_m: bool, monkeypatch):
    torch.manual_seed(0)
    if small_m:
        monkeypatch.setenv("ROBUQ_FP8_SMALL_M", "64")
    lin = torch.nn.Linear(256, 128).to(torch.bfloat16)
    spec = LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128)
    return PackedLinear.from_float(lin.weight, lin.bias, None, None, spec).set_layout("fp8")


def _same_launch(a, b, x_new):
    (ga, pa, ha), (gb, pb, hb) = a, b
    assert ga == gb and len(pa) == len(pb) and ha == hb
    for i, (u, v) in enumerate(zip(pa, pb)):
        if isinstance(u, torch.Tensor):
            assert u.dtype == v.dtype and u.shape == v.shape, i
            if v is x_new or v.data_ptr() == x_new.data_ptr():
                continue  # the input
            if u.data_ptr() != v.data_ptr():  # a fresh output: same kind, another buffer
                assert not any(u is w for w in (pa[0],)), i
        else:
            assert u == v and type(u) is type(v), (i, u, v)


@pytest.mark.parametrize("small_m", [False, True])
def test_bound_call_launches_what_the_ordinary_call_launches(small_m, fake_triton, monkeypatch):
    log, cache = fake_triton
    m = _layer(small_m, monkeypatch)
    x0 = torch.randn(2, 8, 256).to(torch.bfloat16)
    with torch.no_grad():
        y0 = m(x0)  # ordinary call + bind
        (bound,) = [p[2] for p in m.__dict__["_direct_plans"].values()]
        assert bound is not None and type(bound).__name__ == ("_SmallM" if small_m else "_QuantScaledMM")
        n_ordinary = len(log)
        x1 = torch.randn(2, 8, 256).to(torch.bfloat16)
        calls, plans = [], m.__dict__["_direct_plans"]
        (key,) = plans
        plans[key] = (lambda *a: calls.append(a), *plans[key][1:])  # a spy where the ordinary function was
        y1 = m(x1)  # bound: the ordinary function is not called
        assert not calls and plans[key][2] is bound
        plans[key] = (T.fp8_qlinear, *plans[key][1:])
        assert len(log) == 2 * n_ordinary
        ref = T.fp8_qlinear(x1, m.__dict__["_direct_plans"][next(iter(m.__dict__["_direct_plans"]))][1])
    assert torch.equal(y1, ref) and y1.shape == y0.shape == (2, 8, 128)
    for a, b in zip(log[-n_ordinary:], log[n_ordinary:2 * n_ordinary]):
        _same_launch(a, b, x1)
    # the key the binding looked up is the ordinary launch's (same specialization, same compiled kernel)
    assert cache.keys[0] in cache.keys[1:]


def test_binding_lets_go_when_something_changes(fake_triton, monkeypatch):
    log, _ = fake_triton
    m = _layer(False, monkeypatch)
    x = torch.randn(16, 256).to(torch.bfloat16)
    with torch.no_grad():
        m(x)
        plans = m.__dict__["_direct_plans"]
        bound = next(iter(plans.values()))[2]
        assert bound(x) is not None
        m.bias.add_(1.0)  # in place: the bias's version moves
        assert bound(x) is None
        y = m(x)  # the ordinary call answers, with the new bias, and the plan binds once more for the new state
        again = next(iter(plans.values()))[2]
        assert again is not None and again is not bound and again(x) is not None
        assert torch.equal(y, T.fp8_qlinear(x, next(iter(plans.values()))[1]))
        assert torch.equal(m(x), y)  # through the new binding
        m.bias.add_(1.0)  # a second let-go: the plan keeps the ordinary call from then on
        y = m(x)
        assert next(iter(plans.values()))[2] is None
        assert torch.equal(y, T.fp8_qlinear(x, next(iter(plans.values()))[1]))
        plans.clear()
        m(x)
        bound = next(iter(plans.values()))[2]
        monkeypatch.setenv("ROBUQ_FP8_SMALL_M", "64")  # dispatch changed: the small-M kernel takes M = 16 now
        assert bound(x) is None
        monkeypatch.delenv("ROBUQ_FP8_SMALL_M")
        assert bound(x) is not None
        shifted = torch.randn(16 * 256 + 1).to(torch.bfloat16)[1:].view(16, 256)  # 2-byte offset: not 16-aligned
        assert bound(shifted) is None
        assert all(h is None for h in log[-1][2])  # no hook: none passed, and no launch metadata built
        if _RT.launch_enter_hook is None:
            monkeypatch.setattr(_RT, "launch_enter_hook", lambda *a: None)
        else:  # a profiler adds itself to the chain
            _RT.launch_enter_hook.add(lambda *a: None)
        assert bound(x) is None


def test_not_bound_where_it_would_go_stale(fake_triton, monkeypatch):
    """A bias that fp8_qlinear converts per call (fp32 bias, bf16 input) and LRB / asymmetric layers on the
    two-kernel path are left to the ordinary call."""
    m = _layer(False, monkeypatch)
    m.bias.data = m.bias.data.float()
    with torch.no_grad():
        m(torch.randn(16, 256).to(torch.bfloat16))
    assert next(iter(m.__dict__["_direct_plans"].values()))[2] is None


def test_plans_are_not_pickled(fake_triton, monkeypatch):
    import copy
    import io
    m = _layer(False, monkeypatch)
    with torch.no_grad():
        m(torch.randn(16, 256).to(torch.bfloat16))
    assert m.__dict__["_direct_plans"]
    assert "_direct_plans" not in copy.deepcopy(m).__dict__
    buf = io.BytesIO()
    torch.save(m, buf)  # the bound calls hold compiled kernels, which do not pickle
    buf.seek(0)
    assert "_direct_plans" not in torch.load(buf, weights_only=False).__dict__


def test_op_path_binding_lives_on_the_weight_entry_and_dies_with_the_weight(fake_triton, monkeypatch):
    """fp8_qlinear itself (what robuq::qlinear runs, e.g. inside a default-mode compiled graph) keeps its bound call
    on the weight's cache entry: the second call skips the ordinary function; the entry, its binding and the fp8
    view go away with the layer (the binding holds qweight only weakly)."""
    import gc
    import weakref
    from robuq_fx.kernels import weight_cache as W
    m = _layer(False, monkeypatch)
    qa = K.QLinearArgs(m.qweight, m.w_scale, m.bias, None, None, *m.op_args())
    ordinary = []
    real = T._fp8_qlinear
    monkeypatch.setattr(T, "_fp8_qlinear", lambda x, a: ordinary.append(1) or real(x, a))
    x = torch.randn(16, 256).to(torch.bfloat16)
    with torch.no_grad():
        y0 = T.fp8_qlinear(x, qa)
        y1 = T.fp8_qlinear(x, qa)
        assert len(ordinary) == 1 and torch.equal(y0, y1)
        m.bias.add_(1.0)  # the binding lets go: the ordinary call answers and binds again once
        y2 = T.fp8_qlinear(x, qa)
        assert len(ordinary) == 2 and torch.equal(y2, real(x, qa)) and not torch.equal(y2, y1)
        T.fp8_qlinear(x, qa)
        assert len(ordinary) == 2
        shifted = torch.randn(16 * 256 + 1).to(torch.bfloat16)[1:].view(16, 256)
        for _ in range(3):  # another alignment is another specialization: never served by this binding
            T.fp8_qlinear(shifted, qa)
    assert len(ordinary) == 5
    ref, wid = weakref.ref(m.qweight), id(m.qweight)
    assert wid in W._WCACHE
    del m, qa, x, y0, y1, y2
    gc.collect()
    assert ref() is None and wid not in W._WCACHE


@pytest.mark.parametrize("rank", [0, 4])
def test_input_act_reaches_the_quantizer_launch_or_is_materialized(rank, fake_triton, monkeypatch):
    """With input_act, the fp8 path hands the raw x to the quantizer kernel with its ACT constexpr set (the GELU
    runs while loading), with a low-rank branch too (since session 10 the branch's down-projection applies the
    activation itself: in its Triton kernel on a GPU, `triton_lowrank`'s ACT, checked by test_input_act.py; here in
    torch). The bound call launches the same."""
    log, cache = fake_triton
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128).to(torch.bfloat16)
    dn, up = (torch.randn(rank, 256).bfloat16(), torch.randn(128, rank).bfloat16()) if rank else (None, None)
    spec = LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=rank).resolve(256, 128)
    m = PackedLinear.from_float(lin.weight, lin.bias, dn, up, spec).set_layout("fp8")
    m.input_act = "gelu_tanh"
    monkeypatch.setattr(T, "_scaled_mm", lambda *a: torch.zeros(a[0].shape[0], 128, dtype=torch.bfloat16))
    monkeypatch.setattr(T, "run_fp8_gemm", lambda *a, **k: None)
    monkeypatch.setattr(T, "epilogue_mode", lambda *a: "triton")
    x = torch.randn(16, 256).to(torch.bfloat16)
    with torch.no_grad():
        for call in ("ordinary", "bound"):
            log.clear()
            cache.keys.clear()
            m(x)
            keys = [k for k in cache.keys if k[0] == id(A.act_quant_bfly_kernel)]
            if call == "ordinary":  # the launch and the bindings looked up one specialization
                assert keys and all(k == keys[0] for k in keys)
                act = dict(zip(A.act_quant_bfly_kernel.arg_names[10:], keys[0][3]))["ACT"]
                assert act == 2
            else:
                assert not keys or rank  # served by the binding: no lookup (LRB layers are not bound)
            assert log[0][1][0].data_ptr() == x.data_ptr()  # the raw x: no materialized gelu(x)
