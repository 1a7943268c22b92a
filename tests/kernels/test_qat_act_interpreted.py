"""`robuq::qat_act_lrb` (kernels/qat_act.py: a compiled QAT layer's activation side, [Q_a(x H), x (B H)^T], and its
backward) in Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1, where triton imports; no GPU), against
the op graph's math: the rotation and fake-quant of `layer.rotate_and_quantize`, t = (x H) B^T, and the gradients
autograd gives through them (the ops' STE). fp16: the interpreter's bf16 is broken; the kernels take the same path.
The GPU test (tests/test_qat_step.py) runs it inside a compiled step."""

import pytest

from tests.kernels.sm90 import import_or_none, run_interpreted

SCRIPT = r"""
import json
import torch
from robuq_fx import layer
from robuq_fx.kernels import qat_act, quantizer, triton_launch
from robuq_fx.spec import LayerSpec
triton_launch._ENABLED = False  # the interpreter launches through triton's own path
quantizer.on_device = lambda dev: quantizer._NULL  # CPU tensors: no device to switch to
res = []
for k, n, r, block, a_bits, m in ((256, 64, 8, 128, 4, 5), (384, 64, 32, 64, 3, 70), (256, 16, 4, 0, 8, 3),
                                  (256, 64, 0, 128, 4, 40)):      # (r = 0: no branch, Q_a(x H) alone)
    torch.manual_seed(k + r)
    spec = LayerSpec(w_bits=1.58, a_bits=a_bits, hadamard=block > 0, hadamard_block=block or None, lora_rank=r,
                     a_sym=True).resolve(k, n)
    x = (torch.randn(m, k) * torch.rand(m, 1) * 3).half()
    x[min(1, m - 1)] = 0.0                                     # an all-zero row: scale 0, Q_a = 0
    b = (torch.randn(max(r, 1), k) / k ** 0.5).half()[:r]
    bh = qat_act.through_h(b, spec) if r else None
    xr = x.clone().requires_grad_(True)
    bhr = bh.clone().requires_grad_(True) if r else None
    got = qat_act.act_side(xr, bhr, spec)
    gy = torch.randn(m, k + r).half()
    got.backward(gy)
    # the op graph: Q_a(x H) through the ops (their STE), t = (x H) B^T; B H's gradient from B's (g_(BH) = g_B H)
    xf = x.float().requires_grad_(True)
    bf = b.float().requires_grad_(True)
    xh, xq = layer.rotate_and_quantize(xf, spec)
    want = torch.cat([xq, xh @ bf.t()], 1)
    want.backward(gy.float())
    q_ref = layer.rotate_and_quantize(x, spec)[1].float()   # in fp16, as the kernel computes it
    g_bh_ref = qat_act.through_h(bf.grad, spec) if r else None  # (H is its own inverse)
    xs = x.clone().requires_grad_(True)                     # the torch reference of the kernels' own roundings
    bhs = bh.clone().requires_grad_(True) if r else None
    ref = qat_act.act_side_reference(xs, bhs, spec)
    ref.backward(gy)
    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
    res.append({"k": k, "r": r, "block": block, "a_bits": a_bits, "m": m,
                "q_equal": float((got[:, :k].float() == q_ref).float().mean()),
                "shape": list(got.shape), "t_rel": rel(got[:, k:], want[:, k:]) if r else 0.0,
                "gx_rel": rel(xr.grad, xf.grad), "gbh_rel": rel(bhr.grad, g_bh_ref) if r else 0.0,
                "zero_row": float(got[min(1, m - 1), :k].abs().max()),
                "ref_q_equal": float((got[:, :k] == ref[:, :k]).float().mean()),
                "ref_t_rel": rel(got[:, k:], ref[:, k:]) if r else 0.0, "ref_gx_rel": rel(xr.grad, xs.grad),
                "ref_gbh_rel": rel(bhr.grad, bhs.grad) if r else 0.0})
print(json.dumps(res))
"""


