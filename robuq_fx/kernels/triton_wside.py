"""A QAT layer's forward weight side in one Triton kernel (opt-in, `ROBUQ_QAT_WSIDE_KERNEL=1`; used by
`weight_sides_per_forward` and the backend's step mode): from the fp32 master W and the branch factors A (up, N x r)
and B (down, r x K) straight to Q_w(R) in the matmul dtype, written into the stacked weight's slice, and the fp32
scales; for the step plan (`Group` with full `Item`s) also the layer's other parts, casts of its masters: A_c beside
Q_w(R), bias_c, and B_c or B H (the act op's operand), so that one launch writes a whole model's forward weight side
(a CUDA graph of one node, not ~5 a layer: session 26's profile found ~2 us of host time a node at each replay).
One program a tile of rows, walking their Hadamard blocks twice (the row's range first, then the codes):

    W H  = rnd_c(rnd_c(W) . H_c)                 per Hadamard block, on the tensor cores (fp32 sums)
    A B  = rnd_c(rnd_c(A) . rnd_c(B))             the tile's rows of A times B's block, tensor cores (fp32 sums)
    R    = W H - A B in fp32          (`layer.wide_difference`)
    Q_w(R) as `quantizers.quantize_weight` / `dequantize_weight` compute it (fp32; kernels/triton_wquant.py)

rnd_c: rounded to the autocast dtype c, as the op-by-op path's autocast matmuls round their inputs and outputs. The
op-by-op path (`qat_fused._quantized_weight`: two cuBLAS matmuls, then the weight kernel) reads W, writes W H and A B
and reads them again, and casts W to c first: ~16 bytes an element against this kernel's 6 (session 23's profile:
7.7 ms of forward weight-side kernels a DiT-XL/2 step). Reading W twice, this kernel moves ~10 bytes an element.
Session 23's first form (one program a row, A B as r scalar-times-row updates, so B read once a row) took 16 ms on
the H200 in session 24, twice the op-by-op path. Its sums run in another order than cuBLAS's, so W H or A B
can differ from the op-by-op path's in their last bit, and a code at a rounding tie can flip: the tests ask for
>= 99.9% equal codes, as for the other quantizers.

Backward (`weight_grads_rows`): from the stacked weight's gradient g_wide = [g_R, g_A'] (c), one program a tile of
16 rows reading g_R once: g_W = rnd_c(g_R . H_c) written in fp32 into the packed gradient's slot, and, with a branch,
-rnd_c(g_R B_c^T) (the A B term of A's gradient, fp32 sums over K) for the caller to add g_A' to. A^T g_R (B's
term) stays a cuBLAS GEMM: a sum over rows, which a row tile cannot finish. The op-by-op path copies g_R (a strided
slice) for the rotation, writes the rotated bf16 gradient and casts it to fp32 again: ~14 bytes an element against
6 (10.2 ms of backward weight-side kernels a DiT-XL/2 step in session 23, most of them these). `GradGroup` runs it
for all of a step plan's layers in one launch a Hadamard block size, reading B from its fp32 master and also writing
A's whole gradient (the A B term plus g_A') and the bias's into their fp32 slots: of a layer's backward weight side
only B's gradient (a cuBLAS GEMM and a sub) is left outside it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import quantizers as Q
from ..hadamard import hadamard_matrix
from .quantizer import on_device
from .triton_launch import launch
from .triton_wquant import _CODE, _round_to, row_codes, row_scale

MAX_K = 16384  # (as the weight kernel's)
BLOCK_ROWS = 16  # rows a program (tl.dot takes >= 16)
GROUP_ROWS = 32  # the grouped kernel's tile: H200, session 26 sweep, 5.22 ms vs 6.51 at 16 rows (4 warps each)
MAX_RANK = 128


NF = 24  # int64 fields a layer in a group's table (`Group`)


@triton.jit
def _residual_block(w_ptr, down_ptr, h, a, rows, rmask, kc, RANK, stride_w, stride_down, ranks, CDT: tl.constexpr):
    """R = rnd_c(rnd_c(W) H) - rnd_c(rnd_c(A) rnd_c(B)) in fp32 for the tile's rows and one Hadamard block kc (A:
    zeros past the rank, so a layer without a branch subtracts an exact 0)."""
    w = tl.load(w_ptr + rows[:, None] * stride_w + kc[None, :], mask=rmask, other=0.0)
    r = _round_to(tl.dot(w.to(h.dtype), h, out_dtype=tl.float32), CDT)
    d = tl.load(down_ptr + ranks[:, None] * stride_down + kc[None, :], mask=ranks[:, None] < RANK, other=0.0)
    return r - _round_to(tl.dot(a, d.to(h.dtype), out_dtype=tl.float32), CDT)


@triton.jit
def wside_group_kernel(desc_ptr, tiles_ptr, h_ptr, out_base, scale_base, eps,
                       CDT: tl.constexpr, HB: tl.constexpr, BM: tl.constexpr, RP: tl.constexpr, NF: tl.constexpr):
    """One program a tile of BM rows of one layer of the group: tiles_ptr holds (layer, first row) a program, and
    desc_ptr NF int64 fields a layer (`Group`: its masters' addresses, where its Q_w(R) and scales go in out_base /
    scale_base, its shapes, strides, ternary flag, scale dtype and qmax, and where its other parts go: A_c beside
    Q_w(R), bias_c, and B_c or B H, written by the layer's first tile)."""
    eps = tl.cast(eps, tl.float32)  # fp64 when Inductor launches it (see triton_act_quant)
    pid = tl.program_id(0)
    layer = tl.load(tiles_ptr + 2 * pid).to(tl.int64)
    rows = tl.load(tiles_ptr + 2 * pid + 1).to(tl.int64) + tl.arange(0, BM)
    d = desc_ptr + layer * NF
    w_ptr = tl.load(d).to(tl.pointer_type(tl.float32))
    up_ptr = tl.load(d + 1).to(tl.pointer_type(tl.float32))
    down_ptr = tl.load(d + 2).to(tl.pointer_type(tl.float32))
    out_ptr = out_base + tl.load(d + 3)
    scale_ptr = scale_base + tl.load(d + 4)
    n, k, rank = tl.load(d + 5), tl.load(d + 6), tl.load(d + 7)
    stride_w, stride_up, stride_down, stride_o = tl.load(d + 8), tl.load(d + 9), tl.load(d + 10), tl.load(d + 11)
    ternary, sdt, qmax = tl.load(d + 12) != 0, tl.load(d + 13), tl.load(d + 14).to(tl.float32)
    rmask = rows[:, None] < n
    cols = tl.arange(0, HB)
    ranks = tl.arange(0, RP)
    h = tl.load(h_ptr + cols[:, None] * HB + cols[None, :])  # H in c
    a = tl.load(up_ptr + rows[:, None] * stride_up + ranks[None, :], mask=rmask & (ranks[None, :] < rank),
                other=0.0).to(h.dtype)  # the tile's rows of A in c
    # pass 1: each row's sum and max of |R| over its Hadamard blocks
    total = tl.zeros([BM], dtype=tl.float32)
    peak = tl.zeros([BM], dtype=tl.float32)
    for b in range(0, k // HB):
        r = tl.abs(_residual_block(w_ptr, down_ptr, h, a, rows, rmask, b * HB + cols, rank, stride_w, stride_down,
                                   ranks, CDT))
        total += tl.sum(r, axis=1)
        peak = tl.maximum(peak, tl.max(r, axis=1))
    s = tl.where(ternary, row_scale(total, k, qmax, eps, True, 0), row_scale(peak, k, qmax, eps, False, 0))
    s = tl.where(sdt == 1, _round_to(s, 1), tl.where(sdt == 2, _round_to(s, 2), s))  # the scale's storage dtype
    s = s[:, None]
    # pass 2: R again (W read twice: a row tile's R does not fit in registers), its codes times the row's scale
    for b in range(0, k // HB):
        kc = b * HB + cols
        r = _residual_block(w_ptr, down_ptr, h, a, rows, rmask, kc, rank, stride_w, stride_down, ranks, CDT)
        tl.store(out_ptr + rows[:, None] * stride_o + kc[None, :],
                 (row_codes(r, s, qmax) * s).to(out_ptr.dtype.element_ty), mask=rmask)
    tl.store(scale_ptr + rows[:, None], s, mask=rmask)
    # the layer's other parts, casts of its masters to c (as `copy_` rounds them): A_c beside Q_w(R), bias_c
    if tl.load(d + 20) != 0:
        tl.store(out_ptr + rows[:, None] * stride_o + k + ranks[None, :], a.to(out_ptr.dtype.element_ty),
                 mask=rmask & (ranks[None, :] < rank))
    if tl.load(d + 17) != 0:
        bias_ptr = tl.load(d + 15).to(tl.pointer_type(tl.float32))
        bias = tl.load(bias_ptr + rows, mask=rows < n)
        tl.store(out_base + tl.load(d + 16) + rows, bias.to(out_ptr.dtype.element_ty), mask=rows < n)
    # B_c (mode 1) or B H (mode 2: rnd_c(B_c H_c), the act op's operand; `qat_act.through_h`), by the first tile
    b_mode = tl.load(d + 19)
    if (b_mode != 0) & (tl.load(tiles_ptr + 2 * pid + 1) == 0):
        b_out = out_base + tl.load(d + 18)
        for b in range(0, k // HB):
            kc = b * HB + cols
            bmask = ranks[:, None] < rank
            bc = tl.load(down_ptr + ranks[:, None] * stride_down + kc[None, :], mask=bmask, other=0.0).to(h.dtype)
            bh = _round_to(tl.dot(bc, h, out_dtype=tl.float32), CDT)
            v = tl.where(b_mode == 2, bh, bc.to(tl.float32))
            tl.store(b_out + ranks[:, None] * k + kc[None, :], v.to(out_ptr.dtype.element_ty), mask=bmask)


def supported(w: torch.Tensor, down, up, spec, c: torch.dtype) -> str | None:
    """None where the kernel computes this layer's forward weight side, else why not."""
    if not w.is_cuda:
        return "not a CUDA tensor"
    if w.dtype != torch.float32 or w.dim() != 2 or w.stride(-1) != 1:
        return "not an fp32 master with contiguous rows"
    if c not in (torch.bfloat16, torch.float16) or not torch.is_autocast_enabled("cuda") \
            or torch.get_autocast_dtype("cuda") != c:
        return "not under 16-bit autocast"
    if not spec.hadamard or spec.hadamard_block not in (16, 32, 64, 128):
        return "no Hadamard block of 16-128"
    if spec.w_granularity != "channel" or spec.group_size:
        return "not per-channel weight scales"
    k = w.shape[1]
    if k % spec.hadamard_block or k > MAX_K:
        return f"in_features {k}"
    if spec.scale_dtype not in ("float32", "bfloat16", "float16"):
        return f"scale dtype {spec.scale_dtype}"
    if down is not None and (down.shape[0] > MAX_RANK or down.stride(-1) != 1 or up.stride(-1) != 1
                             or down.dtype != torch.float32 or up.dtype != torch.float32):
        return "branch factors not fp32 masters with contiguous rows"
    return None


class Item(NamedTuple):
    """One layer of a `Group`: its masters (W (N, K) fp32, B (r, K) and A (N, r) or None), its spec, where its
    Q_w(R) goes (offset of row 0 and row stride in the flat output), and, where given, where its other parts go:
    A_c beside Q_w(R) (with_up), bias_c (bias, bias_offset), B_c or B H (down_offset, down_rotated)."""
    index: int
    w: torch.Tensor
    down: torch.Tensor | None
    up: torch.Tensor | None
    spec: object
    offset: int
    stride: int
    with_up: bool = False
    bias: torch.Tensor | None = None
    bias_offset: int = 0
    down_offset: int | None = None
    down_rotated: bool = False


class Group:
    """Several layers' forward weight sides in one launch a Hadamard block size (`wside_group_kernel`): a DiT-XL/2
    layer alone gives 72-432 programs of 16 rows, too few to hide their loads' latency (session 24, H200: 8.9 ms for
    196 launches against ~2 ms by bytes). items: an `Item` (or its first seven fields) a layer `supported` covers, its
    Q_w(R) going to out[offset + n * stride + k] of the tensor `run` is given, and its other parts where the item
    says (then `run` writes all of the layer's forward weight side: one launch for the model). The tables
    hold the masters' addresses: build one where the masters are, outside a CUDA graph capture, and keep it while
    they stay there (qat_step.Plan keys it on their addresses). bm, num_warps, num_stages: the tile's rows, the
    program's warps and its loops' software-pipelining depth (None: Triton's default; scripts/weight_side_profile.py
    times a few; the math per row is the same whatever the tile)."""

    def __init__(self, items: list, c: torch.dtype, device: torch.device, bm: int = GROUP_ROWS, num_warps: int = 4,
                 num_stages: int | None = None):
        items = [it if isinstance(it, Item) else Item(*it) for it in items]
        self.covered = frozenset(it.index for it in items)
        self.items, self.c, self.launches = items, c, []
        self.bm, self.num_warps = bm, num_warps  # rows a program (a power of two >= 16), its warps
        self.options = dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps,
                                                                                  num_stages=num_stages)
        by_block: dict = {}
        rows = 0  # the items' scales one after another in .scale, in the items' order
        for it in items:
            if it.bias is not None and (it.bias.dtype != torch.float32 or it.bias.stride(-1) != 1):
                raise ValueError(f"Group: layer {it.index}'s bias is {it.bias.dtype} with stride {it.bias.stride()}; "
                                 f"expected a contiguous fp32 master")
            by_block.setdefault(it.spec.hadamard_block, []).append((it, rows))
            rows += it.w.shape[0]
        for hb, group in sorted(by_block.items()):
            desc, tiles, rank = [], [], 0
            for j, (it, first) in enumerate(group):
                w, down, up = it.w, it.down, it.up
                n, k = w.shape
                r = down.shape[0] if down is not None else 0
                rank = max(rank, r)
                b_mode = 0 if not r or it.down_offset is None else 2 if it.down_rotated else 1
                desc.append([w.data_ptr(), (up if r else w).data_ptr(), (down if r else w).data_ptr(), it.offset,
                             first, n, k, r, w.stride(0), up.stride(0) if r else 0, down.stride(0) if r else 0,
                             it.stride, int(float(it.spec.w_bits) == 1.58), _CODE[getattr(torch, it.spec.scale_dtype)],
                             int(Q.weight_qmax(it.spec.w_bits)), (w if it.bias is None else it.bias).data_ptr(),
                             it.bias_offset, int(it.bias is not None), it.down_offset or 0, b_mode,
                             int(bool(r and it.with_up)), 0, 0, 0])
                tiles += [(j, t) for t in range(0, n, bm)]
            self.launches.append((hb, torch.tensor(desc, dtype=torch.int64).to(device),
                                  torch.tensor(tiles, dtype=torch.int32).to(device), len(tiles),
                                  hadamard_matrix(hb, c, device), max(16, triton.next_power_of_2(rank))))
        self.scale = torch.empty(rows, device=device, dtype=torch.float32)

    def run(self, out: torch.Tensor) -> frozenset:
        """Every item's Q_w(R) written into `out` (in c); returns the items' indices. Their scales go to .scale,
        one item after another in the items' order."""
        if out.dtype != self.c:
            raise ValueError(f"out is {out.dtype}; the group computes in {self.c}")
        with on_device(out.device):
            for hb, desc, tiles, count, h, rp in self.launches:
                launch(wside_group_kernel, (count,), (desc, tiles, h, out, self.scale, Q._EPS),
                       dict(CDT=_CODE[self.c], HB=hb, BM=self.bm, RP=rp, NF=NF), self.options)
        return self.covered


def weight_side_rows(w: torch.Tensor, down, up, spec, c: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """Q_w(W H - A B) (or Q_w(W H)) in c written into `out` ((N, K), rows contiguous); returns the fp32 scales."""
    n, k = w.shape
    if out.shape != (n, k) or out.dtype != c or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype}: expected ({n}, {k}) {c} with contiguous rows")
    group = Group([(0, w, down, up, spec, 0, out.stride(0))], c, w.device, bm=BLOCK_ROWS)  # one layer: more programs
    group.run(out)
    return group.scale


@triton.jit
def wgrad_rows_kernel(g_ptr, h_ptr, down_ptr, gw_ptr, gup_ptr, N, K, RANK, stride_g, stride_down, stride_gw,
                      stride_gup, HAS_AB: tl.constexpr, CDT: tl.constexpr, HB: tl.constexpr, BM: tl.constexpr,
                      RP: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows[:, None] < N
    cols = tl.arange(0, HB)
    h = tl.load(h_ptr + cols[:, None] * HB + cols[None, :])  # H in c
    ranks = tl.arange(0, RP)
    acc = tl.zeros([BM, RP], dtype=tl.float32)
    for b in range(0, K // HB):
        kc = b * HB + cols
        g = tl.load(g_ptr + rows[:, None] * stride_g + kc[None, :], mask=rmask, other=0.0)
        gw = _round_to(tl.dot(g, h, out_dtype=tl.float32), CDT)
        tl.store(gw_ptr + rows[:, None] * stride_gw + kc[None, :], gw, mask=rmask)
        if HAS_AB:
            bt = tl.load(down_ptr + ranks[None, :] * stride_down + kc[:, None], mask=ranks[None, :] < RANK,
                         other=0.0)  # B_c^T's block (HB, RP)
            acc += tl.dot(g, bt, out_dtype=tl.float32)
    if HAS_AB:
        tl.store(gup_ptr + rows[:, None] * stride_gup + ranks[None, :], -_round_to(acc, CDT),
                 mask=rmask & (ranks[None, :] < RANK))


def grads_supported(g_r: torch.Tensor, down_c, spec, g_w_out: torch.Tensor) -> str | None:
    """None where `weight_grads_rows` computes this layer's weight gradients, else why not."""
    if not g_r.is_cuda or g_r.dtype not in (torch.bfloat16, torch.float16) or g_r.stride(-1) != 1:
        return "not a 16-bit CUDA gradient with contiguous rows"
    if g_w_out is None or g_w_out.dtype != torch.float32 or g_w_out.shape != g_r.shape or g_w_out.stride(-1) != 1:
        return "no fp32 slot for the weight's gradient"
    if not spec.hadamard or spec.hadamard_block not in (16, 32, 64, 128) or g_r.shape[1] % spec.hadamard_block:
        return "no Hadamard block of 16-128 dividing in_features"
    if down_c is not None and (down_c.dtype != g_r.dtype or down_c.shape[0] > MAX_RANK or down_c.stride(-1) != 1):
        return "branch factor B"
    return None


def weight_grads_rows(g_r: torch.Tensor, down_c, spec, g_w_out: torch.Tensor):
    """g_W = rnd_c(g_R H) into g_w_out (fp32, (N, K)); returns -rnd_c(g_R B_c^T) in fp32 (N, r), or None without a
    branch. g_r: (N, K) in c, rows contiguous (a slice of g_wide); down_c: B in c (r, K)."""
    n, k = g_r.shape
    hb = spec.hadamard_block
    h = hadamard_matrix(hb, g_r.dtype, g_r.device)  # (cached: what the op-by-op rotation of g_R multiplies by)
    has_ab = down_c is not None
    rank = down_c.shape[0] if has_ab else 0
    g_up = torch.empty(n, rank, device=g_r.device, dtype=torch.float32) if has_ab else None
    bm = 16
    with on_device(g_r.device):
        launch(wgrad_rows_kernel, (triton.cdiv(n, bm),),
               (g_r, h, down_c if has_ab else g_r, g_w_out, g_up if has_ab else g_w_out, n, k, rank, g_r.stride(0),
                down_c.stride(0) if has_ab else 0, g_w_out.stride(0), g_up.stride(0) if has_ab else 0),
               dict(HAS_AB=has_ab, CDT=_CODE[g_r.dtype], HB=hb, BM=bm, RP=max(16, triton.next_power_of_2(rank))),
               dict(num_warps=4))
    return g_up


GF = 16  # int64 fields a layer in a gradient group's table (`GradGroup`)


@triton.jit
def wgrad_group_kernel(desc_ptr, tiles_ptr, h_ptr, g_base, slot_base, CDT: tl.constexpr, HB: tl.constexpr,
                       BM: tl.constexpr, RP: tl.constexpr, GF: tl.constexpr):
    """`wgrad_rows_kernel` for several layers in one launch (`GradGroup`): one program a tile of BM rows of one
    layer. From the layer's stacked gradient g_wide = [g_R, g_A'] (c, in g_base) it writes g_W = rnd_c(g_R H) and
    g_A = -rnd_c(g_R rnd_c(B)^T) + g_A' (fp32, as `torch.add` of the two in A's dtype) into their slots of the packed
    fp32 gradients (slot_base), and the bias's gradient cast to fp32. B is read from its fp32 master."""
    pid = tl.program_id(0)
    layer = tl.load(tiles_ptr + 2 * pid).to(tl.int64)
    rows = tl.load(tiles_ptr + 2 * pid + 1).to(tl.int64) + tl.arange(0, BM)
    d = desc_ptr + layer * GF
    g_ptr = g_base + tl.load(d)
    stride_g, n, k, rank = tl.load(d + 1), tl.load(d + 2), tl.load(d + 3), tl.load(d + 4)
    down_ptr = tl.load(d + 5).to(tl.pointer_type(tl.float32))
    stride_down = tl.load(d + 6)
    gw_ptr = slot_base + tl.load(d + 7)
    rmask = rows[:, None] < n
    cols = tl.arange(0, HB)
    h = tl.load(h_ptr + cols[:, None] * HB + cols[None, :])  # H in c
    ranks = tl.arange(0, RP)
    acc = tl.zeros([BM, RP], dtype=tl.float32)
    for b in range(0, k // HB):
        kc = b * HB + cols
        g = tl.load(g_ptr + rows[:, None] * stride_g + kc[None, :], mask=rmask, other=0.0)
        gw = _round_to(tl.dot(g, h, out_dtype=tl.float32), CDT)
        tl.store(gw_ptr + rows[:, None] * k + kc[None, :], gw, mask=rmask)
        # B_c^T's block (HB, RP): zeros past the rank (a layer without a branch adds exact zeros)
        bt = tl.load(down_ptr + ranks[None, :] * stride_down + kc[:, None], mask=ranks[None, :] < rank,
                     other=0.0).to(h.dtype)
        acc += tl.dot(g, bt, out_dtype=tl.float32)
    if tl.load(d + 9) != 0:  # A's gradient: the A B term plus the stacked GEMM's own (g_wide's last r columns)
        amask = rmask & (ranks[None, :] < rank)
        tail = tl.load(g_ptr + rows[:, None] * stride_g + k + ranks[None, :], mask=amask, other=0.0)
        tl.store(slot_base + tl.load(d + 8) + rows[:, None] * rank + ranks[None, :],
                 -_round_to(acc, CDT) + tail.to(tl.float32), mask=amask)
    if tl.load(d + 12) != 0:  # the bias's gradient, cast
        gb = tl.load(g_base + tl.load(d + 10) + rows, mask=rows < n, other=0.0)
        tl.store(slot_base + tl.load(d + 11) + rows, gb.to(tl.float32), mask=rows < n)


def grads_device_ok(t: torch.Tensor) -> bool:
    """Where `GradGroup` runs: CUDA tensors (tests widen it to the interpreter's CPU tensors)."""
    return t.is_cuda


class GradItem(NamedTuple):
    """One layer of a `GradGroup`, offsets in elements: its stacked gradient at g_offset with row stride g_stride
    in the flat gradient, g_W's slot (N, K) at w_slot in the packed fp32 gradients; B's fp32 master (None without a
    branch); A's slot (N, r) (None: not wanted); the bias's gradient in the flat gradient and its slot (None: none)."""
    n: int
    k: int
    spec: object
    g_offset: int
    g_stride: int
    w_slot: int
    down: torch.Tensor | None = None
    up_slot: int | None = None
    bias_offset: int | None = None
    bias_slot: int | None = None


class GradGroup:
    """Several layers' backward weight sides in one launch a Hadamard block size (`wgrad_group_kernel`): the step
    plan's backward graph then holds one node for them where it held ~3 a layer (each replayed node costs host and
    GPU time). Tiles of 16 rows, as `weight_grads_rows`, whose values it writes bit for bit. The table holds the B
    masters' addresses and offsets into the two tensors `run` is given: keep it while those stay where they are."""

    def __init__(self, items: list, c: torch.dtype, device: torch.device, bm: int = BLOCK_ROWS):
        self.c, self.bm, self.launches = c, bm, []
        self.covered = frozenset()  # (the caller's indices of the layers it covers: qat_step.Plan._grad_group)
        dummy = torch.zeros(1, device=device)  # B's address for layers without a branch (never read: masked)
        self._dummy = dummy
        by_block: dict = {}
        for it in items:
            if it.down is not None and (it.down.dtype != torch.float32 or it.down.stride(-1) != 1):
                raise ValueError(f"GradGroup: B is {it.down.dtype} with strides {it.down.stride()}; expected an fp32 "
                                 f"master with contiguous rows")
            by_block.setdefault(it.spec.hadamard_block, []).append(it)
        for hb, group in sorted(by_block.items()):
            desc, tiles, rank = [], [], 0
            for j, it in enumerate(group):
                r = 0 if it.down is None else it.down.shape[0]
                rank = max(rank, r)
                desc.append([it.g_offset, it.g_stride, it.n, it.k, r,
                             (it.down if r else dummy).data_ptr(),
                             it.down.stride(0) if r else 0, it.w_slot, it.up_slot or 0,
                             int(bool(r) and it.up_slot is not None), it.bias_offset or 0, it.bias_slot or 0,
                             int(it.bias_offset is not None and it.bias_slot is not None), 0, 0, 0])
                tiles += [(j, t) for t in range(0, it.n, bm)]
            self.launches.append((torch.tensor(desc, dtype=torch.int64).to(device),
                                  torch.tensor(tiles, dtype=torch.int32).to(device), len(tiles),
                                  hadamard_matrix(hb, c, device), hb, max(16, triton.next_power_of_2(rank))))

    def run(self, g_flat: torch.Tensor, slots: torch.Tensor) -> None:
        """The items' gradients from g_flat (c, 1-D) into slots (the packed fp32 gradients, 1-D)."""
        if g_flat.dtype != self.c or slots.dtype != torch.float32:
            raise ValueError(f"GradGroup.run: g_flat {g_flat.dtype}, slots {slots.dtype}; expected {self.c} and "
                             f"torch.float32")
        with on_device(g_flat.device):
            for desc, tiles, count, h, hb, rp in self.launches:
                launch(wgrad_group_kernel, (count,), (desc, tiles, h, g_flat, slots),
                       dict(CDT=_CODE[self.c], HB=hb, BM=self.bm, RP=rp, GF=GF), dict(num_warps=4))
