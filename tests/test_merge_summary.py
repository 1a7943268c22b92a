"""scripts/merge_summary.py: a GPU run's summary merged into the committed one keeps the other figures, overwrites
the ones it measured, and records the run (with --note, its note) in `runs`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _merge(tmp_path, committed: dict, new: dict, *extra: str) -> dict:
    (tmp_path / "c.json").write_text(json.dumps(committed))
    (tmp_path / "n.json").write_text(json.dumps(new))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_summary.py"), str(tmp_path / "c.json"),
                    str(tmp_path / "n.json"), *extra], check=True, capture_output=True)
    return json.loads((tmp_path / "c.json").read_text())


def test_new_figures_overwrite_and_the_run_is_recorded_with_its_note(tmp_path):
    out = _merge(tmp_path, {"a_x": 1.0, "b_x": 2.0, "commit": "old", "runs": [{"commit": "old", "keys": ["a_x"]}]},
                 {"b_x": 3.0, "c_x": 4.0, "commit": "new", "gpu": "G"}, "--note", "why")
    assert (out["a_x"], out["b_x"], out["c_x"], out["commit"]) == (1.0, 3.0, 4.0, "new")
    assert out["runs"][0] == {"commit": "old", "keys": ["a_x"]}
    assert out["runs"][1] == {"commit": "new", "gpu": "G", "keys": ["b_x", "c_x"], "note": "why"}


def test_set_figures_carry_the_note_and_the_file_runs_do_not(tmp_path):
    out = _merge(tmp_path, {}, {"b_x": 3.0, "commit": "new"}, "--set", "d_x=5", "--note", "by hand")
    assert out["d_x"] == 5.0 and "note" not in out["runs"][0] and out["runs"][1]["note"] == "by hand"
