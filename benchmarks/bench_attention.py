#!/usr/bin/env python
"""8-bit attention (robuq::attention8) against bf16 SDPA, on DiT-XL/2 and LM attention shapes (CUDA GPU).

Columns, all timed by CUDA-graph replay in one run, ratio = bf16 SDPA time / column time (> 1 = faster):
    bf16 SDPA            F.scaled_dot_product_attention on the bf16 inputs (torch picks flash / cuDNN / efficient)
    ATen fake-quant+SDPA the lowered graph before this op: quantizers.fake_quant_act (torch ops) on q, k, v + SDPA
    row kernel+SDPA      the op's reference on CUDA: one Triton fake-quant kernel per tensor, then SDPA
    attention8 op        robuq::attention8 as lowered models call it (default CUDA path: the row kernel on q, k, v
                         in their memory order + flash SDPA)
    fused kernel         the opt-in single Triton kernel (ROBUQ_ATTENTION=fused: quantize while loading, int8 q.k,
                         P.V on 16-bit tensor cores)
    fused kernel, k/v prequant  ROBUQ_ATTENTION=prequant: k / v quantized first by the row kernel (int8 codes +
                         scales, fake-quant values), then the flash kernel whose loads feed the dots (same output)

    python benchmarks/bench_attention.py            # table + JSON + PNG + summary_attention_<gpu>.json
    python benchmarks/bench_attention.py --sweep    # also the flash kernel's launch configs (triton_attention8.SWEEP)
                                                    # on five shapes, both forms: which config the default should be
    python benchmarks/bench_attention.py --sweep --write-dispatch   # and record, per head dim / causal / size, the
                                                    # form + config that beat the op's row kernel + SDPA by >= 3% in
                                                    # robuq_fx/kernels/dispatch_table.json ("attention"; the op then
                                                    # runs it, dispatch.attention_choice); none: the key is emptied
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from _provenance import gpu_tag, provenance, write_summary  # noqa: E402
from bench_linear import _with_env, time_graph  # noqa: E402

# (name, batch, heads, kv heads, seq, head_dim, causal)
SHAPES = [("dit-xl2 b1", 1, 16, 16, 256, 72, False), ("dit-xl2 b8", 8, 16, 16, 256, 72, False),
          ("dit-xl2 b64", 64, 16, 16, 256, 72, False), ("vit-b b64", 64, 12, 12, 197, 64, False),
          ("llama d64 causal", 8, 16, 16, 1024, 64, True), ("llama d128 causal", 4, 32, 32, 2048, 128, True),
          ("llama d128 gqa causal", 4, 32, 8, 2048, 128, True)]


SWEEP_SHAPES = ("dit-xl2 b1", "dit-xl2 b8", "dit-xl2 b64", "vit-b b64", "llama d128 causal")


def _write_attention_choices(choices: dict) -> str:
    """The dispatch table's "attention" key set to this sweep's winners (other keys untouched)."""
    from robuq_fx.kernels import dispatch as D
    table = dict(D.dispatch_table())
    table["attention"] = choices
    with open(D._TABLE_PATH, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    D.dispatch_table.cache_clear()
    return D._TABLE_PATH


def _sweep(T, name, q, k, v, causal, t_sdpa, summary, key) -> tuple[list[dict], tuple | None]:
    """Each `T.SWEEP` config of both flash-kernel forms on one shape: time (CUDA-graph replay), ratio vs SDPA, and
    the largest difference from the default config's output (another BN sums the softmax in another order: close,
    not equal). Configs that do not build or launch here are reported, not fatal. The best of each form goes into
    the summary (attn8_{fused,prequant}_best_<shape>_x). Returns (rows, (seconds, form, config) of the fastest)."""
    out, overall = [], None
    for form, fn in (("fused", T.attention8), ("prequant", T.attention8_prequant)):
        with torch.no_grad():
            base = fn(q, k, v, causal, None)
        best = None
        for cfg in [None] + T.SWEEP:
            row = {"shape": name, "form": form, "config": "default" if cfg is None else str(cfg)}
            try:
                with torch.no_grad():
                    o = fn(q, k, v, causal, None, config=cfg)
                    row["max |diff| vs default"] = float((o.float() - base.float()).abs().max())
                    tt = time_graph(lambda: fn(q, k, v, causal, None, config=cfg))
            except Exception as e:  # noqa: BLE001 - a config this GPU / triton cannot run
                row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
                out.append(row)
                continue
            row["us"] = round(tt * 1e6, 1)
            row["x vs SDPA"] = round(t_sdpa / tt, 3)
            if best is None or tt < best[0]:
                best = (tt, row["config"])
            if cfg is not None and (overall is None or tt < overall[0]):  # the table records explicit configs
                overall = (tt, form, tuple(cfg))
            out.append(row)
            print(row, flush=True)
        if best is not None:
            summary[f"attn8_{form}_best_{key}_x"] = round(t_sdpa / best[0], 3)
            summary[f"attn8_{form}_best_{key}_config"] = best[1]
    return out, overall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--sweep", action="store_true", help="time the flash kernel's launch configs (both forms)")
    ap.add_argument("--write-dispatch", action="store_true",
                    help="with --sweep: write the winners into the dispatch table's 'attention' key")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    from tabulate import tabulate

    import robuq_fx  # noqa: F401
    from robuq_fx import quantizers as Q
    from robuq_fx.kernels import attention as A
    from robuq_fx.kernels import triton_attention8 as T
    from robuq_fx.kernels import triton_rowquant as R
    prov = provenance(argv)
    print(f"GPU: {prov['gpu']} | torch {prov['torch']} | triton {prov.get('triton')}")
    if args.write_dispatch and not args.sweep:
        ap.error("--write-dispatch needs --sweep")
    rows, summary, sweep, choices = [], {}, [], {}
    for name, b, h, hk, s, d, causal in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, s, h, d, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(b, s, hk, d, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(b, s, hk, d, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        gqa = {"enable_gqa": True} if hk != h else {}

        def sdpa(qq, kk, vv):
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, **gqa)
        fns = {
            "bf16 SDPA": lambda: sdpa(q, k, v),
            "ATen fake-quant+SDPA": lambda: sdpa(*(Q.fake_quant_act(t, 8, True) for t in (q, k, v))),
            "row kernel+SDPA": lambda: sdpa(*(R.fake_quant_rows(t, 8, True) for t in (q, k, v))),
            "attention8 op": lambda: torch.ops.robuq.attention8(q, k, v, None, 0.0, causal, None, bool(gqa), 8),
            "fused kernel": lambda: T.attention8(q, k, v, causal, None),
            "fused kernel, k/v prequant": lambda: T.attention8_prequant(q, k, v, causal, None),
        }
        if hk == h:  # q, k, v as the lowered DiT's attention reads them: thirds of one fused qkv output
            buf = torch.randn(b * s, 3 * h * d, generator=g, device="cuda", dtype=torch.bfloat16)
            qb, kb, vb = (buf.narrow(1, i * h * d, h * d).view(b, s, h, d).transpose(1, 2) for i in range(3))
            assert A.qkv_union(qb, kb, vb) is not None
            fns["attention8 op, qkv buffer"] = lambda: torch.ops.robuq.attention8(qb, kb, vb, None, 0.0, causal, None,
                                                                                  False, 8)
        assert A.why_not_kernel(q, k, v, None, 0.0, 8) is None
        with torch.no_grad():
            t = {c: time_graph(f) for c, f in fns.items()}
        flops = 4.0 * b * h * s * s * d / (2 if causal else 1)
        row = {"shape": name, "B,H,Hkv,S,D": f"{b},{h},{hk},{s},{d}", "bf16 SDPA us": round(t["bf16 SDPA"] * 1e6, 1),
               "bf16 TFLOP/s": round(flops / t["bf16 SDPA"] / 1e12, 1)}
        for c in list(fns)[1:]:
            row[c] = round(t["bf16 SDPA"] / t[c], 3)
        row["attention8 op TFLOP/s"] = round(flops / t["attention8 op"] / 1e12, 1)
        rows.append(row)
        key = name.replace(" ", "_").replace("-", "")
        summary[f"attn8_{key}_x"] = row["attention8 op"]
        summary[f"attn8_fused_{key}_x"] = row["fused kernel"]
        summary[f"attn8_prequant_{key}_x"] = row["fused kernel, k/v prequant"]
        summary[f"rowq_sdpa_{key}_x"] = row["row kernel+SDPA"]
        if "attention8 op, qkv buffer" in row:  # one launch for q, k, v (attention.qkv_union)
            summary[f"attn8_qkvbuf_{key}_x"] = row["attention8 op, qkv buffer"]
        print(row, flush=True)
        if args.sweep and name in SWEEP_SHAPES:
            got, best = _sweep(T, name, q, k, v, causal, t["bf16 SDPA"], summary, key)
            sweep += got
            # the op's own path (the row kernel + SDPA: ROBUQ_ATTENTION=rows, whatever the table says now) as the
            # models call it: q, k, v separate, or the lowered DiT's one qkv buffer (faster)
            with torch.no_grad():
                op = min(time_graph(_with_env(fns[c], "ROBUQ_ATTENTION", "rows"))
                         for c in ("attention8 op", "attention8 op, qkv buffer") if c in fns)
            if best is not None and best[0] <= 0.97 * op:
                choices.setdefault(f"{d}/{'c' if causal else 'n'}", {})[str(b * h * s)] = [best[1], list(best[2])]
                print(f"  {name}: {best[1]} {best[2]} {best[0] * 1e6:.1f} us beats the op's {op * 1e6:.1f} us")
    print()
    print("ratio = bf16 SDPA time / column time (> 1 = faster); CUDA-graph replay")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    if sweep:
        print("\nflash kernel launch configs (BM, BN, warps, stages, maxnreg); first row of each: the default")
        print(tabulate(sweep, headers="keys", tablefmt="github"))
    if args.write_dispatch:
        print(f"wrote {_write_attention_choices(choices)}: attention = {choices}")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"bench_attention_{gpu_tag(prov['gpu'])}")
    with open(base + ".json", "w") as f:
        json.dump({"provenance": prov, "rows": rows, "sweep": sweep}, f, indent=1)
    print(f"wrote {base}.json, {write_summary(args.out, 'attention', summary, argv)}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        cols = ["ATen fake-quant+SDPA", "row kernel+SDPA", "attention8 op", "fused kernel",
                "fused kernel, k/v prequant"]
        fig, ax = plt.subplots(figsize=(10, 4))
        w = 0.8 / len(cols)
        for i, c in enumerate(cols):
            ax.bar([j + i * w for j in range(len(rows))], [r[c] for r in rows], w, label=c)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + w for j in range(len(rows))], [r["shape"] for r in rows], rotation=20, fontsize=8)
        ax.set_ylabel("speed vs bf16 SDPA (x)")
        ax.set_title(f"8-bit attention, {prov['gpu']}, torch {prov['torch']}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(base + ".png", dpi=110)
        print(f"wrote {base}.png")
    except ImportError:
        print("matplotlib not installed: no PNG")


if __name__ == "__main__":
    main()
