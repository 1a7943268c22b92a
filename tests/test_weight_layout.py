"""PackedLinear's weight layouts (packed bytes / fp8 codes) and dtype-safe moves (robuq_fx/modules.py).

The fp8 layout is what the GPU kernels read on fp8-capable devices; here it is set by hand on the CPU, where the
reference kernel reads it too, so the layout logic is tested without a GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import robuq_fx
from robuq_fx import packing
from robuq_fx.modules import PackedLinear
from robuq_fx.packing import codes_of

pytestmark = pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8")


def _layer(w_bits=4, a_bits=4, rank=4, hadamard=True, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=bias)
    spec = robuq_fx.LayerSpec(w_bits=w_bits, a_bits=a_bits, hadamard=hadamard, hadamard_block=16 if hadamard else None,
                              lora_rank=rank).resolve(64, 48)
    down = up = None
    if rank:
        down, up = torch.randn(rank, 64) * 0.05, torch.randn(48, rank) * 0.05
    return PackedLinear.from_float(lin.weight, lin.bias, down, up, spec)


@pytest.mark.parametrize("w_bits", [1.58, 2, 3, 4])
def test_fp8_layout_same_codes_same_output_same_state_dict(w_bits):
    m = _layer(w_bits)
    x = torch.randn(5, 64)
    ref, sd = m(x), {k: v.clone() for k, v in m.state_dict().items()}
    codes = m.weight_codes()
    m.set_layout("fp8")
    assert m.layout == "fp8" and m.qweight.dtype == torch.float8_e4m3fn and m.qweight.shape == (48, 64)
    assert torch.equal(m.weight_codes(), codes)
    assert torch.equal(m(x), ref)  # the reference kernel reads either layout
    out = m.state_dict()
    assert out["qweight"].dtype == torch.uint8 and torch.equal(out["qweight"], sd["qweight"])  # checkpoints: packed
    # packed bytes load into an fp8-layout module, which keeps its layout
    fresh = _layer(w_bits).set_layout("fp8")
    fresh.qweight.zero_()
    fresh.load_state_dict(sd)
    assert fresh.layout == "fp8" and torch.equal(fresh.weight_codes(), codes)
    m.set_layout("packed")
    assert torch.equal(m.qweight, sd["qweight"])


def test_codes_of_rejects_nothing_silently():
    m = _layer(2)
    assert torch.equal(codes_of(m.qweight, 2, (48, 64)), packing.unpack(m.qweight, 2, (48, 64)))
    with pytest.raises(ValueError):
        codes_of(m.qweight[:-1], 2, (48, 64))


@pytest.mark.parametrize("layout", ["packed", "fp8"])
def test_casts_keep_codes_and_scales_in_their_dtypes(layout):
    m = _layer(4).set_layout(layout)
    qdt, sdt = m.qweight.dtype, m.w_scale.dtype
    x = torch.randn(3, 64)
    for cast in (lambda t: t.to(torch.bfloat16), lambda t: t.half(), lambda t: t.double(), lambda t: t.float()):
        cast(m)
        assert m.qweight.dtype == qdt and m.w_scale.dtype == sdt == torch.float32
        assert m.layout == layout
    assert m.bias.dtype == torch.float32 and m.lrb_down.dtype == torch.float32
    m.to(torch.bfloat16)
    assert m.bias.dtype == m.lrb_up.dtype == torch.bfloat16  # the FP parts follow the model
    # cast then run == run the same packed layer built in bf16: codes and fp32 scales unchanged
    b = _layer(4).set_layout(layout)
    b.to(torch.bfloat16)
    assert torch.equal(m(x.bfloat16()), b(x.bfloat16()))


def test_lowered_model_cast_keeps_scales_fp32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    low = robuq_fx.lower(robuq_fx.quantize(net, {"rules": [{"type": "Linear", "w_bits": 4, "a_bits": 8}]}))
    before = {k: v.dtype for k, v in low.named_buffers() if k.endswith(("qweight", "w_scale"))}
    low.to(torch.bfloat16)
    after = {k: v.dtype for k, v in low.named_buffers() if k.endswith(("qweight", "w_scale"))}
    assert before == after and torch.float32 in after.values()
    assert low(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
