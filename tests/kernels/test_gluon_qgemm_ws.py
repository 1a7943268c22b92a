"""The warp-specialized quantize-in-GEMM kernel (robuq_fx/kernels/gluon_qgemm_ws.py, opt-in ROBUQ_FP8_FUSED_QUANT=ws).

CPU (where triton with Gluon imports): every config compiles for sm_90 into three partitions (register
reallocation), fp8 wgmma fed by TMA, no spills, within shared memory; `supported` and `work_split` say what they
should. GPU (Hopper): a W4A4+H / W1.58A4+H layer with it equals the two-kernel path (same quantizer arithmetic, exact
integer GEMM: >= 99.9% of outputs equal, the rest within a bf16 ulp) on odd M and the DiT widths, with and without
bias; a program walking many work items (few programs: the code buffers' and the weight ring's mbarrier phases wrap
many times) gives the same output as one item a program; a layer with a low-rank branch keeps the two-kernel path.
"""
from __future__ import annotations

import pytest
import torch

import robuq_fx  # noqa: F401
from tests.kernels.sm90 import compile_sm90, import_or_none, opcodes, sass

WS = import_or_none("gluon_qgemm_ws")
gluon = pytest.mark.skipif(WS is None, reason="triton with Gluon does not import here")


@pytest.fixture(autouse=True)
def _terms_form(monkeypatch):
    """Ranks 65..96 reach this kernel in its terms form only with ROBUQ_STACKED_WIDE=0 (by default they take the
    stacked mode's flat layout, lrb_layout.wide_flat): these tests check that form."""
    monkeypatch.setenv("ROBUQ_STACKED_WIDE", "0")


@gluon
def test_supported_and_work_split():
    x = torch.empty(4, 1152, dtype=torch.bfloat16)
    assert WS.supported(x, 1152, 128, 4, True, "absmax", 0) is None
    assert "symmetric absmax" in WS.supported(x, 1152, 128, 4, False, "absmax", 0)
    assert "symmetric absmax" in WS.supported(x, 1152, 0, 4, True, "absmax", 0)
    assert "up to 1152" in WS.supported(x, 4608, 128, 4, True, "absmax", 0)
    assert WS.supported(x, 1152, 128, 4, True, "absmax", 32) is None  # the paper's rank-32 branch
    assert WS.supported(x, 1152, 128, 4, True, "absmax", 96) is None  # sibling-fused q/k/v: 3 x 32
    for r in (16, 64, 100, 112, 128):
        assert "takes rank 32" in WS.supported(x, 1152, 128, 4, True, "absmax", r)
    assert [WS.lrb_form(r) for r in (0, 32, 80, 96, 64)] == [0, 1, 2, 2, None]
    assert "activation dtype" in WS.supported(x.float(), 1152, 128, 4, True, "absmax", 0)
    # items: (64-row block, run of N tiles); N split only where the row blocks alone leave SMs idle
    assert WS.work_split(16384, 3456, 128, 132) == (27, 132)      # 256 row blocks: whole rows, 132 programs
    tps, programs = WS.work_split(256, 3456, 128, 132)             # 4 row blocks: N split into 27 / tps runs
    assert tps == 1 and programs == 4 * 27
    tps, programs = WS.work_split(1000, 1152, 128, 132)            # 16 row blocks x 9 tiles: 8 runs of 2 tiles
    assert tps == 2 and programs == 16 * 5 and programs <= 132


