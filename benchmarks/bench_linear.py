#!/usr/bin/env python
"""Benchmark robuq::qlinear on a CUDA GPU against bf16 F.linear on the DiT-XL/2 linear shapes.

Columns (one run): bf16 F.linear; the fp8 GEMM-only ceiling (torch._scaled_mm, row-wise scales, fast accumulation,
on pre-quantized codes); robuq W4A4 (fused quant + GEMM), W4A4 + Hadamard 128, W1.58A4 + Hadamard 128, and (unless
--no-extra) W1.58A2 (asymmetric) + Hadamard + LRB32 and the activation quantizer alone. The robuq
columns build `PackedLinear.from_float(...)` layers and call them, so the real op, the registry and the dispatch are
timed; the kernel the dispatch picked is shown next to each number (f = triton_fp8, d = cuda_dequant).

Timing: CUDA events after warm-up. `graph` mode replays a CUDA graph of several calls (GPU time, no Python
overhead); `eager` mode times back-to-back Python calls (includes launch overhead, which bounds small M).
Ratios are bf16 time / column time (> 1 = faster than bf16); geomean per M over the five shapes.

    python benchmarks/bench_linear.py                         # table + JSON + PNG in benchmarks/results/
    python benchmarks/bench_linear.py --write-dispatch        # re-measure robuq_fx/kernels/dispatch_table.json
    python benchmarks/bench_linear.py --write-dispatch --dispatch-only   # only the table (about a minute)
    python benchmarks/bench_linear.py --replot benchmarks/results/bench_linear_NVIDIA_H200.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _provenance import provenance, write_summary  # noqa: E402  (benchmarks/ is the script's own folder)

SHAPES = [("qkv", 1152, 3456), ("proj", 1152, 1152), ("fc1", 1152, 4608), ("fc2", 4608, 1152),
          ("adaLN", 1152, 6912)]  # (name, K, N)
MS = [256, 1024, 4096, 16384]
DISPATCH_MS = [16, 64, 256, 512, 1024, 2048, 4096, 16384]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_graph(fn, reps: int = 10, iters: int = 10, rounds: int = 3) -> float:
    """Mean seconds per call of `fn`, from replays of a CUDA graph that holds `reps` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(rounds):  # best of the timed batches
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            g.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3 / (iters * reps))
    del g
    return best


def time_eager(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3 / iters)
    return best


def timer(mode: str):
    return time_graph if mode == "graph" else time_eager


def make_layer(spec_kw: dict, w, b, lrb_rank: int = 0):
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    n, k = w.shape
    spec = LayerSpec(lora_rank=lrb_rank, **spec_kw).resolve(k, n)
    down = up = None
    if lrb_rank:
        g = torch.Generator(device=w.device).manual_seed(1)
        down = torch.randn(lrb_rank, k, device=w.device, generator=g).to(w.dtype) * 0.02
        up = torch.randn(n, lrb_rank, device=w.device, generator=g).to(w.dtype) * 0.02
    return PackedLinear.from_float(w, b, down, up, spec)


def layer_args(m):
    from robuq_fx.kernels import QLinearArgs
    return QLinearArgs(m.qweight, m.w_scale, m.bias, m.lrb_down, m.lrb_up, *m.op_args())


def picked(m, x) -> str:
    from robuq_fx.kernels import select
    return {"triton_fp8": "f", "cuda_dequant": "d"}.get(select(x, layer_args(m)).name, "?")


