#!/usr/bin/env python
"""Where a DiT-XL/2 forward spends its GPU time: torch.profiler over a few forwards of bf16 and of robuq settings,
kernels grouped into categories, milliseconds per forward (the breakdown docs/gpu.md quotes).

    python benchmarks/profile_dit.py                          # GPU: DiT-XL/2, batch 64, bf16 + dit + dit-xl-2-robuq
    python benchmarks/profile_dit.py --settings paper --batch 8 --compile-mode reduce-overhead
    python benchmarks/profile_dit.py --quick                  # CPU smoke run (tiny DiT; CPU op times)

Models run under torch.compile (default mode unless --compile-mode; CUDA graphs hide their kernels from the
profiler's per-kernel view only partly, so the default mode is the one to read). Writes a tabulate table per setting,
JSON with every kernel's time, and provenance, to benchmarks/results/profile_dit_<gpu>.{txt,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import robuq_fx  # noqa: E402
from _provenance import gpu_tag, provenance  # noqa: E402
from _dit_setup import SHORT_NAMES, TINY, XL2, build, inputs, policies  # noqa: E402
from _step_phases import cpu_ops, gpu_idle, phase_times  # noqa: E402

# first match wins; patterns are searched in the kernel (or CPU op) name, lower-cased
CATEGORIES = [
    ("activation quantizer (Triton)", r"act_quant"),
    ("q/k/v fake-quant (Triton rows)", r"fake_quant_rows"),
    ("8-bit attention (fused Triton)", r"attention8_kernel"),
    ("fp8 GEMM, fused epilogue (Triton)", r"fp8_gemm"),
    ("fp8 GEMM (cuBLAS _scaled_mm)", r"e4m3|f8f8|fp8|scaled_mm"),
    ("attention (flash / cuDNN / efficient)", r"flash|fmha|attention|cudnn"),
    ("GEMM (cuBLAS bf16)", r"gemm|sm90_xmma|cutlass|nvjet|addmm|aten::mm|aten::linear"),
    ("optimizer (AdamW, multi-tensor)", r"multi_tensor|adam"),
    ("Inductor fused elementwise", r"triton_poi"),
    ("Inductor fused reductions", r"triton_red|triton_per"),
    ("ATen elementwise / reductions", r"elementwise|reduce|vectorized|unrolled|aten::"),
]


TOP_KERNELS = 25  # the training profile lists this many kernels by GPU time, per setting


def category(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def _is_cpu(e) -> bool:
    return str(getattr(e, "device_type", "")).endswith("CPU")


def is_annotation(e) -> bool:
    """A GPU-side user annotation: the profiler lists each `record_function` range (e.g.
    "Optimizer.step#AdamW.step", the fused QAT path's "robuq::qat ...") on the GPU timeline too, spanning the kernels
    launched inside it. Counted as a kernel it adds the range's whole span to the GPU total (torch's own tables skip
    it the same way); session 19 found the QAT profiles' totals inflated by 23 ms (compiled) and ~396 ms (eager)."""
    return not _is_cpu(e) and bool(getattr(e, "is_user_annotation", False))


def is_kernel(e) -> bool:
    """A GPU kernel's row: neither a CPU op nor a range's GPU-side annotation."""
    return not _is_cpu(e) and not is_annotation(e)


def profile(fn, steps: int, device: str) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile as tprofile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = e.device_time_total if device == "cuda" else e.self_cpu_time_total
        if device == "cuda" and not is_kernel(e):
            continue
        if t > 0:
            rows.append({"kernel": e.key, "calls per forward": e.count / steps, "ms per forward": t / 1e3 / steps})
    return sorted(rows, key=lambda r: -r["ms per forward"])


