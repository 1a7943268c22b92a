"""Where the addmm epilogue's error comes from (GPU): the asymmetric + LRB layers at K = 4608 that fail the
elementwise bound of tests/kernels/test_triton_fp8.py in ROBUQ_FP8_EPI=addmm mode (H200, sessions 7 and 8).

    python scripts/debug_addmm_precision.py            (needs CUDA; prints one table, a few seconds)

Rebuilds the failing cases with the test's own helpers and splits the path into its stages, each against float64 on
the same inputs: the codes' GEMM (`_scaled_mm`, bf16 out), the LRB down-projection t (bf16, and from B H rounded to
bf16), the in-place add of t A^T + lo' c, and the whole layer; for each the fraction of elements within the
test's bound (1e-2 |y| + 1e-2 rms(y)) when only that stage rounds. The stage whose fraction matches the layer's names
the cause.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robuq_fx import kernels  # noqa: E402
from robuq_fx import quantizers as Q  # noqa: E402
from robuq_fx.hadamard import block_hadamard  # noqa: E402
from robuq_fx.kernels import quantizer, reference, triton_fp8  # noqa: E402
from robuq_fx.kernels.weight_cache import rotated_down  # noqa: E402
from tests.kernels.fp8_testing import within  # noqa: E402
from tests.kernels.test_triton_fp8 import _args, _exact_from_own_codes, _layer  # noqa: E402


def main() -> None:
    from robuq_fx.kernels.triton_lowrank import lowrank_add  # needs triton
    mm = torch.backends.cuda.matmul
    mm.allow_bf16_reduced_precision_reduction = mm.allow_fp16_reduced_precision_reduction = False  # as the tests
    os.environ["ROBUQ_FP8_EPI"] = "addmm"
    rows = []
    for a_bits, clip in ((2, "absmax"), (2, "sigma"), (3, "sigma")):
        k, n = 4608, 1152
        mod = _layer(k, n, 1.58, a_bits, False, 128, 32, seed=k, a_clip=clip)
        a = _args(mod)
        for m in (7, 1000):
            torch.manual_seed(m + k)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
            with kernels.use("triton_fp8"):
                y = mod(x)
            ref = _exact_from_own_codes(x, a, "triton_fp8").double()
            m_pad = max(16, -(-m // 16) * 16)
            codes, sx, lo = quantizer.act_quant(x, a.hadamard_block, a.a_bits, a.a_sym, m_store=m_pad, shift=True,
                                                clip=a.a_clip)
            e = triton_fp8._fp8_weights(a)
            inter = triton_fp8._scaled_mm(codes, e.fp8, sx, e.sw, a.bias.to(torch.bfloat16))[:m]
            wq = Q.dequantize_weight(reference.weight_codes(a), a.w_scale, torch.float64)
            inter64 = sx[:m, None].double() * (codes[:m].double() @ reference.weight_codes(a).double().t()) \
                * e.sw.double() + a.bias.double()
            bh = rotated_down(a, torch.bfloat16)
            t_lin = torch.nn.functional.linear(x, bh)
            t_new = triton_fp8.down_proj(x, bh)
            t64_bh = x.double() @ bh.double().t()  # exact product of the rounded B H
            t64 = block_hadamard(x.double(), 128) @ a.lrb_down.double().t()
            cs = Q.weight_code_colsum(reference.weight_codes(a), a.w_scale)
            lrb64 = t64 @ a.lrb_up.double().t() + lo[:m, None].double() * cs.double()
            y_chain = inter.clone()
            lowrank_add(y_chain, y_chain, t_new, a.lrb_up.contiguous(), lo, e.cs)
            rows.append({
                "case": f"W1.58A{a_bits} asym {clip} M={m}",
                "layer (mod(x))": round(within(y, ref), 5),
                "addmm chain here": round(within(y_chain, ref), 5),
                "GEMM out rounded only": round(within(inter.double() + lrb64, ref), 5),
                "t = F.linear only": round(within(inter64 + t_lin.double() @ a.lrb_up.double().t()
                                                  + lo[:m, None].double() * cs.double(), ref), 5),
                "t = down_proj only": round(within(inter64 + t_new.double() @ a.lrb_up.double().t()
                                                   + lo[:m, None].double() * cs.double(), ref), 5),
                "B H rounded only": round(within(inter64 + t64_bh @ a.lrb_up.double().t()
                                                 + lo[:m, None].double() * cs.double(), ref), 5),
                "max |t err| F.linear / down_proj": f"{(t_lin.double() - t64_bh).abs().max().item():.3g} / "
                                                    f"{(t_new.double() - t64_bh).abs().max().item():.3g}",
                "wq check": round(within(sx[:m, None].double() * (codes[:m].double() @ wq.t()) + a.bias.double()
                                         + lrb64, ref), 5),
            })
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    print(tabulate(rows, headers="keys", tablefmt="github"))


if __name__ == "__main__":
    main()
