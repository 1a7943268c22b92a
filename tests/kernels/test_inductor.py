"""Inductor sees our kernels (robuq_fx/kernels/inductor.py): under `torch.compile`, `robuq::qlinear` (fp8-layout
weights, calls the registry gives `triton_fp8`) and `robuq::attention8` are decomposed into triton_ops and ATen ops.

The compiled code runs the same kernels on the same values in the same order as the eager op, so its output must be
*equal* to the eager call's (and the eager path is checked against the references in test_triton_fp8.py /
test_attention8.py). Each test also reads Inductor's generated code: the opaque op must be gone and our Triton
kernels launched from it. The decomposition traced on fake CUDA tensors (CPU, where triton imports):
test_inductor_traced.py.
"""
from __future__ import annotations

import re

import pytest
import torch

import robuq_fx  # noqa: F401
from robuq_fx.kernels import registry, triton_fp8
from robuq_fx.modules import PackedLinear
from robuq_fx.spec import LayerSpec
from tests.kernels.inductor_testing import all_ops, no_compile_caches  # noqa: F401 (fixtures)

_why = triton_fp8.fp8_machine_check() if torch.cuda.is_available() else "no CUDA device"
gpu = pytest.mark.skipif(_why is not None, reason=f"fp8 CUDA path unavailable: {_why}")


# (w_bits, a_bits, a_sym, block, rank, a_clip): W4A4+H, the paper's W1.58A4+H+LRB32, its asymmetric A3/A2 variants
CASES = [(4, 4, True, 128, 0, "absmax"), (1.58, 4, True, 128, 32, "absmax"), (1.58, 3, False, 128, 32, "sigma"),
         (1.58, 2, False, 128, 32, "absmax"), (2, 4, True, 0, 0, "absmax")]


