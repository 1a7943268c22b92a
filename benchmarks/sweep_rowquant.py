#!/usr/bin/env python
"""Tiling sweep of the per-row fake-quant kernel (kernels/triton_rowquant.py) on the attention's q (DiT-XL/2, batch
64: 262144 rows of 72, bf16, (b, h, s, d) view of (b, s, h, d) memory) and on linear-layer rows (16384 x 1152):
microseconds by CUDA-graph replay and effective bandwidth (bytes read + written)."""
import itertools
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from bench_linear import time_graph  # noqa: E402

from robuq_fx.kernels import triton_rowquant as R  # noqa: E402

cases = {"q (64,16,256,72) perm": torch.randn(64, 256, 16, 72, device="cuda", dtype=torch.bfloat16).transpose(1, 2),
         "x (16384,1152)": torch.randn(16384, 1152, device="cuda", dtype=torch.bfloat16)}
for name, x in cases.items():
    nbytes = 2 * x.numel() * x.element_size()
    copy = time_graph(lambda: x.clone())
    print(f"{name}: clone {copy * 1e6:.1f} us ({nbytes / copy / 1e12:.2f} TB/s)")
    for r, w in itertools.product((1, 2, 4, 8, 16, 32, 64), (1, 2, 4, 8)):
        os.environ["ROBUQ_ROWQ_TILING"] = f"{r},{w}"
        try:
            t = time_graph(lambda: R.fake_quant_rows(x, 8, True, keep_layout=True))
        except Exception as e:  # noqa: BLE001
            print(f"  rows {r:2d} warps {w}: failed {type(e).__name__}")
            continue
        print(f"  rows {r:2d} warps {w}: {t * 1e6:7.1f} us  {nbytes / t / 1e12:.2f} TB/s", flush=True)
    os.environ.pop("ROBUQ_ROWQ_TILING")
    t = time_graph(lambda: R.fake_quant_rows(x, 8, True, keep_layout=True))
    print(f"  default {R._tiling(x.shape[-1])}: {t * 1e6:.1f} us  {nbytes / t / 1e12:.2f} TB/s")
