"""Tables, the PNG and the flat summary of bench_lm.py. `groups` is bench_lm's setting groups:
{"main": {"no H": [...], "+H": [...]}, "ablation": [...], "ampn": [...], "quantizer": [...]}; `res[key]` holds a
setting's "ptq_bpb" (a float, or one per seed for AMPN), "bpb" (one per seed), "lowered", and for AMPN
"mean_bits"."""
from __future__ import annotations

import statistics
from pathlib import Path

GAP_TOL = 0.01  # BPB: the bound on |lowered - QAT|


def save_partial(path: Path, **state) -> None:
    """The results so far, rewritten after every setting: what survives if a later step of a long run dies."""
    import json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=1, default=str) + "\n")


def mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def pm(v: list[float] | None, digits: int = 4) -> str:
    if not v:
        return "-"
    m, sd = mean_std(v)
    return f"{m:+.{digits}f} ± {sd:.{digits}f}"


def deltas(r: dict, fp_bpb: float) -> dict:
    """Per-seed Δ BPB vs the one FP model, after QAT and before (PTQ)."""
    ptq = r["ptq_bpb"] if isinstance(r["ptq_bpb"], list) else [r["ptq_bpb"]]
    return {"qat": [b - fp_bpb for b in r["bpb"]], "ptq": [b - fp_bpb for b in ptq]}


def mean_bits(r: dict, kind: str = "macs") -> float:
    return statistics.fmean(m[kind] for m in r["mean_bits"])


def outlier_table(rows: list[dict]) -> list[dict]:
    """Per input (q/k/v read one input, gate/up another): median and max over the layers."""
    kinds = {"q/k/v_proj": "q_proj", "o_proj": "o_proj", "gate/up_proj": "gate_proj", "down_proj": "down_proj"}
    out = []
    for kind, leaf in kinds.items():
        rs = [r for r in rows if r["layer"].endswith(leaf)]
        row = {"input of": kind, "layers": len(rs)}
        for col, name in (("max_over_rms", "max|x|/RMS"), ("kurtosis", "kurtosis"),
                          ("token_max_over_rms", "token max/RMS"), ("token_kurtosis", "token kurtosis")):
            for suf, h in (("", ""), ("_h", " +H")):
                v = [r[col + suf] for r in rs]
                row[f"{name}{h}"] = f"{statistics.median(v):.1f} / {max(v):.1f}"
        out.append(row)
    return out


def make_tables(groups: dict, settings, res: dict, fp_bpb: float, allocs: dict,
                control: list[float] | None = None) -> dict[str, list[dict]]:
    have = {s.key for s in settings}
    d = {k: deltas(r, fp_bpb) for k, r in res.items()}
    tables = {}
    rows = [{"setting": "FP", "BPB": f"{fp_bpb:.4f}"}]
    if control:
        rows.append({"setting": "FP control: trained on for the QAT budget", "BPB": f"{statistics.fmean(control):.4f}",
                     "QAT ΔBPB no H": pm([b - fp_bpb for b in control]), "QAT ΔBPB +H": "(same)"})
    for a, b in zip(groups["main"]["no H"], groups["main"]["+H"]):
        row = {"setting": a.label.replace(" no H", ""), "BPB": ""}
        for s, tag in ((a, "no H"), (b, "+H")):
            row[f"PTQ ΔBPB {tag}"] = pm(d[s.key]["ptq"]) if s.key in have else "-"
            row[f"QAT ΔBPB {tag}"] = pm(d[s.key]["qat"]) if s.key in have else "-"
        rows.append(row)
    for s in groups["ampn"]:
        if s.key in have:
            rows.append({"setting": f"{s.label.replace(' +H', '')} ({mean_bits(res[s.key]):.2f} b)", "BPB": "",
                         "PTQ ΔBPB no H": "-", "QAT ΔBPB no H": "-", "PTQ ΔBPB +H": pm(d[s.key]["ptq"]),
                         "QAT ΔBPB +H": pm(d[s.key]["qat"])})
    tables["QAT settings: Δ BPB vs FP (mean ± std over seeds; PTQ = quantized, before QAT)"] = rows
    abl = ["baseline: H on o_proj/down_proj only, no LRB", "+ LRB", "+ H on all linears (= W1.58A3 +H)"]
    for title, group, names in (("ablation at W1.58A3 (the paper's DiT FID: 41.6 -> 29.6 -> 20.8)",
                                 groups["ablation"], abl),
                                ("activation quantizer at W1.58, +H, LRB", groups["quantizer"], None)):
        rows = [{"setting": names[i] if names else s.label, "QAT ΔBPB": pm(d[s.key]["qat"]),
                 "PTQ ΔBPB": pm(d[s.key]["ptq"])} for i, s in enumerate(group) if s.key in have]
        if rows:
            tables[title] = rows
    rows = []
    for s in groups["ampn"]:
        if allocs.get(s.key):
            kinds: dict[str, list[float]] = {}
            for a in allocs[s.key]:
                for r in a["summary"]:
                    kinds.setdefault(r["kind"].rsplit(".", 1)[-1], []).append(r["mean bits"])
            rows.append({"AMPN": s.label, **{k: f"{statistics.fmean(v):.2f}" for k, v in kinds.items()},
                         "MAC-weighted": f"{mean_bits(res[s.key]):.2f}",
                         "plain": f"{mean_bits(res[s.key], 'plain'):.2f}"})
    if rows:
        tables["AMPN: mean activation bits per projection (over layers and seeds)"] = rows
    rows = []
    for s in settings:
        g = res[s.key]["lowered"]
        if "error" in g:
            rows.append({"setting": s.label, "QAT BPB": f"{g['qat_bpb']:.4f}",
                         "QAT cast BPB": f"{g['qat_cast_bpb']:.4f}", "lowered BPB": "failed",
                         "kernels (calls)": g["error"]})
            continue
        rows.append({"setting": s.label, "QAT BPB": f"{g['qat_bpb']:.4f}", "QAT cast BPB": f"{g['qat_cast_bpb']:.4f}",
                     "lowered BPB": f"{g['lowered_bpb']:.4f}", "|lowered - QAT|": f"{g['gap']:.1e}",
                     "|lowered - QAT cast|": f"{g['gap_same_dtype']:.1e}",
                     "kernels (calls)": ", ".join(f"{k} {v}" for k, v in g["kernels"].items())})
        if "forced_kernels_bpb" in g:
            rows[-1]["lowered BPB per forced kernel"] = ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in g["forced_kernels_bpb"].items())
    tables[f"lowered vs QAT, seed 0 (bound {GAP_TOL} BPB)"] = rows
    return tables


