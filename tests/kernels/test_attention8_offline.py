"""Offline sm_90 builds (where triton imports; no GPU needed) of the 8-bit attention kernel
(`triton_attention8.attention8_kernel`, both forms: k / v quantized inside, or PREQUANT) at the head dims the shipped
models use, with the launcher's config, head-dim pieces and ALIGN hint: no spill stores, 16-byte vector loads of q
and v (rows of 72 included), both products on wgmma; at 72 the two-piece form takes fewer registers and
instructions than the padded block it replaced, and a register cap gives four programs an SM without spills."""
import re

import pytest

from tests.kernels.sm90 import import_or_none

T = import_or_none("triton_attention8")


def _build(d, sq, prequant, config=None, split=True):
    from tests.kernels.sm90 import compile_sm90, sass
    fn = T.attention8_kernel
    fixed = ("D", "CAUSAL", "BM", "BN", "DP", "SPLIT", "DE", "DV", "ALIGN", "PREQUANT", "sqd", "skd", "svd", "sod")
    sig = {n: "i32" for n in fn.arg_names if n not in fixed}
    sig.update({"q_ptr": "*bf16", "k_ptr": "*i8" if prequant else "*bf16", "sk_ptr": "*fp32", "v_ptr": "*bf16",
                "o_ptr": "*bf16", "qk_scale": "fp32", "levels": "fp32"})
    bm, bn, warps = T._config(d, sq)
    stages, opts = (3 if prequant else 2), {}
    if config is not None:
        bm, bn, warps, stages, maxnreg = config
        opts = {"maxnreg": maxnreg} if maxnreg else {}
    dp, de, dv = T._pieces(d, split)
    kern = compile_sm90(fn, sig, dict(D=d, CAUSAL=False, BM=bm, BN=bn, DP=dp, SPLIT=de > 0, DE=de or 32, DV=dv or 16, ALIGN=8,
                                      PREQUANT=prequant, sqd=1, skd=1, svd=1, sod=1),
                        {"num_warps": warps, "num_stages": stages, **opts},
                        aligned=("q_ptr", "k_ptr", "sk_ptr", "v_ptr", "o_ptr"), gluon=False)
    text, regs = sass(kern)
    ops = set(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text, re.M))
    return text, regs, ops


@pytest.mark.skipif(T is None, reason="triton does not import here")
@pytest.mark.parametrize("d,sq", [(72, 256), (64, 197), (128, 2048), (40, 64)])
def test_prequant_kernel_builds_without_spills(d, sq):
    text, regs, ops = _build(d, sq, True)
    assert not re.search(r"\bSTL\b", text), f"d={d}: {regs} registers, spills"
    assert "LDG.E.128" in ops and "LDGSTS.E.BYPASS.128" in ops, sorted(o for o in ops if o.startswith("LDG"))
    assert any("IGMMA" in o for o in ops) and any("HGMMA" in o for o in ops), sorted(o for o in ops if "MMA" in o)


@pytest.mark.skipif(T is None, reason="triton does not import here")
@pytest.mark.parametrize("prequant", [True, False], ids=["prequant", "inline"])
def test_head_dim_72_in_two_pieces(prequant):
    """DiT's 72 as 64 + 32 (q.k) / 64 + 16 (P.V) instead of 128 padded: fewer registers and instructions at the
    default config, no spills; capped at 128 registers, 64 x 32 tiles of 4 warps fit four programs an SM unspilled."""
    assert T._pieces(72) == (64, 32, 16) and T._pieces(64) == (64, 0, 0) and T._pieces(72, split=False)[1] == 0
    text, regs, ops = _build(72, 256, prequant)
    ptext, pregs, _ = _build(72, 256, prequant, split=False)
    count = len(re.findall(r"^\s+/\*[0-9a-f]+\*/", text, re.M))
    pcount = len(re.findall(r"^\s+/\*[0-9a-f]+\*/", ptext, re.M))
    assert not re.search(r"\bSTL\b", text) and regs < pregs and count < pcount, (regs, pregs, count, pcount)
    assert any("IGMMA" in o for o in ops) and any("HGMMA" in o for o in ops)
    text, regs, _ = _build(72, 256, prequant, config=(64, 32, 4, 3, 128))
    assert regs <= 128 and not re.search(r"\bSTL\b", text)
