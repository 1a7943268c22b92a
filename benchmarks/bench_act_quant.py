"""Activation quantizer (robuq_fx/kernels/triton_act_quant.py) against the copy it cannot beat.

For the DiT-XL/2 widths K in {1152, 4608} and M in {256, 1024, 4096, 16384}: the quantizer with the tiling from the
dispatch table (Hadamard block 128, and without), and `x.to(float8_e4m3fn)`, which moves the same bytes (2 read +
1 written per element) and does nothing else. CUDA-graph replay time. Prints a table, writes JSON and PNG beside.

    python benchmarks/bench_act_quant.py [--out benchmarks/results]

`benchmarks/results/bench_act_quant_vs_tensorcore_NVIDIA_H100.txt` holds the run that compared this kernel with the
tensor-core kernel it replaced (made by this file at commit 16e3fc9).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _provenance import provenance  # noqa: E402
from bench_linear import time_graph  # noqa: E402
from robuq_fx.kernels import quantizer as AQ  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_act_quant needs a CUDA device")
    gpu = torch.cuda.get_device_name()
    import triton
    print(f"GPU: {gpu} | torch {torch.__version__} | triton {triton.__version__}")
    rows, recs = [], []
    for k in (1152, 4608):
        for m in (256, 1024, 4096, 16384):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_copy = time_graph(lambda: x.to(torch.float8_e4m3fn), 5, 5, 2)
            t_h = time_graph(lambda: AQ.act_quant(x, 128, 4, True), 5, 5, 2)
            t_n = time_graph(lambda: AQ.act_quant(x, 0, 4, True), 5, 5, 2)
            gbs = lambda t: 3 * m * k / t / 1e9  # noqa: E731
            recs.append(dict(K=k, M=m, copy_us=t_copy * 1e6, quant_h_us=t_h * 1e6, quant_noh_us=t_n * 1e6,
                             plan_h=list(AQ.quant_plan(k, 128, m)[1:]), plan_noh=list(AQ.quant_plan(k, 0, m)[1:])))
            rows.append([k, m, f"{t_copy * 1e6:.1f} ({gbs(t_copy):.0f})", f"{t_n * 1e6:.1f} ({gbs(t_n):.0f})",
                         f"{t_h * 1e6:.1f} ({gbs(t_h):.0f})", f"{t_copy / t_n:.2f}", f"{t_copy / t_h:.2f}"])
    print(tabulate(rows, headers=["K", "M", "fp8 cast us (GB/s)", "quant A4 us (GB/s)", "quant A4+H128 us (GB/s)",
                                  "cast/quant", "cast/quant+H"], tablefmt="github"))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_act_quant_{gpu.replace(' ', '_')}.json")
    with open(path, "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, provenance=provenance(), rows=recs),
                  f, indent=1)
    print("wrote", path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, k in zip(axes, (1152, 4608)):
        rs = [r for r in recs if r["K"] == k]
        ms = [str(r["M"]) for r in rs]
        for j, (key, label) in enumerate((("copy_us", "fp8 cast (same bytes)"), ("quant_noh_us", "quant A4"),
                                          ("quant_h_us", "quant A4 + H128"))):
            gb = [3 * r["M"] * k / (r[key] * 1e-6) / 1e9 for r in rs]
            ax.bar([i + 0.27 * (j - 1) for i in range(len(ms))], gb, width=0.27, label=label)
        ax.set_xticks(range(len(ms)), ms)
        ax.set_xlabel("M (tokens)")
        ax.set_title(f"K = {k}")
    axes[0].set_ylabel("GB/s (2 B read + 1 B written per element)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"activation quantizer, {gpu}, torch {torch.__version__}", fontsize=9)
    fig.tight_layout()
    png = path[:-5] + ".png"
    fig.savefig(png, dpi=120)
    print("wrote", png)


if __name__ == "__main__":
    main()
