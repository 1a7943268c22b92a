"""Why the compiled QAT step under CUDA graphs (torch.compile mode="reduce-overhead") is slow: per-step wall times of
a 4-block DiT-XL/2-wide model, FP and W4A4+H, with quantize's automatic weight-side hooks on and off
(ROBUQ_QAT_STEP_WEIGHTS), and the cudagraph trees' own counters (re-recordings, skips).

    TORCH_LOGS=cudagraphs,recompiles python scripts/cg_train_diag.py [--layers 4] [--steps 8]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import robuq_fx  # noqa: E402
from _dit_setup import XL2, build, inputs  # noqa: E402


def run(cfg, pol, steps, mode):
    m = build(cfg).cuda().train()
    if pol is not None:
        m = robuq_fx.quantize(m, pol, example_inputs=inputs(cfg, 2, "cuda")).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x = inputs(cfg, 16, "cuda")
    fwd = torch.compile(m, mode=mode)
    target = None
    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fwd(**x)[0]
        if target is None:
            target = torch.randn_like(out.detach().float())
        loss = (out.float() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    torch._dynamo.reset()
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--mode", default="reduce-overhead")
    args = ap.parse_args()
    cfg = dict(XL2, num_layers=args.layers)
    rows = [("FP", None, "1"), ("W4A4+H hooks", "dit", "1"), ("W4A4+H per layer", "dit", "0")]
    for name, pol, sw in rows:
        os.environ["ROBUQ_QAT_STEP_WEIGHTS"] = sw
        from torch._dynamo.utils import counters
        counters.clear()
        t = run(cfg, pol, args.steps, args.mode)
        print(f"{name:20s} {args.mode}: steps ms " + " ".join(f"{v:.1f}" for v in t), flush=True)
        print(f"    counters: { {k: dict(v) for k, v in counters.items() if k in ('inductor', 'stats', 'graph_break')} }",
              flush=True)


if __name__ == "__main__":
    main()
