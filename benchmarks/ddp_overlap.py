#!/usr/bin/env python
"""What limits data-parallel QAT, measured on ONE GPU (issue 19, item 4): DDP in a one-rank process group, with a
communication hook that records when each gradient bucket becomes ready during the backward (a CUDA event on the
backward's stream) and its size. From that timeline `_ddp_timeline.py` predicts how much of an N-GPU all-reduce would
run after the backward (exposed) at a given bus bandwidth, and the bandwidth a 1.8x two-GPU scaling needs. Besides
the prediction it measures what is ours on every rank: DDP's own cost (the same model's step without DDP), and how
early the gradients are ready (QAT against the FP model, and with `weight_sides_per_forward`, which hands every
master its gradient at the end of the backward).

    python benchmarks/ddp_overlap.py                                   # DiT-XL/2, per-GPU batch 16: FP, dit, paper
    python benchmarks/ddp_overlap.py --compile regional-cg --settings fp dit-xl-2-robuq dit-xl-2-robuq+stepw
    python benchmarks/ddp_overlap.py --quick                           # CPU smoke run (dit-tiny, gloo)

A setting is `fp` or a policy name (`dit`, `dit-xl-2-robuq`, ...), `+stepw` appended for weight_sides_per_forward.
Prints a table; writes benchmarks/results/ddp_overlap_<gpu>[_<compile>].json, a PNG of the ready-bytes curves and
summary_ddp_overlap_<gpu>.json (`ddp_overhead_<setting>_x`; at --busbw's first value `ddp2_pred_<setting>_x`, the
all-reduce alone: the DDP step against itself grown by the exposed part, and `ddp2_pred_total_<setting>_x`, against
the step without DDP, DDP's own cost in; `ddp2_breakeven_<setting>_gbs`, the all-reduce alone). Predictions, not the
measured `ddp2_scaling_x` (bench_ddp.py, 2 GPUs).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _ddp_timeline import Bucket, breakeven_busbw, predicted_scaling, ready_fraction, simulate  # noqa: E402
from _provenance import gpu_tag, provenance, write_summary  # noqa: E402


def _example():
    """examples/qat_distributed.py as a module: its model, policy, data and loss (one copy of them)."""
    spec = importlib.util.spec_from_file_location("qat_distributed", HERE.parent / "examples" / "qat_distributed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Clock:
    """Marks on the GPU's stream (CUDA events) or, on the CPU, where ops run synchronously, wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        """From mark a to mark b, in ms (call after a synchronize)."""
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def _recording_hook(state: dict, bucket):
    """DDP communication hook: note the bucket's index, size and a mark at its readiness, then the usual all-reduce
    (one rank: NCCL's own cost on this GPU stays in the step)."""
    buf = bucket.buffer()
    state["marks"].append((bucket.index(), buf.numel() * buf.element_size(), state["clock"].mark()))
    fut = dist.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _steps(model, batches, loss_fn, opt, clock, n: int, cg: bool, amp, state: dict | None = None) -> list[dict]:
    """n optimizer steps; each returns its marks resolved to ms: step, backward, and (with DDP) the buckets' ready
    times from the backward's start."""
    out = []
    for i in range(n):
        b = batches[i % len(batches)]
        if state is not None:
            state["marks"] = []
        if cg:
            torch.compiler.cudagraph_mark_step_begin()
        t0 = clock.mark()
        with amp():
            loss = loss_fn(model, b)
        t_bwd = clock.mark()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t_bwd_end = clock.mark()
        opt.step()
        t_end = clock.mark()
        if clock.cuda:
            torch.cuda.synchronize()
        rec = {"step_ms": clock.ms(t0, t_end), "backward_ms": clock.ms(t_bwd, t_bwd_end)}
        if state is not None:
            rec["buckets"] = [(idx, nb, clock.ms(t_bwd, m)) for idx, nb, m in state["marks"]]
        out.append(rec)
    return out


def _median_buckets(records: list[dict]) -> list[Bucket]:
    """Each bucket's median ready time over the measured steps (its index and size fixed after DDP's first step)."""
    by_idx: dict[int, list] = {}
    for r in records:
        for idx, nb, ms in r["buckets"]:
            by_idx.setdefault(idx, []).append((nb, ms))
    return [Bucket(statistics.median(ms for _, ms in v), v[0][0]) for _, v in sorted(by_idx.items())]


