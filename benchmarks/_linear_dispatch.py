"""`python benchmarks/bench_linear.py --write-dispatch`: measure and write robuq_fx/kernels/dispatch_table.json (the
quantizer tilings, the Triton GEMM kernel and configs, the epilogue mode, and from which M the fp8 path beats the
bf16-dequant path per shape; read by robuq_fx/kernels/dispatch.py). Needs CUDA."""
from __future__ import annotations

import datetime
import json
import os

import torch
import torch.nn.functional as F

from bench_linear import MS, SHAPES, _with_env, geomean, make_layer, time_graph
from _linear_variants import fused_quant_time, gluon_gemm_times, gluon_vs_triton, mma_vs, time_config


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
    if "attention" in D.dispatch_table():  # bench_attention --write-dispatch's key, not measured here: kept
        table["attention"] = D.dispatch_table()["attention"]
    with open(args.dispatch_out, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {args.dispatch_out}")
    if os.path.exists(str(args.dispatch_out) + ".partial"):
        os.remove(str(args.dispatch_out) + ".partial")
    D.dispatch_table.cache_clear()


