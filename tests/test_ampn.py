"""AMPN (robuq_fx/ampn.py): the exact allocation against brute force, the budget met exactly, measured sensitivity
(outlier inputs get more bits), in-place bit edits equal to quantizing afresh, the returned policy through
JSON/YAML -> quantize -> lower, and clear errors."""
import importlib.util
import itertools
import json
import math
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import robuq_fx
from robuq_fx import PolicyError, ampn

ROOT = Path(__file__).resolve().parents[1]


# ---- the knapsack -------------------------------------------------------------------------------------------------
def brute_force(costs, weights, cands, avg):
    cap = Fraction(repr(float(avg))) * sum(weights)
    best = None
    for bits in itertools.product(cands, repeat=len(costs)):
        if sum(w * b for w, b in zip(weights, bits)) <= cap:
            c = sum(cost[b] for cost, b in zip(costs, bits))
            best = c if best is None else min(best, c)
    return best


@st.composite
def problems(draw):
    cands = draw(st.sampled_from([(1, 2, 3, 4), (2, 3, 4), (1, 4), (2, 3, 4, 8), (3,)]))
    n = draw(st.integers(1, 6))
    costs = [{b: draw(st.floats(-1, 10, allow_nan=False)) for b in cands} for _ in range(n)]
    weights = draw(st.one_of(st.just([1] * n), st.lists(st.integers(1, 40), min_size=n, max_size=n)))
    avg = draw(st.one_of(st.sampled_from([2, 2.5, 3, 2.3, 1.7]),
                         st.floats(min(cands), max(cands) + 0.5).map(lambda x: round(x, 3))))
    return costs, weights, cands, avg


@settings(max_examples=150, deadline=None)
@given(problems())
def test_choose_bits_is_optimal_and_meets_the_budget_exactly(problem):
    costs, weights, cands, avg = problem
    if avg < min(cands):
        with pytest.raises(PolicyError, match="below the smallest candidate"):
            ampn.choose_bits(costs, weights, cands, avg)
        return
    bits = ampn.choose_bits(costs, weights, cands, avg)
    assert all(b in cands for b in bits)
    # exact: integer load against the budget as an exact fraction (2.3 means 23/10, not the binary float)
    assert sum(w * b for w, b in zip(weights, bits)) <= Fraction(repr(float(avg))) * sum(weights)
    # optimal: the summed cost equals brute force's (up to float summation order: 1e-9 absolute on sums <= 60)
    assert sum(c[b] for c, b in zip(costs, bits)) == pytest.approx(brute_force(costs, weights, cands, avg), abs=1e-9)


def test_decimal_budget_is_used_to_the_last_bit():
    # more bits always help here, so the optimum fills the budget: 10 layers at plain average 2.3 -> 23 bits exactly
    costs = [{b: float(10 - b) * (i + 1) for b in (1, 2, 3, 4)} for i in range(10)]
    bits = ampn.choose_bits(costs, [1] * 10, (1, 2, 3, 4), 2.3)
    assert sum(bits) == 23
    macs = [3, 1, 4, 4, 3, 1, 4, 4]  # DiT-like: qkv 3, proj 1, fc1 4, fc2 4 (in units of d^2 tokens)
    bits = ampn.choose_bits(costs[:8], macs, (1, 2, 3, 4), 2)
    assert sum(m * b for m, b in zip(macs, bits)) == 2 * sum(macs)


def test_infeasible_budget_errors():
    with pytest.raises(PolicyError, match=r"avg_a_bits=0.5 is below the smallest candidate 1"):
        ampn.choose_bits([{1: 0.0, 2: 0.0}], [1], (1, 2), 0.5)
    with pytest.raises(PolicyError, match="below the smallest candidate 2"):  # before any (slow) measurement
        ampn.allocate(nn.Linear(8, 8), {"rules": [{"w_bits": 1.58}]}, [torch.randn(4, 8)], 1.5, candidates=(2, 3, 4))
    with pytest.raises(PolicyError, match="candidates"):
        ampn.allocate(nn.Linear(8, 8), {"rules": [{"w_bits": 1.58}]}, [torch.randn(4, 8)], 2, candidates=(1, 16))
    with pytest.raises(PolicyError, match="weight="):
        ampn.allocate(nn.Linear(8, 8), {"rules": [{"w_bits": 1.58}]}, [torch.randn(4, 8)], 2, weight="flops")


# ---- measuring ----------------------------------------------------------------------------------------------------
class Outliers(nn.Module):
    """Multiplies a few channels by `scale` (the next layer divides its weight columns by it: same FP function,
    but its input has LLM.int8-style outlier channels that blow up a per-token quantization range)."""

    def __init__(self, d, channels, scale):
        super().__init__()
        m = torch.ones(d)
        m[channels] = scale
        self.register_buffer("m", m)

    def forward(self, x):
        return x * self.m


def outlier_mlp(scale: float):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.GELU(), Outliers(64, [3, 17, 40], scale), nn.Linear(64, 64), nn.GELU(),
                      nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    with torch.no_grad():
        m[3].weight[:, [3, 17, 40]] /= scale
    return m


