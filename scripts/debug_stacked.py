"""Where the stacked LRB mode (kernels/lrb_stacked.py) goes wrong on a GPU, stage by stage (session 10: its outputs
were ~100x too large on the H200 while the CPU references of each piece agreed).

    python scripts/debug_stacked.py [OUT_DIR]     (needs CUDA; ~1 minute)

For a W1.58A4+H+LRB32 layer (the tests' `_layer`) and M in (7, 1000), with the quantizer the table picks and with
ROBUQ_QUANT_KERNEL=triton, one row per stage: the extended weight's code columns against the layer's codes, its
extra columns against `ext_columns`, c read back from its slot, the wide buffer's code columns and s_x against a
plain `act_quant` call, its extra columns against `act_ext_reference` on a float64 t, `_scaled_mm` on the wide
operands against float64 on the same operands, the branch's stacked term against t A^T, and the layer's output
against the float64 reference of its own codes. The first stage that disagrees names the cause.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robuq_fx import kernels  # noqa: E402
from robuq_fx.hadamard import block_hadamard  # noqa: E402
from robuq_fx.kernels import lrb_layout as L, lrb_stacked as S  # noqa: E402
from robuq_fx.kernels import reference, weight_cache  # noqa: E402
from robuq_fx.kernels import triton_fp8 as T  # noqa: E402
from robuq_fx.kernels.quantizer import act_quant  # noqa: E402


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _stages(mod, a, m, k, n, r):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
    rows = []
    with kernels.use("triton_fp8"), torch.no_grad():
        y = mod(x)
    e = weight_cache._entry(a)
    ext = e.stk
    if ext is None or ext.w is None:
        return [["stacked weight", "NOT MADE", ""]], y
    w_full = ext.w
    w = w_full.shape[1] - k  # [extra columns, codes]
    codes_w = reference.weight_codes(a).float()
    rows.append(["weight code columns == layer codes", torch.equal(w_full[:, w:].float(), codes_w), ""])
    cols = L.ext_columns(e.sw, a.lrb_up, ext.c)
    rows.append(["weight extra columns == ext_columns", torch.equal(w_full[:, :w].float(), cols.float()),
                 f"c={ext.c} sw dtype {e.sw.dtype} shape {tuple(e.sw.shape)}"])
    cs = S.c_slot(w_full, r)  # (shown; lrb_split reads it through the code columns)
    rows.append(["c slot", float(cs.float().item()), f"stride {tuple(w_full.stride())} qweight {tuple(a.qweight.stride())}"])
    bh = T._rot_down(a, x.dtype)
    m_pad = max(16, -(-m // 16) * 16)
    wide, sx = S.stacked_codes(x, bh, w_full[:, w:], a.hadamard_block, a.a_bits, a.a_clip, m_pad)
    q0, sx0, _ = act_quant(x, a.hadamard_block, a.a_bits, True, m_store=m_pad, clip=a.a_clip)
    rows.append(["wide code columns == act_quant codes", torch.equal(wide[:, w:].float(), q0.float()),
                 f"mismatches {(wide[:, w:].float() != q0.float()).sum().item()}"])
    rows.append(["s_x == act_quant's", torch.equal(sx, sx0), f"max |d| {(sx - sx0).abs().max().item():.3g}"])
    xh = block_hadamard(x.double(), a.hadamard_block)
    t = (xh @ a.lrb_down.double().t()).float()
    bh_ref = block_hadamard(a.lrb_down.double(), a.hadamard_block)
    t2 = (x.double() @ bh_ref.t()).float()
    rows.append(["t via x H B^T vs x (B H)^T", f"{_rel(t, t2):.3g}", ""])
    ref_ext = L.act_ext_reference(t, sx[:m], ext.c, w)
    got = wide[:m, :w].float()
    rows.append(["wide extra columns vs act_ext_reference", f"{_rel(got, ref_ext.float()):.3g}",
                 f"max|got| {got.abs().max().item():.4g} max|ref| {ref_ext.float().abs().max().item():.4g}"])
    rows.append(["wide pad rows zero", bool((wide[m:].float() == 0).all()) if m_pad > m else "n/a", ""])
    y_mm = T._scaled_mm(wide, w_full, sx, e.sw, None)
    y64 = (wide.double() @ w_full.double().t()) * sx.double().view(-1, 1) * e.sw.double().view(1, -1)
    rows.append(["_scaled_mm(wide, W) vs float64 same operands", f"{_rel(y_mm, y64):.3g}", ""])
    br = (wide[:m, :w].double() @ w_full[:, :w].double().t()) * sx[:m].double().view(-1, 1) * e.sw.double().view(1, -1)
    br_ref = t.double() @ a.lrb_up.double().t()
    rows.append(["stacked branch term vs t A^T", f"{_rel(br, br_ref):.3g}", ""])
    from tests.kernels.test_triton_fp8 import _exact_from_own_codes
    own = _exact_from_own_codes(x, a, "triton_fp8")
    rows.append(["layer output vs own-codes reference", f"{_rel(y, own):.3g}", ""])
    rows.append(["float64 of the wide product + bias vs reference", f"{_rel(y64[:m] + a.bias.double(), own):.3g}", ""])
    return rows, y


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "gpu_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    from tests.kernels.test_triton_fp8 import _args, _layer
    os.environ["ROBUQ_FP8_EPI"] = "stacked"
    report = {}
    for quant in ("table", "triton"):
        if quant == "triton":
            os.environ["ROBUQ_QUANT_KERNEL"] = "triton"
        for layout in ("default", "device"):
            for m in (7, 1000):
                k, n, r = 1152, 3456, 32
                mod = _layer(k, n, 1.58, 4, True, 128, r, seed=k + n)
                if layout == "device":
                    mod.use_device_layout()
                torch.manual_seed(m)
                rows, _ = _stages(mod, _args(mod), m, k, n, r)
                tag = f"quantizer={quant} layout={layout} ({mod.layout}) M={m}"
                print(tag)
                print(tabulate(rows, headers=["stage", "result", "detail"], tablefmt="github"))
                report[tag] = rows
    (out_dir / "debug_stacked.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