def _wall_ms(fn, n: int, device: str) -> float:
    """Milliseconds a call of fn, end to end (synchronized before and after n calls)."""
    import time
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny DiT on CPU (smoke run)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--settings", nargs="+", default=["bf16", "dit", "paper"],
                    help="bf16, dit (W4A4+H), w158 (W1.58A4+H), paper, paper-a3, paper-a2")
    ap.add_argument("--compile-mode", default=None)
    ap.add_argument("--top", type=int, default=12, help="kernels listed per setting")
    ap.add_argument("--train", choices=["eager", "compiled", "cudagraphs"], default=None,
                    help="profile QAT training steps instead (batch --batch, bf16 autocast, fp32 masters, AdamW): "
                         "kernels by category plus the robuq ops' own CPU and GPU time (issue 19)")
    ap.add_argument("--step-weights", action="store_true",
                    help="with --train: the QAT settings with robuq_fx.weight_sides_per_forward (every layer's weight "
                         "side once a forward, one CUDA graph replay each way); their tables add its hooks' CPU time")
    ap.add_argument("--blocks", type=int, default=None,
                    help="DiT-XL/2 with this many transformer blocks instead of 28 (shorter compiles; the kernels a "
                         "block runs are the same, so the categories' shares carry over)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    from tabulate import tabulate
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = TINY if args.quick else XL2
    if args.blocks:
        cfg = dict(cfg, num_layers=args.blocks)
    pols = policies()
    names = SHORT_NAMES
    prov = provenance(argv)
    fp = build(cfg).to(device, dtype)
    ex = inputs(cfg, 2, device, dtype)
    x = inputs(cfg, args.batch if not args.quick else 2, device, dtype)
    out = {"provenance": prov, "batch": args.batch, "compile_mode": args.compile_mode, "settings": {}}
    lines = [f"DiT {'tiny' if args.quick else 'XL/2'} batch {args.batch} | {prov['gpu']} | torch {prov['torch']} | "
             f"torch.compile mode {args.compile_mode or 'default'} | {args.steps} forwards profiled"]
    if args.train:
        return train_profile(args, cfg, pols, names, prov, device)
    for key in args.settings:
        model = fp if key == "bf16" else robuq_fx.lower(robuq_fx.quantize(fp, pols[names[key]], example_inputs=ex),
                                                        progress=False)
        fn_model = torch.compile(model, mode=args.compile_mode)
        with torch.no_grad():
            for _ in range(3):
                fn_model(**x)
            wall = _wall_ms(lambda: fn_model(**x), max(args.steps, 5), device)
            rows = profile(lambda: fn_model(**x), args.steps, device)
        cats: dict[str, float] = {}
        for r in rows:
            r["category"] = category(r["kernel"])
            cats[r["category"]] = cats.get(r["category"], 0.0) + r["ms per forward"]
        total = sum(cats.values())
        table = [{"category": c, "ms per forward": round(v, 3), "share": f"{100 * v / total:.1f}%"}
                 for c, v in sorted(cats.items(), key=lambda kv: -kv[1])]
        table.append({"category": "TOTAL (sum of kernel times)", "ms per forward": round(total, 3), "share": ""})
        # what a forward takes end to end beside its kernels' sum: launches, gaps, Python (CUDA graphs or not)
        table.append({"category": "wall time a forward (unprofiled)", "ms per forward": round(wall, 3), "share": ""})
        table.append({"category": "kernels a forward", "ms per forward": round(sum(r["calls per forward"]
                                                                                for r in rows), 1), "share": ""})
        out["settings"][key] = {"categories": table, "kernels": rows}
        lines += ["", f"## {key}", tabulate(table, headers="keys", tablefmt="github"), "",
                  tabulate([{k: (round(v, 4) if isinstance(v, float) else v[:90] if isinstance(v, str) else v)
                             for k, v in r.items()} for r in rows[:args.top]], headers="keys", tablefmt="github")]
        del fn_model, model
        torch._dynamo.reset()
    _write(args, prov, lines, out, "profile_dit")


def _write(args, prov, lines, out, stem):
    """Print the tables; write <stem>_<gpu>.txt (with provenance) and .json."""
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    base = Path(args.out) / f"{stem}_{'quick' if args.quick else gpu_tag(prov['gpu'])}"
    base.with_suffix(".txt").write_text(f"# {prov}\n{text}\n")
    base.with_suffix(".json").write_text(json.dumps(out, indent=1))
    print(f"wrote {base}.txt / .json")


def kernel_growth(base: list[dict], other: list[dict]) -> list[dict]:
    """Kernel rows of `other` against `base` by name (their "ms per step" and "calls per step" summed per name),
    sorted by how much GPU time a step each name gained."""
    def by_name(rows):
        out: dict = {}
        for r in rows:
            c, t, cat = out.get(r["kernel"], (0.0, 0.0, r["category"]))
            out[r["kernel"]] = (c + r["calls per step"], t + r["ms per step"], cat)
        return out
    b, o = by_name(base), by_name(other)
    rows = [{"kernel": k, "category": (o.get(k) or b.get(k))[2], "calls per step": o.get(k, (0.0,))[0],
             "ms per step": round(o.get(k, (0, 0.0))[1], 3), "base ms per step": round(b.get(k, (0, 0.0))[1], 3),
             "delta ms": round(o.get(k, (0, 0.0))[1] - b.get(k, (0, 0.0))[1], 3)} for k in set(b) | set(o)]
    return sorted(rows, key=lambda r: -r["delta ms"])


def train_profile(args, cfg, pols, names, prov, device):
    """Per training step: kernel time by category, wall time, each robuq op's CPU time and the GPU time of the
    kernels it launched (its inclusive device time), each phase's host time and GPU tail (_step_phases.py) and the
    CPU ops with the most self time, for FP ("bf16") and each QAT setting."""
    import time
    from tabulate import tabulate
    from torch.profiler import ProfilerActivity, profile as tprofile
    amp = device == "cuda"
    x = inputs(cfg, args.batch if not args.quick else 2, device)
    blocks = f" ({cfg['num_layers']} blocks)" if args.blocks else ""
    lines = [f"DiT {'tiny' if args.quick else 'XL/2'}{blocks} QAT step, batch {args.batch} | {prov['gpu']} | "
             f"torch {prov['torch']} | {args.train} | {args.steps} steps profiled"]
    out = {"provenance": prov, "batch": args.batch, "train": args.train, "blocks": cfg["num_layers"], "settings": {}}
    all_kernels: dict = {}  # setting -> every kernel row (for the growth table against the first setting)
    for key in args.settings:
        torch.manual_seed(0)
        m = build(cfg).to(device).train()
        if key != "bf16":
            m = robuq_fx.quantize(m, pols[names[key]], example_inputs=inputs(cfg, 2, device)).train()
            if args.step_weights:
                robuq_fx.weight_sides_per_forward(m)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        fwd = {"compiled": lambda: torch.compile(m), "cudagraphs": lambda: torch.compile(m, mode="reduce-overhead"),
               "eager": lambda: m}[args.train]()
        target = torch.randn_like(m(**x)[0].detach())

        state = {}

        def forward():
            if args.train == "cudagraphs":
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                state["y"] = fwd(**x)[0]

        def loss_and_zero():
            state["loss"] = (state.pop("y").float() - target).pow(2).mean()
            opt.zero_grad(set_to_none=True)

        def backward():
            state.pop("loss").backward()
        phases = [("forward", forward), ("loss + zero_grad", loss_and_zero), ("backward", backward),
                  ("optimizer", opt.step)]

        def step():
            for _, fn in phases:
                fn()
        for _ in range(3):
            step()
        split = phase_times(phases, max(args.steps, 3), device)  # host vs GPU, phase by phase (_step_phases.py)
        if amp:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if amp:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps * 1e3
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if amp else [])
        with tprofile(activities=acts) as prof:
            for _ in range(args.steps):
                step()
            if amp:
                torch.cuda.synchronize()
        cats: dict[str, float] = {}
        ops, kernels = [], []
        averages = prof.key_averages()
        for e in averages:
            if _is_cpu(e) and ("robuq" in e.key or e.key.startswith("WeightSides")):
                ops.append({"op": e.key, "calls per step": e.count / args.steps,
                            "CPU ms per step (self)": round(e.self_cpu_time_total / 1e3 / args.steps, 3),
                            "CPU ms per step (with the ops inside)": round(e.cpu_time_total / 1e3 / args.steps, 3),
                            "GPU ms per step (its kernels)": round(e.device_time_total / 1e3 / args.steps, 3)})
            elif is_kernel(e) and e.device_time_total > 0:
                c = category(e.key)
                cats[c] = cats.get(c, 0.0) + e.device_time_total / 1e3 / args.steps
                kernels.append({"kernel": e.key[:90], "category": c, "calls per step": e.count / args.steps,
                                "ms per step": round(e.device_time_total / 1e3 / args.steps, 3)})
        total = sum(cats.values())
        table = [{"category": c, "ms per step": round(v, 3), "share": f"{100 * v / max(total, 1e-9):.1f}%"}
                 for c, v in sorted(cats.items(), key=lambda kv: -kv[1])]
        table.append({"category": "TOTAL kernel time", "ms per step": round(total, 3), "share": ""})
        table.append({"category": "wall time per step", "ms per step": round(wall, 3), "share": ""})
        table.append({"category": "kernels a step", "ms per step": round(sum(e.count for e in averages
                                                                             if is_kernel(e)) / args.steps, 1),
                      "share": ""})
        top = sorted(kernels, key=lambda r: -r["ms per step"])[:TOP_KERNELS]
        all_kernels[key] = kernels
        host_ops = cpu_ops(averages, args.steps)
        try:  # (a diagnosis: its failure on another torch's event layout must not lose the tables above)
            idle, idle_inner, idle_outer = gpu_idle(prof.events(), args.steps, is_kernel)
        except Exception as exc:  # noqa: BLE001
            idle, idle_inner, idle_outer = None, [{"gap analysis failed": f"{type(exc).__name__}: {exc}"[:200]}], []
        out["settings"][key] = {"categories": table, "robuq_ops": ops, "wall_ms": wall, "top_kernels": top,
                                "phases": split, "cpu_ops": host_ops, "gpu_idle_ms": idle,
                                "gpu_idle_by_op": idle_inner, "gpu_idle_by_phase": idle_outer}
        lines += ["", f"## {key}", tabulate(table, headers="keys", tablefmt="github"),
                  "", f"the {len(top)} kernels with the most GPU time (what each category is made of):",
                  tabulate(top, headers="keys", tablefmt="github"),
                  "", "each phase alone (the GPU idle at its start): its Python, then the GPU's wait after it",
                  tabulate(split, headers="keys", tablefmt="github"),
                  "", f"the {len(host_ops)} CPU-side ops with the most self time (under the profiler):",
                  tabulate(host_ops, headers="keys", tablefmt="github"),
                  "", f"the GPU idle between kernels: {idle} ms a step, by what the host was running at each gap's "
                  "middle (_step_phases.gpu_idle):",
                  tabulate(idle_inner, headers="keys", tablefmt="github"), "",
                  tabulate(idle_outer, headers="keys", tablefmt="github")]
        if ops:
            lines += ["", tabulate(sorted(ops, key=lambda r: -r["GPU ms per step (its kernels)"]), headers="keys",
                                   tablefmt="github")]
        del fwd, m, opt
        torch._dynamo.reset()
    base = args.settings[0]
    for key in args.settings[1:]:
        rows = kernel_growth(all_kernels.get(base, []), all_kernels.get(key, []))[:TOP_KERNELS]
        out["settings"][key]["kernel_growth"] = rows
        lines += ["", f"## {key} against {base}: the kernels whose GPU time grew most (by name; a QAT-only kernel has "
                      f"no base time)", tabulate(rows, headers="keys", tablefmt="github")]
    _write(args, prov, lines, out, f"profile_dit_train_{args.train}{'_stepw' if args.step_weights else ''}"
                                   f"{f'_{args.blocks}blocks' if args.blocks else ''}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
