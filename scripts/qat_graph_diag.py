"""Where ROBUQ_QAT_WEIGHT_GRAPH=1 (robuq_fx/qat_graph.py) breaks on a GPU: a few DiT-shaped QAT layers per weight
format, trained 3 AdamW steps under bf16 autocast with and without the graphs. Prints, per setting: whether every
capture succeeded (a failed one with its full traceback), whether outputs and gradients are bit-equal, whether the
CUDA generator still draws afterwards, and the step time both ways.

    python scripts/qat_graph_diag.py            (on a CUDA machine; writes to stdout)
"""
from __future__ import annotations

import copy
import time
import traceback
import warnings

import torch

from robuq_fx import qat_graph
from robuq_fx.qat_linear import QATLinear
from robuq_fx.spec import LayerSpec

SETTINGS = {
    "W4A4+H": dict(w_bits=4, a_bits=4, hadamard=True),
    "W1.58A4+H": dict(w_bits=1.58, a_bits=4, hadamard=True),
    "W4A4+H+LRB32": dict(w_bits=4, a_bits=4, hadamard=True, lora_rank=32),
    "W1.58A4+H+LRB32": dict(w_bits=1.58, a_bits=4, hadamard=True, lora_rank=32),
}


def model(spec: dict, k: int = 1152, n: int = 1152) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [QATLinear.from_module(torch.nn.Linear(k, n), LayerSpec(**spec).resolve(k, n)) for _ in range(3)]
    return torch.nn.Sequential(layers[0], torch.nn.GELU(), layers[1], torch.nn.GELU(), layers[2]).cuda()


def train(mod, x, steps=3):
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-3)
    outs, times = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = mod(x)
        y.float().pow(2).mean().backward()
        outs.append((y.detach().clone(), {n: p.grad.clone() for n, p in mod.named_parameters()}))
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return outs, times


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name())
    x = torch.randn(8, 256, 1152).cuda()
    for mode, name in [(m, s) for m in ("thread_local", "relaxed") for s in SETTINGS]:
        spec = SETTINGS[name]
        be = qat_graph.CudaGraphs(mode)
        real_capture = be.capture

        def capture(fn, device, autocast_dtype, real_capture=real_capture):
            try:
                return real_capture(fn, device, autocast_dtype)
            except Exception:
                print("CAPTURE FAILED:\n" + traceback.format_exc()[-3000:])
                raise
        be.capture = capture
        qat_graph._BACKEND[0] = be
        print(f"== {name} (capture mode {mode})")
        qat_graph.clear()
        base = model(spec)
        qat_graph.ENABLED[0] = False
        try:
            want, t_plain = train(copy.deepcopy(base), x)
            qat_graph.ENABLED[0] = True
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                kept = copy.deepcopy(base)  # alive while its graphs are listed (they go with the model)
                got, t_graph = train(kept, x, steps=5)
            for w in caught:
                print("  warning:", str(w.message)[:300])
            diffs = []
            for i, ((ya, ga), (yb, gb)) in enumerate(zip(got, want)):
                if not torch.equal(ya, yb):
                    diffs.append(f"step {i} output max|d|={float((ya.float() - yb.float()).abs().max()):.3g}")
                for k in ga:
                    if not torch.equal(ga[k], gb[k]):
                        diffs.append(f"step {i} grad {k} max|d|={float((ga[k] - gb[k]).abs().max()):.3g}")
            for label, table in (("weight side", qat_graph._FORWARD), ("weight grads", qat_graph._GRADS),
                                 ("layer forward", qat_graph._LAYER_FORWARD),
                                 ("layer backward", qat_graph._LAYER_BACKWARD)):
                print(f"  {label} graphs (kept, captures, off): "
                      f"{[(len(o.graphs), o.captures, o.off) for o in table.values()]}")
            print(f"  bit-equal: {not diffs}" + ("" if not diffs else "  " + "; ".join(diffs[:8])))
            print(f"  step ms plain {[round(t * 1e3, 2) for t in t_plain]} graph {[round(t * 1e3, 2) for t in t_graph]}")
        except Exception:
            print("  FAILED:\n" + traceback.format_exc())
        try:
            torch.rand(1, device="cuda")
            print("  generator draws: yes")
        except Exception as e:  # noqa: BLE001
            print(f"  generator draws: NO ({e})")
    qat_graph.ENABLED[0] = False


if __name__ == "__main__":
    main()
