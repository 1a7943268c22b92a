"""Offline sm_90 compiles of our Gluon kernels for CPU tests (no GPU needed where triton with Gluon imports):
compile with the signature the launcher would specialize, and read back ptxas' SASS and register count."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile

import pytest


def import_or_none(module: str):
    """robuq_fx.kernels.<module>, or None where it cannot import (no triton, no Gluon)."""
    try:
        return importlib.import_module(f"robuq_fx.kernels.{module}")
    except Exception:  # noqa: BLE001 - no usable triton here
        return None


def compile_sm90(fn, signature: dict, constexprs: dict, options: dict, aligned: tuple = (), gluon: bool = True):
    """triton.compile of the kernel `fn` (Gluon, or a @triton.jit one with gluon=False) for sm_90: `signature` for
    its runtime arguments (the rest are constexprs), `aligned` the arguments the launcher specializes as 16-byte
    divisible."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource
    names = fn.arg_names
    # constexprs the caller leaves out take their defaults, as a launch does (a kernel grows new ones over time)
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default
                     and p.name not in signature}, **constexprs}
    src = (GluonASTSource if gluon else ASTSource)(
        fn=fn, signature={n: signature.get(n, "constexpr") for n in names},
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass(kernel) -> tuple[str, int]:
    """(SASS text, registers a thread) of a compiled kernel; skips the test where triton ships no cuobjdump."""
    from triton.backends.nvidia import compiler as nv
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("no cuobjdump in this triton")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        text = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    return text, int(re.search(r"REG:(\d+)", usage).group(1))


def opcodes(text: str) -> set:
    return set(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", text, re.M))


# fp8_gemm_kernel's runtime arguments and the ones its launcher specializes as 16-byte divisible (offline builds)
FP8_GEMM_SIG = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "sx_ptr": "*fp32", "sw_ptr": "*fp32",
                "bias_ptr": "*bf16", "lo_ptr": "*fp32", "cs_ptr": "*fp32", "t_ptr": "*bf16", "up_ptr": "*bf16",
                "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_bn": "i32", "stride_cm": "i32",
                "stride_tm": "i32", "stride_un": "i32", "R": "i32", "dn_ptr": "*bf16", "stride_sk": "i32"}
# what the launcher specializes as 16-divisible at every call the fp8 path makes (K and N % 16 == 0 is its
# requirement): without N, the offline build stores bf16 one element an instruction (STG.U16) where the GPU's build
# stores 16 bytes (STG.128), and the instruction counts read off it are not the GPU's
FP8_GEMM_ALIGNED = ("a_ptr", "b_ptr", "c_ptr", "t_ptr", "up_ptr", "dn_ptr", "N", "K", "stride_am", "stride_bn",
                    "stride_cm", "stride_tm", "stride_un")


def run_interpreted(script: str):
    """Run `script` (Python source printing one JSON line last) in Triton's CPU interpreter, in a subprocess
    (TRITON_INTERPRET must be set before triton is imported), from the repository root; returns the parsed line."""
    import json
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                          cwd=root)
    if proc.returncode and "only 0-dimensional arrays can be converted" in proc.stderr:
        import pytest  # Triton 3.6's interpreter with numpy >= 2.4 (the GPU machine's): its loop bounds fail there
        pytest.skip("this Triton's interpreter fails on this numpy (int() of a 1-element array in "
                    "triton/runtime/interpreter.py's __index__; int(self.handle.data.reshape(-1)[0]) fixes it)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
