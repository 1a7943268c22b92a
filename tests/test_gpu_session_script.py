"""scripts/gpu_session.sh, the batches of GPU work a session sends to the lent machine, and its steps in
scripts/gpu_steps/*.sh (one file a topic, sourced by it): a step is accepted exactly when a step file has a body for
it (session 12 found `profile` and `train-cpp` accepted and documented but never defined; session 14 found session
13's new steps defined but missing from a hand-kept list of accepted names, so the first call printed the usage
instead of running), each name has one body, every step has a usage line in its file's header, steps that run other
steps name existing ones, an unknown step is refused with the usage, and the scripts parse."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "gpu_session.sh"
STEP_FILES = sorted((SCRIPTS / "gpu_steps").glob("*.sh"))


def _bodies(path: Path) -> list[str]:
    return [name for alts in re.findall(r"^([a-z0-9|-]+)\)", path.read_text(), re.M) for name in alts.split("|")]


def _all_bodies() -> list[str]:
    return [name for f in STEP_FILES for name in _bodies(f)]


def _accepts(step: str) -> bool:
    """The script's own acceptance test for a step name (the grep it runs before anything else)."""
    line = next(ln for ln in SCRIPT.read_text().splitlines() if ln.startswith("if ! grep -qE "))
    pattern = re.search(r'grep -qE "(.*)" "\$GPU_STEPS"/\*\.sh', line).group(1).replace("${1:-NONE}", step)
    return subprocess.run(["grep", "-qE", pattern, *map(str, STEP_FILES)]).returncode == 0


def test_every_step_with_a_body_is_accepted_and_documented():
    steps = _all_bodies()
    assert len(steps) == len(set(steps)), sorted({s for s in steps if steps.count(s) > 1})  # one body a name
    assert len(steps) > 20 and {"ws", "verify12", "verify13", "dit-b1-down", "attention-sweep", "ddp-x2"} <= set(steps)
    assert all(_accepts(s) for s in steps), sorted(s for s in steps if not _accepts(s))
    for f in STEP_FILES:  # each file's header (what the usage prints) documents its own steps
        header = f.read_text().split('\ncase "${1:-}" in', 1)[0]
        documented = set(re.findall(r"^#   scripts/gpu_session\.sh ([a-z0-9-]+)", header, re.M))
        assert set(_bodies(f)) <= documented, (f.name, sorted(set(_bodies(f)) - documented))


def test_steps_that_run_other_steps_name_existing_ones():
    steps = set(_all_bodies())
    called = {m for f in STEP_FILES for m in re.findall(r'^[^#\n]*"\$0" ([a-z0-9-]+)', f.read_text(), re.M)}
    assert called and called <= steps, sorted(called - steps)


def test_unknown_steps_are_refused_with_the_usage(tmp_path):
    for bad in ("bogus", "dit-b", "verify1", ""):
        assert not _accepts(bad) or bad == "", bad
        proc = subprocess.run(["bash", str(SCRIPT), bad], capture_output=True, text=True, cwd=tmp_path,
                              env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
        assert proc.returncode == 2 and "Batches of GPU work" in proc.stdout, (bad, proc.returncode)
        assert "scripts/gpu_session.sh ddp-x2" in proc.stdout  # the step files' usage lines too
        assert not (tmp_path / "out").exists()  # refused before it made anything


def test_scripts_parse():
    for f in [SCRIPT, *STEP_FILES]:
        assert subprocess.run(["bash", "-n", str(f)], capture_output=True).returncode == 0, f.name