@gluon
@pytest.mark.parametrize("cfg,lrb", [(0, 0), (1, 0), (0, 1), (0, 2)])
@pytest.mark.parametrize("k", [1152, 256])
def test_compiles_for_sm90(cfg, lrb, k):
    """Every form (no branch, the packed rank-32 chunk, the terms form) compiles into three partitions with fp8
    wgmma fed by TMA (and mma.sync for the branch's t) within shared memory; spills: none without a branch or in the
    packed form, a bounded few in the terms form (its quantizer partition holds two accumulators of t)."""
    from triton.experimental.gluon import language as gl
    bn, stages, quant_regs = (WS.CONFIGS, WS.LRB_CONFIGS, WS.TERMS_CONFIGS)[lrb][cfg]
    lb = gl.NVMMASharedLayout.get_default_for([bn, 128], gl.float8e4nv)
    sig = {"x_ptr": "*bf16", "w_desc": f"tensordesc<fp8e4nv[{bn}, 128],{lb!r}>", "y_ptr": "*bf16",
           "sw_ptr": "*fp32", "bias_ptr": "*bf16", "down_ptr": "*bf16", "c_ptr": "*fp8e4nv", "M": "i32", "N": "i32",
           "stride_xm": "i32", "stride_ym": "i32", "stride_dn": "i32", "hscale": "fp32", "levels": "fp32",
           "TPS": "i32", "W_OFF": "i32", "R": "i32"}
    const = dict(K=k, HAS_BIAS=True, LRB=lrb, STAGES=stages, QUANT_REGS=quant_regs, num_warps=4)
    kern = compile_sm90(WS.qgemm_ws_kernel, sig, const, {"num_warps": 4},
                        aligned=("x_ptr", "y_ptr", "sw_ptr", "bias_ptr", "down_ptr", "stride_xm", "stride_ym",
                                 "stride_dn"))
    text, _ = sass(kern)
    assert {"QGMMA", "UTMALDG", "SHFL", "USETMAXREG", "SYNCS"} | ({"HMMA"} if lrb else set()) <= opcodes(text)
    assert text.count("STL") <= (0, 0, 48)[lrb], text.count("STL")
    assert kern.metadata.num_warps == 12  # 4 MMA + 4 quantizer + 1 loader warps, in whole warpgroups
    assert kern.metadata.shared <= 227 * 1024, kern.metadata.shared


def test_dispatch_mode(monkeypatch):
    """dispatch.fused_quant_mode: ROBUQ_FP8_FUSED_QUANT=1 / ws force v0 / the warp-specialized kernel and any other
    value none; unset, the table's per-shape, per-bucket "fused_ws" (no branch) / "fused_ws_lrb" (rank 32) /
    "fused_ws_terms" (ranks above 64)."""
    from robuq_fx.kernels import dispatch as D
    monkeypatch.delenv("ROBUQ_FP8_FUSED_QUANT", raising=False)
    monkeypatch.setattr(D, "dispatch_table", lambda: {"shapes": {"96x256": {"fused_ws": {"16384": True},
                                                                            "fused_ws_lrb": {"256": True},
                                                                            "fused_ws_terms": {"1024": True}}}})
    assert D.fused_quant_mode(1000, 96, 256, 96) == "ws" and D.fused_quant_mode(1000, 96, 256, 32) is None
    assert D.fused_quant_mode(100, 96, 256, 96) is None and D.fused_ws_any(96, 256, 96)
    assert D.fused_quant_mode(16384, 96, 256, 0) == "ws" and D.fused_quant_mode(16384, 96, 256, 32) is None
    assert D.fused_quant_mode(100, 96, 256, 32) == "ws" and D.fused_quant_mode(100, 96, 256, 0) is None
    assert D.fused_quant_mode(16384, 97, 256, 0) is None  # a shape the table does not list
    for env, want in (("1", "1"), ("ws", "ws"), ("0", None), ("yes", None)):
        monkeypatch.setenv("ROBUQ_FP8_FUSED_QUANT", env)
        assert D.fused_quant_mode(100, 97, 256, 0) == want and D.fused_quant_mode(16384, 96, 256, 0) == want


