"""bench_accuracy.py's reporting helpers: mean +- sd cells, the AMPN bits-per-kind table, the tiny DiT's sample
grid (PNG)."""
from __future__ import annotations

import statistics
from pathlib import Path

import torch.nn.functional as F
from tabulate import tabulate


def stat(values: list[float], digits: int, sign: bool = False) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:{'+' if sign else ''}.{digits}f} ± {sd:.{digits}f}"


def kind_table(allocs: list[dict]) -> str:
    """Mean chosen bits per layer kind, averaged over seeds, for each AMPN setting."""
    rows = {}
    for per_seed in allocs:
        for label, rep in per_seed.items():
            for r in rep.summary:
                rows.setdefault((label, r["kind"]), []).append(r["mean bits"])
    out = [{"AMPN setting": lab, "layer kind": k, "mean bits": f"{statistics.fmean(v):.2f}"}
           for (lab, k), v in rows.items()]
    return tabulate(out, headers="keys", tablefmt="github", disable_numparse=True)


def save_grid(samples: dict, path: Path, per_class: int = 6) -> bool:
    try:
        import matplotlib
    except ImportError:  # the [bench] extra has it, the [test] extra (CI's smoke run) does not
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(samples)
    cols = 4
    nrow = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(nrow, cols, figsize=(2.6 * cols, 3.9 * nrow), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, lab in zip(axes.flat, labels):
        x = samples[lab].reshape(10, -1, 8, 8)[:, :per_class]  # (class, sample, 8, 8), labels repeat_interleaved
        x = F.pad(x.clamp(-1, 1), (1, 1, 1, 1), value=-1.0)  # a blank (-1) frame between digits
        grid = x.permute(0, 2, 1, 3).reshape(100, -1)  # rows: classes 0..9; columns: samples
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(lab, fontsize=8)
    fig.suptitle("tiny DiT on 8x8 digits, seed 0: one row per class 0-9", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
