"""The opt-in alternative kernels `bench_linear.py --write-dispatch` (_linear_dispatch.py) times against the shipped
ones before the table may pick them: the Gluon quantizer and GEMM, the tensor-core-rotation quantizer, quantization
fused into the GEMM (plain and warp-specialized); and `time_config`, a config timing that skips what does not fit."""
from __future__ import annotations

import math
import os

import torch

from bench_linear import _with_env, time_graph


def time_config(fn) -> float:
    """time_graph of one kernel config, or inf where the config does not fit the GPU (shared memory, registers):
    a candidate that cannot run is not a choice, not a failed run."""
    from triton.runtime.errors import OutOfResources
    try:
        return time_graph(fn)
    except OutOfResources as e:
        print(f"  (config skipped: {e})", flush=True)
        return math.inf


def mma_vs(x, m: int, best_s: float) -> bool:
    """The tensor-core-rotation quantizer (kernels/triton_mma_quant.py) on the same call: faster than best_s (the
    table's choice so far) with codes equal to the Triton kernel's but for rare ties (>= 99.99%; the rotation's fp32
    sums run in another order) and scales within 1e-6?"""
    from robuq_fx.kernels import quantizer as AQ
    k = x.shape[1]
    want = AQ.act_quant(x, 128, 4, True, m_store=m, plan=AQ.quant_plan(k, 128, m))
    mma = _with_env(lambda: AQ.act_quant(x, 128, 4, True, m_store=m), "ROBUQ_QUANT_KERNEL", "mma")
    try:
        got = mma()
        agree = (got[0].float() == want[0].float()).float().mean().item()
        scales = torch.allclose(got[1], want[1], rtol=1e-6, atol=0)
        tg = time_graph(mma, 5, 5, 2)
    except Exception as e:  # noqa: BLE001 - report, keep the table's choice
        print(f"[quant mma K={k} M={m}] failed: {type(e).__name__}: {e}", flush=True)
        return False
    print(f"[quant mma K={k} M={m}] {tg * 1e6:.1f}us, {tg / best_s:.2f}x the table's choice; codes agree "
          f"{agree:.5f}, scales {'equal' if scales else 'DIFFER'}", flush=True)
    return agree >= 0.9999 and scales and tg < best_s


