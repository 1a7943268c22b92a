"""Triton fp8 GEMM of the Hopper qlinear path (imported lazily by `triton_fp8.py`; importing this module needs
triton; the activation quantizer is in `triton_act_quant.py`).

`fp8_gemm_kernel`: y = (q_x q_w^T) * s_x[m] * s_w[n] [+ lo[m] c[n]] [+ bias[n]] [+ t[m] A^T], fp8 e4m3 tensor-core
    GEMM (fp32 accumulation) with everything after the integer product fused in the epilogue; used for the
    asymmetric and low-rank-branch cases where `torch._scaled_mm` would need extra passes over y.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_act_quant import _input_act, act_code
from .triton_launch import launch, rank_pad
from .triton_rowquant import round_quotient, scale_of


# ----------------------------------------------------------------------------------------------------------------
# fp8 GEMM with fused epilogue

# (BM, BN, BK, GROUP_M, num_warps, num_stages[, early]). Every entry is exercised by
# tests/kernels/test_fp8_gemm_kernels.py on odd M and all DiT-XL/2 shapes; BK must divide K (the path requires
# K % 128 == 0). early: the epilogue's operands (row scales / offsets, t and A) loaded before the K loop, so that
# their latency hides behind it: the LRB epilogue cost +32% over the same GEMM without it on the H200 (214.8 vs
# 162.4 us, qkv, M = 16384) with one program an SM and its loads issued after the last k-step. The sweep
# (bench_linear.py --write-dispatch, with the asymmetric + LRB epilogue) picks per shape and M bucket.
GEMM_CONFIGS = (
    (128, 256, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 4),
    (64, 128, 128, 8, 4, 4),
    (64, 64, 128, 8, 4, 4),
    (128, 256, 128, 8, 8, 3, True),
    (128, 128, 128, 8, 8, 4, True),
    (128, 128, 128, 8, 4, 3, True),  # 112 KiB of shared memory, ~200 registers x 128 threads: two programs an SM,
    (64, 128, 128, 8, 4, 4, True),   # one's epilogue beside the other's K loop (as this one, 108 KiB)
)


@triton.jit
def scale_bias(acc, sx, lo, offs_n, nmask, sw_ptr, cs_ptr, bias_ptr, ASYM: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc (BM, BN) fp32 integer products, the rows' scales sx and offsets lo (BM,) -> s_x s_w acc [+ lo c] [+ bias]:
    the epilogue of every fp8 qlinear kernel (these GEMMs and triton_qgemm_small.py)."""
    sw = tl.load(sw_ptr + offs_n, mask=nmask, other=0.0)
    acc = acc * sx[:, None] * sw[None, :]
    if ASYM:
        acc += lo[:, None] * tl.load(cs_ptr + offs_n, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _epilogue_loads(offs_m, offs_n, M, N, sx_ptr, lo_ptr, t_ptr, up_ptr, stride_tm, stride_un, R, RP: tl.constexpr,
                    ASYM: tl.constexpr, HAS_LRB: tl.constexpr, LOAD_T: tl.constexpr = True):
    """The epilogue's per-row and LRB operands: sx, lo (BM,), t (BM, RP) and A (BN, RP) zero-padded past the rank
    (sx stands in for what the case does not use; for t too where not LOAD_T: the kernel made it)."""
    mmask = offs_m < M
    sx = tl.load(sx_ptr + offs_m, mask=mmask, other=0.0)
    lo = tl.load(lo_ptr + offs_m, mask=mmask, other=0.0) if ASYM else sx
    if HAS_LRB:
        rr = tl.arange(0, RP)
        if LOAD_T:
            t = tl.load(t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + rr[None, :],
                        mask=mmask[:, None] & (rr[None, :] < R), other=0.0)
        else:
            t = sx
        u = tl.load(up_ptr + offs_n[:, None].to(tl.int64) * stride_un + rr[None, :],
                    mask=(offs_n < N)[:, None] & (rr[None, :] < R), other=0.0)
    else:
        t = sx
        u = sx
    return sx, lo, t, u


@triton.jit
def _epilogue_apply(acc, sx, lo, t, u, offs_n, N, sw_ptr, cs_ptr, bias_ptr, HAS_BIAS: tl.constexpr,
                    ASYM: tl.constexpr, HAS_LRB: tl.constexpr):
    acc = scale_bias(acc, sx, lo, offs_n, offs_n < N, sw_ptr, cs_ptr, bias_ptr, ASYM, HAS_BIAS)
    if HAS_LRB:
        acc = tl.dot(t, tl.trans(u), acc)
    return acc


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, sx_ptr, sw_ptr, bias_ptr, lo_ptr, cs_ptr, t_ptr, up_ptr, stride_tm,
              stride_un, R, RP: tl.constexpr, HAS_BIAS: tl.constexpr, ASYM: tl.constexpr, HAS_LRB: tl.constexpr):
    """acc (BM, BN) fp32 integer products -> s_x s_w acc [+ lo c] [+ bias] [+ t A^T] (rows offs_m, columns offs_n)."""
    sx, lo, t, u = _epilogue_loads(offs_m, offs_n, M, N, sx_ptr, lo_ptr, t_ptr, up_ptr, stride_tm, stride_un, R, RP,
                                   ASYM, HAS_LRB)
    return _epilogue_apply(acc, sx, lo, t, u, offs_n, N, sw_ptr, cs_ptr, bias_ptr, HAS_BIAS, ASYM, HAS_LRB)


