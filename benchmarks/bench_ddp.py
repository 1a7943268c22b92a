#!/usr/bin/env python
"""Data-parallel QAT scaling (issue 19): samples/s of `examples/qat_distributed.py` on 1 GPU against N GPUs with the
same per-GPU batch (weak scaling), DDP and optionally FSDP2, steady-state step time (median without the first two
steps: compilation, allocator and communicator warm-up).

    python benchmarks/bench_ddp.py                                  # DiT-XL/2, dit-xl-2-robuq, per-GPU batch 16
    python benchmarks/bench_ddp.py --engines ddp fsdp2 --steps 12
    python benchmarks/bench_ddp.py --quick                          # CPU smoke run: dit-tiny, 2 processes, gloo

Prints a table, writes benchmarks/results/bench_ddp_<gpu>.json and summary_ddp_<gpu>.json (`ddp<N>_scaling_x`,
`fsdp2<N>_scaling_x`: N-GPU samples/s over one GPU's).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _provenance import gpu_tag, provenance, write_summary  # noqa: E402

EXAMPLE = HERE.parent / "examples" / "qat_distributed.py"


def run(engine: str, procs: int, batch: int, args, tmp: Path) -> dict:
    out = tmp / f"{engine}_{procs}.json"
    common = ["--engine", engine, "--model", args.model, "--policy", args.policy, "--steps", str(args.steps),
              "--batch", str(batch), "--optim", "adamw", "--json", str(out)]
    if args.quick:
        common += ["--device", "cpu", "--threads", "1"]
    if args.compile != "off":  # both sides compiled: one process and DDP
        quick_compiler = args.quick and args.compile != "regional-cg"  # (CUDA graphs need Inductor)
        common += ["--compile", args.compile] + (["--compiler", "aot_eager"] if quick_compiler else [])
    if args.comm_hook != "none" and engine == "ddp":
        common += ["--comm-hook", args.comm_hook]
    if procs == 1:
        cmd = [sys.executable, str(EXAMPLE)] + common
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               str(EXAMPLE)] + common
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return json.loads(out.read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dit-xl-2")
    ap.add_argument("--policy", default="dit-xl-2-robuq")
    ap.add_argument("--per-gpu-batch", type=int, default=16)
    ap.add_argument("--gpus", type=int, default=None, help="processes of the multi-GPU runs (default: all GPUs)")
    ap.add_argument("--engines", nargs="+", default=["ddp"], choices=["ddp", "fsdp2"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (dit-tiny, 2 processes)")
    ap.add_argument("--compile", choices=["off", "backend", "inductor", "regional", "regional-cg"], default="off",
                    help="backend: every run compiled through robuq's backend, qat mode, weight_sides='step' (DDP "
                         "around the compiled model: each gradient bucket's piece computes its own weight sides); "
                         "summary keys ddp<N>_compiled_scaling_x. inductor: quantize() then torch.compile(DDP(qmodel)) "
                         "(each layer its own weight side); keys ddp<N>_inductor_scaling_x. regional / regional-cg: "
                         "compile_repeated_blocks(qmodel) (mode='reduce-overhead' for -cg) before DDP; keys "
                         "ddp<N>_regional_scaling_x / ddp<N>_regional_cg_scaling_x")
    ap.add_argument("--comm-hook", choices=["none", "bf16"], default="none",
                    help="bf16: DDP all-reduces the gradients in bf16 (the example's --comm-hook; GPUs only); keys "
                         "gain _bf16grad")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    from tabulate import tabulate
    if args.quick:
        args.model, args.steps, args.per_gpu_batch, n = "dit-tiny", 4, 2, 2
    else:
        n = args.gpus or torch.cuda.device_count()
        if n < 2:
            sys.exit(f"bench_ddp needs 2 or more GPUs (found {n}); --quick runs on CPU")
    if args.quick and args.comm_hook != "none":
        sys.exit(f"--comm-hook {args.comm_hook}: NCCL only (torch's bf16_compress_hook); --quick runs on the CPU")
    if args.compile != "off" and "fsdp2" in args.engines:
        sys.exit(f"--compile {args.compile}: DDP only (FSDP2 shards the masters the step's weight sides need whole)")
    mode = {"off": "", "backend": "_compiled", "inductor": "_inductor", "regional": "_regional",
            "regional-cg": "_regional_cg"}[args.compile] + ("_bf16grad" if args.comm_hook == "bf16" else "")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        runs = [run("none", 1, args.per_gpu_batch, args, tmp)]
        runs += [run(e, n, n * args.per_gpu_batch, args, tmp) for e in args.engines]
    base = runs[0]["samples_per_s"]
    rows = [{"engine": r["engine"], "processes": r["world"], "global batch": r["global_batch"],
             "steady step ms": round(r["steady_step_s"] * 1e3, 1), "samples/s": r["samples_per_s"],
             "x one process": round(r["samples_per_s"] / base, 3), "final loss": round(r["losses"][-1], 5)}
            for r in runs]
    prov = provenance(argv)
    amp = "bf16 autocast" if runs[0].get("autocast_bf16") else "fp32"
    head = (f"{args.model} QAT ({args.policy}), per-process batch {args.per_gpu_batch}, {amp}, {args.steps} steps | "
            f"{prov['gpu']} | torch {prov['torch']}")
    text = head + "\n" + tabulate(rows, headers="keys", tablefmt="github")
    print(text)
    tag = ("quick" if args.quick else gpu_tag(prov["gpu"])) + mode
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, f"bench_ddp_{tag}.json").write_text(json.dumps({"provenance": prov, "rows": rows, "runs": runs},
                                                                  indent=1))
    figures = {f"{r['engine']}{n}{mode}_scaling_x": row["x one process"] for r, row in zip(runs[1:], rows[1:])}
    if not args.quick:
        print("wrote", write_summary(args.out, "ddp", figures, argv))
    return rows


if __name__ == "__main__":
    main()
