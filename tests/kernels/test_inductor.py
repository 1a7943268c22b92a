"""Inductor sees our kernels (robuq_fx/kernels/inductor.py): under `torch.compile`, `robuq::qlinear` (fp8-layout
weights, calls the registry gives `triton_fp8`) and `robuq::attention8` are decomposed into triton_ops and ATen ops.

The compiled code runs the same kernels on the same values in the same order as the eager op, so its output must be
*equal* to the eager call's (and the eager path is checked against the references in test_triton_fp8.py /
test_attention8.py). Each test also reads Inductor's generated code: the opaque op must be gone and our Triton
kernels launched from it. One CPU test (where triton imports) traces the decomposition on fake CUDA tensors.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import robuq_fx  # noqa: F401
from robuq_fx import packing
from robuq_fx.kernels import inductor, registry, triton_fp8
from robuq_fx.modules import PackedLinear
from robuq_fx.spec import LayerSpec
from tests.kernels.sm90 import import_or_none

_why = triton_fp8.fp8_machine_check() if torch.cuda.is_available() else "no CUDA device"
gpu = pytest.mark.skipif(_why is not None, reason=f"fp8 CUDA path unavailable: {_why}")


@pytest.fixture(autouse=True)
def _no_compile_caches():
    """Compile from scratch: Inductor's and AOTAutograd's caches key on the Dynamo graph, which is the same with and
    without our decompositions (they happen inside AOTAutograd), so a warm cache would answer for the other case."""
    import torch._inductor.config as ic
    with ic.patch(force_disable_caches=True):
        yield


@pytest.fixture
def all_ops(monkeypatch):
    """Decompose qlinear and attention8 (ROBUQ_INDUCTOR_DECOMPOSE=1; the default leaves attention8 opaque)."""
    monkeypatch.setenv("ROBUQ_INDUCTOR_DECOMPOSE", "1")


def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


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


def _kernel_names(code: str) -> set:
    """The Triton kernels a functionalized trace launches (its wrapper nodes name them by side-table index)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    names = set()
    for i in set(re.findall(r"kernel_idx = (\d+)", code)):
        k = kernel_side_table.get_kernel(int(i))
        names.add(getattr(getattr(k, "fn", k), "__name__", str(k)))
    return names


def _fake_sm90(monkeypatch):
    """Trace our kernels for an sm_90 target with or without a GPU: the TTIR analysis asks the active driver for its
    target and the dispatch asks the device, which a CPU machine cannot answer; the fp8 kernel's machine check."""
    import triton
    from triton.backends.compiler import GPUTarget
    if packing.FP8 is None:
        pytest.skip("no float8 dtype in this torch")

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
    if not torch.cuda.is_available():
        monkeypatch.setattr(triton.runtime.driver, "_active", Sm90())
        from robuq_fx.kernels import fp8_gemms
        for mod in (triton_fp8, fp8_gemms):
            monkeypatch.setattr(mod, "_capability", lambda index: (9, 0))
        monkeypatch.setattr(fp8_gemms, "_sms", lambda index: 132)
    k8 = registry._KERNELS["triton_fp8"]
    monkeypatch.setitem(registry._KERNELS, "triton_fp8", dataclasses.replace(k8, machine_check=lambda: None))
    inductor.register()


