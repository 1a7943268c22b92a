"""scripts/host_profile_step.py's bookkeeping: a cProfile's own times per step under labels that match across
settings (Inductor's generated code under one label whatever its cache hash), and the functions ranked by how much
their own time grew against the base setting. (The script itself runs on the GPU machine; `--quick` on a CPU.)"""
from __future__ import annotations

import cProfile
import importlib.util
import pstats
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hp():
    pytest.importorskip("diffusers")  # (the script imports the DiT benchmark's setup)
    spec = importlib.util.spec_from_file_location("host_profile_step", ROOT / "scripts" / "host_profile_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["host_profile_step"] = mod
    spec.loader.exec_module(mod)
    return mod


def _busy(n: int) -> int:
    return sum(i * i for i in range(n))


def test_own_times_are_per_step_and_generated_code_shares_a_label(hp, tmp_path):
    # a function compiled from a file named like Inductor's cache entries, as two settings would each have one
    labels = []
    for h in ("c" + "a" * 51, "c" + "b" * 51):
        src = tmp_path / f"{h}.py"
        src.write_text("def call(n):\n    return sum(i for i in range(n))\n")
        ns: dict = {}
        exec(compile(src.read_text(), str(src), "exec"), ns)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(4):
            ns["call"](20000)
            _busy(20000)
        prof.disable()
        own = hp.own_times(pstats.Stats(prof), steps=2)
        labels.append(set(own))
        assert own["<inductor-generated>(call)"][0] == 2.0  # 4 calls over 2 steps
        busy = [v for k, v in own.items() if k.endswith("(_busy)")]
        assert len(busy) == 1 and busy[0][0] == 2.0 and busy[0][1] > 0
    assert "<inductor-generated>(call)" in labels[0] & labels[1]


def test_diff_rows_rank_by_growth(hp):
    base = {"f": (1.0, 2.0), "g": (3.0, 1.0)}
    other = {"f": (1.0, 2.5), "g": (3.0, 4.0), "h": (5.0, 0.2)}
    rows = hp.diff_rows(base, other, top=2)
    assert [r["function"] for r in rows] == ["g", "f"]
    assert rows[0]["delta ms"] == 3.0 and rows[1]["delta ms"] == 0.5
    assert rows[0]["calls/step"] == 3.0 and rows[0]["own ms/step (base)"] == 1.0


def test_repeated_settings_get_their_own_labels(hp):
    """A setting run twice (the base again at the end: process state against the setting's own cost) keeps both."""
    assert hp._labels(["bf16", "dit", "dit:gcfreeze", "bf16", "bf16"]) == [
        "bf16", "dit", "dit:gcfreeze", "bf16#2", "bf16#3"]
    assert hp.probe_ms(n=1000, repeat=2) > 0


def test_static_launch_bypass_reasons_are_counted(hp):
    """Inductor's "Bypassing StaticallyLaunchedCudaKernel due to ..." records, counted by reason; other records not."""
    import logging
    h = hp.BypassLog()
    log = logging.getLogger("robuq_test_bypass")
    log.setLevel(logging.INFO)
    log.addHandler(h)
    try:
        for why in ("User defined triton kernel", "User defined triton kernel", "Cpp wrapper enabled"):
            log.info("Bypassing StaticallyLaunchedCudaKernel due to %s", why)
        log.info("something else")
    finally:
        log.removeHandler(h)
    assert dict(h.reasons) == {"User defined triton kernel": 2, "Cpp wrapper enabled": 1}


def test_interleaved_phases_pair_each_setting_with_the_first(hp, tmp_path):
    """--interleave (tiny DiT on the CPU): both settings built side by side, one row per setting and phase, the first
    setting's paired ratio exactly 1; settings that change Inductor's or the collector's global state are refused."""
    import json
    assert hp.main(["--quick", "--interleave", "--steps", "3", "--settings", "bf16", "dit",
                    "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "host_profile_cpu_interleaved.json").read_text())["rows"]
    assert [(r["setting"], r["phase"]) for r in rows] == [
        ("bf16", "forward"), ("bf16", "backward + optimizer"), ("dit", "forward"), ("dit", "backward + optimizer")]
    assert all(r["host x bf16 (paired)"] == 1.0 for r in rows[:2]) and all(r["host ms"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        hp.main(["--quick", "--interleave", "--settings", "bf16", "dit:static"])
