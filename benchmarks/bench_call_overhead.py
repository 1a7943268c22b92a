"""CPU cost of one eager robuq::qlinear call and of its parts, against bf16 `F.linear` in the same run.

M = 16 rows (launch-bound: the GPU work is a few microseconds, so wall time per call is CPU time), W4A4 + Hadamard
128, 1152 x 1152, bf16. Each row: microseconds per call over 3000 back-to-back calls (after 50 warm-up calls and a
synchronize), and the ratio to `F.linear`. Prints a table, writes JSON beside.

    python benchmarks/bench_call_overhead.py [--out benchmarks/results]      (needs CUDA)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _provenance import provenance  # noqa: E402
from robuq_fx.kernels import registry as R  # noqa: E402
from robuq_fx.kernels import triton_act_quant as A  # noqa: E402
from robuq_fx.kernels import quantizer as AQ  # noqa: E402
from robuq_fx.kernels import triton_fp8 as T  # noqa: E402
from robuq_fx.kernels.qlinear import qlinear_impl  # noqa: E402
from robuq_fx.modules import PackedLinear  # noqa: E402
from robuq_fx.spec import LayerSpec  # noqa: E402


def per_call_us(fn, n: int = 3000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile 2000 fp8-layout module calls (writes call_overhead_profile.txt)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_call_overhead needs a CUDA device")
    torch.manual_seed(0)
    k = n = 1152
    m = 16
    lin = torch.nn.Linear(k, n).cuda().to(torch.bfloat16)
    pl = PackedLinear.from_float(lin.weight, lin.bias, None, None,
                                 LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qa = R.QLinearArgs(pl.qweight, pl.w_scale, pl.bias, None, None, *pl.op_args())
    pl8 = PackedLinear.from_float(lin.weight, lin.bias, None, None,
                                  LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128)).set_layout("fp8")
    out = torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn)
    sc, lo = torch.empty(m, device="cuda"), torch.empty(m, device="cuda")
    plan = AQ.quant_plan(k, 128, m)
    codes, sx, _ = AQ.act_quant(x, 128, 4, True, m_store=m)
    w8 = torch.randint(-7, 8, (n, k), device="cuda").to(torch.bfloat16).to(torch.float8_e4m3fn)
    sw = torch.rand(n, device="cuda")
    with torch.no_grad():
        pl8(x)  # makes the module's plan and its bound call
    plans = list(pl8.__dict__.get("_direct_plans", {}).values())
    qa8 = plans[0][1] if plans else R.QLinearArgs(pl8.qweight, pl8.w_scale, pl8.bias, None, None, *pl8.op_args())
    bound = plans[0][2] if plans and plans[0][2] is not None else None
    if bound is None:
        print("note: the fp8-layout module call has no bound call (kernels/fastcall.py did not bind it): "
              "its row times the unbound path", flush=True)
        bound = lambda t: T._fp8_qlinear(t, qa8)  # noqa: E731
    rows = [
        ("bf16 F.linear (baseline)", lambda: F.linear(x, lin.weight, lin.bias)),
        ("PackedLinear call (dispatch: " + R.select(x, qa).name + ")", lambda: pl(x)),
        ("PackedLinear call, fp8 layout (eager fast path)", lambda: pl8(x)),
        ("PackedLinear call, fp8 layout, one-kernel small-M path", lambda: pl8(x), {"ROBUQ_FP8_SMALL_M": "64"}),
        ("  its bound call alone (kernels/fastcall.py)", lambda: bound(x)),
        ("  triton_fp8 unbound (_fp8_qlinear)", lambda: T._fp8_qlinear(x, qa8)),
        ("torch.ops.robuq.qlinear", lambda: torch.ops.robuq.qlinear(x, pl.qweight, pl.w_scale, pl.bias, None, None,
                                                                     *pl.op_args())),
        ("its Python implementation (no dispatcher)", lambda: qlinear_impl(x, pl.qweight, pl.w_scale, pl.bias, None,
                                                                            None, *pl.op_args())),
        ("registry select()", lambda: R.select(x, qa)),
        ("cuda_dequant function", lambda: T.dequant_qlinear(x, qa)),
        ("triton_fp8 function", lambda: T.fp8_qlinear(x, qa)),
        ("act_quant()", lambda: AQ.act_quant(x, 128, 4, True)),
        ("quantizer launch, outputs preallocated", lambda: A.launch_act_quant(x, out, sc, lo, m, m, 0.0884, 7.0, 0.0,
                                                                              128, plan, True, False)),
        ("bare torch._scaled_mm", lambda: T._scaled_mm(codes, w8, sx, sw, None)),
    ]
    res = []
    with torch.no_grad():
        for name, fn, *env in rows:
            os.environ.update(env[0] if env else {})
            try:
                res.append((name, per_call_us(fn)))
            finally:
                for var in (env[0] if env else {}):
                    os.environ.pop(var)
    if args.profile:  # where the module call's CPU time goes, function by function
        import cProfile
        import io
        import pstats
        pr = cProfile.Profile()
        # the rows above changed the dispatch environment (the small-M row), which let both bindings go for good:
        # a fresh plan and weight cache, so that the profile times the bound call the first row timed
        from robuq_fx.kernels.weight_cache import clear_caches
        pl8.__dict__.pop("_direct_plans", None)
        clear_caches()
        with torch.no_grad():
            pl8(x)
            held = [p[2] is not None for p in pl8.__dict__.get("_direct_plans", {}).values()]
            print(f"profiled module call bound (kernels/fastcall.py): {all(held) and bool(held)}", flush=True)
            pr.enable()
            for _ in range(2000):
                pl8(x)
            pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
        text = buf.getvalue()
        print(text)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "call_overhead_profile.txt"), "w") as f:
            f.write(text)
    base = res[0][1]
    gpu = torch.cuda.get_device_name()
    import triton
    print(f"GPU: {gpu} | torch {torch.__version__} | triton {triton.__version__} | M={m}, K=N={k}, W4A4+H128 bf16")
    print(tabulate([(nm, f"{us:.1f}", f"{us / base:.2f}") for nm, us in res],
                   headers=["call", "us per call (CPU)", "x F.linear"], tablefmt="github"))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_call_overhead_{gpu.replace(' ', '_')}.json")
    with open(path, "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, provenance=provenance(), m=m, k=k, n=n,
                       us_per_call=dict(res)), f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
