"""Shipped policies match exactly the intended layers on tiny configs of the real classes; 8-bit attention."""
import os
import re

import pytest
import torch
import torch.nn as nn

import robuq_fx
from robuq_fx import PolicyError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ops = torch.ops.robuq


def tiny_dit(layers=2):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=layers,
                                           sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=32).eval()


def dit_inputs(b=2):
    torch.manual_seed(1)
    return {"hidden_states": torch.randn(b, 4, 8, 8), "timestep": torch.tensor([3, 7] * (b // 2)),
            "class_labels": torch.tensor([1, 4] * (b // 2)), "return_dict": False}


def tiny_llama():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    return tr.LlamaForCausalLM(cfg).eval()


def tiny_vit():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8, num_labels=10)
    return tr.ViTForImageClassification(cfg).eval()


def quantized_names(policy, model):
    return {r["layer"] for r in policy.explain(model, print_table=False) if re.match(r"W[\d.]+A", str(r["spec"]))}


def test_dit_xl_2_robuq_matches_the_papers_layers():
    m = tiny_dit()
    p = robuq_fx.Policy.load("dit-xl-2-robuq")
    rows = {r["layer"]: r["spec"] for r in p.explain(m, print_table=False)}
    blocks = {f"transformer_blocks.{i}.{s}" for i in range(2)
              for s in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")}
    adaln = {f"transformer_blocks.{i}.norm1.linear" for i in range(2)}
    assert quantized_names(p, m) == blocks | adaln
    assert all(rows[n].startswith("W1.58A4 H") and "LRB32" in rows[n] for n in blocks)
    assert all(rows[n].startswith("W4A4 H") for n in adaln)
    assert rows["proj_out_2"] == "skip (FP)" and rows["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"] == "skip (FP)"
    assert all("attention q/k/v A8" in rows[f"transformer_blocks.{i}.attn1"] for i in range(2))
    for n, bits in (("dit-xl-2-robuq-a3", 3), ("dit-xl-2-robuq-a2", 2)):
        specs = {r["layer"]: r["spec"] for r in robuq_fx.Policy.load(n).explain(m, print_table=False)}
        assert specs["transformer_blocks.0.ff.net.2"].startswith(f"W1.58A{bits}")


def test_dit_xl_2_robuq_graph_and_attention():
    m = tiny_dit()
    ex = dit_inputs()
    q = robuq_fx.quantize(m, "dit-xl-2-robuq", example_inputs=ex)
    info = robuq_fx.robuq_info(q)
    assert info["attention"] == {"transformer_blocks.0.attn1": 8, "transformer_blocks.1.attn1": 8}
    assert type(q) is type(m)  # only the two attention modules are graphs now
    graphs = [r for r in q.modules() if isinstance(r, torch.fx.GraphModule)]
    sdpa = [n for r in graphs for n in r.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert len(graphs) == 2 and len(sdpa) == 2
    for n in sdpa:  # q, k, v of every SDPA are 8-bit fake-quant nodes
        assert all(a.target is ops.fake_quant_act.default and a.args[1] == 8 for a in n.args[:3])
    ref = m(**ex)[0]
    attn_only = robuq_fx.quantize(m, {"rules": [{"match": "*.attn1", "attn_bits": 8}]}, example_inputs=ex)
    err = ((attn_only(**ex)[0] - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.02  # 8-bit per-(token, head) q/k/v: ~0.4% per input, the attention averages it down
    low = robuq_fx.lower(q)
    assert torch.equal(low(**ex)[0], q(**ex)[0])  # the 8-bit q/k/v stay as the lowered model's quantized inputs


def test_llama_attention_and_policy():
    m = tiny_llama()
    ids = torch.randint(0, 128, (2, 12))
    ex = {"input_ids": ids, "use_cache": False, "return_dict": False}
    names = quantized_names(robuq_fx.Policy.load("llama"), m)
    assert names == {f"model.layers.{i}.{s}" for i in range(2) for s in
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    q = robuq_fx.quantize(m, {"rules": [{"match": "model.layers.*.self_attn", "attn_bits": 8}]}, example_inputs=ex)
    assert set(robuq_fx.robuq_info(q)["attention"]) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    ref = m(**ex)[0]
    err = ((q(**ex)[0] - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.02


def test_vit_policy_names():
    m = tiny_vit()
    names = quantized_names(robuq_fx.Policy.load("vit"), m)
    linears = {n for n, x in m.named_modules() if isinstance(x, nn.Linear)}
    assert names == linears - {"classifier"} and len(names) == 12  # 6 per block, whatever transformers' naming


def test_attn_bits_on_module_without_attention_is_an_error():
    m = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(PolicyError, match="attn_bits but matches no module that calls scaled_dot_product_attention"):
        robuq_fx.quantize(m, {"rules": [{"type": "Linear", "w_bits": 4}, {"match": "0", "attn_bits": 8}]})


def test_attention_rule_validation():
    with pytest.raises(PolicyError, match="attn_bits=3"):
        robuq_fx.Policy.from_dict({"rules": [{"match": "*", "attn_bits": 3}]})
    with pytest.raises(PolicyError, match="only 'attn_bits'"):
        robuq_fx.Policy.from_dict({"rules": [{"match": "*", "attn_bits": 8, "w_bits": 4}]})


def test_unknown_shipped_policy_lists_names():
    with pytest.raises(PolicyError, match="shipped policies: .*dit-xl-2-robuq"):
        robuq_fx.Policy.load("no-such-policy")
