"""The `robuq-fx` command line (robuq_fx/cli.py) and the shipped model factories (robuq_fx/models.py).

Commands run in-process through `cli.main([...])` (its return value is the exit status); one test runs the installed
console script. Bad input must give exit status 2, one line on stderr naming the problem, and write nothing.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import robuq_fx
from robuq_fx import cli, models, report

SUBCOMMANDS = ["inspect", "quantize", "bench", "kernels"]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> dict[str, list[str]]:
    """layer name -> cells of a github-style table row."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def forward(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


# ---- help, kernels, bench -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [[]] + [[c] for c in SUBCOMMANDS])
def test_help_on_every_subcommand(capsys, cmd):
    code, out, _ = run(capsys, *cmd, "--help")
    assert code == 0
    assert out.startswith("usage: robuq-fx") and (not cmd or cmd[0] in out.splitlines()[0])


def test_no_subcommand_prints_help_and_fails(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "inspect" in err and "quantize" in err


def test_kernels_lists_the_reference(capsys):
    code, out, _ = run(capsys, "kernels")
    rows = table_rows(out)
    assert code == 0 and rows["reference"][1] == "True"
    assert "nunchaku" in rows  # registered even when the package is missing, with the reason


def test_integer_switches_name_themselves_when_malformed(monkeypatch):
    """An integer switch holding anything else is an error naming the variable (int()'s message does not); unset or
    empty: the table's choice, as before."""
    from robuq_fx.kernels import dispatch as D
    from robuq_fx.kernels.switches import env_int
    monkeypatch.setenv("ROBUQ_FP8_MIN_M", "lots")
    with pytest.raises(ValueError, match=r"ROBUQ_FP8_MIN_M='lots': expected an integer"):
        D.fp8_min_m(1152, 1152, False)
    monkeypatch.setenv("ROBUQ_FP8_MIN_M", "0")
    assert D.fp8_min_m(1152, 1152, False) == 0
    monkeypatch.setenv("ROBUQ_FP8_SMALL_M", "")
    assert env_int("ROBUQ_FP8_SMALL_M") is None and D.small_m_max() == int(D.dispatch_table().get(
        "small_m_fused_max_m", 0))


def test_kernels_lists_every_environment_switch_the_package_reads(capsys, monkeypatch):
    """Each ROBUQ_* variable named in robuq_fx's sources is in the switch table `robuq-fx kernels` prints (a new
    switch without a row fails here), with the value set now."""
    import re
    from pathlib import Path
    from robuq_fx.kernels import switches
    src = Path(switches.__file__).resolve().parents[1]
    read = set()
    for f in src.rglob("*.py"):
        read |= set(re.findall(r"[\"'](ROBUQ_[A-Z0-9_]+)[\"']", f.read_text()))
    assert read and read <= set(switches.names()), sorted(read - set(switches.names()))
    monkeypatch.setenv("ROBUQ_FP8_SMALL_M", "48")
    code, out, _ = run(capsys, "kernels")
    assert code == 0 and "Environment switches:" in out
    optional = out.split("Optional GPU components")[1].split("Environment switches:")[0]
    for name in ("triton", "Gluon", "fast-hadamard-transform", "nunchaku"):
        assert re.search(rf"^  {re.escape(name)} +(importable|not importable)", optional, re.M), name
    rows = table_rows(out.split("Environment switches:")[1])
    assert set(switches.names()) <= set(rows) and rows["ROBUQ_FP8_SMALL_M"][0] == "48"


def test_bench_runs_the_script_with_the_remaining_args(capsys, tmp_path, monkeypatch):
    (tmp_path / "bench_linear.py").write_text(
        "import sys, json, pathlib\n"
        "pathlib.Path(sys.argv[0]).with_suffix('.json').write_text(json.dumps(sys.argv[1:]))\n"
        "sys.exit(3)\n")
    monkeypatch.setattr(cli, "BENCH_DIR", tmp_path)
    code, _, _ = run(capsys, "bench", "linear", "--m", "256", "--help")
    assert code == 3  # the script's own exit status
    assert json.loads((tmp_path / "bench_linear.json").read_text()) == ["--m", "256", "--help"]


def test_bench_missing_script_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "BENCH_DIR", tmp_path)
    code, _, err = run(capsys, "bench", "dit")
    assert code == 2 and "bench_dit.py not found" in err and len(err.strip().splitlines()) == 1


