"""scripts/gpu_session.sh, the batches of GPU work a session sends to the lent machine: every step its `case` accepts
has a body (session 12 found `profile` and `train-cpp` accepted and documented but never defined: a call with them
would have run nothing and cost its device time), every step has a usage line, and the script parses."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_session.sh"


def _accepted() -> list[str]:
    text = SCRIPT.read_text()
    line = next(ln for ln in text.splitlines() if re.match(r'case "\$\{1:-\}" in [a-z0-9|-]+\)$', ln))
    return line.split(" in ", 1)[1].rstrip(")").split("|")


def test_every_accepted_step_has_a_body_and_a_usage_line():
    text = SCRIPT.read_text()
    steps = _accepted()
    assert len(steps) > 20 and "ws" in steps and "verify12" in steps
    bodies = {name for alts in re.findall(r"^([a-z0-9|-]+)\)", text, re.M) for name in alts.split("|")}
    assert set(steps) <= bodies, sorted(set(steps) - bodies)
    usage = text.split("\nset -uo pipefail", 1)[0]
    documented = set(re.findall(r"^#   scripts/gpu_session\.sh ([a-z0-9-]+)", usage, re.M))
    assert set(steps) <= documented, sorted(set(steps) - documented)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
