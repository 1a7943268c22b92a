"""`python benchmarks/bench_linear.py --write-dispatch`: measure and write robuq_fx/kernels/dispatch_table.json (the
quantizer tilings, the Triton GEMM kernel and configs, the epilogue mode, and from which M the fp8 path beats the
bf16-dequant path per shape; read by robuq_fx/kernels/dispatch.py). Needs CUDA."""
from __future__ import annotations

import datetime
import json
import math
import os

import torch
import torch.nn.functional as F

from bench_linear import MS, SHAPES, _with_env, geomean, make_layer, time_graph


def time_config(fn) -> float:
    """time_graph of one kernel config, or inf where the config does not fit the GPU (shared memory, registers):
    a candidate that cannot run is not a choice, not a failed run."""
    from triton.runtime.errors import OutOfResources
    try:
        return time_graph(fn)
    except OutOfResources as e:
        print(f"  (config skipped: {e})", flush=True)
        return math.inf


def tune_quant(table: dict, ms=MS):
    """Time the activation quantizer's tilings (rows per program, warps) per K, Hadamard on/off and M bucket."""
    from robuq_fx.kernels import dispatch as D, quantizer as AQ
    dev = torch.device("cuda")
    out, gluon, mma = {}, {}, {}
    for k in sorted({k for _, k, _ in SHAPES}):
        for block in (128, 0):
            key = f"{k}/{'h' if block else 'n'}"
            out[key] = {}
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                res = []
                for bm in (1, 2, 4):
                    for warps in (1, 2, 4):
                        for chunk in (0, 128 if k <= 2048 else 512):  # one pass / two passes over chunks
                            plan = AQ.make_plan(k, block, bm, warps, chunk)
                            if plan is None or not 4 <= bm * (chunk or k) / (32 * warps) <= 160:  # values a thread
                                continue
                            tm = time_graph(lambda: AQ.act_quant(x, block, 4, True, plan=plan), 5, 5, 2)
                            res.append((tm, bm, warps, chunk))
                res.sort()
                tm, bm, warps, chunk = res[0]
                out[key][str(m)] = [bm, warps, chunk]
                gbs = m * k * 3 / tm / 1e9
                print(f"[quant {key} M={m}] best BM={bm} warps={warps} chunk={chunk}: {tm * 1e6:.1f}us "
                      f"{gbs:.0f} GB/s (bytes: 2 read + 1 written per element); top: " +
                      " ".join(f"{b}/{w}/{c}:{t * 1e6:.1f}" for t, b, w, c in res[:8]), flush=True)
                best_s = tm
                if block and os.environ.get("ROBUQ_QUANT_KERNEL") != "triton":
                    g = gluon_vs_triton(x, m, tm)
                    if g is not None:
                        gluon.setdefault(key, {})[str(m)] = g[1]
                        best_s = g[0]
                    if mma_vs(x, m, best_s):  # faster than what the table picks so far: the tensor-core rotation
                        mma.setdefault(key, {})[str(m)] = True
    table["quant"] = out
    table["quant_gluon"] = gluon
    table["quant_mma"] = mma
    D.dispatch_table()["quant"] = out  # use the tuned tilings for the rest of this run
    D.dispatch_table()["quant_gluon"] = gluon
    D.dispatch_table()["quant_mma"] = mma


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


def time_under_env(mod, x, var: str, values) -> dict:
    """CUDA-graph time of mod(x) on the triton_fp8 kernel with the environment variable `var` at each value."""
    from robuq_fx import kernels
    out = {}
    try:
        for v in values:
            os.environ[var] = v
            with kernels.use("triton_fp8"), torch.no_grad():
                out[v] = time_graph(lambda: mod(x))
    finally:
        os.environ.pop(var, None)
    return out