@pytest.mark.parametrize("r", [32, 96])
def test_branch_chunk_schedule_over_the_extended_weight(r):
    """The kernel's k-step schedule with the branch, in torch (CPU, no Gluon needed): code chunk kb against the
    extended weight's columns W + 128 kb; rank 32 (packed): the chunk [u1, u1, u2, 0] (act_ext_reference) against
    its first 128 columns -- [v1, v2, v1, c, 0..] and 16 code columns, which meet zeros; rank 96 (terms): the chunks
    [u1, 0..], [u1, 0..], [u2, 0..] against the boxes [v1, c, 0..], [v2, 0..], [v1, c, 0..]. s_x s_w on the sum:
    the codes part equals codes @ q_w^T exactly and the branch part approximates t A^T to the split's precision."""
    from robuq_fx.kernels import lrb_layout as L
    torch.manual_seed(r)
    m, k, n, bk = 37, 1152, 96, 128
    w = L.ext_width(r)
    qw = torch.randint(-7, 8, (n, k)).float()
    codes = torch.randint(-7, 8, (m, k)).float()
    sw = torch.rand(n) * 0.01 + 1e-3
    down, up = torch.randn(r, k) * 0.05, torch.randn(n, r) * 0.05
    c = L.scale_c(down, k, 4)
    full = torch.cat([L.ext_columns(sw, up, c).float(), qw], 1)  # (N, W + K): what the loader's descriptor spans
    assert full[0, L.c_column(r)] == c
    t = (torch.randn(m, k) @ down.t()) * 0.3
    # s_x as a layer's: |u| = |t| / (s_x c) within U_MAX (a free s_x sends u past e4m3's range: NaN codes)
    sx = t.abs().amax(1) / (c * L.U_MAX) * (1 + torch.rand(m))
    if r == 32:
        assert 3 * r < w <= bk  # the branch's columns and c's slot fit the first weight box
        steps = [(L.act_ext_reference(t, sx, c, bk).float(), 0)]
    else:
        assert w == 2 * bk
        rs = torch.where(sx > 0, (1.0 / c) / sx, torch.zeros_like(sx))
        u1, u2 = (torch.cat([p.float(), torch.zeros(m, bk - r)], 1) for p in L.split_fp8(t * rs[:, None]))
        steps = [(u1, 0), (u1, bk), (u2, 0)]
    acc = sum(chunk @ full[:, col:col + bk].t() for chunk, col in steps)
    for kb in range(k // bk):
        acc += codes[:, kb * bk:(kb + 1) * bk] @ full[:, w + kb * bk:w + (kb + 1) * bk].t()
    y = acc * sx[:, None] * sw[None, :]
    y_codes = (codes @ qw.t()) * sx[:, None] * sw[None, :]
    branch = t @ up.t()
    assert ((y - y_codes - branch).norm() / branch.norm()).item() < 2e-3
    if r == 32:  # the 16 code columns inside the first box contribute nothing: without them the sum is the same
        box = full[:, :bk].clone()
        box[:, w:] = 0
        assert torch.equal(steps[0][0] @ box.t(), steps[0][0] @ full[:, :bk].t())


cuda = pytest.mark.skipif(not torch.cuda.is_available() or WS is None
                          or torch.cuda.get_device_capability() < (9, 0), reason="needs a Hopper GPU and Gluon")


def _layer(k, n, w_bits, bias, rank=0, seed=0):
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    b = (torch.randn(n, device="cuda", generator=g) * 0.1).bfloat16() if bias else None
    dn = (torch.randn(rank, k, device="cuda", generator=g) * 0.05).bfloat16() if rank else None
    up = (torch.randn(n, rank, device="cuda", generator=g) * 0.05).bfloat16() if rank else None
    spec = LayerSpec(w_bits=w_bits, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=rank).resolve(k, n)
    return PackedLinear.from_float(w, b, dn, up, spec).use_device_layout()


def _plain_and_ws(mod, x, monkeypatch, calls: int = 1):
    """(the layer's output on its ordinary path, its outputs on `calls` calls with ROBUQ_FP8_FUSED_QUANT=ws)."""
    with torch.no_grad():
        monkeypatch.delenv("ROBUQ_FP8_FUSED_QUANT", raising=False)
        want = mod(x)
        monkeypatch.setenv("ROBUQ_FP8_FUSED_QUANT", "ws")
        return want, [mod(x) for _ in range(calls)]


def _close(got, want, what):
    assert (got == want).float().mean() >= 0.999, what
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all(), what


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(1152, 3456), (1152, 1152), (1152, 6912), (256, 208)])
@pytest.mark.parametrize("w_bits,bias", [(4, True), (1.58, False)])
def test_layer_equals_the_two_kernel_path(k, n, w_bits, bias, monkeypatch):
    mod = _layer(k, n, w_bits, bias, seed=k + n)
    for m in (1, 37, 300, 4097):
        x = (torch.randn(m, k, device="cuda") * 2).bfloat16()
        want, got = _plain_and_ws(mod, x, monkeypatch, 2)  # the ordinary call, then what a bound call would run
        for g in got:
            _close(g, want, f"M={m}")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [0, 1])
