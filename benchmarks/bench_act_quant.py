"""Activation quantizer (robuq_fx/kernels/triton_act_quant.py) against the copy it cannot beat.

For the DiT-XL/2 widths K in {1152, 4608} and M in {256, 1024, 4096, 16384}: the quantizer with the tiling from the
dispatch table (Hadamard block 128, and without), and `x.to(float8_e4m3fn)`, which moves the same bytes (2 read +
1 written per element) and does nothing else. CUDA-graph replay time. Prints a table, writes JSON and PNG beside.

    python benchmarks/bench_act_quant.py [--out benchmarks/results]
    python benchmarks/bench_act_quant.py --gluon-plans [--m 16384]   # every Gluon tiling at K = 1152 / 4608

--gluon-plans times the Gluon quantizer (kernels/gluon_act_quant.py) on every tiling its planner accepts (lanes a row,
columns a thread, warps a program), absmax and sigma ranges, against the Triton kernel's table tiling and the fp8
cast, with the codes checked against the Triton kernel's: the dispatch table's `quant_gluon` entries are
[lanes, max columns a thread, warps]. (fc2's K = 4608 quantizer is ~3.5 ms of the W4A4+H batch-64 forward at
~1.9 TB/s, session 18.)

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
from bench_linear import _with_env, time_graph  # noqa: E402
from robuq_fx.kernels import quantizer as AQ  # noqa: E402


def gluon_plans(ms: list[int]) -> None:
    """The --gluon-plans table (module docstring)."""
    from robuq_fx import quantizers as Q
    from robuq_fx.kernels import gluon_act_quant as G
    from robuq_fx.kernels.triton_launch import launch
    hs = AQ._hscale(128, torch.bfloat16)
    for k in (1152, 4608):
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_copy = time_graph(lambda: x.to(torch.float8_e4m3fn), 5, 5, 2)
            rows = []
            for clip, sym, a_bits in (("absmax", True, 4), ("sigma", False, 2)):
                tri = _with_env(lambda: AQ.act_quant(x, 128, a_bits, sym, shift=not sym, clip=clip),
                                "ROBUQ_QUANT_KERNEL", "triton")  # (the Triton kernel whatever the table picks)
                want = tri()
                t_tri = time_graph(tri, 5, 5, 2)
                rows.append([clip, "triton (table)", "", f"{t_tri * 1e6:.1f}", f"{3 * m * k / t_tri / 1e9:.0f}",
                             "1.00", "yes"])
                levels = float(Q.act_levels(a_bits, sym))
                clip_c = Q.gaussian_clip(2 ** a_bits) if clip == "sigma" else 0.0
                seen = set()
                for lanes in (32, 16, 8):
                    for max_vt in (8, 16, 32, 64, 128):
                        for warps in (2, 4, 8, 16):
                            plan = G.gluon_plan(k, lanes, warps=warps, max_vt=max_vt)
                            if plan is None or plan in seen:
                                continue
                            seen.add(plan)
                            out, sc, lo = (torch.empty_like(t) for t in want)
                            spec = G.act_quant_gluon_launch(x, out, sc, lo, m, m, hs, levels, not sym, sym, plan,
                                                            clip_c)
                            try:
                                launch(*spec)
                                t = time_graph(lambda: launch(*spec), 5, 5, 2)
                            except Exception as e:  # noqa: BLE001 - a tiling that does not build is a row too
                                rows.append([clip, str(plan), f"{lanes}/{max_vt}/{warps}", "failed", str(e)[:60],
                                             "", ""])
                                continue
                            eq = (out.float() == want[0].float()).float().mean().item()
                            rows.append([clip, str(plan), f"{lanes}/{max_vt}/{warps}", f"{t * 1e6:.1f}",
                                         f"{3 * m * k / t / 1e9:.0f}", f"{t / t_tri:.2f}",
                                         "yes" if eq == 1.0 else f"{eq:.5f}"])
            print(f"\nK = {k}, M = {m}: fp8 cast {t_copy * 1e6:.1f} us ({3 * m * k / t_copy / 1e9:.0f} GB/s)")
            print(tabulate(rows, headers=["ranges", "plan (W0, W1, lanes, warps a row, rows)", "tiling", "us",
                                          "GB/s", "x triton", "codes equal"], tablefmt="github"), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--gluon-plans", action="store_true", help="every Gluon tiling at K = 1152 / 4608 (docstring)")
    ap.add_argument("--m", type=int, nargs="+", default=[16384], help="rows for --gluon-plans")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_act_quant needs a CUDA device")
    if args.gluon_plans:
        print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__}")
        return gluon_plans(args.m)
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