def tune_stacked(table: dict, ms, dev) -> None:
    """Per shape and M bucket, whether a symmetric absmax W1.58A4+H+LRB32 layer runs faster with its branch stacked
    into `_scaled_mm` (kernels/lrb_stacked.py) than in the epilogue mode the table just chose; a shape whose stacked
    output is not within 6e-3 (relative Frobenius) of the epilogue GEMM's is left out. Writes "stacked"."""
    from robuq_fx import kernels
    from robuq_fx.kernels import dispatch as D
    for name, k, n in SHAPES:
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
        b = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
        mod = make_layer(dict(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128), w, b, 32)
        picks, fused = {}, {}
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            mode = table["shapes"][f"{n}x{k}"]["epi_mode"][str(m)]
            with kernels.use("triton_fp8"), torch.no_grad():
                outs = {v: _with_env(lambda: mod(x), "ROBUQ_FP8_EPI", v)().double() for v in (mode, "stacked")}
            err = ((outs["stacked"] - outs[mode]).norm() / outs[mode].norm()).item()
            tt = time_under_env(mod, x, "ROBUQ_FP8_EPI", (mode, "stacked"))
            # and with its codes from one kernel (triton_mma_quant.py, ROBUQ_STACKED_QUANT=fused)
            os.environ["ROBUQ_STACKED_QUANT"] = "fused"
            try:
                with kernels.use("triton_fp8"), torch.no_grad():
                    out_f = _with_env(lambda: mod(x), "ROBUQ_FP8_EPI", "stacked")().double()
                err_f = ((out_f - outs[mode]).norm() / outs[mode].norm()).item()
                tf = time_under_env(mod, x, "ROBUQ_FP8_EPI", ("stacked",))["stacked"]
            except Exception as e:  # noqa: BLE001 - report, keep the two kernels
                print(f"[stacked fused {name} M={m}] failed: {type(e).__name__}: {e}", flush=True)
                err_f, tf = float("inf"), float("inf")
            finally:
                os.environ.pop("ROBUQ_STACKED_QUANT", None)
            fused_ok = err_f < 6e-3 and tf < tt["stacked"]
            best_stacked = tf if fused_ok else tt["stacked"]
            picks[str(m)] = bool(err < 6e-3 and best_stacked < tt[mode])
            fused[str(m)] = bool(picks[str(m)] and fused_ok)
            print(f"[stacked {name} M={m}] {mode} {tt[mode] * 1e6:.1f}us stacked {tt['stacked'] * 1e6:.1f}us "
                  f"(rel diff {err:.1e}), fused codes {tf * 1e6:.1f}us (rel diff {err_f:.1e})", flush=True)
        for key, val in (("stacked", picks), ("stacked_fused", fused)):
            table["shapes"][f"{n}x{k}"][key] = val
            D.dispatch_table()["shapes"][f"{n}x{k}"][key] = val


def tune_down_in_gemm(table: dict, ms, dev) -> None:
    """Per shape and M bucket where a W1.58A4+H+LRB32 layer runs the Triton epilogue GEMM (not stacked, not addmm),
    whether it is faster with the branch's down-projection inside that GEMM (ROBUQ_FP8_DOWN_IN_GEMM=1) than with
    `lrb_down`'s own launch(es); outputs must agree within 6e-3 (relative Frobenius). Writes "down_in_gemm"."""
    from robuq_fx import kernels
    from robuq_fx.kernels import dispatch as D
    var = "ROBUQ_FP8_DOWN_IN_GEMM"
    for name, k, n in SHAPES:
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
        b = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
        mod = make_layer(dict(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128), w, b, 32)
        entry = table["shapes"][f"{n}x{k}"]
        picks = {}
        for m in ms:
            if entry["epi_mode"][str(m)] != "triton" or entry.get("stacked", {}).get(str(m)):
                picks[str(m)] = False
                continue
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            with kernels.use("triton_fp8"), torch.no_grad():
                outs = {v: _with_env(lambda: mod(x), var, v)().double() for v in ("0", "1")}
            err = ((outs["1"] - outs["0"]).norm() / outs["0"].norm()).item()
            tt = time_under_env(mod, x, var, ("0", "1"))
            picks[str(m)] = bool(err < 6e-3 and tt["1"] < tt["0"])
            print(f"[down in GEMM {name} M={m}] lrb_down + GEMM {tt['0'] * 1e6:.1f}us, in the GEMM "
                  f"{tt['1'] * 1e6:.1f}us (rel diff {err:.1e})", flush=True)
        entry["down_in_gemm"] = picks
        D.dispatch_table()["shapes"][f"{n}x{k}"]["down_in_gemm"] = picks