def test_bench_rejects_unknown_benchmarks(capsys):
    code, _, err = run(capsys, "bench", "nope")
    assert code == 2 and "invalid choice" in err


# ---- inspect ------------------------------------------------------------------------------------------------------

def test_inspect_mlp_digits(capsys):
    code, out, _ = run(capsys, "inspect", "mlp-digits")
    rows = table_rows(out)
    assert code == 0
    # in, out, spec, MACs/token, LRB MACs, bf16 bytes, packed bytes, x smaller
    assert rows["fc1"][:5] == ["64", "128", "W4A4 H64", "8192", "0"]
    assert rows["fc2"][2] == "W4A4 H128" and rows["fc3"][:2] == ["128", "10"]
    # fc1: 64*128 codes at 4 bits = 4096 B, 128 fp32 scales = 512 B, fp32 bias 512 B; bf16: 2*64*128 + 2*128
    assert rows["fc1"][5:7] == ["16640", "5120"]
    assert rows["TOTAL (3 quantized)"][3] == str(8192 + 16384 + 1280)


def test_inspect_estimate_equals_the_lowered_size_table():
    policy = robuq_fx.Policy.from_dict({"rules": [
        {"match": "fc3", "skip": True},
        {"match": "fc1", "w_bits": 1.58, "a_bits": 2, "lora_rank": 8},
        {"type": "Linear", "w_bits": 3, "a_bits": 4, "group_size": 32, "scale_dtype": "float16"}]})
    model = models.build("mlp-digits")
    est, errors = cli.estimate_rows(models.build("mlp-digits", device="meta"), policy)
    assert not errors
    real = {r["layer"]: r for r in report.size_rows(robuq_fx.lower(robuq_fx.quantize(model, policy)))}
    for r in est:
        if r["layer"] in real:
            assert r["packed bytes"] == real[r["layer"]]["packed bytes"], r["layer"]
            assert r["bf16 bytes"] == real[r["layer"]]["bf16 bytes"]
            assert r["spec"] == real[r["layer"]]["spec"]
        else:
            assert r["layer"] == "fc3" and r["spec"] == "FP (skip)"


def test_inspect_dit_tiny(capsys):
    code, out, _ = run(capsys, "inspect", "dit-tiny")
    rows = table_rows(out)
    assert code == 0
    assert rows["transformer_blocks.0.attn1.to_q"][2] == "W1.58A4 H64 LRB32"
    assert rows["transformer_blocks.1.ff.net.2"][:3] == ["256", "64", "W1.58A4 H128 LRB32"]
    assert rows["transformer_blocks.0.norm1.linear"][2] == "W4A4 H64"
    assert rows["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"][2] == "FP (skip)"
    assert rows["proj_out_2"][2] == "FP (skip)"
    assert "TOTAL (14 quantized)" in rows
    assert "attention rules match 2 module(s)" in out


def test_inspect_dit_xl_2_builds_on_meta(capsys):
    code, out, _ = run(capsys, "inspect", "dit-xl-2")
    rows = table_rows(out)
    assert code == 0
    assert rows["transformer_blocks.27.ff.net.0.proj"][:3] == ["1152", "4608", "W1.58A4 H128 LRB32"]
    assert "TOTAL (196 quantized)" in rows  # 28 blocks x (to_q, to_k, to_v, to_out.0, fc1, fc2, norm1.linear)


