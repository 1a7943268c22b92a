"""The stacked LRB mode for asymmetric activations (absmax or `sigma` ranges; the -a3 / -a2 policies): the offset
term's digit columns and the rows `lrb_split` rescues (kernels/lrb_layout.py, lrb_stacked.py). CPU: the float64
product over the fp8 operands against the layer's math for rows of every kind (far from 0, nearly constant,
constant, zero), the digits exact or refused, the switch; GPU: the mode runs and matches the Triton epilogue GEMM.
(Triton's interpreter: test_lrb_split_asym_interpreted.py.)"""
from __future__ import annotations

import math

import pytest
import torch

from robuq_fx.kernels import lrb_layout as L, lrb_stacked as S
from robuq_fx.kernels.registry import QLinearArgs
from tests.kernels.fp8_testing import gpu, rel
from tests.kernels.test_lrb_stacked import _case, _epilogue_then_stacked


@gpu
@pytest.mark.parametrize("a_bits,clip", [(2, "sigma"), (3, "sigma"), (4, "absmax")])
@pytest.mark.parametrize("k,n", [(1152, 3456), (1152, 1152)])
@pytest.mark.parametrize("m", [7, 1000])
def test_asymmetric_stacked_mode_matches_the_epilogue_gemm(a_bits, clip, k, n, m, monkeypatch):
    """ROBUQ_STACKED_ASYM=1 (session 18, the offset term in the padding columns, rows rescued in lrb_split): an
    asymmetric W1.58 layer (the -a3 / -a2 policies' form) in the stacked mode runs (no fallback) and matches the
    Triton epilogue GEMM, with rows far from 0 and a nearly constant row among the ordinary ones."""
    from robuq_fx.kernels import weight_cache
    from tests.kernels.test_triton_fp8 import _args, _layer
    monkeypatch.setenv("ROBUQ_STACKED_ASYM", "1")
    mod = _layer(k, n, 1.58, a_bits, False, 128, 32, seed=k + n + a_bits, a_clip=clip)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
    x[0] += 40  # a row far from 0 (its rotated range may exclude 0)
    if m > 3:
        x[2] = 3.0
        x[2, ::128] = 300.0  # on each block's first channel: x H nearly constant
    with torch.no_grad():
        y_epi, y, again = _epilogue_then_stacked(mod, x, monkeypatch)
    e = weight_cache._entry(_args(mod))
    assert e.stk is not None and e.stk.w is not None and torch.equal(again, y)
    assert torch.isfinite(y).all()
    err = (y.double() - y_epi.double()).abs().amax(1) / y_epi.double().abs().amax(1).clamp_min(1e-30)
    assert err.max().item() < 1e-2, err  # each row to ~1% of its largest output (the branch's fp8 split)
    assert rel(y, y_epi.double()) < 6e-3


def _asym_rows(m=64, k=256, seed=0):
    """Rotated-activation rows for the asymmetric offset term: ordinary rows, rows far from 0 (their range excludes
    0: |lo'| >> s_x), nearly constant rows (one element one bf16 step away), a constant row (s_x = 0, x H = lo') and
    an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    xh = torch.randn(m, k, generator=g)
    xh[1:5] += torch.tensor([40.0, -300.0, 7.0, 2000.0]).view(-1, 1)
    xh[5:8] = torch.tensor([3.0, -50.0, 900.0]).view(-1, 1)
    xh[5:8, 17] *= 1 + 2.0 ** -7
    xh[8] = 1.5
    xh[9] = 0.0
    return xh.bfloat16().float()


def _centred(xh, a_bits, clip):
    """The asymmetric codes as the fp8 path stores them: centred on the code of 0 (q - z), lo' = lo + z s."""
    from robuq_fx import quantizers as Q
    q, s, lo = Q.quantize_act(xh, a_bits, False, clip)
    levels = Q.act_levels(a_bits, False)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-lo / safe).clamp(0, levels)
    return (q - z), s.squeeze(1), (lo + z * s).squeeze(1)


