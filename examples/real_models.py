"""Real architectures end to end on CPU: quantize -> QAT steps -> lower -> torch.compile inference (issue #7, item 2).

    python examples/real_models.py --model all                       # DiT-XL/2, ViT-Base, Llama ~100M, one process each
    python examples/real_models.py --model vit-base --qat-steps 2 --batch 2 --json runs/vit.json
    python examples/real_models.py --model dit-xl-2 --batch 1 --no-compile
    python examples/real_models.py --model all --dit-batch 1 --json benchmarks/results/real_models_cpu.json  # the run
                                                                       # in benchmarks/results/real_models_cpu.txt
--model all runs each model in its own process (DiT-XL/2 needs ~21 GB peak RSS at batch 1 in fp32) and prints one
table. --compile-timeout (default 300 s) stops a torch.compile whose first call takes longer and reports it as
skipped; --model dit-tiny is a seconds-long smoke run of the same code.

Models come from `robuq_fx.models` (random init, seeded, no downloads) with their shipped policies:

    dit-xl-2     diffusers DiTTransformer2DModel, DiT-XL/2 config   policy dit-xl-2-robuq (W1.58A4+H+LRB32, attn 8)
    vit-base     transformers ViTForImageClassification, ViT-B/16      policy vit   (W4A4+H; patch conv and head FP)
    llama-100m   transformers LlamaForCausalLM, 10 x 768 (~95 M)       policy llama (W4A4+H; lm_head FP by the policy)

timm cannot be installed here (no torchvision build for this torch), so the ViT is the transformers model.

Every model goes through exactly the same library calls, with no model-specific code outside the policy files:
`policy.explain(model)`, `robuq_fx.quantize(model, policy, example_inputs=robuq_fx.models.example_inputs(...))`,
AdamW QAT steps, `robuq_fx.lower(qmodel)`, `torch.compile(lowered)`, `robuq_fx.size_table`, `save_quantized`.
The only per-model part of this script is the synthetic training loss (TASKS below): DiT noise-prediction MSE on
random latents / timesteps / labels (class-label dropout off: the graph is captured in eval mode, so its train-only
dropout branch is not in it), ViT cross-entropy on random labels, Llama next-token cross-entropy on random ids.
Batches for the QAT steps are fresh draws of the model's own example-input factory (seed = step + 1).

Checks per model: every QAT loss finite; the quantized layers' weights and the low-rank branches (lrb_down/up, when
the policy has them) changed; lowered output == QAT model output in eval mode (torch.equal, fp32 CPU); compiled
lowered output vs eager lowered output (max abs diff; Inductor, falling back to backend="aot_eager" if Inductor
fails, e.g. no working C++ compiler). Sizes: size_table TOTAL (quantized layers: packed vs bf16) and the
save_quantized file vs the whole FP model in bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils import _pytree as pytree
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import robuq_fx  # noqa: E402
from robuq_fx import models  # noqa: E402

MODELS = ["dit-xl-2", "vit-base", "llama-100m"]


# ---- the only per-model code: a synthetic loss on a batch from the model's own example-input factory -------------
def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _tensors(out) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _first(out) -> torch.Tensor:
    return _tensors(out)[0]  # DiT: the (sample,) tuple; transformers outputs: logits (loss is None)


def loss_denoise(model, inputs, g):
    """DDPM noise prediction: hidden_states are the clean latents; predict the noise (first 4 of 8 channels)."""
    from diffusers import DDPMScheduler
    x0, t = inputs["hidden_states"], inputs["timestep"]
    noise = torch.randn(x0.shape, generator=g)
    noisy = DDPMScheduler(num_train_timesteps=1000).add_noise(x0, noise, t)
    pred = _first(_call(model, dict(inputs, hidden_states=noisy)))
    return F.mse_loss(pred[:, : noise.shape[1]], noise)


def loss_classify(model, inputs, g):
    logits = _first(_call(model, inputs))
    labels = torch.randint(0, logits.shape[-1], (logits.shape[0],), generator=g)
    return F.cross_entropy(logits, labels)


def loss_next_token(model, inputs, g):
    logits = _first(_call(model, inputs))
    ids = inputs["input_ids"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


TASKS = {"dit-xl-2": loss_denoise, "dit-tiny": loss_denoise, "vit-base": loss_classify,
         "llama-100m": loss_next_token}


# ---- helpers -----------------------------------------------------------------------------------------------------
def unique_bytes(tensors, bytes_per_elem: int = 2) -> int:
    """Bytes of the unique tensors (tied weights once) at `bytes_per_elem` bytes each (2 = bf16)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * bytes_per_elem
    return total


