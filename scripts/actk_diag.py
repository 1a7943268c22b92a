"""Which side moves when a compiled QAT step with ROBUQ_QAT_ACT_KERNEL=1 differs from the op graph (GPU; session 22's
first run: compiled kernel vs compiled op graph, y 1.2-1.9% apart, where eager the two agreed).

One W1.58A4+H QATLinear (rank 32 and 0) + GELU + an FP head, bf16 autocast, `weight_sides_per_forward`; the first
step's output of five runs: the op graph eager / compiled, the kernel eager / compiled, `act_side_reference` eager.
Prints each one's relative distance to the eager op graph. Usage: python scripts/actk_diag.py
"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import robuq_fx  # noqa: E402
from robuq_fx.kernels import qat_act  # noqa: E402
from robuq_fx.qat_linear import QATLinear  # noqa: E402
from robuq_fx.spec import LayerSpec  # noqa: E402


def first_output(base, x, kernel: str, compiled: bool):
    os.environ["ROBUQ_QAT_ACT_KERNEL"] = "0" if kernel == "graph" else "1"
    real = qat_act.act_side
    if kernel == "reference":
        qat_act.act_side = qat_act.act_side_reference
    try:
        mod = copy.deepcopy(base)
        robuq_fx.weight_sides_per_forward(mod)
        torch._dynamo.reset()
        fn = torch.compile(mod) if compiled else mod
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        return y.detach().float()
    finally:
        qat_act.act_side = real
        torch._dynamo.reset()


def main():
    rows = []
    for rank in (32, 0):
        torch.manual_seed(3)
        spec = LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=rank).resolve(256, 384)
        base = nn.Sequential(QATLinear.from_module(nn.Linear(256, 384), spec), nn.GELU(),
                             nn.Linear(384, 64)).cuda()
        x = torch.randn(4, 33, 256, device="cuda")
        want = first_output(base, x, "graph", False)
        for kernel, compiled in (("graph", True), ("kernel", False), ("kernel", True), ("reference", False)):
            y = first_output(base, x, kernel, compiled)
            rows.append({"rank": rank, "run": f"{kernel} {'compiled' if compiled else 'eager'}",
                         "y_rel_vs_eager_graph": float((y - want).norm() / want.norm())})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