def test_many_items_a_program_equal_one(cfg):
    """The persistent loop: with 3 programs each walks 5-6 items of 9 N tiles x 9 k-steps, so the two code buffers
    and the weight ring go round many times (every mbarrier phase flips); outputs identical to the default grid and
    to one N tile an item (144 programs), the NaN-initialized output fully written, and within 2^-7 (relative to
    the largest output) of the float64 product of the two-kernel quantizer's codes."""
    from robuq_fx.kernels.quantizer import _hscale
    torch.manual_seed(cfg)
    m, k, n = 1000, 1152, 1152
    x = (torch.randn(m, k, device="cuda") * 2).bfloat16()
    w8 = torch.randint(-7, 8, (n, k), device="cuda").bfloat16().to(torch.float8_e4m3fn)
    sw = torch.rand(n, device="cuda") * 0.01
    bias = torch.randn(n, device="cuda").bfloat16()
    outs = []
    for sms in (None, 3, 1000):
        y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        WS.launch_qgemm_ws(x, w8, y, sw, bias, _hscale(128, x.dtype), 7.0, cfg=WS.CONFIGS[cfg], sms=sms)
        outs.append(y)
    torch.cuda.synchronize()
    assert torch.isfinite(outs[0]).all()
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    # against the float64 product of the codes the two-kernel quantizer makes
    from robuq_fx.kernels.quantizer import act_quant
    codes, sx, _ = act_quant(x, 128, 4, True)
    ref = (codes[:m].double() @ w8.double().t()) * sx[:m, None].double() * sw.double() + bias.double()
    err = (outs[0].double() - ref).abs().max() / ref.abs().max()
    assert err < 2 ** -7, err


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("k,n,rank", [(1152, 3456, 32), (1152, 1152, 32), (256, 208, 32), (1152, 3456, 96),
                                      (256, 208, 80)])
def test_branch_stacked_in_the_kernel_matches_the_two_kernel_path(k, n, rank, monkeypatch):
    """W1.58A4+H+LRB32 (the paper's layers; rank 96: its sibling-fused q/k/v, the terms form): the branch as extra
    k-steps, t from the rotated rows on mma.sync (the two-kernel path multiplies x by a bf16 B H: t differs by its
    roundings), so the layer is compared in relative Frobenius norm (<= 5e-3), and the codes part exactly through a
    zero branch."""
    mod = _layer(k, n, 1.58, True, rank=rank, seed=k + n + rank)
    for m in (1, 37, 300, 4097):
        x = (torch.randn(m, k, device="cuda") * 2).bfloat16()
        want, (got, ) = _plain_and_ws(mod, x, monkeypatch)
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert err <= 5e-3, f"M={m}: {err}"
    with torch.no_grad():  # A = 0: the branch's chunk meets zero columns, the rest is the plain layer's arithmetic
        mod.lrb_up.zero_()
    want, (got, ) = _plain_and_ws(mod, x, monkeypatch)
    _close(got, want, "A = 0")


@cuda
@pytest.mark.gpu
def test_other_ranks_and_long_rows_keep_the_two_kernel_path(monkeypatch):
    """What the kernel does not take (rank-16 / 64 branches; K = 4608) runs the ordinary path with the switch on."""
    for mod, k in ((_layer(1152, 1152, 1.58, True, rank=16), 1152), (_layer(1152, 1152, 1.58, True, rank=64), 1152),
                   (_layer(4608, 1152, 4, True), 4608)):
        x = torch.randn(300, k, device="cuda").bfloat16()
        want, (got, ) = _plain_and_ws(mod, x, monkeypatch)
        assert torch.equal(got, want)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("rank", [32, 96])
def test_table_choice_extends_the_weight_up_front_and_runs_the_kernel(rank, monkeypatch):
    """Where the dispatch table picks the kernel for a layer with a branch ("fused_ws_lrb"), moving the layer to
    the device layout extends its weight at once (lrb_stacked.prepare: torch.compile must see the final strides),
    and an eager call with the variable unset runs the kernel: the same output as with ROBUQ_FP8_FUSED_QUANT=ws."""
    from robuq_fx.kernels import dispatch as D
    from robuq_fx.kernels import lrb_stacked as S
    monkeypatch.delenv("ROBUQ_FP8_FUSED_QUANT", raising=False)
    monkeypatch.delenv("ROBUQ_FP8_EPI", raising=False)
    table = dict(D.dispatch_table())
    table["shapes"] = {**table.get("shapes", {}), "1152x1152": {D._ws_key(rank): {"1024": True}}}
    monkeypatch.setattr(D, "dispatch_table", lambda: table)
    mod = _layer(1152, 1152, 1.58, True, rank=rank)
    assert S.is_extended(mod.qweight, 1152, rank)
    x = torch.randn(1000, 1152, device="cuda").bfloat16()
    with torch.no_grad():
        y_table = mod(x)
        monkeypatch.setenv("ROBUQ_FP8_FUSED_QUANT", "ws")
        y_forced = mod(x)
        monkeypatch.setenv("ROBUQ_FP8_FUSED_QUANT", "0")
        y_plain = mod(x)
    assert torch.equal(y_table, y_forced)
    assert not torch.equal(y_table, y_plain)  # the kernel ran (its t rounds differently from the two kernels')


