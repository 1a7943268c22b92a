"""bench_lm's time budget: the throughput probe and the plan that fits the QAT token budget to --minutes (split out
of bench_lm.py)."""
from __future__ import annotations

import copy
import time

import torch

import _lm_data as L
from _lm_settings import MAIN, QUANTIZER, policy
import robuq_fx

MONITOR = 512  # validation windows scored while the FP model trains (the first ones: the same every time)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def probe(args, cfg, corpus, val, ids, device) -> dict:
    """Tokens/s of FP and QAT training steps and of evaluation, and the time of quantize() and lower(), measured on
    an untrained model of the benchmark's shape (the speed does not depend on the weights)."""
    amp = device == "cuda"
    warm, n = (1, 2) if args.quick else (3, 6)
    batches = L.train_batches(corpus.train, warm + n, args.batch, args.ctx, 12345, device)
    m = L.build_model(cfg, 0, device)

    def steps(model):
        opt = L.make_opt(model, 1e-5, 0.0, device)
        for b in batches[:warm]:
            L.step(model, opt, b, 1e-5, amp)
        sync(device)
        t = time.perf_counter()
        for b in batches[warm:]:
            L.step(model, opt, b, 1e-5, amp)
        sync(device)
        return n * args.batch * args.ctx / (time.perf_counter() - t)

    out = {"fp_tok_s": steps(m)}
    t = time.perf_counter()
    q = robuq_fx.quantize(m, policy(MAIN["+H"][2], args.lora_rank, args.hadamard_block), (ids,))
    out["quantize_s"] = time.perf_counter() - t
    out["qat_tok_s"] = steps(q)
    # sigma clipping runs the torch quantizer (the Triton row kernel takes absmax only): timed on its own
    out["qat_sigma_tok_s"] = steps(robuq_fx.quantize(m, policy(QUANTIZER[2], args.lora_rank, args.hadamard_block),
                                                     (ids,)))
    k = min(len(val), 2 * args.eval_batch)
    L.bpb(q, val[:args.eval_batch], args.eval_batch, device, amp)
    sync(device)
    t = time.perf_counter()
    L.bpb(q, val[:k], args.eval_batch, device, amp)
    sync(device)
    out["eval_tok_s"] = k * args.ctx / (time.perf_counter() - t)
    t = time.perf_counter()
    try:
        robuq_fx.lower(copy.deepcopy(q).to(torch.bfloat16) if device == "cuda" else q, progress=False)
    except Exception as e:  # noqa: BLE001 - lowered_gap records the error per setting
        print(f"probe: lower() failed ({type(e).__name__}: {e}); the lowered-vs-QAT rows will say so")
    out["lower_s"] = time.perf_counter() - t
    return {k: round(v, 2) for k, v in out.items()}


def plan(args, settings, n_layers: int, val_tokens: int, speed: dict, elapsed: float) -> dict:
    """The QAT token budget per run: what --minutes leaves after the fixed work, split over the runs (or
    --qat-tokens as given), and the ETA. With N --devices the QAT jobs' work (training, their evaluations,
    quantize / lower, AMPN) is divided by N (the worker processes run in parallel, balanced by _lm_workers); the FP
    model, its control and its evaluations run on the first device before the jobs and are not divided."""
    tok = args.batch * args.ctx
    seeds = args.seeds
    n = len(args.devices)
    uniform = [s for s in settings if not s.ampn]
    n_ampn = len(settings) - len(uniform)
    runs = (len(uniform) + n_ampn) * seeds
    # seconds per QAT token summed over the runs (divided over the devices)
    per_token = seeds * sum(1 / speed["qat_sigma_tok_s" if s.a_clip == "sigma" else "qat_tok_s"] for s in settings) / n
    per_token += seeds / speed["fp_tok_s"]  # the FP control: the FP model trained on for the same budget
    job_evals = len(uniform) * (1 + seeds) + 2 * n_ampn * seeds + len(settings) * (2 if args.device == "cuda" else 1)
    evals = seeds + job_evals / n  # the FP control's, and the jobs' (PTQ, QAT, lowered) divided
    fp_evals = (args.fp_tokens // tok // args.eval_every + 2) * min(1.0, MONITOR / max(1, val_tokens // args.ctx))
    passes = (1 + 3 * 7 * n_layers) if n_ampn else 0
    quantizes = len(uniform) * (seeds if n > 1 else 1) + 2 * n_ampn * seeds + (seeds if n_ampn else 0)  # a job each
    fixed = {"FP training (at most)": args.fp_tokens / speed["fp_tok_s"],
             "evaluations": (evals + fp_evals + 1) * val_tokens / speed["eval_tok_s"],
             "AMPN warm-up + sensitivity": (seeds * (args.ampn_warmup * tok / speed["qat_tok_s"]
                                                     + passes * args.ampn_calib * args.ctx / speed["eval_tok_s"]) / n
                                            if n_ampn else 0.0),
             "quantize / lower": (quantizes * speed["quantize_s"] + len(settings) * speed["lower_s"]) / n,
             "startup, data, probe": elapsed,
             # first calls of each Triton kernel variant (row fake-quant per bit width, fp8 quantizer and GEMM per
             # shape): a guess, not measured by the probe
             "kernel compilation (allowance)": 60.0 if args.device == "cuda" else 0.0}
    if n > 1:  # workers start while the FP model trains; left: loading the FP state, first kernel calls (a guess)
        fixed["worker start-up (allowance)"] = 20.0 if args.device == "cuda" else 2.0
    if args.qat_tokens:
        qat_steps = max(1, int(args.qat_tokens) // tok)
    else:
        left = args.minutes * 60 - sum(fixed.values())
        qat_steps = min(args.max_qat_steps, max(args.min_qat_steps, int(left / per_token / tok)))
    eta = sum(fixed.values()) + qat_steps * tok * per_token
    return {"qat_steps": qat_steps, "qat_tokens": qat_steps * tok, "qat_runs": runs,
            "fixed_s": {k: round(v, 1) for k, v in fixed.items()}, "eta_s": round(eta, 1),
            "budget_s": None if args.qat_tokens else args.minutes * 60}


