"""The QAT weight fake-quant kernel (kernels/triton_wquant.py) in Triton's CPU interpreter (a subprocess with
TRITON_INTERPRET=1; no GPU): Q_w(R) and the scales against `quantizers.fake_quant_weight` of R, with R given whole
or as its two terms W H and A B (the kernel takes their difference in fp32, as `layer.wide_difference` does). The
GPU test (test_triton_wquant.py) checks the same on the device; this one lets a CPU machine catch a wrong formula,
such as a quotient or a difference rounded to R's 16-bit dtype (what session 23 moved to fp32)."""

import pytest

from tests.kernels.sm90 import import_or_none, run_interpreted

SCRIPT = r"""
import json
import torch
from robuq_fx import quantizers as Q
from robuq_fx.layer import wide_difference
from robuq_fx.kernels import triton_launch, triton_wquant as WQ
triton_launch._ENABLED = False  # the interpreter launches through triton's own path
WQ.on_device = lambda dev: __import__("contextlib").nullcontext()  # CPU tensors: no device to switch to
res = []
for bits in (1.58, 2, 4):
    for rdt in (torch.float16, torch.float32):  # (the interpreter's bf16 is broken; fp16 takes the same path)
        for split in (False, True):
            torch.manual_seed(int(bits * 100) + split)
            wh = (torch.randn(24, 200) * 0.05)
            wh[0, :5] = 0.4          # outliers in one row
            ab = torch.randn(24, 200) * 0.01
            if not split:
                wh[1] = 0            # an all-zero row: scale eps, codes 0
            wh, ab = wh.to(rdt), ab.to(rdt)
            r = wide_difference(wh, ab) if split else wh
            # written into a slice of a wider (stacked) buffer, as the QAT step's weight side does
            wide_buf = torch.full((24, 200 + 8), 7.0)
            out, s = WQ.fake_quant_weight_rows(wh, bits, "float32", torch.float32, ab if split else None,
                                               out=wide_buf[:, :200])
            assert out.data_ptr() == wide_buf.data_ptr() and bool((wide_buf[:, 200:] == 7).all())
            codes, s_ref = Q.quantize_weight(r, bits, "channel", 0, "float32")
            ref = Q.fake_quant_weight(r, bits, "channel", 0, "float32").float()
            got_codes = torch.round(out / s[:, None]).clamp(-15, 15)
            res.append({"bits": bits, "rdt": str(rdt), "split": split,
                        "codes": (got_codes == codes.float()).float().mean().item(),
                        # (a ternary scale's last bits carry into q s: compared to 2^-20 relative)
                        "values": torch.isclose(out, ref, rtol=2 ** -20, atol=0).float().mean().item(),
                        "exact": (out == ref).float().mean().item(),
                        "scale_rel": ((s - s_ref.reshape(-1)).abs() / s_ref.reshape(-1)).max().item()})
print(json.dumps(res))
"""


@pytest.mark.skipif(import_or_none("triton_wquant") is None, reason="triton does not import here")
def test_weight_kernel_in_the_interpreter_matches_the_reference():
    rows = run_interpreted(SCRIPT)
    assert len(rows) == 12
    for r in rows:
        # a ternary scale is a row mean summed in another order (last bits); the others are exact
        assert r["scale_rel"] <= (1e-6 if r["bits"] == 1.58 else 0.0), r
        assert r["codes"] >= 0.999 and r["values"] >= 0.999, r
        assert r["bits"] == 1.58 or r["exact"] == 1.0, r


@pytest.mark.skipif(import_or_none("triton_wquant") is None, reason="triton does not import here")
@pytest.mark.parametrize("has_ab", [True, False])
def test_weight_kernel_builds_for_sm90_with_fp64_scalars(has_ab):
    """Offline sm_90 build (no GPU), with qmax / eps as fp64, as Inductor passes a user Triton kernel's floats."""
    from tests.kernels.sm90 import compile_sm90
    wq = import_or_none("triton_wquant")
    sig = {"r_ptr": "*bf16", "ab_ptr": "*bf16", "out_ptr": "*bf16", "scale_ptr": "*fp32", "K": "i32",
           "stride_r": "i32", "stride_ab": "i32", "stride_o": "i32", "qmax": "fp64", "eps": "fp64"}
    k = compile_sm90(wq.wquant_rows_kernel, sig, dict(TERNARY=True, HAS_AB=has_ab, RDT=0 if has_ab else 1, SDT=0,
                                                      BLOCK=2048), dict(num_warps=8), gluon=False)
    assert k.asm["cubin"]


