#!/usr/bin/env python
"""Where a compiled training step's host time goes, Python function by function (issue 19: on the H200's host the
compiled QAT step is bound by its Python, and session 26's phase table gave the W4A4+H forward 46 ms of host time
against FP's 22.7 ms, with no single op explaining the difference).

For each setting (FP, then QAT ones) the step is compiled (default mode, Inductor behind a backend that counts each
graph's inputs), warmed up, then cProfile runs over the forward phases alone and the backward phases alone (the GPU
synchronized before each, outside the profile). Printed: each phase's wall time per step, the graphs and their
inputs, and the functions whose own time (tottime) per step grows most against the first setting.

    python scripts/host_profile_step.py                                  # GPU: DiT-XL/2 batch 16, bf16 then dit
    python scripts/host_profile_step.py --settings bf16 dit dit:per-layer paper
    python scripts/host_profile_step.py --quick                          # CPU smoke run (tiny DiT)
    python scripts/host_profile_step.py --cpu-deep --settings bf16 dit dit:per-layer   # DiT-XL/2's depth on the CPU

Each phase is also timed without the profiler first (host ms and the GPU's tail after it: what the ablations
compare; cProfile's own cost inflates code made of many small calls). A setting "NAME:per-layer" runs NAME with
quantize's automatic weight-side hooks off (ROBUQ_QAT_STEP_WEIGHTS=0), "NAME:noactk" with the activation side as
Inductor's ops (ROBUQ_QAT_ACT_KERNEL=0), "NAME:static" with Inductor's static launcher for user-defined Triton kernels,
"NAME:opbyop" with the weight sides op by op (ROBUQ_QAT_WSIDE_KERNEL=0; the grouped kernels are the default since
session 27), "NAME:gcfreeze" with Python's garbage collector told to leave every object alive after the warm-up alone
(gc.freeze: the compile's millions of objects are then not walked again). A setting may repeat (the second "bf16" is
"bf16#2"): the same setting late in the process tells the process's state from the setting's own cost. Each row also
gives the time a fixed pure-Python loop takes just before the phases (host probe ms: the host's speed then) and the
garbage collector's time within each phase. --no-cprofile skips the profiled steps (the ablation figures only).
--interleave builds every setting side by side and times their phases in interleaved rounds, each against the first
setting's in the same round (session 28: the host's speed moved 2x within one process, more than the effects
compared one setting after another).
Writes host_profile_<gpu>.txt / .json under --out.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import logging
import json
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "benchmarks"))
import robuq_fx  # noqa: E402
from _dit_report import _set_env  # noqa: E402
from _dit_setup import SHORT_NAMES, TINY, XL2, build, inputs, policies, recompile_room  # noqa: E402
from _provenance import gpu_tag, provenance  # noqa: E402
from _host_stats import BypassLog, counting_backend, diff_rows, own_times, probe_ms  # noqa: E402
from _step_phases import phase_times, time_phase  # noqa: E402


VARIANTS = {"per-layer": ("ROBUQ_QAT_STEP_WEIGHTS", "0"),  # the automatic hooks off: each layer its weight side
            "opbyop": ("ROBUQ_QAT_WSIDE_KERNEL", "0"),  # the weight sides op by op (~1,000 graph nodes each way)
            "noactk": ("ROBUQ_QAT_ACT_KERNEL", "0"),  # the activation side as Inductor's ops, not the Triton op
            # Inductor's static launcher for user-defined Triton kernels (the act op's: ~19 us a launch through
            # Triton's own launcher in session 27's profile); an Inductor option, set for the setting's compile
            "static": ("inductor", "static_launch_user_defined_triton_kernels"),
            "gcfreeze": ("gc", "freeze")}  # gc.freeze() after the warm-up (gc.unfreeze() after the setting)
_WITH = {"static_launch_user_defined_triton_kernels": {"compile_threads": 1}}  # Inductor options an option needs


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _labels(settings: list) -> list:
    """Each setting's label: a repeated one gets #2, #3, ..."""
    seen: dict = {}
    out = []
    for key in settings:
        seen[key] = seen.get(key, 0) + 1
        out.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return out


