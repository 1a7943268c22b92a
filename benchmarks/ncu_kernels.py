"""Run each GPU kernel of the fp8 qlinear path a few times on DiT-XL/2 shapes, for Nsight Compute to profile.

    ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis --csv --page details -o /tmp/k python benchmarks/ncu_kernels.py

(`scripts/gpu_session.sh ncu` runs that and keeps the CSV.) What runs, each `--reps` times after one warm-up call
(M = --m rows, bf16 input, W4A4 + Hadamard 128 unless named otherwise):
  - the activation quantizer at K = 1152 and K = 4608 with the dispatch table's tiling (issue 20: it is half of
    fc2's time at M = 16384), then the Gluon quantizer (kernels/gluon_act_quant.py);
  - `_scaled_mm` on the codes, qkv (3456 x 1152) and fc2 (1152 x 4608), and on qkv the Gluon kernel that quantizes
    inside the GEMM (kernels/gluon_qgemm.py);
  - the Triton fp8 GEMM on the same shapes without epilogue terms, then with the LRB (rank 32), pointer and TMA
    kernels, and the Gluon wgmma GEMM (issue 17: the LRB layer costs 1.4-1.7x the plain one; is it the mainloop or
    the epilogue?);
  - the LRB down-projection t = x (B H)^T through cuBLAS.
With --out-act instead: fc1's shape (4608 x 1152) with and without the GELU in the pointer GEMM's store (session 16:
DiT W4A4+H with it ran at 1.02x bf16 against 1.24x without): _scaled_mm, the bf16 GELU pass it replaces, and each
GEMM config with OUT_ACT 0 / 2 (the tanh GELU) where it builds unspilled.
With --block-scale instead: issue 20's a_group = 128 path piece by piece on the five DiT-XL/2 shapes (session 17:
DiT W4A4+H ran at 0.725x bf16 with it against 1.247x per token): bf16 F.linear, the whole layer per token and per
block, the per-token quantizer against the block quantizer (butterfly / tensor-core rotation), rowwise `_scaled_mm`
against cuBLAS's 1 x 128 block-scaled `_scaled_mm` on the same block codes (`block_scaled.cublas_gemm`, what the
a_group layers run; with its error against the exact product) and our BLOCK_SCALE pointer GEMM per config that
holds it, beside the same config without block scales.
With --out-quant instead: DiT-XL/2's fused qkv layer (N = 3456 = 48 heads of 72, K = 1152) with the 8-bit
per-head fake-quant in the GEMM's store (OUT_QUANT, three heads a 256-wide tile) against the same GEMM without it
plus the attention op's row kernel on its output (the producer design in docs/gpu.md), with the row kernel's
time alone: what moving the quantization into the producer saves or costs.
With --attention instead: the 8-bit attention at DiT-XL/2 batch 64 (64 x 16 heads x 256 x 72): the q/k/v row
kernel, bf16 SDPA and the fused Triton kernel (`triton_attention8`; 0.064x SDPA on the H200, 1.2 ms against 78 us,
while its offline sm_90 build has wgmma for both products and no spills: ncu's warp states say where it waits).
Without ncu it prints each kernel's CUDA-event time, so the run is also a quick check that everything launches.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from robuq_fx.kernels import quantizer as AQ  # noqa: E402
from robuq_fx.kernels import triton_fp8 as T  # noqa: E402


def timed(name: str, fn, reps: int) -> None:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.nvtx.range(name):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
    torch.cuda.synchronize()
    print(f"{name:48s} {start.elapsed_time(end) / reps * 1e3:9.1f} us", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--attention", action="store_true", help="the 8-bit attention kernels instead (docstring)")
    ap.add_argument("--out-act", action="store_true", help="fc1 with / without the GELU in its store (docstring)")
    ap.add_argument("--out-quant", action="store_true",
                    help="the qkv GEMM with q / k / v fake-quantized per head in its store (docstring)")
    ap.add_argument("--block-scale", action="store_true",
                    help="a_group = 128's kernels against the per-token ones on every DiT shape (docstring)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("ncu_kernels needs a CUDA device")
    torch.manual_seed(0)
    if args.attention:
        return attention(args.reps)
    if args.out_act:
        return out_act(args.m, args.reps)
    if args.block_scale:
        return block_scale(args.m, args.reps)
    if args.out_quant:
        return out_quant(args.m, args.reps)
    dev, m = "cuda", args.m
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, k, n in (("qkv", 1152, 3456), ("fc2", 4608, 1152)):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        timed(f"act_quant K={k} (Triton, table tiling)",
              lambda: AQ.act_quant(x, 128, 4, True, m_store=m, plan=AQ.quant_plan(k, 128, m)), args.reps)
        os.environ["ROBUQ_QUANT_KERNEL"] = "gluon"
        try:
            timed(f"act_quant K={k} (Gluon kernel)", lambda: AQ.act_quant(x, 128, 4, True, m_store=m), args.reps)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"act_quant K={k} (Gluon kernel): failed ({type(e).__name__}: {e})")
        finally:
            os.environ.pop("ROBUQ_QUANT_KERNEL", None)
        codes, sx, lo = AQ.act_quant(x, 128, 4, True, m_store=m)
        w8 = torch.randint(-7, 8, (n, k), device=dev).to(torch.bfloat16).to(torch.float8_e4m3fn)
        sw = torch.rand(n, device=dev) + 0.5
        b = torch.randn(n, device=dev, dtype=torch.bfloat16)
        timed(f"_scaled_mm {name}", lambda: T._scaled_mm(codes, w8, sx, sw, b), args.reps)
        if k <= 1152:
            try:
                from robuq_fx.kernels import gluon_qgemm as QG
                yq = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
                timed(f"quantize-in-GEMM {name} (Gluon, replaces act_quant + _scaled_mm)",
                      lambda: QG.launch_qgemm_fused(x, w8, yq, sw, b, AQ._hscale(128, x.dtype), 7.0), args.reps)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"quantize-in-GEMM {name}: failed ({type(e).__name__}: {e})")
        up = torch.randn(n, 32, device=dev, dtype=torch.bfloat16)
        down = torch.randn(32, k, device=dev, dtype=torch.bfloat16)
        t = torch.randn(m, 32, device=dev, dtype=torch.bfloat16)
        y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        cfg = T._k().GEMM_CONFIGS[0]
        timed(f"triton GEMM {name} (pointer, cfg 0, no epilogue terms)",  # mainloop vs epilogue: which one costs
              lambda: T._k().launch_fp8_gemm(codes, w8, y, sx, sw, None, None, None, None, None, m, cfg), args.reps)
        timed(f"triton epilogue GEMM {name} (pointer, cfg 0)",
              lambda: T._k().launch_fp8_gemm(codes, w8, y, sx, sw, b, None, None, t, up, m, cfg), args.reps)
        tcfg = T._k().TMA_GEMM_CONFIGS[1]
        try:
            timed(f"triton epilogue GEMM {name} (TMA, cfg 1)",
                  lambda: T._k().launch_fp8_gemm_tma(codes, w8, y, sx, sw, b, None, None, t, up, m, tcfg, sms),
                  args.reps)
        except Exception as e:  # noqa: BLE001 - a config that does not fit this GPU: the rest still runs
            print(f"triton epilogue GEMM {name} (TMA, cfg 1): skipped ({type(e).__name__}: {e})")
        try:
            from robuq_fx.kernels import gluon_fp8_gemm as GG
            timed(f"Gluon epilogue GEMM {name} (cfg 0)",
                  lambda: GG.launch_fp8_gemm_gluon(codes, w8, y, sx, sw, b, None, None, t, up, m, GG.CONFIGS[0]),
                  args.reps)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"Gluon epilogue GEMM {name}: failed ({type(e).__name__}: {e})")
        timed(f"LRB down-projection {name} (cuBLAS)", lambda: torch.nn.functional.linear(x, down), args.reps)


def out_act(m: int, reps: int) -> None:
    """fc1 (N 4608, K 1152) at M rows: where does the GELU-in-the-store form lose (bench_dit --gelu-in-fc1)?"""
    import torch.nn.functional as F
    G = T._k()
    n, k = 4608, 1152
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    codes, sx, lo = AQ.act_quant(x, 128, 4, True, m_store=m)
    w8 = torch.randint(-7, 8, (n, k), device="cuda").to(torch.bfloat16).to(torch.float8_e4m3fn)
    sw, b = torch.rand(n, device="cuda") + 0.5, torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    timed("_scaled_mm fc1", lambda: T._scaled_mm(codes, w8, sx, sw, b), reps)
    timed("bf16 GELU pass (tanh) fc1's output", lambda: F.gelu(y, approximate="tanh"), reps)
    from robuq_fx.kernels.fp8_gemms import gemm_config, pointer_config
    print(f"table config for M={m}: {gemm_config(m, n, k)}; with the activation: {pointer_config(m, n, k, 'gelu')}")
    for i, cfg in enumerate(G.GEMM_CONFIGS):
        for act in ("", "gelu_tanh", "gelu"):
            if act and not G.two_tiles_ok(cfg):
                continue
            timed(f"pointer GEMM cfg {i} {cfg} act={act or '-'}",
                  lambda: G.launch_fp8_gemm(codes, w8, y, sx, sw, b, None, None, None, None, m, cfg, out_act=act),
                  reps)


def _err(y: torch.Tensor, ref: torch.Tensor) -> str:
    return f"max |err| / max |ref| = {((y.float() - ref).abs().max() / ref.abs().max()).item():.2e}"


def block_scale(m: int, reps: int) -> None:
    """The a_group = 128 kernels on every DiT-XL/2 shape at m rows (docstring); errors against float64 products."""
    import torch.nn.functional as F
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_linear import SHAPES, make_layer
    from robuq_fx.hadamard import hadamard_matrix
    from types import SimpleNamespace
    from robuq_fx.kernels import block_scaled as B
    from robuq_fx.kernels.fp8_gemms import pointer_config
    from robuq_fx.kernels.triton_block_quant import block_quant
    G = T._k()
    dev = "cuda"
    h = hadamard_matrix(128, torch.bfloat16, dev)
    print(f"block-scaled pointer config per shape: "
          f"{ {nm: pointer_config(m, n, k, '', True) for nm, k, n in SHAPES} }")
    for name, k, n in SHAPES:
        torch.manual_seed(0)
        print(f"--- {name} K={k} N={n} M={m}")
        w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
        b = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        kw = dict(w_bits=4, a_bits=4, hadamard=True, hadamard_block=128)
        per_tok, per_blk = make_layer(kw, w, b), make_layer(dict(kw, a_group=128), w, b)
        with torch.no_grad():
            timed(f"bf16 F.linear {name}", lambda: F.linear(x, w, b), reps)
            timed(f"layer W4A4+H per token {name}", lambda: per_tok(x), reps)
            timed(f"layer W4A4+H a_group 128 {name}", lambda: per_blk(x), reps)
        timed(f"act_quant per token K={k}", lambda: AQ.act_quant(x, 128, 4, True, m_store=m), reps)
        for rot in ("butterfly", "mma"):
            timed(f"block_quant K={k} ({rot})", lambda: block_quant(x, h, m, 7.0, rot=rot), reps)
        codes, sx, _ = AQ.act_quant(x, 128, 4, True, m_store=m)
        bcodes, bs = block_quant(x, h, m, 7.0)
        w8 = torch.randint(-7, 8, (n, k), device=dev).to(torch.bfloat16).to(torch.float8_e4m3fn)
        sw = torch.rand(n, device=dev) * 0.01 + 0.001
        timed(f"_scaled_mm rowwise {name}", lambda: T._scaled_mm(codes, w8, sx, sw, b), reps)
        ref = ((bcodes.double() * bs.t().double().repeat_interleave(128, 1)) @ (w8.double() * sw[:, None].double()).t()
               + b.double())
        entry = SimpleNamespace(fp8=w8, sw=sw, swb=None)  # what block_scaled reads of a weight cache entry
        timed(f"cuBLAS 1x128 blockwise _scaled_mm {name} (block_scaled.cublas_gemm)",
              lambda: B.cublas_gemm(bcodes, bs, entry, b, m), reps)
        yb = B.cublas_gemm(bcodes, bs, entry, b, m)
        print(f"    {_err(yb, ref)}" if yb is not None else "    refused by this torch / cuBLAS")
        y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        for i, cfg in enumerate(G.GEMM_CONFIGS):
            if not G.two_tiles_ok(cfg):
                continue
            timed(f"pointer GEMM cfg {i} {cfg} per token",
                  lambda: G.launch_fp8_gemm(codes, w8, y, sx, sw, b, None, None, None, None, m, cfg), reps)
            timed(f"pointer GEMM cfg {i} {cfg} BLOCK_SCALE",
                  lambda: G.launch_fp8_gemm(bcodes, w8, y, bs, sw, b, None, None, None, None, m, cfg,
                                            block_scale=True), reps)
        print(f"    BLOCK_SCALE {_err(y, ref)}")


def out_quant(m: int, reps: int) -> None:
    """The qkv GEMM with and without the per-head store (docstring), each config that holds whole heads."""
    from robuq_fx import quantizers as Q
    from robuq_fx.kernels.triton_rowquant import fake_quant_rows
    G = T._k()
    n, k, d = 3456, 1152, 72
    codes = torch.randint(-7, 8, (m, k), device="cuda").to(torch.bfloat16).to(torch.float8_e4m3fn)
    w8 = torch.randint(-7, 8, (n, k), device="cuda").to(torch.bfloat16).to(torch.float8_e4m3fn)
    sx, sw = torch.rand(m, device="cuda") * 0.01, torch.rand(n, device="cuda") * 0.01
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    yq = torch.empty_like(y)
    heads = y.view(m, n // d, d)
    timed("row kernel on the qkv output (8-bit per head)", lambda: fake_quant_rows(heads, 8, True), reps)
    for i, cfg in enumerate(list(G.GEMM_CONFIGS) + [(64, 256, 128, 8, 8, 3)]):
        if cfg[1] < d:
            continue
        timed(f"GEMM cfg {i} {cfg}", lambda: G.launch_fp8_gemm(codes, w8, y, sx, sw, b, None, None, None, None, m,
                                                               cfg), reps)
        timed(f"GEMM cfg {i} {cfg} + per-head fake-quant store",
              lambda: G.launch_fp8_gemm(codes, w8, yq, sx, sw, b, None, None, None, None, m, cfg,
                                        out_quant=(d, 8)), reps)
    want = Q.fake_quant_act(y, 8, True, "absmax", group=d)
    print(f"    per-head store equal to fake_quant_act on the plain output: {bool(torch.equal(yq, want))} "
          f"(max |diff| {(yq.float() - want.float()).abs().max().item():.3g})")


def attention(reps: int) -> None:
    """The attention kernels on DiT-XL/2's batch-64 shape, q / k / v as views of one (B, S, H, D) buffer each, as
    the model's attention hands them over."""
    import torch.nn.functional as F
    from robuq_fx.kernels import triton_attention8 as A
    from robuq_fx.kernels.triton_rowquant import fake_quant_rows
    b, h, s, d = 64, 16, 256, 72
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    timed("bf16 SDPA", lambda: F.scaled_dot_product_attention(q, k, v), reps)
    timed("q/k/v row kernel (3 calls)", lambda: [fake_quant_rows(t, 8, True) for t in (q, k, v)], reps)
    timed("attention8 fused kernel", lambda: A.attention8(q, k, v, False, None), reps)


if __name__ == "__main__":
    main()