WSIDE = r"""
import json
import torch
from robuq_fx import quantizers as Q
from robuq_fx.hadamard import hadamard_matrix
from robuq_fx.spec import LayerSpec
from robuq_fx.kernels import triton_launch, triton_wside as WS
triton_launch._ENABLED = False
WS.on_device = lambda dev: __import__("contextlib").nullcontext()
c = torch.float16  # (the interpreter's bf16 is broken; fp16 takes the same path)
res = []
for bits, rank, k, hb in ((1.58, 8, 384, 128), (4, 0, 256, 64), (2, 16, 640, 128), (1.58, 0, 96, 32)):
    torch.manual_seed(k + rank)
    n = 20
    spec = LayerSpec(w_bits=bits, a_bits=4, hadamard=True, hadamard_block=hb, lora_rank=rank).resolve(k, n)
    w = torch.randn(n, k) * 0.05
    w[0, :3] = 0.5
    up, down = (torch.randn(n, rank) * 0.1, torch.randn(rank, k) * 0.1) if rank else (None, None)
    buf = torch.full((n, k + 5), 3.0, dtype=c)
    s = WS.weight_side_rows(w, down, up, spec, c, buf[:, :k])
    # the op-by-op path's roundings, written out: W H and A B as 16-bit autocast matmuls give them, R in fp32
    h = hadamard_matrix(hb, torch.float32).to(c).float()
    wh = (w.to(c).float().reshape(n, k // hb, hb) @ h).reshape(n, k).to(c).float()
    r = wh - (up.to(c).float() @ down.to(c).float()).to(c).float() if rank else wh
    codes, s_ref = Q.quantize_weight(r, bits, "channel", 0, "float32")
    ref = Q.fake_quant_weight(r, bits, "channel", 0, "float32").to(c)
    got_codes = torch.round(buf[:, :k].float() / s[:, None]).clamp(-15, 15)
    res.append({"bits": bits, "rank": rank, "k": k, "hb": hb,
                "codes": (got_codes == codes.float()).float().mean().item(),
                "values": (buf[:, :k] == ref).float().mean().item(),
                "untouched": bool((buf[:, k:] == 3).all()),
                "scale_rel": ((s - s_ref.reshape(-1)).abs() / s_ref.reshape(-1)).max().item()})
print(json.dumps(res))
"""


@pytest.mark.skipif(import_or_none("triton_wside") is None, reason="triton does not import here")
def test_weight_side_kernel_in_the_interpreter_matches_the_op_by_op_math():
    """kernels/triton_wside.py (W -> Q_w(W H - A B) in one kernel): codes, values and scales against the op-by-op
    path's roundings written out (16-bit W H and A B, R in fp32), with and without a branch, Hadamard blocks of
    32-128, 20 rows (a second, partly masked row tile); it writes into a slice of a wider buffer and nowhere else."""
    rows = run_interpreted(WSIDE)
    assert len(rows) == 4
    for r in rows:
        assert r["untouched"], r
        assert r["codes"] >= 0.999 and r["values"] >= 0.999, r
        assert r["scale_rel"] <= (1e-6 if r["bits"] == 1.58 else 0.0), r


