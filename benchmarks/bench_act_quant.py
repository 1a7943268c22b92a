"""Activation quantizer micro-benchmark: butterfly kernel (triton_bfly_kernels, BM rows x warps swept) vs the
tensor-core kernel then shipped (act_quant_kernel with its table tiling); codes checked equal first. Run:
    OUT=benchmarks/results python benchmarks/bench_act_quant.py
"""
import json, math, os, sys, time
import torch
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from bench_linear import time_graph  # noqa
from robuq_fx.kernels import triton_fp8 as T  # noqa
from robuq_fx.kernels import triton_bfly_kernels as B  # noqa
from robuq_fx.hadamard import block_hadamard  # noqa
from robuq_fx import quantizers as Q  # noqa

OUT = os.environ.get("OUT", "/tmp")
print(torch.cuda.get_device_name(), torch.__version__, flush=True)

def bfly(x, block, bm, w, a_bits=4, sym=True, dequant=False, m_store=None):
    m, k = x.shape
    m_store = m if m_store is None else m_store
    out = torch.empty(m_store, k, device=x.device, dtype=x.dtype if dequant else torch.float8_e4m3fn)
    s = torch.empty(m_store, device=x.device); lo = torch.empty(m_store, device=x.device)
    qmax = float(2 ** (a_bits - 1) - 1) if sym else float(2 ** a_bits - 1)
    levels, qmin = (qmax, -qmax) if sym else (qmax, 0.0)
    B.launch_act_quant_bfly(x, out, s, lo, m, m_store, T._hscale(block, x.dtype), levels, qmin, qmax, 0.0, block,
                            bm, w, sym, dequant)
    return out, s, lo

# correctness first
t0 = time.time()
torch.manual_seed(0)
bad = 0
for k in (1152, 4608):
    for block in (0, 32, 128):
        m = 1000
        x = torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 3
        x[:, 5] *= 20; x[3] = 0; x[4] = 0.75
        x[7, :] = torch.arange(k, device="cuda") % 15 - 7.0   # integer row: many exact ties
        x = x.to(torch.bfloat16)
        for a_bits, sym in ((4, True), (3, True), (2, False), (4, False), (1, False)):
            ref_o, ref_s, ref_lo = T.act_quant(x, block, a_bits, sym, m_store=m + 3)
            xc = block_hadamard(x.cpu(), block) if block else x.cpu()
            rq, rs, _ = Q.quantize_act(xc, a_bits, sym)
            for bm, w in ((1, 4), (2, 4), (4, 8)):
                o, s, lo = bfly(x, block, bm, w, a_bits, sym, m_store=m + 3)
                same_old = (o.float() == ref_o.float()).float().mean().item()
                same_cpu = (o[:m].float().cpu() == rq).float().mean().item()
                ok = same_old == 1.0 and torch.equal(s, ref_s) and (sym or torch.equal(lo, ref_lo))
                if not ok or same_cpu < 0.999:
                    bad += 1
                    print(f"MISMATCH k={k} b={block} A{a_bits} sym={sym} bm={bm} w={w}: vs old {same_old:.6f} "
                          f"scale eq {torch.equal(s, ref_s)} vs cpu {same_cpu:.6f}", flush=True)
            od, _, _ = bfly(x, block, 2, 4, a_bits, sym, dequant=True)
            rd, _, _ = T.act_quant(x, block, a_bits, sym, dequant=True)
            if not torch.equal(od, rd):
                bad += 1; print(f"DEQUANT MISMATCH k={k} b={block} A{a_bits} sym={sym}", flush=True)
print(f"correctness: {bad} mismatching cases ({time.time()-t0:.0f}s)", flush=True)

res = []
for k in (1152, 4608):
    for had in (128, 0):
        for m in (256, 1024, 4096, 16384):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_old = time_graph(lambda: T.act_quant(x, had, 4, True), 5, 5, 2)
            row = dict(K=k, H=had, M=m, old_us=t_old * 1e6, plan=str(T.quant_plan(k, had, m)), new={})
            for bm in (1, 2, 4, 8, 16):
                for w in (1, 2, 4, 8):
                    if bm * k // (32 * w) > 256 or bm * k // (32 * w) < 4:
                        continue
                    try:
                        t = time_graph(lambda: bfly(x, had, bm, w), 5, 5, 2)
                    except Exception as e:  # noqa
                        print("FAIL", k, had, m, bm, w, type(e).__name__, str(e)[:150], flush=True); continue
                    row["new"][f"{bm}/{w}"] = t * 1e6
            res.append(row)
            top = sorted((v, c) for c, v in row["new"].items())[:5]
            gbs = 3 * m * k / (top[0][0] * 1e-6) / 1e9
            print(f"[K={k} H={had} M={m}] old {t_old*1e6:.1f}us | bfly best {top[0][1]} {top[0][0]:.1f}us "
                  f"({gbs:.0f} GB/s, {t_old*1e6/top[0][0]:.2f}x) | " +
                  " ".join(f"{c}:{v:.1f}" for v, c in top), flush=True)
json.dump(res, open(os.path.join(OUT, "bfly_bench.json"), "w"), indent=1)
