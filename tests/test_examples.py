"""The examples run end to end in their --quick modes, as a user runs them (a subprocess each).

Accuracy floors: each setting's measured quick-mode accuracy (torch 2.13 CPU, seed 0; 360 test images) minus 5
points (18 images): room for torch versions and thread counts, while a real regression crosses them (measured: the
low-rank branch fed the unrotated x drops W1.58A3 +LRB QAT from 89.7 to 76.4 and its PTQ from 83.6 to 8.9).
Bugs QAT can learn around (e.g. the branch's sign) need the oracle tests (tests/test_oracle_*.py), not these.
The packed == QAT checks are exact: packing must not change a single bit of the logits.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MARGIN = 5.0
# setting -> (PTQ acc, FP/QAT acc) measured by `qat_digits.py --quick` (the floors are these minus MARGIN)
DIGITS_MEASURED = {"FP32 (baseline)": (None, 95.3), "W4A4 +H": (94.7, 96.7), "W1.58A4 +H": (93.6, 91.7),
                   "W1.58A3 +H": (84.4, 84.7), "W1.58A3 +H +LRB16": (83.6, 89.7), "W1.58A2 +H +LRB16": (93.6, 94.4)}
# MLP_training_demo.py --quick (W1.58A3 +H +LRB): FP 95.3, right after replace_linear_layer 82.2, after QAT 86.4
TRAIN_MEASURED = {"fp_acc": 95.3, "ptq_acc": 82.2, "qat_acc": 86.4}

pytestmark = pytest.mark.slow


def run(script: str, *args, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def inference_main(argv: list[str]):
    """MLP_inference_demo.main in this process; it sets torch's thread count, which is put back afterwards."""
    import torch
    threads = torch.get_num_threads()
    try:
        return load_example("MLP_inference_demo").main(argv)
    finally:
        torch.set_num_threads(threads)


def table_rows(stdout: str) -> list[dict]:
    """The rows of the (first) github-format tabulate table in `stdout`, as {header: cell text}."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    header, body = split[0], [r for r in split[1:] if not set("".join(r)) <= set("-:")]
    return [dict(zip(header, r)) for r in body]


def test_qat_digits_quick(tmp_path):
    out = tmp_path / "table.json"
    proc = run("qat_digits.py", "--quick", "--no-progress", "--json", out)
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [r["setting"] for r in rows] == list(DIGITS_MEASURED)
    for r in rows:
        ptq, acc = DIGITS_MEASURED[r["setting"]]
        assert r["FP/QAT acc"] > acc - MARGIN, r
        if ptq is not None:
            assert r["PTQ acc"] > ptq - MARGIN, r
    assert abs(rows[1]["FP/QAT acc"] - rows[0]["FP/QAT acc"]) < MARGIN  # W4A4 + Hadamard is close to FP
    for r in rows[1:]:
        assert r["packed == QAT"] is True, r
        assert r["packed acc"] == r["FP/QAT acc"], r
        assert 0 < r["packed bytes"] < r["bf16 bytes"], r
    ternary = [r for r in rows if r["setting"].startswith("W1.58") and "LRB" not in r["setting"]]
    assert all(r["packed bytes"] < rows[1]["packed bytes"] for r in ternary)  # 2-bit codes < W4's 4-bit codes
    assert res["reload"]["identical"] is True

    printed = table_rows(proc.stdout)  # the printed table says the same as the JSON
    assert [p["setting"] for p in printed] == [r["setting"] for r in rows]
    for p, r in zip(printed[1:], rows[1:]):
        assert float(p["FP/QAT acc"]) == pytest.approx(r["FP/QAT acc"], abs=0.006)
        assert float(p["packed acc"]) == pytest.approx(r["packed acc"], abs=0.006)
        assert p["packed == QAT"] == "True"
    assert "outputs identical = True" in proc.stdout


def test_qat_digits_head_policy():
    """The head is quantized without an LRB in LRB settings, and skipped entirely with --fp-head."""
    import robuq_fx
    mod = load_example("qat_digits")
    model = mod.MLP()
    ex = robuq_fx.Policy.from_dict(mod.policy_for(1.58, 3, 16, fp_head=False)).explain(model, print_table=False)
    specs = {r["layer"]: r["spec"] for r in ex}
    assert "LRB16" in specs["fc1"] and "LRB16" in specs["fc2"] and "LRB" not in specs["fc3"]
    assert specs["fc3"].startswith("W1.58A3")
    ex = robuq_fx.Policy.from_dict(mod.policy_for(4, 4, 0, fp_head=True)).explain(model, print_table=False)
    assert {r["layer"]: r["spec"] for r in ex}["fc3"] == "skip (FP)"


def test_mlp_training_then_inference(tmp_path):
    ckpt, train_json, infer_json = tmp_path / "mlp.pt", tmp_path / "train.json", tmp_path / "infer.json"
    run("MLP_training_demo.py", "--quick", "--no-progress", "--ckpt", ckpt, "--json", train_json)
    trained = json.loads(train_json.read_text())
    assert ckpt.exists()
    for key, measured in TRAIN_MEASURED.items():
        assert trained[key] > measured - MARGIN, trained
    assert trained["qat_acc"] > trained["ptq_acc"], trained  # QAT learns (STE gradients reach the weights)

    proc = run("MLP_inference_demo.py", "--ckpt", ckpt, "--json", infer_json)
    inferred = json.loads(infer_json.read_text())
    assert inferred["packed_equal"] is True
    assert inferred["qat_acc"] == trained["qat_acc"]  # the reloaded QAT model is the trained one
    assert inferred["packed_acc"] == inferred["qat_acc"]
    assert inferred["packed_bytes"] < inferred["qat_bytes"] / 3
    printed = table_rows(proc.stdout)
    assert [float(p["test acc"]) for p in printed] == pytest.approx([inferred["qat_acc"]] * 2, abs=0.006)
    assert printed[1]["== QAT output"] == "True"

    # rebuilt with other layer arguments: a clear error, not a silent wrong model (in-process: saves a torch import)
    with pytest.raises(SystemExit, match="does not match"):
        inference_main(["--ckpt", str(ckpt), "--nbits", "4"])


def test_inference_demo_without_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="MLP_training_demo.py first"):
        inference_main(["--ckpt", str(tmp_path / "missing.pt")])


def test_dit_pipeline_smoke(tmp_path):
    """examples/dit_pipeline.py as a user runs it, a few steps only: the quantized DiT samples in diffusers'
    DiTPipeline, lowered == QAT there, and the PNG, JSON and table are written (accuracy: see its committed run)."""
    proc = run("dit_pipeline.py", "--fp-steps", 20, "--qat-steps", 4, "--samples", 1, "--ddim-steps", 3, "--out",
               tmp_path)
    res = json.loads((tmp_path / "dit_pipeline.json").read_text())
    assert res["lowered_equals_qat"] is True
    assert [r["model"] for r in res["rows"]][1:] == ["FP DiT", "RobuQ dit-xl-2-robuq (LRB 8), lowered"]
    assert (tmp_path / "dit_pipeline.png").stat().st_size > 1000 and "judged acc %" in proc.stdout