def sample(p: torch.Tensor, n: int = 4096) -> torch.Tensor:
    flat = p.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    return flat[::step][:n].clone()


def rss_gb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return float("nan")


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:300]


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: int):
    """Raise CompileTimeout in the main thread after `seconds` (0: no limit), and again every second until it gets
    through (a signal handler's exception is dropped when it lands in a weakref callback). Inductor compiles in this
    thread (its worker pool only builds kernels), so the exception stops the compile; the model is then dropped."""
    if not seconds or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(*_):
        raise CompileTimeout

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _timed_out(e: BaseException | None) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, CompileTimeout):
            return True
        seen.add(id(e))
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
    return False


# ---- one model ---------------------------------------------------------------------------------------------------
def run_model(name: str, args) -> dict:
    r: dict = {"model": name, "batch": args.batch, "qat_steps": args.qat_steps, "errors": []}
    entry = models.get(name)
    policy = robuq_fx.Policy.load(entry.policy)
    r["policy"] = entry.policy
    print(f"\n=== {name}: {entry.description} | policy {entry.policy} | batch {args.batch} ===", flush=True)

    t0 = time.perf_counter()
    model = models.build(name, seed=args.seed)
    r["build s"] = round(time.perf_counter() - t0, 2)
    r["params"] = sum(p.numel() for p in model.parameters())
    r["fp bf16 bytes"] = unique_bytes(model.state_dict().values())

    rows = policy.explain(model, print_table=False)
    quant = [x for x in rows if x["in"] != "-" and not str(x["spec"]).startswith(("skip", "no rule", "ERROR"))]
    fp = [x for x in rows if x["in"] != "-" and str(x["spec"]).startswith(("skip", "no rule"))]
    attn = [x for x in rows if x["in"] == "-"]
    specs = Counter(x["spec"] for x in quant)
    r["linear layers"] = len(quant) + len(fp)
    r["quantized layers"] = len(quant)
    r["attention sites"] = len(attn)
    r["specs"] = dict(specs)
    print(f"policy.explain: {len(quant) + len(fp)} nn.Linear, {len(quant)} quantized, {len(fp)} FP; "
          f"{len(attn)} attention sites with quantized q/k/v")
    for s, n in specs.items():
        print(f"  {n:4d} x {s}")
    fp_names = [x["layer"] for x in fp]
    print(f"  FP: {', '.join(fp_names[:6])}{' ...' if len(fp_names) > 6 else ''}")

    ex = models.example_inputs(name, args.batch, seed=0)
    t0 = time.perf_counter()
    qmodel = robuq_fx.quantize(model, policy, example_inputs=ex)
    r["quantize s"] = round(time.perf_counter() - t0, 2)
    info = robuq_fx.robuq_info(qmodel)
    r["capture"] = info["capture"]
    print(f"quantize: {r['quantize s']} s ({info['capture']}), {len(info['layers'])} robuq layers, "
          f"{len(info.get('attention') or {})} quantized attention sites", flush=True)
    del model
    gc.collect()

    # ---- QAT steps ----
    params = dict(qmodel.named_parameters())
    watch_w = [f"{n}.weight" for n in info["layers"]]
    watch_lrb = [n for n in params if n.endswith(("lrb_down", "lrb_up"))]
    before = {n: sample(params[n]) for n in watch_w + watch_lrb}
    opt = torch.optim.AdamW([p for p in qmodel.parameters() if p.requires_grad], lr=args.lr)
    loss_fn = TASKS[name]
    qmodel.train()
    losses, step_s = [], []
    for step in tqdm(range(args.qat_steps), desc=f"{name} QAT", unit="step", file=sys.stdout, mininterval=5):
        batch = models.example_inputs(name, args.batch, seed=step + 1)
        g = torch.Generator().manual_seed(1000 + step)
        t0 = time.perf_counter()
        loss = loss_fn(qmodel, batch, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_s.append(time.perf_counter() - t0)
        losses.append(loss.item())
    del opt, loss
    gc.collect()
    changed_w = sum(not torch.equal(before[n], sample(params[n])) for n in watch_w)
    changed_lrb = sum(not torch.equal(before[n], sample(params[n])) for n in watch_lrb)
    del before, params
    r["losses"] = [round(x, 5) for x in losses]
    r["loss finite"] = all(math.isfinite(x) for x in losses)
    r["QAT step s"] = round(sum(step_s) / len(step_s), 2) if step_s else None
    r["QAT step s (all)"] = [round(x, 2) for x in step_s]
    r["weights changed"] = f"{changed_w}/{len(watch_w)}"
    r["lrb changed"] = f"{changed_lrb}/{len(watch_lrb)}" if watch_lrb else "n/a (no LRB)"
    r["params changed ok"] = changed_w == len(watch_w) and changed_lrb == len(watch_lrb)
    print(f"QAT: losses {r['losses']} (finite: {r['loss finite']}), step {r['QAT step s (all)']} s, "
          f"quantized weights changed {r['weights changed']}, lrb changed {r['lrb changed']}", flush=True)
    if not r["loss finite"]:
        r["errors"].append("QAT loss not finite")
    if not r["params changed ok"]:
        r["errors"].append(f"parameters did not all change: weights {r['weights changed']}, lrb {r['lrb changed']}")

    # ---- lower, bit-identity ----
    qmodel.eval()
    with torch.no_grad():
        ref = _call(qmodel, ex)
    t0 = time.perf_counter()
    lowered = robuq_fx.lower(qmodel)
    r["lower s"] = round(time.perf_counter() - t0, 2)
    del qmodel
    gc.collect()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = _call(lowered, ex)
        r["lowered fwd s"] = round(time.perf_counter() - t0, 2)
    a, b = _tensors(ref), _tensors(out)
    r["lowered==QAT"] = len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    if not r["lowered==QAT"]:
        diff = max(((x - y).abs().max().item() for x, y in zip(a, b)), default=float("nan"))
        r["errors"].append(f"lowered != QAT (max abs diff {diff:.3g})")
    print(f"lower: {r['lower s']} s; lowered == QAT (torch.equal): {r['lowered==QAT']}; "
          f"eager lowered forward {r['lowered fwd s']} s", flush=True)
    del ref

    # ---- sizes ----
    tot = robuq_fx.size_table(lowered, print_table=False)[-1]
    r["layers bf16 bytes"], r["layers packed bytes"] = tot["bf16 bytes"], tot["packed bytes"]
    r["layers packed/bf16"] = tot["packed/bf16"]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{name}.safetensors"
        robuq_fx.save_quantized(lowered, path)
        r["checkpoint bytes"] = path.stat().st_size
    r["checkpoint/fp bf16"] = round(r["checkpoint bytes"] / r["fp bf16 bytes"], 4)
    print(f"sizes: quantized layers {tot['packed bytes'] / 2**20:.1f} MiB packed vs "
          f"{tot['bf16 bytes'] / 2**20:.1f} MiB "
          f"bf16 ({tot['packed/bf16']}x); save_quantized file {r['checkpoint bytes'] / 2**20:.1f} MiB vs FP model bf16 "
          f"{r['fp bf16 bytes'] / 2**20:.1f} MiB ({r['checkpoint/fp bf16']}x)", flush=True)

    # ---- torch.compile inference ----
    if args.no_compile:
        r["compile"] = "skipped (--no-compile)"
    else:
        for backend in ("inductor", "aot_eager"):
            torch._dynamo.reset()
            try:
                compiled = torch.compile(lowered, backend=backend)
                with torch.no_grad():
                    t0 = time.perf_counter()
                    with alarm(args.compile_timeout):
                        cout = _call(compiled, ex)
                    r["compile first call s"] = round(time.perf_counter() - t0, 2)
                    times = []
                    for _ in range(2):
                        t0 = time.perf_counter()
                        cout = _call(compiled, ex)
                        times.append(time.perf_counter() - t0)
                    r["compiled fwd s"] = round(min(times), 2)
            except Exception as e:  # noqa: BLE001 - report; fall back to aot_eager unless it was our time limit
                if _timed_out(e):  # Dynamo wraps CompileTimeout in BackendCompilerFailed
                    r["compile"] = f"skipped: first call (compile) exceeded {args.compile_timeout} s"
                    print(f"torch.compile(backend={backend!r}): {r['compile']}, stopped", flush=True)
                    break
                msg = first_line(e)
                r.setdefault("compile failures", []).append(f"backend={backend}: {msg}")
                print(f"torch.compile(backend={backend!r}) FAILED: {msg}", flush=True)
                traceback.print_exc(limit=3)
                continue
            c = _tensors(cout)
            r["compile backend"] = backend
            r["compile max abs diff"] = max((x - y).abs().max().item() for x, y in zip(b, c))
            r["compile frac |diff|>1e-4"] = round(sum((x - y).abs().gt(1e-4).sum().item() for x, y in zip(b, c))
                                                  / sum(x.numel() for x in b), 4)
            r["eager lowered output absmax"] = max(x.abs().max().item() for x in b)
            r["compile"] = "ok"
            print(f"torch.compile(backend={backend!r}): first call {r['compile first call s']} s, then "
                  f"{r['compiled fwd s']} s; vs eager lowered: max abs diff {r['compile max abs diff']:.3g} "
                  f"(output absmax {r['eager lowered output absmax']:.3g}), "
                  f"{r['compile frac |diff|>1e-4']:.1%} of outputs differ by > 1e-4", flush=True)
            del compiled, cout
            break
        else:
            r["compile"] = "failed"
            r["errors"] += [f"torch.compile {m}" for m in r["compile failures"]]
        torch._dynamo.reset()
    # the same packed model with its floating-point tensors (FP layers, scales, low-rank branch) cast to bf16, as
    # docs/dit.md runs it: the file a bf16 deployment would ship
    lowered.to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{name}-bf16.safetensors"
        robuq_fx.save_quantized(lowered, path)
        r["checkpoint bf16 bytes"] = path.stat().st_size
    r["checkpoint bf16/fp bf16"] = round(r["checkpoint bf16 bytes"] / r["fp bf16 bytes"], 4)
    print(f"save_quantized after lowered.to(bfloat16): {r['checkpoint bf16 bytes'] / 2**20:.1f} MiB "
          f"({r['checkpoint bf16/fp bf16']}x the FP model in bf16)", flush=True)
    r["peak RSS GB"] = rss_gb()
    return r


# ---- table / driver ----------------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        if "params" not in r or "lower s" not in r:
            rows.append({"model": r["model"], "params": r.get("params", "-"), "quantized layers": "-",
                         "quantize s": "-", "QAT step s": "-", "lower s": "-", "lowered==QAT": "-",
                         "compile ok / max diff": "FAILED: " + "; ".join(r.get("errors", []))[:80],
                         "packed/bf16": "-"})
            continue
        if r["compile"] == "ok":
            comp = f"ok ({r['compile backend']}) / {r['compile max abs diff']:.2g}"
        else:
            comp = r["compile"]
        attn = f" + {r['attention sites']} attn" if r["attention sites"] else ""
        rows.append({
            "model": r["model"], "params": f"{r['params'] / 1e6:.1f} M",
            "quantized layers": f"{r['quantized layers']}/{r['linear layers']}{attn}",
            "quantize s": r["quantize s"], "QAT step s": r["QAT step s"], "lower s": r["lower s"],
            "lowered==QAT": r["lowered==QAT"], "compile ok / max diff": comp,
            "packed/bf16": f"{r['layers packed/bf16']} layers; file {r['checkpoint/fp bf16']} "
                           f"(bf16 {r['checkpoint bf16/fp bf16']})",
        })
    return tabulate(rows, headers="keys", tablefmt="github")


def env() -> dict:
    import diffusers
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "timm": "not installable here (no torchvision build for this torch): ViT is transformers'"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all", choices=MODELS + ["all"] + ["dit-tiny"],
                   help="shipped model, or all (each in its own process)")
    p.add_argument("--qat-steps", type=int, default=2, help="QAT steps (AdamW) per model (default 2)")
    p.add_argument("--batch", type=int, default=2, help="batch size for capture, QAT and inference (default 2)")
    p.add_argument("--dit-batch", type=int, default=None, help="with --model all: batch for dit-xl-2 (default --batch)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile inference")
    p.add_argument("--compile-timeout", type=int, default=300,
                   help="give up torch.compile when its first call takes longer (s; default 300, 0: no limit)")
    p.add_argument("--no-compile-dit", action="store_true", help="with --model all: skip torch.compile for dit-xl-2")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="model init seed (default 0)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    if args.model == "all":
        results = []
        for name in MODELS:  # one process per model: DiT-XL/2's copies (~3 GB each in fp32) are freed in between
            with tempfile.TemporaryDirectory() as d:
                out = Path(d) / "r.json"
                batch = args.dit_batch if (name == "dit-xl-2" and args.dit_batch) else args.batch
                cmd = [sys.executable, __file__, "--model", name, "--qat-steps", str(args.qat_steps),
                       "--batch", str(batch), "--lr", str(args.lr), "--seed", str(args.seed), "--json", str(out),
                       "--compile-timeout", str(args.compile_timeout)]
                if args.no_compile or (name == "dit-xl-2" and args.no_compile_dit):
                    cmd.append("--no-compile")
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                t0 = time.perf_counter()
                rc = subprocess.call(cmd)
                if out.exists():
                    res = json.loads(out.read_text())["results"]
                else:
                    res = [{"model": name, "errors": [f"process exited with status {rc} and wrote no results"]}]
                for x in res:
                    x["process s"] = round(time.perf_counter() - t0, 1)
                results += res
    else:
        try:
            results = [run_model(args.model, args)]
        except Exception as e:  # noqa: BLE001 - report what failed, in the table and the JSON
            traceback.print_exc()
            results = [{"model": args.model, "errors": [first_line(e)]}]
    total = round(time.perf_counter() - t_all, 1)
    print(f"\n{table(results)}\n")
    print("packed/bf16: 'layers' = size_table TOTAL of the quantized layers (codes + scales + low-rank branch vs "
          "their bf16 weights); 'file' = save_quantized safetensors of the fp32 lowered model vs the whole FP model "
          "in bf16 (unique tensors, embeddings and FP layers included); '(bf16 ...)' = the same after "
          "lowered.to(torch.bfloat16).")
    for r in results:
        for e in r.get("errors", []):
            print(f"  {r['model']}: ERROR {e}")
        if r.get("compile") == "ok" and r.get("compile failures"):
            print(f"  {r['model']}: Inductor failed, fell back to aot_eager: {r['compile failures'][0]}")
    print(f"total {total} s | torch {torch.__version__} | {os.cpu_count()} CPU cores")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "total s": total, "results": results}, indent=2))
    ok = all(not r.get("errors") for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