def _fake_w158_lrb_inputs(extended_cols: int = 0, colsum: bool = False) -> tuple:
    """Fake CUDA arguments of a 256 -> 512 W1.58A4+H+LRB32 qlinear call: x (8, 256), qweight (512, 256) fp8,
    w_scale, bias, lrb_down, lrb_up; with extended_cols, also a (512, extended_cols) fp8 weight made in the same
    fake mode (make_fx takes inputs of one mode only); with colsum, also the (512,) fp32 column sums."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out = (torch.empty(8, 256, dtype=torch.bfloat16, device="cuda"),
               torch.empty(512, 256, dtype=packing.FP8, device="cuda"),
               torch.empty(512, 1, dtype=torch.float32, device="cuda"),
               torch.empty(512, dtype=torch.bfloat16, device="cuda"),
               torch.empty(32, 256, dtype=torch.bfloat16, device="cuda"),
               torch.empty(512, 32, dtype=torch.bfloat16, device="cuda"))
        if extended_cols:
            out += (torch.empty(512, extended_cols, dtype=packing.FP8, device="cuda"),)
        if colsum:
            out += (torch.empty(512, dtype=torch.float32, device="cuda"),)
    return out


@pytest.mark.skipif(not _triton_imports() or not torch.cuda.is_available(),
                    reason="views of fake CUDA fp8 tensors need a CUDA build of torch")
def test_stacked_mode_traces_once_the_weight_is_extended(monkeypatch, all_ops):
    """ROBUQ_FP8_EPI=stacked under torch.compile: a layer whose qweight is not extended (lrb_stacked.prepare did not
    run) traces the Triton epilogue GEMM, never an op that would extend it inside the graph; an extended one
    runs its codes through one opaque op (`robuq::stacked_codes`, given the input activation) and
    `robuq::stacked_mm` over the extended weight."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from robuq_fx.kernels import lrb_stacked
    _fake_sm90(monkeypatch)
    monkeypatch.setenv("ROBUQ_FP8_EPI", "stacked")
    # fake CUDA _scaled_mm needs a CUDA build: a stand-in with its output for the trace
    monkeypatch.setattr(triton_fp8, "_scaled_mm", lambda codes, w8, sx, sw, bias: torch.ops.aten.mm(
        codes.to(torch.bfloat16), w8.t().to(torch.bfloat16)))
    x, plain, ws, b, dn, up, full = _fake_w158_lrb_inputs(256 + lrb_stacked.ext_width(32))

    def f(x, qw, ws, b, dn, up):
        return torch.ops.robuq.qlinear(x, qw, ws, b, dn, up, 512, 256, 1.58, 4, 128, True, "absmax",
                                       input_act="gelu_tanh")

    def trace(qw):  # qweight = the last 256 columns of qw (a view into the extended rows where qw is wider)
        return make_fx(dispatch_functionalize(lambda x, qw, *t: f(x, qw[:, qw.shape[1] - 256:], *t)),
                       tracing_mode="fake")(x, qw, ws, b, dn, up).code
    with pytest.warns(UserWarning, match="not extended before compiling"):
        code = trace(plain)  # not extended: the epilogue GEMM, no stacked kernels, no opaque op
    assert "robuq.qlinear" not in code and "lrb_split_kernel" not in _kernel_names(code)
    code = trace(full)
    assert "robuq.qlinear" not in code
    # the codes: one opaque op, no graph-level write into a slice of the buffer (Inductor turned it into a copy
    # with an fp8 NaN fill Triton 3.6 does not compile, H200 session 11), the activation passed to it
    assert re.search(r"robuq\.stacked_codes\.default\([^)]*'gelu_tanh'", code), code
    assert "lrb_split_kernel" not in _kernel_names(code) and "slice_scatter" not in code
    # the GEMM over the extended weight: one opaque op given qweight itself (no view of it beyond its extent in the
    # graph: Inductor materialized one without the bytes outside, H200 session 10)
    assert "robuq.stacked_mm.default(" in code and "as_strided" not in code