@pytest.mark.skipif(import_or_none("triton_act_quant") is None, reason="triton does not import here")
def test_act_side_and_its_backward_match_the_op_graph():
    rows = run_interpreted(SCRIPT)
    assert len(rows) == 4
    for row in rows:
        assert row["shape"] == [row["m"], row["k"] + row["r"]], row
        assert row["q_equal"] >= 0.999, row                 # the same codes and scales as the op graph in fp16
        assert row["t_rel"] <= 2e-3, row                    # x (B H)^T in fp32, rounded once, vs (x H) B^T in fp32
        assert row["gx_rel"] <= 2e-3 and row["gbh_rel"] <= 2e-3, row  # fp16 products vs fp32 ones
        assert row["zero_row"] == 0.0, row
        # against act_side_reference (what the GPU tests compare with): the same values, t and gradients rounded once
        assert row["ref_q_equal"] >= 0.999 and row["ref_t_rel"] <= 2e-3, row
        assert row["ref_gx_rel"] <= 2e-3 and row["ref_gbh_rel"] <= 2e-3, row



STEP = r"""
import copy, json, os, warnings
import torch
import robuq_fx
from robuq_fx.kernels import qat_act, quantizer, triton_launch
from tests.test_qat_step import Net
triton_launch._ENABLED = False
quantizer.on_device = lambda dev: quantizer._NULL
real = qat_act.unsupported
qat_act.unsupported = lambda spec, k, device, dtype: real(spec, k, torch.device("cuda"), dtype)  # CPU tensors here
torch.manual_seed(0)  # (the imports leave torch's generator randomly seeded: x differed from run to run)
x = torch.randn(3, 10, 128).half()
def train(base, on, steps):
    os.environ["ROBUQ_QAT_ACT_KERNEL"] = "1" if on else "0"
    mod = copy.deepcopy(base)
    robuq_fx.weight_sides_per_forward(mod)
    calls = []
    orig = qat_act.act_side
    qat_act.act_side = lambda *a: calls.append(1) or orig(*a)
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-2)
    outs = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(steps):
            y = mod(x)
            y.float().pow(2).mean().backward()
            outs.append((y.detach().float(), {n: p.grad.clone() for n, p in mod.named_parameters()
                                              if p.grad is not None}))
            opt.step()
            opt.zero_grad(set_to_none=True)
    qat_act.act_side = orig
    return outs, len(calls), [str(m.message) for m in w if "ROBUQ_QAT_ACT_KERNEL" in str(m.message)]
def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
res = {}
# the whole test net (fp32 masters, fp16 matmuls: the interpreter's bf16 is broken), 3 AdamW steps
full = Net().half()
want, n0, _ = train(full, False, 3)
got, n1, warned = train(full, True, 3)
res["calls"], res["warned"] = [n0, n1], warned
res["finite"] = all(bool(torch.isfinite(y).all()) for y, _ in got)
# its one covered layer alone (the others would turn t's other rounding into code flips downstream), one step
alone = Net().half()
alone.b = alone.c = alone.d = torch.nn.Identity()
(want1, _, _), (got1, _, _) = train(alone, False, 1), train(alone, True, 1)
res["y"] = rel(got1[0][0], want1[0][0])
res["grads"] = {k: rel(got1[0][1][k], want1[0][1][k]) for k in want1[0][1]}
print(json.dumps(res))
"""


@pytest.mark.skipif(import_or_none("triton_act_quant") is None, reason="triton does not import here")
def test_training_with_the_act_op_follows_the_op_graph():
    """weight_sides_per_forward with ROBUQ_QAT_ACT_KERNEL=1: the two layers of the test net it covers (`a` with a
    branch, `c` without: symmetric absmax, K = 128) call the triton_op on every step and the two it cannot cover are
    named in one warning; `a`'s output and gradients follow the op graph's (fp16 matmuls: t = x (B H)^T and the
    branch gradients are rounded elsewhere; the output to 3e-4, the branch factors' gradients to 0.5% here)."""
    res = run_interpreted(STEP)
    assert res["calls"] == [0, 6] and res["finite"], res  # a and c (no branch: Q_a(x H) alone) a step
    assert len(res["warned"]) == 1 and "2 of 4" in res["warned"][0] and "sigma" in res["warned"][0], res
    assert res["y"] <= 2e-3, res
    assert set(res["grads"]) == {"a.weight", "a.bias", "a.lrb_down", "a.lrb_up"}, res
    for k, v in res["grads"].items():
        assert v <= 2e-2, (k, res)
