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

The low-rank branch, stacked into the GEMM as in `lrb_stacked.py`, as extra k-steps; x is read once for codes and
branch. Rank 32 (the paper's; "packed"): the quantizer partition (`_quant_lrb_partition`) accumulates t = (x H) B^T
on mma.sync from the rotated chunks it holds anyway, then writes [u1, u1, u2, 0] (u = t / (s_x c)) as the buffer's
last chunk; the loader pairs it with the first 128 columns of the stacked mode's extended weight [v1, v2, v1, c,
0.., codes] (the 16 code columns in that box meet zeros), the code chunks with its columns W + 128 kb. Ranks 65..96
(sibling-fused q/k/v's 96; "terms", `_quant_terms_partition`): two chunks u1 = [e4m3(u), 0..], u2 = [e4m3(u - u1),
0..], run as three k-steps u1, u1, u2 against two 128-column boxes [v1, c, 0..], [v2, 0..] (`lrb_stacked.ext_columns`
at those ranks; the stacked mode itself takes none above 64).

Scope: symmetric absmax activations A <= 4, Hadamard block 128, K a multiple of 128 up to 1152, a branch of rank 32
or 65..96 (multiples of 16) or none, no asymmetric terms (every DiT-XL/2 layer of `dit`, W1.58A4+H and
`dit-xl-2-robuq` but fc2). Opt-in,
`ROBUQ_FP8_FUSED_QUANT=ws` (dispatch: `fused_quant.py`), until its GPU tests pass and the dispatch sweep times it.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import DotOperandLayout, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .gluon_act_quant import _maxf, _piece, _round_quotient, _scale_of, libdevice
from .gluon_fp8_gemm import _instr_n, _warps
from .gluon_qgemm import call_reason
from .lrb_stacked import TERMS_MIN_RANK, c_slot

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
BM = gl.constexpr(64)
BK = gl.constexpr(128)
QUANT_WARPS = gl.constexpr(4)
LRB_RANK = gl.constexpr(32)  # the branch's rank the kernel takes (the paper's; [u1, u1, u2, 0] fills one chunk)


@gluon.jit
def _item(item, n_groups, n_tiles, TPS):
    """(row block, first N tile, number of N tiles) of work item `item`."""
    t0 = (item % n_groups) * TPS
    return item // n_groups, t0, gl.minimum(n_tiles - t0, TPS)


@gluon.constexpr_function
def _extra_steps(lrb):
    """k-steps of the branch a tile: none, 1 (packed), 3 (terms: u1, u1, u2)."""
    return (0, 1, 3)[lrb]


@gluon.constexpr_function
def _extra_chunks(lrb):
    """Shared-memory chunks of the branch a code buffer: none, 1 (packed), 2 (terms: u1, u2)."""
    return (0, 1, 2)[lrb]


@gluon.jit
def _items(M, N, BN: gl.constexpr, TPS):
    """(N tiles, N runs a row block, work items) of the call."""
    n_tiles = gl.cdiv(N, BN)
    n_groups = gl.cdiv(n_tiles, TPS)
    return n_tiles, n_groups, gl.cdiv(M, BM) * n_groups


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
def _row_scale(x_ptr, rows, rmask, stride_xm, hs, lv, NKB: gl.constexpr, ql: gl.constexpr):
    """Pass 1: the row absmax of x H over the K / 128 rotated chunks -> (s_x, safe, 1 / safe)."""
    amax = gl.zeros((BM, ), gl.float32, gl.SliceLayout(1, ql))
    for c in gl.static_range(NKB):
        y = _piece(x_ptr, rows, rmask, stride_xm, hs, c * BK, BK, BM, 6, ql).to(gl.float32)
        amax = gl.maximum(amax, gl.reduce(gl.abs(y), 1, _maxf))
    s, lo, safe, rcp = _scale_of(-amax, amax, lv, True)
    return s, safe, rcp


