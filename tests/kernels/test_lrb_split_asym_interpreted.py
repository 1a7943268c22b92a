"""`lrb_split_kernel`'s asymmetric form (the stacked mode's offset term, lrb_stacked.py) in Triton's CPU interpreter
(a subprocess with TRITON_INTERPRET=1; no GPU): the W extra columns, the rescued rows' codes and the row scales it
writes in place equal `lrb_layout.act_ext_asym_reference` on the same t, s_x, lo' and codes: ordinary rows, rows
whose range excludes 0, nearly constant rows, a constant row (s_x = 0) and an all-zero row, a ragged M tail."""
import pytest

from tests.kernels.sm90 import import_or_none, run_interpreted

SCRIPT = r"""
import json, math
import torch
from robuq_fx.kernels import triton_launch
triton_launch._ENABLED = False
from robuq_fx.kernels import lrb_layout as L, lrb_stacked as S
from robuq_fx.kernels.triton_lowrank import lrb_split
from tests.kernels.test_lrb_stacked import _case
from tests.kernels.test_lrb_stacked_asym import _asym_rows, _centred
torch.manual_seed(0)
m, k, n, r, m_pad = 52, 256, 96, 32, 64
_, _, _, bh, up, w8, sw = _case(m=m, k=k, n=n, r=r)
xh = _asym_rows(m, k)
res = {}
for a_bits, clip in ((2, "sigma"), (4, "absmax")):
    qc, s, lo = _centred(xh, a_bits, clip)
    c = L.scale_c(bh, k, a_bits, False, clip)
    cols = L.ext_columns(sw, up, c, w8.float().sum(1))
    p = int(math.log2(cols[1, L.c_column(r)].float().item()))
    w = cols.shape[1]
    ext = torch.cat([cols, w8], 1).contiguous()
    x2, bh16 = xh.half(), bh.half()  # (the kernel reads x itself: t = x (B H)^T on its own dot)
    wide = torch.zeros(m_pad, w + k, dtype=torch.float8_e4m3fn)
    wide[:m, w:] = qc.to(torch.float8_e4m3fn)
    sx = torch.zeros(m_pad)
    sx[:m] = s
    lo_p = torch.zeros(m_pad)
    lo_p[:m] = lo
    lrb_split(x2, bh16, sx, wide, ext[:, w:], m_pad, lo=lo_p)
    t = x2.float() @ bh16.float().t()
    want, q, g = L.act_ext_asym_reference(t, s, lo, qc.to(torch.float8_e4m3fn), c, p, w)
    got = wide[:m, :w].float()
    o = L.off_column(r)
    u_step = (got[:, :3 * r] - want[:, :3 * r].float()).abs() / want[:, :3 * r].float().abs().clamp_min(2 ** -9)
    res[f"{a_bits}{clip}"] = {
        "g": bool(torch.equal(sx[:m], g)), "pad_g_zero": bool((sx[m:] == 0).all()),
        "codes": bool(torch.equal(wide[:m, w:].float(), q.float())),
        "offset": bool(torch.equal(got[:, o - 1:], want[:, o - 1:].float())),
        "u_step": float(u_step.max()), "rescued": int((g > s).sum()),
        "pad_rows_zero": bool((wide[m:, :w].float() == 0).all())}
print(json.dumps(res))
"""


@pytest.mark.skipif(import_or_none("triton_lowrank") is None, reason="triton does not import here")
def test_asymmetric_columns_in_the_interpreter_equal_the_reference():
    res = run_interpreted(SCRIPT)
    for case, r in res.items():
        assert r["g"] and r["pad_g_zero"] and r["codes"] and r["offset"] and r["pad_rows_zero"], (case, r)
        assert r["rescued"] >= 3, (case, r)  # the far / near-constant rows took a larger row scale
        # u's two e4m3 terms from the kernel's own dot: within one e4m3 step (2^-3 relative) of the reference's
        assert r["u_step"] <= 0.13, (case, r)


@pytest.mark.skipif(import_or_none("triton_lowrank") is None, reason="triton does not import here")
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("r,w", [(32, 112), (96, 304)])
def test_lrb_split_builds_for_sm90_without_spills(asym, r, w):
    """Offline sm_90 build at K = 1152 for the paper policy's rank 32 and the sibling-fused q/k/v's 96 (the flat
    layout of ROBUQ_STACKED_WIDE=1), with and without the asymmetric columns (the rescue loop, the offset term's
    three e4m3 terms): no local stores."""
    from robuq_fx.kernels import triton_lowrank as L
    from tests.kernels.sm90 import compile_sm90, sass
    sig = {"x_ptr": "*bf16", "b_ptr": "*bf16", "sx_ptr": "*fp32", "o_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv",
           "lo_ptr": "*fp32", "M": "i32", "M_STORE": "i32", "stride_x": "i32", "stride_o": "i32"}
    const = dict(**L.ext_constexprs(1152, r, w), BM=L.DOWN_BM, BK=L.DOWN_BK, ACT=0, ASYM=asym)
    text, regs = sass(compile_sm90(L.lrb_split_kernel, sig, const,
                                   dict(num_warps=L.DOWN_WARPS, num_stages=L.DOWN_STAGES),
                                   aligned=("x_ptr", "b_ptr", "o_ptr", "stride_x", "stride_o"), gluon=False))
    assert "STL" not in text, regs


SCRIPT_WIDE = r"""
import json, os
os.environ["ROBUQ_STACKED_WIDE"] = "1"
import torch
from robuq_fx.kernels import triton_launch
triton_launch._ENABLED = False
from robuq_fx.kernels import lrb_layout as L, lrb_stacked as S
from robuq_fx.kernels.triton_lowrank import lrb_split
from tests.kernels.test_lrb_stacked import _case
m, k, n, r, m_pad = 37, 256, 64, 96, 48
q, sx, xh, bh, up, w8, sw = _case(m=m, k=k, n=n, r=r)
c = L.scale_c(bh, k, 4)
w = L.ext_width(r)
ext = torch.cat([L.ext_columns(sw, up, c), w8], 1).contiguous()
x2, bh16 = xh.half(), bh.half()
wide = torch.zeros(m_pad, w + k, dtype=torch.float8_e4m3fn)
sxp = torch.zeros(m_pad)
sxp[:m] = sx
lrb_split(x2, bh16, sxp, wide, ext[:, w:], m_pad)
want = L.act_ext_reference(x2.float() @ bh16.float().t(), sx, c, w).float()
got = wide[:m, :w].float()
step = (got - want).abs() / want.abs().clamp_min(2 ** -9)
print(json.dumps({"w": w, "step": float(step.max()), "pad_zero": bool((got[:, 3 * r:] == 0).all()),
                  "rows_zero": bool((wide[m:, :w].float() == 0).all())}))
"""


@pytest.mark.skipif(import_or_none("triton_lowrank") is None, reason="triton does not import here")
def test_rank_96_flat_columns_in_the_interpreter():
    """ROBUQ_STACKED_WIDE=1: the sibling-fused q/k/v's rank 96 through lrb_split (a 128-wide rank tile, W = 304):
    [u1, u1, u2] within one e4m3 step of `act_ext_reference` on the kernel's own dot, zeros after them and in the
    padding rows."""
    res = run_interpreted(SCRIPT_WIDE)
    assert res["w"] == 304 and res["pad_zero"] and res["rows_zero"], res
    assert res["step"] <= 0.13, res