def _layer(k, n, w_bits, a_bits, a_sym, block, rank, a_clip, bias=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    b = (torch.randn(n, device="cuda", generator=g) * 0.1).bfloat16() if bias else None
    spec = LayerSpec(w_bits=w_bits, a_bits=a_bits, hadamard=block > 0, hadamard_block=block or None,
                     lora_rank=rank, a_sym=a_sym, a_clip=a_clip).resolve(k, n)
    down = up = None
    if rank:
        down = (torch.randn(rank, k, device="cuda", generator=g) * 0.05).bfloat16()
        up = (torch.randn(n, rank, device="cuda", generator=g) * 0.05).bfloat16()
    return PackedLinear.from_float(w, b, down, up, spec).use_device_layout()


def _compiled_code(fn, *args):
    """(output, Inductor's generated code without its comments: they name the source ops even when decomposed)."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(fn), *args)
    lines = "\n".join(code).splitlines()
    return out, "\n".join(ln for ln in lines if not ln.lstrip().startswith("#"))


def _calls(code: str, op: str) -> bool:
    """The generated code calls `op` as an extern kernel (torch.ops.robuq.<op>.default(...))."""
    return f"torch.ops.robuq.{op}.default(" in code


@gpu
@pytest.mark.parametrize("epi", ["table", "addmm", "down"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "W{}A{}{}{}{}{}".format(*c))
@pytest.mark.parametrize("m", [37, 1000])
def test_compiled_qlinear_equals_eager_and_launches_our_kernels(case, m, epi, all_ops, monkeypatch):
    """Both epilogue modes of the asymmetric / LRB layers: the table's (the Triton GEMM), and _scaled_mm + the
    low-rank add kernel, traced (`inductor._addmm_traced_ok`; ROBUQ_INDUCTOR_LOWRANK_ADD=0 leaves those layers for
    the Triton GEMM with a warning); and the Triton GEMM making t itself (ROBUQ_FP8_DOWN_IN_GEMM=1), whose output
    is within a bf16 rounding of t of the two-kernel path's."""
    if epi == "addmm":
        monkeypatch.setenv("ROBUQ_FP8_EPI", "addmm")
        monkeypatch.setattr(registry, "_WARNED", set())
    if epi == "down":
        monkeypatch.setenv("ROBUQ_FP8_EPI", "triton")
        mod = _layer(1152, 3456, *case)
        x = torch.randn(2, m, 1152, device="cuda").bfloat16()
        with torch.no_grad():
            two = mod(x)
            monkeypatch.setenv("ROBUQ_FP8_DOWN_IN_GEMM", "1")
            one = mod(x)
        assert ((one.float() - two.float()).norm() / two.float().norm()).item() < 2e-3
    mod = _layer(1152, 3456, *case)
    assert mod.layout == "fp8"
    x = torch.randn(2, m, 1152, device="cuda").bfloat16()
    with torch.no_grad():
        eager = mod(x)
        compiled, code = _compiled_code(mod, x)
        if epi == "addmm" and (case[4] or not case[2]):  # the add kernel after _scaled_mm, in the graph
            assert "lowrank_add_kernel" in code and not _calls(code, "lowrank_add")
            assert not any("ROBUQ_FP8_EPI=addmm" in w for w in registry._WARNED)
    assert not _calls(code, "qlinear"), "the qlinear call was left opaque"
    assert not _calls(code, "act_quant") and not _calls(code, "fp8_gemm"), "a triton_op was not inlined"
    from robuq_fx.kernels.dispatch import stacked_mode
    if epi == "table" and case[4] and case[2] and stacked_mode(2 * m, 3456, 1152):  # the table's stacked LRB mode:
        assert _calls(code, "stacked_codes") and _calls(code, "stacked_mm")  # its two opaque ops
    else:
        assert "act_quant_bfly_kernel" in code and not _calls(code, "stacked_mm")
    if epi == "down" and case[4]:  # t made in the GEMM where its config takes DOWN (`down_config`), else lrb_down
        from robuq_fx.kernels.dispatch import gemm_config
        from robuq_fx.kernels.triton_fp8_kernels import down_config
        fits = down_config(gemm_config(2 * m, 3456, 1152), case[4]) is not None
        assert ("lrb_down_kernel" not in code) == fits, (fits, gemm_config(2 * m, 3456, 1152))
    assert compiled.shape == eager.shape and compiled.dtype == eager.dtype
    assert torch.equal(compiled, eager), (compiled.float() - eager.float()).abs().max()


@gpu
@pytest.mark.parametrize("gemm", ["pointer", "tma"])
def test_compiled_with_dynamic_m(gemm, monkeypatch, all_ops):
    """One compiled graph for every token count (dynamic=True: M is a symbol in the decomposition, the kernels'
    grids and plans follow it), on both Triton GEMMs of the LRB / asymmetric path: equal to eager at each M."""
    if gemm == "tma" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the TMA GEMM needs Hopper")
    monkeypatch.setenv("ROBUQ_FP8_GEMM_KERNEL", gemm)
    monkeypatch.setenv("ROBUQ_FP8_EPI", "triton")
    mod = _layer(1152, 1152, *CASES[3])
    torch._dynamo.reset()
    cmod = torch.compile(mod, dynamic=True)
    with torch.no_grad():
        for m in (37, 1000, 16):
            x = torch.randn(m, 1152, device="cuda").bfloat16()
            assert torch.equal(cmod(x), mod(x)), f"M={m}"


@gpu
@pytest.mark.parametrize("why", ["switched off", "qat only", "packed layout"])
def test_calls_left_to_the_eager_op(why, monkeypatch, all_ops):
    """ROBUQ_INDUCTOR_DECOMPOSE=0 (or "qat"), and calls the decomposition does not take (packed-layout weights), keep
    the op, with the eager kernel choice and result."""
    mod = _layer(1152, 1152, *CASES[0])
    if why in ("switched off", "qat only"):
        monkeypatch.setenv("ROBUQ_INDUCTOR_DECOMPOSE", "0" if why == "switched off" else "qat")
    else:
        mod.set_layout("packed")
    x = torch.randn(64, 1152, device="cuda").bfloat16()
    with torch.no_grad():
        out, code = _compiled_code(mod, x)
        assert torch.equal(out, mod(x))
    assert _calls(code, "qlinear")


@gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="the Gluon quantizer is Hopper-only")
def test_cuda_graphs_keep_the_gluon_quantizer(monkeypatch):
    """Under mode="reduce-overhead" a call for which the quantizer's plan picks the Gluon kernel keeps it through the
    opaque robuq::act_quant_gluon op (ROBUQ_QUANT_KERNEL is not set: the table, here forced per call), and the
    output equals the eager call's; in default mode the graph keeps the traced Triton quantizer."""
    from robuq_fx.kernels import gluon_act_quant, quantizer
    if quantizer._gluon_tiling(1152) is None:
        pytest.skip("no Gluon in this Triton")
    monkeypatch.setattr(quantizer, "_gluon_plan",
                        lambda x2, block, clip, dequant, act: quantizer._gluon_tiling(x2.shape[1])
                        if block == 128 and clip == "absmax" and not dequant and not act else None)
    ran = []
    real = gluon_act_quant.act_quant_gluon_launch
    monkeypatch.setattr(gluon_act_quant, "act_quant_gluon_launch", lambda *a: ran.append(1) or real(*a))
    mod = _layer(1152, 1152, *CASES[0])
    x = torch.randn(4, 256, 1152, device="cuda").bfloat16()
    with torch.no_grad():
        eager = mod(x)
        assert ran, "the eager call did not take the Gluon quantizer"
        torch._dynamo.reset()
        ran.clear()
        cg = torch.compile(mod, mode="reduce-overhead")
        for _ in range(3):
            got = cg(x).clone()
        assert ran, "the CUDA-graph compiled call took the Triton quantizer"
        assert torch.equal(got, eager)
        _, code = _compiled_code(mod, x)  # default mode
    assert "act_quant_gluon" not in code and "act_quant_bfly_kernel" in code


