"""Offline SASS statistics of the activation quantizers and the Gluon GEMM for sm_90 (no GPU needed; triton with
Gluon and its cuobjdump): the figures docs/gpu.md quotes (instructions an element, registers, shuffles, spills).

    PYTHONPATH=. python scripts/sass_stats.py
"""
from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.kernels.sm90 import compile_sm90, sass  # noqa: E402

QUANT_SIG = {"x_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "lo_ptr": "*fp32", "M": "i32",
             "M_STORE": "i32", "stride_xm": "i32", "stride_om": "i32", "hscale": "fp32", "levels": "fp32",
             "clip_c": "fp32"}
ALIGNED = ("x_ptr", "out_ptr", "scale_ptr", "lo_ptr", "stride_xm", "stride_om")


def stats(text: str) -> collections.Counter:
    return collections.Counter(o.split(".")[0] for o in
                               re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", text, re.M))


def row(name: str, kernel, per_thread: float) -> None:
    text, regs = sass(kernel)
    c = stats(text)
    n = sum(c.values())
    print(f"{name:48s} {n / per_thread:5.1f} SASS an element  regs {regs:3d}  SHFL {c['SHFL'] / per_thread:4.2f}  "
          f"LDG {c['LDG'] / per_thread:4.2f}  STG {c['STG'] / per_thread:4.2f}  spills(STL) {c['STL']}")


def main() -> None:
    from robuq_fx.kernels import gluon_act_quant as G, triton_act_quant as A
    x = torch.empty(4, 1152, dtype=torch.bfloat16)
    for k, widths, warps in ((1152, (1024, 128), 1), (4608, (4096, 512), 1)):
        const = dict(W0=widths[0], W1=widths[1], W2=0, W3=0, BM=1, B=128, LOGB=7, HAD=True, SYM=True, DEQUANT=False,
                     HAS_SHIFT=False, CHUNK=0, SIGMA=False, ACT=0)
        kern = compile_sm90(A.act_quant_bfly_kernel, QUANT_SIG, const, {"num_warps": warps}, ALIGNED, gluon=False)
        row(f"Triton quantizer K={k} (1 row, {warps} warp)", kern, k / (32 * warps))
    for k, lanes, max_vt in ((1152, 32, 32), (1152, 16, 64), (4608, 32, 32), (4608, 32, 64)):
        plan = G.gluon_plan(k, lanes, max_vt=max_vt)
        x = torch.empty(4, k, dtype=torch.bfloat16)
        spec = G.act_quant_gluon_launch(x, torch.empty(4, k), x, x, 4, 4, 0.0884, 7.0, False, True, plan)
        sig = {n: v for n, v in QUANT_SIG.items() if n != "clip_c"}
        kern = compile_sm90(G.act_quant_gluon_kernel, sig, spec[3], spec[4], ALIGNED)
        rows = (32 // plan[2]) * plan[4]
        row(f"Gluon quantizer K={k} plan {plan}", kern, rows * k / (32 * spec[4]["num_warps"]))


if __name__ == "__main__":
    main()
