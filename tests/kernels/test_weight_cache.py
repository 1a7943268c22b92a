"""The weight caches (`kernels/weight_cache.py`), on the CPU."""
import torch

from robuq_fx.kernels import weight_cache as W


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
