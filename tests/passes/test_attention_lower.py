"""Lowering of attention rules: "fake-quant q, k, v -> SDPA" becomes one `robuq::attention8` call whose reference is
those very calls, so the lowered model is bit-identical to the QAT model in eval mode (fp32, CPU)."""
from __future__ import annotations

import os
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import robuq_fx
from models.conftest import op_counts  # tests/ is on sys.path (rootdir-relative packages)
from robuq_fx import quantizers as Q

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ops = torch.ops.robuq


def _ran(model, *args, **kwargs) -> Counter:
    return op_counts(model, *args, **kwargs)  # robuq ops, and aten ops outside them, one forward runs


def tiny_dit():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                           sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                           norm_num_groups=32).eval()


def dit_inputs(b=2):
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(b, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 7] * (b // 2)),
            "class_labels": torch.tensor([1, 4] * (b // 2)), "return_dict": False}


def test_dit_paper_policy_lowers_attention_to_one_op():
    m = tiny_dit()
    ex = dit_inputs()
    q = robuq_fx.quantize(m, "dit-xl-2-robuq", example_inputs=ex)
    low = robuq_fx.lower(q)
    assert type(low) is type(m)
    t = _ran(low, **ex)
    assert t[ops.attention8.default] == 2
    assert ops.fake_quant_act.default not in t
    assert not [x for x in t if "scaled_dot_product_attention" in str(x)]
    # only the attention modules became graphs; each one's SDPA is one robuq::attention8 node
    regions = {n: r for n, r in low.named_modules() if isinstance(r, torch.fx.GraphModule)}
    assert set(regions) == {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"}
    assert all(sum(n.target is ops.attention8.default for n in r.graph.nodes) == 1 for r in regions.values())
    for batch in (2, 4):
        x = dit_inputs(batch)
        with torch.no_grad():
            assert torch.equal(low(**x)[0], q.eval()(**x)[0])


def test_llama_causal_attention_lowered_bit_identical():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    m = tr.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ex = {"input_ids": ids, "use_cache": False, "return_dict": False}
    q = robuq_fx.quantize(m, {"rules": [{"match": "model.layers.*.self_attn", "attn_bits": 8},
                                        {"type": "Linear", "w_bits": 4, "a_bits": 8}, ]}, example_inputs=ex)
    with warnings.catch_warnings(record=True):
        low = robuq_fx.lower(q)
    assert _ran(low, **ex)[ops.attention8.default] == 2
    with torch.no_grad():
        assert torch.equal(low(**ex)[0], q.eval()(**ex)[0])


class MaskedAttention(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x, mask):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, d)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MaskedAttention()

    def forward(self, x, mask):
        return self.attn(x, mask)


def test_unsupported_form_warns_once_naming_the_module_and_stays_exact():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 5, 16)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    q = robuq_fx.quantize(net, {"rules": [{"match": "attn", "attn_bits": 8}, {"type": "Linear", "skip": True}]},
                          example_inputs=(x, mask))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        low = robuq_fx.lower(q)
    msgs = [str(m.message) for m in w if "attention 'attn'" in str(m.message)]
    assert len(msgs) == 1 and "attn_mask" in msgs[0]
    with torch.no_grad():
        assert torch.equal(low(x, mask), q.eval()(x, mask))


def test_attention8_reference_is_fake_quant_then_sdpa():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 7, 24, generator=g) * s for s in (1.0, 4.0, 0.5))
    out = ops.attention8(q, k, v, None, 0.0, True, None, False, 8)
    ref = F.scaled_dot_product_attention(Q.fake_quant_act(q, 8, True), Q.fake_quant_act(k, 8, True),
                                         Q.fake_quant_act(v, 8, True), is_causal=True)
    assert torch.equal(out, ref)
    assert out.transpose(1, 2).is_contiguous()  # (batch, seq, heads, dim) memory, as the GPU kernel writes
    torch.library.opcheck(ops.attention8.default, (q, k, v, None, 0.0, True, None, False, 8))
    # the quantization is really there: 8-bit q/k/v differ from full precision, by a small amount
    fp = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    err = ((out - fp).norm() / fp.norm()).item()
    assert 1e-4 < err < 2e-2


class ArgAttention(nn.Module):
    """timm's shape: is_causal and attn_mask are the module's own arguments, the parent passes them by keyword."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return o.transpose(1, 2).reshape(b, s, d)


class ArgNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = ArgAttention()

    def forward(self, x):
        return self.attn(x, attn_mask=None, is_causal=False)


def test_attention_arguments_from_the_module_are_not_baked_in():
    # regression: is_causal arrived as a graph value and was truth-tested at lowering (always True), and the
    # captured forward refused attn_mask=None by keyword (FX renames arguments specialised to None)
    torch.manual_seed(0)
    net = ArgNet().eval()
    x = torch.randn(2, 6, 16)
    q = robuq_fx.quantize(net, {"rules": [{"match": "attn", "attn_bits": 8}, {"type": "Linear", "skip": True}]},
                          example_inputs=(x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the mask is None in this model's calls
        low = robuq_fx.lower(q)
    with torch.no_grad():
        out = low(x)
        assert torch.equal(out, q.eval()(x))
        causal = q.eval().attn(x, attn_mask=None, is_causal=True)
        assert not torch.equal(out, causal)  # the two branches really differ, so equality above means something


def test_qkv_union_finds_the_fused_qkv_buffer():
    """kernels/attention.qkv_union: q, k, v as the lowered DiT's attention reads them (views of one fused qkv
    output) give one dense (b, s, 3h, d) view whose thirds are q, k, v; anything else gives None."""
    from robuq_fx.kernels.attention import qkv_union
    b, s, h, d = 2, 5, 3, 8
    buf = torch.randn(b * s, 3 * h * d)
    q, k, v = (buf.narrow(1, i * h * d, h * d).view(b, s, h, d).transpose(1, 2) for i in range(3))
    u = qkv_union(q, k, v)
    assert u is not None and u.is_contiguous() and u.shape == (b, s, 3 * h, d)
    for i, t in enumerate((q, k, v)):
        assert torch.equal(u[:, :, i * h:(i + 1) * h].transpose(1, 2), t)
    one = buf[:s]  # batch 1: the batch stride does not matter
    assert qkv_union(*(one.narrow(1, i * h * d, h * d).view(1, s, h, d).transpose(1, 2) for i in range(3))) is not None
    assert qkv_union(k, q, v) is None  # out of order
    assert qkv_union(q, k, v.clone()) is None  # another buffer
    sep = torch.randn(b, s, 3, h, d)
    assert qkv_union(*(sep[:, :, i].contiguous().transpose(1, 2) for i in range(3))) is None  # three tensors
    wide = torch.randn(b * s, 4 * h * d)  # rows hold more than q, k, v
    assert qkv_union(*(wide.narrow(1, i * h * d, h * d).view(b, s, h, d).transpose(1, 2) for i in range(3))) is None