def save_png(groups: dict, settings, res: dict, fp_bpb: float, path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:  # the [bench] extra has it, the [test] extra (CI's quick run) does not
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    have = {s.key for s in settings}
    main = groups["main"]
    series = [("W1.58, +H", main["+H"][1:], "o-", "C0"), ("W1.58, no H", main["no H"][1:], "s--", "C1"),
              ("W4A4, +H", main["+H"][:1], "^", "C2"), ("W4A4, no H", main["no H"][:1], "v", "C3"),
              ("W1.58 AMPN, +H", groups["ampn"], "D-", "C4")]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, group, fmt, color in series:
        pts = []
        for s in group:
            if s.key in have:
                m, sd = mean_std(deltas(res[s.key], fp_bpb)["qat"])
                pts.append((mean_bits(res[s.key]) if s.ampn else s.a_bits, m, sd))
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, fmt=fmt, color=color, label=name, capsize=3)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("average activation bits (AMPN: MAC-weighted)")
    ax.set_ylabel(f"Δ validation BPB vs FP ({fp_bpb:.3f}), after QAT")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def summary(settings, res: dict, fp_bpb: float, outliers: list[dict], data_info: dict, extra: dict,
            control: list[float] | None = None) -> dict:
    """Flat figures for summary_lm_<gpu>.json: lm_<key>_dbpb (mean over seeds after QAT), _dbpb_std, _ptq_dbpb for
    every setting; outliers (largest over layers); the largest lowered-vs-QAT gaps; data and run facts."""
    fig = {"lm_fp_bpb": round(fp_bpb, 5)}
    if control:  # the FP model trained on for one QAT run's budget: Δ of extra training alone
        fig["lm_fp_control_bpb"] = round(statistics.fmean(control), 5)
        fig["lm_fp_control_dbpb"] = round(statistics.fmean(control) - fp_bpb, 5)
    for s in settings:
        d = deltas(res[s.key], fp_bpb)
        m, sd = mean_std(d["qat"])
        fig[f"lm_{s.key}_dbpb"], fig[f"lm_{s.key}_dbpb_std"] = round(m, 5), round(sd, 5)
        fig[f"lm_{s.key}_ptq_dbpb"] = round(statistics.fmean(d["ptq"]), 5)
        if control:  # against the FP model trained on for the same budget: the price of quantization alone
            fig[f"lm_{s.key}_dbpb_vs_control"] = round(statistics.fmean(res[s.key]["bpb"]) - statistics.fmean(control), 5)
        if s.ampn:
            fig[f"lm_{s.key}_mean_bits"] = round(mean_bits(res[s.key]), 3)
    for col in ("max_over_rms", "kurtosis", "token_max_over_rms", "token_kurtosis"):
        fig[f"lm_outlier_{col}"] = max(r[col] for r in outliers)
        fig[f"lm_outlier_{col}_h"] = max(r[col + "_h"] for r in outliers)
    low = [res[s.key]["lowered"] for s in settings]
    failed = sum("error" in g for g in low)
    for key, col in (("lm_lowered_gap_bpb", "gap"), ("lm_lowered_gap_same_dtype_bpb", "gap_same_dtype")):
        fig[key] = None if failed else max(g[col] for g in low)  # None: some setting could not be lowered and run
    fig["lm_lowered_failed_settings"] = failed
    fig["lm_python"] = data_info["python"]
    for k in ("train_files", "val_files", "train_source_bytes", "val_source_bytes"):
        fig[f"lm_{k}"] = data_info[k]
    fig.update(extra)
    return fig