GROUP = r"""
import json
import torch
from robuq_fx.hadamard import block_hadamard
from robuq_fx.spec import LayerSpec
from robuq_fx.kernels import triton_launch, triton_wside as WS
triton_launch._ENABLED = False
WS.on_device = lambda dev: __import__("contextlib").nullcontext()
c = torch.float16
# layers of other widths, ranks, bit widths, scale dtypes and two Hadamard blocks (two launches) in one flat buffer;
# with or without a bias, B cast (mode 1) or rotated (B H, mode 2)
cases = ((1.58, 8, 384, 128, "float32", 20, True, True), (4, 0, 256, 64, "bfloat16", 17, True, False),
         (2, 16, 128, 128, "float16", 33, False, False), (1.58, 0, 64, 64, "float32", 5, False, False))
items, alone, off, want = [], [], 0, []
for i, (bits, rank, k, hb, sdt, n, has_bias, rotated) in enumerate(cases):
    torch.manual_seed(i)
    spec = LayerSpec(w_bits=bits, a_bits=4, hadamard=True, hadamard_block=hb, lora_rank=rank,
                     scale_dtype=sdt).resolve(k, n)
    w = torch.randn(n, k) * 0.05
    up, down = (torch.randn(n, rank) * 0.1, torch.randn(rank, k) * 0.1) if rank else (None, None)
    bias = torch.randn(n) if has_bias else None
    stride = k + rank + 3  # each layer's rows in a stacked part wider than K + r, with a gap after it
    buf = torch.zeros(n, k, dtype=c)
    alone.append((buf, WS.weight_side_rows(w, down, up, spec, c, buf), n, k, stride, off))
    bias_at, down_at = off + n * stride + 3, off + n * stride + 3 + n + 5
    items.append(WS.Item(i, w, down, up, spec, off, stride, with_up=True, bias=bias, bias_offset=bias_at,
                         down_offset=down_at if rank else None, down_rotated=rotated))
    want.append({"up": (off, n, stride, k, up.to(c)) if rank else None, "bias": (bias_at, bias.to(c)) if has_bias
                 else None, "down": (down_at, (block_hadamard(down.to(c), hb) if rotated else down.to(c)).reshape(-1))
                 if rank else None, "rotated": rotated})
    off = down_at + rank * k + 11
flat = torch.full((off,), 7.0, dtype=c)
g = WS.Group(items, c, torch.device("cpu"), bm=16)
covered = sorted(g.run(flat))
res, row0, written = [], 0, torch.zeros(off, dtype=torch.bool)
for (buf, s, n, k, stride, o), wt in zip(alone, want):
    view = flat[o:o + n * stride].view(n, stride)
    written[o:o + n * stride].view(n, stride)[:, :k] = True
    row = {"equal": bool((view[:, :k] == buf).all()), "scales": bool((g.scale[row0:row0 + n] == s).all())}
    if wt["up"] is not None:
        _, n, stride, k, a_c = wt["up"]
        r = a_c.shape[1]
        written[o:o + n * stride].view(n, stride)[:, k:k + r] = True
        row["up"] = bool(torch.equal(view[:, k:k + r], a_c))
    if wt["bias"] is not None:
        at, b_c = wt["bias"]
        written[at:at + len(b_c)] = True
        row["bias"] = bool(torch.equal(flat[at:at + len(b_c)], b_c))
    if wt["down"] is not None:
        at, d_c = wt["down"]
        written[at:at + len(d_c)] = True
        got = flat[at:at + len(d_c)]
        # B H: the kernel's fp32 sums in another order than the CPU matmul's: the same but for a last-bit tie
        row["down"] = (got == d_c).float().mean().item()
        row["down_rel"] = ((got.float() - d_c.float()).norm() / d_c.float().norm()).item()
        row["rotated"] = wt["rotated"]
    res.append(row)
    row0 += n
# taller tiles (bm = 32, the default: a tile can hold rows of one layer only, the last one partly masked) write the same
flat32 = torch.full((off,), 7.0, dtype=c)
g32 = WS.Group(items, c, torch.device("cpu"))  # the default tile: 32 rows
assert g32.bm == 32
g32.run(flat32)
# the first seven fields alone (a plain tuple): Q_w(R) and the scales, nothing else
flat_q = torch.full((off,), 7.0, dtype=c)
WS.Group([tuple(it)[:7] for it in items], c, torch.device("cpu")).run(flat_q)
q_only = torch.zeros(off, dtype=torch.bool)
for buf, s, n, k, stride, o in alone:
    q_only[o:o + n * stride].view(n, stride)[:, :k] = True
print(json.dumps({"covered": covered, "launches": len(g.launches), "layers": res,
                  "rest_untouched": bool((flat[~written] == 7).all()),
                  "bm32_same": bool(torch.equal(flat32, flat)),
                  "bm32_scale_rel": float(((g32.scale - g.scale).abs() / g.scale.abs()).max()),
                  "q_only": bool(torch.equal(flat_q[q_only], flat[q_only]) and (flat_q[~q_only] == 7).all())}))
"""


