"""Host-time tools of scripts/host_profile_step.py (issue 19: the compiled training step's Python on the GPU's host):
a fixed pure-Python probe of the host's speed, a compile backend counting each graph's inputs, cProfile's own times
per step by function and their growth against a base setting, and the reasons Inductor logs for launching a Triton
kernel without its static launcher."""
from __future__ import annotations

import logging
import pstats
import re
import time
from collections import Counter
from pathlib import Path


def probe_ms(n: int = 200_000, repeat: int = 5) -> float:
    """The fastest of `repeat` runs of a fixed pure-Python loop, in ms: the host's speed at that moment."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        acc = 0
        for i in range(n):
            acc += i & 7
        best = min(best, time.perf_counter() - t0)
    return round(best * 1e3, 3)


def counting_backend(graphs: list):
    """Inductor, recording each compiled graph's number of inputs (placeholders)."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        graphs.append(sum(1 for n in gm.graph.nodes if n.op == "placeholder"))
        return compile_fx(gm, example_inputs)
    return backend


_HASH = re.compile(r"\bc[a-z0-9]{50,52}\b")  # Inductor's code-cache hashes


def own_times(stats: pstats.Stats, steps: int) -> dict:
    """{function label: (calls per step, own ms per step)}."""
    out = {}
    for (file, line, name), (_cc, nc, tt, _ct, _callers) in stats.stats.items():
        if "torchinductor" in file or _HASH.search(Path(file).name):  # generated code: one label a function name
            label = f"<inductor-generated>({name})"
        else:
            label = f"{Path(file).name}:{line}({name})" if file != "~" else _HASH.sub("<hash>", name)
        calls, ms = out.get(label, (0.0, 0.0))
        out[label] = (calls + nc / steps, ms + tt * 1e3 / steps)
    return out


class BypassLog(logging.Handler):
    """Counts the reasons Inductor gives for launching a Triton kernel through Triton's own launcher instead of its
    static one ("Bypassing StaticallyLaunchedCudaKernel due to ...": user-defined kernels, such as the act op's,
    unless static_launch_user_defined_triton_kernels; launch hooks; scratch memory). Logged where the kernel is
    compiled: a compile worker's reasons do not reach this process."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.reasons: Counter = Counter()

    def emit(self, record):
        msg = record.getMessage()
        if "Bypassing StaticallyLaunched" in msg:
            self.reasons[msg.partition(" due to ")[2][:160]] += 1


def diff_rows(base: dict, other: dict, top: int) -> list[dict]:
    """The functions whose own time per step grows most from base to other."""
    rows = []
    for label in set(base) | set(other):
        c0, t0 = base.get(label, (0.0, 0.0))
        c1, t1 = other.get(label, (0.0, 0.0))
        rows.append({"function": label[:90], "calls/step": round(c1, 1), "calls/step (base)": round(c0, 1),
                     "own ms/step": round(t1, 3), "own ms/step (base)": round(t0, 3), "delta ms": round(t1 - t0, 3)})
    return sorted(rows, key=lambda r: -r["delta ms"])[:top]
