"""Where the compiled addmm epilogue goes wrong (GPU): `robuq::lowrank_add` after `_scaled_mm`, which compiled gave
outputs far from eager's on the H200 in session 9 (W1.58A4+H+LRB32, M = 74: max |diff| 13.9) while eager matched
the references; `inductor._addmm_traced_ok` keeps it off under torch.compile. Session 10 (H200): every piece equal,
the whole layer not; its generated code (whole_layer) showed the cause: the symmetric layer's lo passed to the add
kernel, turning on its offset term with a placeholder c (fixed in inductor.qlinear_traced; re-run this to confirm).

    python scripts/debug_lowrank_add_compiled.py [OUT_DIR]     (needs CUDA; ~1 minute)

Compiles growing pieces of the traced path, each against the same piece run eagerly on the same inputs, and prints
one row per piece (max |compiled - eager|): the add kernel alone on a contiguous y; on y a row slice of a padded
buffer; after `_scaled_mm` (+ bias); with t from the traced down-projection; the whole layer. The first piece that
differs names the cause; Inductor's generated code of each piece goes to OUT_DIR (default ./gpu_out).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robuq_fx.kernels import inductor  # noqa: E402
from robuq_fx.kernels import triton_fp8 as T  # noqa: E402


def _compare(name, fn, args, out_dir, rows):
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    eager = fn(*args)
    try:
        compiled, code = run_and_get_code(torch.compile(fn), *args)
    except Exception as e:  # noqa: BLE001 - a piece that does not compile is a finding too
        rows.append([name, f"compile failed: {type(e).__name__}: {str(e)[:80]}", ""])
        return
    (out_dir / f"inductor_{name}.py").write_text("\n\n".join(code))
    diff = (compiled.float() - eager.float()).abs().max().item()
    rows.append([name, f"{diff:.4g}", "equal" if torch.equal(compiled, eager) else "DIFFERS"])


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "gpu_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["ROBUQ_INDUCTOR_LOWRANK_ADD"] = "1"
    os.environ["ROBUQ_FP8_EPI"] = "addmm"
    ops = inductor._ops()
    lowrank_add_op, lrb_down_op = ops[3], ops[4]
    torch.manual_seed(0)
    dev, m, m_pad, k, n, r = "cuda", 74, 80, 1152, 3456, 32
    y = torch.randn(m, n, device=dev).bfloat16()
    ypad = torch.randn(m_pad, n, device=dev).bfloat16()
    t = torch.randn(m, r, device=dev).bfloat16()
    up = (torch.randn(n, r, device=dev) * 0.05).bfloat16()
    x2 = torch.randn(m, k, device=dev).bfloat16()
    bh = (torch.randn(r, k, device=dev) * 0.05).bfloat16()
    codes = torch.randint(-7, 8, (m_pad, k), device=dev).float().to(torch.float8_e4m3fn)
    w8 = torch.randint(-1, 2, (n, k), device=dev).float().to(torch.float8_e4m3fn)
    sx = torch.rand(m_pad, device=dev) * 0.01
    sw = torch.rand(n, device=dev) * 0.01
    bias = (torch.randn(n, device=dev) * 0.1).bfloat16()
    rows: list = []
    _compare("add_contiguous", lambda y, t, up: lowrank_add_op(y, t, up, None, None), (y, t, up), out_dir, rows)
    _compare("add_on_row_slice", lambda yp, t, up: lowrank_add_op(yp[:m], t, up, None, None), (ypad, t, up),
             out_dir, rows)
    _compare("scaled_mm_then_add", lambda c, t, up: lowrank_add_op(T._scaled_mm(c, w8, sx, sw, None)[:m], t, up,
                                                                   None, None), (codes, t, up), out_dir, rows)
    _compare("scaled_mm_bias_then_add", lambda c, t, up: lowrank_add_op(T._scaled_mm(c, w8, sx, sw, bias)[:m], t, up,
                                                                        None, None), (codes, t, up), out_dir, rows)
    _compare("down_proj_then_add", lambda y, x2, up: lowrank_add_op(y, T.down_proj(x2, bh, lrb_down_op), up,
                                                                    None, None), (y, x2, up), out_dir, rows)
    from tests.kernels.test_inductor import _layer
    mod = _layer(1152, 3456, 1.58, 4, True, 128, 32, "absmax")
    with torch.no_grad():
        _compare("whole_layer", mod, (x2.view(2, m // 2, k),), out_dir, rows)
    print(torch.cuda.get_device_name(), "| torch", torch.__version__)
    print(tabulate(rows, headers=["piece", "max |compiled - eager|", "torch.equal"], tablefmt="github"))


if __name__ == "__main__":
    main()
