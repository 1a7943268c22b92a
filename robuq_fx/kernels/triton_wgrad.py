"""The backward of the QAT step plan's weight sides in one Triton launch a Hadamard block size (`GradGroup`; on
unless ROBUQ_QAT_WSIDE_KERNEL=0; the forward's are in triton_wside.py).

From each covered layer's stacked weight gradient g_wide = [g_R, g_A'] (c), one program a tile of 16 rows reads g_R
once and writes, into the packed fp32 gradients: g_W = rnd_c(g_R . H_c); with a branch, A's whole gradient
-rnd_c(g_R rnd_c(B)^T) + g_A' (fp32 sums over K, B read from its fp32 master); and the bias's gradient cast. A^T g_R
(B's term) stays a cuBLAS GEMM: a sum over rows, which a row tile cannot finish. The op-by-op path copies g_R (a
strided slice) for the rotation, writes the rotated bf16 gradient and casts it to fp32 again: ~14 bytes an element
against 6, and ~3 nodes a layer in the plan's backward CUDA graph where this is one for all (H200, session 27, the
paper policy's 196 layers: 3.05 ms in one launch).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .quantizer import on_device
from .triton_launch import launch
from .triton_wquant import _CODE, _round_to
from .triton_wside import BLOCK_ROWS, MAX_RANK, block_tables

# (MAX_RANK: read by the plan's check, qat_step_kernels.grad_group)
__all__ = ["GF", "GradGroup", "GradItem", "MAX_RANK", "grads_device_ok", "wgrad_group_kernel"]


GF = 16  # int64 fields a layer in a gradient group's table (`GradGroup`)


@triton.jit
def wgrad_group_kernel(desc_ptr, tiles_ptr, h_ptr, g_base, slot_base, CDT: tl.constexpr, HB: tl.constexpr,
                       BM: tl.constexpr, RP: tl.constexpr, GF: tl.constexpr):
    """The backward weight sides of several layers in one launch (`GradGroup`): one program a tile of BM rows of
    one layer. From the layer's stacked gradient g_wide = [g_R, g_A'] (c, in g_base) it writes g_W = rnd_c(g_R H) and
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
    cols = tl.arange(0, HB)
    h = tl.load(h_ptr + cols[:, None] * HB + cols[None, :])  # H in c
    acc = tl.zeros([BM, RP], dtype=tl.float32)  # g_R rnd_c(B)^T, summed over K
    for b in range(0, k // HB):  # g_W = rnd_c(g_R H) block by block (its slot: contiguous rows of k)
        kc = b * HB + cols
        g = tl.load(g_ptr + rows[:, None] * stride_g + kc[None, :], mask=rmask, other=0.0)
        tl.store(gw_ptr + rows[:, None] * k + kc[None, :], _round_to(tl.dot(g, h, out_dtype=tl.float32), CDT),
                 mask=rmask)
        # (B past the rank reads as zeros: a layer without a branch adds exact zeros to an unused sum)
        bt = tl.load(down_ptr + ranks[None, :] * stride_down + kc[:, None], mask=ranks[None, :] < rank,
                     other=0.0).to(h.dtype)  # rnd_c(B)^T's block (HB, RP)
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
    GPU time). Tiles of 16 rows (BLOCK_ROWS). The table holds the B masters' addresses and offsets into the two
    tensors `run` is given: keep it while those stay where they are."""

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
