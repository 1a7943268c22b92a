"""The quantizer partitions of the warp-specialized quantize-in-GEMM kernel (gluon_qgemm_ws.py): Q_a(x H) of a 64-row
block into a shared-memory code buffer, and the low-rank branch's extra chunks where the layer has one (packed at
rank 32, the terms form at ranks 65..96), with the work-item arithmetic every partition shares.

A worker partition's arguments arrive as runtime values (a constexpr passed through warp_specialize's tuple does
not stay one), so its compile-time sizes come from the shared buffers' shapes.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import DotOperandLayout, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from .gluon_act_quant import _maxf, _piece, _round_quotient, _scale_of
from .triton_lowrank import _e4m3_rn

BM = gl.constexpr(64)
BK = gl.constexpr(128)
QUANT_WARPS = gl.constexpr(4)  # the quantizer partition's warps (the layouts below assume 4)
LRB_RANK = gl.constexpr(32)  # the branch's rank the kernel takes (the paper's; [u1, u1, u2, 0] fills one chunk)


# a (64, 128) chunk: 64 contiguous columns a thread, two lanes a row, 16 rows a warp (v0's layout on 4 warps); the
# branch's t on mma.sync (m16n8) with its bf16 operands
_QL = gl.BlockedLayout([1, 64], [16, 2], [4, 1], [1, 0])
_TL = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8])
QL = gl.constexpr(_QL)
TL = gl.constexpr(_TL)
XA_L = gl.constexpr(DotOperandLayout(operand_index=0, parent=_TL, k_width=2))
BT_L = gl.constexpr(DotOperandLayout(operand_index=1, parent=_TL, k_width=2))


@gluon.jit
def _item(item, n_groups, n_tiles, TPS):
    """(row block, first N tile, number of N tiles) of work item `item`."""
    t0 = (item % n_groups) * TPS
    return item // n_groups, t0, gl.minimum(n_tiles - t0, TPS)


@gluon.jit
def _items(M, N, BN: gl.constexpr, TPS):
    """(N tiles, N runs a row block, work items) of the call."""
    n_tiles = gl.cdiv(N, BN)
    n_groups = gl.cdiv(n_tiles, TPS)
    return n_tiles, n_groups, gl.cdiv(M, BM) * n_groups


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
def _hand_over(sx_slot, s, ready):
    """s_x beside the codes, the stores made visible to the wgmma's async proxy, then the buffer handed to the MMA
    partition."""
    sx_slot.store(s)
    fence_async_shared()
    mbarrier.arrive(ready, count=1)


@gluon.jit
def _u_rows(s, inv_c, tl_: gl.constexpr):
    """(BM, 1) 1 / (s_x c) in t's layout, 0 for rows with s_x = 0: u = t * this."""
    sx = gl.convert_layout(s, gl.SliceLayout(1, tl_))
    return gl.expand_dims(gl.where(sx > 0, inv_c / gl.where(sx > 0, sx, 1.0), 0.0), 1)


@gluon.jit
def _quant_partition(x_ptr, w_desc, a_bufs, sx_smem, w_bufs, bars, M, N, stride_xm, hscale, levels, TPS,
                     down_ptr, c_ptr, stride_dn, W_OFF, NCODE, EXTRA, R):
    """Q_a(x H) of every item's row block into code buffer i % 2, s_x beside it (4 warps): pass 1 the row absmax
    over the rotated 128-column chunks, pass 2 rotates again and stores the codes chunk by chunk."""
    a_ready, a_empty, w_ready, w_empty = bars
    NKB: gl.constexpr = a_bufs.type.shape[0] // 2
    BN: gl.constexpr = w_bufs.type.shape[1]
    ql: gl.constexpr = QL
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
        _hand_over(sx_smem.index(buf), s, a_ready.index(buf))
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
    ql: gl.constexpr = QL
    tl_: gl.constexpr = TL
    xa_l: gl.constexpr = XA_L
    bt_l: gl.constexpr = BT_L
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
        u = t * _u_rows(s, inv_c, tl_)
        u1 = _e4m3_rn(u)
        ext = _cat(_cat(u1, u1), _cat(u - u1, gl.zeros_like(u)))
        a_bufs.index(buf * (NKB + 1) + NKB).store(ext.to(gl.float8e4nv))
        _hand_over(sx_smem.index(buf), s, a_ready.index(buf))
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
    ql: gl.constexpr = QL
    tl_: gl.constexpr = TL
    xa_l: gl.constexpr = XA_L
    bt_l: gl.constexpr = BT_L
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
        rs = _u_rows(s, inv_c, tl_)
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
        _hand_over(sx_smem.index(buf), s, a_ready.index(buf))
        i += 1