def _phases(name: str, args, cfg, pols, device: str) -> tuple:
    """(forward(), backward(), graphs) of setting `name`'s compiled training step, warmed up (3 steps). graphs: each
    compiled graph's input count. forward computes the loss, backward zero_grad, backward and the AdamW step."""
    torch.manual_seed(0)
    m = build(cfg).to(device).train()
    if name != "bf16":
        m = robuq_fx.quantize(m, pols[SHORT_NAMES[name]], example_inputs=inputs(cfg, 2, device)).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    graphs: list = []
    fwd = torch.compile(m, backend=counting_backend(graphs))
    x = inputs(cfg, args.batch, device)
    amp = device == "cuda"
    state = {}

    def forward():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            state["loss"] = fwd(**x)[0].float().pow(2).mean()

    def backward():
        opt.zero_grad(set_to_none=True)
        state.pop("loss").backward()
        opt.step()
    for _ in range(3):
        forward()
        backward()
    return forward, backward, graphs


def interleaved_phases(args, cfg, pols, device: str) -> list[dict]:
    """--interleave: every setting built and warmed up first (each its own compiled model, its variant's environment
    in force while it builds and runs), then `steps` rounds of one step of each, the order rotated a round; each
    phase timed alone (the GPU idle at its start). Rows: per setting and phase, the median host ms and GPU tail ms,
    and the median over the rounds of its host ms over the first setting's in the same round (the host's drift
    cancels; session 28 measured it moving 2x within one process)."""
    labels = _labels(args.settings)
    runs = {}
    torch._dynamo.reset()
    with recompile_room(len(labels)):
        for key, label in zip(args.settings, labels):
            name, _, variant = key.partition(":")
            env = dict([VARIANTS[variant]]) if variant else {}
            before = _set_env(env)
            try:
                fns = _phases(name, args, cfg, pols, device)[:2]
            finally:
                _set_env(before)
            runs[label] = (env, fns)
            print(f"-- {label}: built and warmed up", flush=True)
        times = {(lb, p): [] for lb in labels for p in ("forward", "backward + optimizer")}
        tails = {k: [] for k in times}
        for r in range(max(args.steps, 5)):
            for i in range(len(labels)):
                label = labels[(i + r) % len(labels)]
                env, fns = runs[label]
                before = _set_env(env)
                try:
                    for phase, fn in zip(("forward", "backward + optimizer"), fns):
                        h, w = time_phase(fn, device)
                        times[(label, phase)].append(h)
                        tails[(label, phase)].append(w)
                finally:
                    _set_env(before)
    base = labels[0]
    rows = []
    for label in labels:
        for phase in ("forward", "backward + optimizer"):
            h, b = times[(label, phase)], times[(base, phase)]
            rows.append({"setting": label, "phase": phase, "host ms": round(statistics.median(h), 3),
                         "GPU tail ms": round(statistics.median(tails[(label, phase)]), 3),
                         f"host x {base} (paired)": round(statistics.median(x / y for x, y in zip(h, b)), 3)})
    return rows


def profile_setting(key: str, args, cfg, pols, device: str) -> dict:
    import torch._inductor.config as inductor_config
    name, _, variant = key.partition(":")
    kind, what = VARIANTS[variant] if variant else ("", "")
    option = what if kind == "inductor" else None
    if option and not hasattr(inductor_config, option):
        print(f"{key}: this torch's Inductor has no option {option}; setting skipped", flush=True)
        return None
    freeze = kind == "gc"
    before = _set_env({kind: what} if variant and not option and not freeze else {})
    # Inductor's compile workers decide each kernel's launcher and get only use_static_triton_launcher of this
    # process's config (async_compile.py), and a kernel already compiled in this process is reused with its launcher:
    # so an Inductor option's setting compiles from an empty kernel cache, the static launcher's in-process (session
    # 29; session 28's :static run set the option alone and changed nothing)
    opts = {option: True, **_WITH.get(option, {})} if option else {}
    was = {k: getattr(inductor_config, k) for k in opts}
    for k, v in opts.items():
        setattr(inductor_config, k, v)
    if option:
        from torch._inductor.async_compile import CompiledTritonKernels
        CompiledTritonKernels.cache_clear()
    bypass, heuristics = BypassLog(), logging.getLogger("torch._inductor.runtime.triton_heuristics")
    level = heuristics.level
    heuristics.setLevel(logging.INFO)  # (its INFO records are made only at this level)
    heuristics.addHandler(bypass)
    try:
        torch._dynamo.reset()
        forward, backward, graphs = _phases(name, args, cfg, pols, device)
        if freeze:
            gc.collect()
            gc.freeze()
        probe = probe_ms()
        # first without the profiler (cProfile adds ~1-2 us to every Python and C call, so its times inflate
        # code made of many small calls): each phase's own host time and the GPU's tail after it, the median step
        real = phase_times([("forward", forward), ("backward + optimizer", backward)], max(args.steps, 5), device)
        _sync(device)
        profs = {"forward": cProfile.Profile(), "backward + optimizer": cProfile.Profile()}
        wall = {p: 0.0 for p in profs}
        for _ in range(0 if args.no_cprofile else args.steps):
            for phase, fn in (("forward", forward), ("backward + optimizer", backward)):
                _sync(device)
                t0 = time.perf_counter()
                profs[phase].enable()
                fn()
                profs[phase].disable()
                wall[phase] += time.perf_counter() - t0  # host time (with the profiler's own cost)
            _sync(device)
        row = {r["phase"]: r for r in real}
        return {"graphs (inputs each)": graphs, "host probe ms": probe, "threads": threading.active_count(),
                "static launch bypassed": dict(bypass.reasons),
                "phases": {p: {"host ms (profiled)": None if args.no_cprofile else round(wall[p] * 1e3 / args.steps, 3),
                               **{c: row[p][c] for c in ("host ms", "GPU tail ms", "GC ms")},
                               "functions": {} if args.no_cprofile else own_times(pstats.Stats(profs[p]), args.steps)}
                           for p in profs}}
    finally:
        heuristics.removeHandler(bypass)
        heuristics.setLevel(level)
        if freeze:
            gc.unfreeze()
        for k, v in was.items():
            setattr(inductor_config, k, v)
        _set_env(before)