@gpu
@pytest.mark.parametrize("d,causal", [(72, False), (64, True), (128, False)])
def test_compiled_attention8_equals_eager(d, causal, all_ops):
    from robuq_fx.kernels.attention import attention8
    g = torch.Generator(device="cuda").manual_seed(1)
    b, s, h = 2, 257, 16
    qkv = torch.randn(b, s, 3, h, d, device="cuda", generator=g).bfloat16()
    q, k, v = (qkv[:, :, i].contiguous().transpose(1, 2) for i in range(3))  # (b, h, s, d) on (b, s, h, d) memory

    def f(q, k, v):
        return attention8(q, k, v, None, 0.0, causal, None, False, 8)
    with torch.no_grad():
        eager = f(q, k, v)
        compiled, code = _compiled_code(f, q, k, v)
    assert not _calls(code, "attention8") and not _calls(code, "rowquant")
    assert "fake_quant_rows_kernel" in code
    assert torch.equal(compiled, eager)


def test_compiled_qat_step_decomposes_the_qat_ops(monkeypatch):
    """CPU (and any device): under torch.compile, robuq::hadamard / fake_quant_weight / fake_quant_act become their
    torch math inside Inductor's graph (fused with the ops around them), forward and backward (the STE formulas
    stay the ops' own); the step matches eager up to the rounding of reordered fp32 sums (Inductor fuses and
    reorders; no quantization code moves at these tolerances: one flipped code would move a value by a whole step).
    ROBUQ_INDUCTOR_DECOMPOSE=0 keeps the ops opaque."""
    from torch._inductor.utils import run_and_get_code
    import copy
    import robuq_fx as R
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    pol = {"rules": [{"match": "*", "w_bits": 1.58, "a_bits": 4, "hadamard": True, "hadamard_block": 128,
                      "lora_rank": 16}]}
    x = torch.randn(64, 256)
    q = R.quantize(m, pol, example_inputs=(x,))

    def step(mod):
        for p in mod.parameters():
            p.grad = None
        out = mod(x)
        out.pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in mod.parameters()]

    def compiled(mod):
        torch._dynamo.reset()
        c = torch.compile(mod)
        (out, grads), code = run_and_get_code(lambda: step(c))
        return out, grads, "\n".join(ln for ln in "\n".join(code).splitlines() if not ln.lstrip().startswith("#"))

    ref, ref_grads = step(q)
    out, grads, code = compiled(copy.deepcopy(q))
    for op in ("hadamard", "fake_quant_weight", "fake_quant_act"):
        assert not _calls(code, op), f"robuq::{op} left opaque"
    # H is a constant of the graph, not rebuilt every call from the Sylvester levels (cat / neg kernels: 6 a
    # rotation on the GPU, 672 of the paper policy's 1558 kernels at batch 1, H200 session 12)
    assert "_tensor_constant" in code and not re.search(r"fused\w*cat\w*neg", code)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    for g, r in zip(grads, ref_grads):
        assert ((g - r).norm() / r.norm().clamp_min(1e-30)).item() < 1e-4
    monkeypatch.setenv("ROBUQ_INDUCTOR_DECOMPOSE", "0")
    _, _, code = compiled(copy.deepcopy(q))
    assert _calls(code, "fake_quant_weight") and _calls(code, "fake_quant_act")


def test_compiled_qat_siblings_share_one_rotation_and_range():
    """Three QAT linears reading one input (DiT's to_q / to_k / to_v) rotate and range it once in the compiled graph:
    H is lifted once a trace, so AOTAutograd's CSE merges their identical rotations and fake-quants (lifted at every
    use, each rotation read its own copy of H and all three ran: session 21, CPU Inductor's code). Values unchanged
    against eager."""
    from torch._inductor.utils import run_and_get_code
    import robuq_fx as R

    class Siblings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(256, 256) for _ in range(3))

        def forward(self, x):
            return self.q(x) * self.k(x) + self.v(x)
    torch.manual_seed(0)
    pol = {"rules": [{"match": "*", "w_bits": 1.58, "a_bits": 4, "hadamard": True, "hadamard_block": 128,
                      "lora_rank": 16}]}
    x = torch.randn(64, 256)
    q = R.quantize(Siblings(), pol, example_inputs=(x,))
    ref = q(x).detach()
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(q), x)
    code = "\n".join(code)
    # one range kernel (the fake-quant's absmax) for the shared input, where there were three
    ranges = re.findall(r"^\s+(cpp_fused\w*amax\w*)\(", code, re.M)
    assert len(ranges) == 1, ranges
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    torch._dynamo.reset()


def test_register_defines_the_opaque_runtime_ops():
    """A compiled graph loaded from Inductor's on-disk cache calls robuq's opaque ops (the stacked mode's two, the
    Gluon quantizer's) without the decomposition that first defined them having run in this process (H200, session
    11: `torch.ops.robuq.stacked_codes` missing on a cache hit). `register()`, which the ops' fake kernels call while
    Dynamo traces, defines them; checked in a fresh process."""
    import subprocess
    import sys
    code = ("import torch, robuq_fx\nfrom robuq_fx.kernels import inductor\n"
            "names = ('stacked_codes', 'stacked_mm', 'act_quant_gluon')\n"
            "before = [hasattr(torch.ops.robuq, n) for n in names]\ninductor.register()\n"
            "print(before, [hasattr(torch.ops.robuq, n) for n in names])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[False, False, False] [True, True, True]", out.stdout
