"""robuq_fx.fuse_activations (passes/act_fuse.py): a GELU handed to the quantized layer that reads it (input_act) or
to the one that produces it (into="producer": output_act) gives the same output bit for bit on the CPU (reference
kernel: the activation runs where the model ran it), on diffusers' DiT FeedForward, a timm-style Mlp, an
nn.Sequential, transformers' ViT and BERT; layers with a low-rank branch take it too; the state dict is untouched;
torch.compile runs the fused layers."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import robuq_fx
from models.conftest import CASES  # tests/ is on sys.path (rootdir-relative packages)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]
W4A4H = {"rules": [{"type": "Linear", "w_bits": 4, "a_bits": 4, "hadamard": True}]}


class TimmMlp(nn.Module):
    def __init__(self, approximate="tanh"):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(32, 64), nn.GELU(approximate=approximate), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(64, 32), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def _check(model, inputs, policy, expect: int, example=None, into="reader", left=0):
    """left: how many GELUs the other mode still finds after this one (those with no site for this mode)."""
    low = robuq_fx.lower(robuq_fx.quantize(model.eval(), policy, example))
    fused = copy.deepcopy(low)
    keys = {k: v.clone() for k, v in fused.state_dict().items()}
    names = robuq_fx.fuse_activations(fused, into=into)
    assert len(names) == expect, names
    attr, other = ("output_act", "input_act") if into == "producer" else ("input_act", "output_act")
    assert all(getattr(fused.get_submodule(n), attr) in ("gelu", "gelu_tanh") for n in names)
    assert not any(getattr(m, other, "") for m in fused.modules())
    assert keys.keys() == fused.state_dict().keys()
    assert all(torch.equal(v, fused.state_dict()[k]) for k, v in keys.items())
    def run(m):
        out = m(**inputs) if isinstance(inputs, dict) else m(*inputs)
        return out if isinstance(out, torch.Tensor) else out[0]  # a tuple or a transformers ModelOutput
    with torch.no_grad():  # the eager fast path
        assert torch.equal(run(fused), run(low))
    assert torch.equal(run(fused), run(low))  # the op path (grad mode on)
    assert robuq_fx.fuse_activations(fused, into=into) == []  # idempotent: nothing left to fuse
    if expect:  # a fused GELU is gone for both modes
        other_mode = copy.deepcopy(fused)
        assert len(robuq_fx.fuse_activations(other_mode, into="producer" if into == "reader" else "reader")) == left
    return low, fused, run


def test_dit_feedforward():
    case = CASES["dit"]
    inputs = case.make_inputs()
    model = case.build(0)
    _check(model, inputs, W4A4H, expect=len(model.transformer_blocks), example=inputs)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_timm_mlp_and_sequential(approximate):
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    _, fused, _ = _check(TimmMlp(approximate), (x,), W4A4H, expect=1)
    assert isinstance(fused.act, nn.Identity)
    assert fused.fc2.input_act == ("gelu_tanh" if approximate == "tanh" else "gelu")
    seq = nn.Sequential(nn.Linear(32, 64), nn.GELU(approximate), nn.Dropout(0.0), nn.Linear(64, 32), nn.GELU(),
                        nn.Linear(32, 8))
    _check(seq, (x,), W4A4H, expect=2)


def test_layers_with_a_branch_take_the_activation_too():
    """The low-rank branch reads act(x) as the quantizer does (on the GPU its down-projection kernel applies it):
    the paper's policy on the tiny DiT fuses every block's GELU, outputs unchanged."""
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    lrb = {"rules": [{"type": "Linear", "w_bits": 1.58, "a_bits": 4, "hadamard": True, "lora_rank": 4}]}
    _check(TimmMlp(), (x,), lrb, expect=1)
    case = CASES["dit"]
    inputs = case.make_inputs()
    model = case.build(0)
    _check(model, inputs, robuq_fx.Policy.load("dit-xl-2-robuq"), expect=len(model.transformer_blocks), example=inputs)


def test_not_fused_where_dropout_is_live():
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    live = TimmMlp()
    live.drop1 = nn.Dropout(0.1)
    _check(live, (x,), W4A4H, expect=0)


def test_compiled_fused_model_runs_the_op_with_its_activation():
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    _, fused, run = _check(TimmMlp(), (x,), W4A4H, expect=1)
    torch._dynamo.reset()
    out = torch.compile(fused)(x)
    assert torch.equal(out, run(fused))


def test_checkpoint_of_a_fused_model_loads_unfused_and_fuses_again(tmp_path):
    """The activation fusion is not part of the checkpoint: a fused model saves the same tensors, loads as the
    unfused model, and fuse_activations on the loaded one gives the fused outputs again."""
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    fp = TimmMlp()
    low, fused, run = _check(fp, (x,), W4A4H, expect=1)
    path = robuq_fx.save_quantized(fused, tmp_path / "fused.safetensors")
    loaded = robuq_fx.load_quantized(path, TimmMlp())
    assert not loaded.fc2.input_act and isinstance(loaded.act, nn.GELU)
    assert torch.equal(run(loaded), run(low))
    assert robuq_fx.fuse_activations(loaded) == ["fc2"]
    assert torch.equal(run(loaded), run(fused))


def test_transformers_vit_mlp():
    case = CASES["vit"]
    inputs = case.make_inputs()
    model = case.build(0)
    _, fused, _ = _check(model, inputs, W4A4H, expect=model.config.num_hidden_layers, example=inputs)
    assert all(type(m.activation_fn) is nn.Identity for n, m in fused.named_modules() if type(m).__name__ == "ViTMLP")


# ---- into="producer": the GELU goes to the layer before it (robuq::qlinear's output_act) -------------------------

def test_producer_dit_feedforward_both_policies():
    """Every block's fc1 (net.0.proj) takes the GELU, the paper's LRB layers too (their kernels apply it after)."""
    case = CASES["dit"]
    inputs = case.make_inputs()
    for policy in (W4A4H, robuq_fx.Policy.load("dit-xl-2-robuq")):
        model = case.build(0)
        _, fused, _ = _check(model, inputs, policy, expect=len(model.transformer_blocks), example=inputs,
                             into="producer")
        assert all(b.ff.net[0].proj.output_act == "gelu_tanh" for b in fused.transformer_blocks)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_producer_timm_mlp_and_sequential(approximate):
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    live = TimmMlp(approximate)
    live.drop1 = nn.Dropout(0.1)  # a live dropout after the GELU keeps its reader out, not its producer
    _, fused, _ = _check(live, (x,), W4A4H, expect=1, into="producer")
    assert isinstance(fused.act, nn.Identity)
    assert fused.fc1.output_act == ("gelu_tanh" if approximate == "tanh" else "gelu")
    seq = nn.Sequential(nn.GELU(), nn.Linear(32, 64), nn.GELU(approximate), nn.Dropout(0.0), nn.Linear(64, 32),
                        nn.GELU(), nn.Linear(32, 8))  # the first GELU has no producer
    _, fused, _ = _check(seq, (x,), W4A4H, expect=2, into="producer", left=1)
    assert [type(k).__name__ for k in fused] == ["GELU", "PackedLinear", "Identity", "Dropout", "PackedLinear",
                                                 "Identity", "PackedLinear"]


def test_producer_transformers_vit_and_bert_intermediate():
    case = CASES["vit"]
    inputs = case.make_inputs()
    model = case.build(0)
    _check(model, inputs, W4A4H, expect=model.config.num_hidden_layers, example=inputs, into="producer")
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16)
    bert = BertModel(cfg)
    ids = torch.randint(0, 64, (2, 9))
    _, fused, _ = _check(bert, {"input_ids": ids}, W4A4H, expect=2, example={"input_ids": ids}, into="producer")
    assert all(type(layer.intermediate.intermediate_act_fn) is nn.Identity for layer in fused.encoder.layer)


def test_producer_compiled_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    low, fused, run = _check(TimmMlp(), (x,), W4A4H, expect=1, into="producer")
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fused)(x), run(low))
    path = robuq_fx.save_quantized(fused, tmp_path / "fused.safetensors")
    loaded = robuq_fx.load_quantized(path, TimmMlp())
    assert not loaded.fc1.output_act and isinstance(loaded.act, nn.GELU)
    assert robuq_fx.fuse_activations(loaded, into="producer") == ["fc1"]
    assert torch.equal(run(loaded), run(fused))


def test_output_act_op_reference_and_bad_values():
    """The op's output_act is the GELU of the op's own (rounded) output, bit for bit; a wrong name is an error
    naming the argument; `into` is checked."""
    torch.manual_seed(0)
    low = robuq_fx.lower(robuq_fx.quantize(TimmMlp().eval(), W4A4H))
    fc1 = low.fc1
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    fc1 = fc1.to(torch.bfloat16)
    args = (x, fc1.qweight, fc1.w_scale, fc1.bias, fc1.lrb_down, fc1.lrb_up, *fc1.op_args())
    plain = torch.ops.robuq.qlinear(*args)
    for act, approx in (("gelu", "none"), ("gelu_tanh", "tanh")):
        got = torch.ops.robuq.qlinear(*args, output_act=act)
        assert torch.equal(got, torch.nn.functional.gelu(plain, approximate=approx))
    with pytest.raises(ValueError, match="output_act='relu'"):
        torch.ops.robuq.qlinear(*args, output_act="relu")
    with pytest.raises(ValueError, match="into='fc1'"):
        robuq_fx.fuse_activations(low, into="fc1")