COLUMNS = [
    ("W4A4", dict(w_bits=4, a_bits=4, hadamard=False), 0),
    ("W4A4+H", dict(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128), 0),
    ("W1.58A4+H", dict(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128), 0),
]
EXTRA = [("W1.58A2+H+LRB32", dict(w_bits=1.58, a_bits=2, hadamard=True, hadamard_block=128), 32),
         # issue #12's cost rows: the low-rank branch alone and the asymmetric offset alone, vs W1.58A4+H
         ("W1.58A4+H+LRB32", dict(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128), 32),
         ("W1.58A4asym+H", dict(w_bits=1.58, a_bits=4, a_sym=False, hadamard=True, hadamard_block=128), 0),
         # issue 20's a_group = 128: the one-pass block quantizer and the block-scaled GEMM (triton_block_quant.py)
         ("W4A4+H ag128", dict(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128, a_group=128), 0),
         ("W1.58A4+H ag128", dict(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128, a_group=128), 0),
         # the paper policy's sibling-fused q/k/v branch (3 x 32), for the flat stacked layout (ROBUQ_STACKED_WIDE)
         ("W1.58A4+H+LRB96", dict(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128), 96),
         # the -a2 policy's form (asymmetric sigma ranges), for the asymmetric stacked mode (ROBUQ_STACKED_ASYM)
         ("W1.58A2sigma+H+LRB32", dict(w_bits=1.58, a_bits=2, a_clip="sigma", hadamard=True, hadamard_block=128),
          32)]


def _with_env(fn, key: str, value: str):
    """fn called with os.environ[key] = value (what the kernels read per call; captured so in CUDA-graph mode)."""
    def call():
        old = os.environ.get(key)
        os.environ[key] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[key]
            else:
                os.environ[key] = old
    return call


def bench(args) -> dict:
    from robuq_fx.kernels import quantizer as AQ
    dev = torch.device("cuda")
    cols = COLUMNS + (EXTRA if args.extra else [])
    out = {"rows": []}
    for name, k, n in SHAPES:
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
        b = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
        layers = {c: make_layer(kw, w, b, r) for c, kw, r in cols}
        wq8 = (torch.randint(-7, 8, (n, k), device=dev)).to(torch.bfloat16).to(torch.float8_e4m3fn)
        sw = torch.rand(1, n, device=dev) * 0.01 + 0.001
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xq8 = torch.randint(-7, 8, (m, k), device=dev).to(torch.bfloat16).to(torch.float8_e4m3fn)
            sx = torch.rand(m, 1, device=dev) * 0.01 + 0.001
            fns = {
                "bf16": lambda: F.linear(x, w, b),
                "fp8 GEMM only": lambda: torch._scaled_mm(xq8, wq8.t(), scale_a=sx, scale_b=sw, bias=b,
                                                          out_dtype=torch.bfloat16, use_fast_accum=True),
            }
            for c, _, _ in cols:
                fns[c] = (lambda mod: (lambda: mod(x)))(layers[c])
            if args.extra:
                # the same LRB layer with the branch stacked into _scaled_mm (kernels/lrb_stacked.py, opt-in)
                fns["W1.58A4+H+LRB32 stacked"] = _with_env(fns["W1.58A4+H+LRB32"], "ROBUQ_FP8_EPI", "stacked")
                # the Triton epilogue GEMM making t itself (ROBUQ_FP8_DOWN_IN_GEMM=1: no lrb_down launch)
                fns["W1.58A4+H+LRB32 down-in-GEMM"] = _with_env(_with_env(
                    fns["W1.58A4+H+LRB32"], "ROBUQ_FP8_DOWN_IN_GEMM", "1"), "ROBUQ_FP8_EPI", "triton")
                # and its codes from one kernel (kernels/triton_mma_quant.py, ROBUQ_STACKED_QUANT=fused)
                fns["W1.58A4+H+LRB32 stacked fused"] = _with_env(fns["W1.58A4+H+LRB32 stacked"], "ROBUQ_STACKED_QUANT",
                                                                 "fused")
                # the quantizer inside the GEMM, warp-specialized (kernels/gluon_qgemm_ws.py, opt-in; K <= 1152: fc2
                # keeps the two kernels)
                fns["W4A4+H fused ws"] = _with_env(fns["W4A4+H"], "ROBUQ_FP8_FUSED_QUANT", "ws")
                fns["W1.58A4+H+LRB32 fused ws"] = _with_env(fns["W1.58A4+H+LRB32"], "ROBUQ_FP8_FUSED_QUANT", "ws")
                # session 18's opt-ins: the rank-96 branch in the stacked mode (flat layout), the -a2 form stacked
                # (its offset term in the padding columns) with the Gluon sigma quantizer
                fns["W1.58A4+H+LRB96 stacked wide"] = _with_env(_with_env(
                    fns["W1.58A4+H+LRB96"], "ROBUQ_FP8_EPI", "stacked"), "ROBUQ_STACKED_WIDE", "1")
                fns["W1.58A2sigma+H+LRB32 stacked asym"] = _with_env(_with_env(_with_env(
                    fns["W1.58A2sigma+H+LRB32"], "ROBUQ_FP8_EPI", "stacked"), "ROBUQ_STACKED_ASYM", "1"),
                    "ROBUQ_GLUON_SIGMA", "1")
                # a_group = 128 with the block quantizer's tensor-core rotation instead of the butterfly
                fns["W4A4+H ag128 mma"] = _with_env(fns["W4A4+H ag128"], "ROBUQ_BLOCK_QUANT_ROT", "mma")
                fns["quant only (H)"] = lambda: AQ.act_quant(x, 128, 4, True)
                # the same with the rotation on tensor cores (kernels/triton_mma_quant.py, ROBUQ_QUANT_KERNEL=mma)
                fns["quant only (H, mma)"] = _with_env(fns["quant only (H)"], "ROBUQ_QUANT_KERNEL", "mma")
            flops = 2.0 * m * n * k
            row = {"shape": name, "K": k, "N": n, "M": m, "kernel": {c: picked(layers[c], x) for c, _, _ in cols}}
            for mode in args.modes:
                tm = timer(mode)
                with torch.no_grad():
                    row[mode] = {c: tm(f) for c, f in fns.items()}
                row[mode + "_tflops"] = {c: flops / t / 1e12 for c, t in row[mode].items()}
            out["rows"].append(row)
            msg = " ".join(f"{c}={row[args.modes[0]][c] * 1e6:.1f}us" for c in fns)
            print(f"[{name} M={m}] {msg}", flush=True)
            del x, xq8
        del layers
    return out


