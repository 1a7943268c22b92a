"""The settings of benchmarks/bench_lm.py (issue 21): which QAT settings each table runs, and their policies
(the block linears of a transformers Llama; lm_head and the embeddings stay in full precision)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    key: str  # summary key: lm_<key>_dbpb
    label: str
    w_bits: float = 1.58
    a_bits: int = 4  # uniform activation bits, or the AMPN average
    hadamard: str = "all"  # all | out (o_proj, down_proj only) | none
    lrb: bool = True
    a_sym: bool | None = None  # None: symmetric at >= 3 bits, asymmetric below
    a_clip: str = "absmax"
    ampn: bool = False


def _main(h: str) -> list[Setting]:
    tag, k = ("+H", "h") if h == "all" else ("no H", "_noh")
    return [Setting(f"w4a4{k}", f"W4A4 {tag}", 4, 4, h), Setting(f"w158a4{k}", f"W1.58A4 {tag}", 1.58, 4, h),
            Setting(f"w158a3{k}", f"W1.58A3 {tag}", 1.58, 3, h), Setting(f"w158a2{k}", f"W1.58A2 {tag}", 1.58, 2, h)]


MAIN = {"no H": _main("none"), "+H": _main("all")}
ABLATION = [Setting("abl_base", "baseline: H on o_proj/down_proj only, no LRB", 1.58, 3, "out", lrb=False),
            Setting("abl_lrb", "+ LRB", 1.58, 3, "out"), MAIN["+H"][2]]
AMPN = [Setting("ampn_a3", "W1.58 AMPN-A3 +H", 1.58, 3, ampn=True),
        Setting("ampn_a2", "W1.58 AMPN-A2 +H", 1.58, 2, ampn=True)]
QUANTIZER = [MAIN["+H"][2], Setting("w158a3h_asym", "A3 asym absmax", 1.58, 3, a_sym=False),
             Setting("w158a3h_sigma", "A3 sym sigma", 1.58, 3, a_clip="sigma"),
             Setting("w158a3h_asym_sigma", "A3 asym sigma", 1.58, 3, a_sym=False, a_clip="sigma"),
             MAIN["+H"][3], Setting("w158a2h_sigma", "A2 (asym) sigma", 1.58, 2, a_clip="sigma")]
GROUPS = {"main": MAIN, "ablation": ABLATION, "ampn": AMPN, "quantizer": QUANTIZER}


def all_settings(only: str | None = None) -> list[Setting]:
    """The distinct settings of every table (a setting in several tables runs once); `only`: comma list of keys."""
    out = []
    for s in MAIN["no H"] + MAIN["+H"] + ABLATION + AMPN + QUANTIZER:
        if s not in out and (not only or s.key in only.split(",")):
            out.append(s)
    return out


QKV, O = "model.layers.*.self_attn.[qkv]_proj", "model.layers.*.self_attn.o_proj"
GATE_UP, DOWN = "re:model\\.layers\\.\\d+\\.mlp\\.(gate|up)_proj", "model.layers.*.mlp.down_proj"


def policy(s: Setting, rank: int, block: int) -> dict:
    """The block linears of every layer; lm_head (and the embeddings, which are no linear layers) stay FP."""
    spec = {"w_bits": s.w_bits, "a_bits": 4 if s.ampn else s.a_bits, "lora_rank": rank if s.lrb else 0,
            "a_clip": s.a_clip}
    if s.a_sym is not None:
        spec["a_sym"] = s.a_sym

    def rule(glob, rotated):
        return {"match": glob, **spec, "hadamard": rotated, **({"hadamard_block": block} if rotated else {})}
    rules = [rule(g, s.hadamard in ("all", "out")) for g in (O, DOWN)]
    rules += [rule(g, s.hadamard == "all") for g in (QKV, GATE_UP)]
    return {"rules": rules + [{"match": "lm_head", "skip": True}]}


def quantized_layers(n_layers: int) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(n_layers)
            for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
