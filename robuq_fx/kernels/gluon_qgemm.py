"""Quantization inside the GEMM, in Gluon for Hopper (issue 20): x (M, K) bf16 -> y = Q_a(x H) Q_w^T in one kernel.

A program owns BM = 128 rows of x for every N tile. It first quantizes its rows into shared memory, never writing the
codes to HBM: pass 1 rotates each 128-column chunk (x H_128, the butterflies of `gluon_act_quant._piece`) and
reduces the row absmax, pass 2 rotates again and stores the codes (fp8) chunk by chunk into a [K / 128, BM, 128]
shared buffer (128 KB at K = 1024, 144 KB at K = 1152), then a TMA-fed fp8 wgmma loop streams the weight tiles
through a ring of STAGES slots, for one N tile after another, with the epilogue s_x s_w acc [+ bias] after each.
The codes and scales are those of `act_quant` (same butterflies up to the order of exact fp32 sums, same IEEE scale
and Markstein quotient), so the output equals the two-kernel path's where its GEMM is exact (|q| <= 15).

v0 scope: symmetric absmax activations, Hadamard block 128, K a multiple of 128 up to 1152 (the codes of a row block
must fit in shared memory next to the weight ring), no low-rank branch, no asymmetric terms: the W4A4+H layers of
`dit` except fc2 (K = 4608). Opt-in (`ROBUQ_FP8_FUSED_QUANT=1`) until its GPU tests pass and `bench_linear` times it.

Cost model, as a check of the design: each program streams all of W (N x K fp8) from L2, so at M = 16384 the
weights cross L2 -> SM M / BM = 128 times (512 MB for qkv, the same order as a 128 x 256-tile GEMM's A and B
traffic), while x is read twice per program (the second pass mostly from L2) instead of once plus a codes round trip
through HBM.
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .gluon_act_quant import _maxf, _piece, _round_quotient, _scale_of
from .gluon_fp8_gemm import _instr_n, _warps

CONFIGS = [  # (BN, STAGES); BM = 128 rows on 8 warps, BK = 128 (one Hadamard block a k-step)
    (128, 3),
    (64, 4),
]
MAX_K = 1152


@gluon.jit(do_not_specialize=["M"])
def qgemm_fused_kernel(x_ptr, b_desc, y_ptr, sw_ptr, bias_ptr, M, N, stride_xm, stride_ym, hscale, levels,
                       K: gl.constexpr, HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
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
    for c in gl.static_range(NKB):
        y = _piece(x_ptr, rows, rmask, stride_xm, hscale, c * BK, BK, BM, 6, ql).to(gl.float32)
        q = _round_quotient(y, gl.expand_dims(safe, 1), gl.expand_dims(rcp, 1))
        a_smem.index(c).store(q.to(gl.float8e4nv))
    fence_async_shared()  # the threads' stores, visible to the wgmma's async proxy
    gl.thread_barrier()  # and every warp's, before any warp's wgmma reads them

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
    total = gl.cdiv(N, BN) * NKB
    for j in gl.static_range(STAGES - 1):
        first = j < total
        mbarrier.expect(bars.index(j), nbytes, pred=first)
        tma.async_copy_global_to_shared(b_desc, [(j // NKB) * BN, (j % NKB) * BK], bars.index(j), b_bufs.index(j),
                                        pred=first)
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
        tma.async_copy_global_to_shared(b_desc, [(nxt // NKB) * BN, (nxt % NKB) * BK], bars.index(sn),
                                        b_bufs.index(sn), pred=more)
        if kb == NKB - 1:  # this N tile is complete
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            cols = (step // NKB) * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
            cmask = cols < N
            out = acc * gl.expand_dims(sx, 1) * gl.expand_dims(gl.load(sw_ptr + cols, mask=cmask, other=0.0), 0)
            if HAS_BIAS:
                out += gl.expand_dims(gl.load(bias_ptr + cols, mask=cmask, other=0.0).to(gl.float32), 0)
            ptrs = y_ptr + gl.expand_dims(orow.to(gl.int64) * stride_ym, 1) + gl.expand_dims(cols, 0)
            gl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=gl.expand_dims(omask, 1) & gl.expand_dims(cmask, 0))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for j in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(j))


def supported(x, k: int, block: int, a_bits: int, sym: bool, clip: str, lrb: bool) -> str | None:
    """Why this kernel cannot take the call, or None."""
    if not (sym and clip == "absmax" and block == 128 and not lrb and a_bits <= 4):
        return "the fused kernel takes symmetric absmax A<=4, Hadamard block 128, no low-rank branch"
    if k % 128 or k > MAX_K:
        return f"in_features={k}: the fused kernel takes multiples of 128 up to {MAX_K}"
    if x.dtype not in (x.new_empty(0).bfloat16().dtype, x.new_empty(0).half().dtype):
        return f"activation dtype {x.dtype}"
    return None


def launch_qgemm_fused(x2, w8, y, sw, bias, hscale: float, levels: float, cfg=CONFIGS[0]):
    """y (M, N) = Q_a(x2 H) Q_w^T s_x s_w [+ bias]; x2 (M, K) 16-bit with unit column stride, w8 (N, K) fp8 codes
    with 16-byte aligned rows, sw (N,) fp32, bias (N,) or None."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    bn, stages = cfg
    n, k = w8.shape
    m = x2.shape[0]
    b_desc = TensorDescriptor(w8, [n, k], [w8.stride(0), 1], [bn, 128],
                              gl.NVMMASharedLayout.get_default_for([bn, 128], gl.float8e4nv))
    qgemm_fused_kernel[(triton.cdiv(m, 128), )](
        x2, b_desc, y, sw, bias if bias is not None else sw, m, n, x2.stride(0), y.stride(0), float(hscale),
        float(levels), K=k, HAS_BIAS=bias is not None, STAGES=stages, num_warps=8)