@pytest.mark.skipif(not _triton_imports(), reason="triton does not import here")
@pytest.mark.parametrize("gemm", ["pointer", "tma"])
def test_functional_decomposition_on_fake_cuda_tensors(gemm, monkeypatch, all_ops):
    """Where triton imports (no GPU needed): functionalizing a W1.58A4+H+LRB call on fake CUDA tensors, as
    AOTAutograd does for Inductor, leaves no robuq op but the Triton kernels as functional kernel nodes (the
    quantizer and the fused-epilogue GEMM; or _scaled_mm), which clone only their outputs (Triton's TTIR, built for an
    sm_90 target, shows which pointers they store to); so does the default ("qat,qlinear").
    ROBUQ_INDUCTOR_DECOMPOSE=0 and "qat" keep the op."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    _fake_sm90(monkeypatch)
    monkeypatch.setenv("ROBUQ_FP8_GEMM_KERNEL", gemm)
    x, qw, ws, b, dn, up = _fake_w158_lrb_inputs()

    def f(x, qw, ws, b, dn, up):
        return torch.ops.robuq.qlinear(x, qw, ws, b, dn, up, 512, 256, 1.58, 4, 128, True, "absmax")

    def trace():
        return make_fx(dispatch_functionalize(f), tracing_mode="fake")(x, qw, ws, b, dn, up).code
    code = trace()
    assert "robuq.qlinear" not in code and "robuq.act_quant" not in code and "robuq.fp8_gemm" not in code
    assert "triton_kernel_wrapper_functional" in code
    clones = re.findall(r"tensors_to_clone = (\[[^]]*\])", code)
    assert clones and all(set(eval(c)) <= {"out_ptr", "scale_ptr", "lo_ptr", "c_ptr", "t_ptr"} for c in clones), clones
    assert "lrb_down_kernel" in _kernel_names(code)  # the branch's down-projection: our kernel, traced
    # a fused GELU (input_act) goes into the two kernels that read x, not into graph ops before them
    act_code = make_fx(dispatch_functionalize(
        lambda *t: torch.ops.robuq.qlinear(*t, 512, 256, 1.58, 4, 128, True, "absmax", input_act="gelu_tanh")),
        tracing_mode="fake")(x, qw, ws, b, dn, up).code
    assert "gelu" not in act_code and "tanh" not in act_code
    assert act_code.count("'ACT': 2") == 2, re.findall(r"'ACT': \d", act_code)
    with monkeypatch.context() as mp:  # the addmm mode: _scaled_mm (fake CUDA _scaled_mm needs a CUDA build), then
        mp.setenv("ROBUQ_FP8_EPI", "addmm" if torch.cuda.is_available() else "triton")  # the low-rank add kernel
        if torch.cuda.is_available():
            code_addmm = trace()
            assert "_scaled_mm" in code_addmm and "lowrank_add_kernel" in _kernel_names(code_addmm)
            # a symmetric layer: the add kernel without its offset term (session 9's compiled-only error: lo was
            # passed, switching the term on with a placeholder c)
            assert "'ASYM': False" in code_addmm and "'ASYM': True" not in code_addmm
            assert "robuq.lowrank_add" not in code_addmm and "robuq.lrb_down" not in code_addmm
            mp.setenv("ROBUQ_INDUCTOR_LOWRANK_ADD", "0")  # turned off: the Triton epilogue GEMM instead
            assert "lowrank_add_kernel" not in _kernel_names(trace())
    with monkeypatch.context() as mp:  # under CUDA graphs, where the table picks the Gluon quantizer: opaque op
        import torch._inductor.config as ic
        from robuq_fx.kernels import quantizer
        mp.setattr(quantizer, "_gluon_plan", lambda *a: (1,))
        assert "robuq.act_quant_gluon" not in trace()  # default mode: the traced Triton quantizer
        with ic.patch({"triton.cudagraphs": True}):
            assert "robuq.act_quant_gluon.default(" in trace()
            mp.setenv("ROBUQ_INDUCTOR_GLUON_QUANT", "0")
            assert "robuq.act_quant_gluon" not in trace()
    for v in ("0", "qat", "qat,attention8"):
        monkeypatch.setenv("ROBUQ_INDUCTOR_DECOMPOSE", v)
        assert "robuq.qlinear.default(" in trace()
    monkeypatch.setenv("ROBUQ_INDUCTOR_DECOMPOSE", "1")
    for var, val in (("ROBUQ_FP8_FUSED_QUANT", "1"), ("ROBUQ_QUANT_KERNEL", "gluon"), ("ROBUQ_FP8_GEMM_KERNEL", "gluon")):
        with monkeypatch.context() as mp:  # an opt-in Gluon kernel: the op stays opaque, so that its eager path runs it
            mp.setenv(var, val)
            assert "robuq.qlinear.default(" in trace(), var
    monkeypatch.delenv("ROBUQ_INDUCTOR_DECOMPOSE")  # the default decomposes qlinear
    assert "robuq.qlinear" not in trace()
    monkeypatch.setenv("ROBUQ_INDUCTOR_DECOMPOSE", "qat,qlnear")
    with pytest.raises(ValueError, match="unknown.*qlnear"):
        trace()


@pytest.mark.skipif(not _triton_imports(), reason="triton does not import here")
def test_down_projection_inside_the_gemm_when_chosen(monkeypatch, all_ops):
    """ROBUQ_FP8_DOWN_IN_GEMM=1 (or the table's down_in_gemm): the traced LRB call launches the epilogue GEMM with
    DOWN and no lrb_down kernel; with an input activation (which only lrb_down applies) it keeps lrb_down."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    _fake_sm90(monkeypatch)
    x, qw, ws, b, dn, up = _fake_w158_lrb_inputs()

    def trace(**kw):
        return make_fx(dispatch_functionalize(lambda *t: torch.ops.robuq.qlinear(
            *t, 512, 256, 1.58, 4, 128, True, "absmax", **kw)), tracing_mode="fake")(x, qw, ws, b, dn, up).code
    monkeypatch.setenv("ROBUQ_FP8_EPI", "triton")
    assert "lrb_down_kernel" in _kernel_names(trace()) and "'DOWN': True" not in trace()
    monkeypatch.setenv("ROBUQ_FP8_DOWN_IN_GEMM", "1")
    code = trace()
    assert "'DOWN': True" in code and "lrb_down_kernel" not in _kernel_names(code)
    code = trace(input_act="gelu")
    assert "'DOWN': True" not in code and "lrb_down_kernel" in _kernel_names(code)


@pytest.mark.skipif(not _triton_imports(), reason="triton does not import here")
def test_output_activation_goes_into_the_gemm_store(monkeypatch, all_ops):
    """output_act (the GELU after fc1) traced: the Triton GEMM's store applies it (OUT_ACT; the plain layer switches
    from _scaled_mm to that GEMM, the LRB layer keeps its epilogue GEMM, with DOWN too), no GELU graph op; where the
    call takes the stacked mode the GELU is a graph op after the layer, as eagerly (`out_act_in_gemm`)."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    _fake_sm90(monkeypatch)
    x, qw, ws, b, dn, up = _fake_w158_lrb_inputs()

    def trace(lrb=True, **kw):
        args = (x, qw, ws, b, dn, up) if lrb else (x, qw, ws, b)
        def f(*t):
            t = t if lrb else (*t, None, None)
            return torch.ops.robuq.qlinear(*t, 512, 256, 1.58, 4, 128, True, "absmax", **kw)
        return make_fx(dispatch_functionalize(f), tracing_mode="fake")(*args).code
    monkeypatch.setenv("ROBUQ_FP8_EPI", "triton")
    for lrb in (True, False):
        for act, n in (("gelu", 1), ("gelu_tanh", 2)):
            code = trace(lrb, output_act=act)
            assert f"'OUT_ACT': {n}" in code and "gelu" not in code and "tanh" not in code, (lrb, act)
            assert "fp8_gemm_kernel" in _kernel_names(code) and "_scaled_mm" not in code
    code = trace()  # (the plain layer without it runs _scaled_mm, which fake CUDA tensors trace on a CUDA build only)
    assert "'OUT_ACT': 0" in code and "'OUT_ACT': 1" not in code and "'OUT_ACT': 2" not in code
    monkeypatch.setenv("ROBUQ_FP8_DOWN_IN_GEMM", "1")
    code = trace(output_act="gelu")
    assert "'DOWN': True" in code and "'OUT_ACT': 1" in code
    monkeypatch.delenv("ROBUQ_FP8_DOWN_IN_GEMM")
    from robuq_fx.kernels import fp8_gemms
    monkeypatch.setattr(fp8_gemms, "takes_stacked", lambda a, m: True)  # a call the GEMM does not apply it in
    code = trace(output_act="gelu")
    assert "'OUT_ACT': 1" not in code and "gelu" in code


@pytest.mark.skipif(not _triton_imports(), reason="triton does not import here")
def test_sigma_clipped_call_decomposes_in_a_fresh_process(monkeypatch, all_ops):
    """An asymmetric sigma-clipped call (the -a3 / -a2 policies) traced before any eager call has computed the clip
    constant: the decomposition computes it (tracing modes off) rather than failing on its grid's float() and
    leaving the op opaque (before session 13, in every process that compiled a model before running it)."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from robuq_fx import quantizers as Q
    from robuq_fx.kernels import quantizer
    _fake_sm90(monkeypatch)
    x, qw, ws, b, dn, up = _fake_w158_lrb_inputs()
    getattr(Q, "_gaussian_clip_grid", Q.gaussian_clip).cache_clear()
    quantizer._hscale.cache_clear()
    gm = make_fx(dispatch_functionalize(lambda *t: torch.ops.robuq.qlinear(*t, 512, 256, 1.58, 3, 128, False,
                                                                           "sigma")),
                 tracing_mode="fake")(x, qw, ws, b, dn, up)
    assert "robuq.qlinear" not in gm.code and "act_quant_bfly_kernel" in _kernel_names(gm.code)
    # nor a CPU constant from the launch's scalars (_hscale's float64 tensor, made inside the trace before session 13)
    consts = [getattr(gm, n) for n in dir(gm) if n.startswith("_tensor_constant")]
    assert not [c for c in consts if c.device.type == "cpu"], [(c.dtype, tuple(c.shape)) for c in consts]


@pytest.mark.skipif(not _triton_imports(), reason="triton does not import here")
def test_layer_rotated_down_is_read_not_recomputed(monkeypatch, all_ops):
    """Given the layer's B H (lrb_down_h, which PackedLinear keeps on a GPU), the functionalized qlinear call reads it:
    no product of B with H (an mm, and the Hadamard matrix it needs) is left in the graph, which ran on every
    compiled forward before (H200 session 12: one cuBLAS GEMM and six Hadamard-building kernels per LRB layer);
    the branch's down-projection kernel still runs, on that tensor."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    _fake_sm90(monkeypatch)
    x, qw, ws, b, dn, up = _fake_w158_lrb_inputs()
    dh = dn.clone()  # a fake tensor of the same mode

    def f(x, qw, ws, b, dn, up, *dh):
        return torch.ops.robuq.qlinear(x, qw, ws, b, dn, up, 512, 256, 1.58, 4, 128, True, "absmax",
                                       lrb_down_h=dh[0] if dh else None)

    def trace(*args):
        return make_fx(dispatch_functionalize(f), tracing_mode="fake")(*args).code
    without, given = trace(x, qw, ws, b, dn, up), trace(x, qw, ws, b, dn, up, dh)
    assert "aten.mm" in without or "aten.bmm" in without  # B H made in the graph
    assert "aten.mm" not in given and "aten.bmm" not in given and "aten.cat" not in given
    assert "lrb_down_kernel" in _kernel_names(given)


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


@pytest.mark.skipif(not _triton_imports(), reason="triton does not import here")
def test_table_picked_quantize_in_gemm_keeps_the_op_opaque(monkeypatch, all_ops):
    """Where the dispatch table picks the warp-specialized quantize-in-GEMM kernel (Gluon, which Inductor cannot
    launch) for a call, the decomposition leaves robuq::qlinear opaque (its eager path runs the kernel); for other
    M buckets, and with ROBUQ_FP8_FUSED_QUANT=0, it decomposes as usual."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from robuq_fx.kernels import dispatch as D
    if import_or_none("gluon_qgemm_ws") is None:
        pytest.skip("no Gluon in this triton")
    _fake_sm90(monkeypatch)
    monkeypatch.delenv("ROBUQ_FP8_FUSED_QUANT", raising=False)
    x, qw, ws, b, dn, up = _fake_w158_lrb_inputs()  # M = 8: bucket 256
    table = dict(D.dispatch_table())
    table["shapes"] = {**table.get("shapes", {}), "512x256": {"fused_ws_lrb": {"256": True, "1024": False}}}
    monkeypatch.setattr(D, "dispatch_table", lambda: table)

    def code():
        return make_fx(dispatch_functionalize(lambda *t: torch.ops.robuq.qlinear(
            *t, 512, 256, 1.58, 4, 128, True, "absmax")), tracing_mode="fake")(x, qw, ws, b, dn, up).code
    assert D.fused_quant_mode(8, 512, 256, 32) == "ws" and D.fused_quant_mode(8, 512, 256, 0) is None
    assert "robuq.qlinear" in code()
    monkeypatch.setenv("ROBUQ_FP8_FUSED_QUANT", "0")
    assert D.fused_quant_mode(8, 512, 256, 32) is None
    assert "robuq.qlinear" not in code()
    monkeypatch.delenv("ROBUQ_FP8_FUSED_QUANT")
    table["shapes"]["512x256"]["fused_ws_lrb"] = {"256": False, "1024": True}
    assert D.fused_quant_mode(8, 512, 256, 32) is None and D.fused_quant_mode(600, 512, 256, 32) == "ws"
    assert "robuq.qlinear" not in code()


@pytest.mark.skipif(not _triton_imports(), reason="triton does not import here")
@pytest.mark.parametrize("a_bits,a_sym,clip", [(3, False, "sigma"), (2, False, "sigma"), (4, True, "absmax")],
                         ids=["a3", "a2", "paper"])
def test_low_bit_policies_decompose_without_cpu_tensors(a_bits, a_sym, clip, monkeypatch, all_ops):
    """The -a3 / -a2 policies' LRB layers (asymmetric, sigma ranges) traced on fake CUDA tensors, as under
    torch.compile: decomposed into our Triton kernels like the paper policy's (no opaque qlinear left), and no tensor
    of the graph on the CPU (a CPU constant makes CUDA graphs skip the whole graph: session 13 found `_hscale`
    leaving one when first computed inside a trace)."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from robuq_fx import quantizers as Q
    from robuq_fx.kernels import quantizer
    _fake_sm90(monkeypatch)
    monkeypatch.setenv("ROBUQ_FP8_EPI", "triton")
    quantizer._hscale.cache_clear()  # first computed inside this trace, as in a process that compiles first
    Q._gaussian_clip_grid.cache_clear()
    x, qw, ws, b, dn, up = _fake_w158_lrb_inputs()
    gm = make_fx(dispatch_functionalize(lambda *t: torch.ops.robuq.qlinear(
        *t, 512, 256, 1.58, a_bits, 128, a_sym, clip)), tracing_mode="fake")(x, qw, ws, b, dn, up)
    assert "robuq.qlinear" not in gm.code and "act_quant_bfly_kernel" in _kernel_names(gm.code)
    consts = {n: t for n, t in gm.named_buffers()} | {n: getattr(gm, n) for n in dir(gm)
                                                       if n.startswith("_tensor_constant")}
    bad = {n: (t.device, t.dtype) for n, t in consts.items() if isinstance(t, torch.Tensor)
           and t.device.type != "cuda"}
    assert not bad, bad
    for node in gm.graph.nodes:  # nor a tensor made on the CPU inside the graph
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert val.device.type == "cuda", (node.format_node(), val.device)
    # the offset term's column sums: summed from the codes in the graph, unless the layer passes its w_colsum buffer
    summed = [n for n in gm.graph.nodes if n.op == "call_function" and "sum" in str(n.target)]
    assert bool(summed) == (not a_sym), summed
    *args, cs = _fake_w158_lrb_inputs(colsum=True)
    gm = make_fx(dispatch_functionalize(lambda *t: torch.ops.robuq.qlinear(
        *t[:6], 512, 256, 1.58, a_bits, 128, a_sym, clip, w_colsum=t[6])), tracing_mode="fake")(*args, cs)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "sum" in str(n.target)]
