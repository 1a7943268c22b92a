import json

import pytest
import torch.nn as nn

from robuq_fx import Policy, PolicyError
from robuq_fx.spec import LayerSpec


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": nn.ModuleDict({"q": nn.Linear(64, 64), "k": nn.Linear(64, 64)}),
                                                    "mlp": nn.ModuleDict({"fc1": nn.Linear(64, 128)})})])
        self.head = nn.Linear(128, 10)


RULES = {"rules": [
    {"match": "blocks.*.mlp.*", "w_bits": 1.58, "a_bits": 3, "hadamard": True},
    {"match": "re:.*attn\\.(q|k|v)$", "w_bits": 4, "a_bits": 4, "lora_rank": 8},
    {"match": "head", "skip": True},
    {"type": "Linear", "w_bits": 4, "a_bits": 4, "hadamard": True},
]}


def test_first_match_wins_and_explain(capsys):
    p = Policy.from_dict(RULES)
    rows = {r["layer"]: r for r in p.explain(Net())}
    out = capsys.readouterr().out
    assert "blocks.0.mlp.fc1" in out and "W1.58A3" in out
    assert rows["blocks.0.mlp.fc1"]["rule"] == 0 and rows["blocks.0.attn.q"]["rule"] == 1
    assert "LRB8" in rows["blocks.0.attn.k"]["spec"]
    assert rows["head"]["spec"] == "skip (FP)"


def test_type_rule_matches_subclasses():
    class MyLinear(nn.Linear):
        pass
    p = Policy.from_dict({"rules": [{"type": "Linear", "w_bits": 2, "a_bits": 2}]})
    assert p.match("x", MyLinear(4, 4))[1] is not None
    assert p.match("x", nn.Conv1d(4, 4, 1))[1] is None
    p2 = Policy.from_dict({"rules": [{"type": nn.Linear, "w_bits": 2}]})
    assert p2.rules[0].type == "Linear"


def test_defaults_merge():
    p = Policy.from_dict({"defaults": {"hadamard": False, "a_bits": 8}, "rules": [{"match": "*", "w_bits": 1.58}]})
    assert p.rules[0].spec == LayerSpec(w_bits=1.58, a_bits=8, hadamard=False)


def test_json_yaml_round_trip(tmp_path):
    p = Policy.from_dict(RULES)
    for name in ("p.json", "p.yaml"):
        p.save(tmp_path / name)
        q = Policy.load(tmp_path / name)
        assert [r.spec for r in q.rules] == [r.spec for r in p.rules]
        assert [r.match for r in q.rules] == [r.match for r in p.rules]


def test_default_policy():
    p = Policy.default()
    assert p.match("anything", nn.Linear(128, 8))[1] == LayerSpec(w_bits=4, a_bits=4, hadamard=True)


@pytest.mark.parametrize("bad,msg", [
    ({"rules": [{"match": "*", "w_bits": 5}]}, "w_bits=5"),
    ({"rules": [{"match": "*", "w_bits": 1.5}]}, "w_bits=1.5"),
    ({"rules": [{"match": "*", "w_bits": 0}]}, "w_bits=0"),
    ({"rules": [{"match": "*", "a_bits": 5}]}, "a_bits=5"),
    ({"rules": [{"match": "*", "wbits": 4}]}, "unknown key"),
    ({"rules": [{"match": "*", "lora_rank": -1}]}, "lora_rank=-1"),
    ({"rules": [{"match": "*", "hadamard_block": 12}]}, "power of two"),
    ({"rules": [{"match": "*", "a_bits": 2, "a_sym": True}]}, "always asymmetric"),
    ({"rules": [{"match": "re:(", "w_bits": 4}]}, "invalid regex"),
    ({"rules": [{"match": "head", "skip": True, "w_bits": 4}]}, "skip rule takes no spec"),
    ({"rules": []}, "non-empty"),
    ({"rule": []}, "unknown top-level"),
])
def test_bad_rules(bad, msg):
    with pytest.raises(PolicyError, match=msg):
        Policy.from_dict(bad)


def test_bad_files(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        Policy.load(tmp_path / "nope.yaml")
    f = tmp_path / "bad.json"
    f.write_text('{"rules": [ {"match": 1,, } ]}')
    with pytest.raises(PolicyError, match="line 1"):
        Policy.load(f)
    g = tmp_path / "bad.yaml"
    g.write_text("rules:\n  - match: '*'\n    w_bits: 7\n")
    with pytest.raises(PolicyError, match=r"bad.yaml: rule 0.*w_bits=7"):
        Policy.load(g)


def test_policy_is_json_serialisable():
    json.dumps(Policy.from_dict(RULES).to_dict())
