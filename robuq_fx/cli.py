"""`robuq-fx`: the command line.

    robuq-fx inspect  MODEL [--policy P]                     matched layers, bits, MACs/token, bf16 vs packed bytes
    robuq-fx quantize MODEL [--policy P] --out DIR [--weights W.pt] [--state-dict QAT.pt]
                                                             PTQ (or a QAT state_dict) -> DIR/model.safetensors
    robuq-fx bench    linear|dit|accuracy [script args...]   runs benchmarks/bench_<name>.py of a source checkout
    robuq-fx kernels                                         qlinear kernels: which can run here, and why not

MODEL is a shipped name (`robuq_fx.models`: dit-xl-2, dit-tiny, vit-base, llama-100m, mlp-digits) or
`module.path:factory` / `path/to/file.py:factory`, any callable returning an nn.Module; when that module also defines
`example_inputs()`, its result is used to capture models that torch.fx.symbolic_trace cannot (torch.export).
Bad input (unknown model, missing module/factory, bad policy, unwritable --out, state_dicts that do not fit) is one
line on stderr and exit status 2, with nothing written.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from . import models  # noqa: E402
from .errors import CaptureError, RobuQError  # noqa: E402
from .policy import Policy  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
BENCHMARKS = ("linear", "dit", "accuracy")
CHECKPOINT = "model.safetensors"


from .cli_inputs import (CLIError, load_fitting, load_policy, read_state_dict,  # noqa: E402
                         resolve_model)


# ---- inspect ------------------------------------------------------------------------------------------------------

def _dtype_size(name: str) -> int:
    return torch.empty((), dtype=getattr(torch, name)).element_size()


def estimate_rows(model: nn.Module, policy: Policy) -> tuple[list[dict], list[str]]:
    """One row per nn.Linear: its spec, MACs per token and bytes before (bf16) and after packing (the buffers a
    `PackedLinear` would hold: codes, scales, low-rank branch and bias in the weight's dtype, as `size_table`
    counts them). Returns (rows, errors)."""
    from . import packing
    rows, errors = [], []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        n, k = mod.out_features, mod.in_features
        has_bias = mod.bias is not None
        bf16 = 2 * n * k + (2 * n if has_bias else 0)
        rule, spec = policy.match(name, mod)
        row = {"layer": name, "in": k, "out": n}
        if spec is None:
            rows.append({**row, "spec": "FP (no rule)" if rule is None else "FP (skip)", "MACs/token": n * k,
                         "LRB MACs": 0, "bf16 bytes": bf16, "packed bytes": bf16, "x smaller": 1.0})
            continue
        try:
            spec = spec.resolve(k, n, name)
        except RobuQError as e:
            errors.append(str(e))
            rows.append({**row, "spec": f"ERROR: {e}"})
            continue
        wsize = mod.weight.element_size()
        groups = 1 if spec.w_granularity == "tensor" else n * (k // spec.group_size if spec.group_size else 1)
        r = spec.lora_rank
        packed = (packing.packed_numel(n * k, spec.w_bits) + groups * _dtype_size(spec.scale_dtype)
                  + r * (n + k) * wsize + (n * wsize if has_bias else 0))
        rows.append({**row, "spec": spec.short(), "MACs/token": n * k, "LRB MACs": r * (n + k), "bf16 bytes": bf16,
                     "packed bytes": packed, "x smaller": round(bf16 / packed, 2)})
    return rows, errors


def _attention_rows(model: nn.Module, policy: Policy) -> list[str]:
    out = []
    for name, mod in model.named_modules():
        i, bits = policy.match_attention(name, mod)
        if bits is not None and not isinstance(mod, nn.Linear):
            out.append(f"{name} (rule {i}: q/k/v of scaled_dot_product_attention at A{bits})")
    return out


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def cmd_inspect(args) -> int:
    from tabulate import tabulate
    ref = resolve_model(args.model)
    policy = load_policy(args.policy, ref)
    model = ref.build(meta=True)
    rows, errors = estimate_rows(model, policy)
    if not rows:
        raise CLIError(f"MODEL {args.model} has no nn.Linear layers")
    quant = [r for r in rows if "packed bytes" in r and not r["spec"].startswith("FP")]
    table = list(rows)
    if quant:
        tot = {key: sum(r[key] for r in quant) for key in ("MACs/token", "LRB MACs", "bf16 bytes", "packed bytes")}
        table.append({"layer": f"TOTAL ({len(quant)} quantized)", "in": "", "out": "", "spec": "", **tot,
                      "x smaller": round(tot["bf16 bytes"] / tot["packed bytes"], 2)})
    print(f"{args.model}: {type(model).__name__}, policy {args.policy or ref.default_policy}")
    print(tabulate(table, headers="keys", tablefmt="github"))
    fp = [r for r in rows if r.get("spec", "").startswith("FP")]
    all_bf16 = sum(r.get("bf16 bytes", 0) for r in rows)
    all_packed = sum(r.get("packed bytes", 0) for r in rows)
    print(f"\n{len(quant)} of {len(rows)} linear layers quantized, {len(fp)} kept in FP. All linear layers: "
          f"{_mb(all_bf16)} bf16 -> {_mb(all_packed)} packed ({all_bf16 / max(all_packed, 1):.2f}x smaller).")
    attn = _attention_rows(model, policy)
    if attn:
        print(f"attention rules match {len(attn)} module(s), e.g. {attn[0]}")
    if errors:
        raise CLIError(f"policy does not fit {args.model}: {errors[0]}")
    if not quant:
        print(f"robuq-fx: warning: the policy quantizes no linear layer of {args.model}", file=sys.stderr)
    return 0


# ---- quantize -----------------------------------------------------------------------------------------------------

def check_out_dir(out: str) -> Path:
    """--out must be (or be creatable as) a writable directory; checked with a temporary file that is removed, so
    a bad --out is reported before any work and nothing is left behind."""
    path = Path(out)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        what = "exists and is not a directory" if probe == path else f"cannot be created: {probe} is not a directory"
        raise CLIError(f"--out {out} {what}")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        where = "is not writable" if probe == path else f"cannot be created: cannot write in {probe}"
        raise CLIError(f"--out {out} {where} ({e.strerror or e})") from e
    return path


def cmd_quantize(args) -> int:
    from tabulate import tabulate
    from tqdm.auto import tqdm

    from . import checkpoint, report
    from .passes import lower, quantize
    ref = resolve_model(args.model)
    policy = load_policy(args.policy, ref)
    out = check_out_dir(args.out)
    weights = read_state_dict(args.weights, "--weights") if args.weights else None
    qat_sd = read_state_dict(args.state_dict, "--state-dict") if args.state_dict else None

    # disable=None: tqdm shows the bar only on a terminal; `with` clears it before an error line is printed
    with tqdm(total=4, unit="step", disable=True if args.no_progress else None, file=sys.stderr,
              leave=False) as bar:
        bar.set_description("build")
        model = ref.build(seed=args.seed)
        if weights is not None:
            load_fitting(model, weights, args.weights, "--weights", args.model)
        model.eval()
        bar.update()
        bar.set_description("quantize")
        example = ref.example_inputs(args.batch)
        try:
            qmodel = quantize(model, policy, example, init_lrb=qat_sd is None)  # a QAT state_dict brings its LRB
        except CaptureError as e:
            if example is not None:
                raise
            raise CLIError(f"{str(e).splitlines()[0]}. To capture it with torch.export, define example_inputs() "
                           "(a tuple of inputs, or a dict of keyword inputs) in the factory's module") from e
        if qat_sd is not None:
            load_fitting(qmodel, qat_sd, args.state_dict, "--state-dict", f"the quantize()'d {args.model}")
        qmodel.eval()
        bar.update()
        bar.set_description("lower")
        lowered = lower(qmodel)
        bar.update()
        bar.set_description("save")
        out.mkdir(parents=True, exist_ok=True)
        ckpt = checkpoint.save_quantized(lowered, out / CHECKPOINT)
        rows = report.size_table(lowered, print_table=False)
        table = tabulate(rows, headers="keys", tablefmt="github")
        fp_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        file_bytes = os.path.getsize(ckpt)
        summary = (f"{ckpt}: {_mb(file_bytes)}; the FP model's state_dict ({_dtype_of(model)}): {_mb(fp_bytes)} "
                   f"({fp_bytes / file_bytes:.2f}x smaller)")
        (out / "sizes.md").write_text(f"# {args.model}, policy {args.policy or ref.default_policy}\n\n{table}\n\n"
                                      f"{summary}\n")
        (out / "sizes.json").write_text(json.dumps({"model": args.model, "policy": policy.to_dict(), "layers": rows,
                                                    "checkpoint_bytes": file_bytes,
                                                    "fp_state_dict_bytes": fp_bytes}, indent=2))
        bar.update()
    print(table)
    print(summary)
    return 0


def _dtype_of(model: nn.Module) -> str:
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    return "/".join(dtypes) or "no parameters"


# ---- bench, kernels -----------------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    script = BENCH_DIR / f"bench_{args.which}.py"
    if not script.is_file():
        raise CLIError(f"benchmark script {script} not found: `robuq-fx bench` runs the scripts of a robuq_fx source "
                       "checkout (benchmarks/ is not installed with the package); clone the repository and "
                       "`pip install -e .` it")
    return subprocess.run([sys.executable, str(script), *args.args]).returncode


def _importable(module: str) -> str:
    import importlib
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure means: not usable here
        return f"not importable ({type(e).__name__})"
    return f"importable {getattr(mod, '__version__', '')}".strip()


def cmd_kernels(args) -> int:
    from . import kernels
    from .kernels import switches
    print(kernels.table())
    print("\nOptional GPU components (imported lazily):")
    for name, what, probe in (("triton", "the fp8 path's kernels", "triton"),
                              ("Gluon", "the Gluon quantizer and the warp-specialized quantize-in-GEMM kernel where "
                               "the table has them; opt-in Gluon GEMMs",
                               "triton.experimental.gluon"),
                              ("fast-hadamard-transform", "ROBUQ_HADAMARD=fht", "fast_hadamard_transform"),
                              ("nunchaku", "ROBUQ_KERNEL=nunchaku", "nunchaku")):
        print(f"  {name:24s} {_importable(probe):40s} {what}")
    print("\nEnvironment switches:")
    print(switches.table())
    return 0


# ---- argument parsing ---------------------------------------------------------------------------------------------

MODEL_HELP = (f"a shipped model ({', '.join(models.names())}) or module.path:factory / file.py:factory "
              "(a callable returning an nn.Module)")
POLICY_HELP = ("JSON/YAML policy file, shipped policy name (" + ", ".join(Policy.shipped()) + ") or 'default' "
               "(every Linear W4A4 + Hadamard); default: the shipped model's policy, else 'default'")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="robuq-fx", description="RobuQ-style low-bit quantization of PyTorch models.",
                                epilog="Run 'robuq-fx COMMAND --help' for a command's options.")
    p.add_argument("--version", action="version", version=f"robuq_fx {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("inspect", help="table of the layers a policy quantizes: bits, MACs, bf16 vs packed bytes",
                       description="Which linear layers POLICY quantizes in MODEL, with MACs per token and the bf16 "
                                   "vs packed size of each (estimated from the specs; the model is built on the "
                                   "meta device, so even DiT-XL/2 takes a moment).")
    s.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    s.add_argument("--policy", "-p", metavar="P", help=POLICY_HELP)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("quantize", help="PTQ (or load a QAT state_dict), lower, save a packed checkpoint",
                       description="Build MODEL (random init, or --weights), quantize it with POLICY (or load a "
                                   "QAT state_dict saved from robuq_fx.quantize(model, policy) with --state-dict), "
                                   f"lower it and save DIR/{CHECKPOINT} (robuq_fx.save_quantized) with a size "
                                   "table in DIR/sizes.md and DIR/sizes.json. Load it back with "
                                   f"robuq_fx.load_quantized('DIR/{CHECKPOINT}', fresh_model).")
    s.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    s.add_argument("--policy", "-p", metavar="P", help=POLICY_HELP)
    s.add_argument("--out", "-o", metavar="DIR", required=True, help="output directory (created if missing)")
    s.add_argument("--weights", metavar="PATH", help="FP state_dict (.pt/.pth/.bin or .safetensors) for MODEL")
    s.add_argument("--state-dict", metavar="PATH", help="state_dict of the QAT model (robuq_fx.quantize(MODEL, "
                                                        "POLICY).state_dict() after training), loaded before lowering")
    s.add_argument("--seed", type=int, default=0, help="seed of the random init (default 0)")
    s.add_argument("--batch", type=int, default=2, help="batch of the example inputs used for capture (default 2)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("bench", help="run benchmarks/bench_{linear,dit,accuracy}.py of a source checkout",
                       description="Run benchmarks/bench_WHICH.py with this Python; everything after WHICH goes to "
                                   "the script (e.g. 'robuq-fx bench linear --help').")
    s.add_argument("which", choices=BENCHMARKS, metavar="WHICH", help=" | ".join(BENCHMARKS))
    s.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("kernels", help="registered qlinear kernels: available here or why not",
                       description="The robuq::qlinear kernels, by priority, and why each cannot run here.")
    s.set_defaults(func=cmd_kernels)
    return p


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and set(ln.strip()) != {"^"}]
    return " ".join(lines) or type(e).__name__


def main(argv=None) -> int:
    # torch.export / diffusers / transformers deprecation notices are not for CLI users
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and argparse's usage errors (status 2)
        return e.code if isinstance(e.code, int) else 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except (CLIError, RobuQError) as e:
        print(f"robuq-fx: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