@gluon.jit
def _block_start(x_ptr, M, stride_xm, hs, lv, mt, empty, i, NKB: gl.constexpr, ql: gl.constexpr):
    """Row block mt's rows, pass 1 (it reads x only, so before the wait), then the wait for code buffer i % 2 (the
    MMA partition is done with it; the first round passes)."""
    rows = (mt * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, ql))).to(gl.int64)
    rmask = rows < M
    s, safe, rcp = _row_scale(x_ptr, rows, rmask, stride_xm, hs, lv, NKB, ql)
    mbarrier.wait(empty, ((i // 2) & 1) ^ 1)
    return rows, rmask, s, safe, rcp


@gluon.jit
def _code_chunk(x_ptr, rows, rmask, stride_xm, hs, safe, rcp, chunk, c: gl.constexpr, ql: gl.constexpr):
    """Pass 2 for 128-column chunk c: Q_a(x H) into the shared chunk; returns the rotated chunk (x's dtype)."""
    xh = _piece(x_ptr, rows, rmask, stride_xm, hs, c * BK, BK, BM, 6, ql)
    q = _round_quotient(xh.to(gl.float32), gl.expand_dims(safe, 1), gl.expand_dims(rcp, 1))
    chunk.store(q.to(gl.float8e4nv))
    return xh


@gluon.jit
def _e4m3_rn(u):
    """u rounded to the nearest e4m3 value in fp32 by arithmetic (triton_lowrank._e4m3_rn: converting the fp8
    value back miscompiled there on sm_90)."""
    e = gl.maximum(((u.to(gl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    inv_ulp = ((130 - e) << 23).to(gl.float32, bitcast=True)
    ulp = ((e + 124) << 23).to(gl.float32, bitcast=True)
    return libdevice.rint(u * inv_ulp) * ulp


@gluon.jit
def _quant_partition(x_ptr, w_desc, a_bufs, sx_smem, w_bufs, bars, M, N, stride_xm, hscale, levels, TPS,
                     down_ptr, c_ptr, stride_dn, W_OFF, NCODE, EXTRA, R):
    """Q_a(x H) of every item's row block into code buffer i % 2, s_x beside it (4 warps): pass 1 the row absmax
    over the rotated 128-column chunks, pass 2 rotates again and stores the codes chunk by chunk."""
    a_ready, a_empty, w_ready, w_empty = bars
    NKB: gl.constexpr = a_bufs.type.shape[0] // 2
    BN: gl.constexpr = w_bufs.type.shape[1]
    # a (64, 128) chunk: 64 contiguous columns a thread, two lanes a row, 16 rows a warp (v0's layout on 4 warps)
    ql: gl.constexpr = gl.BlockedLayout([1, 64], [16, 2], [QUANT_WARPS, 1], [1, 0])
    hs = hscale.to(gl.float32)
    lv = levels.to(gl.float32)
    n_tiles, n_groups, total = _items(M, N, BN, TPS)
    i = 0
    for item in range(gl.program_id(0), total, gl.num_programs(0)):
        mt, t0, nt = _item(item, n_groups, n_tiles, TPS)
        buf = i % 2
        rows, rmask, s, safe, rcp = _block_start(x_ptr, M, stride_xm, hs, lv, mt, a_empty.index(buf), i, NKB, ql)
        for c in gl.static_range(NKB):
            _code_chunk(x_ptr, rows, rmask, stride_xm, hs, safe, rcp, a_bufs.index(buf * NKB + c), c, ql)
        sx_smem.index(buf).store(s)
        fence_async_shared()  # the stores, visible to the wgmma's async proxy
        mbarrier.arrive(a_ready.index(buf), count=1)
        i += 1


@gluon.jit
def _cat(a, b):
    """[a | b] along the columns (two (rows, n) tensors -> (rows, 2n)), by join / permute / reshape."""
    return gl.reshape(gl.permute(gl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))


@gluon.jit
def _quant_lrb_partition(x_ptr, w_desc, a_bufs, sx_smem, w_bufs, bars, M, N, stride_xm, hscale, levels, TPS,
                         down_ptr, c_ptr, stride_dn, W_OFF, NCODE, EXTRA, R):
    """`_quant_partition` and the low-rank branch stacked into the GEMM (lrb_stacked.py's mode, rank 32): from each
    rotated chunk, t += (x H)_c B_c^T on mma.sync (B unrotated: the chunk is already rotated), then the branch's
    chunk [u1, u1, u2, 0] with u = t / (s_x c), u1 = e4m3(u), u2 = e4m3(u - u1), which meets the extended weight's
    [v1, v2, v1, (c, 0...)] columns (v = A c / s_w): s_x s_w (u1 v1 + u1 v2 + u2 v1) ~ t A^T."""
    a_ready, a_empty, w_ready, w_empty = bars
    NKB: gl.constexpr = a_bufs.type.shape[0] // 2 - 1  # code chunks; chunk NKB holds the branch's columns
    BN: gl.constexpr = w_bufs.type.shape[1]
    ql: gl.constexpr = gl.BlockedLayout([1, 64], [16, 2], [QUANT_WARPS, 1], [1, 0])
    tl_: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[QUANT_WARPS, 1], instr_shape=[16, 8])
    xa_l: gl.constexpr = DotOperandLayout(operand_index=0, parent=tl_, k_width=2)
    bt_l: gl.constexpr = DotOperandLayout(operand_index=1, parent=tl_, k_width=2)
    hs = hscale.to(gl.float32)
    lv = levels.to(gl.float32)
    inv_c = 1.0 / gl.load(c_ptr).to(gl.float32)  # exact: c is a power of two
    jj = gl.arange(0, LRB_RANK, layout=gl.SliceLayout(0, bt_l))  # B's rows
    kk = gl.arange(0, BK, layout=gl.SliceLayout(1, bt_l))
    n_tiles, n_groups, total = _items(M, N, BN, TPS)
    i = 0
    for item in range(gl.program_id(0), total, gl.num_programs(0)):
        mt, t0, nt = _item(item, n_groups, n_tiles, TPS)
        buf = i % 2
        rows, rmask, s, safe, rcp = _block_start(x_ptr, M, stride_xm, hs, lv, mt, a_empty.index(buf), i, NKB, ql)
        t = gl.zeros((BM, LRB_RANK), gl.float32, tl_)
        for c in gl.static_range(NKB):
            xh = _code_chunk(x_ptr, rows, rmask, stride_xm, hs, safe, rcp, a_bufs.index(buf * (NKB + 1) + c), c, ql)
            bt = gl.load(down_ptr + gl.expand_dims(jj * stride_dn, 0) + gl.expand_dims(c * BK + kk, 1))
            t = mma_v2(gl.convert_layout(xh, xa_l), bt, t)
        sx = gl.convert_layout(s, gl.SliceLayout(1, tl_))
        u = t * gl.expand_dims(gl.where(sx > 0, inv_c / gl.where(sx > 0, sx, 1.0), 0.0), 1)
        u1 = _e4m3_rn(u)
        ext = _cat(_cat(u1, u1), _cat(u - u1, gl.zeros_like(u)))
        a_bufs.index(buf * (NKB + 1) + NKB).store(ext.to(gl.float8e4nv))
        sx_smem.index(buf).store(s)
        fence_async_shared()
        mbarrier.arrive(a_ready.index(buf), count=1)
        i += 1


@gluon.jit
def _halves(xh):
    """The even and the odd columns of a (rows, n) tensor (split on an in-thread index bit)."""
    return gl.split(gl.reshape(xh, (xh.shape[0], xh.shape[1] // 2, 2)))


@gluon.jit
def _t_piece(xq, down_ptr, stride_dn, col0, R, ta, tb, xa_l: gl.constexpr, bt_l: gl.constexpr):
    """ta += xq B[:64, cols]^T, tb += xq B[64:96, cols]^T for a (rows, 32) piece xq holding x H's columns col0 + 4 i
    (rows of B from R on read as zero)."""
    kk = gl.arange(0, 32, layout=gl.SliceLayout(1, bt_l))
    xa = gl.convert_layout(xq, xa_l)
    ja = gl.arange(0, 64, layout=gl.SliceLayout(0, bt_l))
    ba = gl.load(down_ptr + gl.expand_dims(ja * stride_dn, 0) + gl.expand_dims(col0 + 4 * kk, 1),
                 mask=gl.expand_dims(ja < R, 0), other=0.0)
    ta = mma_v2(xa, ba, ta)
    jb = 64 + gl.arange(0, 32, layout=gl.SliceLayout(0, bt_l))
    bb = gl.load(down_ptr + gl.expand_dims(jb * stride_dn, 0) + gl.expand_dims(col0 + 4 * kk, 1),
                 mask=gl.expand_dims(jb < R, 0), other=0.0)
    tb = mma_v2(xa, bb, tb)
    return ta, tb


@gluon.jit
def _quant_terms_partition(x_ptr, w_desc, a_bufs, sx_smem, w_bufs, bars, M, N, stride_xm, hscale, levels, TPS,
                           down_ptr, c_ptr, stride_dn, W_OFF, NCODE, EXTRA, R):
    """`_quant_partition` and a branch of rank 65..96 (sibling-fused q/k/v: 96) in the terms form: t = (x H) B^T on
    mma.sync (its columns 0..63 and 64..95 in two accumulators; each chunk in four pieces of every 4th column, split on
    in-thread index bits), then two chunks u1 = [e4m3(u), 0..] and u2 = [e4m3(u - u1), 0..] (u = t / (s_x c), zero
    from column r on), which the MMA partition runs as three k-steps u1, u1, u2 against the extended weight's boxes
    [v1, c, 0..], [v2, 0..], [v1, c, 0..]."""
    a_ready, a_empty, w_ready, w_empty = bars
    NKB: gl.constexpr = a_bufs.type.shape[0] // 2 - 2  # code chunks; then u1, u2
    BN: gl.constexpr = w_bufs.type.shape[1]
    ql: gl.constexpr = gl.BlockedLayout([1, 64], [16, 2], [QUANT_WARPS, 1], [1, 0])
    tl_: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[QUANT_WARPS, 1], instr_shape=[16, 8])
    xa_l: gl.constexpr = DotOperandLayout(operand_index=0, parent=tl_, k_width=2)
    bt_l: gl.constexpr = DotOperandLayout(operand_index=1, parent=tl_, k_width=2)
    hs = hscale.to(gl.float32)
    lv = levels.to(gl.float32)
    inv_c = 1.0 / gl.load(c_ptr).to(gl.float32)
    n_tiles, n_groups, total = _items(M, N, BN, TPS)
    i = 0
    for item in range(gl.program_id(0), total, gl.num_programs(0)):
        mt, t0, nt = _item(item, n_groups, n_tiles, TPS)
        buf = i % 2
        rows, rmask, s, safe, rcp = _block_start(x_ptr, M, stride_xm, hs, lv, mt, a_empty.index(buf), i, NKB, ql)
        ta = gl.zeros((BM, 64), gl.float32, tl_)
        tb = gl.zeros((BM, 32), gl.float32, tl_)
        for c in gl.static_range(NKB):
            xh = _code_chunk(x_ptr, rows, rmask, stride_xm, hs, safe, rcp, a_bufs.index(buf * (NKB + 2) + c), c, ql)
            x0, x1 = _halves(xh)  # columns 2j, 2j + 1
            x00, x01 = _halves(x0)  # 4i, 4i + 2
            x10, x11 = _halves(x1)  # 4i + 1, 4i + 3
            ta, tb = _t_piece(x00, down_ptr, stride_dn, c * BK, R, ta, tb, xa_l, bt_l)
            ta, tb = _t_piece(x01, down_ptr, stride_dn, c * BK + 2, R, ta, tb, xa_l, bt_l)
            ta, tb = _t_piece(x10, down_ptr, stride_dn, c * BK + 1, R, ta, tb, xa_l, bt_l)
            ta, tb = _t_piece(x11, down_ptr, stride_dn, c * BK + 3, R, ta, tb, xa_l, bt_l)
        sx = gl.convert_layout(s, gl.SliceLayout(1, tl_))
        rs = gl.expand_dims(gl.where(sx > 0, inv_c / gl.where(sx > 0, sx, 1.0), 0.0), 1)
        ua = ta * rs
        ub = tb * rs
        ua1 = _e4m3_rn(ua)
        ub1 = _e4m3_rn(ub)
        z = gl.zeros_like(ub)
        lay: gl.constexpr = ua.type.layout
        a_bufs.index(buf * (NKB + 2) + NKB).store(
            _cat(ua1, gl.convert_layout(_cat(ub1, z), lay)).to(gl.float8e4nv))
        a_bufs.index(buf * (NKB + 2) + NKB + 1).store(
            _cat(ua - ua1, gl.convert_layout(_cat(ub - ub1, z), lay)).to(gl.float8e4nv))
        sx_smem.index(buf).store(s)
        fence_async_shared()
        mbarrier.arrive(a_ready.index(buf), count=1)
        i += 1


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
    if TERMS_MIN_RANK <= rank <= 96 and rank % 16 == 0:
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