def _ready_results() -> None:
    """The step plan's weight sides computed once, then handed out ready each call (what a CUDA-graph replay does,
    without its GPU work; the values go stale, which timing does not mind): the CPU run then times only the Python
    around them, as the GPU's host runs it."""
    from robuq_fx import qat_step
    fwd, bwd = qat_step.Plan.run_forward, qat_step.Plan.run_backward

    def run_forward(self, masters):
        key = ("fwd", tuple(map(id, masters)))
        if key not in self.__dict__:
            self.__dict__[key] = fwd(self, masters)
        return self.__dict__[key]

    def run_backward(self, g_parts, r_dtypes, needs, act, masters):
        key = ("bwd", needs)
        if key not in self.__dict__:
            self.__dict__[key] = bwd(self, g_parts, r_dtypes, needs, act, masters)
        return self.__dict__[key]
    qat_step.Plan.run_forward, qat_step.Plan.run_backward = run_forward, run_backward


def report(args, prov: dict, head: list, results: dict, final: bool) -> None:
    """The tables so far (each setting against the first), written to host_profile_<gpu>.txt / .json."""
    from tabulate import tabulate
    done = [k for k in _labels(args.settings) if k in results]
    cols = ("host ms", "GPU tail ms", "GC ms", "host ms (profiled)")
    lines = list(head)
    lines.append(tabulate([[k, results[k]["graphs (inputs each)"], results[k]["host probe ms"], results[k]["threads"]]
                           + [results[k]["phases"][p][c] for p in results[k]["phases"] for c in cols]
                           for k in done],
                          headers=["setting", "graphs (inputs each)", "host probe ms", "threads"]
                          + [f"{p} {c}" for p in ("forward", "backward + opt") for c in cols],
                          tablefmt="github"))
    lines.append("(host ms: each phase's Python timed without the profiler, the GPU idle at its start, median step; "
                 "GPU tail: the wait for the GPU after it returns; GC: the garbage collector's time in "
                 "the phase, mean per step; "
                 "profiled: the host ms under cProfile, which adds ~1-2 us to every call; host probe: a fixed "
                 "pure-Python loop just before, the host's speed then)")
    for k in done:  # the act op's kernels: Inductor's static launcher, or Triton's own (~19 us a launch)
        own = {p: v["functions"].get("<built-in method __triton_launcher.launch>", (0.0, 0.0))[0]
               for p, v in results[k]["phases"].items()}
        why = results[k].get("static launch bypassed") or {}
        if any(own.values()) or why:
            lines.append(f"{k}: launches through Triton's own launcher a step {own}; static launch bypassed: "
                         f"{why or 'none logged here'}")
    base = done[0]
    for key in done[1:] if not args.no_cprofile else []:
        for phase in results[key]["phases"]:
            lines.append(f"\n## {key} against {base}: {phase}, the functions whose own time grew most")
            lines.append(tabulate(diff_rows(results[base]["phases"][phase]["functions"],
                                            results[key]["phases"][phase]["functions"], args.top),
                                  headers="keys", tablefmt="github"))
    text = "\n".join(lines)
    print(text, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"host_profile_{gpu_tag(prov['gpu'])}"
    stem.with_suffix(".txt").write_text(f"# {prov}\n{text}\n")
    # the per-function tables, top 200 a phase by own time
    trimmed = {k: {**r, "phases": {p: {**v, "functions": dict(sorted(v["functions"].items(),
                                                                      key=lambda kv: -kv[1][1])[:200])}
                                   for p, v in r["phases"].items()}} for k, r in results.items()}
    stem.with_suffix(".json").write_text(json.dumps({"provenance": prov, "batch": args.batch, "results": trimmed},
                                                    indent=1))
    if final:
        print(f"wrote {stem}.txt / .json")


def _report_interleaved(args, prov: dict, head: str, rows: list) -> int:
    from tabulate import tabulate
    text = "\n".join([head.replace("phase times only", "interleaved phase times"),
                      tabulate(rows, headers="keys", tablefmt="github")])
    print(text, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"host_profile_{gpu_tag(prov['gpu'])}_interleaved"
    stem.with_suffix(".txt").write_text(f"# {prov}\n{text}\n")
    stem.with_suffix(".json").write_text(json.dumps({"provenance": prov, "batch": args.batch, "rows": rows},
                                                    indent=1))
    print(f"wrote {stem}.txt / .json")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["bf16", "dit"],
                    help="bf16 (the base), then dit / w158 / paper, each optionally NAME:per-layer")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--interleave", action="store_true",
                    help="phase times only, the settings built side by side and timed in interleaved rounds (paired "
                         "ratios against the first setting; variants that set an environment variable only)")
    ap.add_argument("--no-cprofile", action="store_true",
                    help="skip the steps under cProfile: the unprofiled phase times only (faster)")
    ap.add_argument("--quick", action="store_true", help="tiny DiT on the CPU (smoke run)")
    ap.add_argument("--cpu-deep", action="store_true",
                    help="on the CPU: DiT-XL/2's 28 blocks at tiny widths, with the automatic hooks let engage there "
                         "(they keep to CUDA otherwise): the Python of DiT-XL/2's graphs without its GPU work")
    ap.add_argument("--out", default=str(HERE.parent / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.interleave:
        args.no_cprofile = True
        bad = [k for k in args.settings if k.partition(":")[2] and VARIANTS.get(k.partition(":")[2], ("",))[0]
               in ("inductor", "gc")]
        if bad:
            ap.error(f"--interleave: settings {bad} change Inductor's or the garbage collector's global state, which "
                     f"the settings side by side would share; run them without --interleave")
    for key in args.settings:
        if key.partition(":")[0] not in {"bf16", *SHORT_NAMES} or key.partition(":")[2] not in ("", *VARIANTS):
            ap.error(f"setting {key!r}: expected bf16 or one of {sorted(SHORT_NAMES)}, optionally NAME:VARIANT "
                     f"({', '.join(VARIANTS)})")
    device = "cuda" if torch.cuda.is_available() and not (args.quick or args.cpu_deep) else "cpu"
    cfg = TINY if args.quick else XL2
    if args.cpu_deep:
        from robuq_fx import qat_step_hooks
        cfg = {**TINY, "num_layers": XL2["num_layers"]}
        qat_step_hooks._device_ok = lambda t: True
        _ready_results()
    if args.quick or args.cpu_deep:
        args.batch = min(args.batch, 2)
    pols, prov = policies(), provenance(argv)
    results = {}
    what = "tiny" if args.quick else "28-block tiny-width" if args.cpu_deep else "XL/2"
    lines = [f"Host time of a compiled DiT {what} training step, batch {args.batch} | "
             f"{prov['gpu']} | torch {prov['torch']} | "
             + ("phase times only" if args.no_cprofile else f"{args.steps} steps under cProfile")]
    labels = _labels(args.settings)
    if args.interleave:
        return _report_interleaved(args, prov, lines[0], interleaved_phases(args, cfg, pols, device))
    for key, label in zip(args.settings, labels):  # (the report rewritten after each: a run cut short keeps the rest)
        print(f"-- {label}", flush=True)
        got = profile_setting(key, args, cfg, pols, device)
        if got is None:
            continue
        results[label] = got
        report(args, prov, lines, results, final=label == labels[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