@gluon
@pytest.mark.parametrize("rank", [0, 32, 96])
def test_host_side_with_an_emulated_kernel(rank, monkeypatch):
    """The host side on the CPU (a Hopper and the Gluon kernel stood in for): `triton_fp8` -> `fused_quant` ->
    `launch_qgemm_ws` with ROBUQ_FP8_FUSED_QUANT=ws, the kernel replaced by torch math that follows its schedule on
    the arguments it is given (the weight descriptor's tensor, W_OFF, R, the form, c's slot, down, the work split).
    The layer's output matches the float64 reference of its own codes (integer_qlinear) to the branch's fp8 split,
    so the extended weight's layout, the offsets and the form the launcher picks agree with the kernel's schedule."""
    import types
    from robuq_fx import layer
    from robuq_fx import quantizers as Q
    from robuq_fx.kernels import triton_fp8 as T
    from robuq_fx.kernels.reference import integer_qlinear, spec_of
    from robuq_fx.kernels.registry import QLinearArgs
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    launches = []

    def emulate(x2, w_desc, y, sw, bias, down, c, M, N, stride_xm, stride_ym, stride_dn, hscale, levels, TPS, W_OFF, R,
                K, HAS_BIAS, LRB, STAGES, QUANT_REGS, num_warps):
        launches.append(dict(M=M, N=N, TPS=TPS, W_OFF=W_OFF, R=R, LRB=LRB, K=K))
        full = w_desc.base.float()  # what the loader's TMA boxes read
        xh = layer.rotate(x2, spec_of(a))  # the rotated rows, in x's dtype (as the kernel's butterflies round them)
        q, s, _ = Q.quantize_act(xh, 4, True)
        q, s = q[:M], s[:M].reshape(-1)
        acc = sum(q[:, kb * 128:(kb + 1) * 128] @ full[:, W_OFF + kb * 128:W_OFF + (kb + 1) * 128].t()
                  for kb in range(K // 128))
        if LRB:
            t = xh.float() @ down.float().t()
            u = t * torch.where(s > 0, 1.0 / (c.float() * s), torch.zeros_like(s))[:, None]
            u1 = u.to(torch.float8_e4m3fn).float()
            u2 = (u - u1).to(torch.float8_e4m3fn).float()
            pad = torch.zeros(M, 128 - (3 * R if LRB == 1 else R))
            if LRB == 1:  # [u1, u1, u2, 0] against the first box
                steps = [(torch.cat([u1, u1, u2, pad], 1), 0)]
            else:  # u1, u1, u2 against the boxes 0, 1, 0
                steps = [(torch.cat([u1, pad], 1), 0), (torch.cat([u1, pad], 1), 128), (torch.cat([u2, pad], 1), 0)]
            acc = acc + sum(ch @ full[:, col:col + 128].t() for ch, col in steps)
        out = acc * s[:, None] * sw[None, :] + (bias.float() if HAS_BIAS else 0)
        y.copy_(out.to(y.dtype))

    monkeypatch.setattr(WS, "qgemm_ws_kernel", _Grid(emulate))
    monkeypatch.setattr(T, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setenv("ROBUQ_FP8_FUSED_QUANT", "ws")
    torch.manual_seed(rank)
    k, n = 256, 96
    w = (torch.randn(n, k) / k ** 0.5).bfloat16()
    b = (torch.randn(n) * 0.1).bfloat16()
    dn = (torch.randn(rank, k) * 0.05).bfloat16() if rank else None
    up = (torch.randn(n, rank) * 0.05).bfloat16() if rank else None
    spec = LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=rank).resolve(k, n)
    mod = PackedLinear.from_float(w, b, dn, up, spec).set_layout("fp8")
    x = torch.randn(100, k).bfloat16()
    a = QLinearArgs(mod.qweight, mod.w_scale, mod.bias, mod.lrb_down, mod.lrb_up, *mod.op_args())
    y = T._fp8_qlinear(x, a)
    assert len(launches) == 1 and launches[0]["LRB"] == (0, 1, 2)[(0, 32, 96).index(rank)]
    assert launches[0]["W_OFF"] == (0 if rank == 0 else (112 if rank == 32 else 256))
    ref = integer_qlinear(x, a).float()
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < 5e-3, err


class _Grid:
    """kernel[grid](*args, **kw) for a plain function."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn
