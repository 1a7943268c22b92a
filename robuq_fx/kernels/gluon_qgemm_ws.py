"""Quantization inside the GEMM, warp-specialized (issue 20): y = Q_a(x H) Q_w^T s_x s_w [+ bias] in one persistent
Gluon kernel for Hopper, the codes never leaving shared memory.

`gluon_qgemm.py` (v0) quantizes a row block and then multiplies it in the same warps: the tensor cores idle through
every quantization (H200: 0.60x bf16 at M = 16384, docs/gpu.md). Here three partitions of each program run side by
side, handing work over through mbarriers:

- the quantizer (4 warps): for each work item, Q_a(x H) of its BM = 64 rows into one of two code buffers
  ([K / 128, 64, 128] fp8 each; 144 KB for both at K = 1152) and s_x into shared memory -- the butterflies,
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

v1 scope: symmetric absmax activations A <= 4, Hadamard block 128, K a multiple of 128 up to 1152, no low-rank
branch, no asymmetric terms (W4A4+H / W1.58A4+H's every DiT-XL/2 layer but fc2). Opt-in,
`ROBUQ_FP8_FUSED_QUANT=ws`, until its GPU tests pass and the dispatch sweep times it.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .gluon_act_quant import _maxf, _piece, _round_quotient, _scale_of
from .gluon_fp8_gemm import _instr_n, _warps

CONFIGS = [  # (BN, STAGES) of the weight ring, the quantizer partition's registers; BM = 64 rows, BK = 128,
    (128, 4, 192),  # 4 + 4 + 1 warps. No spills offline (sm_90); BN = 256 spilled the MMA partition's accumulator
    (64, 6, 232),
]
MAX_K = 1152
BM = gl.constexpr(64)
BK = gl.constexpr(128)
QUANT_WARPS = gl.constexpr(4)


@gluon.jit
def _item(item, n_groups, n_tiles, TPS):
    """(row block, first N tile, number of N tiles) of work item `item`."""
    t0 = (item % n_groups) * TPS
    return item // n_groups, t0, gl.minimum(n_tiles - t0, TPS)


@gluon.jit
def _load_partition(x_ptr, w_desc, a_bufs, sx_smem, w_bufs, bars, M, N, stride_xm, hscale, levels, TPS):
    """The weight tiles of every item's N tiles, k-step by k-step, into the ring (one warp). (A worker partition's
    arguments arrive as runtime values: its compile-time sizes come from the shared buffers' shapes.)"""
    a_ready, a_empty, w_ready, w_empty = bars
    NKB: gl.constexpr = a_bufs.type.shape[0] // 2
    STAGES: gl.constexpr = w_bufs.type.shape[0]
    BN: gl.constexpr = w_bufs.type.shape[1]
    n_tiles = gl.cdiv(N, BN)
    n_groups = gl.cdiv(n_tiles, TPS)
    total = gl.cdiv(M, BM) * n_groups
    it = 0
    for item in range(gl.program_id(0), total, gl.num_programs(0)):
        mt, t0, nt = _item(item, n_groups, n_tiles, TPS)
        for j in range(nt * NKB):
            slot = it % STAGES
            mbarrier.wait(w_empty.index(slot), ((it // STAGES) & 1) ^ 1)  # freed (the first round passes)
            mbarrier.expect(w_ready.index(slot), w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [(t0 + j // NKB) * BN, (j % NKB) * BK], w_ready.index(slot),
                                            w_bufs.index(slot))
            it += 1


@gluon.jit
def _quant_partition(x_ptr, w_desc, a_bufs, sx_smem, w_bufs, bars, M, N, stride_xm, hscale, levels, TPS):
    """Q_a(x H) of every item's row block into code buffer i % 2, s_x beside it (4 warps): pass 1 the row absmax
    over the rotated 128-column chunks, pass 2 rotates again and stores the codes chunk by chunk."""
    a_ready, a_empty, w_ready, w_empty = bars
    NKB: gl.constexpr = a_bufs.type.shape[0] // 2
    BN: gl.constexpr = w_bufs.type.shape[1]
    # a (64, 128) chunk: 64 contiguous columns a thread, two lanes a row, 16 rows a warp (v0's layout on 4 warps)
    ql: gl.constexpr = gl.BlockedLayout([1, 64], [16, 2], [QUANT_WARPS, 1], [1, 0])
    hs = hscale.to(gl.float32)
    lv = levels.to(gl.float32)
    n_tiles = gl.cdiv(N, BN)
    n_groups = gl.cdiv(n_tiles, TPS)
    total = gl.cdiv(M, BM) * n_groups
    i = 0
    for item in range(gl.program_id(0), total, gl.num_programs(0)):
        mt, t0, nt = _item(item, n_groups, n_tiles, TPS)
        buf = i % 2
        rows = (mt * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, ql))).to(gl.int64)
        rmask = rows < M
        amax = gl.zeros((BM, ), gl.float32, gl.SliceLayout(1, ql))
        for c in gl.static_range(NKB):  # pass 1 before waiting for the buffer: it reads x only
            y = _piece(x_ptr, rows, rmask, stride_xm, hs, c * BK, BK, BM, 6, ql).to(gl.float32)
            amax = gl.maximum(amax, gl.reduce(gl.abs(y), 1, _maxf))
        s, lo, safe, rcp = _scale_of(-amax, amax, lv, True)
        mbarrier.wait(a_empty.index(buf), ((i // 2) & 1) ^ 1)  # the MMA partition is done with this buffer
        for c in gl.static_range(NKB):
            xh = _piece(x_ptr, rows, rmask, stride_xm, hs, c * BK, BK, BM, 6, ql)
            q = _round_quotient(xh.to(gl.float32), gl.expand_dims(safe, 1), gl.expand_dims(rcp, 1))
            a_bufs.index(buf * NKB + c).store(q.to(gl.float8e4nv))
        sx_smem.index(buf).store(s)
        fence_async_shared()  # the stores, visible to the wgmma's async proxy
        mbarrier.arrive(a_ready.index(buf), count=1)
        i += 1


@gluon.jit
def _mma_partition(a_bufs, sx_smem, w_bufs, bars, y_ptr, sw_ptr, bias_ptr, M, N, stride_ym, TPS,
                   K: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
                   NW: gl.constexpr):
    """fp8 wgmma over an item's codes and the ring, the epilogue after each N tile (the default partition)."""
    a_ready, a_empty, w_ready, w_empty = bars
    NKB: gl.constexpr = K // BK
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=_warps(BM, NW),
                                                  instr_shape=[16, _instr_n(BN, NW, BM), 32])
    n_tiles = gl.cdiv(N, BN)
    n_groups = gl.cdiv(n_tiles, TPS)
    total = gl.cdiv(M, BM) * n_groups
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
                acc = warpgroup_mma(a_bufs.index(buf * NKB + kb), w_bufs.index(slot).permute((1, 0)), acc,
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
def qgemm_ws_kernel(x_ptr, w_desc, y_ptr, sw_ptr, bias_ptr, M, N, stride_xm, stride_ym, hscale, levels, TPS,
                    K: gl.constexpr, HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, QUANT_REGS: gl.constexpr,
                    num_warps: gl.constexpr):
    BN: gl.constexpr = w_desc.block_type.shape[0]
    NKB: gl.constexpr = K // BK
    a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2 * NKB, BM, BK],
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
    worker = (x_ptr, w_desc, a_bufs, sx_smem, w_bufs, bars, M, N, stride_xm, hscale, levels, TPS)
    gl.warp_specialize([
        (_mma_partition, (a_bufs, sx_smem, w_bufs, bars, y_ptr, sw_ptr, bias_ptr, M, N, stride_ym, TPS, K, BN,
                          STAGES, HAS_BIAS, num_warps)),
        (_load_partition, worker),
        (_quant_partition, worker),
    ], [1, QUANT_WARPS], [24, QUANT_REGS])


def supported(x, k: int, block: int, a_bits: int, sym: bool, clip: str, rank: int) -> str | None:
    """Why this kernel cannot take the call, or None (rank: the low-rank branch's, 0 without one)."""
    if not (sym and clip == "absmax" and block == 128 and a_bits <= 4):
        return "the warp-specialized kernel takes symmetric absmax A<=4 with Hadamard block 128"
    if k % 128 or k > MAX_K:
        return f"in_features={k}: the warp-specialized kernel takes multiples of 128 up to {MAX_K}"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"activation dtype {x.dtype}"
    if rank:
        return f"low-rank branch of rank {rank}: the warp-specialized kernel takes none (v1)"
    return None


def work_split(m: int, n: int, bn: int, sms: int) -> tuple[int, int]:
    """(N tiles an item, programs): N split so that items about fill `sms` where the 64-row blocks alone do not
    (each item quantizes its row block again), one program an SM at most."""
    m_tiles, n_tiles = -(-m // 64), -(-n // bn)
    split = max(1, min(n_tiles, sms // m_tiles))
    tps = -(-n_tiles // split)
    return tps, min(sms, m_tiles * -(-n_tiles // tps))


def launch_qgemm_ws(x2, w8, y, sw, bias, hscale: float, levels: float, cfg=None, sms: int | None = None):
    """y (M, N) = Q_a(x2 H) Q_w^T s_x s_w [+ bias]; x2 (M, K) 16-bit with unit column stride, w8 (N, K) fp8 codes
    with 16-byte aligned rows, sw (N,) fp32, bias (N,) or None. sms: programs at most (default: the GPU's SMs)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    bn, stages, quant_regs = cfg or CONFIGS[0]
    n, k = w8.shape
    m = x2.shape[0]
    w_desc = TensorDescriptor(w8, [n, k], [w8.stride(0), 1], [bn, 128],
                              gl.NVMMASharedLayout.get_default_for([bn, 128], gl.float8e4nv))
    sms = sms or torch.cuda.get_device_properties(x2.device).multi_processor_count
    tps, programs = work_split(m, n, bn, sms)
    qgemm_ws_kernel[(programs, )](
        x2, w_desc, y, sw, bias if bias is not None else sw, m, n, x2.stride(0), y.stride(0), float(hscale),
        float(levels), tps, K=k, HAS_BIAS=bias is not None, STAGES=stages, QUANT_REGS=quant_regs, num_warps=4)
