"""The drop-in path on small models (passes/dropin.py): quantize / lower return your model, only the matched parts
replaced; which models take the whole-graph path; casts; transformers' Conv1D (GPT-2); bad input."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import robuq_fx
from robuq_fx import CaptureError, PackedLinear
from robuq_fx.qat_linear import QATLinear

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ops = torch.ops.robuq
W4 = {"rules": [{"type": "Linear", "w_bits": 4, "a_bits": 4, "lora_rank": 4}]}


class Tower(nn.Module):
    """A model with its own attributes and methods, as library models have (`config`, `generate`, ...)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.config = {"hidden": 32}
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32)) for _ in range(2)])

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return x

    def describe(self) -> str:
        return f"tower of {len(self.blocks)}"


def test_returns_your_model_with_only_the_linears_replaced():
    m = Tower()
    q = robuq_fx.quantize(m, W4)
    low = robuq_fx.lower(q)
    for out in (q, low):
        assert isinstance(out, Tower) and out.config == {"hidden": 32} and out.describe() == "tower of 2"
        assert isinstance(out.blocks[0][0], nn.LayerNorm)
    assert isinstance(q.inp, QATLinear) and isinstance(low.blocks[1][1], PackedLinear)
    assert q.inp.weight is not m.inp.weight and isinstance(m.inp, nn.Linear)  # a private copy
    assert set(q.state_dict()) == set(m.state_dict()) | {f"{n}.{p}" for n in ("inp", "blocks.0.1", "blocks.1.1")
                                                          for p in ("lrb_down", "lrb_up")}
    x = torch.randn(3, 16)
    assert torch.equal(low(x), q.eval()(x))


class Functional(nn.Module):
    """A linear that is a function call on a parameter: no module to swap."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(32, 16) * 0.2)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(F.gelu(F.linear(x, self.weight)))


class Proj(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32, 16) * 0.2)

    def forward(self, x):
        return F.linear(x, self.weight)


class Outer(nn.Module):
    """The functional call in a submodule's forward (a module holding only its weight: the whole-graph path puts
    the packed layer where that module was)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = Proj()
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(F.gelu(self.inner(x)))


@pytest.mark.parametrize("example", [False, True])
@pytest.mark.parametrize("build", [Functional, Outer])
def test_functional_linears_take_the_whole_graph_path(build, example):
    m = build()
    x = torch.randn(4, 16)
    pol = {"rules": [{"match": "*", "w_bits": 4, "a_bits": 8}]}  # the root's own weight, matched by name
    q = robuq_fx.quantize(m, pol, (x,) if example else None)
    info = robuq_fx.robuq_info(q)
    assert isinstance(q, torch.fx.GraphModule) and info["form"] == "graph" and "functional" in info["why"]
    assert set(info["layers"]) == ({"inner", "head"} if build is Outer else {"", "head"})
    assert sum(n.target is ops.fake_quant_weight.default for n in q.graph.nodes) == 2
    low = robuq_fx.lower(q)
    assert torch.equal(low(x), q.eval()(x))


def test_casts_keep_masters_and_scales_and_commute_with_lower():
    """`.to(bfloat16)` / `.half()`: QATLinear keeps its fp32 master weight, bias and branch (they decide the codes)
    and computes in the cast dtype; lowering packs from the masters and casts the rest, so cast-then-lower and
    lower-then-cast give the same packed model: same tensors, same dtypes (codes uint8, scales fp32), same output."""
    q = robuq_fx.quantize(Tower(), W4)
    for cast in (torch.bfloat16, torch.float16):
        a = robuq_fx.lower(q).to(cast)
        c = robuq_fx.quantize(Tower(), W4).to(cast)
        assert c.inp.weight.dtype == c.inp.lrb_down.dtype == torch.float32 and c.inp.compute_dtype == cast
        assert c.blocks[0][0].weight.dtype == cast  # everything else follows the cast
        b = robuq_fx.lower(c)
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb)
        assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
        assert sa["inp.qweight"].dtype == torch.uint8 and sa["inp.w_scale"].dtype == torch.float32
        assert sa["inp.bias"].dtype == sa["inp.lrb_up"].dtype == cast
        x = torch.randn(3, 16, dtype=cast)
        with torch.no_grad():
            out = b(x)
            assert out.dtype == cast and torch.equal(a(x), out)
            # the QAT model in the cast dtype: Q_w(R) from the fp32 masters, then rounded to `cast`, where the
            # packed model rounds s and q to `cast` first: close, not equal (a 4-bit activation code may flip)
            qat = c.eval()(x)
            assert qat.dtype == cast and ((qat - out).float().norm() / out.float().norm()).item() < 0.05
    c.float()
    assert c.inp.compute_dtype is None and c.inp.weight.dtype == torch.float32


# ---- transformers' Conv1D (GPT-2) -----------------------------------------------------------------------------------
def tiny_gpt2():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return tr.GPT2LMHeadModel(tr.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)).eval()