def geomean(v):
    v = [x for x in v if x > 0]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def print_tables(res: dict, header: str):
    from tabulate import tabulate
    rows = res["rows"]
    for mode in res["modes"]:
        cols = [c for c in rows[0][mode] if c != "bf16"]
        table = []
        for r in rows:
            t = r[mode]
            line = [r["shape"], f"{r['M']}", f"{r['K']}->{r['N']}",
                    f"{r[mode + '_tflops']['bf16']:.0f}"]
            for c in cols:
                ratio = t["bf16"] / t[c]
                kern = r["kernel"].get(c, "")
                line.append(f"{ratio:.2f}x {r[mode + '_tflops'][c]:.0f}{(' ' + kern) if kern else ''}")
            table.append(line)
        for m in sorted({r["M"] for r in rows}):
            sel = [r for r in rows if r["M"] == m]
            table.append(["geomean", f"{m}", "", ""] +
                         [f"{geomean([r[mode]['bf16'] / r[mode][c] for r in sel]):.2f}x" for c in cols])
        print(f"\n{header}  [{mode}: {'CUDA-graph replay (GPU time)' if mode == 'graph' else 'eager calls'}]")
        print("cells: ratio vs bf16 (>1 faster), TFLOP/s of the 2MNK main GEMM, kernel picked (f=fp8, d=dequant);"
              " 'quant only' is the activation quantizer alone")
        print(tabulate(table, headers=["shape", "M", "K->N", "bf16 TF/s"] + cols, tablefmt="github"))