def measure(setting: str, ex, args, device: torch.device) -> dict:
    import robuq_fx
    from torch.nn.parallel import DistributedDataParallel
    policy_name, stepw = setting.removesuffix("+stepw"), setting.endswith("+stepw")
    eargs = argparse.Namespace(model=args.model, pretrained=None, seed=0, policy=policy_name, tiny_rank=4,
                               autocast=args.autocast)
    model = ex.build_model(eargs).to(device)
    t0 = time.perf_counter()
    if policy_name != "fp":
        model = robuq_fx.quantize(model, ex.build_policy(eargs), ex.example_inputs(eargs, device=device))
    if stepw:
        if policy_name == "fp":
            raise SystemExit("fp+stepw: weight_sides_per_forward needs a QAT model")
        robuq_fx.weight_sides_per_forward(model, fixed_buffers=args.compile == "regional-cg")
    if args.compile != "off":
        kw = {"mode": "reduce-overhead"} if args.compile == "regional-cg" else {}
        robuq_fx.compile_repeated_blocks(model, **kw)
    prep_s = time.perf_counter() - t0
    model.train()
    cfg = model.config
    batches = [{k: v.to(device) for k, v in ex.global_batch(cfg, args.batch, s, 0).items()} for s in range(2)]
    clock, cg = Clock(device), args.compile == "regional-cg"
    amp = lambda: ex.autocast(eargs, device)  # noqa: E731
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  bucket_cap_mb=args.bucket_cap_mb, gradient_as_bucket_view=args.bucket_view,
                                  broadcast_buffers=not args.no_broadcast)
    state = {"clock": clock, "marks": []}
    if args.hook == "record":
        ddp.register_comm_hook(state, _recording_hook)
    run = lambda m, n, st=None: _steps(m, batches, ex.loss_fn, opt, clock, n, cg, amp, st)  # noqa: E731
    run(model, args.warmup)
    run(ddp, args.warmup, state)  # (DDP's first step rebuilds its buckets in the order the gradients came)
    plain, recs = [], []
    for _ in range(args.rounds):  # interleaved: a host whose speed drifts (it does, call to call) hits both alike
        plain += run(model, args.steps)  # the model itself: DDP's hooks stay idle (its forward did not run)
        recs += run(ddp, args.steps, state)
    buckets = _median_buckets(recs)  # (none with --hook none)
    step_ms = statistics.median(r["step_ms"] for r in recs)
    bwd_ms = statistics.median(r["backward_ms"] for r in recs)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    row = {"setting": setting, "compile": args.compile, "bf16": ex.bf16_forward(eargs, device),
           "prepare_s": round(prep_s, 1),
           "plain_step_ms": statistics.median(r["step_ms"] for r in plain), "step_ms": step_ms, "backward_ms": bwd_ms,
           "plain_steps_ms": [round(r["step_ms"], 2) for r in plain],
           "ddp_steps_ms": [round(r["step_ms"], 2) for r in recs],
           "grad_mb": grad_bytes / 2**20, "bucket_mb": sum(b.nbytes for b in buckets) / 2**20,
           "buckets": [[b.ready_ms, b.nbytes] for b in buckets],
           "ready_half": ready_fraction(buckets, bwd_ms / 2) if buckets else None,
           "last_ready_ms": max(b.ready_ms for b in buckets) if buckets else None,
           "predictions": {}, "breakeven_gbs": None}
    if buckets:
        for bw in args.busbw:
            sim = simulate(buckets, bwd_ms, bw, args.world, args.latency_us)
            row["predictions"][str(bw)] = {
                **sim, "scaling_x": predicted_scaling(step_ms, sim["exposed_ms"], args.world),
                # against one GPU without DDP, DDP's own cost in (what bench_ddp measures on N GPUs)
                "total_x": predicted_scaling(step_ms, sim["exposed_ms"], args.world, row["plain_step_ms"])}
        row["breakeven_gbs"] = breakeven_busbw(buckets, bwd_ms, step_ms, args.target, args.world, args.latency_us)
    return row


def _table_row(r: dict, args) -> dict:
    p, bws = r["predictions"], args.busbw
    no = "" if p else "-"  # (--hook none: no timeline, no predictions)
    return {"setting": r["setting"], "step ms": round(r["plain_step_ms"], 1), "DDP step ms": round(r["step_ms"], 1),
            "DDP cost": f"{r['step_ms'] / r['plain_step_ms'] - 1:+.1%}", "backward ms": round(r["backward_ms"], 1),
            "grads MB": round(r["grad_mb"]), "buckets": len(r["buckets"]),
            "ready at half": no or f"{r['ready_half']:.0%}", "last ready ms": no or round(r["last_ready_ms"], 1),
            **{f"exposed ms @{bw:g}": no or round(p[str(bw)]["exposed_ms"], 1) for bw in bws},
            **{f"x{args.world} @{bw:g}": no or round(p[str(bw)]["scaling_x"], 3) for bw in bws},
            f"x{args.world} with DDP's cost @{bws[0]:g}": no or round(p[str(bws[0])]["total_x"], 3),
            f"GB/s for {args.target}x": no or ("none" if r["breakeven_gbs"] is None else round(r["breakeven_gbs"], 1))}