def fused_quant_time(mod, x, rel_tol: float | None = None, mode: str = "1") -> float | None:
    """CUDA-graph time of mod(x) with ROBUQ_FP8_FUSED_QUANT=mode ("1": kernels/gluon_qgemm.py, "ws": its
    warp-specialized form, gluon_qgemm_ws.py), or None where it fails or its
    output is not the two-kernel path's (>= 99.9% equal, the rest within a bf16 ulp; with rel_tol, a layer with a
    branch, whose t the two paths round differently: relative Frobenius error <= rel_tol)."""
    from robuq_fx import kernels
    try:
        with kernels.use("triton_fp8"), torch.no_grad():
            want = mod(x)
            os.environ["ROBUQ_FP8_FUSED_QUANT"] = mode
            got = mod(x)
            if rel_tol is not None:
                ok = ((got.float() - want.float()).norm() / want.float().norm()).item() <= rel_tol
            else:
                ok = bool(((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all()) \
                    and (got == want).float().mean().item() >= 0.999
            if not ok:
                print(f"[quantize-in-GEMM {mode} M={x.shape[0]} K={x.shape[1]}] output differs from the two-kernel "
                      "path's", flush=True)
                return None
            return time_graph(lambda: mod(x))
    except Exception as e:  # noqa: BLE001 - report; the two-kernel path stays
        print(f"[quantize-in-GEMM {mode} M={x.shape[0]} K={x.shape[1]}] failed: {type(e).__name__}: {e}", flush=True)
        return None
    finally:
        os.environ.pop("ROBUQ_FP8_FUSED_QUANT", None)


def gluon_gemm_times(a8, wq, sx, sw, b, lo, cs, t, up, m: int, ptr_cfg, name: str) -> list | None:
    """Times of every Gluon GEMM config (kernels/gluon_fp8_gemm.py) on this call, or None where its output is not the
    pointer kernel's (>= 99.9% equal, every element within one bf16 ulp): then it must not be dispatched to."""
    from robuq_fx.kernels import triton_fp8 as T
    try:
        from robuq_fx.kernels import gluon_fp8_gemm as GG
        n = wq.shape[0]
        want = torch.empty(m, n, device=a8.device, dtype=torch.bfloat16)
        T._k().launch_fp8_gemm(a8, wq, want, sx, sw, b, lo, cs, t, up, m, ptr_cfg)
        out, times = torch.empty_like(want), []
        for c in GG.CONFIGS:
            out.fill_(float("nan"))
            try:
                GG.launch_fp8_gemm_gluon(a8, wq, out, sx, sw, b, lo, cs, t, up, m, c)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory on this GPU: skip the config
                print(f"[gluon gemm cfg {name} M={m}] config {c} skipped: {type(e).__name__}: {e}", flush=True)
                times.append(math.inf)
                continue
            ok = bool(((out.float() - want.float()).abs() <= want.float().abs() * 2 ** -7).all()) \
                and (out == want).float().mean().item() >= 0.999
            if not ok:
                print(f"[gluon gemm cfg {name} M={m}] config {c}: output differs from the pointer kernel's",
                      flush=True)
                return None
            times.append(time_config(lambda c=c: GG.launch_fp8_gemm_gluon(a8, wq, out, sx, sw, b, lo, cs, t, up, m,
                                                                          c)))
        print(f"[gluon gemm cfg {name} M={m}] " + " ".join(f"{i}:{tm * 1e6:.1f}us" for i, tm in enumerate(times)),
              flush=True)
    except Exception as e:  # noqa: BLE001 - report; the Triton kernels stay
        print(f"[gluon gemm cfg {name} M={m}] failed: {type(e).__name__}: {e}", flush=True)
        return None
    return times if any(tm < math.inf for tm in times) else None


GLUON_MARGIN = 0.97  # the Gluon quantizer is dispatched to where it takes at most this share of the Triton time


def gluon_vs_triton(x, m: int, triton_s: float) -> tuple | None:
    """The Gluon quantizer (kernels/gluon_act_quant.py) on the same call, for each of its tilings (lanes a row,
    columns a thread): time against the Triton kernel's best tiling, and whether codes, scales and offsets equal the
    Triton kernel's. Returns (its time, [lanes, max columns a thread]) of the fastest tiling with equal outputs where
    it takes at most GLUON_MARGIN of the Triton time (the table's "quant_gluon" entry: dispatched to), else None."""
    from robuq_fx.kernels import gluon_act_quant as G, quantizer as AQ
    from robuq_fx.kernels.triton_launch import launch
    k = x.shape[1]
    want = AQ.act_quant(x, 128, 4, True, m_store=m, plan=AQ.quant_plan(k, 128, m))  # a plan: the Triton kernel
    hs, lv = AQ._hscale(128, x.dtype), 7.0
    best = None
    for lanes, max_vt in ((32, 32), (32, 64), (16, 64)):
        plan = G.gluon_plan(k, lanes, max_vt=max_vt)
        if plan is None or (max_vt == 64 and plan == G.gluon_plan(k, lanes)):
            continue
        out = torch.empty_like(want[0])
        sc, lo = torch.empty_like(want[1]), torch.empty_like(want[2])
        try:
            def run():
                launch(*G.act_quant_gluon_launch(x, out, sc, lo, m, m, hs, lv, 0.0, True, plan))
            run()
            same = all(torch.equal(u.float(), v.float()) for u, v in zip((out, sc, lo), want))
            tg = time_graph(run, 5, 5, 2)
            print(f"[quant gluon K={k} M={m} plan={plan}] {tg * 1e6:.1f}us ({m * k * 3 / tg / 1e9:.0f} GB/s), "
                  f"{tg / triton_s:.2f}x the Triton kernel's time; codes, scales equal: {same}", flush=True)
            if same and tg <= GLUON_MARGIN * triton_s and (best is None or tg < best[0]):
                best = (tg, [lanes, max_vt])
        except Exception as e:  # noqa: BLE001 - report, keep measuring the rest
            print(f"[quant gluon K={k} M={m} plan={plan}] failed: {type(e).__name__}: {e}", flush=True)
    return best