def test_inspect_module_factory_and_file_factory(capsys, tmp_path, monkeypatch):
    src = ("import torch.nn as nn\n\n"
           "def build():\n    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))\n")
    (tmp_path / "my_models_for_cli.py").write_text(src)
    code, out, _ = run(capsys, "inspect", f"{tmp_path / 'my_models_for_cli.py'}:build")
    assert code == 0 and table_rows(out)["0"][:3] == ["64", "32", "W4A4 H64"]
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = run(capsys, "inspect", "my_models_for_cli:build", "--policy", "default")
    assert code == 0 and table_rows(out)["2"][:3] == ["32", "8", "W4A4 H32"]
    (tmp_path / "no_meta.py").write_text(  # a factory that cannot build on the meta device is built for real
        "import torch, torch.nn as nn\n\ndef build():\n    m = nn.Sequential(nn.Linear(16, 4))\n"
        "    m[0].weight.sum().item()\n    return m\n")
    code, out, _ = run(capsys, "inspect", f"{tmp_path / 'no_meta.py'}:build")
    assert code == 0 and table_rows(out)["0"][:3] == ["16", "4", "W4A4 H16"]


def test_inspect_reports_a_spec_that_does_not_fit(capsys, tmp_path):
    pol = tmp_path / "p.json"
    pol.write_text(json.dumps({"rules": [{"type": "Linear", "lora_rank": 100}]}))
    code, out, err = run(capsys, "inspect", "mlp-digits", "--policy", pol)
    assert code == 2 and "ERROR" in out and "layer 'fc1' (in_features=64, out_features=128): lora_rank=100 exceeds" in err


# ---- quantize -----------------------------------------------------------------------------------------------------

def test_quantize_writes_a_loadable_checkpoint(capsys, tmp_path):
    out_dir = tmp_path / "new" / "out"
    code, out, _ = run(capsys, "quantize", "mlp-digits", "--out", out_dir, "--no-progress")
    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors", "sizes.json", "sizes.md"]
    assert "TOTAL" in table_rows(out) and "fc2" in (out_dir / "sizes.md").read_text()
    loaded = robuq_fx.load_quantized(out_dir / "model.safetensors", models.build("mlp-digits"))
    lowered = robuq_fx.lower(robuq_fx.quantize(models.build("mlp-digits"), robuq_fx.Policy.default()))
    x = models.example_inputs("mlp-digits", 16)
    assert torch.equal(forward(loaded, x), forward(lowered, x))


def test_quantize_dit_tiny_through_export(capsys, tmp_path):
    code, _, _ = run(capsys, "quantize", "dit-tiny", "--out", tmp_path, "--no-progress")
    assert code == 0
    ex = models.example_inputs("dit-tiny", 2)
    loaded = robuq_fx.load_quantized(tmp_path / "model.safetensors", models.build("dit-tiny"), ex)
    lowered = robuq_fx.lower(robuq_fx.quantize(models.build("dit-tiny"), "dit-xl-2-robuq", ex))
    ex = models.example_inputs("dit-tiny", 3, seed=1)
    with torch.no_grad():
        assert torch.equal(forward(loaded, ex), forward(lowered, ex))


def test_quantize_with_weights_and_qat_state_dict(capsys, tmp_path):
    policy = {"rules": [{"type": "Linear", "w_bits": 1.58, "a_bits": 3, "lora_rank": 8}]}
    (tmp_path / "p.json").write_text(json.dumps(policy))
    fp = models.build("mlp-digits", seed=7)
    torch.save(fp.state_dict(), tmp_path / "w.pt")
    code, _, _ = run(capsys, "quantize", "mlp-digits", "-p", tmp_path / "p.json", "--weights", tmp_path / "w.pt",
                     "--out", tmp_path / "a", "--no-progress")
    assert code == 0
    x = models.example_inputs("mlp-digits", 8)
    loaded = robuq_fx.load_quantized(tmp_path / "a" / "model.safetensors", models.build("mlp-digits"))
    assert torch.equal(forward(loaded, x), forward(robuq_fx.lower(robuq_fx.quantize(fp, policy)), x))

    qmodel = robuq_fx.quantize(fp, policy)  # "after QAT": every tensor moved, the LRB included
    with torch.no_grad():
        for p in qmodel.parameters():
            p.add_(0.01 * torch.randn_like(p))
    from safetensors.torch import save_file
    save_file(qmodel.state_dict(), str(tmp_path / "qat.safetensors"))
    code, _, _ = run(capsys, "quantize", "mlp-digits", "-p", tmp_path / "p.json", "--state-dict",
                     tmp_path / "qat.safetensors", "--out", tmp_path / "b", "--no-progress")
    assert code == 0
    loaded = robuq_fx.load_quantized(tmp_path / "b" / "model.safetensors", models.build("mlp-digits"))
    assert torch.equal(forward(loaded, x), forward(robuq_fx.lower(qmodel), x))