def _plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    rows = [r for r in rows if r["buckets"]]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        pts = sorted(r["buckets"])
        total = sum(nb for _, nb in pts)
        xs, ys, acc = [0.0], [0.0], 0
        for ms, nb in pts:
            acc += nb
            xs += [ms / r["backward_ms"], ms / r["backward_ms"]]
            ys += [ys[-1], acc / total]
        ax.plot(xs, ys, label=f"{r['setting']} (backward {r['backward_ms']:.0f} ms)")
    ax.set_xlabel("time from the backward's start / backward time")
    ax.set_ylabel("gradient bytes ready for all-reduce")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dit-xl-2", choices=["dit-xl-2", "dit-tiny"])
    ap.add_argument("--settings", nargs="+", default=["fp", "dit", "dit-xl-2-robuq"])
    ap.add_argument("--compile", choices=["off", "regional", "regional-cg"], default="off",
                    help="robuq_fx.compile_repeated_blocks before DDP wraps the model (-cg: mode='reduce-overhead')")
    ap.add_argument("--batch", type=int, default=16, help="per-GPU batch")
    ap.add_argument("--autocast", choices=["auto", "bf16", "none"], default="auto",
                    help="the forward under bf16 autocast (auto: on CUDA; the example's --autocast)")
    ap.add_argument("--warmup", type=int, default=3, help="steps not timed (DDP rebuilds its buckets after the first)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps a side a round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of plain steps, then DDP steps")
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP's bucket_cap_mb")
    ap.add_argument("--hook", choices=["record", "none"], default="record",
                    help="none: DDP's own all-reduce, no timeline (what the recording hook costs)")
    ap.add_argument("--bucket-view", action="store_true", help="DDP's gradient_as_bucket_view=True")
    ap.add_argument("--no-broadcast", action="store_true", help="DDP's broadcast_buffers=False")
    ap.add_argument("--world", type=int, default=2, help="GPUs of the predicted run")
    ap.add_argument("--busbw", type=float, nargs="+", default=[350.0, 100.0, 25.0],
                    help="all-reduce bus bandwidths to predict at, GB/s (the first goes into the summary; 350: "
                         "about what nccl-tests reports on NVLink 4 H100/H200 machines, not measured here)")
    ap.add_argument("--latency-us", type=float, default=20.0, help="fixed cost of one all-reduce")
    ap.add_argument("--target", type=float, default=1.8, help="scaling whose break-even bandwidth is reported")
    ap.add_argument("--tag", default="", help="appended to the output files' names (no summary then: an A/B run)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: dit-tiny, gloo, 2 + 2 steps")
    ap.add_argument("--out", default=str(HERE / "results"))
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from tabulate import tabulate
    if args.quick:
        args.model, args.batch, args.warmup, args.steps, args.rounds = "dit-tiny", 4, 2, 1, 2
        if args.compile == "regional-cg":
            sys.exit("--quick runs on the CPU: no CUDA graphs (regional-cg)")
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.quick else torch.device("cpu")
    if device.type == "cpu" and not args.quick:
        sys.exit("ddp_overlap times a GPU's backward: no CUDA device here (--quick runs on the CPU)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ex = _example()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, **({"device_id": device} if device.type == "cuda" else {}))
    try:
        rows = []
        for s in args.settings:
            rows.append(measure(s, ex, args, device))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # (the last setting's model is gone with measure's frame)
    finally:
        dist.destroy_process_group()
    prov = provenance(argv)
    bws = args.busbw
    table = [_table_row(r, args) for r in rows]
    amp = "bf16 autocast" if rows and rows[0]["bf16"] else "fp32"
    head = (f"{args.model} QAT, per-GPU batch {args.batch}, {amp}, compile {args.compile}, DDP bucket_cap_mb "
            f"{args.bucket_cap_mb:g}, one rank; predicted {args.world}-GPU all-reduce at bus bandwidths {bws} GB/s "
            f"(latency {args.latency_us:g} us) | {prov['gpu']} | torch {prov['torch']}")
    print(head + "\n" + tabulate(table, headers="keys", tablefmt="github"))
    mode = "" if args.compile == "off" else f"_{args.compile}"
    tag = ("quick" if args.quick else gpu_tag(prov["gpu"])) + mode + args.tag
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, f"ddp_overlap_{tag}.json").write_text(
        json.dumps({"provenance": prov, "args": vars(args), "table": table, "rows": rows}, indent=1))
    _plot(rows, Path(args.out, f"ddp_overlap_{tag}.png"),
          f"{args.model}, per-GPU batch {args.batch}, {amp}, compile {args.compile} | {prov['gpu']}\n"
          f"DDP gradient buckets ready during the backward (one rank)")
    if not args.quick and not args.tag:
        sfx = mode.replace("-", "_")  # (the file names' suffix, as a key's)
        figures = {}
        for r in rows:
            key = r["setting"].replace("+", "_").replace("-", "_") + sfx
            figures[f"ddp_overhead_{key}_x"] = round(r["step_ms"] / r["plain_step_ms"], 3)
            if r["predictions"]:
                figures[f"ddp{args.world}_pred_{key}_x"] = round(r["predictions"][str(bws[0])]["scaling_x"], 3)
                figures[f"ddp{args.world}_pred_total_{key}_x"] = round(r["predictions"][str(bws[0])]["total_x"], 3)
                figures[f"ddp{args.world}_breakeven_{key}_gbs"] = (None if r["breakeven_gbs"] is None
                                                                   else round(r["breakeven_gbs"], 1))
        print("wrote", write_summary(args.out, "ddp_overlap", figures, argv))
    return rows


if __name__ == "__main__":
    main()
