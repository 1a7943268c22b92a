"""The low-rank branch stacked into the fp8 GEMM (kernels/lrb_stacked.py): the split of u = t / (s_x c) and
v = A c / s_w into fp8 pairs reproduces the branch's term, the range bound holds for any input, layers it cannot
take are refused; on a GPU the mode runs (no fallback) and matches the Triton epilogue GEMM."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from robuq_fx.kernels import lrb_layout as L, lrb_stacked as S
from robuq_fx.kernels.registry import QLinearArgs
from tests.kernels.fp8_testing import exact_reference_matmuls, gpu, rel, within  # noqa: F401 - fixture


def _case(m=200, k=256, n=192, r=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-7, 8, (m, k), generator=g).float()
    sx = torch.rand(m, generator=g) * 0.05 + 0.01
    xh = q * sx.view(-1, 1)  # an input whose codes are q exactly (|x H| <= 7 s_x)
    bh = torch.randn(r, k, generator=g) * 0.05
    up = torch.randn(n, r, generator=g) * 0.05
    w8 = torch.randint(-1, 2, (n, k), generator=g).float().to(torch.float8_e4m3fn)
    sw = torch.rand(n, generator=g) * 0.02 + 0.01
    return q, sx, xh, bh, up, w8, sw


def weight_ext(w8, sw, up, c):
    """[v1, v2, v1, c slot, q_w] (N, W + K) as one new tensor, or None where `ext_columns` refuses."""
    cols = L.ext_columns(sw, up, c)
    return None if cols is None else torch.cat([cols, w8], 1)


def _stacked_y(q, sx, xh, bh, up, w8, sw):
    """The stacked GEMM in float64 on the fp8 operands (what _scaled_mm computes, before its bf16 rounding)."""
    k = q.shape[1]
    c = L.scale_c(bh, k, 4)
    ext = weight_ext(w8, sw, up, c)
    t = (xh.double() @ bh.double().t()).float()
    wide = torch.cat([L.act_ext_reference(t, sx, c, L.ext_width(bh.shape[0])), q.to(torch.float8_e4m3fn)], 1)
    return (wide.double() @ ext.double().t()) * sx.double().view(-1, 1) * sw.double().view(1, -1), c


@pytest.mark.parametrize("r", [32, 96])
def test_the_stacked_product_is_the_layer_with_its_branch(r, monkeypatch):
    """Rank 32, and 96 (the sibling-fused q/k/v's) in the flat layout of ROBUQ_STACKED_WIDE=1."""
    monkeypatch.setenv("ROBUQ_STACKED_WIDE", "1")
    q, sx, xh, bh, up, w8, sw = _case(r=r)
    y, _ = _stacked_y(q, sx, xh, bh, up, w8, sw)
    main = (q.double() @ w8.double().t()) * sx.double().view(-1, 1) * sw.double().view(1, -1)
    branch = xh.double() @ bh.double().t() @ up.double().t()
    # the branch's term to ~3 x 2^-8 (two fp8 terms a factor), the main product exactly
    assert rel(y - main, branch) < 6e-3
    assert rel(y, main + branch) < 3e-3
    assert within(y, main + branch) > 0.999


def test_one_term_splits_would_not_pass():
    """The bound above is not loose: with u and v each rounded to a single fp8 term the branch is ~2^-4 off."""
    q, sx, xh, bh, up, w8, sw = _case(seed=3)
    c = L.scale_c(bh, q.shape[1], 4)
    t = xh.double() @ bh.double().t()
    u1 = (t / (sx.double().view(-1, 1) * c)).float().to(torch.float8_e4m3fn).double()
    v1 = (up.double() * c / sw.double().view(-1, 1)).float().to(torch.float8_e4m3fn).double()
    one = (u1 @ v1.t()) * sx.double().view(-1, 1) * sw.double().view(1, -1)
    assert rel(one, t @ up.double().t()) > 2e-2


def test_u_stays_in_range_for_the_worst_input():
    """x H along a row of B H, scaled so that its codes reach qmax: |u| reaches the bound and stays <= U_MAX."""
    torch.manual_seed(0)
    k, r = 1152, 32
    bh = torch.randn(r, k) * 0.05
    bh[5] *= 7  # one long row sets c
    c = L.scale_c(bh, k, 4)
    xh = torch.sign(bh[5]) * 1.0  # |x H| = 1 everywhere: absmax 1, s_x = 1/7, t_5 = ||B_5||_1 <= sqrt(K) ||B_5||
    sx = torch.tensor([1.0 / 7])
    u = (xh.double() @ bh.double().t()) / (sx.double() * c)
    assert u.abs().max().item() <= L.U_MAX
    assert u.abs().max().item() > L.U_MAX / 4  # and c is not needlessly large (precision of the small terms)
    assert math.log2(c) == int(math.log2(c))


def test_weight_ext_layout_and_refusals():
    q, sx, xh, bh, up, w8, sw = _case(n=40, r=8)
    ext = weight_ext(w8, sw, up, 1.0)
    k, r, w = w8.shape[1], 8, 32
    assert ext.shape == (40, k + 32) and ext.dtype == torch.float8_e4m3fn  # 3r + c's slot = 25 -> 32 columns
    assert torch.equal(ext[:, w:].float(), w8.float())  # the codes last
    assert torch.equal(ext[:, :r].float(), ext[:, 2 * r:3 * r].float())
    assert ext[0, 3 * r].item() == 1.0 and S.c_slot(ext, r).item() == 1.0  # c, where lrb_split reads it
    pad = ext[:, 3 * r:w].float()
    pad[0, 0] = 0
    assert (pad == 0).all()
    assert L.ext_width(32) == 112  # 96 + the slot, to 16
    assert weight_ext(w8, sw, up, 2.0 ** 9) is None  # c beyond e4m3's exact powers of two
    v = up.float() / sw.view(-1, 1)
    assert rel(ext[:, :r].float() + ext[:, r:2 * r].float(), v.double()) < 5e-3
    assert weight_ext(w8, sw, up * 1e5, 1.0) is None  # |v| > 448
    sw0 = sw.clone()
    sw0[3] = 0
    assert weight_ext(w8, sw0, up, 1.0) is None  # a channel with no scale but a branch


def test_act_ext_zero_rows_and_padding_columns():
    t = torch.randn(6, 8)
    sx = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.0, 0.5])
    out = L.act_ext_reference(t, sx, 1.0, 32)
    assert out.shape == (6, 32) and (out[[1, 4]].float() == 0).all() and (out[:, 24:].float() == 0).all()
    assert torch.equal(out[:, :8].float(), out[:, 8:16].float())


