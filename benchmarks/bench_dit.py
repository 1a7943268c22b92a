"""DiT-XL/2 end to end: bf16 eager / bf16 torch.compile / robuq (W4A4+H, W1.58A4+H, the paper's policy) compiled.

    python benchmarks/bench_dit.py                      # GPU: DiT-XL/2 (random init), batches 1 8 64
    python benchmarks/bench_dit.py --quick              # CPU smoke run on a 2-layer DiT (checks the script)

Per setting and batch: forward latency (median of CUDA-event timings after warm-up) and ratio vs bf16
torch.compile measured in the same run; peak memory; resident bytes of the quantized layers' weights vs bf16;
packed checkpoint size vs the bf16 safetensors; one QAT training step (batch 16) vs the FP training step; the CPU
time of quantize + lower. Prints tabulate tables (GPU name, torch version in the header), writes JSON (+ PNG when
matplotlib is installed) to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import gpu_tag, provenance, write_summary  # noqa: E402
import robuq_fx  # noqa: E402

from _dit_setup import (PAPER, PAPER_A2, PAPER_A3, TINY, XL2, build, inputs, policies,  # noqa: E402,F401
                        model_bytes, quantized_weight_bytes, timeit)
from _dit_report import (SUMMARY_KEYS, _env_variant, _set_env, env_tags, plot, summary,  # noqa: E402,F401
                         summary_key)
from _dit_train import train_rows  # noqa: E402


# the opt-in inference kernels in force name the rows (" +gluonquant" ...), so that a run with them does not overwrite
# the default rows' summary keys
INFER_OPT_IN = env_tags((("ROBUQ_QUANT_KERNEL", "gluon", "+gluonquant"),
                         ("ROBUQ_FP8_GEMM_KERNEL", "gluon", "+gluongemm"),
                         ("ROBUQ_FP8_FUSED_QUANT", "1", "+fusedquant"),
                         ("ROBUQ_FP8_FUSED_QUANT", "ws", "+fusedws"),
                         ("ROBUQ_FP8_EPI", "stacked", "+stacked"),
                         ("ROBUQ_STACKED_QUANT", "fused", "+fusedcodes"),
                         ("ROBUQ_QUANT_KERNEL", "mma", "+mmaquant")))



def _gelu_form() -> str:
    """" fast" where ROBUQ_GELU_FORM=fast computes the fused tanh GELU in its sigmoid form (own rows and summary keys,
    e.g. w4a4h_gelu_fused_fast_b64_x), else ""."""
    return " fast" if os.environ.get("ROBUQ_GELU_FORM") == "fast" else ""

def default_mode_rows(fp_dev, cfg, device, dtype, ex, args, rows: list, save=lambda: None) -> list[dict]:
    """bf16 and W4A4+H at batch 8 under torch.compile's default mode (no CUDA graphs): where per-call CPU cost
    shows (issue 17, item 6)."""
    import torch._inductor.config as ic
    x = inputs(cfg, 8, device, dtype)
    low = robuq_fx.lower(robuq_fx.quantize(fp_dev, policies()["robuq W4A4+H"], example_inputs=ex), progress=False)
    # qlinear decomposed into our Triton kernels inside Inductor's graph (ROBUQ_INDUCTOR_DECOMPOSE's default), then
    # kept as one opaque op a layer ("qat"); compiled from scratch each time (compile time is part of what the rows
    # compare; the caches do key on the switch since session 12: kernels/compile_cache.py)
    runs = [("bf16 torch.compile (default)", fp_dev, None, False), ("robuq W4A4+H", low, "qat,qlinear", False),
            ("robuq W4A4+H, opaque op", low, "qat", False)]
    if args.cpp_wrapper_rows:  # Inductor's C++ wrapper launches the kernels without Python: both sides again
        runs += [("bf16 torch.compile (default, C++ wrapper)", fp_dev, None, True),
                 ("robuq W4A4+H (C++ wrapper)", low, "qat,qlinear", True)]
    old = os.environ.get("ROBUQ_INDUCTOR_DECOMPOSE")
    with torch.no_grad(), ic.patch(force_disable_caches=True):
        low(**x)
        for name, model, mode, cpp in runs:
            if mode is not None:
                os.environ["ROBUQ_INDUCTOR_DECOMPOSE"] = mode
            try:
                with ic.patch(cpp_wrapper=cpp):
                    fn = torch.compile(model)
                    ms = timeit(lambda: fn(**x), args.iters, args.warmup, device)
            except Exception as e:  # noqa: BLE001 - a C++-wrapper build that fails is a row saying so
                if not cpp:
                    raise
                print(f"  default mode {name}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                ms = float("nan")
            finally:
                if old is None:
                    os.environ.pop("ROBUQ_INDUCTOR_DECOMPOSE", None)
                else:
                    os.environ["ROBUQ_INDUCTOR_DECOMPOSE"] = old
            rows.append({"setting": name, "batch": 8, "ms": round(ms, 3), "cpp": cpp})
            save()
            print(f"  default mode {name:40s} batch   8: {ms:8.3f} ms", flush=True)
            torch._dynamo.reset()
    base = {r["cpp"]: r["ms"] for r in rows if r["setting"].startswith("bf16")}
    for r in rows:  # against bf16 compiled the same way (Python or C++ wrapper)
        r["x vs bf16 torch.compile (default)"] = round(base[r.pop("cpp")] / r["ms"], 3)
    return rows



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny 2-layer DiT on CPU (smoke run)")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile rows (eager only)")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--skip-train", action="store_true", help="skip the QAT training-step rows")
    ap.add_argument("--train-modes", nargs="+", choices=["eager", "compiled", "cudagraphs", "cppwrapper", "combo",
                                                            "backend", "regional", "regional-cg"],
                    default=["eager", "compiled"],
                    help="which training-step rows, each against FP in the same mode (default eager and compiled; "
                         "cudagraphs: both under torch.compile mode=reduce-overhead; cppwrapper / combo: default "
                         "mode with Inductor's C++ wrapper / its combo kernels; regional / regional-cg: "
                         "robuq_fx.compile_repeated_blocks on both sides, default mode / reduce-overhead)")
    ap.add_argument("--step-weights", choices=["off", "on", "both"], default="off",
                    help="QAT rows with robuq_fx.weight_sides_per_forward (every layer's weight side once a forward, "
                         "for the whole model: rows ' +stepw'); both: each QAT row without and with it, same run. "
                         "Compiled rows on CUDA have it anyway (quantize's automatic hooks); for the per-layer "
                         "compiled path: --env-variant layerws:ROBUQ_QAT_STEP_WEIGHTS=0 (rows ' +layerws') or "
                         "the variable set for the run (rows ' -autows')")
    ap.add_argument("--train-only", action="store_true", help="only the training-step rows")
    ap.add_argument("--no-interleave", action="store_true",
                    help="time the compiled / backend training rows one after another, not in interleaved rounds "
                         "(_dit_train.py: paired steps, robust to the host's drift)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for every compiled row "
                    "(e.g. reduce-overhead for CUDA graphs); default: torch's default")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--settings", nargs="+", default=None, metavar="SUBSTR",
                    help="only the robuq settings whose name contains one of these (bf16 always runs)")
    ap.add_argument("--default-mode-b8", action="store_true",
                    help="also time bf16 and W4A4+H at batch 8 with torch.compile's default mode (no CUDA graphs)")
    ap.add_argument("--cpu-prepare", action="store_true", help="also time quantize + lower on the CPU in fp32")
    ap.add_argument("--cpp-wrapper-rows", action="store_true",
                    help="also the default-mode rows with Inductor's C++ wrapper (torch._inductor.config.cpp_wrapper)")
    ap.add_argument("--only-default-mode", action="store_true",
                    help="only the batch-8 default-mode rows (--default-mode-b8 without the other rows)")
    ap.add_argument("--fuse-gelu", action="store_true",
                    help="also time each robuq setting after robuq_fx.fuse_activations (fc2 applies the GELU)")
    ap.add_argument("--gelu-in-fc1", action="store_true",
                    help="also time each robuq setting after robuq_fx.fuse_activations(into='producer'): fc1 applies "
                         "the GELU (its GEMM's store where it runs the plain fp8 path); rows ' +GELU in fc1', summary "
                         "keys <key>_gelu_in_fc1_b<batch>_x")
    ap.add_argument("--env-variant", nargs="+", default=[], metavar="TAG:VAR=VALUE",
                    help="per chosen setting, one more row ' +TAG' of the same lowered model with the environment "
                         "variable VAR=VALUE while it compiles and runs (a same-run A/B of a ROBUQ_* switch, e.g. "
                         "down:ROBUQ_FP8_DOWN_IN_GEMM=1; summary keys <key>_TAG_b<batch>_x)")
    ap.add_argument("--freezing", action="store_true",
                    help="compile every row with Inductor's freezing (weights become constants, so the weight-side "
                         "tensors the qlinear decomposition builds each call are folded at compile time); the robuq "
                         "rows are named ' +freezing' (their own summary keys), bf16 is frozen too")
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG of an earlier result JSON")
    ap.add_argument("--out", default="benchmarks/results", help="folder for JSON/PNG")
    args = ap.parse_args(argv)
    from tabulate import tabulate
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return None

    infer_tags = INFER_OPT_IN
    if args.freezing:
        import torch._inductor.config as ic
        ic.freezing = True
        infer_tags += " +freezing"
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = TINY if args.quick else XL2
    # a compiled row that hits Dynamo's recompile limit would silently time eager code: fail instead
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    batches = args.batches or ([1, 2] if args.quick else [1, 8, 64])
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    prov = provenance(argv)
    host = f" | host launch {prov['host_launch_us']} us" if "host_launch_us" in prov else ""
    header = f"DiT {'tiny' if args.quick else 'XL/2'} | {gpu} | torch {torch.__version__} | {dtype}{host}"
    print(header)
    fp = build(cfg)
    # torch.export bakes the capture device and dtype into some ops: capture where the model will run.
    ex = inputs(cfg, 2, device, dtype)
    results = {"header": header, "provenance": prov,
               "config": cfg, "latency": [], "memory": [], "train_step": [], "prepare": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("quick" if args.quick else gpu.replace(" ", "_").replace("/", "_")) + args.tag
    partial = out / f"bench_dit_{tag}.partial.json"

    def save_partial():
        """every finished row on disk at once: a run stopped by a time limit keeps what it measured"""
        partial.write_text(json.dumps(results, indent=2))

    env_variants = [_env_variant(v) for v in args.env_variant]
    variant_env = {}  # variant name -> {VAR: VALUE} in force while it compiles and runs
    variants = {} if args.train_only else {"bf16 eager": (fp.to(device, dtype), False)}
    if not args.no_compile and not args.train_only:
        variants["bf16 torch.compile"] = (variants["bf16 eager"][0], True)
    ckpt_dir = Path(tempfile.mkdtemp())
    from safetensors.torch import save_file
    fp_file = ckpt_dir / "fp.safetensors"
    save_file({k: v.contiguous() for k, v in fp.state_dict().items()}, str(fp_file))
    if args.cpu_prepare and not args.train_only:  # the target: quantize + lower of DiT-XL/2 on CPU
        fp_cpu = build(cfg)
        for name, pol in policies().items():
            t0 = time.perf_counter()
            q = robuq_fx.quantize(fp_cpu, pol, example_inputs=inputs(cfg, 2))
            t1 = time.perf_counter()
            robuq_fx.lower(q, progress=False)
            results["prepare"].append({"setting": name, "where": f"CPU ({os.cpu_count()} cores), fp32",
                                       "quantize s": round(t1 - t0, 2), "lower s": round(time.perf_counter() - t1, 2)})
            print(f"  CPU prepare {name}: {results['prepare'][-1]}", flush=True)
            del q
        del fp_cpu
    fp_dev = variants["bf16 eager"][0] if variants else None
    chosen = {n: p for n, p in policies().items() if not args.settings or any(t in n for t in args.settings)}
    if args.only_default_mode:  # just the batch-8 default-mode rows (their own call on a time-limited machine)
        chosen, args.default_mode_b8 = {}, True
    for name, pol in ({} if args.train_only else chosen).items():
        t0 = time.perf_counter()
        q = robuq_fx.quantize(fp_dev, pol, example_inputs=ex)
        t1 = time.perf_counter()
        low = robuq_fx.lower(q, progress=False)
        t2 = time.perf_counter()
        f = robuq_fx.save_quantized(low, ckpt_dir / f"{len(variants)}.safetensors")
        results["prepare"].append({"setting": name, "where": f"{device}, {dtype}",
                                   "quantize s": round(t1 - t0, 2), "lower s": round(t2 - t1, 2),
                                   "ckpt MB": round(f.stat().st_size / 2**20, 1),
                                   "ckpt / bf16 ckpt": round(f.stat().st_size / fp_file.stat().st_size, 3)})
        del q
        variants[name + infer_tags] = (low, not args.no_compile)
        for env_tag, env in env_variants:  # the same model under another switch (own compile: Dynamo resets below)
            variants[name + infer_tags + " +" + env_tag] = (low, not args.no_compile)
            variant_env[name + infer_tags + " +" + env_tag] = env
        if args.fuse_gelu:  # the same lowered model with fc2 applying the GELU while quantizing its input
            fused = copy.deepcopy(low)
            n_fused = len(robuq_fx.fuse_activations(fused))
            print(f"  {name}: GELU fused into {n_fused} layers", flush=True)
            if n_fused:
                variants[name + infer_tags + " +GELU fused" + _gelu_form()] = (fused, not args.no_compile)
        if args.gelu_in_fc1:  # the same lowered model with fc1 applying the GELU to its output
            fused = copy.deepcopy(low)
            n_fused = len(robuq_fx.fuse_activations(fused, into="producer"))
            print(f"  {name}: GELU in {n_fused} producing layers", flush=True)
            if n_fused:
                variants[name + infer_tags + " +GELU in fc1" + _gelu_form()] = (fused, not args.no_compile)

    rows = {}
    for name, (model, compiled) in ([] if args.only_default_mode else list(variants.items())):
        saved_env = _set_env(variant_env.get(name, {}))
        if not name.startswith("bf16"):
            with torch.no_grad():  # fill the kernels' weight caches outside any CUDA-graph pool, for every M
                for b in batches:
                    model(**inputs(cfg, b, device, dtype))
        fn_model = torch.compile(model, mode=args.compile_mode) if compiled else model
        own = model_bytes(model)
        for b in batches:
            x = inputs(cfg, b, device, dtype)
            with torch.no_grad():
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                ms = timeit(lambda: fn_model(**x), args.iters, args.warmup, device)
                # this model's own peak: its weights and kernel caches + what its forwards allocated on top of what
                # was resident before (the other variants' weights live on the GPU meanwhile and are not counted)
                peak = (own + torch.cuda.max_memory_allocated() - before) / 2**20 if device == "cuda" \
                    else float("nan")
            rows[(name, b)] = ms
            results["latency"].append({"setting": name, "batch": b, "ms": round(ms, 3), "peak MiB": round(peak, 1)})
            save_partial()
            print(f"  {name:52s} batch {b:3d}: {ms:8.3f} ms", flush=True)
        res, bf, cache = quantized_weight_bytes(model)
        if bf:
            results["memory"].append({"setting": name, "quantized-layer weights + kernel caches MiB":
                                      round(res / 2**20, 1), "bf16 MiB": round(bf / 2**20, 1),
                                      "ratio": round(res / bf, 3), "of which kernel caches MiB":
                                      round(cache / 2**20, 1)})
        try:
            from robuq_fx.kernels import triton_fp8
            triton_fp8.clear_caches()  # the next setting's memory is its own
        except ImportError:
            pass
        del fn_model
        variants[name] = None
        # every variant's compiled code is its own: without the reset, variants of one model class (drop-in lowering
        # keeps the class) share Dynamo's per-code cache, and the 5th one hit its recompile limit and ran eager
        # (a row of 85 ms where the same model measured 4.6 ms)
        torch._dynamo.reset()
        _set_env(saved_env)
    base = "bf16 eager" if args.no_compile else "bf16 torch.compile"
    results["baseline"] = base
    if args.default_mode_b8 and not args.train_only and fp_dev is not None:
        results["default_mode"] = []
        default_mode_rows(fp_dev, cfg, device, dtype, ex, args, results["default_mode"], save_partial)
    for r in results["latency"]:
        r[f"x vs {base}"] = round(rows[(base, r["batch"])] / r["ms"], 3)

    # One training step, batch --train-batch: FP vs QAT (_dit_train.py)
    train_rows(args, cfg, device, dtype, results, save_partial, env_variants)

    print()
    print(tabulate(results["latency"], headers="keys", tablefmt="github"))
    print()
    print(tabulate(results["memory"], headers="keys", tablefmt="github"))
    print()
    print(tabulate(results["prepare"], headers="keys", tablefmt="github"))
    print()
    print(tabulate(results["train_step"], headers="keys", tablefmt="github"))
    if results.get("default_mode"):
        print()
        print(tabulate(results["default_mode"], headers="keys", tablefmt="github"))
    path = out / f"bench_dit_{tag}.json"
    path.write_text(json.dumps(results, indent=2))
    partial.unlink(missing_ok=True)
    print(f"\nwrote {path}")
    if not args.quick:  # merged into the existing summary: runs of different --settings add their figures
        old = out / f"summary_dit_{gpu_tag()}.json"
        figures = json.loads(old.read_text()) if old.exists() else {}
        figures.update(summary(results))
        print(f"wrote {write_summary(out, 'dit', figures, argv)}")
        print(json.dumps(summary(results), indent=1))
    if results["latency"]:
        plot(results, path.with_suffix(".png"))
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
