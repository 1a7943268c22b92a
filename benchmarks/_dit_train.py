"""bench_dit.py's training-step rows (issue 19): one step at batch --train-batch, FP against QAT, fp32 master weights
with bf16 autocast, AdamW; eager, and with the model under torch.compile. Ratios are against FP in the same mode.

Timing: in the host-bound modes (default-mode torch.compile and the compile backend) the rows are interleaved by
default. Every row of the mode is built and warmed up first, then each round runs one step of every row (the order
rotated each round), and a row's "x FP step time" is the median over the rounds of its step over FP's step in the
same round. On the H200's host, Python's speed moved 2x within one process over minutes (session 28: a fixed
pure-Python loop took 7.0 to 13.3 ms; bf16's forward alone 21.2 then 30.7 ms). Rows timed one after another then
differ by the host's drift as much as by their own cost. Paired steps see the same host, give or take a few ms.
Eager and CUDA-graph rows keep the sequential timing (--no-interleave everywhere): they are GPU-bound, and models
held side by side would share the per-layer graphs' and the graph trees' pools.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import torch

import robuq_fx
from _dit_report import _set_env, env_tags
from _dit_setup import PAPER, build, inputs, policies, recompile_room, time_once, timeit

# experimental train modes: default-mode torch.compile with these Inductor settings on both sides
INDUCTOR_MODES = {"cppwrapper": {"cpp_wrapper": True}, "combo": {"combo_kernels": True}}
INTERLEAVED_MODES = ("compiled", "backend", "regional")  # host-bound: the rows interleaved unless --no-interleave
# regional compilation (robuq_fx.compile_repeated_blocks on both sides: each transformer block compiled, one graph
# serving them all; the embeddings and the final layer eager): default mode, and under CUDA graphs
REGIONAL = {"regional": None, "regional-cg": "reduce-overhead"}
CUDAGRAPH_MODES = ("cudagraphs", "regional-cg")

# the opt-in QAT kernels in force (and a default turned off) name the rows, so that such a run does not overwrite
# the plain rows' summary keys (qat_fp8_eager_x, qat_paper_no_wgraph_eager_x ...)
OPT_IN = (("ROBUQ_QAT_FP8", "1", "+fp8"),
          ("ROBUQ_QAT_WEIGHT_KERNEL", "0", "-wkernel"),
          ("ROBUQ_QAT_WSIDE_KERNEL", "0", "-wside"),
          ("ROBUQ_QAT_WEIGHT_GRAPH", "0", "-wgraph"),
          ("ROBUQ_QAT_LAYER_GRAPH", "0", "-lgraph"),
          ("ROBUQ_QAT_ACT_KERNEL", "0", "+noactk"),
          ("ROBUQ_QAT_ACT_KERNEL", "1", "+actk"),
          # (quantize's automatic weight-side hooks off: the per-layer weight sides inside the compiled graph, as
          # before session 24)
          ("ROBUQ_QAT_STEP_WEIGHTS", "0", "-autows"),
          # (the hooks under CUDA graph modes too, their forward buffers fixed: experimental)
          ("ROBUQ_QAT_STEP_WEIGHTS", "cudagraphs", "+cgws"))


def train_settings(args, env_variants: list) -> tuple[list, dict]:
    """The rows: [(name, policy or None for FP)] and {name: the environment a row's variant sets}."""
    opt_in = env_tags(OPT_IN)
    train = [("FP", None), ("QAT W4A4+H" + opt_in, policies()["robuq W4A4+H"]),
             ("QAT W1.58A4+H" + opt_in, policies()["robuq W1.58A4+H"]),
             ("QAT dit-xl-2-robuq" + opt_in, policies()[PAPER])]
    if args.settings:
        train = [t for t in train if t[1] is None or any(x in t[0] for x in args.settings)]
    if args.step_weights != "off":
        stepw = [(n + " +stepw", p) for n, p in train if p is not None]
        train = ([t for t in train if t[1] is None] if args.step_weights == "on" else train) + stepw
    # --env-variant on the train rows too: each QAT row again with the switch in force while it builds, compiles and
    # runs (a same-run A/B of the switch)
    train_env = {}
    for env_tag, env in env_variants:
        for n, p in [t for t in train if t[1] is not None]:
            train.append((n + " +" + env_tag, p))
            train_env[n + " +" + env_tag] = env
    return train, train_env


def interleaved(steps: dict, rounds: int, timer, base: str) -> dict:
    """steps: {name: fn} (fn() runs one step), each already warmed up. `rounds` rounds of one step of every row,
    the order rotated by one each round; timer(fn) -> ms. Returns {name: (median ms, median over the rounds of
    ms / base's ms in the same round, (the smallest, the largest) of those ratios)}."""
    names = list(steps)
    times: dict = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            times[n].append(timer(steps[n]))
    out = {}
    for n in names:
        ratios = [t / b for t, b in zip(times[n], times[base])]
        out[n] = (statistics.median(times[n]), statistics.median(ratios), (min(ratios), max(ratios)))
    return out


def _build_step(name: str, pol, mode: str, cfg: dict, tb: int, device: str, dtype):
    """One row's model, optimizer and step function (nothing run yet but the target's forward)."""
    stepw_row = "+stepw" in name.split(" ")  # backend mode: its weight_sides="step"
    m = build(cfg).to(device).train()
    if mode == "backend":  # issue 19's second entry point: the FP model under robuq's compile backend
        if pol is not None:
            robuq_fx.backend.prepare_qat(m, pol)  # the branch's trainable factors, on the model
    elif pol is not None:
        m = robuq_fx.quantize(m, pol, example_inputs=inputs(cfg, 2, device)).train()
        if stepw_row:  # (fixed addresses for CUDA graphs: new ones would record them again every step)
            robuq_fx.weight_sides_per_forward(m, fixed_buffers=mode in CUDAGRAPH_MODES)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x = inputs(cfg, tb, device)
    if mode == "eager":
        fwd = m
    elif mode in REGIONAL:
        robuq_fx.compile_repeated_blocks(m, mode=REGIONAL[mode])
        fwd = m
    elif mode == "backend" and pol is not None:
        fwd = torch.compile(m, backend=robuq_fx.backend(pol, mode="qat",
                                                        weight_sides="step" if stepw_row else "layer"))
    else:  # (backend mode's FP row: plain torch.compile, the baseline of its ratios)
        fwd = torch.compile(m, mode="reduce-overhead" if mode == "cudagraphs" else None)
    with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):  # (as the step: one matmul dtype)
        target = torch.randn_like(m(**x)[0].detach().float())

    def step():
        if mode in CUDAGRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            out = fwd(**x)[0]
        loss = (out.float() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _with_env(fn, env: dict):
    """fn run with env in force (a row's --env-variant switch, at every step of an interleaved run)."""
    if not env:
        return fn

    def run():
        saved = _set_env(env)
        try:
            fn()
        finally:
            _set_env(saved)
    return run


def _record(results: dict, save_partial, name: str, mode: str, tb: int, ms: float, x: float | None = None,
            spread: tuple | None = None, warm_s: float | None = None) -> None:
    row = {"setting": name, "mode": mode, "batch": tb, "ms": round(ms, 2)}
    if warm_s is not None:  # building the row, compiling it and its 3 warm-up steps (cold or warm caches as found)
        row["build + warm-up s"] = round(warm_s, 1)
    if x is not None:
        row["x FP step time"] = round(x, 3)
        row["timing"] = "interleaved"
        row["x FP range"] = [round(v, 3) for v in spread]  # the rounds' smallest and largest paired ratio
    results["train_step"].append(row)
    save_partial()
    print(f"  train {name:24s} {mode:8s}: {ms:8.2f} ms" + (f"  ({x:.3f}x FP, paired)" if x is not None else ""),
          flush=True)


def train_rows(args, cfg: dict, device: str, dtype, results: dict, save_partial, env_variants: list) -> None:
    """Append the training-step rows to results["train_step"] (each saved as it is measured), then each sequential
    row's ratio to its mode's FP row."""
    tb = args.train_batch if not args.quick else 2
    train, train_env = train_settings(args, env_variants)
    iters = max(8, args.iters // 2)  # 8+ timed steps: 3 left one figure unexplained
    modes = [m for m in args.train_modes if not (args.no_compile and m != "eager")]
    for mode in [] if args.skip_train else modes:
        if mode in INTERLEAVED_MODES and not args.no_interleave and len(train) > 1 and train[0][1] is None:
            _interleaved_mode(mode, train, train_env, cfg, tb, device, dtype, iters, results, save_partial)
            continue
        for name, pol in train:
            saved_env = _set_env(train_env.get(name, {}))
            step = _build_step(name, pol, mode, cfg, tb, device, dtype)
            # the compiled QAT step is CPU-bound (~3x FP's kernels, each launched through Python). cppwrapper:
            # default-mode torch.compile with Inductor's C++ wrapper, which launches them without Python (session 19:
            # the FP step alone did not compile in 9.4 minutes); combo: Inductor's combo kernels, independent small
            # kernels (the weight side's casts and fake-quants of a layer) launched as one
            wrapper = contextlib.nullcontext()
            if mode in INDUCTOR_MODES:
                import torch._inductor.config as ic
                wrapper = ic.patch(**INDUCTOR_MODES[mode])
            try:
                with wrapper:
                    ms = timeit(step, iters, 3, device)
            except Exception as e:  # noqa: BLE001 - an experimental mode's failure is a result, not the run's end
                if mode not in INDUCTOR_MODES:
                    raise
                print(f"  train {name:24s} {mode}: failed ({type(e).__name__}: {str(e)[:300]})", flush=True)
                ms = None
            if ms is not None:
                _record(results, save_partial, name, mode, tb, ms)
            del step
            torch._dynamo.reset()
            _set_env(saved_env)
    fp_ms = {r["mode"]: r["ms"] for r in results["train_step"] if r["setting"] == "FP"}
    for r in results["train_step"]:
        if r["mode"] in fp_ms and "x FP step time" not in r:
            r["x FP step time"] = round(r["ms"] / fp_ms[r["mode"]], 3)


def _interleaved_mode(mode, train, train_env, cfg, tb, device, dtype, iters, results, save_partial) -> None:
    """Every row of `mode` built and warmed up (3 steps each), then `iters` interleaved rounds (`interleaved`)."""
    steps, warm = {}, {}
    with recompile_room(len(train)):
        for name, pol in train:
            saved_env = _set_env(train_env.get(name, {}))
            t0 = time.perf_counter()
            try:
                step = _build_step(name, pol, mode, cfg, tb, device, dtype)
                for _ in range(3):
                    step()
            finally:
                _set_env(saved_env)
            warm[name] = time.perf_counter() - t0
            steps[name] = _with_env(step, train_env.get(name, {}))
            print(f"  train {name:24s} {mode:8s}: built and warmed up", flush=True)
        got = interleaved(steps, iters, lambda fn: time_once(fn, device), base=train[0][0])
    for name, _ in train:
        _record(results, save_partial, name, mode, tb, *got[name], warm_s=warm[name])
    del steps
    torch._dynamo.reset()
