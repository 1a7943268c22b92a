"""The addmm epilogue's factors (`weight_cache.ext_left` / `ext_up`), on the CPU: their product is the low-rank
branch plus lo' c carried to ~2^-16 of c, and the inner dimension is a multiple of 8 whenever it has more than the
bare low-rank factor (the alignment that keeps eager and Inductor-compiled addmm on one cuBLAS kernel)."""
import pytest
import torch

from robuq_fx.kernels import weight_cache as W


@pytest.mark.parametrize("rank", [0, 16, 32, 5])
@pytest.mark.parametrize("asym", [False, True])
def test_ext_factors_product_and_alignment(rank, asym):
    torch.manual_seed(0)
    m, n = 24, 40
    t = torch.randn(m, rank) if rank else None
    up = torch.randn(n, rank) if rank else None
    lo = torch.randn(m) * 3 if asym else None
    cs = torch.randn(n) * 50 if asym else None
    if t is None and lo is None:
        return  # nothing to add: the epilogue is not used
    left, right = W.ext_left(t, lo, torch.float32), W.ext_up(up, cs, torch.float32)
    assert left.shape[1] == right.shape[1]
    if asym:
        assert left.shape[1] % 8 == 0 and left.shape[1] >= rank + 3
    else:
        assert left.shape[1] == rank  # symmetric: A alone, no padding (nothing to align it with)
    want = torch.zeros(m, n, dtype=torch.float64)
    if rank:
        want += t.double() @ up.double().t()
    if asym:
        want += lo.double()[:, None] * cs.double()[None, :]
    got = left.double() @ right.double().t()
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item()), (got - want).abs().max()
    # in bf16 the hi/lo split keeps lo' c far closer than one bf16 rounding of the product would
    if asym:
        lb, rb = W.ext_left(t, lo, torch.bfloat16), W.ext_up(up, cs, torch.bfloat16)
        pad = lb.shape[1] - (rank + 3)
        assert pad >= 0 and torch.count_nonzero(lb[:, rank + 3:]) == 0 and torch.count_nonzero(rb[:, rank + 3:]) == 0
        c_part = (lb[:, rank:].double() @ rb[:, rank:].double().t())
        exact = lo.double()[:, None] * cs.double()[None, :]
        assert ((c_part - exact).abs().max() / exact.abs().max()).item() < 2 ** -14


def test_fp8_entry_is_dropped_with_its_layer():
    """The fp8-layout entry aliases the module's qweight; it must not keep that tensor alive (it is keyed on a weak
    reference to it), or a deleted model's weights stay resident in the cache until clear_caches()."""
    import gc
    import weakref
    from robuq_fx.kernels import QLinearArgs
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    m = PackedLinear.from_float(lin.weight, lin.bias, None, None, LayerSpec(w_bits=4, a_bits=4).resolve(64, 32)).set_layout("fp8")
    qa = QLinearArgs(m.qweight, m.w_scale, m.bias, None, None, *m.op_args())
    e = W._fp8_weights(qa)
    assert e.fp8.data_ptr() == m.qweight.data_ptr() and e.fp8.shape == (32, 64)  # no second copy
    ref, wid = weakref.ref(m.qweight), id(m.qweight)
    assert W._WCACHE[wid] is e
    del m, qa, e
    gc.collect()
    assert ref() is None and wid not in W._WCACHE


def test_hi_lo_split_survives_inductor():
    """The addmm epilogue carries fp32 terms (lo x c) as bf16 hi + lo pairs. Inductor keeps bf16 intermediates of a
    fused kernel in fp32, so a split written as v - v.to(bf16).float() compiles to lo = 0 (the asymmetric layers'
    compiled output was then a bf16 ulp off eager's on the H200): the split must give the same pair compiled and
    eager, with the low half intact."""
    from robuq_fx.kernels.weight_cache import _split16, ext_left, ext_up
    torch.manual_seed(0)
    v = torch.randn(1000) * 3
    eager = _split16(v, torch.bfloat16)
    compiled = torch.compile(lambda t: _split16(t, torch.bfloat16))(v)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert (compiled[1] != 0).sum() > 900
    rel = ((eager[0].double() + eager[1].double() - v.double()) / v.double()).abs().max()
    assert rel < 2 ** -15, rel  # ~16 significant bits together
    t, lo, up, cs = torch.randn(37, 32).bfloat16(), torch.randn(37), torch.randn(64, 32).bfloat16(), torch.randn(64)

    def f(t, lo, up, cs):
        return torch.addmm(torch.zeros(37, 64, dtype=torch.bfloat16), ext_left(t, lo, torch.bfloat16),
                           ext_up(up, cs, torch.bfloat16).t())
    assert torch.equal(f(t, lo, up, cs), torch.compile(f)(t, lo, up, cs))
