"""The Inductor decomposition of `robuq::qlinear` traced on fake CUDA tensors for an sm_90 target (no GPU needed
where triton imports): which of our Triton kernels a functionalized call launches, with which constexprs, and what
stays out of the graph (B H, the column sums, CPU tensors), for the paper policy's layers, its -a3 / -a2 variants,
the fused GELU on either side, DOWN and the stacked mode. The compiled-on-a-GPU side: test_inductor.py."""
from __future__ import annotations

import re

import pytest
import torch

from robuq_fx.kernels import triton_fp8
from tests.kernels.inductor_testing import (all_ops, fake_sm90, fake_w158_lrb_inputs,  # noqa: F401 (fixtures)
                                            kernel_names, no_compile_caches, triton_imports)
from tests.kernels.sm90 import import_or_none


@pytest.mark.skipif(not triton_imports() or not torch.cuda.is_available(),
                    reason="views of fake CUDA fp8 tensors need a CUDA build of torch")
def test_stacked_mode_traces_once_the_weight_is_extended(monkeypatch, all_ops):
    """ROBUQ_FP8_EPI=stacked under torch.compile: a layer whose qweight is not extended (lrb_stacked.prepare did not
    run) traces the Triton epilogue GEMM, never an op that would extend it inside the graph; an extended one
    runs its codes through one opaque op (`robuq::stacked_codes`, given the input activation) and
    `robuq::stacked_mm` over the extended weight."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from robuq_fx.kernels import lrb_layout
    fake_sm90(monkeypatch)
    monkeypatch.setenv("ROBUQ_FP8_EPI", "stacked")
    # fake CUDA _scaled_mm needs a CUDA build: a stand-in with its output for the trace
    monkeypatch.setattr(triton_fp8, "_scaled_mm", lambda codes, w8, sx, sw, bias: torch.ops.aten.mm(
        codes.to(torch.bfloat16), w8.t().to(torch.bfloat16)))
    x, plain, ws, b, dn, up, full = fake_w158_lrb_inputs(256 + lrb_layout.ext_width(32))

    def f(x, qw, ws, b, dn, up):
        return torch.ops.robuq.qlinear(x, qw, ws, b, dn, up, 512, 256, 1.58, 4, 128, True, "absmax",
                                       input_act="gelu_tanh")

    def trace(qw):  # qweight = the last 256 columns of qw (a view into the extended rows where qw is wider)
        return make_fx(dispatch_functionalize(lambda x, qw, *t: f(x, qw[:, qw.shape[1] - 256:], *t)),
                       tracing_mode="fake")(x, qw, ws, b, dn, up).code
    with pytest.warns(UserWarning, match="not extended before compiling"):
        code = trace(plain)  # not extended: the epilogue GEMM, no stacked kernels, no opaque op
    assert "robuq.qlinear" not in code and "lrb_split_kernel" not in kernel_names(code)
    code = trace(full)
    assert "robuq.qlinear" not in code
    # the codes: one opaque op, no graph-level write into a slice of the buffer (Inductor turned it into a copy
    # with an fp8 NaN fill Triton 3.6 does not compile, H200 session 11), the activation passed to it
    assert re.search(r"robuq\.stacked_codes\.default\([^)]*'gelu_tanh'", code), code
    assert "lrb_split_kernel" not in kernel_names(code) and "slice_scatter" not in code
    # the GEMM over the extended weight: one opaque op given qweight itself (no view of it beyond its extent in the
    # graph: Inductor materialized one without the bytes outside, H200 session 10)
    assert "robuq.stacked_mm.default(" in code and "as_strided" not in code


@pytest.mark.skipif(not triton_imports(), reason="triton does not import here")
@pytest.mark.parametrize("gemm", ["pointer", "tma"])
def test_functional_decomposition_on_fake_cuda_tensors(gemm, monkeypatch, all_ops):
    """Where triton imports (no GPU needed): functionalizing a W1.58A4+H+LRB call on fake CUDA tensors, as
    AOTAutograd does for Inductor, leaves no robuq op but the Triton kernels as functional kernel nodes (the
    quantizer and the fused-epilogue GEMM; or _scaled_mm), which clone only their outputs (Triton's TTIR, built for an
    sm_90 target, shows which pointers they store to); so does the default ("qat,qlinear").
    ROBUQ_INDUCTOR_DECOMPOSE=0 and "qat" keep the op."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    fake_sm90(monkeypatch)
    monkeypatch.setenv("ROBUQ_FP8_GEMM_KERNEL", gemm)
    x, qw, ws, b, dn, up = fake_w158_lrb_inputs()

    def f(x, qw, ws, b, dn, up):
        return torch.ops.robuq.qlinear(x, qw, ws, b, dn, up, 512, 256, 1.58, 4, 128, True, "absmax")

    def trace():
        return make_fx(dispatch_functionalize(f), tracing_mode="fake")(x, qw, ws, b, dn, up).code
    code = trace()
    assert "robuq.qlinear" not in code and "robuq.act_quant" not in code and "robuq.fp8_gemm" not in code
    assert "triton_kernel_wrapper_functional" in code
    clones = re.findall(r"tensors_to_clone = (\[[^]]*\])", code)
    assert clones and all(set(eval(c)) <= {"out_ptr", "scale_ptr", "lo_ptr", "c_ptr", "t_ptr"} for c in clones), clones
    assert "lrb_down_kernel" in kernel_names(code)  # the branch's down-projection: our kernel, traced
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
            assert "_scaled_mm" in code_addmm and "lowrank_add_kernel" in kernel_names(code_addmm)
            # a symmetric layer: the add kernel without its offset term (session 9's compiled-only error: lo was
            # passed, switching the term on with a placeholder c)
            assert "'ASYM': False" in code_addmm and "'ASYM': True" not in code_addmm
            assert "robuq.lowrank_add" not in code_addmm and "robuq.lrb_down" not in code_addmm
            mp.setenv("ROBUQ_INDUCTOR_LOWRANK_ADD", "0")  # turned off: the Triton epilogue GEMM instead
            assert "lowrank_add_kernel" not in kernel_names(trace())
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


