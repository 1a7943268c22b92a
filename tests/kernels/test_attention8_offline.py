"""Offline sm_90 builds (where triton imports; no GPU needed) of the k/v-prequant 8-bit attention kernel
(`triton_attention8.attention8_kernel`, PREQUANT) at the head dims the shipped models use, with the launcher's
config and its ALIGN hint: no spill stores, 16-byte vector loads of q and v (rows of 72 included), both products
on wgmma."""
import re

import pytest

from tests.kernels.sm90 import import_or_none

T = import_or_none("triton_attention8")


@pytest.mark.skipif(T is None, reason="triton does not import here")
@pytest.mark.parametrize("d,sq", [(72, 256), (64, 197), (128, 2048), (40, 64)])
def test_prequant_kernel_builds_without_spills(d, sq):
    from tests.kernels.sm90 import compile_sm90, sass
    fn = T.attention8_kernel
    fixed = ("D", "CAUSAL", "BM", "BN", "DP", "ALIGN", "PREQUANT", "sqd", "skd", "svd", "sod")
    sig = {n: "i32" for n in fn.arg_names if n not in fixed}
    sig.update({"q_ptr": "*bf16", "k_ptr": "*i8", "sk_ptr": "*fp32", "v_ptr": "*bf16", "o_ptr": "*bf16",
                "qk_scale": "fp32", "levels": "fp32"})
    bm, bn, dp, warps = T._config(d, sq)
    kern = compile_sm90(fn, sig, dict(D=d, CAUSAL=False, BM=bm, BN=bn, DP=dp, ALIGN=8, PREQUANT=True, sqd=1, skd=1,
                                      svd=1, sod=1),
                        {"num_warps": warps, "num_stages": 3}, aligned=("q_ptr", "k_ptr", "sk_ptr", "v_ptr", "o_ptr"),
                        gluon=False)
    text, regs = sass(kern)
    assert not re.search(r"\bSTL\b", text), f"d={d}: {regs} registers, spills"
    ops = set(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text, re.M))
    assert "LDG.E.128" in ops and "LDGSTS.E.BYPASS.128" in ops, sorted(o for o in ops if o.startswith("LDG"))
    assert any("IGMMA" in o for o in ops) and any("HGMMA" in o for o in ops), sorted(o for o in ops if "MMA" in o)