def tune_small_m(variants, ms=(1, 16, 32, 64)) -> int:
    """Largest M at which the single-kernel small-M path (triton_qgemm_small) beats the two-kernel fp8 path on every
    shape and both variants (0: nowhere)."""
    dev = torch.device("cuda")
    best = 0
    for m in ms:
        wins = True
        for name, k, n in SHAPES:
            torch.manual_seed(0)
            w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
            b = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            for vname, kw, r in variants:
                mod = make_layer(kw, w, b, r)
                tt = time_under_env(mod, x, "ROBUQ_FP8_SMALL_M", ("64", "0"))
                print(f"[small M {name} {vname} M={m}] one kernel {tt['64'] * 1e6:.1f}us, two {tt['0'] * 1e6:.1f}us",
                      flush=True)
                wins = wins and tt["64"] < tt["0"]
        if not wins:
            break
        best = m
    print(f"single-kernel small-M path up to M = {best}")
    return best


def write_dispatch(args):
    from robuq_fx import kernels
    from robuq_fx.kernels import dispatch as D, triton_fp8 as T
    dev = torch.device("cuda")
    table = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
             "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "generated_by": "python benchmarks/bench_linear.py --write-dispatch",
             "rule": "triton_fp8 when M >= fp8_min_m (symmetric, no LRB) / epi_fp8_min_m (asymmetric or LRB), "
                     "else cuda_dequant; 'measured' holds CUDA-graph microseconds per call "
                     "(triton_fp8 / cuda_dequant / bf16 F.linear); 'quant': [rows per program, warps, "
                     "chunk (0: one pass)] of the activation quantizer per K/{h,n} and M bucket; 'quant_gluon': "
                     "[lanes, columns a thread] of the Gluon quantizer where it beat that by 3% with equal codes; "
                     "'quant_mma': where the tensor-core-rotation quantizer beat both (codes >= 99.99% equal); "
                     "'epilogue': addmm or triton; 'down_in_gemm': per M bucket, whether LRB layers on the Triton "
                     "epilogue GEMM compute the branch's down-projection in it; "
                     "'stacked': per M bucket, whether symmetric absmax LRB layers "
                     "stack the branch into _scaled_mm (lrb_stacked.py), 'stacked_fused' whether their codes come "
                     "from one kernel (triton_mma_quant.py); 'gemm_kernel': tma or "
                     "pointer (the fused-epilogue GEMM), 'tma_gemm_cfg' its config per M bucket",
             "shapes": {}}
    D.dispatch_table.cache_clear()
    D.dispatch_table().clear()

    def save_partial(stage: str) -> None:
        """each finished stage on disk at once (DISPATCH_OUT.partial): a run stopped by a time limit keeps them"""
        table["stages_done"] = table.get("stages_done", []) + [stage]
        with open(str(args.dispatch_out) + ".partial", "w") as f:
            json.dump(table, f, indent=1)
    tune_quant(table)
    save_partial("quant")
    variants = [("plain", dict(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128), 0),
                ("epi", dict(w_bits=1.58, a_bits=2, hadamard=True, hadamard_block=128), 32)]
    epi_votes, tma_votes, gluon_votes = [], [], []
    gluon_ok = True
    tma = torch.cuda.get_device_capability() >= (9, 0)
    tcfgs = T._k().TMA_GEMM_CONFIGS
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, k, n in SHAPES:
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
        b = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
        entry = {"name": name, "measured": {}}
        # Triton GEMM config per M bucket (epilogue path), GEMM alone on quantized codes
        cfgs = T._k().GEMM_CONFIGS
        wq = torch.randint(-1, 2, (n, k), device=dev).to(torch.bfloat16).to(torch.float8_e4m3fn)
        sw = torch.rand(n, device=dev) + 0.5
        cs = torch.randn(n, device=dev)
        up = torch.randn(n, 32, device=dev, dtype=torch.bfloat16)
        best, best_tma, best_gluon = {}, {}, {}
        for m in MS:
            a8 = torch.randint(0, 4, (m, k), device=dev).to(torch.bfloat16).to(torch.float8_e4m3fn)
            sx = torch.rand(m, device=dev)
            lo = torch.randn(m, device=dev)
            t = torch.randn(m, 32, device=dev, dtype=torch.bfloat16)
            y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            times = [time_config(lambda c=c: T._k().launch_fp8_gemm(a8, wq, y, sx, sw, b, lo, cs, t, up, m, c))
                     for c in cfgs]
            best[str(m)] = min(range(len(cfgs)), key=lambda i: times[i])
            print(f"[gemm cfg {name} M={m}] " + " ".join(f"{i}:{tm * 1e6:.1f}us" for i, tm in enumerate(times)),
                  flush=True)
            if tma:  # the persistent TMA-fed kernel, every config, same call
                tt = [time_config(lambda c=c: T._k().launch_fp8_gemm_tma(a8, wq, y, sx, sw, b, lo, cs, t, up, m, c,
                                                                        sms)) for c in tcfgs]
                best_tma[str(m)] = min(range(len(tcfgs)), key=lambda i: tt[i])
                tma_votes.append(min(tt) / min(times))
                print(f"[tma gemm cfg {name} M={m}] " + " ".join(f"{i}:{tm * 1e6:.1f}us" for i, tm in enumerate(tt))
                      + f"  best TMA / best pointer {min(tt) / min(times):.3f}", flush=True)
            if tma:  # the Gluon wgmma kernel: only where it computes what the pointer kernel computes
                g = gluon_gemm_times(a8, wq, sx, sw, b, lo, cs, t, up, m, cfgs[best[str(m)]], name)
                if g is not None:
                    best_gluon[str(m)] = min(range(len(g)), key=lambda i: g[i])
                    gluon_votes.append(min(g) / min(times))
                else:
                    gluon_ok = False
        entry["gemm_cfg"] = best
        if tma:
            entry["tma_gemm_cfg"] = best_tma
        if best_gluon:
            entry["gluon_gemm_cfg"] = best_gluon
        D.dispatch_table().setdefault("shapes", {})[f"{n}x{k}"] = {
            k2: entry[k2] for k2 in ("gemm_cfg", "tma_gemm_cfg", "gluon_gemm_cfg") if k2 in entry}
        table["shapes"][f"{n}x{k}"] = entry
    votes = {"pointer": 1.0}
    if tma_votes:
        votes["tma"] = geomean(tma_votes)
    if gluon_ok and gluon_votes:
        votes["gluon"] = geomean(gluon_votes)
    table["gemm_kernel"] = min(votes, key=votes.get)
    save_partial("gemm")
    D.dispatch_table()["gemm_kernel"] = table["gemm_kernel"]
    print(f"fused-epilogue GEMM: {table['gemm_kernel']} (geomean time / best pointer: "
          + ", ".join(f"{k2} {v:.3f}" for k2, v in votes.items())
          + ("" if gluon_ok else "; Gluon GEMM excluded: its output differed") + ")")
    # epilogue mode for the asym + LRB variant, per shape and M bucket, with the GEMM kernel just chosen
    for name, k, n in SHAPES:
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
        b = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
        mod = make_layer(variants[1][1], w, b, variants[1][2])
        modes = {}
        for m in MS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            tt = time_under_env(mod, x, "ROBUQ_FP8_EPI", ("addmm", "triton"))
            epi_votes.append(tt["triton"] / tt["addmm"])
            modes[str(m)] = "triton" if tt["triton"] < tt["addmm"] else "addmm"
            print(f"[epilogue {name} M={m}] addmm {tt['addmm'] * 1e6:.1f}us triton {tt['triton'] * 1e6:.1f}us",
                  flush=True)
        table["shapes"][f"{n}x{k}"]["epi_mode"] = modes
        D.dispatch_table()["shapes"][f"{n}x{k}"]["epi_mode"] = modes
    table["epilogue"] = "triton" if geomean(epi_votes) < 1 else "addmm"
    D.dispatch_table()["epilogue"] = table["epilogue"]
    print(f"epilogue mode (shapes the table does not list): {table['epilogue']}")
    save_partial("epilogue")
    tune_stacked(table, MS, dev)
    save_partial("stacked")
    tune_down_in_gemm(table, MS, dev)
    save_partial("down_in_gemm")
    table["small_m_fused_max_m"] = tune_small_m(variants)
    D.dispatch_table()["small_m_fused_max_m"] = table["small_m_fused_max_m"]
    save_partial("small_m")
    for name, k, n in SHAPES:
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
        b = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
        entry = table["shapes"][f"{n}x{k}"]
        for vname, kw, r in variants:
            mod = make_layer(kw, w, b, r)
            # the paper policy's layer kind (symmetric, rank-32 branch), for the quantize-in-GEMM kernel's branch; and
            # its sibling-fused q/k/v (rank 96), for the warp-specialized kernel's terms form
            mod_lrb = make_layer(kw, w, b, 32) if vname == "plain" and k <= 1152 else None
            mod_terms = make_layer(kw, w, b, 96) if vname == "plain" and k <= 1152 else None
            meas = {}
            for m in args.dispatch_m:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                tt = {}
                for kern in ("triton_fp8", "cuda_dequant"):
                    with kernels.use(kern), torch.no_grad():
                        tt[kern] = time_graph(lambda: mod(x))
                tt["bf16"] = time_graph(lambda: F.linear(x, w, b))
                if vname == "plain" and k <= 1152:  # the quantize-in-GEMM kernel (opt-in), where it is correct
                    fused = fused_quant_time(mod, x)
                    if fused is not None:
                        tt["fused"] = fused
                    fused = fused_quant_time(mod, x, mode="ws")  # warp-specialized (no branch)
                    if fused is not None:
                        tt["fused_ws"] = fused
                    with kernels.use("triton_fp8"), torch.no_grad():  # the branch's path without these kernels
                        tt["fp8_lrb"] = time_graph(lambda: mod_lrb(x))
                    fused = fused_quant_time(mod_lrb, x, rel_tol=5e-3)
                    if fused is not None:
                        tt["fused_lrb"] = fused
                    fused = fused_quant_time(mod_lrb, x, rel_tol=5e-3, mode="ws")  # the branch stacked in it
                    if fused is not None:
                        tt["fused_ws_lrb"] = fused
                    with kernels.use("triton_fp8"), torch.no_grad():
                        tt["fp8_terms"] = time_graph(lambda: mod_terms(x))
                    fused = fused_quant_time(mod_terms, x, rel_tol=5e-3, mode="ws")
                    if fused is not None:
                        tt["fused_ws_terms"] = fused
                meas[m] = tt
            ms = sorted(meas)
            thr = 2 ** 31
            for m in reversed(ms):
                if meas[m]["triton_fp8"] < meas[m]["cuda_dequant"]:
                    thr = m
                else:
                    break
            entry["fp8_min_m" if vname == "plain" else "epi_fp8_min_m"] = thr
            entry["measured"][vname] = {str(m): {kk: round(v * 1e6, 2) for kk, v in meas[m].items()} for m in ms}
            if vname == "plain":  # where the warp-specialized quantize-in-GEMM kernel won (correct where timed)
                for key, theirs in (("fused_ws", ("triton_fp8", "cuda_dequant")), ("fused_ws_lrb", ("fp8_lrb", )),
                                    ("fused_ws_terms", ("fp8_terms", ))):
                    picks = {str(m): bool(meas[m][key] < min(meas[m][t] for t in theirs))
                             for m in ms if key in meas[m] and all(t in meas[m] for t in theirs)}
                    if picks:
                        entry[key] = picks
                        print(f"[dispatch {name}] {key}: " + " ".join(
                            f"{m}:{meas[int(m)][key] * 1e6:.1f}us{'*' if p else ''}" for m, p in picks.items()),
                            flush=True)
            print(f"[dispatch {name} {vname}] fp8 from M >= {thr}  (M: fp8/dequant/bf16 us) " +
                  " ".join(f"{m}:{meas[m]['triton_fp8'] * 1e6:.1f}/{meas[m]['cuda_dequant'] * 1e6:.1f}"
                           f"/{meas[m]['bf16'] * 1e6:.1f}" for m in ms), flush=True)
            if any("fused" in meas[m] for m in ms):
                print(f"[dispatch {name} {vname}] quantize-in-GEMM (M: fused/fp8 us; with a rank-32 branch) " +
                      " ".join(f"{m}:{meas[m]['fused'] * 1e6:.1f}/{meas[m]['triton_fp8'] * 1e6:.1f}"
                               + (f"; {meas[m]['fused_lrb'] * 1e6:.1f}/{meas[m]['fp8_lrb'] * 1e6:.1f}"
                                  if "fused_lrb" in meas[m] else "")
                               for m in ms if "fused" in meas[m]), flush=True)
    thr = sorted(e["fp8_min_m"] for e in table["shapes"].values())
    ethr = sorted(e["epi_fp8_min_m"] for e in table["shapes"].values())
    table["default_fp8_min_m"] = thr[len(thr) // 2]
    table["default_epi_fp8_min_m"] = ethr[len(ethr) // 2]
    table.pop("stages_done", None)
    with open(args.dispatch_out, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {args.dispatch_out}")
    if os.path.exists(str(args.dispatch_out) + ".partial"):
        os.remove(str(args.dispatch_out) + ".partial")
    D.dispatch_table.cache_clear()


