"""RobuQ on a byte-level Llama trained on the Python standard library: where activation outliers exist.

    python benchmarks/bench_lm.py                      # GPU: 8 x 512 Llama (~26 M), 3 QAT seeds, ~20 min on one H200
    python benchmarks/bench_lm.py --quick --out /tmp/x # CPU smoke run: 2 x 64 model, a slice of the data, < 1 min
    python benchmarks/bench_lm.py --minutes 30         # fit the QAT token budget to another time budget
    python benchmarks/bench_lm.py --qat-tokens 8e6     # fix it instead (the ETA is still printed)
    python benchmarks/bench_lm.py --devices cuda:0 cuda:1 --minutes 8  # the QAT jobs over two GPUs

1. data (benchmarks/_lm_data.py): the running interpreter's stdlib .py files without its test suites, bytes as
   tokens, a train / validation split by a hash of each file's relative path; exact byte counts printed.
2. FP model: transformers LlamaForCausalLM from a config, trained (bf16 autocast on GPU, fp32 master weights)
   until the validation BPB flattens; validation bits per byte (BPB); the input statistics of every linear that
   the QAT settings quantize (max |x| / RMS and kurtosis, before and after the block Hadamard rotation).
3. QAT settings from that one FP model, the same token budget each, --seeds data orders: PTQ (the quantized model
   before training) and QAT at W4A4, W1.58A4, W1.58A3, W1.58A2 without / with Hadamard (LRB rank --lora-rank
   everywhere); the ablation at W1.58A3 (Hadamard on o_proj / down_proj only without LRB -> + LRB -> + Hadamard on
   all linears); AMPN at average A3 and A2 (candidates 1-4, MAC-weighted, sensitivities after a QAT warm-up); the
   sigma-clipping and asymmetric variants at A3 / A2. Quantized: q/k/v/o_proj, gate/up/down_proj of every layer.
   Full precision: the embeddings, the norms and lm_head (not matched by the policy).
4. lowered vs QAT: seed 0's QAT model of every setting lowered (robuq_fx.lower: packed weights, robuq::qlinear)
   and evaluated on the same validation data; on GPU both in bf16, the lowered one on the GPU kernels.
Writes bench_lm_<gpu>.{txt,json,png} and summary_lm_<gpu>.json (--quick: bench_lm_quick.*, summary_lm_quick_*).

Budget: a probe (a few FP and QAT steps, one evaluation, one quantize and lower; ~10 s) measures this machine's
throughput; the QAT tokens per run are what --minutes leaves after the fixed work (FP training at most --fp-tokens,
evaluations, AMPN, quantize/lower, a 60 s allowance for Triton compilation), split evenly over the 48 runs (16
settings x 3 seeds), between --min-qat-steps and --max-qat-steps. The plan and the ETA are printed before training.
Rough expectation for one H200 (not measured yet): FP ~0.8 M tok/s, QAT ~0.4 M tok/s (eager, bf16 autocast), so
~180 steps of 64 x 512 (~6 M tokens) a run after ~80 M FP tokens.

--devices A B ...: the FP model, its control and the outlier statistics on A as above, then the QAT jobs (a uniform
setting at one seed; an AMPN seed) on one worker process per device, longest first from a shared queue
(benchmarks/_lm_workers.py); the results are the same as on one device. The planner divides the jobs' work (QAT
training, their evaluations, quantize / lower, AMPN) by the number of devices, not the FP work, so the same
--minutes gives about N times the QAT tokens per run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's deprecated LeafSpec on deepcopy
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _lm_data as L  # noqa: E402
import _lm_report as R  # noqa: E402
from _lm_settings import GROUPS, all_settings, policy, quantized_layers  # noqa: E402
from _provenance import gpu_tag, provenance, write_summary  # noqa: E402
import _lm_workers as W  # noqa: E402
from _lm_plan import MONITOR, plan, probe  # noqa: E402  (plan: also the tests)
import robuq_fx  # noqa: E402
from robuq_fx import ampn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---- runs ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def kernel_log():
    """Counts which qlinear kernel the registry picks per call (wraps kernels.qlinear.select_cached for the block)."""
    import importlib
    ql = importlib.import_module("robuq_fx.kernels.qlinear")  # the module (robuq_fx.kernels.qlinear is the op)
    counts, orig = Counter(), ql.select_cached

    def select(x, a):
        k = orig(x, a)
        counts[k.name] += 1
        return k
    ql.select_cached = select
    from robuq_fx import modules
    direct, modules._DIRECT[0] = modules._DIRECT[0], False  # every call through the op, so every call is counted
    try:
        yield counts
    finally:
        ql.select_cached = orig
        modules._DIRECT[0] = direct


def lowered_gap(q, qat_bpb: float, val, args, device) -> dict:
    """Seed 0's QAT model lowered and evaluated on the same windows. GPU: the QAT model cast to bf16 (QATLinear
    computes in the cast dtype from its fp32 masters) and lowered from that, both run in bf16 without autocast; the
    gap is against the QAT BPB as reported (bf16 autocast) and against the cast QAT model (kernels alone).
    A gap above GAP_TOL is re-measured with each kernel forced, to say which one breaks it."""
    cast = copy.deepcopy(q).to(torch.bfloat16) if device == "cuda" else q
    same = L.bpb(cast, val, args.eval_batch, device) if device == "cuda" else qat_bpb
    try:
        low = robuq_fx.lower(cast, progress=False)
        with kernel_log() as used:
            low_bpb = L.bpb(low, val, args.eval_batch, device)
    except Exception as e:  # noqa: BLE001 - a kernel failing on one setting must not lose the other settings' results
        return {"qat_bpb": qat_bpb, "qat_cast_bpb": same, "lowered_bpb": None, "gap": None, "gap_same_dtype": None,
                "kernels": {}, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    out = {"qat_bpb": qat_bpb, "qat_cast_bpb": same, "lowered_bpb": low_bpb, "gap": abs(low_bpb - qat_bpb),
           "gap_same_dtype": abs(low_bpb - same), "kernels": dict(used)}
    if max(out["gap"], out["gap_same_dtype"]) > R.GAP_TOL:
        forced = {}
        for row in robuq_fx.kernels.available():
            if row["available"]:
                try:
                    with robuq_fx.kernels.use(row["kernel"]):
                        forced[row["kernel"]] = L.bpb(low, val, args.eval_batch, device)
                except RuntimeError as e:
                    forced[row["kernel"]] = f"cannot run every call: {str(e)[:120]}"
        out["forced_kernels_bpb"] = forced
    return out


def run_setting(s, fp, args, corpus, val, ids, device, bar, log, seed_policy=None, seeds=None, ptq=True) -> dict:
    """PTQ and QAT over the seeds for one uniform setting (quantized once, copied per seed), or one AMPN seed
    (seed_policy = (seed, its allocated policy)). seeds: a subset (a worker's job, _lm_workers.py; default all of
    them); ptq=False leaves the PTQ evaluation to the job of seed 0 ("ptq_bpb" None)."""
    amp = device == "cuda"
    pol = seed_policy[1] if seed_policy else policy(s, args.lora_rank, args.hadamard_block)
    seeds = [seed_policy[0]] if seed_policy else list(range(args.seeds) if seeds is None else seeds)
    q0 = robuq_fx.quantize(fp, pol, (ids,))
    out = {"ptq_bpb": L.bpb(q0, val, args.eval_batch, device, amp) if ptq else None, "bpb": [], "seeds": seeds}
    for i, seed in enumerate(seeds):
        q = q0 if i == len(seeds) - 1 else copy.deepcopy(q0)
        bar.set_postfix_str(f"{s.label} seed {seed}")
        L.train_qat(q, L.train_batches(corpus.train, args.qat_steps, args.batch, args.ctx, 1000 + seed, device),
                    args.qat_lr, amp, bar)
        out["bpb"].append(L.bpb(q, val, args.eval_batch, device, amp))
        log(f"{s.label} seed {seed}: " + (f"PTQ {out['ptq_bpb']:.4f} -> " if ptq else "")
            + f"QAT {out['bpb'][-1]:.4f} BPB")
        if seed == 0:
            out["lowered"] = lowered_gap(q, out["bpb"][-1], val, args, device)
            g = out["lowered"]
            log(f"{s.label}: lowered: {g['error']}" if "error" in g else
                f"{s.label}: lowered {g['lowered_bpb']:.4f} BPB, |gap| {g['gap']:.2e} (kernels {g['kernels']})")
    return out


def run_ampn_seed(settings, fp, args, corpus, val, ids, device, bar, log, n_layers, seed) -> dict:
    """One AMPN seed: sensitivities after a QAT warm-up, then each AMPN setting's allocation trained (run_setting).
    Returns {key: {"run": run_setting's result, "mean_bits": {...}, "alloc": {...}}}, plain data (merge_ampn)."""
    amp = device == "cuda"
    base = policy(settings[0], args.lora_rank, args.hadamard_block)
    bar.set_postfix_str(f"AMPN sensitivity seed {seed}")
    calib = L.train_batches(corpus.train, 1, args.ampn_calib, args.ctx, 3000 + seed, device)
    calib = list(calib[0].split(max(1, args.eval_batch // 2)))
    warm = L.train_batches(corpus.train, args.ampn_warmup, args.batch, args.ctx, 2000 + seed, device)
    sens = ampn.measure(fp, base, calib, (1, 2, 3, 4), loss_fn=lambda m, b: L.lm_loss(m, b, amp),
                        warmup_steps=args.ampn_warmup, train_batches=warm, seed=seed, lr=args.qat_lr,
                        example_inputs=(ids,), layers=quantized_layers(n_layers), progress=False)
    bar.update(args.ampn_warmup * args.batch * args.ctx)
    out = {}
    for s in settings:
        pol, rep = ampn.allocate_from(sens, s.a_bits, args.ampn_weight)
        r = run_setting(s, fp, args, corpus, val, ids, device, bar, log, seed_policy=(seed, pol))
        out[s.key] = {"run": r, "mean_bits": {"plain": rep.info["mean bits (plain)"],
                                              "macs": rep.info["mean bits (MAC-weighted)"]},
                      "alloc": {"summary": rep.summary, "info": rep.info,
                                "bits": {row["layer"]: row["bits"] for row in rep}}}
        log(f"{s.label} seed {seed}: mean bits plain {rep.info['mean bits (plain)']:.2f}, MAC-weighted "
            f"{rep.info['mean bits (MAC-weighted)']:.2f}")
    return out


def merge_ampn(settings, per_seed: list[dict]) -> tuple[dict, dict]:
    """run_ampn_seed's results, in seed order, as the results (res[key]) and allocations (allocs[key], one per
    seed) of the AMPN settings."""
    res = {s.key: {"ptq_bpb": [], "bpb": [], "seeds": [], "mean_bits": []} for s in settings}
    allocs = {s.key: [] for s in settings}
    for one in per_seed:
        for s in settings:
            r = one[s.key]["run"]
            for k in ("bpb", "seeds"):
                res[s.key][k] += r[k]
            res[s.key]["ptq_bpb"].append(r["ptq_bpb"])
            res[s.key]["mean_bits"].append(one[s.key]["mean_bits"])
            if "lowered" in r:
                res[s.key]["lowered"] = r["lowered"]
            allocs[s.key].append(one[s.key]["alloc"])
    return res, allocs


def run_ampn(settings, fp, args, corpus, val, ids, device, bar, log, n_layers) -> tuple[dict, dict]:
    return merge_ampn(settings, [run_ampn_seed(settings, fp, args, corpus, val, ids, device, bar, log, n_layers,
                                               seed) for seed in range(args.seeds)])


def fp_phase(args, cfg, corpus, val, n_layers, bar, log) -> tuple:
    """The fixed work on the (first) device: the FP model trained, its validation BPB, the outlier statistics of
    its quantized linears' inputs and the FP control. Returns (fp, fp_run, fp_bpb, outliers, control)."""
    device, amp = args.device, args.device == "cuda"
    fp = L.build_model(cfg, args.fp_seed, device)
    log(f"model: LlamaForCausalLM {n_layers} x {cfg['hidden_size']} (MLP {cfg['intermediate_size']}, "
        f"{cfg['num_attention_heads']} heads), context {args.ctx}, vocab 256: {L.n_params(fp) / 1e6:.2f} M parameters")
    bar.set_postfix_str("FP")
    fp_run = L.train_fp(fp, corpus.train, args.fp_tokens, args.batch, args.ctx, args.lr, args.fp_seed, device, amp,
                        val[:MONITOR], args.eval_every, bar=bar, log=log)
    bar.total = bar.total - args.fp_tokens + fp_run["tokens"]
    fp_bpb = L.bpb(fp, val, args.eval_batch, device, amp)
    log(f"FP: {fp_run['steps']} steps ({fp_run['tokens']:.3g} tokens), validation {fp_bpb:.4f} BPB "
        f"({val.shape[0] * args.ctx} predicted bytes)")
    outliers = L.outlier_stats(fp, quantized_layers(n_layers), val[:min(16, len(val))], args.hadamard_block,
                               device, amp)

    control = L.fp_control(fp, corpus.train, args.seeds, args.qat_steps, args.batch, args.ctx, args.qat_lr, device,
                           amp, val, args.eval_batch, bar)
    log("FP control (FP trained on for one QAT run's budget, QAT schedule): "
        + ", ".join(f"seed {i} {b:.4f}" for i, b in enumerate(control)) + " BPB")
    return fp, fp_run, fp_bpb, outliers, control


def qat_phase(settings, fp, args, corpus, val, ids, n_layers, bar, log, save) -> tuple[dict, dict]:
    """Every setting on the one device, in order: the uniform ones (save(res) after each), then AMPN."""
    res, allocs = {}, {}
    for s in settings:
        if not s.ampn:
            res[s.key] = run_setting(s, fp, args, corpus, val, ids, args.device, bar, log)
            save(res)
    ampn_settings = [s for s in settings if s.ampn]
    if ampn_settings:
        r, allocs = run_ampn(ampn_settings, fp, args, corpus, val, ids, args.device, bar, log, n_layers)
        res.update(r)
    return res, allocs


# ---- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 2 x 64 model, a data slice, 1 seed, "
                   "a few hundred FP steps, 20 QAT steps per setting")
    p.add_argument("--settings", default=None, help="comma list of setting keys to run (default: all; keys as in "
                   "the summary, e.g. w158a3h,ampn_a2)")
    p.add_argument("--seeds", type=int, default=None, help="QAT data-order seeds (default 3; --quick: 1)")
    p.add_argument("--minutes", type=float, default=20.0, help="time budget the QAT tokens are fitted to (default 20)")
    p.add_argument("--qat-tokens", type=float, default=0, help="QAT tokens per run (default 0: fit to --minutes)")
    p.add_argument("--min-qat-steps", type=int, default=50, help="floor of the fitted QAT steps (default 50)")
    p.add_argument("--max-qat-steps", type=int, default=1000, help="cap of the fitted QAT steps (default 1000)")
    p.add_argument("--fp-tokens", type=float, default=80e6, help="FP training tokens at most (default 8e7)")
    p.add_argument("--batch", type=int, default=64, help="sequences per training step (default 64)")
    p.add_argument("--ctx", type=int, default=512, help="context in bytes (default 512)")
    p.add_argument("--lr", type=float, default=1e-3, help="FP peak learning rate (AdamW; default 1e-3)")
    p.add_argument("--qat-lr", type=float, default=3e-4, help="QAT peak learning rate (default 3e-4)")
    p.add_argument("--eval-every", type=int, default=200, help="FP validation every N steps (default 200)")
    p.add_argument("--eval-batch", type=int, default=64, help="sequences per evaluation batch (default 64)")
    p.add_argument("--val-percent", type=float, default=5.0, help="files hashed to validation (default 5%%)")
    p.add_argument("--val-windows", type=int, default=None, help="cap on validation windows (default: all)")
    p.add_argument("--lora-rank", type=int, default=32, help="LRB rank (default 32, METHOD.md)")
    p.add_argument("--hadamard-block", type=int, default=128, help="Hadamard block (default 128)")
    p.add_argument("--ampn-weight", choices=["macs", "plain"], default="macs", help="AMPN average (default macs)")
    p.add_argument("--ampn-warmup", type=int, default=100, help="AMPN QAT warm-up steps per seed (default 100)")
    p.add_argument("--ampn-calib", type=int, default=32, help="AMPN calibration sequences (default 32)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the file split hash (default 0)")
    p.add_argument("--fp-seed", type=int, default=0, help="FP init / data-order seed (default 0)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even where CUDA is available")
    p.add_argument("--devices", nargs="+", default=None, metavar="DEV",
                   help="devices of the QAT jobs, one worker process each (e.g. cuda:0 cuda:1; cpu cpu for a test); "
                   "the FP model trains on the first. Default: the one device, no worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.ctx, args.eval_batch, args.eval_every = 8, 64, 32, 100
        args.fp_tokens, args.qat_tokens = 300 * 8 * 64, args.qat_tokens or 20 * 8 * 64
        args.val_windows, args.lora_rank, args.ampn_warmup, args.ampn_calib = 64, 8, 5, 8
        args.min_qat_steps, args.hadamard_block, args.threads = 1, 64, args.threads or 1
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.fp_tokens, args.qat_tokens = int(args.fp_tokens), int(args.qat_tokens)
    args.device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.devices is None:
        args.devices = [args.device]
    else:  # args.device: their type ("cuda" / "cpu": autocast, synchronisation); each process sets its own index
        kinds = {torch.device(d).type for d in args.devices}
        if len(kinds) != 1 or kinds - {"cuda", "cpu"}:
            p.error(f"--devices: one kind, cuda or cpu (got {' '.join(args.devices)})")
        args.device = kinds.pop()
        if args.device == "cuda" and (args.cpu or not torch.cuda.is_available()):
            p.error("--devices cuda:...: " + ("--cpu given" if args.cpu else "CUDA is not available"))
        bad = [d for d in args.devices
               if args.device == "cuda" and (torch.device(d).index or 0) >= torch.cuda.device_count()]
        if bad:
            p.error(f"--devices: {' '.join(bad)} not present ({torch.cuda.device_count()} CUDA devices)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and torch.device(args.devices[0]).index is not None:
        torch.cuda.set_device(args.devices[0])  # "cuda" below is the first of --devices
    device, amp = args.device, args.device == "cuda"
    log = lambda msg: tqdm.write(f"{time.perf_counter() - t0:7.1f}s {msg}")  # noqa: E731
    corpus = L.load_corpus(args.data_seed, args.val_percent, max_train_bytes=2_000_000 if args.quick else None,
                           max_val_bytes=100_000 if args.quick else None)
    ci = corpus.info
    log(f"data: Python {ci['python']} stdlib {ci['stdlib']}, {ci['files_found']} .py files without "
        f"{'/, '.join(L.EXCLUDED_DIRS)}/{'; a quick slice' if ci['sliced'] else ''}: train {ci['train_files']} files "
        f"{ci['train_source_bytes']} bytes ({ci['train_stream_bytes']} with separators), validation "
        f"{ci['val_files']} files {ci['val_source_bytes']} bytes ({ci['val_stream_bytes']})")
    cfg = dict(L.QUICK if args.quick else L.FULL, max_position_embeddings=args.ctx)
    val = L.eval_windows(corpus.val, args.ctx, args.val_windows)
    ids = val[:2, :-1].long().to(device)
    settings = all_settings(args.settings)
    n_layers = cfg["num_hidden_layers"]
    speed = probe(args, cfg, corpus, val, ids, device)
    pl = plan(args, settings, n_layers, val.shape[0] * args.ctx, speed, time.perf_counter() - t0)
    args.qat_steps = pl["qat_steps"]
    log(f"throughput ({device}): FP {speed['fp_tok_s']:.3g} tok/s, QAT W1.58A3+H {speed['qat_tok_s']:.3g} tok/s "
        f"(sigma clipping {speed['qat_sigma_tok_s']:.3g}), "
        f"eval {speed['eval_tok_s']:.3g} tok/s; quantize {speed['quantize_s']:.2f} s, lower {speed['lower_s']:.2f} s")
    on = f" (FP on {args.devices[0]}, QAT jobs on {', '.join(args.devices)})" if len(args.devices) > 1 else ""
    log(f"plan{on}: FP <= {args.fp_tokens:.3g} tokens; {pl['qat_runs']} QAT runs x {pl['qat_steps']} steps x "
        f"{args.batch} x {args.ctx} = {pl['qat_tokens']:.3g} tokens each ({len(settings)} settings x {args.seeds} "
        f"seeds); fixed work {pl['fixed_s']}; ETA {pl['eta_s'] / 60:.1f} min"
        + (f" (budget {args.minutes:g} min)" if pl["budget_s"] else ""))

    total = args.fp_tokens + pl["qat_runs"] * pl["qat_tokens"] + args.seeds * args.ampn_warmup * args.batch * args.ctx
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="bench_lm", disable=args.no_progress, smoothing=0.05)
    # the workers start now: their imports and CUDA initialisation overlap the FP training
    pool = W.Pool(args, log) if len(args.devices) > 1 else None
    try:
        fp, fp_run, fp_bpb, outliers, control = fp_phase(args, cfg, corpus, val, n_layers, bar, log)
        # kept if a later step dies
        partial = args.out / f"bench_lm_{'quick' if args.quick else gpu_tag()}.partial.json"
        save = lambda res: R.save_partial(partial, fp_bpb=fp_bpb, fp=fp_run, fp_control_bpb=control,  # noqa: E731
                                          outliers=outliers, results=res)
        if pool is None:
            res, allocs = qat_phase(settings, fp, args, corpus, val, ids, n_layers, bar, log, save)
        else:  # the same jobs on the worker processes, merged into the same structures
            res, allocs = W.run_jobs(pool, settings, fp, cfg, corpus, val, args, speed, n_layers, bar, save)
    finally:
        if pool is not None:
            pool.close()
    bar.close()
    runtime = time.perf_counter() - t0

    tables = R.make_tables(GROUPS, settings, res, fp_bpb, allocs, control)
    prov = provenance(argv)
    prov["devices"] = args.devices
    head = [f"command: {prov['command']}",
            f"commit {prov['commit']}; {prov['gpu']}; devices {', '.join(args.devices)}; torch {prov['torch']}; "
            f"Python {ci['python']}; {prov['date']}; "
            f"runtime {runtime / 60:.1f} min (planned {pl['eta_s'] / 60:.1f})",
            f"data: {ci['train_files']} train files / {ci['train_source_bytes']} bytes, {ci['val_files']} validation "
            f"files / {ci['val_source_bytes']} bytes of the stdlib .py files (without {', '.join(L.EXCLUDED_DIRS)} "
            f"folders{', a quick slice' if ci['sliced'] else ''}); {val.shape[0] * args.ctx} validation bytes scored",
            f"model: LlamaForCausalLM {n_layers} x {cfg['hidden_size']}, {L.n_params(fp) / 1e6:.2f} M params, "
            f"context {args.ctx}; FP {fp_run['tokens']:.3g} tokens (decay started by {fp_run['decay_started_by']}"
            + (f"; weights of step {fp_run['restored_step']} restored, the best evaluated"
               if fp_run.get("restored_step") else "")
            + f"), validation BPB {fp_bpb:.4f}; {'bf16 autocast' if amp else 'fp32'}",
            f"FP: BPB of the first {MONITOR} validation windows by step: "
            + ", ".join(f"{h['step']}: {h['val_bpb']:.3f}" for h in fp_run["curve"]),
            f"speed: FP {speed['fp_tok_s']:.3g}, QAT {speed['qat_tok_s']:.3g} (sigma {speed['qat_sigma_tok_s']:.3g}), "
            f"eval {speed['eval_tok_s']:.3g} tok/s; planned {pl['qat_steps']} QAT steps a run "
            f"({'fitted to ' + format(args.minutes, 'g') + ' min' if pl['budget_s'] else '--qat-tokens'})",
            f"QAT: {pl['qat_tokens']:.3g} tokens per run (batch {args.batch} x {args.ctx}, lr {args.qat_lr}), "
            f"{args.seeds} seed(s); q/k/v/o, gate/up/down quantized, LRB rank {args.lora_rank}, Hadamard block "
            f"{args.hadamard_block}; embeddings, norms and lm_head full precision; AMPN {args.ampn_weight}-weighted, "
            f"candidates 1-4, {args.ampn_warmup} warm-up steps"]
    text = "\n".join(head) + "\n\n## outliers: inputs of the quantized linears of the FP model (before / +H)\n"
    text += "(median / max over layers; kurtosis of a normal distribution = 3; token = per-token figures, mean " \
        "over tokens)\n"
    text += tabulate(R.outlier_table(outliers), headers="keys", tablefmt="github", disable_numparse=True) + "\n"
    for title, rows in tables.items():
        text += f"\n## {title}\n" + tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True) + "\n"
    print("\n" + text, flush=True)

    tag = "quick" if args.quick else gpu_tag(prov["gpu"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_lm_{tag}.txt").write_text(text + "\nper-layer outlier statistics:\n"
                                                  + tabulate(outliers, headers="keys", tablefmt="github") + "\n")
    png = R.save_png(GROUPS, settings, res, fp_bpb, args.out / f"bench_lm_{tag}.png",
                     f"byte-level Llama on the Python {ci['python']} stdlib, {prov['gpu']}")
    extra = {"lm_params": L.n_params(fp), "lm_fp_tokens": fp_run["tokens"], "lm_qat_tokens_per_run": pl["qat_tokens"],
             "lm_seeds": args.seeds, "runtime_s": round(runtime, 1), "eta_s": pl["eta_s"], "quick": args.quick}
    figures = R.summary(settings, res, fp_bpb, outliers, ci, extra, control)
    result = {"provenance": prov, "devices": args.devices,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "data": ci, "model": cfg, "speed": speed, "plan": pl, "fp": {"bpb": fp_bpb, **fp_run},
              "outliers": outliers, "settings": [asdict(s) for s in settings], "results": res, "ampn": allocs,
              "tables": tables, "summary": figures, "fp_control_bpb": control, "kernels": robuq_fx.kernels.available(), "runtime_s": runtime}
    (args.out / f"bench_lm_{tag}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    partial.unlink(missing_ok=True)
    path = write_summary(args.out, "lm_quick" if args.quick else "lm", figures, argv)
    log(f"wrote {args.out}/bench_lm_{tag}.{{txt,json{',png' if png else ''}}} and {path.name}")
    return result


if __name__ == "__main__":
    main()