def test_gpt2_conv1d_projections_are_linear_layers():
    m = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    q = robuq_fx.quantize(m, example_inputs=(ids,))  # the default policy: Linear and Conv1D, W4A4 + H
    layers = robuq_fx.robuq_info(q)["layers"]
    convs = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                  "mlp.c_proj")]
    assert set(layers) == set(convs) | {"lm_head"}
    c = q.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(c, QATLinear) and c.transposed and (c.in_features, c.out_features) == (32, 96)
    assert q.state_dict()["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # the user's (in, out) layout
    low = robuq_fx.lower(q)
    assert type(low) is type(m) and low.get_submodule("transformer.h.0.mlp.c_fc").out_features == 128
    with torch.no_grad():
        ref = m(ids).logits
        out = q(ids).logits
        assert torch.equal(low(ids).logits, out)
        assert ((out - ref).norm() / ref.norm()).item() < 0.2  # W4A4 on a random tiny model: close, not equal
        a = q.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(low.generate(ids, max_new_tokens=4, do_sample=False), a)
    # a `type: Conv1D` rule picks them alone
    only = robuq_fx.quantize(m, {"rules": [{"type": "Conv1D", "w_bits": 1.58, "a_bits": 8, "lora_rank": 4}]},
                             (ids,))
    assert set(robuq_fx.robuq_info(only)["layers"]) == set(convs)
    rows = {r["layer"]: r for r in robuq_fx.Policy.default().explain(m, print_table=False)}
    assert rows["transformer.h.0.attn.c_attn"]["type"] == "Conv1D" and rows["transformer.h.0.attn.c_attn"]["in"] == 32


# ---- bad input ------------------------------------------------------------------------------------------------------
class DataAttention(nn.Module):
    """Attention whose forward neither symbolic_trace nor torch.export can take (control flow on values)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        if q.sum() > 0:
            q = q * 2
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class MaskAttention(DataAttention):
    """Shape-dependent Python (symbolic_trace fails, torch.export takes it) and an optional mask."""

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        if x.shape[-1] > 8:
            q = q * 0.5
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


class Net(nn.Module):
    def __init__(self, attn):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([attn(), attn()])

    def forward(self, x, mask=None):
        for b in self.blocks:
            x = x + (b(x) if mask is None else b(x, mask=mask))
        return x


ATTN = {"rules": [{"match": "blocks.*", "attn_bits": 8}, {"type": "Linear", "w_bits": 4, "a_bits": 8}]}


def test_uncapturable_submodule_is_one_capture_error_naming_it():
    m = Net(DataAttention)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CaptureError) as e:
        robuq_fx.quantize(m, ATTN, example_inputs=(torch.randn(2, 5, 16),))
    msg = str(e.value)
    assert "'blocks.0' (DataAttention)" in msg and "symbolic_trace failed" in msg and "torch.export" in msg
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # untouched


def test_attention_rule_without_example_inputs_asks_for_them():
    with pytest.raises(CaptureError, match="attention rules.*Pass example_inputs"):
        robuq_fx.quantize(Net(DataAttention), ATTN)


def test_region_checks_each_call_against_its_capture():
    """A torch.export region runs only calls shaped like the one it was captured from: a mask where the example
    had None is a clear error, not the captured no-mask branch run silently."""
    m = Net(MaskAttention)
    x = torch.randn(2, 5, 16)
    q = robuq_fx.quantize(m, ATTN, example_inputs=(x,))
    assert robuq_fx.robuq_info(q)["regions"]["blocks.0"]["capture"] == "torch.export"
    assert type(q) is Net and isinstance(q.blocks[0], torch.fx.GraphModule)
    q.eval()
    for low in (q, robuq_fx.lower(q)):
        assert low(torch.randn(3, 7, 16)).shape == (3, 7, 16)  # other batch and sequence sizes are fine
        with pytest.raises(CaptureError, match="'blocks.0'.*argument 'mask' was None.*is a tensor now"):
            low(x, mask=torch.ones(5, 5, dtype=torch.bool))


def test_pipeline_or_other_object_is_a_clear_error():
    class Pipe:  # what a diffusers / transformers pipeline looks like to robuq_fx
        components = {"transformer": nn.Linear(2, 2), "scheduler": object()}

    with pytest.raises(CaptureError, match=r"takes a torch.nn.Module; got a Pipe.*pipeline.*\(transformer\).*"
                                           r"pipe.transformer = robuq_fx.quantize\(pipe.transformer"):
        robuq_fx.quantize(Pipe())
    with pytest.raises(CaptureError, match="takes a torch.nn.Module; got a str"):
        robuq_fx.lower("model.pt")


def test_multihead_attention_out_proj_is_left_in_fp_with_a_warning():
    """nn.MultiheadAttention reads its out_proj weight without calling the module: swapping it would do nothing
    (and break lowering), so a matched out_proj that never runs as a module stays FP, with a warning."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0])

    x = torch.randn(2, 5, 16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        q = robuq_fx.quantize(M(), {"rules": [{"type": "Linear", "w_bits": 4, "a_bits": 8}]}, (x,))
    assert list(robuq_fx.robuq_info(q)["layers"]) == ["head"]
    assert any("attn.out_proj" in str(m.message) and "never called" in str(m.message) for m in w)
    assert torch.equal(robuq_fx.lower(q)(x), q.eval()(x))
