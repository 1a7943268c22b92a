"""Quantization inside the GEMM, warp-specialized (issue 20): y = Q_a(x H) Q_w^T s_x s_w [+ bias] in one persistent
Gluon kernel for Hopper, the codes never leaving shared memory.

`gluon_qgemm.py` (v0) quantizes a row block and then multiplies it in the same warps: the tensor cores idle through
every quantization (H200: 0.60x bf16 at M = 16384, docs/gpu.md). Here three partitions of each program run side by
side, handing work over through mbarriers:

- the quantizer (4 warps; `gluon_ws_quant.py`): for each work item, Q_a(x H) of its BM = 64 rows into one of two
  code buffers ([K / 128, 64, 128] fp8 each; 144 KB for both at K = 1152) and s_x into shared memory -- the butterflies,
  scale and Markstein quotient of `gluon_act_quant` (the v0 kernel's two passes), so codes and scales are the
  two-kernel path's;
- the weight loader (1 warp): the (BN, 128) fp8 weight tiles of the item's N tiles through a ring of STAGES slots
  by TMA;
- the MMA partition (the default one, 4 warps = one warpgroup): fp8 wgmma m64 over the codes and the ring, and the
  epilogue s_x s_w acc [+ bias] for each N tile; it frees a weight slot once the wgmma after it is issued, and a code
  buffer after its item's last tile.

While the MMA partition multiplies row block i, the quantizer fills the other buffer with row block i + 1, so the
tensor cores idle only during the epilogues. A work item is (row block, run of TPS N tiles); the programs (at most
one per SM) walk the items in a grid-stride loop. Where the row blocks alone give fewer items than SMs, N is split
(as v0's `n_split`), each item quantizing its row block again.

The low-rank branch, stacked into the GEMM as in `lrb_stacked.py`, as extra k-steps; x is read once for codes and
branch. Rank 32 (the paper's; "packed"): the quantizer partition (`_quant_lrb_partition`) accumulates t = (x H) B^T
on mma.sync from the rotated chunks it holds anyway, then writes [u1, u1, u2, 0] (u = t / (s_x c)) as the buffer's
last chunk; the loader pairs it with the first 128 columns of the stacked mode's extended weight [v1, v2, v1, c,
0.., codes] (the 16 code columns in that box meet zeros), the code chunks with its columns W + 128 kb. Ranks 65..96
(sibling-fused q/k/v's 96; "terms", `_quant_terms_partition`): two chunks u1 = [e4m3(u), 0..], u2 = [e4m3(u - u1),
0..], run as three k-steps u1, u1, u2 against two 128-column boxes [v1, c, 0..], [v2, 0..] (`lrb_layout.ext_columns`
at those ranks; the stacked mode itself takes none above 64).

Scope: symmetric absmax activations A <= 4, Hadamard block 128, K a multiple of 128 up to 1152, a branch of rank 32
or 65..96 (multiples of 16) or none, no asymmetric terms (every DiT-XL/2 layer of `dit`, W1.58A4+H and
`dit-xl-2-robuq` but fc2). `ROBUQ_FP8_FUSED_QUANT=ws` forces it; otherwise it runs where the dispatch table's sweep
measured it faster (dispatch: `fused_quant.py`, `dispatch.fused_quant_mode`). H200 (session 12): equal to the
two-kernel path and 2.1-2.6x slower than it (docs/gpu.md: a latency-bound quantizer partition, 64-row tiles).
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .gluon_fp8_gemm import _instr_n, _warps
from .gluon_qgemm import call_reason
from .gluon_ws_quant import (BK, BM, LRB_RANK, QUANT_WARPS, _item, _items, _quant_lrb_partition, _quant_partition,
                             _quant_terms_partition)
from .lrb_layout import TERMS_MIN_RANK, terms_form
from .lrb_stacked import c_slot

CONFIGS = [  # (BN, STAGES) of the weight ring, the quantizer partition's registers; BM = 64 rows, BK = 128,
    (128, 4, 192),  # 4 + 4 + 1 warps. No spills offline (sm_90); BN = 256 spilled the MMA partition's accumulator
    (64, 6, 232),
]
LRB_CONFIGS = [  # with the branch: one more code chunk a buffer (2 x 80 KB at K = 1152) leaves less for the ring;
    (64, 4, 248),  # offline: no spills at 248 quantizer registers (20-28 stores at 192-240)
]
TERMS_CONFIGS = [  # the terms form: two more chunks a buffer (2 x 88 KB at K = 1152); offline its quantizer partition
    (64, 3, 224),  # spills ~36 stores at 208-256 registers (445 at 240)
]


@gluon.constexpr_function
def _extra_steps(lrb):
    """k-steps of the branch a tile: none, 1 (packed), 3 (terms: u1, u1, u2)."""
    return (0, 1, 3)[lrb]


@gluon.constexpr_function
def _extra_chunks(lrb):
    """Shared-memory chunks of the branch a code buffer: none, 1 (packed), 2 (terms: u1, u2)."""
    return (0, 1, 2)[lrb]


@gluon.jit
def _load_partition(x_ptr, w_desc, a_bufs, sx_smem, w_bufs, bars, M, N, stride_xm, hscale, levels, TPS,
                    down_ptr, c_ptr, stride_dn, W_OFF, NCODE, EXTRA, R):
    """The weight tiles of every item's N tiles, k-step by k-step, into the ring (one warp). (A worker partition's
    arguments arrive as runtime values: its compile-time sizes come from the shared buffers' shapes.)"""
    a_ready, a_empty, w_ready, w_empty = bars
    STAGES: gl.constexpr = w_bufs.type.shape[0]
    BN: gl.constexpr = w_bufs.type.shape[1]
    KT = NCODE + EXTRA  # k-steps a tile: the code chunks, then the branch's (1 packed, 3 in the terms form)
    n_tiles, n_groups, total = _items(M, N, BN, TPS)
    it = 0
    for item in range(gl.program_id(0), total, gl.num_programs(0)):
        mt, t0, nt = _item(item, n_groups, n_tiles, TPS)
        for j in range(nt * KT):
            slot = it % STAGES
            kb = j % KT
            # code chunk kb: the weight's code columns W_OFF + 128 kb; the branch's k-step s: box s % 2 of its first
            # columns (packed: [v1, v2, v1, c, 0..] then 16 code columns, which meet zeros on the activation side;
            # terms: [v1, c, 0..], [v2, 0..], [v1, c, 0..])
            col = gl.where(kb < NCODE, W_OFF + kb * BK, ((kb - NCODE) % 2) * BK)
            mbarrier.wait(w_empty.index(slot), ((it // STAGES) & 1) ^ 1)  # freed (the first round passes)
            mbarrier.expect(w_ready.index(slot), w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [(t0 + j // KT) * BN, col], w_ready.index(slot),
                                            w_bufs.index(slot))
            it += 1


@gluon.jit
def _mma_partition(a_bufs, sx_smem, w_bufs, bars, y_ptr, sw_ptr, bias_ptr, M, N, stride_ym, TPS,
                   K: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
                   LRB: gl.constexpr, NW: gl.constexpr):
    """fp8 wgmma over an item's codes (and the branch's chunks) and the ring, the epilogue after each N tile (the
    default partition)."""
    a_ready, a_empty, w_ready, w_empty = bars
    NCODE: gl.constexpr = K // BK
    CH: gl.constexpr = a_bufs.type.shape[0] // 2  # chunks a buffer: the codes, then the branch's 0 / 1 / 2
    NKB: gl.constexpr = NCODE + _extra_steps(LRB)  # k-steps a tile
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=_warps(BM, NW),
                                                  instr_shape=[16, _instr_n(BN, NW, BM), 32])
    n_tiles, n_groups, total = _items(M, N, BN, TPS)
    it = 0
    i = 0
    for item in range(gl.program_id(0), total, gl.num_programs(0)):
        mt, t0, nt = _item(item, n_groups, n_tiles, TPS)
        buf = i % 2
        mbarrier.wait(a_ready.index(buf), (i // 2) & 1)
        sx = sx_smem.index(buf).load(gl.SliceLayout(1, mma))
        orow = mt * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
        omask = orow < M
        for t in range(nt):
            acc = gl.zeros((BM, BN), dtype=gl.float32, layout=mma)
            for kb in range(NKB):
                slot = it % STAGES
                mbarrier.wait(w_ready.index(slot), (it // STAGES) & 1)
                chunk = gl.where(kb < NCODE, kb, NCODE + (kb - NCODE) // 2)  # terms: u1, u1, u2
                acc = warpgroup_mma(a_bufs.index(buf * CH + chunk), w_bufs.index(slot).permute((1, 0)), acc,
                                    use_acc=kb != 0, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                # the wgmma before this one has finished: its weight slot goes back to the loader
                mbarrier.arrive(w_empty.index((it + STAGES - 1) % STAGES), count=1, pred=kb != 0)
                it += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(w_empty.index((it + STAGES - 1) % STAGES), count=1)
            cols = (t0 + t) * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
            cmask = cols < N
            out = acc * gl.expand_dims(sx, 1) * gl.expand_dims(gl.load(sw_ptr + cols, mask=cmask, other=0.0), 0)
            if HAS_BIAS:
                out += gl.expand_dims(gl.load(bias_ptr + cols, mask=cmask, other=0.0).to(gl.float32), 0)
            ptrs = y_ptr + gl.expand_dims(orow.to(gl.int64) * stride_ym, 1) + gl.expand_dims(cols, 0)
            gl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=gl.expand_dims(omask, 1) & gl.expand_dims(cmask, 0))
        mbarrier.arrive(a_empty.index(buf), count=1)  # every wgmma reading this buffer has finished
        i += 1


@gluon.jit(do_not_specialize=["M"])
def qgemm_ws_kernel(x_ptr, w_desc, y_ptr, sw_ptr, bias_ptr, down_ptr, c_ptr, M, N, stride_xm, stride_ym, stride_dn,
                    hscale, levels, TPS, W_OFF, R, K: gl.constexpr, HAS_BIAS: gl.constexpr, LRB: gl.constexpr,
                    STAGES: gl.constexpr, QUANT_REGS: gl.constexpr, num_warps: gl.constexpr):
    """LRB: 0 no branch, 1 rank 32 packed into one chunk, 2 rank 65..127 in the terms form (module docstring)."""
    BN: gl.constexpr = w_desc.block_type.shape[0]
    CH: gl.constexpr = K // BK + _extra_chunks(LRB)  # chunks a code buffer: the codes, the branch's last
    a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2 * CH, BM, BK],
                                       gl.NVMMASharedLayout.get_default_for([BM, BK], gl.float8e4nv))
    sx_smem = gl.allocate_shared_memory(gl.float32, [2, BM], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
    a_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    a_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(2):
        mbarrier.init(a_ready.index(j), count=1)
        mbarrier.init(a_empty.index(j), count=1)
    for j in gl.static_range(STAGES):
        mbarrier.init(w_ready.index(j), count=1)
        mbarrier.init(w_empty.index(j), count=1)
    bars = (a_ready, a_empty, w_ready, w_empty)
    worker = (x_ptr, w_desc, a_bufs, sx_smem, w_bufs, bars, M, N, stride_xm, hscale, levels, TPS, down_ptr, c_ptr,
              stride_dn, W_OFF, K // BK, _extra_steps(LRB), R)
    # (the MMA partition's tuple stays inline: a constexpr kept in a tuple variable reaches the partition as a
    # runtime value)
    if LRB == 2:
        gl.warp_specialize([(_mma_partition, (a_bufs, sx_smem, w_bufs, bars, y_ptr, sw_ptr, bias_ptr, M, N, stride_ym,
                                              TPS, K, BN, STAGES, HAS_BIAS, LRB, num_warps)),
                            (_load_partition, worker), (_quant_terms_partition, worker)],
                           [1, QUANT_WARPS], [24, QUANT_REGS])
    elif LRB == 1:
        gl.warp_specialize([(_mma_partition, (a_bufs, sx_smem, w_bufs, bars, y_ptr, sw_ptr, bias_ptr, M, N, stride_ym,
                                              TPS, K, BN, STAGES, HAS_BIAS, LRB, num_warps)),
                            (_load_partition, worker), (_quant_lrb_partition, worker)],
                           [1, QUANT_WARPS], [24, QUANT_REGS])
    else:
        gl.warp_specialize([(_mma_partition, (a_bufs, sx_smem, w_bufs, bars, y_ptr, sw_ptr, bias_ptr, M, N, stride_ym,
                                              TPS, K, BN, STAGES, HAS_BIAS, LRB, num_warps)),
                            (_load_partition, worker), (_quant_partition, worker)],
                           [1, QUANT_WARPS], [24, QUANT_REGS])


def lrb_form(rank: int) -> int | None:
    """The kernel's LRB constexpr for a branch of this rank (0 without one), None where it takes none."""
    if rank == 0:
        return 0
    if rank == int(LRB_RANK):
        return 1
    if TERMS_MIN_RANK <= rank <= 96 and rank % 16 == 0 and terms_form(rank):  # (not the flat layout, lrb_stacked)
        return 2
    return None


def supported(x, k: int, block: int, a_bits: int, sym: bool, clip: str, rank: int) -> str | None:
    """Why this kernel cannot take the call, or None (rank: the low-rank branch's, 0 without one)."""
    why = call_reason(x, k, block, a_bits, sym, clip)
    if why is None and lrb_form(rank) is None:
        why = (f"low-rank branch of rank {rank}: the warp-specialized kernel takes rank {int(LRB_RANK)}, "
               f"{TERMS_MIN_RANK}..96 in multiples of 16, or none")
    return why


def work_split(m: int, n: int, bn: int, sms: int) -> tuple[int, int]:
    """(N tiles an item, programs): N split so that items about fill `sms` where the 64-row blocks alone do not
    (each item quantizes its row block again), one program an SM at most."""
    m_tiles, n_tiles = -(-m // 64), -(-n // bn)
    split = max(1, min(n_tiles, sms // m_tiles))
    tps = -(-n_tiles // split)
    return tps, min(sms, m_tiles * -(-n_tiles // tps))


def launch_qgemm_ws(x2, w8, y, sw, bias, hscale: float, levels: float, cfg=None, sms: int | None = None,
                    ext: torch.Tensor | None = None, down: torch.Tensor | None = None):
    """y (M, N) = Q_a(x2 H) Q_w^T s_x s_w [+ bias] [+ ((x2 H) B^T) A^T]; x2 (M, K) 16-bit with unit column stride,
    w8 (N, K) fp8 codes with 16-byte aligned rows, sw (N,) fp32, bias (N,) or None. With a branch: ext the extended
    weight (N, W + K) of `lrb_stacked.cached_weight_ext` ([v1, v2, v1, c, 0.., codes] at rank 32, the terms form's
    two boxes at ranks >= 65; w8 is ignored), down B (r, K) in x2's dtype, unrotated. sms: programs at most (default:
    the GPU's SMs)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    r = 0 if down is None else down.shape[0]
    form = lrb_form(r)
    if form is None or (form > 0) != (ext is not None):
        raise ValueError(f"launch_qgemm_ws: a branch of rank {r} with{'' if ext is not None else 'out'} an extended "
                         "weight is not a form this kernel takes")
    bn, stages, quant_regs = cfg or (CONFIGS, LRB_CONFIGS, TERMS_CONFIGS)[form][0]
    m, k = x2.shape
    wt = ext if form else w8
    n = wt.shape[0]
    w_desc = TensorDescriptor(wt, list(wt.shape), [wt.stride(0), 1], [bn, 128],
                              gl.NVMMASharedLayout.get_default_for([bn, 128], gl.float8e4nv))
    sms = sms or torch.cuda.get_device_properties(x2.device).multi_processor_count
    tps, programs = work_split(m, n, bn, sms)
    qgemm_ws_kernel[(programs, )](
        x2, w_desc, y, sw, bias if bias is not None else sw, down if form else x2,
        c_slot(ext, r) if form else wt, m, n, x2.stride(0), y.stride(0), down.stride(0) if form else 0,
        float(hscale), float(levels), tps, wt.shape[1] - k, r, K=k, HAS_BIAS=bias is not None, LRB=form,
        STAGES=stages, QUANT_REGS=quant_regs, num_warps=4)
