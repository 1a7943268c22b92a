"""Merge a summary JSON written on the GPU machine into the committed one.

    python scripts/merge_summary.py benchmarks/results/summary_dit_NVIDIA_H200.json NEW.json [NEW2.json ...]
        [--set key=value ...] [--note "why"]

The GPU machine starts from an empty output folder, so its `summary_<bench>_<gpu>.json` holds only that run's
figures. This keeps the committed file's figures, overwrites those the new run measured, and records each new run
(commit, command, date and the keys it set) in the file's `runs` list so every figure stays traceable to the command
that made it. `--set` adds figures computed by hand from a run's JSON (e.g. a run killed before it wrote its summary);
`--note` says so in that run's entry.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PROVENANCE = ("commit", "command", "gpu", "torch", "date", "triton", "cuda", "host_cpu", "host_launch_us")


def merge(base: dict, new: dict, note: str | None = None) -> dict:
    out = dict(base)
    runs = list(out.pop("runs", []))
    figures = {k: v for k, v in new.items() if k not in PROVENANCE and k != "runs"}
    run = {k: new[k] for k in PROVENANCE if k in new}
    run["keys"] = sorted(figures)
    if note:
        run["note"] = note
    runs.append(run)
    out.update(figures)
    for k in PROVENANCE:  # the top-level provenance names the newest run
        if k in new:
            out[k] = new[k]
    out["runs"] = runs
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("committed", type=Path)
    p.add_argument("new", type=Path, nargs="*")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="figures computed by hand")
    p.add_argument("--provenance-from", type=Path, help="JSON whose 'provenance' object names the --set run")
    p.add_argument("--note", help="recorded in the --set run's entry (without --set: in each new run's)")
    a = p.parse_args(argv)
    doc = json.loads(a.committed.read_text()) if a.committed.exists() else {}
    for path in a.new:
        doc = merge(doc, json.loads(path.read_text()), None if a.set else a.note)
    if a.set:
        figures = {}
        for kv in a.set:
            k, sep, v = kv.partition("=")
            if not sep:
                p.error(f"--set {kv!r}: expected KEY=VALUE")
            figures[k] = float(v)
        prov = json.loads(a.provenance_from.read_text()).get("provenance", {}) if a.provenance_from else {}
        doc = merge(doc, {**figures, **prov}, a.note)
    a.committed.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.committed}: {', '.join(k for k in doc if k not in PROVENANCE and k != 'runs')}")


if __name__ == "__main__":
    main()