def test_stacked_reason():
    w = torch.zeros(4, 4)
    base = dict(qweight=w, w_scale=w, bias=None, lrb_down=w, lrb_up=w, out_features=4, in_features=4, w_bits=1.58,
                a_bits=4, hadamard_block=0, a_sym=True, a_clip="absmax")
    assert S.stacked_reason(QLinearArgs(**base)) is None
    assert "branch" in S.stacked_reason(QLinearArgs(**{**base, "lrb_down": None}))
    assert S.stacked_reason(QLinearArgs(**{**base, "a_sym": False})) is not None
    assert S.stacked_reason(QLinearArgs(**{**base, "a_clip": "sigma"})) is not None
    assert S.stacked_reason(QLinearArgs(**{**base, "lrb_down": torch.zeros(96, 4)})) is None  # fused q/k/v: flat
    assert "rank" in S.stacked_reason(QLinearArgs(**{**base, "lrb_down": torch.zeros(129, 4)}))


def test_wide_ranks_take_the_flat_layout_unless_told_not_to(monkeypatch):
    """By default rank 96 (sibling-fused q/k/v) is laid out flat, [v1, v2, v1, c, 0..] over 3r + 16 columns, and
    admitted to the stacked mode (the warp-specialized kernel then refuses it: its terms form reads two boxes);
    ROBUQ_STACKED_WIDE=0: the two boxes, 256 columns, and the stacked mode refuses it. Rank 129 never fits
    lrb_split's tile."""
    w = torch.zeros(4, 4)
    base = dict(qweight=w, w_scale=w, bias=None, lrb_down=torch.zeros(96, 4), lrb_up=w, out_features=4,
                in_features=4, w_bits=1.58, a_bits=4, hadamard_block=0, a_sym=True, a_clip="absmax")
    from tests.kernels.sm90 import import_or_none
    ws = import_or_none("gluon_qgemm_ws")  # (needs triton with Gluon)
    monkeypatch.setenv("ROBUQ_STACKED_WIDE", "0")
    assert L.ext_width(96) == 256 and L.c_column(96) == 96 and (ws is None or ws.lrb_form(96) == 2)
    assert "ROBUQ_STACKED_WIDE=0" in S.stacked_reason(QLinearArgs(**base))
    monkeypatch.delenv("ROBUQ_STACKED_WIDE")
    assert L.ext_width(96) == 304 and L.c_column(96) == 288 and (ws is None or ws.lrb_form(96) is None)
    assert S.stacked_reason(QLinearArgs(**base)) is None
    assert "128" in S.stacked_reason(QLinearArgs(**{**base, "lrb_down": torch.zeros(129, 4)}))
    _, _, _, bh, up, w8, sw = _case(n=40, r=96)
    ext = weight_ext(w8, sw, up, 1.0)
    assert ext.shape[1] == w8.shape[1] + 304 and ext[0, 288].item() == 1.0
    assert torch.equal(ext[:, :96].float(), ext[:, 192:288].float())