@pytest.mark.parametrize("a_bits,clip", [(2, "sigma"), (3, "sigma"), (4, "absmax")])
def test_asymmetric_offset_term_in_the_stacked_product(a_bits, clip, monkeypatch):
    """The offset term lo' c[n] as U = lo' 2^p / g (three e4m3 terms) against S_n's base-16 digits (exact), the
    branch's u against g, and the rescued rows (range excluding 0, near-constant, constant, zero): the float64
    product over the fp8 operands reproduces x_hat W^T + t A^T to bf16's precision, row by row."""
    monkeypatch.setenv("ROBUQ_STACKED_ASYM", "1")
    q, sx, xh, bh, up, w8, sw = _case(m=64, k=256, n=96, r=32)
    xh = _asym_rows(64, 256)
    qc, s, lo = _centred(xh, a_bits, clip)
    colsum = w8.float().sum(1)
    c = L.scale_c(bh, 256, a_bits, False, clip)
    cols = L.ext_columns(sw, up, c, colsum)
    assert cols is not None
    p = int(math.log2(cols[1, L.c_column(32)].float().item()))
    o = L.off_column(32)
    dd = cols[:, o:o + L.OFF_DIGITS].double()
    assert torch.equal(dd.sum(1) * 2.0 ** p, colsum.double())  # the digits are S_n exactly
    ext = torch.cat([cols, w8], 1)
    t = (xh.double() @ bh.double().t()).float()
    extra, qr, g = L.act_ext_asym_reference(t, s, lo, qc.to(torch.float8_e4m3fn), c, p, L.ext_width(32))
    y = (torch.cat([extra, qr], 1).double() @ ext.double().t()) * g.double().view(-1, 1) * sw.double().view(1, -1)
    xhat = lo.double().view(-1, 1) + s.double().view(-1, 1) * qc.double()
    want = xhat @ (w8.double() * sw.double().view(-1, 1)).t() + xh.double() @ bh.double().t() @ up.double().t()
    err = (y - want).abs().amax(1) / want.abs().amax(1).clamp_min(1e-30)
    assert err.max().item() < 2 ** -9, err  # under half a bf16 step of each row's largest output
    assert (g[[2, 5, 6, 7]] > s[[2, 5, 6, 7]]).all()  # far and near-constant rows rescued (a larger row scale)
    assert (g[[0, 10, 11]] == s[[0, 10, 11]]).all()  # ordinary rows keep theirs
    assert g[8] > 0 and s[8] == 0 and (qr[8].float() == 0).all()  # the constant row: its own scale, codes 0
    assert g[9] == 0 and (y[9] == 0).all()  # the zero row stays zero
    assert (extra.float().abs() <= L.V_MAX).all() and torch.isfinite(extra.float()).all()


def test_asymmetric_layers_take_the_stacked_mode_unless_told_not_to(monkeypatch):
    w = torch.zeros(4, 4)
    base = dict(qweight=w, w_scale=w, bias=None, lrb_down=torch.zeros(32, 4), lrb_up=w, out_features=4,
                in_features=4, w_bits=1.58, a_bits=2, hadamard_block=0, a_sym=False, a_clip="sigma")
    monkeypatch.delenv("ROBUQ_STACKED_ASYM", raising=False)
    assert S.stacked_reason(QLinearArgs(**base)) is None
    assert "no padding" in S.stacked_reason(QLinearArgs(**{**base, "lrb_down": torch.zeros(8, 4)}))
    assert "symmetric sigma" in S.stacked_reason(QLinearArgs(**{**base, "a_sym": True}))
    monkeypatch.setenv("ROBUQ_STACKED_ASYM", "0")
    assert "ROBUQ_STACKED_ASYM=0" in S.stacked_reason(QLinearArgs(**base))


def test_offset_digits_are_exact_or_refused():
    s_n = torch.tensor([0.0, 1.0, -1.0, 7.0, -8.0, 255.0, -1152.0, 4608.0, 30583.0, -34952.0])  # (the extremes)
    dd, p = L.offset_digits(s_n)
    assert torch.equal(dd.double().sum(1) * 2.0 ** p, s_n.double())
    assert torch.equal(dd.to(torch.float8_e4m3fn).float(), dd) and dd.abs().max() <= L.V_MAX
    assert L.offset_digits(torch.tensor([30584.0])) is None  # beyond four balanced digits
    assert L.offset_digits(torch.tensor([5.0, 300.0]))[1] == 0  # small sums need no scaling
