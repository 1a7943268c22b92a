"""A QAT layer's forward weight side in one Triton kernel (on unless `ROBUQ_QAT_WSIDE_KERNEL=0`; used by
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

The backward's kernels are in triton_wgrad.py.
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


def block_tables(by_block: dict, row, bm: int, c: torch.dtype, device: torch.device) -> list:
    """A grouped kernel's launches, one a Hadamard block size (ascending): (block, the layers' table (int64 rows),
    (layer, first row) a program (int32), programs, H of that block in c, ranks padded to a power of two >= 16).
    by_block: {block: entries}; row(entry) -> (its table row, its rows, its rank). Copied to the GPU: not inside a
    CUDA graph capture."""
    launches = []
    for hb, entries in sorted(by_block.items()):
        desc, tiles, rank = [], [], 0
        for j, entry in enumerate(entries):
            fields, n, r = row(entry)
            desc.append(fields)
            rank = max(rank, r)
            tiles += [(j, t) for t in range(0, n, bm)]
        launches.append((hb, torch.tensor(desc, dtype=torch.int64).to(device),
                         torch.tensor(tiles, dtype=torch.int32).to(device), len(tiles), hadamard_matrix(hb, c, device),
                         max(16, triton.next_power_of_2(rank))))
    return launches


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
        def row(entry):
            it, first = entry
            w, down, up = it.w, it.down, it.up
            n, k = w.shape
            r = down.shape[0] if down is not None else 0
            b_mode = 0 if not r or it.down_offset is None else 2 if it.down_rotated else 1
            return [w.data_ptr(), (up if r else w).data_ptr(), (down if r else w).data_ptr(), it.offset, first, n, k,
                    r, w.stride(0), up.stride(0) if r else 0, down.stride(0) if r else 0, it.stride,
                    int(float(it.spec.w_bits) == 1.58), _CODE[getattr(torch, it.spec.scale_dtype)],
                    int(Q.weight_qmax(it.spec.w_bits)), (w if it.bias is None else it.bias).data_ptr(),
                    it.bias_offset, int(it.bias is not None), it.down_offset or 0, b_mode,
                    int(bool(r and it.with_up)), 0, 0, 0], n, r
        self.launches = block_tables(by_block, row, bm, c, device)
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