def _cpu_layer(k=256, n=96, r=8, seed=0):
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    down, up = torch.randn(r, k, generator=g) * 0.05, torch.randn(n, r, generator=g) * 0.05
    spec = LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=r).resolve(k, n)
    return PackedLinear.from_float(w, torch.zeros(n), down, up, spec).set_layout("fp8")


def _ext_of(mod):
    from robuq_fx.kernels import weight_cache as W
    a = QLinearArgs(mod.qweight, mod.w_scale, mod.bias, mod.lrb_down, mod.lrb_up, *mod.op_args())
    e = W._fp8_weights(a)
    return S.cached_weight_ext(a, e, W._rot_down(a, torch.float32)), e


def test_one_resident_copy_of_the_codes():
    """The fp8 buffer is re-pointed into the extended matrix (no second copy), its codes unchanged; later calls
    reuse that storage; a changed branch rewrites only the extra columns; the checkpoint is unchanged."""
    mod = _cpu_layer()
    k, n, w = 256, 96, L.ext_width(8)
    codes, sd0 = mod.weight_codes().clone(), {kk: v.clone() for kk, v in mod.state_dict().items()}
    ext, e = _ext_of(mod)
    assert ext.w.shape == (n, k + w) and mod.qweight.shape == (n, k) and mod.qweight.stride() == (k + w, 1)
    assert mod.qweight.storage_offset() == w  # the last K columns
    assert mod.qweight.untyped_storage().data_ptr() == ext.w.untyped_storage().data_ptr()
    assert mod.qweight.untyped_storage().nbytes() == n * (k + w)  # the only copy of the codes
    assert torch.equal(mod.weight_codes(), codes)
    assert torch.equal(ext.w[:, :w].float(), L.ext_columns(e.sw, mod.lrb_up, ext.c).float())
    # what torch.compile sees: a fake tensor made from qweight spans the whole matrix (the codes sit last; a storage
    # is faked at the size its tensor reaches), so the compiled graph's as_strided over it is in bounds
    from torch._subclasses.fake_tensor import FakeTensorMode
    fake = FakeTensorMode().from_tensor(mod.qweight)
    assert S.is_extended(fake, k, 8) and fake.as_strided((n, k + w), (k + w, 1), 0).shape == (n, k + w)
    import copy
    assert S.is_extended(FakeTensorMode().from_tensor(copy.deepcopy(mod).qweight), k, 8)
    again, _ = _ext_of(mod)  # a new cache entry (the buffer moved): same storage
    assert again.w.data_ptr() == ext.w.data_ptr() and torch.equal(again.w.float(), ext.w.float())
    with torch.no_grad():
        mod.lrb_up.mul_(2)
    changed, e2 = _ext_of(mod)
    assert changed.w.data_ptr() == ext.w.data_ptr() and torch.equal(mod.weight_codes(), codes)
    assert torch.equal(changed.w[:, :w].float(), L.ext_columns(e2.sw, mod.lrb_up, changed.c).float())
    sd = mod.state_dict()
    assert torch.equal(sd["qweight"], sd0["qweight"])  # packed codes, as before
    fresh = _cpu_layer(seed=1)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.weight_codes(), codes)