# ---- bad input: exit 2, one line naming the problem, nothing written ------------------------------------------------

def _bad_inputs(tmp: Path) -> list:
    (tmp / "bad_key.json").write_text('{"rules": [\n  {"type": "Linear", "w_bits": 4, "a_bitz": 4}\n]}\n')
    (tmp / "bad_syntax.yaml").write_text("rules:\n  - match: fc1\n    w_bits: [4\n")
    (tmp / "bad_json.json").write_text('{"rules": [\n  {"type": "Linear",}\n]}\n')
    (tmp / "no_match.json").write_text('{"rules": [{"match": "nothing.here", "w_bits": 4}]}')
    (tmp / "a_file").write_text("")
    # needs a capture: its linear has its own forward (no module to swap), and symbolic_trace fails on the root
    (tmp / "untraceable.py").write_text(
        "import torch.nn as nn\n\nclass Scaled(nn.Linear):\n    def forward(self, x):\n"
        "        return super().forward(x) * 2\n\nclass M(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.fc = Scaled(8, 8)\n\n    def forward(self, x):\n"
        "        return self.fc(x) if x.sum() > 0 else x\n\ndef build():\n    return M()\n")
    sd = models.build("mlp-digits").state_dict()
    torch.save({**sd, "fc2.weight": torch.zeros(3, 3)}, tmp / "w_shape.pt")
    torch.save({k: v for k, v in sd.items() if k != "fc3.bias"}, tmp / "w_missing.pt")
    torch.save({**sd, "fc9.weight": torch.zeros(1)}, tmp / "w_extra.pt")
    (tmp / "w_garbage.pt").write_bytes(b"not a checkpoint")
    qsd = robuq_fx.quantize(models.build("mlp-digits"), robuq_fx.Policy.default()).state_dict()
    torch.save({**qsd, "fc1.weight": torch.zeros(128, 63)}, tmp / "qat_shape.pt")
    torch.save(sd | {"fc1.lrb_down": torch.zeros(1)}, tmp / "qat_extra.pt")
    out = ["--out", tmp / "out"]
    return [
        (["inspect", "no-such-model"], "unknown model 'no-such-model'"),
        (["quantize", "no-such-model", *out], "unknown model"),
        (["inspect", "no_such_module_xyz:build"], "no module named 'no_such_module_xyz'"),
        (["inspect", "robuq_fx.models:no_factory"], "has no attribute 'no_factory'"),
        (["inspect", "robuq_fx.models:SHIPPED"], "not a callable"),
        (["inspect", f"{tmp / 'missing.py'}:build"], "not found"),
        (["inspect", "mlp-digits", "-p", tmp / "missing.yaml"], "policy file not found"),
        (["quantize", "mlp-digits", "-p", tmp / "missing.yaml", *out], "policy file not found"),
        (["inspect", "mlp-digits", "-p", tmp / "bad_key.json"], "unknown key(s) ['a_bitz']"),
        (["quantize", "mlp-digits", "-p", tmp / "bad_syntax.yaml", *out], "line 4"),
        (["quantize", "mlp-digits", "-p", tmp / "bad_json.json", *out], "invalid JSON at line 2"),
        (["quantize", "mlp-digits", "-p", tmp / "no_match.json", *out], "matches no linear layer"),
        (["quantize", f"{tmp / 'untraceable.py'}:build", *out], "define example_inputs()"),
        (["quantize", "mlp-digits", "--out", tmp / "a_file"], "exists and is not a directory"),
        (["quantize", "mlp-digits", "--out", tmp / "a_file" / "sub"], "is not a directory"),
        (["quantize", "mlp-digits", "--weights", tmp / "nope.pt", *out], "nope.pt: file not found"),
        (["quantize", "mlp-digits", "--weights", tmp / "w_garbage.pt", *out], "not a readable state_dict"),
        (["quantize", "mlp-digits", "--weights", tmp / "w_shape.pt", *out], "key 'fc2.weight' has shape (3, 3)"),
        (["quantize", "mlp-digits", "--weights", tmp / "w_missing.pt", *out], "key 'fc3.bias' is missing"),
        (["quantize", "mlp-digits", "--weights", tmp / "w_extra.pt", *out], "unexpected key 'fc9.weight'"),
        (["quantize", "mlp-digits", "--state-dict", tmp / "qat_shape.pt", *out], "key 'fc1.weight' has shape"),
        (["quantize", "mlp-digits", "-p", "default", "--state-dict", tmp / "w_missing.pt", *out],
         "key 'fc3.bias' is missing"),
        (["quantize", "mlp-digits", "--state-dict", tmp / "qat_extra.pt", *out], "unexpected key 'fc1.lrb_down'"),
    ]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(capsys, tmp_path):
    for argv, msg in _bad_inputs(tmp_path):
        before = sorted(p.name for p in tmp_path.iterdir())
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("robuq-fx: error: "), (argv, err)
        assert msg in lines[0], (argv, lines[0])
        assert sorted(p.name for p in tmp_path.iterdir()) == before, argv  # nothing written (no out/)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (unwritable even for root)")