NO_H = {"rules": [{"type": "Linear", "w_bits": 1.58, "a_bits": 4, "hadamard": False}]}


def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(64, 16, generator=g) for _ in range(2)]


def test_layer_with_outlier_inputs_gets_more_bits():
    with pytest.warns(UserWarning, match="warm-up skipped"):
        policy, report = ampn.allocate(outlier_mlp(30.0), NO_H, calib(), 2.5, weight="plain", progress=False)
    rows = {r["layer"]: r for r in report}
    others = [n for n in rows if n != "3"]
    assert all(rows["3"][f"Δ@A{b}"] > max(rows[n][f"Δ@A{b}"] for n in others) for b in (1, 2))
    assert rows["3"]["bits"] == 4 > min(rows[n]["bits"] for n in others)
    assert sum(r["bits"] for r in report) <= 2.5 * 4
    assert "warm-up skipped" in report.info["notes"][0] and "warm-up" in str(report)


def test_in_place_bit_edits_equal_quantizing_afresh():
    """sens[layer][b] + base must be the metric of a model quantized from scratch with that layer at b: editing the
    fake_quant_act nodes (and a_sym) in place is the same model, without re-capture or a new SVD."""
    model = outlier_mlp(1.0)
    base_policy = {"rules": [{"type": "Linear", "w_bits": 1.58, "a_bits": 4, "lora_rank": 4}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sens = ampn.measure(model, base_policy, calib(), (2, 3, 4), progress=False)
    ref = [model(x) for x in calib()]
    for layer, b in [("3", 2), ("5", 3)]:
        q = robuq_fx.quantize(model, {"rules": [{"match": layer, "w_bits": 1.58, "a_bits": b, "lora_rank": 4}]
                                      + base_policy["rules"]}).eval()
        with torch.no_grad():
            mse = sum(F.mse_loss(q(x), r).item() for x, r in zip(calib(), ref)) / 2
        # 1e-12: the same float ops in the same order; only sens = metric - base, then + base, can round
        assert sens.sens[layer][b] + sens.base == pytest.approx(mse, rel=1e-12, abs=1e-15)


def test_both_forms_measure_the_same():
    """AMPN sets bits in a QATLinear's spec (drop-in form) or in fake_quant_act nodes (whole-graph form: an exported
    graph, whose linears are functional calls): the same sensitivities and token counts either way."""
    model = outlier_mlp(1.0)
    graph = torch.export.export(model, (calib()[0],)).module()  # its "0", "3", ... are containers, not nn.Linear
    for attr in ("train", "eval"):  # ExportedProgram.module() forbids them (robuq_fx's capture does the same)
        graph.__dict__.pop(attr, None)
    by_name = {"rules": [{"match": "*", "w_bits": 1.58, "a_bits": 4, "hadamard": False}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ampn.measure(model, by_name, calib(), (2, 3, 4), progress=False)
        b = ampn.measure(graph, by_name, calib(), (2, 3, 4), progress=False)
    assert robuq_fx.robuq_info(robuq_fx.quantize(graph, by_name))["form"] == "graph"
    assert a.layers == b.layers == ["0", "3", "5", "7"] and a.tokens == b.tokens and a.shapes == b.shapes
    for n in a.layers:
        assert a.sens[n] == pytest.approx(b.sens[n], rel=1e-9, abs=1e-15), n


def test_warmup_with_loss_is_deterministic_and_leaves_rng_alone():
    model = outlier_mlp(1.0)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(32, 16, generator=g), torch.randint(0, 8, (32,), generator=g)) for _ in range(3)]

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    torch.manual_seed(123)
    state = torch.get_rng_state()
    runs = [ampn.measure(model, NO_H, batches[:1], loss_fn=loss_fn, train_batches=batches, warmup_steps=4, seed=5,
                         progress=False) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    assert runs[0].sens == runs[1].sens and runs[0].warmup_steps == 4 and runs[0].metric == "loss"
    assert not runs[0].notes


# ---- the returned policy ------------------------------------------------------------------------------------------
class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 8)

    def forward(self, x):  # x: (batch, tokens, 32)
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


@pytest.mark.parametrize("weight", ["plain", "macs"])
def test_policy_round_trips_and_drives_quantize_and_lower(tmp_path, weight):
    torch.manual_seed(0)
    model = TokenMLP()
    # defaults turn the Hadamard off, the rule turns it on: the per-layer AMPN rules must keep it on;
    # a_sym=true is valid at 3-4 bits only, so the 1-2-bit layers must get a_sym back to automatic
    policy = {"rules": [{"match": "head", "skip": True},
                        {"type": "Linear", "w_bits": 1.58, "a_bits": 4, "hadamard": True, "a_sym": True,
                         "lora_rank": 4}],
              "defaults": {"hadamard": False}}
    calib = [torch.randn(3, 5, 32) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new, report = ampn.allocate(model, policy, calib, 1.5, weight=weight, progress=False)
    rows = {r["layer"]: r for r in report}
    assert set(rows) == {"fc1", "fc2"}
    assert [rows["fc1"]["tokens"], rows["fc1"]["MACs"]] == [30, 30 * 32 * 64]  # 2 batches x 3 x 5 tokens
    assert min(r["bits"] for r in report) <= 2
    chosen = {n: r["bits"] for n, r in rows.items()}
    for path in (tmp_path / "p.json", tmp_path / "p.yaml"):
        new.save(path)
        loaded = robuq_fx.Policy.load(path)
        assert loaded.to_dict() == new.to_dict()
        q = robuq_fx.quantize(model, loaded)
        layers = robuq_fx.robuq_info(q)["layers"]
        assert set(layers) == {"fc1", "fc2"}
        for n, b in chosen.items():
            assert layers[n]["a_bits"] == b and layers[n]["hadamard"] and layers[n]["lora_rank"] == 4
            assert layers[n]["a_sym"] == (b >= 3)
        x = torch.randn(4, 5, 32)
        assert torch.equal(robuq_fx.lower(q)(x), q.eval()(x))  # integer math: bit-identical


def test_allocate_from_reuses_measurements():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sens = ampn.measure(outlier_mlp(30.0), NO_H, calib(), progress=False)
    _, r4 = ampn.allocate_from(sens, 2, "plain")
    _, r234 = ampn.allocate_from(sens, 2, "plain", candidates=(2, 3, 4))
    assert min(r["bits"] for r in r234) >= 2 and sum(r["bits"] for r in r234) == 8
    assert r4.info["summed sensitivity"] <= r234.info["summed sensitivity"]  # a superset of choices can't be worse
    with pytest.raises(PolicyError, match="not all measured"):
        ampn.allocate_from(sens, 2, "plain", candidates=(2, 8))


def test_bench_accuracy_quick(tmp_path):
    """The benchmark's smoke run (~10-15 s on 2 shared cores): runs end to end, writes its files, and its JSON holds
    what it must (check_bench_json)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_accuracy.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AMPN allocations" in proc.stdout
    files = ["bench_accuracy.json", "bench_accuracy.txt"]
    if importlib.util.find_spec("matplotlib") is not None:  # not in the [test] extra: the PNG is skipped then
        files.append("bench_accuracy_dit_samples.png")
    for f in files:
        assert (tmp_path / f).stat().st_size > 0
    check_bench_json(json.loads((tmp_path / "bench_accuracy.json").read_text()))


def check_bench_json(d):
    """What the quick run's numbers must satisfy whatever the seed or torch version: structure, finite values in
    range, the budget met, reports consistent with themselves, and a judge / FP baseline that work."""
    assert set(d["provenance"]) >= {"commit", "command", "gpu", "torch", "date"}
    labels = [s["label"] for s in d["settings"]]
    ampn_labels = [s["label"] for s in d["settings"] if s["ampn"]]
    assert ampn_labels and len(labels) > len(ampn_labels)
    assert d["times"]["judge_real_acc"] > 90  # the DiT samples' judge must recognise real digits (measured 96.9)
    for model, acc_key, loss_key in (("mlp", "acc", "nll"), ("dit", "judged_acc", "heldout_loss")):
        for res in d[model]:  # one dict per seed
            assert list(res) == ["FP", *labels]
            for label, r in res.items():
                assert 0 <= r[acc_key] <= 100 and math.isfinite(r[loss_key]) and r[loss_key] > 0, (model, label, r)
                if "ptq_acc" in r:
                    assert 0 <= r["ptq_acc"] <= 100
                if "same_as" in r:  # an allocation that equals a uniform setting reuses its model: same numbers
                    assert {k: v for k, v in r.items() if k != "same_as"} == res[r["same_as"]]
            if model == "mlp":
                assert res["FP"]["acc"] > 85  # measured 96.4: the FP baseline trained
    for model, per_seed in d["ampn"].items():
        for alloc in per_seed:
            for label, rep in alloc.items():
                assert label in ampn_labels
                rows, info = rep["rows"], rep["info"]
                budget = next(s["a_bits"] for s in d["settings"] if s["label"] == label)
                assert all(r["bits"] in (1, 2, 3, 4) and r["Δ@A4"] == 0.0 for r in rows)  # A4: the reference
                assert all(math.isfinite(r[f"Δ@A{b}"]) for r in rows for b in (1, 2, 3))
                macs = sum(r["MACs"] for r in rows)
                mean = sum(r["bits"] * r["MACs"] for r in rows) / macs
                assert mean == pytest.approx(info["mean bits (MAC-weighted)"], abs=1e-4) and mean <= budget + 1e-9
                load, cap = (int(v) for v in info["load / capacity"].split(" (")[0].split(" / "))
                assert load <= cap
                for sm in rep["summary"]:
                    bits = [r["bits"] for r in rows if r["kind"] == sm["kind"]]
                    assert sm["layers"] == len(bits) and sm["mean bits"] == pytest.approx(sum(bits) / len(bits))
        for res in d[model]:
            for label in ampn_labels:
                if "mean_bits" in res[label]:
                    assert res[label]["mean_bits"] <= budget + 1e-9
    for label in labels:
        assert label in d["tables"]["quick"]