@triton.jit
def _head_fake_quant(y, BN: tl.constexpr, D: tl.constexpr, HEADS: tl.constexpr, LEVELS: tl.constexpr):
    """y (BM, BN) fp32 (the output rounded to c's dtype) fake-quantized per row and D-column head, symmetric absmax
    with LEVELS levels a side: the columns [j D, (j + 1) D) of the tile for j < HEADS, the row kernel's math step for
    step (triton_rowquant: s = RN(max|y| / LEVELS), q = rint(y / s) correctly rounded, s q); other columns 0."""
    loc = tl.arange(0, BN)
    res = tl.zeros_like(y)
    for j in tl.static_range(HEADS):
        head = (loc >= j * D) & (loc < (j + 1) * D)
        r = tl.max(tl.where(head[None, :], tl.abs(y), 0.0), axis=1)
        s, _, safe, rcp = scale_of(r, r, LEVELS, True)
        res = tl.where(head[None, :], s[:, None] * round_quotient(y, safe[:, None], rcp[:, None]), res)
    return res


@triton.jit(do_not_specialize=["M"])
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, sx_ptr, sw_ptr, bias_ptr, lo_ptr, cs_ptr, t_ptr, up_ptr,
                    M, N, K, stride_am, stride_bn, stride_cm, stride_tm, stride_un, R, dn_ptr, stride_sk,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    RP: tl.constexpr, HAS_BIAS: tl.constexpr, ASYM: tl.constexpr, HAS_LRB: tl.constexpr,
                    EARLY: tl.constexpr = False, DOWN: tl.constexpr = False, OUT_ACT: tl.constexpr = 0,
                    BLOCK_SCALE: tl.constexpr = False, OUT_QUANT: tl.constexpr = 0, NSTEP: tl.constexpr = 0,
                    QLEVELS: tl.constexpr = 127.0):
    """BLOCK_SCALE (`LayerSpec.a_group` = BK): sx_ptr holds one scale per row and K block, block-major (K / BK rows of
    stride_sk: kernels/triton_block_quant.py); each K step's product of codes, exact in fp32, is scaled by its
    block's row scales as it is added (DeepSeek-V3's 1 x 128 activation scaling), and the epilogue applies s_w only.
    OUT_ACT (`triton_act_quant.act_code`: 1 GELU, 2 tanh GELU, 3 its sigmoid form): the layer's output activation
    in the store, computed as the unfused pair computes it (y rounded to c's dtype, GELU in fp32 with ATen's CUDA
    formula, rounded again), so that a GELU after the layer needs no pass of its own (robuq::qlinear's output_act).
    DOWN: the branch's down-projection in the K loop, t = x (B H)^T from x's 16-bit rows (t_ptr, row stride
    stride_tm) and B H (dn_ptr, (R, K) contiguous) beside the codes' product, rounded to x's dtype as
    `triton_lowrank.lrb_down` rounds it, instead of reading a t that kernel wrote (one launch and its wait fewer;
    every N tile re-reads its rows of x, so only for few rows).
    OUT_QUANT = D > 0 (not wired into robuq::qlinear yet; session 17's building block for the attention's q / k / v):
    the output fake-quantized per row and D-column head in the store (`_head_fake_quant`, QLEVELS levels a side), as
    the attention op's row kernel would quantize it after the layer. A tile then covers NSTEP = (BN // D) D columns
    (whole heads: three heads of 72 in a 256-wide tile), the grid steps by NSTEP, and the columns past it are
    computed and not stored."""
    STEP: tl.constexpr = NSTEP if NSTEP else BN  # the columns a tile stores, and where the next one starts
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, STEP)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_am = tl.max_contiguous(tl.multiple_of(offs_m % M, BM), BM)
    ALIGNED: tl.constexpr = BN if STEP == BN else 8  # (whole heads: NSTEP a multiple of 8, as D % 8 == 0)
    offs_n = pid_n * STEP + tl.arange(0, BN)
    offs_bn = tl.max_contiguous(tl.multiple_of(offs_n % N, ALIGNED), ALIGNED)
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + offs_am[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_bn[:, None].to(tl.int64) * stride_bn + offs_k[None, :]
    if EARLY:  # the epilogue's row / LRB operands loaded before the K loop: their latency hidden behind it
        sx, lo, t, u = _epilogue_loads(offs_m, offs_n, M, N, sx_ptr, lo_ptr, t_ptr, up_ptr, stride_tm, stride_un, R,
                                       RP, ASYM, HAS_LRB, not DOWN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if BLOCK_SCALE:
        s_ptrs = sx_ptr + offs_am
    if DOWN:
        rr = tl.arange(0, RP)
        x_ptrs = t_ptr + offs_am[:, None].to(tl.int64) * stride_tm + offs_k[None, :]
        d_ptrs = dn_ptr + rr[:, None] * K + offs_k[None, :]
        tacc = tl.zeros((BM, RP), dtype=tl.float32)
    for _ in range(0, K, BK):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        if BLOCK_SCALE:
            acc += tl.dot(a, tl.trans(b)) * tl.load(s_ptrs)[:, None]
            s_ptrs += stride_sk
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BK
        b_ptrs += BK
        if DOWN:
            xk = tl.load(x_ptrs)
            bk = tl.load(d_ptrs, mask=(rr < R)[:, None], other=0.0)
            tacc = tl.dot(xk, tl.trans(bk), tacc)
            x_ptrs += BK
            d_ptrs += BK

    if not EARLY:
        sx, lo, t, u = _epilogue_loads(offs_m, offs_n, M, N, sx_ptr, lo_ptr, t_ptr, up_ptr, stride_tm, stride_un, R,
                                       RP, ASYM, HAS_LRB, not DOWN)
    if DOWN:
        t = tacc.to(t_ptr.dtype.element_ty)
    if BLOCK_SCALE:  # (the row scales went into the K loop)
        sx = tl.full((BM,), 1.0, tl.float32)
    acc = _epilogue_apply(acc, sx, lo, t, u, offs_n, N, sw_ptr, cs_ptr, bias_ptr, HAS_BIAS, ASYM, HAS_LRB)
    mmask = offs_m < M
    nmask = offs_n < N
    if NSTEP != 0:
        nmask = nmask & (tl.arange(0, BN) < NSTEP)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    out = acc.to(c_ptr.dtype.element_ty)
    if OUT_ACT != 0:
        out = _input_act(out.to(tl.float32), OUT_ACT).to(c_ptr.dtype.element_ty)
    if OUT_QUANT != 0:
        out = _head_fake_quant(out.to(tl.float32), BN, OUT_QUANT, BN // OUT_QUANT,
                               QLEVELS).to(c_ptr.dtype.element_ty)
    tl.store(c_ptrs, out, mask=mmask[:, None] & nmask[None, :])


DOWN_SMEM = 200 * 1024  # shared memory a DOWN program may take (sm_90 has 227 KiB a block)


def acc_per_thread(cfg: tuple, extra_cols: int = 0) -> int:
    """fp32 accumulator values a thread holds with GEMM config `cfg` (BM x (BN + extra_cols) over its warps)."""
    bm, bn, _, _, warps = cfg[:5]
    return bm * (bn + extra_cols) // (32 * warps)


def down_config(cfg: tuple, r: int) -> tuple | None:
    """`cfg` for the DOWN form at rank r (the K loop's extra x and B H tiles): its stages cut until the operand
    buffers fit DOWN_SMEM; None where even two stages do not, or where the two accumulators, (BM, BN) and t's
    (BM, RP), take 128 fp32 registers a thread or more (offline sm_90: every such shipped config spilled with DOWN,
    e.g. 128 x 128 on 8 warps at rank 96: 54 spill stores). Offline builds of what this keeps (ranks 32 and 96): no
    spills, at most 200 KiB."""
    bm, bn, bk, gm, warps, stages, *rest = cfg
    rp = rank_pad(r)
    if acc_per_thread(cfg, rp) >= 128:
        return None
    per_stage = bm * bk + bn * bk + 2 * bk * (bm + rp)  # fp8 codes and weights, bf16 x and B H
    while stages > 2 and stages * per_stage > DOWN_SMEM:
        stages -= 1
    if stages * per_stage > DOWN_SMEM:
        return None
    return (bm, bn, bk, gm, warps, stages, *rest)


TWO_TILES_MAX_ACC = 64  # accumulator values a thread with which a second (BM, BN) fp32 tile builds unspilled: the
# GELU store (OUT_ACT) and each K step's product beside the accumulator (BLOCK_SCALE). Offline sm_90 (sessions 15-16):
# every config holding 64 or fewer has no local stores with either; the three holding 128 spill 29-68


def two_tiles_ok(cfg: tuple) -> bool:
    """Whether GEMM config `cfg` holds a second accumulator-sized tile (OUT_ACT, BLOCK_SCALE) without spilling."""
    return acc_per_thread(cfg) <= TWO_TILES_MAX_ACC


def two_tiles_config(cfg: tuple) -> tuple:
    """`cfg` where it holds a second tile (`two_tiles_ok`), else the config of GEMM_CONFIGS nearest to it that
    does: the same tile and K loop on more warps where there is one, else the largest tile that fits."""
    if two_tiles_ok(cfg):
        return cfg
    ok = [c for c in GEMM_CONFIGS if two_tiles_ok(c)]
    def distance(c):
        return (c[:3] != cfg[:3], bool(c[6:7] and c[6]) != bool(cfg[6:7] and cfg[6]), -c[0] * c[1], c[4])
    return min(ok, key=distance)


def launch_fp8_gemm(a, b, c, sx, sw, bias, lo, cs, t, up, m, cfg, launcher=launch, down=None, out_act: str = "",
                    block_scale: bool = False, out_quant: tuple[int, int] | None = None):
    """a (>= m, K) fp8, b (N, K) fp8, c (m, N) out; sx/lo (>= m,) fp32; sw/cs (N,) fp32; bias (N,) or None;
    t (m, r), up (N, r) or None. cfg: one of GEMM_CONFIGS. launcher: as `triton_act_quant.launch_act_quant`.
    down: (x (m, K) 16-bit, B H (r, K) contiguous) instead of t: the kernel makes t itself (DOWN).
    out_act: "gelu" / "gelu_tanh" applied to the output in the store (OUT_ACT).
    block_scale: sx is (K / BK, >= m) block scales (BLOCK_SCALE: `triton_block_quant.block_quant`'s), symmetric
    codes; a branch comes as t (not DOWN).
    out_quant: (head dim D, bits): the output fake-quantized per row and head in the store (OUT_QUANT; N % D == 0,
    D % 8 == 0, D <= BN; not with out_act)."""
    n, k = b.shape
    nstep, qd, qlevels = 0, 0, 127.0
    if out_quant is not None:
        qd, bits = out_quant
        if out_act or block_scale or qd % 8 or n % qd or qd > cfg[1] or not 2 <= bits <= 8:
            raise ValueError(f"out_quant={out_quant}: needs a head dim dividing N = {n}, a multiple of 8 up to the "
                             f"tile's {cfg[1]} columns, 2-8 bits, and no out_act / block_scale")
        nstep, qlevels = (cfg[1] // qd) * qd, float(2 ** (bits - 1) - 1)
    if block_scale and (lo is not None or down is not None or sx.shape[0] != k // cfg[2] or sx.stride(1) != 1):
        raise ValueError(f"block_scale takes symmetric codes (a branch as t, not DOWN) and (K / {cfg[2]}, M) "
                         f"contiguous scales, got scales of shape {tuple(sx.shape)}")
    if down is not None:
        t, dn = down
    r = 0 if t is None else (dn.shape[0] if down is not None else t.shape[1])
    rp = rank_pad(r)
    if down is not None:
        cfg = down_config(cfg, r)
        if cfg is None:
            raise ValueError("the DOWN form does not fit this GEMM config (check down_config first)")
    # (out_quant: every config holding whole heads builds unspilled offline, tests/kernels/test_out_quant.py)
    if (out_act or block_scale) and not two_tiles_ok(cfg):
        what = f"out_act={out_act!r}" if out_act else "block_scale"
        raise ValueError(f"GEMM config {cfg} holds {acc_per_thread(cfg)} accumulator values a thread: "
                         f"with {what} it spills; pick one with at most {TWO_TILES_MAX_ACC} (two_tiles_ok)")
    bm, bn, bk, gm, warps, stages, *early = cfg
    launcher(fp8_gemm_kernel, (((m + bm - 1) // bm) * triton.cdiv(n, nstep or bn),),
           (a, b, c, sx, sw, bias if bias is not None else sx, lo if lo is not None else sx,
            cs if cs is not None else sw, t if t is not None else c, up if up is not None else c,
            m, n, k, a.stride(0), b.stride(0), c.stride(0), t.stride(0) if t is not None else 0,
            up.stride(0) if up is not None else 0, r, dn if down is not None else c,
            sx.stride(0) if block_scale else 0),
           dict(BM=bm, BN=bn, BK=bk, GROUP_M=gm, RP=rp, HAS_BIAS=bias is not None, ASYM=lo is not None,
                HAS_LRB=t is not None, EARLY=bool(early and early[0]), DOWN=down is not None,
                OUT_ACT=act_code(out_act), BLOCK_SCALE=block_scale, OUT_QUANT=qd, NSTEP=nstep, QLEVELS=qlevels),
           dict(num_warps=warps, num_stages=stages), no_specialize=(10,))


# ----------------------------------------------------------------------------------------------------------------
# the same GEMM, persistent and fed by the tensor-memory accelerator (Hopper)
#
# One program per SM loops over the output tiles (grouped along M for L2 reuse); A and B tiles come through TMA
# descriptors built in the kernel (`tl.make_tensor_descriptor`: out-of-bounds rows read as zeros, so the M tail needs
# no masks) and the output tile leaves through one, so that the main loop is TMA + wgmma only, as in cuBLAS. The
# epilogue is fp8_gemm_kernel's. Descriptors built on the device need a scratch allocator (`set_tma_allocator`;
# Inductor sets its own before launching).

# (BM, BN, BK, GROUP_M, num_warps, num_stages, WARP_SPECIALIZE)
TMA_GEMM_CONFIGS = (
    (128, 256, 64, 8, 8, 4, False),  # 4 x 24 KiB operand stages + the 64 KiB output tile (BK 128 x 3 stages: too big)
    (128, 128, 128, 8, 8, 4, False),
    (128, 256, 64, 8, 8, 4, True),
    (128, 128, 128, 8, 4, 4, True),
    (64, 128, 128, 8, 4, 4, False),
)


@triton.jit(do_not_specialize=["M"])
def fp8_gemm_tma_kernel(a_ptr, b_ptr, c_ptr, sx_ptr, sw_ptr, bias_ptr, lo_ptr, cs_ptr, t_ptr, up_ptr,
                        M, N, K, stride_tm, stride_un, R, NUM_SMS,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                        RP: tl.constexpr, HAS_BIAS: tl.constexpr, ASYM: tl.constexpr, HAS_LRB: tl.constexpr,
                        WARP_SPECIALIZE: tl.constexpr):
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    num_tiles = num_pid_m * num_pid_n
    width = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
        group = tile // width
        group_size = min(num_pid_m - group * GROUP_M, GROUP_M)
        pid_m = group * GROUP_M + tile % group_size
        pid_n = (tile % width) // group_size
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BK])
            b = b_desc.load([off_n, ki * BK])
            acc = tl.dot(a, b.T, acc)
        acc = _epilogue(acc, off_m + tl.arange(0, BM), off_n + tl.arange(0, BN), M, N, sx_ptr, sw_ptr, bias_ptr,
                        lo_ptr, cs_ptr, t_ptr, up_ptr, stride_tm, stride_un, R, RP, HAS_BIAS, ASYM, HAS_LRB)
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


_ALLOCATOR: list = []


def set_tma_allocator() -> None:
    """Kernels that build TMA descriptors on the device need scratch memory from a Triton allocator (once)."""
    if not _ALLOCATOR:
        import torch

        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, device="cuda", dtype=torch.int8)
        triton.set_allocator(alloc)
        _ALLOCATOR.append(alloc)


def launch_fp8_gemm_tma(a, b, c, sx, sw, bias, lo, cs, t, up, m, cfg, num_sms: int, launcher=launch):
    """As `launch_fp8_gemm`, on the persistent TMA kernel; c must be contiguous (m, N), a / b row-major with
    K * 1 byte rows (K % 16 == 0). cfg: one of TMA_GEMM_CONFIGS."""
    bm, bn, bk, gm, warps, stages, ws = cfg
    n, k = b.shape
    r = 0 if t is None else t.shape[1]
    rp = rank_pad(r)
    tiles = ((m + bm - 1) // bm) * triton.cdiv(n, bn)
    if launcher is launch:
        set_tma_allocator()
    launcher(fp8_gemm_tma_kernel, (max(1, min(num_sms, tiles)),),
             (a, b, c, sx, sw, bias if bias is not None else sx, lo if lo is not None else sx,
              cs if cs is not None else sw, t if t is not None else c, up if up is not None else c,
              m, n, k, t.stride(0) if t is not None else 0, up.stride(0) if up is not None else 0, r, num_sms),
             dict(BM=bm, BN=bn, BK=bk, GROUP_M=gm, RP=rp, HAS_BIAS=bias is not None, ASYM=lo is not None,
                  HAS_LRB=t is not None, WARP_SPECIALIZE=ws),
             dict(num_warps=warps, num_stages=stages), no_specialize=(10,))
