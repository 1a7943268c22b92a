"""Quantization inside the GEMM, in Gluon for Hopper (issue 20): x (M, K) bf16 -> y = Q_a(x H) Q_w^T in one kernel.

A program owns BM = 128 rows of x for a run of N tiles (all of them where the row blocks alone fill the GPU; at
small M grid axis 1 splits N, each program quantizing its row block again: at M = 1024 one program per row block
ran 8 programs on 132 SMs, 0.08x bf16 on the H200). It first quantizes its rows into shared memory, never writing the
codes to HBM: pass 1 rotates each 128-column chunk (x H_128, the butterflies of `gluon_act_quant._piece`) and
reduces the row absmax, pass 2 rotates again and stores the codes (fp8) chunk by chunk into a [K / 128, BM, 128]
shared buffer (128 KB at K = 1024, 144 KB at K = 1152), then a TMA-fed fp8 wgmma loop streams the weight tiles
through a ring of STAGES slots, for one N tile after another, with the epilogue s_x s_w acc [+ bias] after each.
The codes and scales are those of `act_quant` (same butterflies up to the order of exact fp32 sums, same IEEE scale
and Markstein quotient), so the output equals the two-kernel path's where its GEMM is exact (|q| <= 15).

The low-rank branch (issue 17 item 3's first option): while pass 2 holds a rotated chunk, it goes to shared memory
next to the same columns of B, and a bf16 wgmma accumulates t = (x H) B^T (the QAT graph's own formulation; the
two-kernel path multiplies x by a bf16 B H instead); t, rounded to x's dtype, stays in shared memory, and each N
tile's epilogue adds t A^T with one more wgmma onto the scaled accumulator.

v0 scope: symmetric absmax activations, Hadamard block 128, K a multiple of 128 up to 1152 (the codes of a row block
must fit in shared memory next to the weight ring), a branch of rank <= 64 or none, no asymmetric terms: every layer
of `dit` and of `dit-xl-2-robuq` but fc2 (K = 4608). Opt-in (`ROBUQ_FP8_FUSED_QUANT=1`) until its GPU tests pass
and `bench_linear` times it.

Cost model, as a check of the design: each program streams all of W (N x K fp8) from L2, so at M = 16384 the
weights cross L2 -> SM M / BM = 128 times (512 MB for qkv, the same order as a 128 x 256-tile GEMM's A and B
traffic), while x is read twice per program (the second pass mostly from L2) instead of once plus a codes round trip
through HBM.
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
from .triton_launch import rank_pad

CONFIGS = [  # (BN, STAGES); BM = 128 rows on 8 warps, BK = 128 (one Hadamard block a k-step)
    (128, 3),
    (64, 4),
]
MAX_K = 1152


@gluon.jit
def _lrb_tile(ptr, off, n_rows, stride, R, ROWS: gl.constexpr, COLS: gl.constexpr, col0, layout: gl.constexpr):
    """(ROWS, COLS) 16-bit tile [off.., col0..] of a (n_rows, R)-column matrix, zero past its rows and R columns."""
    rr = off + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    cc = col0 + gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))
    return gl.load(ptr + gl.expand_dims(rr.to(gl.int64) * stride, 1) + gl.expand_dims(cc, 0),
                   mask=gl.expand_dims(rr < n_rows, 1) & gl.expand_dims(cc < R, 0), other=0.0)


@gluon.jit(do_not_specialize=["M"])
def qgemm_fused_kernel(x_ptr, b_desc, y_ptr, sw_ptr, bias_ptr, down_ptr, up_ptr, M, N, stride_xm, stride_ym,
                       stride_dn, stride_un, R, hscale, levels, TPS,
                       K: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_LRB: gl.constexpr, RP: gl.constexpr,
                       STAGES: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = 128
    BK: gl.constexpr = 128
    BN: gl.constexpr = b_desc.block_type.shape[0]
    NKB: gl.constexpr = K // BK
    hscale = hscale.to(gl.float32)
    levels = levels.to(gl.float32)
    off_m = gl.program_id(0) * BM

    # 1. Q_a(x H) of the row block into shared memory. A (BM, 128) chunk: 64 contiguous columns a thread, two lanes a
    # row (in-thread butterflies on bits 0-5, one shuffle stage on bit 6), 16 rows a warp.
    ql: gl.constexpr = gl.BlockedLayout([1, 64], [16, 2], [num_warps, 1], [1, 0])
    rows = (off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, ql))).to(gl.int64)
    rmask = rows < M
    amax = gl.zeros((BM, ), gl.float32, gl.SliceLayout(1, ql))
    for c in gl.static_range(NKB):
        y = _piece(x_ptr, rows, rmask, stride_xm, hscale, c * BK, BK, BM, 6, ql).to(gl.float32)
        amax = gl.maximum(amax, gl.reduce(gl.abs(y), 1, _maxf))
    s, lo, safe, rcp = _scale_of(-amax, amax, levels, True)
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.float8e4nv)
    a_smem = gl.allocate_shared_memory(gl.float8e4nv, [NKB, BM, BK], a_layout)
    if HAS_LRB:  # t = (x H) B^T from the rotated chunks while they are quantized (the QAT graph's own formulation)
        tl_: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=_warps(BM, num_warps),
                                                      instr_shape=[16, RP, 16])
        t_acc = gl.zeros((BM, RP), gl.float32, tl_)
        dt: gl.constexpr = x_ptr.dtype.element_ty
        xh_smem = gl.allocate_shared_memory(dt, [BM, BK], gl.NVMMASharedLayout.get_default_for([BM, BK], dt))
        bc_smem = gl.allocate_shared_memory(dt, [RP, BK], gl.NVMMASharedLayout.get_default_for([RP, BK], dt))
        bl: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
    for c in gl.static_range(NKB):
        xh = _piece(x_ptr, rows, rmask, stride_xm, hscale, c * BK, BK, BM, 6, ql)
        q = _round_quotient(xh.to(gl.float32), gl.expand_dims(safe, 1), gl.expand_dims(rcp, 1))
        a_smem.index(c).store(q.to(gl.float8e4nv))
        if HAS_LRB:
            gl.thread_barrier()  # the previous chunk's wgmma (both warpgroups) has read xh_smem and bc_smem
            xh_smem.store(xh)
            bc_smem.store(_lrb_tile(down_ptr, 0, R, stride_dn, K, RP, BK, c * BK, bl).to(dt))
            fence_async_shared()
            gl.thread_barrier()
            t_acc = warpgroup_mma(xh_smem, bc_smem.permute((1, 0)), t_acc)
    fence_async_shared()  # the threads' stores, visible to the wgmma's async proxy
    gl.thread_barrier()  # and every warp's, before any warp's wgmma reads them
    if HAS_LRB:  # t rounded to the input dtype, as the layer's F.linear writes it, kept for every N tile's epilogue
        t_smem = gl.allocate_shared_memory(dt, [BM, RP], gl.NVMMASharedLayout.get_default_for([BM, RP], dt),
                                           t_acc.to(dt))
        u_smem = gl.allocate_shared_memory(dt, [BN, RP], gl.NVMMASharedLayout.get_default_for([BN, RP], dt))
        ul: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (RP // 8), RP // 8], [num_warps, 1], [1, 0])
        lrb_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=_warps(BM, num_warps),
                                                          instr_shape=[16, _instr_n(BN, num_warps, BM), 16])

    # 2. the weight tiles through a ring, one N tile after another; epilogue after each tile's last k-step
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=_warps(BM, num_warps),
                                                  instr_shape=[16, _instr_n(BN, num_warps, BM), 32])
    orow = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    omask = orow < M
    sx = gl.convert_layout(s, gl.SliceLayout(1, mma))
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(STAGES):
        mbarrier.init(bars.index(j), count=1)
    nbytes: gl.constexpr = b_desc.block_type.nbytes
    # this program's N tiles: TPS of them from tile0 (grid axis 1 splits N where M alone gives too few programs)
    tile0 = gl.program_id(1) * TPS
    total = gl.maximum(gl.minimum(gl.cdiv(N, BN) - tile0, TPS), 0) * NKB
    for j in gl.static_range(STAGES - 1):
        first = j < total
        mbarrier.expect(bars.index(j), nbytes, pred=first)
        tma.async_copy_global_to_shared(b_desc, [(tile0 + j // NKB) * BN, (j % NKB) * BK], bars.index(j),
                                        b_bufs.index(j), pred=first)
    acc = gl.zeros((BM, BN), dtype=gl.float32, layout=mma)
    for step in range(total):
        slot = step % STAGES
        kb = step % NKB
        mbarrier.wait(bars.index(slot), (step // STAGES) & 1)
        acc = warpgroup_mma(a_smem.index(kb), b_bufs.index(slot).permute((1, 0)), acc, use_acc=kb != 0,
                            is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        nxt = step + STAGES - 1
        sn = nxt % STAGES
        more = nxt < total
        mbarrier.expect(bars.index(sn), nbytes, pred=more)
        tma.async_copy_global_to_shared(b_desc, [(tile0 + nxt // NKB) * BN, (nxt % NKB) * BK], bars.index(sn),
                                        b_bufs.index(sn), pred=more)
        if kb == NKB - 1:  # this N tile is complete
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            cols = (tile0 + step // NKB) * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
            cmask = cols < N
            out = acc * gl.expand_dims(sx, 1) * gl.expand_dims(gl.load(sw_ptr + cols, mask=cmask, other=0.0), 0)
            if HAS_BIAS:
                out += gl.expand_dims(gl.load(bias_ptr + cols, mask=cmask, other=0.0).to(gl.float32), 0)
            if HAS_LRB:  # + t A^T: one wgmma onto the scaled accumulator (as gluon_fp8_gemm's epilogue)
                gl.thread_barrier()  # the previous tile's wgmma has read u_smem
                u_smem.store(_lrb_tile(up_ptr, (tile0 + step // NKB) * BN, N, stride_un, R, BN, RP, 0, ul).to(dt))
                fence_async_shared()
                gl.thread_barrier()
                out = gl.convert_layout(warpgroup_mma(t_smem, u_smem.permute((1, 0)), gl.convert_layout(out, lrb_mma)),
                                        mma)
            ptrs = y_ptr + gl.expand_dims(orow.to(gl.int64) * stride_ym, 1) + gl.expand_dims(cols, 0)
            gl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=gl.expand_dims(omask, 1) & gl.expand_dims(cmask, 0))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for j in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(j))


def call_reason(x, k: int, block: int, a_bits: int, sym: bool, clip: str) -> str | None:
    """What the quantize-in-GEMM kernels (this one and gluon_qgemm_ws) do not take in a call, or None."""
    if not (sym and clip == "absmax" and block == 128 and a_bits <= 4):
        return "the fused kernel takes symmetric absmax A<=4 with Hadamard block 128"
    if k % 128 or k > MAX_K:
        return f"in_features={k}: the fused kernel takes multiples of 128 up to {MAX_K}"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"activation dtype {x.dtype}"
    return None


def supported(x, k: int, block: int, a_bits: int, sym: bool, clip: str, rank: int) -> str | None:
    """Why this kernel cannot take the call, or None (rank: the low-rank branch's, 0 without one)."""
    why = call_reason(x, k, block, a_bits, sym, clip)
    if why is None and rank > 64:
        why = f"low-rank branch of rank {rank}: the fused kernel takes up to 64"
    return why


def n_split(m: int, n: int, bn: int, sms: int) -> int:
    """Programs along N per 128-row block: enough for about one wave of `sms` programs (each quantizes its row block
    again: the x reads grow with the split, the weight stream is shared out), 1 where the row blocks fill the GPU."""
    m_tiles, n_tiles = -(-m // 128), -(-n // bn)
    return max(1, min(n_tiles, sms // m_tiles))


def launch_qgemm_fused(x2, w8, y, sw, bias, hscale: float, levels: float, down=None, up=None, cfg=None,
                       split: int | None = None):
    """y (M, N) = Q_a(x2 H) Q_w^T s_x s_w [+ bias] [+ ((x2 H) B^T) A^T]; x2 (M, K) 16-bit with unit column stride,
    w8 (N, K) fp8 codes with 16-byte aligned rows, sw (N,) fp32, bias (N,) or None, down B (r, K) / up A (N, r) in
    x2's dtype or None (r <= 64). split: programs along N per row block (default `n_split`)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    lrb = down is not None
    bn, stages = cfg or CONFIGS[1 if lrb else 0]  # the branch's buffers need the narrower ring at K = 1152
    n, k = w8.shape
    m = x2.shape[0]
    r = down.shape[0] if lrb else 0
    b_desc = TensorDescriptor(w8, [n, k], [w8.stride(0), 1], [bn, 128],
                              gl.NVMMASharedLayout.get_default_for([bn, 128], gl.float8e4nv))
    n_tiles = triton.cdiv(n, bn)
    split = split or n_split(m, n, bn, torch.cuda.get_device_properties(x2.device).multi_processor_count)
    tps = triton.cdiv(n_tiles, split)
    qgemm_fused_kernel[(triton.cdiv(m, 128), triton.cdiv(n_tiles, tps))](
        x2, b_desc, y, sw, bias if bias is not None else sw, down if lrb else x2, up if lrb else x2, m, n,
        x2.stride(0), y.stride(0), down.stride(0) if lrb else 0, up.stride(0) if lrb else 0, r, float(hscale),
        float(levels), tps, K=k, HAS_BIAS=bias is not None, HAS_LRB=lrb, RP=rank_pad(r), STAGES=stages, num_warps=8)
