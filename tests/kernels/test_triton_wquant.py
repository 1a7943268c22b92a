"""The QAT weight fake-quant kernel (kernels/triton_wquant.py) against quantizers.fake_quant_weight on the GPU: codes
equal (>= 99.9%: a ternary scale is a row mean summed in another order), scales within their last bit, the output
equal to codes x scale in the requested dtype; and one fused QAT step with the kernel against the torch math."""
import pytest
import torch

from robuq_fx import quantizers as Q

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("bits", [1.58, 2, 3, 4])
@pytest.mark.parametrize("rdt", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sdt", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(96, 128), (1152, 1152), (37, 4608), (5, 300)])
@pytest.mark.parametrize("split", [False, True], ids=["R", "WH-AB"])
def test_kernel_equals_the_reference(bits, rdt, sdt, shape, split):
    from robuq_fx.kernels import triton_wquant as WQ
    from robuq_fx.layer import wide_difference
    torch.manual_seed(0)
    r = (torch.randn(*shape, device="cuda") * 0.05).to(rdt)
    r[0, :5] = 0.4  # outliers in one row
    r[1] = 0  # an all-zero row: scale eps, codes 0
    ab = (torch.randn(*shape, device="cuda") * 0.01).to(rdt) if split else None
    if split:
        ab[1] = 0
    assert WQ.supported(r, "channel", 0, sdt, ab) is None
    wide = r if ab is None else wide_difference(r, ab)
    for out_dtype in (torch.bfloat16, torch.float32):
        out, s = WQ.fake_quant_weight_rows(r, bits, sdt, out_dtype, ab)
        codes_ref, s_ref = Q.quantize_weight(wide, bits, "channel", 0, sdt)
        s_ref = s_ref.float().reshape(-1)
        # a ternary fp32 scale is a row mean summed in another order: a few ulp apart; the others are exact
        tol = 2 ** -18 if (bits == 1.58 and sdt == "float32") else 0
        assert torch.allclose(s, s_ref, rtol=tol, atol=0), (s - s_ref).abs().max()
        safe = torch.where(s > 0, s, torch.ones_like(s))  # the all-zero row (a 16-bit scale of 1e-8 underflows to 0)
        codes = torch.round(out.float() / safe[:, None]).clamp(-15, 15)
        assert (codes == codes_ref.float()).float().mean().item() >= 0.999
        ref = Q.fake_quant_weight(wide, bits, "channel", 0, sdt).to(out_dtype)
        close = torch.isclose(out.float(), ref.float(), rtol=2 ** -7 if out_dtype == torch.bfloat16 else 2 ** -20,
                              atol=0)
        assert close.float().mean().item() >= 0.999


def test_qat_step_with_the_kernel_matches_the_torch_math(monkeypatch):
    from robuq_fx import ops
    from robuq_fx.qat_linear import QATLinear
    from robuq_fx.spec import LayerSpec
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 192)
    mod = QATLinear.from_module(lin, LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128,
                                               lora_rank=16).resolve(256, 192)).cuda()
    x = torch.randn(4, 33, 256, device="cuda")
    grads = {}
    for on in (True, False):
        monkeypatch.setattr(ops, "_WKERNEL", [on])
        m = __import__("copy").deepcopy(mod)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        y.float().pow(2).mean().backward()
        grads[on] = (y.detach().float(), {n: p.grad.float() for n, p in m.named_parameters()})
    (y1, g1), (y0, g0) = grads[True], grads[False]
    assert ((y1 - y0).norm() / y0.norm()).item() < 1e-2
    for k in g0:
        assert ((g1[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-30)).item() < 2e-2, k


@pytest.mark.parametrize("bits,rank,k,hb", [(1.58, 32, 1152, 128), (1.58, 0, 4608, 128), (4, 0, 1152, 128),
                                            (2, 16, 640, 64)])
def test_weight_side_kernel_equals_the_op_by_op_path(bits, rank, k, hb):
    """kernels/triton_wside.py (ROBUQ_QAT_WSIDE_KERNEL=1) against `qat_fused._quantized_weight` (cuBLAS W H and A B
    under bf16 autocast, then the weight kernel): codes >= 99.9% equal (W H and A B summed in another order can move
    a code at a tie), values within one bf16 step of its scale elsewhere, the rest of the stacked buffer untouched."""
    from robuq_fx import qat_fused
    from robuq_fx.kernels import triton_wside as WS
    from robuq_fx.spec import LayerSpec
    torch.manual_seed(0)
    n = 96
    spec = LayerSpec(w_bits=bits, a_bits=4, hadamard=True, hadamard_block=hb, lora_rank=rank).resolve(k, n)
    w = torch.randn(n, k, device="cuda") * 0.05
    up, down = ((torch.randn(n, rank, device="cuda") * 0.1, torch.randn(rank, k, device="cuda") * 0.1) if rank
                else (None, None))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert WS.supported(w, down, up, spec, torch.bfloat16) is None
        ref = qat_fused._quantized_weight(w, down, up, spec, torch.bfloat16)[0].float()
        buf = torch.full((n, k + 7), 3.0, device="cuda", dtype=torch.bfloat16)
        s = WS.weight_side_rows(w, down, up, spec, torch.bfloat16, buf[:, :k])
    got = buf[:, :k].float()
    assert bool((buf[:, k:] == 3).all())
    codes, ref_codes = torch.round(got / s[:, None]), torch.round(ref / s[:, None])
    assert (codes == ref_codes).float().mean().item() >= 0.999
    assert torch.isclose(got, ref, rtol=2 ** -7, atol=0).float().mean().item() >= 0.999


def test_weight_side_group_equals_the_op_by_op_path_layer_by_layer():
    """kernels/triton_wside.Group on DiT-XL/2's shapes (q/k/v/out 1152 x 1152 with the paper's rank-32 branch, fc1
    4608 x 1152, fc2 1152 x 4608, adaLN 6912 x 1152 without one, a 4-bit layer with bf16 scales) in one launch, into
    one flat buffer: each layer's slice against `qat_fused._quantized_weight` as the test above compares them, the
    gaps between the slices untouched."""
    from robuq_fx import qat_fused
    from robuq_fx.kernels import triton_wside as WS
    from robuq_fx.spec import LayerSpec
    torch.manual_seed(0)
    shapes = [(1152, 1152, 32, 1.58, "float32"), (4608, 1152, 32, 1.58, "float32"), (1152, 4608, 32, 1.58, "float32"),
              (6912, 1152, 0, 1.58, "float32"), (1152, 1152, 0, 4, "bfloat16")]
    items, layers, off = [], [], 0
    for i, (n, k, rank, bits, sdt) in enumerate(shapes):
        spec = LayerSpec(w_bits=bits, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=rank,
                         scale_dtype=sdt).resolve(k, n)
        w = torch.randn(n, k, device="cuda") * 0.05
        up, down = ((torch.randn(n, rank, device="cuda") * 0.1, torch.randn(rank, k, device="cuda") * 0.1) if rank
                    else (None, None))
        items.append((i, w, down, up, spec, off, k + rank))
        layers.append((w, down, up, spec, off, n, k, rank))
        off += n * (k + rank) + 64
    flat = torch.full((off,), 3.0, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert all(WS.supported(w, d, u, sp, torch.bfloat16) is None for w, d, u, sp, *_ in layers)
        group = WS.Group(items, torch.bfloat16, flat.device)
        assert group.run(flat) == frozenset(range(len(shapes))) and len(group.launches) == 1
        refs = [qat_fused._quantized_weight(w, d, u, sp, torch.bfloat16)[0].float() for w, d, u, sp, *_ in layers]
    written = torch.zeros(off, dtype=torch.bool, device="cuda")
    row = 0
    for (w, d, u, sp, o, n, k, rank), ref in zip(layers, refs):
        view = flat[o:o + n * (k + rank)].view(n, k + rank)
        written[o:o + n * (k + rank)].view(n, k + rank)[:, :k] = True
        got, s = view[:, :k].float(), group.scale[row:row + n]
        row += n
        codes, ref_codes = torch.round(got / s[:, None]), torch.round(ref / s[:, None])
        assert (codes == ref_codes).float().mean().item() >= 0.999, (n, k, rank)
        assert torch.isclose(got, ref, rtol=2 ** -7, atol=0).float().mean().item() >= 0.999, (n, k, rank)
    assert bool((flat[~written] == 3).all())


def test_weight_grads_group_equals_the_op_by_op_path():
    """kernels/triton_wgrad.GradGroup on the GPU (DiT-XL/2 shapes and an odd one, ranks 0-32, Hadamard blocks 64 and
    128: two launches) against the op-by-op backward weight side (`qat_fused._weight_grads`, cuBLAS): g_W (>= 99.9%
    equal: the rotation's sums run in another order) and A's gradient within bf16 rounding, the bias's gradient
    cast exactly, each in its slot of one fp32 buffer and nothing written elsewhere."""
    from robuq_fx import qat_fused
    from robuq_fx.kernels import triton_wgrad as WG
    from robuq_fx.spec import LayerSpec
    c = torch.bfloat16
    cases = ((1152, 1152, 32, 128), (4608, 1152, 0, 128), (1152, 4608, 32, 128), (100, 640, 16, 64))
    items, wants, g_parts, g_off, s_off = [], [], [], 0, 0
    for i, (n, k, rank, hb) in enumerate(cases):
        torch.manual_seed(i)
        spec = LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=hb, lora_rank=rank).resolve(k, n)
        g_wide = torch.randn(n, k + rank, device="cuda", dtype=c) * 0.01
        g_bias = torch.randn(n, device="cuda", dtype=c)
        down = torch.randn(rank, k, device="cuda") * 0.1 if rank else None
        up = torch.randn(n, rank, device="cuda") * 0.1 if rank else None
        p_down = torch.randn(rank, k, device="cuda", dtype=c) * 0.01 if rank else None
        wants.append(qat_fused._weight_grads(g_wide, p_down, down, up, spec, k, c, torch.float32, c, True, True))
        w_slot = s_off
        up_slot = w_slot + n * k + 1
        bias_slot = up_slot + n * rank + 3
        s_off = bias_slot + n + 5
        bias_at = g_off + n * (k + rank) + 2
        items.append(WG.GradItem(i, n, k, spec, g_off, k + rank, w_slot, down, up_slot if rank else None,
                                 bias_at, bias_slot))
        g_parts.append((g_off, g_wide, bias_at, g_bias))
        g_off = bias_at + n + 7
    g_flat = torch.zeros(g_off, device="cuda", dtype=c)
    for o, g_wide, b_at, g_bias in g_parts:
        g_flat[o:o + g_wide.numel()] = g_wide.reshape(-1)
        g_flat[b_at:b_at + len(g_bias)] = g_bias
    slots = torch.full((s_off,), 9.0, device="cuda")
    group = WG.GradGroup(items, c, g_flat.device)
    group.run(g_flat, slots)
    assert len(group.launches) == 2
    written = torch.zeros(s_off, dtype=torch.bool, device="cuda")
    for it, (w_want, up_want, _), (_, _, _, g_bias) in zip(items, wants, g_parts):
        got_w = slots[it.w_slot:it.w_slot + it.n * it.k].view(it.n, it.k)
        written[it.w_slot:it.w_slot + it.n * it.k] = True
        assert (got_w == w_want).float().mean().item() >= 0.999, it.index
        assert ((got_w - w_want).norm() / w_want.norm()).item() < 1e-2, it.index
        if up_want is not None:
            got_up = slots[it.up_slot:it.up_slot + up_want.numel()].view(up_want.shape)
            written[it.up_slot:it.up_slot + up_want.numel()] = True
            assert ((got_up - up_want).norm() / up_want.norm()).item() < 1e-2, it.index
        assert torch.equal(slots[it.bias_slot:it.bias_slot + it.n], g_bias.float()), it.index
        written[it.bias_slot:it.bias_slot + it.n] = True
    assert bool((slots[~written] == 9).all())


def test_step_weight_sides_with_the_group_follow_the_op_by_op_step():
    """`weight_sides_per_forward` on CUDA under bf16 autocast with the one-kernel forms on (one Group launch writes
    every layer's Q_w(R), A_c, bias_c and B_c or B H: the paper-like layers take the act op, so B H; one GradGroup
    launch writes g_W, A's and the bias's gradients back) against the
    op-by-op step: the output and every master's gradient of a second step (a replay) close (a code at a rounding
    tie may flip: the kernel's sums run in another order than cuBLAS's)."""
    import torch.nn as nn
    from robuq_fx import qat_fused
    from robuq_fx.qat_linear import QATLinear
    from robuq_fx.spec import LayerSpec
    from robuq_fx.kernels import triton_wgrad as WG, triton_wside as WS
    from tests.qat_testing import rel, second_step_hooked
    torch.manual_seed(0)
    paper = LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=128, lora_rank=32)
    base = nn.Sequential(QATLinear.from_module(nn.Linear(256, 512), paper.resolve(256, 512)), nn.GELU(),
                         QATLinear.from_module(nn.Linear(512, 256), paper.resolve(512, 256)), nn.GELU(),
                         QATLinear.from_module(nn.Linear(256, 128), LayerSpec(w_bits=4, a_bits=4, hadamard=True,
                                                                              hadamard_block=64).resolve(256, 128)))
    base = base.cuda()
    x = torch.randn(4, 32, 256, device="cuda")
    runs, launches, glaunches = {}, [], []
    real, real_g = WS.Group.run, WG.GradGroup.run
    before = qat_fused._WSIDE[0]
    try:
        WS.Group.run = lambda self, out: launches.append(len(self.covered)) or real(self, out)
        WG.GradGroup.run = lambda self, g, s: glaunches.append(len(self.covered)) or real_g(self, g, s)
        for on in (False, True):
            qat_fused._WSIDE[0] = on
            runs[on] = second_step_hooked(base, x, torch.bfloat16)
    finally:
        WS.Group.run, WG.GradGroup.run, qat_fused._WSIDE[0] = real, real_g, before
    assert launches and all(n == 3 for n in launches), launches  # every layer covered, in one Group
    assert glaunches and all(n == 3 for n in glaunches), glaunches  # and in one GradGroup (at the capture)
    (y0, g0), (y1, g1) = runs[False], runs[True]
    assert rel(y1, y0) < 1e-2, rel(y1, y0)
    for k in g0:
        assert rel(g1[k], g0[k]) < 3e-2, (k, rel(g1[k], g0[k]))