@pytest.mark.skipif(import_or_none("triton_wside") is None, reason="triton does not import here")
def test_weight_side_group_writes_each_layer_as_alone():
    """kernels/triton_wside.Group: four layers (ranks 0-16, 1.58/2/4 bits, three scale dtypes, Hadamard blocks 64
    and 128: two launches) in one launch a block size write each layer's Q_w(R) and scales bit-equal to the layer
    computed alone (whose math the test above checks), and its other parts (A_c beside Q_w(R), bias_c, B_c or B H)
    as torch casts and rotates them, into their places in a flat buffer, and nothing else; with 32-row tiles the
    same values (scales to 1e-5); items of seven fields write Q_w(R) alone."""
    r = run_interpreted(GROUP)
    assert r["covered"] == [0, 1, 2, 3] and r["launches"] == 2, r
    assert all(x["equal"] and x["scales"] for x in r["layers"]), r
    layers = r["layers"]
    assert layers[0]["up"] and layers[2]["up"] and "up" not in layers[1], r
    assert layers[0]["bias"] and layers[1]["bias"] and "bias" not in layers[2], r
    assert layers[0]["rotated"] and layers[0]["down"] >= 0.99 and layers[0]["down_rel"] < 1e-3, r
    assert not layers[2]["rotated"] and layers[2]["down"] == 1.0, r  # a cast: exact
    assert r["rest_untouched"], r
    # 32-row tiles (bm=32) write the same values; a row's range sums in another order there (the interpreter's
    # reduction over a taller tile), so a scale may move in its last fp32 bits
    assert r["bm32_same"] and r["bm32_scale_rel"] <= 1e-5, r
    assert r["q_only"], r


@pytest.mark.skipif(import_or_none("triton_wside") is None, reason="triton does not import here")
@pytest.mark.parametrize("hb,rp,bm,warps,stages", [(128, 32, 16, 4, 3), (128, 16, 16, 4, 3), (64, 64, 16, 4, 3),
                                                    (128, 32, 64, 8, 3), (128, 32, 32, 4, 1), (128, 32, 32, 4, 4)])
def test_weight_side_kernel_builds_for_sm90(hb, rp, bm, warps, stages):
    """Offline sm_90 build (no GPU) in bf16, with Inductor's fp64 scalar: the grouped kernel (masters' addresses
    read from its table) for the paper's rank-32 branch, none, a wider one on 64-blocks, 64-row tiles, and the
    pipelining depths weight_side_profile.py times."""
    from tests.kernels.sm90 import compile_sm90
    ws = import_or_none("triton_wside")
    sig = {"desc_ptr": "*i64", "tiles_ptr": "*i32", "h_ptr": "*bf16", "out_base": "*bf16", "scale_base": "*fp32",
           "eps": "fp64"}
    k = compile_sm90(ws.wside_group_kernel, sig, dict(CDT=1, HB=hb, BM=bm, RP=rp, NF=ws.NF),
                     dict(num_warps=warps, num_stages=stages), gluon=False)
    assert k.asm["cubin"]