def test_unwritable_out_dir(capsys):
    code, _, err = run(capsys, "quantize", "mlp-digits", "--out", "/proc/robuq-fx-test/out")
    assert code == 2 and "cannot write in /proc" in err


# ---- shipped models, console script -------------------------------------------------------------------------------

def test_shipped_models_are_deterministic_and_have_inputs():
    assert models.names() == ["dit-xl-2", "dit-tiny", "vit-base", "llama-100m", "mlp-digits"]
    a, b = models.build("mlp-digits", seed=3), models.build("mlp-digits", seed=3)
    state = torch.random.get_rng_state()
    models.build("mlp-digits", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    x = models.example_inputs("mlp-digits", 5)
    assert torch.equal(forward(a, x), forward(b, x)) and forward(a, x).shape == (5, 10)
    for name in ("dit-xl-2", "vit-base", "llama-100m"):
        m = models.build(name, device="meta")
        assert all(p.is_meta for p in m.parameters())
    cfg = models.build("dit-xl-2", device="meta").config
    assert (cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, cfg.out_channels) == (28, 1152, 8)
    n = sum(p.numel() for p in models.build("llama-100m", device="meta").parameters())
    assert 80e6 < n < 120e6
    assert set(models.example_inputs("dit-xl-2", 1)) == {"hidden_states", "timestep", "class_labels", "return_dict"}


def test_console_script_and_module_entry():
    script = Path(sys.executable).parent / "robuq-fx"
    cmds = [[sys.executable, "-m", "robuq_fx.cli", "kernels"]] + ([[str(script), "kernels"]] if script.exists() else [])
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "reference" in r.stdout, (cmd, r.stderr)
    r = subprocess.run([sys.executable, "-m", "robuq_fx.cli", "inspect", "nope"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == ("robuq-fx: error: unknown model 'nope': expected a shipped "
                                                      f"model ({', '.join(models.names())}) or module.path:factory")