def plot(res: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped the PNG (pip install matplotlib; or --replot JSON later)"
    mode = res["modes"][0]
    rows = res["rows"]
    cols = [c for c in rows[0][mode] if c != "bf16" and not c.startswith("quant only")]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(4 * (len(shapes) + 1), 3.6), sharey=True)
    for ax, sh in zip(axes, shapes + ["geomean"]):
        for c in cols:
            ms = sorted({r["M"] for r in rows})
            if sh == "geomean":
                ys = [geomean([r[mode]["bf16"] / r[mode][c] for r in rows if r["M"] == m]) for m in ms]
            else:
                ys = [next(r[mode]["bf16"] / r[mode][c] for r in rows if r["M"] == m and r["shape"] == sh)
                      for m in ms]
            ax.plot(ms, ys, marker="o", label=c)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.95, color="r", lw=0.6, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_title(sh)
        ax.set_xlabel("M (tokens)")
    axes[0].set_ylabel("speed vs bf16 F.linear")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"robuq::qlinear on {res['gpu']} ({mode})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def overhead():
    """CPU cost per call (small M, so the loop is launch-bound): where eager time goes."""
    from robuq_fx import kernels
    from robuq_fx.kernels import quantizer as AQ, triton_fp8 as T
    dev = torch.device("cuda")
    k, n = 1152, 1152
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    x = torch.randn(16, k, device=dev, dtype=torch.bfloat16)
    mod = make_layer(dict(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128), w, None)
    a = layer_args(mod)
    q8 = torch.zeros(16, k, device=dev, dtype=torch.float8_e4m3fn)
    w8 = torch.zeros(n, k, device=dev, dtype=torch.float8_e4m3fn)
    s1, s2 = torch.ones(16, 1, device=dev), torch.ones(1, n, device=dev)

    def fp8():
        with kernels.use("triton_fp8"):
            mod(x)

    def deq():
        with kernels.use("cuda_dequant"):
            mod(x)
    fns = {"F.linear": lambda: F.linear(x, w), "_scaled_mm": lambda: torch._scaled_mm(
        q8, w8.t(), scale_a=s1, scale_b=s2, out_dtype=torch.bfloat16), "act_quant": lambda: AQ.act_quant(x, 128, 4, True),
        "registry select": lambda: kernels.select(x, a), "layer (auto)": lambda: mod(x),
        "layer triton_fp8": fp8, "layer cuda_dequant": deq,
        "fp8_qlinear direct": lambda: T.fp8_qlinear(x, a)}
    for name, f in fns.items():
        for _ in range(20):
            f()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            f()
        torch.cuda.synchronize()
        print(f"[overhead] {name}: {(time.perf_counter() - t0) / 200 * 1e6:.1f} us/call", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=MS, help="token counts M (default: %(default)s)")
    p.add_argument("--modes", nargs="+", default=["graph", "eager"], choices=["graph", "eager"],
                   help="timing modes; the first one is plotted (default: %(default)s)")
    p.add_argument("--no-extra", dest="extra", action="store_false",
                   help="skip the W1.58A2+H+LRB32 and quantizer-only columns")
    p.add_argument("--out", default=RESULTS, help="folder for bench_linear_<gpu>.json/.png (default: %(default)s)")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--write-dispatch", action="store_true",
                   help="measure triton_fp8 vs cuda_dequant per shape and M and write the dispatch table first")
    p.add_argument("--dispatch-out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                          "robuq_fx", "kernels", "dispatch_table.json"),
                   help="where --write-dispatch writes (default: robuq_fx/kernels/dispatch_table.json)")
    p.add_argument("--dispatch-m", type=int, nargs="+", default=DISPATCH_MS,
                   help="M grid for --write-dispatch (default: %(default)s)")
    p.add_argument("--dispatch-only", action="store_true", help="with --write-dispatch: skip the benchmark")
    p.add_argument("--replot", metavar="JSON", help="only redraw the PNG of an earlier JSON result")
    p.add_argument("--overhead", action="store_true", help="also print the CPU cost per call of each step")
    args = p.parse_args()

    if args.replot:
        with open(args.replot) as f:
            res = json.load(f)
        png = os.path.splitext(args.replot)[0] + ".png"
        print(plot(res, png) or f"wrote {png}")
        return
    if not torch.cuda.is_available():
        sys.exit("bench_linear.py needs a CUDA GPU")
    import triton
    from robuq_fx import kernels
    gpu = torch.cuda.get_device_name()
    header = f"GPU: {gpu} | torch {torch.__version__} | triton {triton.__version__} | " \
             f"CUDA {torch.version.cuda}"
    print(header, flush=True)
    print(kernels.table())
    if args.overhead:
        overhead()
    if args.write_dispatch:
        from _linear_dispatch import write_dispatch
        t0 = time.time()
        write_dispatch(args)
        print(f"dispatch table: {time.time() - t0:.0f} s")
        if args.dispatch_only:
            return
    res = bench(args)
    res.update(gpu=gpu, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
               modes=args.modes, shapes=SHAPES, provenance=provenance(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print_tables(res, header)
    os.makedirs(args.out, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "_" for ch in gpu).strip("_") + (f"_{args.tag}" if args.tag else "")
    base = os.path.join(args.out, f"bench_linear_{slug}")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {base}.json")
    print(plot(res, base + ".png") or f"wrote {base}.png")
    if not args.tag:
        print(f"wrote {write_summary(args.out, 'linear', summary(res))}")


def summary(res: dict) -> dict:
    """The named figures of issue 20: W4A4+H geomean vs bf16 per M (CUDA-graph replay when measured), the slowest
    shape at M = 1024, and the same for W1.58A4+H and the fp8 GEMM alone."""
    mode = "graph" if "graph" in res["modes"] else res["modes"][0]
    out = {"mode": mode}
    for col, key in (("W4A4+H", "w4a4h"), ("W1.58A4+H", "w158a4h"), ("fp8 GEMM only", "fp8gemm"),
                     ("W1.58A4+H+LRB32", "w158a4h_lrb32"), ("W1.58A4+H+LRB32 stacked", "w158a4h_lrb32_stacked"),
                     ("W1.58A4+H+LRB32 down-in-GEMM", "w158a4h_lrb32_down"),
                     ("W1.58A4+H+LRB32 stacked fused", "w158a4h_lrb32_stacked_fused"),
                     ("quant only (H)", "quant_h"), ("quant only (H, mma)", "quant_h_mma"),
                     ("W4A4+H fused ws", "w4a4h_fused_ws"), ("W1.58A4+H+LRB32 fused ws", "w158a4h_lrb32_fused_ws"),
                     ("W1.58A4asym+H", "w158a4asymh"), ("W4A4+H ag128", "w4a4h_ag128"), ("W4A4+H ag128 mma", "w4a4h_ag128_mma"),
                     ("W1.58A4+H ag128", "w158a4h_ag128"), ("W1.58A4+H+LRB96", "w158a4h_lrb96"),
                     ("W1.58A4+H+LRB96 stacked wide", "w158a4h_lrb96_stacked_wide"),
                     ("W1.58A2sigma+H+LRB32", "w158a2sigmah_lrb32"),
                     ("W1.58A2sigma+H+LRB32 stacked asym", "w158a2sigmah_lrb32_stacked_asym")):
        for m in sorted({r["M"] for r in res["rows"]}):
            sel = [r for r in res["rows"] if r["M"] == m and col in r[mode]]
            if sel:
                ratios = [r[mode]["bf16"] / r[mode][col] for r in sel]
                out[f"{key}_m{m}_x"] = round(geomean(ratios), 3)
                out[f"{key}_min_shape_m{m}_x"] = round(min(ratios), 3)
    return out


if __name__ == "__main__":
    main()
