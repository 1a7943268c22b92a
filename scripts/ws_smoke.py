"""First GPU check of the warp-specialized quantize-in-GEMM kernel (kernels/gluon_qgemm_ws.py): each form (no branch,
the packed rank-32 branch, the terms form at rank 96) in its own subprocess with a timeout, so that a hang (an
mbarrier phase bug) names its form and costs seconds, not the whole call. Prints, per form and M, the relative
error against the two-kernel path and both CUDA-event times.

    python scripts/ws_smoke.py [--timeout 60]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(rank: int) -> dict:
    import os

    import torch
    sys.path.insert(0, str(ROOT))
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    torch.manual_seed(rank)
    k, n = 1152, 3456
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
    b = (torch.randn(n, device="cuda") * 0.1).bfloat16()
    dn = (torch.randn(rank, k, device="cuda") * 0.05).bfloat16() if rank else None
    up = (torch.randn(n, rank, device="cuda") * 0.05).bfloat16() if rank else None
    spec = LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=rank).resolve(k, n)
    mod = PackedLinear.from_float(w, b, dn, up, spec).use_device_layout()
    out = {}
    for m in (300, 16384):
        x = torch.randn(m, k, device="cuda").bfloat16()
        times = {}
        with torch.no_grad():
            for mode in ("0", "ws"):
                os.environ["ROBUQ_FP8_FUSED_QUANT"] = mode
                y = mod(x)
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    mod(x)
                end.record()
                torch.cuda.synchronize()
                times[mode] = start.elapsed_time(end) / 20 * 1e3
                if mode == "0":
                    want = y
        err = ((y.float() - want.float()).norm() / want.float().norm()).item()
        out[m] = {"rel_err": err, "two_kernel_us": round(times["0"], 1), "ws_us": round(times["ws"], 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=int, default=60)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # the child's form
    args = ap.parse_args()
    if args.rank is not None:
        print(json.dumps(one(args.rank)))
        return
    for rank, form in ((0, "no branch"), (32, "packed rank 32"), (96, "terms rank 96")):
        try:
            r = subprocess.run([sys.executable, __file__, "--rank", str(rank)], capture_output=True, text=True,
                               timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{form}: TIMED OUT after {args.timeout} s (a hang)", flush=True)
            continue
        if r.returncode:
            print(f"{form}: failed\n{r.stderr[-3000:]}", flush=True)
            continue
        print(f"{form}: {r.stdout.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