STEP = r"""
import json
import torch
import torch.nn as nn
from robuq_fx import qat_fused
from robuq_fx.qat_linear import QATLinear
from robuq_fx.spec import LayerSpec
from robuq_fx.kernels import triton_launch, triton_wside as WS
triton_launch._ENABLED = False
WS.on_device = lambda dev: __import__("contextlib").nullcontext()
# CPU tensors in the interpreter: the kernel's own conditions but the device and autocast's device type
WS.supported = lambda w, down, up, spec, c: None if w.dtype == torch.float32 and w.stride(-1) == 1 else "no"
from robuq_fx.kernels import triton_wgrad as WG
WG.on_device = WS.on_device
WG.grads_device_ok = lambda t: True
# the step's graphs with the stand-in backend (a replay calls the captured function: the backward's slots, where
# the gradient kernel writes, exist only there)
from robuq_fx import qat_graph, qat_step
from tests.qat_testing import Replays, rel, second_step_hooked
qat_graph._BACKEND[0] = Replays()
qat_step._use_graphs = lambda t: True
torch.manual_seed(3)
base = nn.Sequential(
    QATLinear.from_module(nn.Linear(128, 128), LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=64,
                                                         lora_rank=8).resolve(128, 128)), nn.ReLU(),
    QATLinear.from_module(nn.Linear(128, 64), LayerSpec(w_bits=4, a_bits=4, hadamard=True,
                                                        hadamard_block=64).resolve(128, 64)))
x = torch.randn(3, 10, 128)
runs, calls, ggcalls = {}, [], []
real, real_gg = WS.Group.run, WG.GradGroup.run
WS.Group.run = lambda self, out: calls.append(len(self.covered)) or real(self, out)
WG.GradGroup.run = lambda self, g, s: ggcalls.append(len(self.covered)) or real_gg(self, g, s)
for on in (False, True):  # step 1 computes and captures, step 2 replays (the slots: the gradient kernels)
    qat_fused._WSIDE[0] = on
    runs[on] = second_step_hooked(base, x, torch.float16)
(y0, g0), (y1, g1) = runs[False], runs[True]
print(json.dumps({"calls": calls, "ggcalls": ggcalls, "y": rel(y1, y0),
                  "grads": {k: rel(g1[k], g0[k]) for k in g0}}))
"""


@pytest.mark.skipif(import_or_none("triton_wside") is None, reason="triton does not import here")
def test_weight_sides_with_the_one_kernel_follow_the_op_by_op_step():
    """`weight_sides_per_forward` with ROBUQ_QAT_WSIDE_KERNEL's path (the kernels in the interpreter, CPU tensors
    under fp16 autocast, the step's graphs with the stand-in backend): both layers go through both grouped kernels,
    and the output and every gradient of the second step follow the op-by-op step (the forward kernel writes all of
    a layer's parts; the backward one g_W, A's gradient and the bias's into their slots)."""
    r = run_interpreted(STEP)
    # forward: one launch for both layers in step 1 and in step 2's replay; backward: one group launch for both
    # layers in the slotted call (step 2's; step 1's backward runs without slots)
    assert r["calls"] == [2, 2] and r["ggcalls"] == [2], r
    assert r["y"] < 2e-3, r
    for k, v in r["grads"].items():
        assert v < 2e-2, (k, r)


