"""The fp8 qlinear GEMM with its epilogue, in Gluon for Hopper (issue 17 item 3: the low-rank branch at GEMM speed).

Same contract as `triton_fp8_kernels.fp8_gemm_kernel`: codes a (M, K) fp8 x weight codes b (N, K) fp8 -> y (M, N)
= s_x s_w (a b^T) [+ lo c] [+ bias] [+ t A^T], the integer products accumulated in fp32 (exact: |q| <= 15), the
epilogue in the same order. Opt-in (`ROBUQ_FP8_GEMM_KERNEL=gluon`) until its GPU tests pass and `bench_linear`
times it against the Triton kernels and `_scaled_mm`.

Why: the LRB layers of the paper's policy run the Triton GEMM at ~64% of `_scaled_mm` (docs/gpu.md), and they are
the largest cost left in its forward. Triton decides the pipelining itself; here it is explicit: A and B tiles come
through TMA into a ring of STAGES shared-memory slots, each with an mbarrier, and the wgmma of step i runs
asynchronously while the loads of steps i + 1 .. i + STAGES - 1 are in flight (one wgmma kept outstanding: after
issuing step i, waiting for at most one in flight completes step i - 1, whose slot then takes step
i + STAGES - 1). The epilogue scales the fp32 accumulator in registers, and the low-rank term t A^T is one more
wgmma (bf16, K = the rank padded to 16) accumulating onto it, so y is rounded to bf16 once.
"""
from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .triton_launch import rank_pad

CONFIGS = [  # (BM, BN, BK, STAGES, GROUP_M, num_warps); offline sm_90: no spills except BN = 256 with asym + LRB
    (128, 128, 128, 4, 8, 8),
    (128, 256, 128, 3, 8, 8),
    (64, 128, 128, 4, 8, 4),
    (64, 256, 128, 4, 8, 4),
]


