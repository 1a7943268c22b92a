"""bench_dit.py's reporting: the summary's named figures (issues 17 and 19), the PNG, and the environment switches
of its same-run A/B rows (--env-variant)."""
from __future__ import annotations

import os
from pathlib import Path

from _dit_setup import AG128, PAPER, PAPER_A2, PAPER_A3, PAPER_AG128

SUMMARY_KEYS = {"robuq W4A4+H": "w4a4h", "robuq W1.58A4+H": "w158a4h", AG128: "w4a4h_ag128",
                PAPER_AG128: "paper_ag128", PAPER: "paper", PAPER_A3: "paper_a3",
                PAPER_A2: "paper_a2", "robuq W4A4+H, opaque op": "w4a4h_opaque",
                "robuq W4A4+H, Inductor decomposition": "w4a4h_inductor",  # (rows of runs before it was the default)
                "robuq W4A4+H (C++ wrapper)": "w4a4h_cppwrapper",
                "robuq W4A4+H +GELU fused": "w4a4h_gelu_fused"}


def summary_key(setting: str) -> str | None:
    """The summary key of a row: SUMMARY_KEYS, plus its opt-in tags ("robuq W4A4+H +fusedquant" -> w4a4h_fusedquant)."""
    if setting in SUMMARY_KEYS:
        return SUMMARY_KEYS[setting]
    base, *tags = setting.split(" +")
    key = SUMMARY_KEYS.get(base)
    return key and "_".join([key, *(t.lower().replace(" ", "_").replace("-", "_") for t in tags)])


def _env_variant(text: str) -> tuple[str, dict]:
    """'TAG:VAR=VALUE' -> (TAG, {VAR: VALUE}); a clear error for anything else."""
    tag, sep, rest = text.partition(":")
    var, eq, val = rest.partition("=")
    if not (sep and eq and tag and var) or " " in tag or "+" in tag:
        raise SystemExit(f"--env-variant {text!r}: expected TAG:VAR=VALUE, e.g. down:ROBUQ_FP8_DOWN_IN_GEMM=1 "
                         f"(TAG without spaces or '+')")
    return tag, {var: val}


def env_tags(table) -> str:
    """" TAG" for each (VAR, VALUE, TAG) of table whose variable is set to that value, in the table's order: the
    switches in force name a benchmark's rows, so that a run with them does not overwrite the plain rows' keys."""
    return "".join(f" {tag}" for var, value, tag in table if os.environ.get(var) == value)


def _set_env(env: dict) -> dict:
    """Set `env` in os.environ; returns the previous values (None: unset) for restoring with another call."""
    old = {}
    for k, v in env.items():
        old[k] = os.environ.get(k)
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return old


def summary(results: dict) -> dict:
    """The named figures of issues 17 and 19 (speed and memory vs bf16 in the same run)."""
    out = {}
    base = results["baseline"]
    for r in results["latency"]:
        key = summary_key(r["setting"])
        if key:
            out[f"{key}_b{r['batch']}_x"] = r[f"x vs {base}"]
    peak = {(r["setting"], r["batch"]): r["peak MiB"] for r in results["latency"]}
    for (name, b), v in peak.items():
        key = summary_key(name)
        if key and (base, b) in peak and b == max(bb for _, bb in peak):
            out[f"{key}_peak_b{b}_x"] = round(v / peak[(base, b)], 3)
    for r in results["memory"]:
        key = summary_key(r["setting"])
        if key:
            out[f"{key}_resident_x"] = r["ratio"]
    for r in results.get("default_mode", []):
        key = SUMMARY_KEYS.get(r["setting"])
        if key:
            out[f"{key}_b{r['batch']}_default_x"] = r["x vs bf16 torch.compile (default)"]
    names = {"QAT W4A4+H": "qat", "QAT W1.58A4+H": "qat_w158", "QAT dit-xl-2-robuq": "qat_paper"}
    for r in results["train_step"]:
        # tags: " +fp8" (an opt-in on), " -wgraph" (a default off: key part "no_wgraph")
        words = r["setting"].split(" ")
        base = " ".join(w for w in words if w[:1] not in "+-")
        tags = [w[1:] if w[0] == "+" else "no_" + w[1:] for w in words if w[:1] in "+-"]
        if base in names and "x FP step time" in r:  # (a mode whose FP row failed has no ratio)
            out[f"{'_'.join([names[base], *tags])}_{r['mode']}_x"] = r["x FP step time"]
    return out


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (draw it later with --plot JSON)")
        return
    base = results["baseline"]
    key = f"x vs {base}"
    names = list(dict.fromkeys(r["setting"] for r in results["latency"]))
    batches = sorted({r["batch"] for r in results["latency"]})
    ratio = {(r["setting"], r["batch"]): r[key] for r in results["latency"]}
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / len(batches)
    for i, b in enumerate(batches):
        ax.bar([j + w * i for j in range(len(names))], [ratio[(n, b)] for n in names], width=w, label=f"batch {b}")
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(names))], [n.replace(" (", "\n(") for n in names], fontsize=6)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_ylabel(f"speed vs {base}")
    ax.set_title(results["header"], fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