GGROUP = r"""
import json
import torch
from robuq_fx.hadamard import hadamard_matrix
from robuq_fx.spec import LayerSpec
from robuq_fx.kernels import triton_launch, triton_wgrad as WS
triton_launch._ENABLED = False
WS.on_device = lambda dev: __import__("contextlib").nullcontext()
c = torch.float16
# (n, k, rank, hadamard block, bias, A's gradient wanted): two block sizes (two launches), ranks 0-16
cases = ((40, 256, 8, 128, True, True), (16, 192, 0, 64, True, False), (33, 128, 16, 128, False, True),
         (20, 128, 8, 64, False, False))
g_parts, items, want, g_off, s_off = [], [], [], 0, 0
for i, (n, k, rank, hb, has_bias, want_up) in enumerate(cases):
    torch.manual_seed(i)
    spec = LayerSpec(w_bits=1.58, a_bits=4, hadamard=True, hadamard_block=hb, lora_rank=rank).resolve(k, n)
    g_wide = (torch.randn(n, k + rank) * 0.01).to(c)
    g_bias = (torch.randn(n) * 0.1).to(c) if has_bias else None
    down = torch.randn(rank, k) * 0.1 if rank else None
    # the formulas (fp32 sums, rounded to c where the kernel rounds): what each slot must hold
    g_r = g_wide[:, :k].float()
    h = hadamard_matrix(hb, torch.float32).to(c).float()
    w_want = (g_r.reshape(n, k // hb, hb) @ h).reshape(n, k).to(c).float()
    up = (torch.add(-(g_r @ down.to(c).float().t()).to(c).float(), g_wide[:, k:].float()) if rank and want_up
          else None)
    want.append((w_want, up, None if g_bias is None else g_bias.float()))
    w_slot, up_slot = s_off, s_off + n * k
    bias_slot = up_slot + (n * rank if up is not None else 0) + 3
    s_off = bias_slot + n + 5
    bias_at = g_off + n * (k + rank) + 2
    items.append(WS.GradItem(i, n, k, spec, g_off, k + rank, w_slot, down, up_slot if up is not None else None,
                             bias_at if has_bias else None, bias_slot if has_bias else None))
    g_parts.append((g_off, g_wide, bias_at, g_bias))
    g_off = bias_at + n + 7
g_flat = torch.zeros(g_off, dtype=c)
for o, g_wide, b_at, g_bias in g_parts:
    g_flat[o:o + g_wide.numel()] = g_wide.reshape(-1)
    if g_bias is not None:
        g_flat[b_at:b_at + len(g_bias)] = g_bias
slots = torch.full((s_off,), 9.0)
g = WS.GradGroup(items, c, torch.device("cpu"))
g.run(g_flat, slots)
res, written = [], torch.zeros(s_off, dtype=torch.bool)
for it, (w_want, up_want, b_want) in zip(items, want):
    got_w = slots[it.w_slot:it.w_slot + it.n * it.k].view(it.n, it.k)
    row = {"w_equal": (got_w == w_want).float().mean().item(),
           "w_rel": ((got_w - w_want).norm() / w_want.norm()).item()}
    written[it.w_slot:it.w_slot + it.n * it.k] = True
    if up_want is not None:
        got = slots[it.up_slot:it.up_slot + up_want.numel()].view(up_want.shape)
        row["up_rel"] = ((got - up_want).norm() / up_want.norm()).item()
        written[it.up_slot:it.up_slot + up_want.numel()] = True
    if b_want is not None:
        row["bias"] = bool(torch.equal(slots[it.bias_slot:it.bias_slot + it.n], b_want))
        written[it.bias_slot:it.bias_slot + it.n] = True
    res.append(row)
print(json.dumps({"launches": len(g.launches), "layers": res, "rest": bool((slots[~written] == 9).all())}))
"""


@pytest.mark.skipif(import_or_none("triton_wside") is None, reason="triton does not import here")
def test_weight_grads_group_writes_each_layer_as_the_formulas():
    """kernels/triton_wgrad.GradGroup: four layers (ranks 0-16, Hadamard blocks 64 and 128: two launches, partial
    last row tiles, strided g_R) write g_W = rnd_c(g_R H) (>= 99.9% equal: the sums run in another order), A's
    gradient -rnd_c(g_R rnd_c(B)^T) + g_A' and the bias's gradient cast (exact), each into its slot of one fp32
    buffer, and nothing else (A's where not wanted neither)."""
    r = run_interpreted(GGROUP)
    assert r["launches"] == 2, r
    assert all(x["w_equal"] >= 0.999 and x["w_rel"] < 1e-3 for x in r["layers"]), r
    assert r["layers"][0]["up_rel"] < 1e-3 and r["layers"][2]["up_rel"] < 1e-3, r
    assert r["layers"][0]["bias"] and r["layers"][1]["bias"], r
    assert r["rest"], r


@pytest.mark.skipif(import_or_none("triton_wside") is None, reason="triton does not import here")
@pytest.mark.parametrize("hb,rp", [(128, 32), (64, 16)])
def test_weight_grads_group_kernel_builds_for_sm90(hb, rp):
    from tests.kernels.sm90 import compile_sm90
    sig = {"desc_ptr": "*i64", "tiles_ptr": "*i32", "h_ptr": "*bf16", "g_base": "*bf16", "slot_base": "*fp32"}
    wg = import_or_none("triton_wgrad")
    k = compile_sm90(wg.wgrad_group_kernel, sig, dict(CDT=1, HB=hb, BM=16, RP=rp, GF=wg.GF), dict(num_warps=4),
                     gluon=False)
    assert k.asm["cubin"]
