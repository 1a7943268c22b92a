"""scripts/gpu_session.sh, the batches of GPU work a session sends to the lent machine: a step is accepted exactly
when the script has a body for it (session 12 found `profile` and `train-cpp` accepted and documented but never
defined; session 14 found session 13's new steps defined but missing from a hand-kept list of accepted names, so the
first call printed the usage instead of running), every step has a usage line, an unknown step is refused with the
usage, and the script parses."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_session.sh"


def _bodies() -> set[str]:
    text = SCRIPT.read_text()
    return {name for alts in re.findall(r"^([a-z0-9|-]+)\)", text, re.M) for name in alts.split("|")}


def _accepts(step: str) -> bool:
    """The script's own acceptance test for a step name (the grep it runs before anything else)."""
    line = next(ln for ln in SCRIPT.read_text().splitlines() if ln.startswith("if ! grep -qE "))
    pattern = re.search(r'grep -qE "(.*)" "\$0"', line).group(1).replace("${1:-NONE}", step)
    return subprocess.run(["grep", "-qE", pattern, str(SCRIPT)]).returncode == 0


def test_every_step_with_a_body_is_accepted_and_documented():
    text = SCRIPT.read_text()
    steps = _bodies()
    assert len(steps) > 20 and {"ws", "verify12", "verify13", "dit-b1-down", "attention-sweep"} <= steps
    assert all(_accepts(s) for s in steps), sorted(s for s in steps if not _accepts(s))
    usage = text.split("\nset -uo pipefail", 1)[0]
    documented = set(re.findall(r"^#   scripts/gpu_session\.sh ([a-z0-9-]+)", usage, re.M))
    assert steps <= documented, sorted(steps - documented)


def test_unknown_steps_are_refused_with_the_usage(tmp_path):
    for bad in ("bogus", "dit-b", "verify1", ""):
        assert not _accepts(bad) or bad == "", bad
        proc = subprocess.run(["bash", str(SCRIPT), bad], capture_output=True, text=True, cwd=tmp_path,
                              env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
        assert proc.returncode == 2 and "Batches of GPU work" in proc.stdout, (bad, proc.returncode)
        assert not (tmp_path / "out").exists()  # refused before it made anything


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
