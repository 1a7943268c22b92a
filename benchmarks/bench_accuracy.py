"""Accuracy of RobuQ settings on real data (sklearn digits), FP baseline in the same run, mean ± std over seeds.

    python benchmarks/bench_accuracy.py                 # full run: 3 seeds, MLP + tiny DiT (~20 min on 2 cores)
    python benchmarks/bench_accuracy.py --quick --out /tmp/x     # smoke run (a few settings, 1 seed, seconds)
    python benchmarks/bench_accuracy.py --models mlp --seeds 2

a. digits MLP classifier (fc_in 64 -> 128, two pre-norm residual MLP blocks fc1 128 -> 256, fc2 256 -> 128, head
   128 -> 10; fc_in and the block linears are quantized, the head stays FP): FP, then QAT at W4A4, W1.58A4, W1.58A3,
   W1.58A2 and W1.58 + AMPN average A3 / A2, each without and with the Hadamard rotation (all with the LRB).
   Metrics: test accuracy, test NLL, and the accuracy right after quantize() before QAT (PTQ).
b. tiny class-conditional DiT (diffusers DiTTransformer2DModel, 2 blocks, 2 heads x 32, 16 tokens) trained as an
   epsilon-prediction DDPM on the 8x8 digits in [-1, 1]: the same settings on the block linears, adaLN W4A4,
   embeddings and final layer FP (METHOD.md §5). Metrics: class accuracy of 20 DDIM samples per class judged by a
   logistic regression trained on real digits (conditioning label = truth), and the held-out denoising loss.
c. ablations (MLP and DiT): baseline (Hadamard only on attention-out / fc2, no LRB) -> + LRB -> + Hadamard on all
   block linears, at W1.58A3; a_sym x a_clip at A3 and a_clip at A2 (A2 is always asymmetric); AMPN A2 with
   candidates {1,2,3,4} vs {2,3,4} vs uniform A2; activation ranges per token vs per token and 32 inputs
   (`LayerSpec.a_group`, issue 20; `--only a_group` runs that table alone, into bench_accuracy_a_group.*).

Every QAT run starts from the seed's trained FP model; ablation "baseline" rotates fc2 only (MLP: fc_in and fc1
unrotated) / attention out + ff.net.2 (DiT). A setting shared by several tables is trained once.
Writes benchmarks/results/bench_accuracy.{json,txt} and bench_accuracy_dit_samples.png (or under --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch 2.13 deep-copying an exported graph: "isinstance(treespec, LeafSpec) is deprecated" once per quantize()
warnings.filterwarnings("ignore", category=FutureWarning)
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402
import _digits_dit as D  # noqa: E402
from _accuracy_mlp import ResMLP, ce_loss, load_mlp_data, mlp_batches, mlp_eval, train_mlp  # noqa: E402
from _accuracy_report import kind_table, save_grid, stat  # noqa: E402
import robuq_fx  # noqa: E402
from robuq_fx import ampn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---- settings -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    label: str
    w_bits: float = 1.58
    a_bits: int = 4  # uniform activation bits, or the AMPN average budget
    hadamard: str = "all"  # all | out (attention out + fc2 only) | none
    lrb: bool = True
    a_sym: bool | None = None
    a_clip: str = "absmax"
    ampn: tuple | None = None  # AMPN candidates; None = uniform bits
    a_group: int = 0  # activation ranges per token (0) or per token and a_group inputs (LayerSpec.a_group)

    @property
    def key(self) -> tuple:
        return (self.w_bits, self.a_bits, self.hadamard, self.lrb, self.a_sym, self.a_clip, self.ampn, self.a_group)


FP = Setting("FP", w_bits=0)
C4, C234 = (1, 2, 3, 4), (2, 3, 4)


def main_settings(h: str) -> list[Setting]:
    tag = "+H" if h == "all" else "no H"
    return [Setting(f"W4A4 {tag}", 4, 4, h), Setting(f"W1.58A4 {tag}", 1.58, 4, h),
            Setting(f"W1.58A3 {tag}", 1.58, 3, h), Setting(f"W1.58A2 {tag}", 1.58, 2, h),
            Setting(f"W1.58 AMPN-A3 {tag}", 1.58, 3, h, ampn=C4), Setting(f"W1.58 AMPN-A2 {tag}", 1.58, 2, h, ampn=C4)]


MAIN = {"no H": main_settings("none"), "+H": main_settings("all")}
ABLATION = [Setting("baseline: H on out/fc2 only, no LRB", 1.58, 3, "out", lrb=False),
            Setting("+ LRB", 1.58, 3, "out"),
            Setting("+ H on all block linears", 1.58, 3, "all")]
QUANTIZER = [Setting("A3 sym absmax", 1.58, 3, a_sym=True), Setting("A3 asym absmax", 1.58, 3, a_sym=False),
             Setting("A3 sym sigma", 1.58, 3, a_sym=True, a_clip="sigma"),
             Setting("A3 asym sigma", 1.58, 3, a_sym=False, a_clip="sigma"),
             Setting("A2 (asym) absmax", 1.58, 2), Setting("A2 (asym) sigma", 1.58, 2, a_clip="sigma")]
AMPN_ABL = [Setting("AMPN A2, candidates {1,2,3,4}", 1.58, 2, ampn=C4),
            Setting("AMPN A2, candidates {2,3,4}", 1.58, 2, ampn=C234), Setting("uniform A2", 1.58, 2)]
A_GROUP = 32  # the tiny models' widths are 64-256: 2-8 groups a row (DiT-XL/2's kernels would take 128)
ACT_GROUPS = [s for a, kw in (("W4A4", dict(w_bits=4, a_bits=4)), ("W1.58A4", dict(a_bits=4)),
                              ("W1.58A3 asym sigma", dict(a_bits=3, a_sym=False, a_clip="sigma")),
                              ("W1.58A2 sigma", dict(a_bits=2, a_clip="sigma")))
              for s in (Setting(f"{a}, per token", **kw), Setting(f"{a}, per {A_GROUP} inputs", a_group=A_GROUP, **kw))]
QUICK = [Setting("W1.58A2 +H", 1.58, 2), Setting("W1.58 AMPN-A2 +H", 1.58, 2, ampn=C4)]


def canonical(s: Setting) -> tuple:
    """a_sym=None resolves to True at >= 3 bits and False below: the same run as the explicit value."""
    sym = s.a_sym if s.a_sym is not None else s.a_bits >= 3
    return s.key[:4] + (sym,) + s.key[5:]


def all_settings(quick: bool, only: str | None = None) -> list[Setting]:
    if quick:
        return list(QUICK)
    out, seen = [], set()
    for s in (ACT_GROUPS if only == "a_group" else MAIN["no H"] + MAIN["+H"] + ABLATION + QUANTIZER + AMPN_ABL
              + ACT_GROUPS):
        if canonical(s) not in seen:
            seen.add(canonical(s))
            out.append(s)
    return out


def block_policy(s: Setting, rank: int, rot_out: list[str], rot_in: list[str], extra: list | None = None) -> dict:
    """Rules for the block linears: `rot_out` globs get the Hadamard for hadamard in (all, out), `rot_in` only for
    all. AMPN settings start from the highest candidate (the allocation sets each layer's bits)."""
    spec = {"w_bits": s.w_bits, "a_bits": max(s.ampn) if s.ampn else s.a_bits, "lora_rank": rank if s.lrb else 0,
            "a_clip": s.a_clip}
    if s.a_sym is not None:
        spec["a_sym"] = s.a_sym
    if s.a_group:
        spec["a_group"] = s.a_group
    rules = [{"match": g, **spec, "hadamard": s.hadamard in ("all", "out")} for g in rot_out]
    rules += [{"match": g, **spec, "hadamard": s.hadamard == "all"} for g in rot_in]
    return {"rules": rules + (extra or [])}


# ---- a. MLP -------------------------------------------------------------------------------------------------------
def mlp_policy(s: Setting, rank: int) -> dict:
    return block_policy(s, rank, ["blocks.*.fc2"], ["fc_in", "blocks.*.fc1"])


def run_mlp(args, settings, seed: int, log) -> tuple[dict, dict]:
    x_tr, y_tr, x_te, y_te = load_mlp_data()
    torch.manual_seed(seed)
    fp = ResMLP()
    train_mlp(fp, mlp_batches(x_tr, y_tr, 64, seed, args.epochs), args.lr)
    res = {"FP": mlp_eval(fp, x_te, y_te)}
    log(f"[mlp seed {seed}] FP acc {res['FP']['acc']:.2f} nll {res['FP']['nll']:.4f}")
    qat_batches = mlp_batches(x_tr, y_tr, 64, seed + 100, args.qat_epochs)
    calib = mlp_batches(x_tr, y_tr, 256, seed + 200)[:2]
    sens_cache, allocations = {}, {}
    for s in settings:
        torch.manual_seed(seed)
        policy = mlp_policy(s, args.lora_rank)
        if s.ampn:
            k = (s.hadamard, s.lrb, s.a_clip, s.a_sym)
            if k not in sens_cache:
                sens_cache[k] = ampn.measure(fp, policy, calib, C4, loss_fn=ce_loss, train_batches=qat_batches,
                                             warmup_steps=args.ampn_warmup_mlp, seed=seed, lr=args.qat_lr,
                                             progress=False)
            policy, report = ampn.allocate_from(sens_cache[k], s.a_bits, args.ampn_weight, s.ampn)
            allocations[s.label] = report
            if reuse_uniform(res, settings, s, report, "mlp", seed, log):
                continue
        q = robuq_fx.quantize(fp, policy)
        ptq = mlp_eval(q, x_te, y_te)["acc"]
        train_mlp(q, qat_batches, args.qat_lr)
        res[s.label] = {**mlp_eval(q, x_te, y_te), "ptq_acc": ptq}
        if s.ampn:
            res[s.label]["mean_bits"] = allocations[s.label].info["mean bits (MAC-weighted)"]
        log(f"[mlp seed {seed}] {s.label}: acc {res[s.label]['acc']:.2f} nll {res[s.label]['nll']:.4f} "
            f"(PTQ acc {ptq:.2f}){bits_note(s, allocations)}")
    return res, allocations


# ---- b. tiny DiT --------------------------------------------------------------------------------------------------
DIT_OUT = ["transformer_blocks.*.attn1.to_out.0", "transformer_blocks.*.ff.net.2"]
DIT_IN = ["re:transformer_blocks\\.\\d+\\.attn1\\.to_[qkv]", "transformer_blocks.*.ff.net.0.proj"]
ADALN = [{"match": "transformer_blocks.*.norm1.linear", "w_bits": 4, "a_bits": 4, "hadamard": True}]


def dit_policy(s: Setting, rank: int) -> dict:
    return block_policy(s, rank, DIT_OUT, DIT_IN, ADALN)


def dit_eval(model, diff, data, judge, args, seed: int) -> tuple[dict, torch.Tensor]:
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    samples = diff.sample(model, labels, steps=args.sample_steps, seed=10_000 + seed)
    return {"judged_acc": D.judged_accuracy(judge, samples, labels),
            "heldout_loss": diff.heldout_loss(model, data.x_test, data.y_test, seed=20_000 + seed)}, samples


def run_dit(args, settings, seed: int, data, judge, log) -> tuple[dict, dict, dict]:
    diff = D.Diffusion(args.timesteps)
    fp = D.build_dit(seed, args.dit_layers)
    D.train_diffusion(fp, diff, data, args.dit_steps, args.dit_lr, seed, progress=args.progress, desc="DiT FP")
    gm = D.capture_dit(fp, data)  # captured once; every setting quantizes this graph
    res, samples = {}, {}
    res["FP"], samples["FP"] = dit_eval(gm, diff, data, judge, args, seed)
    log(f"[dit seed {seed}] FP judged acc {res['FP']['judged_acc']:.1f} loss {res['FP']['heldout_loss']:.4f}")
    gen = torch.Generator().manual_seed(seed + 300)
    calib = [(data.x_train[i], data.y_train[i]) for i in torch.randperm(len(data.x_train), generator=gen)[:256]
             .split(128)]
    train = [(data.x_train[i], data.y_train[i]) for i in torch.randint(0, len(data.x_train), (64, 128), generator=gen)]

    def loss_fn(model, batch):  # global RNG: ampn.measure seeds it, so every sensitivity pass sees the same noise
        return diff.loss(model, batch[0], batch[1])

    sens_cache, allocations = {}, {}
    for s in settings:
        torch.manual_seed(seed)
        policy = dit_policy(s, args.lora_rank)
        if s.ampn:
            k = (s.hadamard, s.lrb, s.a_clip, s.a_sym)
            if k not in sens_cache:
                sens_cache[k] = ampn.measure(gm, policy, calib, C4, loss_fn=loss_fn, train_batches=train,
                                             warmup_steps=args.ampn_warmup_dit, seed=seed, lr=args.dit_qat_lr,
                                             layers=D.BLOCK_LINEARS, progress=False)
            policy, report = ampn.allocate_from(sens_cache[k], s.a_bits, args.ampn_weight, s.ampn)
            allocations[s.label] = report
            if reuse_uniform(res, settings, s, report, "dit", seed, log):
                samples[s.label] = samples[lookup(settings, uniform_of(s, report))]
                continue
        q = robuq_fx.quantize(gm, policy)
        D.train_diffusion(q, diff, data, args.dit_qat_steps, args.dit_qat_lr, seed + 1, progress=args.progress,
                          desc=f"DiT {s.label}")
        res[s.label], samples[s.label] = dit_eval(q, diff, data, judge, args, seed)
        if s.ampn:
            res[s.label]["mean_bits"] = allocations[s.label].info["mean bits (MAC-weighted)"]
        log(f"[dit seed {seed}] {s.label}: judged acc {res[s.label]['judged_acc']:.1f} "
            f"loss {res[s.label]['heldout_loss']:.4f}{bits_note(s, allocations)}")
    return res, allocations, samples


def uniform_of(s: Setting, report) -> Setting:
    b = report[0]["bits"]
    return Setting(f"uniform A{b}", s.w_bits, b, s.hadamard, s.lrb, s.a_sym, s.a_clip)


def reuse_uniform(res: dict, settings, s: Setting, report, model: str, seed: int, log) -> bool:
    """An allocation that gives every layer the same bits (e.g. candidates {2,3,4} at average 2: the only feasible
    choice) is the uniform setting: reuse its result instead of training the same model again."""
    if len({r["bits"] for r in report}) != 1:
        return False
    lab = lookup(settings, uniform_of(s, report))
    if lab is None or lab not in res:
        return False
    res[s.label] = dict(res[lab], same_as=lab)
    log(f"[{model} seed {seed}] {s.label}: every layer at A{report[0]['bits']}, the same model as '{lab}'")
    return True


def bits_note(s: Setting, allocations: dict) -> str:
    if not s.ampn:
        return ""
    info = allocations[s.label].info
    return f" [bits plain {info['mean bits (plain)']:.2f}, MAC-weighted {info['mean bits (MAC-weighted)']:.2f}]"


# ---- tables -------------------------------------------------------------------------------------------------------
def lookup(settings: list[Setting], s: Setting) -> str | None:
    """The label under which the run of `s` (or an identical one) was stored."""
    return next((r.label for r in settings if canonical(r) == canonical(s)), None)


NAMES = {"mlp": "MLP", "dit": "DiT"}
# (metric, column, digits, paired, scale): paired columns are the per-seed difference to the same seed's FP model,
# which shares the seed's init and data order: the seed-to-seed spread of the FP models cancels out of it.
COLUMNS = {"mlp": [("acc", "acc %", 2, False, 1), ("acc", "Δacc vs FP", 2, True, 1),
                   ("ptq_acc", "PTQ acc %", 2, False, 1)],
           "dit": [("judged_acc", "judged acc %", 1, False, 1), ("judged_acc", "Δacc vs FP", 1, True, 1),
                   ("heldout_loss", "held-out loss", 4, False, 1), ("heldout_loss", "Δloss vs FP ×1e3", 2, True, 1000)]}
ABLATION_COLUMNS = {"mlp": 2, "dit": 4}  # how many of COLUMNS[model] the side-by-side tables show


def make_tables(args, settings, results: dict[str, list[dict]]) -> dict[str, str]:
    def cell(model, s: Setting, col) -> str:
        metric, _, digits, paired, scale = col
        lab = "FP" if s is FP else lookup(settings, s)
        runs = [r for r in results[model] if lab in r and metric in r[lab]]
        if paired:
            return stat([(r[lab][metric] - r["FP"][metric]) * scale for r in runs], digits, sign=True)
        return stat([r[lab][metric] * scale for r in runs], digits)

    def wide(s: Setting) -> dict:  # the ablation tables: both models side by side
        return {f"{NAMES[m]} {col[1]}": cell(m, s, col) for m in results for col in COLUMNS[m][:ABLATION_COLUMNS[m]]}

    tables = {}
    groups_title = (f"c. activation ranges per token vs per token and {A_GROUP} inputs (LayerSpec.a_group; +H, "
                    f"LRB; issue 20)")
    if args.quick:
        tables["quick"] = [{"setting": s.label, **wide(s)} for s in [FP] + QUICK]
    elif args.only == "a_group":
        tables[groups_title] = [{"setting": s.label, **wide(s)} for s in [FP] + ACT_GROUPS]
    else:
        for m in results:
            title = {"mlp": "a. digits MLP", "dit": "b. tiny DiT"}[m]
            rows = []
            for a, b in zip([FP] + MAIN["no H"], [FP] + MAIN["+H"]):
                row = {"setting": a.label.replace(" no H", "")}
                for col in COLUMNS[m]:
                    row[f"{col[1]} no H"] = cell(m, a, col)
                    row[f"{col[1]} +H"] = cell(m, b, col)
                rows.append(row)
            tables[f"{title}: QAT settings without / with Hadamard (LRB rank {args.lora_rank})"] = rows
        tables["c. ablation at W1.58A3 (paper FID 41.6 -> 29.6 -> 20.8)"] = [{"step": s.label, **wide(s)}
                                                                              for s in ABLATION]
        tables["c. activation quantizer (W1.58, +H, LRB)"] = [{"setting": s.label, **wide(s)} for s in QUANTIZER]
        tables["c. AMPN candidates at average A2 (+H, LRB; {2,3,4} at A2 can only be uniform A2)"] = [
            {"setting": s.label, **wide(s)} for s in AMPN_ABL]
        tables[groups_title] = [{"setting": s.label, **wide(s)} for s in [FP] + ACT_GROUPS]
    return {k: tabulate(v, headers="keys", tablefmt="github", disable_numparse=True) for k, v in tables.items()}


# ---- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1; default 3)")
    p.add_argument("--epochs", type=int, default=40, help="MLP FP training epochs (default 40)")
    p.add_argument("--qat-epochs", type=int, default=10, help="MLP QAT epochs per setting (default 10)")
    p.add_argument("--lr", type=float, default=2e-3, help="MLP FP learning rate (Adam, cosine)")
    p.add_argument("--qat-lr", type=float, default=1e-3, help="MLP QAT learning rate")
    p.add_argument("--dit-layers", type=int, default=2, help="DiT blocks (default 2)")
    p.add_argument("--dit-steps", type=int, default=1500, help="DiT FP training steps, batch 128 (default 1500)")
    p.add_argument("--dit-qat-steps", type=int, default=100, help="DiT QAT steps per setting (default 100)")
    p.add_argument("--dit-lr", type=float, default=2e-3, help="DiT FP learning rate (AdamW, cosine)")
    p.add_argument("--dit-qat-lr", type=float, default=5e-4, help="DiT QAT learning rate")
    p.add_argument("--timesteps", type=int, default=100, help="diffusion steps T (default 100)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM sampling steps (default 25)")
    p.add_argument("--samples-per-class", type=int, default=20, help="generated digits per class (default 20)")
    p.add_argument("--lora-rank", type=int, default=8, help="LRB rank of the quantized block linears (default 8)")
    p.add_argument("--ampn-weight", choices=["macs", "plain"], default="macs", help="AMPN average (default macs)")
    p.add_argument("--ampn-warmup-mlp", type=int, default=None, help="AMPN warm-up steps, MLP (default: API's)")
    p.add_argument("--ampn-warmup-dit", type=int, default=60, help="AMPN warm-up steps, DiT (default 60)")
    p.add_argument("--models", default="mlp,dit", help="comma list of mlp, dit (default both)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny models on shared cores "
                   "run faster single-threaded)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 settings, a few steps")
    p.add_argument("--only", choices=["a_group"], default=None,
                   help="only one table's settings (a_group: per-token vs per-group activation ranges)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--progress", action="store_true", help="tqdm bars for the training loops")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.qat_epochs = 1, 2, 1
        args.dit_layers, args.dit_steps, args.dit_qat_steps, args.timesteps = 1, 10, 3, 20
        args.sample_steps, args.samples_per_class, args.ampn_warmup_mlp, args.ampn_warmup_dit = 5, 2, 5, 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    settings = all_settings(args.quick, args.only)
    log = lambda msg: print(f"{time.perf_counter() - t0:7.1f}s {msg}", flush=True)  # noqa: E731
    mlp, dit, mlp_alloc, dit_alloc, times = [], [], [], [], {}
    samples0 = None
    if "mlp" in models:
        t = time.perf_counter()
        for seed in range(args.seeds):
            r, a = run_mlp(args, settings, seed, log)
            mlp.append(r)
            mlp_alloc.append(a)
        times["mlp_s"] = round(time.perf_counter() - t, 1)
    if "dit" in models:
        t = time.perf_counter()
        data = D.load_digit_images()
        judge, real_acc = D.fit_judge(data)
        log(f"judge (logistic regression) accuracy on real held-out digits: {real_acc:.1f}%")
        for seed in range(args.seeds):
            r, a, smp = run_dit(args, settings, seed, data, judge, log)
            dit.append(r)
            dit_alloc.append(a)
            if seed == 0:
                samples0 = smp
        times["dit_s"] = round(time.perf_counter() - t, 1)
        times["judge_real_acc"] = real_acc

    results = {k: v for k, v in (("mlp", mlp), ("dit", dit)) if v}
    tables = make_tables(args, settings, results)
    runtime = time.perf_counter() - t0
    command = "python benchmarks/bench_accuracy.py" + "".join(f" {a}" for a in (argv if argv is not None
                                                                                else sys.argv[1:]))
    head = [f"command: {command}",
            f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}; "
            f"{args.seeds} seed(s); runtime {runtime:.0f} s ({times})",
            f"MLP: {args.epochs} FP epochs, {args.qat_epochs} QAT epochs/setting; fc_in + block linears quantized, head FP; "
            "accuracy / NLL on 360 held-out digits, PTQ = before QAT",
            f"DiT: {args.dit_layers} blocks, {args.dit_steps} FP steps, {args.dit_qat_steps} QAT steps/setting, "
            f"T={args.timesteps}, DDIM {args.sample_steps} steps, {args.samples_per_class} samples/class judged by "
            f"a logistic regression ({times.get('judge_real_acc', float('nan')):.1f}% on real held-out digits)",
            f"QAT settings: block linears only, LRB rank {args.lora_rank} unless stated; AMPN {args.ampn_weight}-"
            f"weighted average; mean ± sample std over seeds; Δ = paired difference to the same seed's FP model"]
    text = "\n".join(head) + "\n"
    for title, tab in tables.items():
        text += f"\n## {title}\n{tab}\n"
    for name, allocs in (("MLP", mlp_alloc), ("DiT", dit_alloc)):
        if allocs and any(allocs):
            text += f"\n## AMPN allocations, {name}: mean chosen bits per layer kind (mean over seeds)\n"
            text += kind_table(allocs) + "\n"
    print("\n" + text, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_accuracy" + (f"_{args.only}" if args.only else "")  # (a one-table run keeps the full run's files)
    (args.out / f"{stem}.txt").write_text(text)
    if samples0 is not None:
        save_grid(samples0, args.out / f"{stem}_dit_samples.png")
    result = {"command": command, "provenance": provenance(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "runtime_s": round(runtime, 1), "times": times, "torch": torch.__version__,
              "settings": [dict(vars(s)) for s in settings],
              "mlp": mlp, "dit": dit, "tables": tables,
              "ampn": {"mlp": [{k: v.to_dict() for k, v in a.items()} for a in mlp_alloc],
                       "dit": [{k: v.to_dict() for k, v in a.items()} for a in dit_alloc]}}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
