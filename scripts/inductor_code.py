"""The Triton code Inductor writes for a lowered DiT-XL/2 (a few blocks): for a kernel seen in a profile, its source
and the lines of the compiled module that call it, per robuq setting. Session 18's profile-pair found the block's
second LayerNorm kernel at ~96 us a call under W4A4+H and -a2 against ~62 us under the paper policy (whose fc1 takes
its input through `robuq::stacked_codes`) and ~66 us in bf16; this shows what it reads and writes.

    python scripts/inductor_code.py --settings dit paper-a2 --layers 2 --match native_layer_norm --out OUT
"""
from __future__ import annotations

import argparse
import gzip
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _dit_setup import SHORT_NAMES, XL2, build, inputs, policies  # noqa: E402

import robuq_fx  # noqa: E402


def compiled_code(model, x) -> str:
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    fn = torch.compile(model)
    with torch.no_grad():
        _, codes = run_and_get_code(lambda: fn(**x))
    return "\n\n# ======== next module\n\n".join(codes)


def kernels_matching(code: str, pattern: str) -> dict:
    """name -> source of every Triton kernel whose name matches `pattern` (Inductor writes each as
    `name = async_compile.triton('name', '''...''')`)."""
    out = {}
    for m in re.finditer(r"^(\w+) = async_compile\.triton\('(\w+)', '''(.*?)'''", code, re.S | re.M):
        if re.search(pattern, m.group(1)):
            out[m.group(1)] = m.group(3)
    return out


def chosen_configs(name: str) -> list:
    """The config(s) Inductor's autotuner kept for kernel `name` in the modules loaded so far (its launchers)."""
    from torch._inductor.codecache import PyCodeCache
    mods = PyCodeCache.modules
    mods = mods.values() if isinstance(mods, dict) else mods
    found = []
    for mod in mods:
        k = getattr(mod, name, None)
        for launcher in getattr(k, "launchers", None) or []:
            found.append(str(getattr(launcher, "config", launcher)))
    return found


def config_times(name: str, src: str, out: Path) -> dict:
    """{config: ms} of every autotuning config of a kernel compiled with Inductor's benchmark harness (its source
    then defines get_args / benchmark_all_configs), on random inputs of the kernel's own shapes."""
    import importlib.util
    path = out / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        timings = mod.benchmark_all_configs(mod.get_args())
    except Exception as e:  # noqa: BLE001 (a diagnostic: say why and go on)
        return {f"(no timings: {type(e).__name__}: {str(e)[:200]})": float("nan")}
    return {str(getattr(k, "config", k)): float(v) for k, v in sorted(timings.items(), key=lambda kv: kv[1])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["dit", "paper-a2", "paper"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--match", default="native_layer_norm")
    ap.add_argument("--out", default="inductor_code_out")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 model")
    ap.add_argument("--bench-configs", action="store_true",
                    help="compile with Inductor's benchmark harness in each kernel (config.benchmark_kernel) and time "
                         "every autotuning config of the matched kernels on random inputs of their shapes")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(XL2, num_layers=args.layers)
    x = inputs(cfg, args.batch, "cuda", torch.bfloat16)
    pols = policies()
    if args.bench_configs:
        import torch._inductor.config as ic
        ic.benchmark_kernel = True
    for key in ([] if args.no_bf16 else ["bf16"]) + args.settings:
        model = build(cfg).to("cuda", torch.bfloat16)
        if key != "bf16":
            pol = robuq_fx.Policy.from_dict(pols[SHORT_NAMES[key]])
            q = robuq_fx.quantize(model, pol, example_inputs=inputs(cfg, 2, "cuda", torch.bfloat16))
            model = robuq_fx.lower(q, progress=False).to("cuda").eval()
        code = compiled_code(model, x)
        with gzip.open(out / f"inductor_code_{key}.py.gz", "wt") as f:
            f.write(code)
        print(f"\n######## {key}: {len(code)} chars of output code")
        for name, src in kernels_matching(code, args.match).items():
            calls = [ln.strip() for ln in code.splitlines() if re.search(rf"\b{name}\.run\(", ln)]
            loads = len(re.findall(r"tl\.load\(", src))
            stores = len(re.findall(r"tl\.store\(", src))
            print(f"=== {name}: {len(calls)} call sites, {loads} loads, {stores} stores; "
                  f"autotuned: {chosen_configs(name)}")
            for c in calls[:1]:
                print("  call:", c[:300])
            if args.bench_configs:
                for cfg, ms in config_times(name, src, out).items():
                    print(f"    {ms * 1e3:8.1f} us  {cfg}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
