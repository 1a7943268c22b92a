"""Where the warp-specialized quantize-in-GEMM kernel's time goes (kernels/gluon_qgemm_ws.py), against the two-kernel
path's pieces, all timed from CUDA-graph replays (no host overhead):

- "quant": the activation quantizer kernel alone (act_quant), "gemm": `_scaled_mm` on the codes alone, "two-kernel":
  the layer's eager path with ROBUQ_FP8_FUSED_QUANT=0, "v0": the single-partition Gluon kernel (=1), "ws": the
  warp-specialized kernel, launched directly;
- ws at N = 64 (one N tile: the time is the quantizer partition's, the MMA partition has one tile an item) and at
  N = 3456 with half the programs (how the time scales with SMs);

    python scripts/ws_diag.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--ms", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    args = ap.parse_args()
    from bench_linear import time_graph
    from tabulate import tabulate

    from robuq_fx.kernels import gluon_qgemm_ws as WS
    from robuq_fx.kernels.quantizer import _hscale, act_quant
    from robuq_fx.kernels.registry import QLinearArgs
    from robuq_fx.kernels.triton_fp8 import _scaled_mm
    from robuq_fx.kernels.weight_cache import _fp8_weights
    from robuq_fx.modules import PackedLinear
    from robuq_fx.spec import LayerSpec
    torch.manual_seed(0)
    k = 1152
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = []
    for n in (64, 3456):
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
        spec = LayerSpec(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128).resolve(k, n)
        mod = PackedLinear.from_float(w, None, None, None, spec).use_device_layout()
        a = QLinearArgs(mod.qweight, mod.w_scale, mod.bias, None, None, *mod.op_args())
        e = _fp8_weights(a)
        for m in args.ms:
            x = torch.randn(m, k, device="cuda").bfloat16()
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            hs = _hscale(128, x.dtype)
            t = {}
            codes, sx, _ = act_quant(x, 128, 4, True)
            t["quant"] = time_graph(lambda: act_quant(x, 128, 4, True))
            t["gemm"] = time_graph(lambda: _scaled_mm(codes, e.fp8, sx, e.sw, None))
            with torch.no_grad():
                for mode, name in (("0", "two-kernel"), ("1", "v0")):
                    os.environ["ROBUQ_FP8_FUSED_QUANT"] = mode
                    try:
                        t[name] = time_graph(lambda: mod(x))
                    except Exception as ex:  # noqa: BLE001 (a mode that cannot take the shape)
                        t[name] = float("nan")
                        print(f"{name} N={n} M={m}: {type(ex).__name__}: {str(ex)[:200]}")
            for cfg in (WS.CONFIGS if n > 64 else WS.CONFIGS[1:]):
                t[f"ws{cfg[:2]}"] = time_graph(lambda: WS.launch_qgemm_ws(x, e.fp8, y, e.sw, None, hs, 7.0, cfg=cfg))
            if n > 64 and m >= 4096:
                t["ws half SMs"] = time_graph(lambda: WS.launch_qgemm_ws(x, e.fp8, y, e.sw, None, hs, 7.0,
                                                                         sms=sms // 2))
            row = {"N": n, "M": m, **{kk: round(v * 1e6, 1) for kk, v in t.items()}}
            res.append(row)
            print(row, flush=True)
    keys = sorted({kk for r in res for kk in r} - {"N", "M"}, key=lambda s: (not s.startswith(("N", "M")), s))
    print(tabulate([[r["N"], r["M"]] + [r.get(kk, "") for kk in keys] for r in res], ["N", "M"] + keys,
                   tablefmt="github"))
    print(torch.cuda.get_device_name(), torch.__version__, "(us per call, CUDA-graph replays; K = 1152)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ws_diag.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(),
                                                             "torch": torch.__version__, "rows": res}, indent=1))


if __name__ == "__main__":
    main()