@pytest.mark.skipif(not triton_imports(), reason="triton does not import here")
def test_down_projection_inside_the_gemm_when_chosen(monkeypatch, all_ops):
    """ROBUQ_FP8_DOWN_IN_GEMM=1 (or the table's down_in_gemm): the traced LRB call launches the epilogue GEMM with
    DOWN and no lrb_down kernel; with an input activation (which only lrb_down applies) it keeps lrb_down."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    fake_sm90(monkeypatch)
    x, qw, ws, b, dn, up = fake_w158_lrb_inputs()

    def trace(**kw):
        return make_fx(dispatch_functionalize(lambda *t: torch.ops.robuq.qlinear(
            *t, 512, 256, 1.58, 4, 128, True, "absmax", **kw)), tracing_mode="fake")(x, qw, ws, b, dn, up).code
    monkeypatch.setenv("ROBUQ_FP8_EPI", "triton")
    assert "lrb_down_kernel" in kernel_names(trace()) and "'DOWN': True" not in trace()
    monkeypatch.setenv("ROBUQ_FP8_DOWN_IN_GEMM", "1")
    code = trace()
    assert "'DOWN': True" in code and "lrb_down_kernel" not in kernel_names(code)
    code = trace(input_act="gelu")
    assert "'DOWN': True" not in code and "lrb_down_kernel" in kernel_names(code)


@pytest.mark.skipif(not triton_imports(), reason="triton does not import here")
def test_output_activation_goes_into_the_gemm_store(monkeypatch, all_ops):
    """output_act (the GELU after fc1) traced: the Triton GEMM's store applies it (OUT_ACT; the plain layer switches
    from _scaled_mm to that GEMM, the LRB layer keeps its epilogue GEMM, with DOWN too), no GELU graph op; where the
    call takes the stacked mode the GELU is a graph op after the layer, as eagerly (`out_act_in_gemm`)."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    fake_sm90(monkeypatch)
    x, qw, ws, b, dn, up = fake_w158_lrb_inputs()

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
            assert "fp8_gemm_kernel" in kernel_names(code) and "_scaled_mm" not in code
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


@pytest.mark.skipif(not triton_imports(), reason="triton does not import here")
def test_sigma_clipped_call_decomposes_in_a_fresh_process(monkeypatch, all_ops):
    """An asymmetric sigma-clipped call (the -a3 / -a2 policies) traced before any eager call has computed the clip
    constant: the decomposition computes it (tracing modes off) rather than failing on its grid's float() and
    leaving the op opaque (before session 13, in every process that compiled a model before running it)."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from robuq_fx import quantizers as Q
    from robuq_fx.kernels import quantizer
    fake_sm90(monkeypatch)
    x, qw, ws, b, dn, up = fake_w158_lrb_inputs()
    getattr(Q, "_gaussian_clip_grid", Q.gaussian_clip).cache_clear()
    quantizer._hscale.cache_clear()
    gm = make_fx(dispatch_functionalize(lambda *t: torch.ops.robuq.qlinear(*t, 512, 256, 1.58, 3, 128, False,
                                                                           "sigma")),
                 tracing_mode="fake")(x, qw, ws, b, dn, up)
    assert "robuq.qlinear" not in gm.code and "act_quant_bfly_kernel" in kernel_names(gm.code)
    # nor a CPU constant from the launch's scalars (_hscale's float64 tensor, made inside the trace before session 13)
    consts = [getattr(gm, n) for n in dir(gm) if n.startswith("_tensor_constant")]
    assert not [c for c in consts if c.device.type == "cpu"], [(c.dtype, tuple(c.shape)) for c in consts]


@pytest.mark.skipif(not triton_imports(), reason="triton does not import here")
def test_layer_rotated_down_is_read_not_recomputed(monkeypatch, all_ops):
    """Given the layer's B H (lrb_down_h, which PackedLinear keeps on a GPU), the functionalized qlinear call reads it:
    no product of B with H (an mm, and the Hadamard matrix it needs) is left in the graph, which ran on every
    compiled forward before (H200 session 12: one cuBLAS GEMM and six Hadamard-building kernels per LRB layer);
    the branch's down-projection kernel still runs, on that tensor."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    fake_sm90(monkeypatch)
    x, qw, ws, b, dn, up = fake_w158_lrb_inputs()
    dh = dn.clone()  # a fake tensor of the same mode

    def f(x, qw, ws, b, dn, up, *dh):
        return torch.ops.robuq.qlinear(x, qw, ws, b, dn, up, 512, 256, 1.58, 4, 128, True, "absmax",
                                       lrb_down_h=dh[0] if dh else None)

    def trace(*args):
        return make_fx(dispatch_functionalize(f), tracing_mode="fake")(*args).code
    without, given = trace(x, qw, ws, b, dn, up), trace(x, qw, ws, b, dn, up, dh)
    assert "aten.mm" in without or "aten.bmm" in without  # B H made in the graph
    assert "aten.mm" not in given and "aten.bmm" not in given and "aten.cat" not in given
    assert "lrb_down_kernel" in kernel_names(given)


