#!/usr/bin/env python
"""Mutation check: do the tests notice a wrong method? (issue 16)

Applies deliberate bugs to the math, one at a time, in a temporary copy of the repository, runs the tests that
should notice each, and writes benchmarks/results/summary_mutation.json: `mutants`, `caught`, `survivors`, and per
mutant the tests that failed. Every mutant must be caught (exit status 1 otherwise).

    .venv/bin/python scripts/mutation_check.py                 # all mutants, the working tree as it is
    .venv/bin/python scripts/mutation_check.py --head          # the committed tree (HEAD) instead
    .venv/bin/python scripts/mutation_check.py --only lrb_sign_flip hadamard_unnormalised --fast
    PYTHONPATH=/tmp/trit .venv/bin/python scripts/mutation_check.py    # with a triton: the interpreter tests run too

Each mutant is (file, exact old text, new text): the old text must occur exactly once, or the check stops (a mutant
that silently stops applying after a refactor would look "caught" by nothing, or "survived" for the wrong reason).
robuq_fx is installed editable from this repository, so the copy is imported explicitly: pytest runs in-process in a
Python started in the copy with PYTHONPATH=<copy>, and that process checks `robuq_fx.__file__` is inside the copy
before any test runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mutants import MUTANTS  # scripts/mutants.py: the table (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "summary_mutation.json"


def sh(cmd, cwd=ROOT) -> str:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout


def copy_tree(dst: Path, head: bool) -> None:
    if head:
        archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
        return
    files = sh(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


RUNNER = """
import sys, robuq_fx, pytest
copy = sys.argv[1]
if not robuq_fx.__file__.startswith(copy):
    sys.exit(f"mutation_check: robuq_fx imported from {robuq_fx.__file__}, not from the copy {copy}")
sys.exit(pytest.main(sys.argv[2:]))
"""


def run_tests(copy: Path, tests: list[str], fast: bool, timeout: int) -> tuple[int, list[str], str]:
    # the copy first; then whatever PYTHONPATH held (e.g. a triton for Triton's interpreter: PYTHONPATH=/tmp/trit)
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy)] + extra), PYTHONDONTWRITEBYTECODE="1")
    args = [sys.executable, "-c", RUNNER, str(copy) + os.sep, "-q", "-p", "no:cacheprovider", "-rfE",
            "-W", "ignore", *(["-x"] if fast else []), *tests]
    try:
        proc = subprocess.run(args, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, ["(timed out)"], ""
    out = proc.stdout + proc.stderr
    if "mutation_check: robuq_fx imported from" in out:
        raise SystemExit(out.strip().splitlines()[-1])
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in out.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    return proc.returncode, failed, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--head", action="store_true", help="mutate the committed tree (HEAD), not the working tree")
    ap.add_argument("--fast", action="store_true", help="stop each run at its first failing test (pytest -x)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test run (default 900)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"summary JSON (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    from tabulate import tabulate

    mutants = [m for m in MUTANTS if not args.only or m[0] in args.only]
    unknown = set(args.only or ()) - {m[0] for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutant(s) {sorted(unknown)}; --list shows them")
    if args.list:
        print(tabulate([(m[0], m[1], m[4]) for m in mutants], headers=["mutant", "file", "bug"], tablefmt="github"))
        return 0
    start = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="robuq_mutation_") as tmp:
        copy = Path(tmp).resolve()
        copy_tree(copy, args.head)
        for name, rel, *_ in mutants:  # every mutant applies exactly once, checked before anything runs
            n = (copy / rel).read_text().count(_[0])
            if n != 1:
                raise SystemExit(f"mutant {name}: its old text occurs {n} times in {rel} (expected exactly 1): "
                                 f"{_[0]!r}")
        union = sorted({t for m in mutants for t in m[5] if t.startswith("tests/")})
        t0 = time.time()
        rc, failed, out = run_tests(copy, union, False, args.timeout)
        print(f"baseline (no mutant): {'ok' if rc == 0 else 'FAILED'} in {time.time() - t0:.0f} s", flush=True)
        if rc != 0:
            print(out[-4000:])
            raise SystemExit("the tests fail without any mutant: fix them first")
        for name, rel, old, new, what, tests in mutants:
            path = copy / rel
            original = path.read_text()
            path.write_text(original.replace(old, new))
            t0 = time.time()
            try:
                rc, failed, out = run_tests(copy, tests, args.fast, args.timeout)
            finally:
                path.write_text(original)
            if rc == 5 or (rc != 0 and not failed):
                print(out[-3000:])
                raise SystemExit(f"mutant {name}: pytest exited {rc} without naming a failing test")
            res = {"mutant": name, "file": rel, "bug": what, "old": old, "new": new, "tests_run": tests,
                   "caught": rc != 0, "failed_tests": failed, "seconds": round(time.time() - t0, 1)}
            results.append(res)
            print(f"{name:30s} {'caught' if res['caught'] else 'SURVIVED':8s} {len(failed):3d} failing tests "
                  f"({res['seconds']:.0f} s)", flush=True)
    survivors = [r["mutant"] for r in results if not r["caught"]]
    dirty = sh(["git", "status", "--porcelain", "--untracked-files=no"]).strip()
    summary = {
        "mutants": len(results), "caught": len(results) - len(survivors), "survivors": survivors,
        "git_commit": sh(["git", "rev-parse", "HEAD"]).strip(),
        "tree": "HEAD" if args.head else ("working tree (uncommitted changes)" if dirty else "working tree (clean)"),
        "command": " ".join(["python", "scripts/mutation_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "torch": __import__("torch").__version__,
        "seconds": round(time.time() - start), "results": results,
    }
    print(tabulate([(r["mutant"], "yes" if r["caught"] else "NO", len(r["failed_tests"]),
                     (r["failed_tests"] or [""])[0][:70]) for r in results],
                   headers=["mutant", "caught", "failing tests", "first failing test"], tablefmt="github"))
    print(f"{summary['caught']}/{summary['mutants']} caught in {summary['seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