def _epilogue_then_stacked(mod, x, monkeypatch):
    """(y on the Triton epilogue GEMM, y in the stacked mode, a second stacked call): the stacked mode must run (no
    fallback warning); on the fp8 layout its first call re-points qweight, which renews the cache entry."""
    from robuq_fx import kernels
    with kernels.use("triton_fp8"):
        monkeypatch.setenv("ROBUQ_FP8_EPI", "triton")
        y_epi = mod(x)
        monkeypatch.setenv("ROBUQ_FP8_EPI", "stacked")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = mod(x)
            again = mod(x)
    assert not [w for w in caught if "stacked" in str(w.message)], [str(w.message) for w in caught]
    return y_epi, y, again


@gpu
@pytest.mark.parametrize("k,n", [(1152, 3456), (4608, 1152), (1152, 6912)])
@pytest.mark.parametrize("m", [1, 7, 1000])
def test_stacked_mode_runs_and_matches_the_epilogue_gemm(k, n, m, monkeypatch):
    from robuq_fx.kernels import weight_cache
    from tests.kernels.test_triton_fp8 import _args, _exact_from_own_codes, _layer
    mod = _layer(k, n, 1.58, 4, True, 128, 32, seed=k + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
    y_epi, y, again = _epilogue_then_stacked(mod, x, monkeypatch)
    e = weight_cache._entry(_args(mod))
    assert e.stk is not None and e.stk.w is not None and torch.equal(again, y)
    own = _exact_from_own_codes(x, _args(mod), "triton_fp8")
    assert rel(y, own) < 6e-3 and within(y, own) >= 0.998
    assert rel(y, y_epi.double()) < 6e-3


@gpu
@pytest.mark.parametrize("m", [7, 1000])
def test_rank_96_stacked_mode_matches_the_epilogue_gemm(m, monkeypatch):
    """ROBUQ_STACKED_WIDE=1: a rank-96 layer (the sibling-fused q/k/v's branch) in the stacked mode, flat layout,
    runs and matches the Triton epilogue GEMM and its own codes' float64 reference."""
    from robuq_fx.kernels import weight_cache
    from tests.kernels.test_triton_fp8 import _args, _exact_from_own_codes, _layer
    monkeypatch.setenv("ROBUQ_STACKED_WIDE", "1")
    mod = _layer(1152, 3456, 1.58, 4, True, 128, 96, seed=96)
    x = torch.randn(m, 1152, device="cuda", dtype=torch.bfloat16) * 2
    y_epi, y, again = _epilogue_then_stacked(mod, x, monkeypatch)
    e = weight_cache._entry(_args(mod))
    assert e.stk is not None and e.stk.w is not None and e.stk.w.shape[1] == 1152 + 304 and torch.equal(again, y)
    own = _exact_from_own_codes(x, _args(mod), "triton_fp8")
    assert rel(y, own) < 6e-3 and within(y, own) >= 0.998
    assert rel(y, y_epi.double()) < 6e-3


@gpu
@pytest.mark.parametrize("k,n", [(1152, 3456), (4608, 1152)])
@pytest.mark.parametrize("m", [7, 1000])
def test_fused_codes_kernel_matches_the_two_kernels(k, n, m, monkeypatch):
    """ROBUQ_STACKED_QUANT=fused (triton_mma_quant.py: quantizer + lrb_split in one kernel, the rotation on
    tensor cores): the layer matches its own codes' float64 reference as the two-kernel form does, and its codes
    equal the two kernels' (the rotation's fp32 sums in another order may flip a code at an exact tie: >= 99.9%)."""
    from robuq_fx import kernels
    from robuq_fx.kernels import weight_cache
    from tests.kernels.test_triton_fp8 import _args, _exact_from_own_codes, _layer
    mod = _layer(k, n, 1.58, 4, True, 128, 32, seed=k + n + 1).use_device_layout()
    a = _args(mod)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
    monkeypatch.setenv("ROBUQ_FP8_EPI", "stacked")
    with kernels.use("triton_fp8"), torch.no_grad():
        y_two = mod(x)
        e = weight_cache._entry(a)
        bh = weight_cache._rot_down(a, x.dtype)
        codes = {}
        for mode in ("", "fused"):
            monkeypatch.setenv("ROBUQ_STACKED_QUANT", mode)
            codes[mode] = S.stacked_codes(x, bh, mod.qweight, 128, 4, "absmax", 16 * -(-m // 16))
        y = mod(x)
    assert e.stk is not None and S.is_extended(mod.qweight, k, 32)
    own = _exact_from_own_codes(x, a, "triton_fp8")
    assert rel(y, own) < 6e-3 and within(y, own) >= 0.998
    assert rel(y, y_two.double()) < 6e-3
    w = L.ext_width(32)
    (two, sx_two), (one, sx_one) = codes[""], codes["fused"]
    agree = (two[:m, w:].float() == one[:m, w:].float()).float().mean().item()
    assert agree >= 0.999 and torch.allclose(sx_one, sx_two, rtol=1e-2, atol=0)
    assert rel(one[:m, :w].float(), two[:m, :w].double()) < 2e-2  # [u1, u1, u2]: t's sums in another order


@gpu
def test_stacked_layer_with_an_input_activation(monkeypatch):
    """A fused GELU (passes/act_fuse.py) on a stacked layer: the quantizer and lrb_split both read act(x); the
    output matches the layer run on the materialized activation as tests/kernels/test_input_act.py bounds it (the
    kernel's fp32 GELU and ATen's may round to neighbouring bf16 values, flipping a rare code): >= 99% of rows
    equal, 1e-2 relative overall."""
    from robuq_fx import kernels
    from robuq_fx.kernels.qlinear import apply_input_act
    from tests.kernels.test_triton_fp8 import _layer
    mod = _layer(4608, 1152, 1.58, 4, True, 128, 32, seed=5)
    x = torch.randn(300, 4608, device="cuda", dtype=torch.bfloat16) * 2
    with kernels.use("triton_fp8"), torch.no_grad():
        monkeypatch.setenv("ROBUQ_FP8_EPI", "triton")
        y_epi = mod(apply_input_act(x, "gelu_tanh"))  # the Triton epilogue GEMM on the materialized activation
        monkeypatch.setenv("ROBUQ_FP8_EPI", "stacked")
        y_plain = mod(apply_input_act(x, "gelu_tanh"))
        mod.input_act = "gelu_tanh"
        y = mod(x)
    assert (y == y_plain).all(dim=1).float().mean().item() >= 0.99
    assert rel(y, y_plain.double()) < 1e-2 and rel(y_plain, y_epi.double()) < 6e-3


@gpu
def test_stacked_layer_compiled_equals_eager(monkeypatch):
    """use_device_layout extends the weight (lrb_stacked.prepare), so torch.compile traces the stacked path
    (`inductor._stacked_traced`) from its first call: outputs equal to eager's, bit for bit (same kernels), and no
    recompile or stride-check failure on the second call."""
    from robuq_fx import kernels
    from tests.kernels.test_triton_fp8 import _layer
    monkeypatch.setenv("ROBUQ_FP8_EPI", "stacked")
    monkeypatch.setenv("ROBUQ_QUANT_KERNEL", "triton")  # both sides the Triton quantizer (Inductor launches no Gluon)
    mod = _layer(1152, 3456, 1.58, 4, True, 128, 32, seed=9).use_device_layout()
    assert mod.qweight.stride(0) == 1152 + L.ext_width(32)  # extended before any call
    x = torch.randn(2, 300, 1152, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    with kernels.use("triton_fp8"), torch.no_grad():
        compiled = torch.compile(mod)
        first = compiled(x)
        second = compiled(x)
        eager = mod(x)
    assert torch.equal(first, eager) and torch.equal(second, eager)



def test_the_dispatch_picks_the_mode_per_shape_and_m_bucket(monkeypatch):
    """dispatch.stacked_mode: the table's per-bucket choice, ROBUQ_FP8_EPI=stacked forcing it and another value
    turning it off, off for shapes the table does not list."""
    from robuq_fx.kernels import dispatch as D
    monkeypatch.delenv("ROBUQ_FP8_EPI", raising=False)
    monkeypatch.setattr(D, "dispatch_table", lambda: {"shapes": {"96x256": {"stacked": {"256": True, "1024": False}}}})
    assert D.stacked_mode(100, 96, 256) and not D.stacked_mode(600, 96, 256) and not D.stacked_mode(100, 97, 256)
    monkeypatch.setenv("ROBUQ_FP8_EPI", "triton")
    assert not D.stacked_mode(100, 96, 256)
    monkeypatch.setenv("ROBUQ_FP8_EPI", "stacked")
    assert D.stacked_mode(600, 97, 256)
