"""Where the weight sides' GPU time goes in `weight_sides_per_forward` (DiT-XL/2, the paper policy, bf16 autocast):
CUDA-event times of WeightSides' forward and backward computed op by op and replayed from their CUDA graphs (with
the copies around the replays), the host's time in each (launches, replays, Python; no wait for the GPU), then the
kernels of each, by name, from the profiler. Session 23's step profile gave
the node 12.4 ms forward and 17.7 ms backward of GPU time a step, against ~4 ms that its bytes need.

    python scripts/weight_side_profile.py [--out DIR] [--tiny]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _dit_setup import PAPER, TINY, XL2, build, inputs, policies  # noqa: E402

import robuq_fx  # noqa: E402
from robuq_fx import qat_fused, qat_step  # noqa: E402
from robuq_fx.qat_linear import QATLinear  # noqa: E402
from robuq_fx.qat_step_layout import _split  # noqa: E402


def _ms(fn, iters=5):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def _host_ms(fn, iters=5):
    """The host's time in fn (from an idle GPU, without waiting for it at the end): what a launch, a graph replay or
    the Python around them costs the step's host side."""
    fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[iters // 2]


def _kernels(fn, top=14):
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(e.name[:70], [0, 0.0])
            r[0] += 1
            r[1] += e.device_time_total / 1e3 if hasattr(e, "device_time_total") else e.cuda_time_total / 1e3
    rows = sorted(rows.items(), key=lambda kv: -kv[1][1])
    total = sum(v[1] for _, v in rows)
    lines = [f"    {'kernel':70s} {'calls':>6s} {'ms':>8s}"]
    lines += [f"    {n:70s} {c:6d} {t:8.3f}" for n, (c, t) in rows[:top]]
    lines.append(f"    {'TOTAL':70s} {sum(v[0] for _, v in rows):6d} {total:8.3f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    cfg = TINY if args.tiny else XL2
    dev = "cuda"
    m = build(cfg).to(dev).train()
    q = robuq_fx.quantize(m, policies()[PAPER], example_inputs=inputs(cfg, 2, dev)).train()
    plan = qat_step.Plan([x for x in q.modules() if isinstance(x, QATLinear)])
    masters = [t.requires_grad_(True) for t in plan.masters()]
    out = [f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {len(plan.layers)} layers, "
           f"{sum(t.numel() for t in masters) / 1e6:.0f} M master elements"]
    ac = torch.autocast("cuda", dtype=torch.bfloat16)  # the forward under autocast, the backward without (as autograd)
    with ac, torch.no_grad():
        plan.c, plan.ab = plan.kinds(masters).pop()
        plan.set_act(masters[0].device)
        act = plan.act
        flat, r_dtypes = qat_step._all_sides(plan.layers, plan.layout, plan.c, act, *masters)
    g = torch.randn_like(flat) * 1e-3
    needs = (True,) * len(masters)
    parts_g = _split(g, plan.layout)

    def eager_fwd():  # (with the switch on: one grouped launch, its tables built at the first call)
        with ac, torch.no_grad():
            qat_step._all_sides(plan.layers, plan.layout, plan.c, act, *masters,
                                group=plan._group(tuple(masters), tuple(t.data_ptr() for t in masters)))

    def eager_bwd():
        with torch.no_grad():
            qat_step._all_grads(plan.layers, plan.layout, g, plan.c, plan.ab, r_dtypes, needs, act, *masters)

    def switched(fn, on: bool):
        """fn with ROBUQ_QAT_WSIDE_KERNEL's grouped kernels (kernels/triton_wside.py, triton_wgrad.py) on or off."""
        def run():
            qat_fused._WSIDE[0], before = on, qat_fused._WSIDE[0]
            try:
                fn()
            finally:
                qat_fused._WSIDE[0] = before
        return run

    def graphed():
        with ac:
            parts = qat_step.WeightSides.apply(plan, *masters)
        torch.autograd.backward(parts, parts_g)
        for t in masters:
            t.grad = None

    def graphed_fwd():
        with ac, torch.no_grad():
            plan.run_forward(tuple(masters))

    for name, fn in (("forward, op by op", switched(eager_fwd, False)),
                     ("forward, op by op, one kernel", switched(eager_fwd, True)),
                     ("backward, op by op", switched(eager_bwd, False)),
                     ("forward + backward through WeightSides (CUDA graphs, autograd)", switched(graphed, False)),
                     ("the same with the one-kernel forms", switched(graphed, True)),
                     ("forward replay alone (+ its clone)", graphed_fwd)):
        t = _ms(fn)
        out.append(f"\n## {name}: {t:.3f} ms (host: {_host_ms(fn):.3f} ms)\n{_kernels(fn)}")
        print(out[-1], flush=True)
    # the grouped forward kernel's tile height, warps and pipelining depth (kernels/triton_wside.Group: 32 rows, 4
    # warps by default; at 16 rows it ran at about a third of the bandwidth in session 25)
    from robuq_fx.kernels import triton_wside
    qat_fused._WSIDE[0] = True
    try:
        with ac:
            group = plan._group(tuple(masters), tuple(t.data_ptr() for t in masters))
    finally:
        qat_fused._WSIDE[0] = None
    if group is not None:
        elems = sum(item.w.numel() for item in group.items)
        out.append(f"\n## the grouped forward kernel alone, {elems / 1e6:.0f} M weights (~10 bytes each by its reads and"
                   f" writes)")
        # (session 26: 32 x 4 fastest, 5.22 ms; stages: the loops' pipelining depth, "-" Triton's default)
        for bm, warps, stages in ((16, 4, None), (32, 4, None), (32, 8, None), (32, 4, 1), (32, 4, 2), (32, 4, 4),
                                  (16, 4, 4), (64, 8, None)):
            g2 = triton_wside.Group(group.items, group.c, flat.device, bm=bm, num_warps=warps, num_stages=stages)
            t = _ms(lambda: g2.run(flat))
            out.append(f"    rows {bm:3d}, warps {warps}, stages {stages or '-'}: {t:7.3f} ms "
                       f"({elems * 10 / t / 1e6:6.0f} GB/s)")
            print(out[-1], flush=True)
    text = "\n".join(out)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "weight_side_profile.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