@pytest.mark.skipif(not triton_imports(), reason="triton does not import here")
def test_table_picked_quantize_in_gemm_keeps_the_op_opaque(monkeypatch, all_ops):
    """Where the dispatch table picks the warp-specialized quantize-in-GEMM kernel (Gluon, which Inductor cannot
    launch) for a call, the decomposition leaves robuq::qlinear opaque (its eager path runs the kernel); for other
    M buckets, and with ROBUQ_FP8_FUSED_QUANT=0, it decomposes as usual."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from robuq_fx.kernels import dispatch as D
    if import_or_none("gluon_qgemm_ws") is None:
        pytest.skip("no Gluon in this triton")
    fake_sm90(monkeypatch)
    monkeypatch.delenv("ROBUQ_FP8_FUSED_QUANT", raising=False)
    x, qw, ws, b, dn, up = fake_w158_lrb_inputs()  # M = 8: bucket 256
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


@pytest.mark.skipif(not triton_imports(), reason="triton does not import here")
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
    fake_sm90(monkeypatch)
    monkeypatch.setenv("ROBUQ_FP8_EPI", "triton")
    quantizer._hscale.cache_clear()  # first computed inside this trace, as in a process that compiles first
    Q._gaussian_clip_grid.cache_clear()
    x, qw, ws, b, dn, up = fake_w158_lrb_inputs()
    gm = make_fx(dispatch_functionalize(lambda *t: torch.ops.robuq.qlinear(
        *t, 512, 256, 1.58, a_bits, 128, a_sym, clip)), tracing_mode="fake")(x, qw, ws, b, dn, up)
    assert "robuq.qlinear" not in gm.code and "act_quant_bfly_kernel" in kernel_names(gm.code)
    consts = {n: t for n, t in gm.named_buffers()} | {n: getattr(gm, n) for n in dir(gm)
                                                       if n.startswith("_tensor_constant")}
    bad = {n: (t.device, t.dtype) for n, t in consts.items() if isinstance(t, torch.Tensor)
           and t.device.type != "cuda"}
    assert not bad, bad
    for node in gm.graph.nodes:  # nor a tensor made on the CPU inside the graph
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert val.device.type == "cuda", (node.format_node(), val.device)
    with monkeypatch.context() as mp:  # under CUDA graphs where the table picks the Gluon quantizer (sigma ranges
        # too, session 18): the opaque op, told the layer's clip (it once took absmax ranges only and had no clip)
        import torch._inductor.config as ic
        mp.setattr(quantizer, "_gluon_plan", lambda *a: (1,))
        with ic.patch({"triton.cudagraphs": True}):
            code = make_fx(dispatch_functionalize(lambda *t: torch.ops.robuq.qlinear(
                *t, 512, 256, 1.58, a_bits, 128, a_sym, clip)), tracing_mode="fake")(x, qw, ws, b, dn, up).code
        call = re.search(r"robuq\.act_quant_gluon\.default\(([^)]*)\)", code)
        assert call, code  # (absmax, the schema's default, is left out of the printed call)
        assert ("'sigma'" in call.group(1)) == (clip == "sigma"), call.group(0)
    # the offset term's column sums: summed from the codes in the graph, unless the layer passes its w_colsum buffer
    summed = [n for n in gm.graph.nodes if n.op == "call_function" and "sum" in str(n.target)]
    assert bool(summed) == (not a_sym), summed
    *args, cs = fake_w158_lrb_inputs(colsum=True)
    gm = make_fx(dispatch_functionalize(lambda *t: torch.ops.robuq.qlinear(
        *t[:6], 512, 256, 1.58, a_bits, 128, a_sym, clip, w_colsum=t[6])), tracing_mode="fake")(*args, cs)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "sum" in str(n.target)]
