"""The backward of a QAT layer's weight side in Triton kernels (opt-in, `ROBUQ_QAT_WSIDE_KERNEL=1`; the forward's
are in triton_wside.py).

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

from ..hadamard import hadamard_matrix
from .quantizer import on_device
from .triton_launch import launch
from .triton_wquant import _CODE, _round_to
from .triton_wside import BLOCK_ROWS, MAX_RANK, block_tables


@triton.jit
def _wgrad_tile(g_ptr, stride_g, h_ptr, down_ptr, stride_down, rank, gw_ptr, stride_gw, rows, rmask, k,
                HAS_AB: tl.constexpr, CDT: tl.constexpr, HB: tl.constexpr, BM: tl.constexpr, RP: tl.constexpr):
    """A tile of rows: g_W = rnd_c(g_R H) stored block by block (fp32), and g_R rnd_c(B)^T summed over K (fp32;
    B read in its own dtype and cast to c: a no-op for B_c) returned, with a branch (HAS_AB)."""
    cols = tl.arange(0, HB)
    h = tl.load(h_ptr + cols[:, None] * HB + cols[None, :])  # H in c
    ranks = tl.arange(0, RP)
    acc = tl.zeros([BM, RP], dtype=tl.float32)
    for b in range(0, k // HB):
        kc = b * HB + cols
        g = tl.load(g_ptr + rows[:, None] * stride_g + kc[None, :], mask=rmask, other=0.0)
        gw = _round_to(tl.dot(g, h, out_dtype=tl.float32), CDT)
        tl.store(gw_ptr + rows[:, None] * stride_gw + kc[None, :], gw, mask=rmask)
        if HAS_AB:
            bt = tl.load(down_ptr + ranks[None, :] * stride_down + kc[:, None], mask=ranks[None, :] < rank,
                         other=0.0).to(h.dtype)  # rnd_c(B)^T's block (HB, RP)
            acc += tl.dot(g, bt, out_dtype=tl.float32)
    return acc


@triton.jit
def wgrad_rows_kernel(g_ptr, h_ptr, down_ptr, gw_ptr, gup_ptr, N, K, RANK, stride_g, stride_down, stride_gw,
                      stride_gup, HAS_AB: tl.constexpr, CDT: tl.constexpr, HB: tl.constexpr, BM: tl.constexpr,
                      RP: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows[:, None] < N
    ranks = tl.arange(0, RP)
    acc = _wgrad_tile(g_ptr, stride_g, h_ptr, down_ptr, stride_down, RANK, gw_ptr, stride_gw, rows, rmask, K,
                      HAS_AB, CDT, HB, BM, RP)
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
    ranks = tl.arange(0, RP)
    # (B past the rank reads as zeros: a layer without a branch adds exact zeros to an unused sum)
    acc = _wgrad_tile(g_ptr, stride_g, h_ptr, down_ptr, stride_down, rank, gw_ptr, k, rows, rmask, k,
                      True, CDT, HB, BM, RP)
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
    """One layer of a `GradGroup` (index: the caller's), offsets in elements: its stacked gradient at g_offset with
    row stride g_stride in the flat gradient, g_W's slot (N, K) at w_slot in the packed fp32 gradients; B's fp32
    master (None without a branch); A's slot (N, r) (None: not wanted); the bias's gradient in the flat gradient and
    its slot (None: none)."""
    index: int
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
        self.c, self.bm = c, bm
        self.covered = frozenset(it.index for it in items)
        self._dummy = torch.zeros(1, device=device)  # B's address for layers without a branch (never read: masked)
        by_block: dict = {}
        for it in items:
            if it.down is not None and (it.down.dtype != torch.float32 or it.down.stride(-1) != 1):
                raise ValueError(f"GradGroup: layer {it.index}'s B is {it.down.dtype} with strides "
                                 f"{it.down.stride()}; expected an fp32 master with contiguous rows")
            by_block.setdefault(it.spec.hadamard_block, []).append(it)

        def row(it):
            r = 0 if it.down is None else it.down.shape[0]
            return [it.g_offset, it.g_stride, it.n, it.k, r, (it.down if r else self._dummy).data_ptr(),
                    it.down.stride(0) if r else 0, it.w_slot, it.up_slot or 0, int(bool(r) and it.up_slot is not None),
                    it.bias_offset or 0, it.bias_slot or 0,
                    int(it.bias_offset is not None and it.bias_slot is not None), 0, 0, 0], it.n, r
        self.launches = block_tables(by_block, row, bm, c, device)

    def run(self, g_flat: torch.Tensor, slots: torch.Tensor) -> None:
        """The items' gradients from g_flat (c, 1-D) into slots (the packed fp32 gradients, 1-D)."""
        if g_flat.dtype != self.c or slots.dtype != torch.float32:
            raise ValueError(f"GradGroup.run: g_flat {g_flat.dtype}, slots {slots.dtype}; expected {self.c} and "
                             f"torch.float32")
        with on_device(g_flat.device):
            for hb, desc, tiles, count, h, rp in self.launches:
                launch(wgrad_group_kernel, (count,), (desc, tiles, h, g_flat, slots),
                       dict(CDT=_CODE[self.c], HB=hb, BM=self.bm, RP=rp, GF=GF), dict(num_warps=4))
