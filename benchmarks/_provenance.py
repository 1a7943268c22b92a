"""Where a result came from: every benchmark JSON and summary records the git commit, the command, the machine,
the versions and the date, so a figure in the README or docs can be traced to the code that made it.

On the GPU machine the working tree travels without `.git`: set ROBUQ_GIT_COMMIT (the caller's `git rev-parse HEAD`,
plus `-dirty` when it had uncommitted changes) so the commit is still recorded.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    env = os.environ.get("ROBUQ_GIT_COMMIT")
    if env:
        return env
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "robuq_fx", "benchmarks/*.py"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git here and ROBUQ_GIT_COMMIT unset)"


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        name = torch.cuda.get_device_name()
        return name if n == 1 else f"{n}x {name}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _script() -> str:
    """The running script relative to the repository (its path as given where the working folder is gone: a
    detached run whose checkout was replaced under it once lost a finished benchmark to os.getcwd())."""
    try:
        return os.path.relpath(sys.argv[0], ROOT)
    except (OSError, ValueError):
        return sys.argv[0]


def host_cpu() -> str:
    """The host CPU's model name (Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def launch_us(n: int = 2000) -> float | None:
    """Microseconds of host time per eager launch of a one-element CUDA kernel (n back-to-back launches, then a
    sync): the host's share of every un-graphed launch. Batch-1 rows depend on it: session 13 measured W4A4+H
    DiT-XL/2 at batch 1 0.57x on one lent H200 machine and 0.75x on another with the same code. Once a process
    (a benchmark calls `provenance` for its JSON and again for its summary)."""
    import time
    import torch
    if not torch.cuda.is_available():
        return None
    x = torch.zeros(1, device="cuda")
    for _ in range(50):
        x.add_(1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / n * 1e6, 2)


def provenance(argv: list[str] | None = None) -> dict:
    import torch
    info = {"commit": git_commit(),
            "command": "python " + " ".join([_script()] + (sys.argv[1:] if argv is None else list(argv))),
            "gpu": device_name(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host_cpu": host_cpu()}
    us = launch_us()
    if us is not None:
        info["host_launch_us"] = us
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.version.cuda:
        info["cuda"] = torch.version.cuda
    return info


def gpu_tag(name: str | None = None) -> str:
    """File-name form of the device: 'NVIDIA_H200', 'NVIDIA_H100_80GB_HBM3', 'cpu'."""
    name = name or device_name()
    if name.startswith("CPU"):
        return "cpu"
    return name.replace(" ", "_").replace("/", "_")


def write_summary(out_dir: Path | str, bench: str, figures: dict, argv: list[str] | None = None) -> Path:
    """benchmarks/results/summary_<bench>_<gpu>.json: a flat object of named figures plus provenance."""
    prov = provenance(argv)
    flat = {k: v for k, v in figures.items() if not isinstance(v, (dict, list))}
    path = Path(out_dir) / f"summary_{bench}_{gpu_tag(prov['gpu'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**flat, **prov}, indent=1, sort_keys=False) + "\n")
    return path