@gluon.constexpr_function
def _instr_n(bn, num_warps, bm):
    """The widest wgmma N that divides BN for this warp tiling (instruction shape [16, n, k])."""
    m_reps = triton.cdiv(bm, 16)
    n_reps = triton.cdiv(num_warps, m_reps)
    max_n = max(bn // n_reps, 8)
    n = 256
    while n > max_n or bn % n:
        n -= 8
    return n


@gluon.constexpr_function
def _warps(bm, num_warps):
    w = [4, 1]
    while w[0] * w[1] != num_warps:
        if bm > 16 * w[0]:
            w[0] *= 2
        else:
            w[1] *= 2
    return w


@gluon.jit(do_not_specialize=["M"])
def fp8_gemm_gluon_kernel(a_desc, b_desc, y_ptr, sx_ptr, sw_ptr, bias_ptr, lo_ptr, cs_ptr, t_ptr, up_ptr,
                          M, N, stride_ym, stride_tm, stride_un, R,
                          RP: gl.constexpr, HAS_BIAS: gl.constexpr, ASYM: gl.constexpr, HAS_LRB: gl.constexpr,
                          STAGES: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    K = a_desc.shape[1]
    # grouped program order (GROUP_M row blocks share the B tiles they stream through L2)
    pid = gl.program_id(0)
    num_m = gl.cdiv(M, BM)
    num_n = gl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = gl.minimum(num_m - first_m, GROUP_M)
    off_m = (first_m + (pid % in_group) % size_m) * BM
    off_n = ((pid % in_group) // size_m) * BN

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(STAGES):
        mbarrier.init(bars.index(j), count=1)
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    n_k = gl.cdiv(K, BK)
    for j in gl.static_range(STAGES - 1):  # the ring's first STAGES - 1 slots
        first = j < n_k
        mbarrier.expect(bars.index(j), nbytes, pred=first)
        tma.async_copy_global_to_shared(a_desc, [off_m, j * BK], bars.index(j), a_bufs.index(j), pred=first)
        tma.async_copy_global_to_shared(b_desc, [off_n, j * BK], bars.index(j), b_bufs.index(j), pred=first)

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=_warps(BM, num_warps),
                                                  instr_shape=[16, _instr_n(BN, num_warps, BM), 32])
    acc = gl.zeros((BM, BN), dtype=gl.float32, layout=mma)
    for i in range(n_k):
        s = i % STAGES
        mbarrier.wait(bars.index(s), (i // STAGES) & 1)
        acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))  # step i - 1 is done: its slot is free
        nxt = i + STAGES - 1
        sn = nxt % STAGES
        ok = nxt < n_k
        mbarrier.expect(bars.index(sn), nbytes, pred=ok)
        tma.async_copy_global_to_shared(a_desc, [off_m, nxt * BK], bars.index(sn), a_bufs.index(sn), pred=ok)
        tma.async_copy_global_to_shared(b_desc, [off_n, nxt * BK], bars.index(sn), b_bufs.index(sn), pred=ok)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    for j in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(j))

    # epilogue, as triton_fp8_kernels.scale_bias / _epilogue: s_x s_w acc [+ lo c] [+ bias] [+ t A^T]
    rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
    rmask = rows < M
    cmask = cols < N
    sx = gl.load(sx_ptr + rows, mask=rmask, other=0.0)
    sw = gl.load(sw_ptr + cols, mask=cmask, other=0.0)
    acc = acc * gl.expand_dims(sx, 1) * gl.expand_dims(sw, 0)
    if ASYM:
        lo = gl.load(lo_ptr + rows, mask=rmask, other=0.0)
        acc += gl.expand_dims(lo, 1) * gl.expand_dims(gl.load(cs_ptr + cols, mask=cmask, other=0.0), 0)
    if HAS_BIAS:
        acc += gl.expand_dims(gl.load(bias_ptr + cols, mask=cmask, other=0.0).to(gl.float32), 0)
    if HAS_LRB:
        # t (BM, RP) and A (BN, RP) through shared memory, zero-padded past the rank; one bf16 wgmma onto acc
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (RP // 8), RP // 8], [num_warps, 1], [1, 0])
        rr = gl.arange(0, RP, layout=gl.SliceLayout(0, ld))
        tr = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, ld))
        ur = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, ld))
        rk = gl.expand_dims(rr < R, 0)
        t = gl.load(t_ptr + gl.expand_dims(tr.to(gl.int64) * stride_tm, 1) + gl.expand_dims(rr, 0),
                    mask=gl.expand_dims(tr < M, 1) & rk, other=0.0)
        u = gl.load(up_ptr + gl.expand_dims(ur.to(gl.int64) * stride_un, 1) + gl.expand_dims(rr, 0),
                    mask=gl.expand_dims(ur < N, 1) & rk, other=0.0)
        dt: gl.constexpr = t_ptr.dtype.element_ty  # the input's 16-bit dtype (bf16 or fp16)
        t_smem = gl.allocate_shared_memory(dt, [BM, RP], gl.NVMMASharedLayout.get_default_for([BM, RP], dt), t)
        u_smem = gl.allocate_shared_memory(dt, [BN, RP], gl.NVMMASharedLayout.get_default_for([BN, RP], dt),
                                           u.to(dt))
        fence_async_shared()  # the threads' stores, visible to the wgmma's async proxy
        gl.thread_barrier()  # and every warp's, before the wgmma reads them
        mma16: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=_warps(BM, num_warps),
                                                        instr_shape=[16, _instr_n(BN, num_warps, BM), 16])
        acc = warpgroup_mma(t_smem, u_smem.permute((1, 0)), gl.convert_layout(acc, mma16))
        acc = gl.convert_layout(acc, mma)
    ptrs = y_ptr + gl.expand_dims(rows.to(gl.int64) * stride_ym, 1) + gl.expand_dims(cols, 0)
    gl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=gl.expand_dims(rmask, 1) & gl.expand_dims(cmask, 0))


def launch_fp8_gemm_gluon(a, b, c, sx, sw, bias, lo, cs, t, up, m, cfg):
    """As `triton_fp8_kernels.launch_fp8_gemm` (same operands), cfg one of CONFIGS. a (>= m, K) and b (N, K) fp8
    with 16-byte aligned rows (TMA), c (m, N); t (m, r) / up (N, r) bf16 or None."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    bm, bn, bk, stages, gm, warps = cfg
    n, k = b.shape
    r = 0 if t is None else t.shape[1]
    rp = rank_pad(r)
    a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [bm, bk],
                              gl.NVMMASharedLayout.get_default_for([bm, bk], gl.float8e4nv))
    b_desc = TensorDescriptor(b, [n, k], [b.stride(0), 1], [bn, bk],
                              gl.NVMMASharedLayout.get_default_for([bn, bk], gl.float8e4nv))
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    fp8_gemm_gluon_kernel[grid](
        a_desc, b_desc, c, sx, sw, bias if bias is not None else sx, lo if lo is not None else sx,
        cs if cs is not None else sw, t if t is not None else c, up if up is not None else c,
        m, n, c.stride(0), t.stride(0) if t is not None else 0, up.stride(0) if up is not None else 0, r,
        RP=rp, HAS_BIAS=bias is not None, ASYM=lo is not None, HAS_LRB=t is not None, STAGES=stages, GROUP_M=gm,
        num_warps=warps)
