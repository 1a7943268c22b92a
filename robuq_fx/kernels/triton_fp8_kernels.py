"""Triton kernels of the Hopper fp8 qlinear path (imported lazily by `triton_fp8.py`; importing this module needs
triton). Three kernels:

`act_quant_kernel`: one pass over BM activation rows. The row is read once, as up to four power-of-two "pieces" of
    NB_i tiles of T columns, of which the first NV_i are real and the rest zero padding (K = T * sum NV_i, e.g.
    1152 = 128 * (8 + 1) as pieces (8, 8) + (1, 1) with 16 rows a program, or one piece (16, 9) with one row),
    so that each piece is a (BM, NB_i, T) register tile. With a Hadamard, a piece is reshaped to (BM * NB_i, T) and multiplied by the
    unnormalized +-1 matrix kron(I_{T/b}, H_b) on the tensor cores (fp32 accumulation), then scaled by
    dtype(1/sqrt(b)) and rounded to the input dtype, exactly like `hadamard.block_hadamard` does in that dtype.
    Then per-row absmax (or min/max over the real tiles), the scale with an IEEE division (`div_rn`), codes by `rint(div_rn(x, s))`
    (round half to even, as `torch.round`), clamp, and a store of fp8 e4m3 codes (|q| <= 15 is exact) or, in
    DEQUANT mode, of Q_a(x) = s q (+ lo) in the input dtype. Per-row scale (and lo) go out in fp32.
    Asymmetric codes may be stored shifted by `shift` = 2^(k-1) (q' = q - shift in [-2^(k-1), 2^(k-1) - 1]) with
    lo' = lo + shift * s, so that y = s_x s_w (q' q_w) + lo' c: the same value, a smaller rank-1 term.

`act_quant_pipe_kernel`: the same computation with a Hadamard (2-D pieces, `_flat_block`, identical numerics), as a
    persistent kernel: SMs x (resident programs) programs, each loads H once and walks the row blocks pid,
    pid + grid, ...; the loop is software-pipelined (`tl.range(num_stages=STAGES)`): the pieces of the next blocks
    are copied asynchronously into shared memory (cp.async), straight in the layout the tensor-core dot reads,
    while the current block is rotated, reduced, quantized and stored. The one-program-per-block kernel keeps a
    whole block's loads and its compute in sequence (one or two such programs fit an SM: ~1.2 TB/s on the H200).

`fp8_gemm_kernel`: y = (q_x q_w^T) * s_x[m] * s_w[n] [+ lo[m] c[n]] [+ bias[n]] [+ t[m] A^T], fp8 e4m3 tensor-core
    GEMM (fp32 accumulation) with everything after the integer product fused in the epilogue; used for the
    asymmetric and low-rank-branch cases where `torch._scaled_mm` would need extra passes over y.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.errors import OutOfResources


@triton.jit
def _load_rot(x_ptr, rows, rmask, stride_xm, h, hscale,
              OFF: tl.constexpr, NB: tl.constexpr, NV: tl.constexpr, T: tl.constexpr, BM: tl.constexpr,
              HAD: tl.constexpr, IEEE: tl.constexpr):
    """(BM, NB, T) tile of x H for columns [OFF, OFF + NV*T) (tiles NV..NB-1 are zero padding), rounded to the
    input dtype and kept in it (fp32 input: fp32)."""
    j = tl.arange(0, NB)
    c = tl.arange(0, T)
    cols = OFF + j[:, None] * T + c[None, :]
    mask = rmask[:, None, None]
    if NV < NB:
        mask = mask & (j < NV)[None, :, None]
    x = tl.load(x_ptr + rows[:, None, None] * stride_xm + cols[None, :, :], mask=mask, other=0.0)
    if HAD:
        x2 = tl.reshape(x, (BM * NB, T))
        if IEEE:
            y = tl.dot(x2, h, input_precision="ieee")
        else:
            y = tl.dot(x2, h)
        y = (tl.reshape(y, (BM, NB, T)) * hscale).to(x_ptr.dtype.element_ty)
    else:
        y = x
    return y


@triton.jit
def _piece_range(y, NB: tl.constexpr, NV: tl.constexpr, SYM: tl.constexpr):
    """Per-row (a, b): (absmax, absmax) when SYM, else (min, max) over the valid tiles of a piece."""
    y = y.to(tl.float32)
    if SYM:
        r = tl.max(tl.max(tl.abs(y), axis=2), axis=1)
        return r, r
    else:
        if NV < NB:
            valid = (tl.arange(0, NB) < NV)[None, :, None]
            mn = tl.min(tl.min(tl.where(valid, y, float("inf")), axis=2), axis=1)
            mx = tl.max(tl.max(tl.where(valid, y, float("-inf")), axis=2), axis=1)
        else:
            mn = tl.min(tl.min(y, axis=2), axis=1)
            mx = tl.max(tl.max(y, axis=2), axis=1)
        return mn, mx


@triton.jit
def _quant_store(y, out_ptr, rows, smask, stride_om, s, safe, lo, qmin, qmax, shift,
                 OFF: tl.constexpr, NB: tl.constexpr, NV: tl.constexpr, T: tl.constexpr, BM: tl.constexpr,
                 SYM: tl.constexpr, DEQUANT: tl.constexpr):
    j = tl.arange(0, NB)
    c = tl.arange(0, T)
    cols = OFF + j[:, None] * T + c[None, :]
    y = y.to(tl.float32)
    sf = tl.broadcast_to(safe[:, None, None], (BM, NB, T))
    if SYM:
        q = libdevice.rint(tl.div_rn(y, sf))
    else:
        q = libdevice.rint(tl.div_rn(y - tl.broadcast_to(lo[:, None, None], (BM, NB, T)), sf))
    q = tl.minimum(tl.maximum(q, qmin), qmax)
    if DEQUANT:
        if SYM:
            v = s[:, None, None] * q
        else:
            v = lo[:, None, None] + s[:, None, None] * q
    else:
        v = q - shift
    mask = smask[:, None, None]
    if NV < NB:
        mask = mask & (j < NV)[None, :, None]
    tl.store(out_ptr + rows[:, None, None] * stride_om + cols[None, :, :], v.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _load_rot2d(x_ptr, row0, M, stride_xm, h, hscale,
                OFF: tl.constexpr, NB: tl.constexpr, NV: tl.constexpr, T: tl.constexpr, BM: tl.constexpr,
                IEEE: tl.constexpr):
    """FLAT layout: the piece as a 2-D (BM * NB, T) tile (row r = row m * NB + tile j), loaded and rotated without
    3-D reshapes of the large tile."""
    r = tl.arange(0, BM * NB)
    m = row0 + (r // NB).to(tl.int64)
    j = r % NB
    c = tl.arange(0, T)
    mask = (m < M)[:, None]
    if NV < NB:
        mask = mask & (j < NV)[:, None]
    x = tl.load(x_ptr + m[:, None] * stride_xm + (OFF + j * T)[:, None] + c[None, :], mask=mask, other=0.0)
    if IEEE:
        y = tl.dot(x, h, input_precision="ieee")
    else:
        y = tl.dot(x, h)
    return (y * hscale).to(x_ptr.dtype.element_ty)


@triton.jit
def _range2d(y, NB: tl.constexpr, NV: tl.constexpr, BM: tl.constexpr, SYM: tl.constexpr):
    y = y.to(tl.float32)
    if SYM:
        t = tl.max(tl.abs(y), axis=1)
        r = tl.max(tl.reshape(t, (BM, NB)), axis=1)
        return r, r
    else:
        mn = tl.min(y, axis=1)
        mx = tl.max(y, axis=1)
        if NV < NB:
            valid = (tl.arange(0, BM * NB) % NB) < NV
            mn = tl.where(valid, mn, float("inf"))
            mx = tl.where(valid, mx, float("-inf"))
        return tl.min(tl.reshape(mn, (BM, NB)), axis=1), tl.max(tl.reshape(mx, (BM, NB)), axis=1)


@triton.jit
def _expand2d(v, NB: tl.constexpr, BM: tl.constexpr):
    """(BM,) per-row values -> (BM * NB, 1), one per tile row of the FLAT layout."""
    return tl.reshape(tl.broadcast_to(v[:, None], (BM, NB)), (BM * NB,))[:, None]


@triton.jit
def _store2d(y, out_ptr, row0, M_STORE, stride_om, s, safe, lo, qmin, qmax, shift,
             OFF: tl.constexpr, NB: tl.constexpr, NV: tl.constexpr, T: tl.constexpr, BM: tl.constexpr,
             SYM: tl.constexpr, DEQUANT: tl.constexpr):
    r = tl.arange(0, BM * NB)
    m = row0 + (r // NB).to(tl.int64)
    j = r % NB
    c = tl.arange(0, T)
    y = y.to(tl.float32)
    sf = tl.broadcast_to(_expand2d(safe, NB, BM), (BM * NB, T))
    le = _expand2d(lo, NB, BM)
    se = _expand2d(s, NB, BM)
    if SYM:
        q = libdevice.rint(tl.div_rn(y, sf))
    else:
        q = libdevice.rint(tl.div_rn(y - tl.broadcast_to(le, (BM * NB, T)), sf))
    q = tl.minimum(tl.maximum(q, qmin), qmax)
    if DEQUANT:
        if SYM:
            v = se * q
        else:
            v = le + se * q
    else:
        v = q - shift
    mask = (m < M_STORE)[:, None]
    if NV < NB:
        mask = mask & (j < NV)[:, None]
    tl.store(out_ptr + m[:, None] * stride_om + (OFF + j * T)[:, None] + c[None, :],
             v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _flat_block(x_ptr, out_ptr, scale_ptr, lo_ptr, row0, M, M_STORE, stride_xm, stride_om, h, hscale, levels, qmin,
                qmax, shift,
                T: tl.constexpr, NB0: tl.constexpr, NB1: tl.constexpr, NB2: tl.constexpr, NB3: tl.constexpr,
                NV0: tl.constexpr, NV1: tl.constexpr, NV2: tl.constexpr, NV3: tl.constexpr,
                BM: tl.constexpr, SYM: tl.constexpr, DEQUANT: tl.constexpr, IEEE: tl.constexpr):
    """Rows [row0, row0 + BM) with a Hadamard, each piece a 2-D (BM * NB, T) tile: rotate, range, scale, codes."""
    rows = (row0 + tl.arange(0, BM)).to(tl.int64)
    smask = rows < M_STORE
    OFF1: tl.constexpr = NV0 * T
    OFF2: tl.constexpr = (NV0 + NV1) * T
    OFF3: tl.constexpr = (NV0 + NV1 + NV2) * T
    y0 = _load_rot2d(x_ptr, row0, M, stride_xm, h, hscale, 0, NB0, NV0, T, BM, IEEE)
    a, b = _range2d(y0, NB0, NV0, BM, SYM)
    if NB1 > 0:
        y1 = _load_rot2d(x_ptr, row0, M, stride_xm, h, hscale, OFF1, NB1, NV1, T, BM, IEEE)
        a1, b1 = _range2d(y1, NB1, NV1, BM, SYM)
        a = tl.minimum(a, a1)
        b = tl.maximum(b, b1)
    if NB2 > 0:
        y2 = _load_rot2d(x_ptr, row0, M, stride_xm, h, hscale, OFF2, NB2, NV2, T, BM, IEEE)
        a2, b2 = _range2d(y2, NB2, NV2, BM, SYM)
        a = tl.minimum(a, a2)
        b = tl.maximum(b, b2)
    if NB3 > 0:
        y3 = _load_rot2d(x_ptr, row0, M, stride_xm, h, hscale, OFF3, NB3, NV3, T, BM, IEEE)
        a3, b3 = _range2d(y3, NB3, NV3, BM, SYM)
        a = tl.minimum(a, a3)
        b = tl.maximum(b, b3)
    if SYM:
        s = tl.div_rn(b, tl.zeros_like(b) + levels)
        lo = -b
    else:
        s = tl.div_rn(b - a, tl.zeros_like(b) + levels)
        lo = a
    safe = tl.where(s > 0, s, 1.0)
    tl.store(scale_ptr + rows, s, mask=smask)
    tl.store(lo_ptr + rows, lo + shift * s, mask=smask)
    _store2d(y0, out_ptr, row0, M_STORE, stride_om, s, safe, lo, qmin, qmax, shift, 0, NB0, NV0, T, BM, SYM, DEQUANT)
    if NB1 > 0:
        _store2d(y1, out_ptr, row0, M_STORE, stride_om, s, safe, lo, qmin, qmax, shift, OFF1, NB1, NV1, T, BM, SYM,
                 DEQUANT)
    if NB2 > 0:
        _store2d(y2, out_ptr, row0, M_STORE, stride_om, s, safe, lo, qmin, qmax, shift, OFF2, NB2, NV2, T, BM, SYM,
                 DEQUANT)
    if NB3 > 0:
        _store2d(y3, out_ptr, row0, M_STORE, stride_om, s, safe, lo, qmin, qmax, shift, OFF3, NB3, NV3, T, BM, SYM,
                 DEQUANT)


@triton.jit(do_not_specialize=["M", "M_STORE"])
def act_quant_kernel(x_ptr, h_ptr, out_ptr, scale_ptr, lo_ptr, M, M_STORE, stride_xm, stride_om,
                     hscale, levels, qmin, qmax, shift,
                     T: tl.constexpr, NB0: tl.constexpr, NB1: tl.constexpr, NB2: tl.constexpr, NB3: tl.constexpr,
                     NV0: tl.constexpr, NV1: tl.constexpr, NV2: tl.constexpr, NV3: tl.constexpr,
                     BM: tl.constexpr, HAD: tl.constexpr, SYM: tl.constexpr, DEQUANT: tl.constexpr,
                     IEEE: tl.constexpr, FLAT: tl.constexpr):
    pid = tl.program_id(0)
    row0 = pid * BM
    if HAD:
        hr = tl.arange(0, T)
        h = tl.load(h_ptr + hr[:, None] * T + hr[None, :])
    else:
        h = hscale
    if FLAT:
        _flat_block(x_ptr, out_ptr, scale_ptr, lo_ptr, row0, M, M_STORE, stride_xm, stride_om, h, hscale, levels,
                    qmin, qmax, shift, T, NB0, NB1, NB2, NB3, NV0, NV1, NV2, NV3, BM, SYM, DEQUANT, IEEE)
    else:
        rows = (row0 + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < M
        smask = rows < M_STORE
        OFF1: tl.constexpr = NV0 * T
        OFF2: tl.constexpr = (NV0 + NV1) * T
        OFF3: tl.constexpr = (NV0 + NV1 + NV2) * T
        y0 = _load_rot(x_ptr, rows, rmask, stride_xm, h, hscale, 0, NB0, NV0, T, BM, HAD, IEEE)
        a, b = _piece_range(y0, NB0, NV0, SYM)
        if NB1 > 0:
            y1 = _load_rot(x_ptr, rows, rmask, stride_xm, h, hscale, OFF1, NB1, NV1, T, BM, HAD, IEEE)
            a1, b1 = _piece_range(y1, NB1, NV1, SYM)
            a = tl.minimum(a, a1)
            b = tl.maximum(b, b1)
        if NB2 > 0:
            y2 = _load_rot(x_ptr, rows, rmask, stride_xm, h, hscale, OFF2, NB2, NV2, T, BM, HAD, IEEE)
            a2, b2 = _piece_range(y2, NB2, NV2, SYM)
            a = tl.minimum(a, a2)
            b = tl.maximum(b, b2)
        if NB3 > 0:
            y3 = _load_rot(x_ptr, rows, rmask, stride_xm, h, hscale, OFF3, NB3, NV3, T, BM, HAD, IEEE)
            a3, b3 = _piece_range(y3, NB3, NV3, SYM)
            a = tl.minimum(a, a3)
            b = tl.maximum(b, b3)
        if SYM:
            s = tl.div_rn(b, tl.zeros_like(b) + levels)
            lo = -b
        else:
            s = tl.div_rn(b - a, tl.zeros_like(b) + levels)
            lo = a
        safe = tl.where(s > 0, s, 1.0)
        tl.store(scale_ptr + rows, s, mask=smask)
        tl.store(lo_ptr + rows, lo + shift * s, mask=smask)
        _quant_store(y0, out_ptr, rows, smask, stride_om, s, safe, lo, qmin, qmax, shift, 0, NB0, NV0, T, BM, SYM,
                     DEQUANT)
        if NB1 > 0:
            _quant_store(y1, out_ptr, rows, smask, stride_om, s, safe, lo, qmin, qmax, shift, OFF1, NB1, NV1, T,
                         BM, SYM, DEQUANT)
        if NB2 > 0:
            _quant_store(y2, out_ptr, rows, smask, stride_om, s, safe, lo, qmin, qmax, shift, OFF2, NB2, NV2, T,
                         BM, SYM, DEQUANT)
        if NB3 > 0:
            _quant_store(y3, out_ptr, rows, smask, stride_om, s, safe, lo, qmin, qmax, shift, OFF3, NB3, NV3, T,
                         BM, SYM, DEQUANT)


@triton.jit(do_not_specialize=["M", "M_STORE"])
def act_quant_pipe_kernel(x_ptr, h_ptr, out_ptr, scale_ptr, lo_ptr, M, M_STORE, stride_xm, stride_om,
                          hscale, levels, qmin, qmax, shift,
                          T: tl.constexpr, NB0: tl.constexpr, NB1: tl.constexpr, NB2: tl.constexpr,
                          NB3: tl.constexpr, NV0: tl.constexpr, NV1: tl.constexpr, NV2: tl.constexpr,
                          NV3: tl.constexpr, BM: tl.constexpr, SYM: tl.constexpr, DEQUANT: tl.constexpr,
                          IEEE: tl.constexpr, STAGES: tl.constexpr):
    """Persistent Hadamard variant: H is loaded once per program, which then walks row blocks pid, pid + grid, ...
    with the loads of the next blocks software-pipelined (async copies into shared memory, STAGES deep) under the
    rotation / quantization of the current one."""
    pid = tl.program_id(0)
    npid = tl.num_programs(0)
    hr = tl.arange(0, T)
    h = tl.load(h_ptr + hr[:, None] * T + hr[None, :])
    n_blocks = tl.cdiv(M_STORE, BM)
    for blk in tl.range(pid, n_blocks, npid, num_stages=STAGES):
        _flat_block(x_ptr, out_ptr, scale_ptr, lo_ptr, blk * BM, M, M_STORE, stride_xm, stride_om, h, hscale, levels,
                    qmin, qmax, shift, T, NB0, NB1, NB2, NB3, NV0, NV1, NV2, NV3, BM, SYM, DEQUANT, IEEE)


_OCC: dict = {}  # (constexprs, dtypes, device) of the persistent kernel -> resident programs per SM
_NSM: dict = {}
_NO_PIPE: set = set()  # keys whose persistent kernel does not fit this device (shared memory): old kernel instead


def _occupancy(kern, warps: int, dev: int) -> int:
    """Programs of `kern` one SM holds at once (registers, shared memory, warps)."""
    props = triton.runtime.driver.active.utils.get_device_properties(dev)
    regs_warp = -(-max(int(kern.n_regs), 1) * 32 // 256) * 256
    by_regs = 65536 // max(warps * regs_warp, 1)
    by_smem = (props["max_shared_mem"] + 1024) // (int(kern.metadata.shared) + 1024)
    return max(1, min(by_regs, by_smem, 64 // warps, 32))


def launch_act_quant(x, h, out, scale, lo, m, m_store, hscale, levels, qmin, qmax, shift, plan, had, sym, dequant,
                     ieee, stages=3):
    """plan: (T, ((NB, NV), ...) up to 4 pieces, BM, num_warps, variant): variant (with a Hadamard) 0 / 3 = the
    persistent software-pipelined kernel (grid = SMs x resident programs), 1 = one program per BM rows with the
    pieces as 2-D (BM * NB, T) tiles, 2 = the same with (BM, NB, T) tiles; without a Hadamard one program per BM
    rows. fp32 input (IEEE dot) and devices without the shared memory for `stages` buffers use variant 1."""
    t, pieces, bm, warps, var = plan
    pcs = list(pieces) + [(0, 0)] * (4 - len(pieces))
    nbs = dict(T=t, NB0=pcs[0][0], NB1=pcs[1][0], NB2=pcs[2][0], NB3=pcs[3][0],
               NV0=pcs[0][1], NV1=pcs[1][1], NV2=pcs[2][1], NV3=pcs[3][1], BM=bm)
    scal = (float(hscale), float(levels), float(qmin), float(qmax), float(shift))
    if had and var in (0, 3) and not ieee:
        dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
        key = (t, tuple(pieces), bm, warps, stages, x.dtype, out.dtype, bool(sym), bool(dequant), dev)
        if key not in _NO_PIPE:
            nsm = _NSM.get(dev)
            if nsm is None:
                nsm = _NSM[dev] = triton.runtime.driver.active.utils.get_device_properties(dev)[
                    "multiprocessor_count"]
            occ = _OCC.get(key, 1)
            grid = (max(1, min(triton.cdiv(m_store, bm), nsm * occ)),)
            try:
                kern = act_quant_pipe_kernel[grid](x, h, out, scale, lo, m, m_store, x.stride(0), out.stride(0),
                                                   *scal, **nbs, SYM=bool(sym), DEQUANT=bool(dequant), IEEE=False,
                                                   STAGES=stages, num_warps=warps, num_stages=stages)
            except OutOfResources:
                _NO_PIPE.add(key)
            else:
                if key not in _OCC and kern is not None:
                    _OCC[key] = _occupancy(kern, warps, dev)
                return
        var = 1
    grid = (triton.cdiv(m_store, bm),)
    act_quant_kernel[grid](x, h if had else x, out, scale, lo, m, m_store, x.stride(0), out.stride(0), *scal, **nbs,
                           HAD=bool(had), SYM=bool(sym), DEQUANT=bool(dequant), IEEE=bool(ieee),
                           FLAT=bool(had and var != 2), num_warps=warps)


# ----------------------------------------------------------------------------------------------------------------
# fp8 GEMM with fused epilogue

# (BM, BN, BK, GROUP_M, num_warps, num_stages). Every entry is exercised by tests/kernels/test_triton_fp8.py on
# odd M and all DiT-XL/2 shapes; BK must divide K (the path requires K % 128 == 0).
GEMM_CONFIGS = (
    (128, 256, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 4),
    (64, 128, 128, 8, 4, 4),
    (64, 64, 128, 8, 4, 4),
)


@triton.jit(do_not_specialize=["M"])
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, sx_ptr, sw_ptr, bias_ptr, lo_ptr, cs_ptr, t_ptr, up_ptr,
                    M, N, K, stride_am, stride_bn, stride_cm, stride_tm, stride_un, R,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    RP: tl.constexpr, HAS_BIAS: tl.constexpr, ASYM: tl.constexpr, HAS_LRB: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_am = tl.max_contiguous(tl.multiple_of(offs_m % M, BM), BM)
    offs_bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BN), BN)
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + offs_am[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_bn[:, None].to(tl.int64) * stride_bn + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BK
        b_ptrs += BK

    mmask = offs_m < M
    nmask = offs_n < N
    sx = tl.load(sx_ptr + offs_m, mask=mmask, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=nmask, other=0.0)
    acc = acc * sx[:, None] * sw[None, :]
    if ASYM:
        lo = tl.load(lo_ptr + offs_m, mask=mmask, other=0.0)
        cs = tl.load(cs_ptr + offs_n, mask=nmask, other=0.0)
        acc += lo[:, None] * cs[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if HAS_LRB:
        rr = tl.arange(0, RP)
        t = tl.load(t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + rr[None, :],
                    mask=mmask[:, None] & (rr[None, :] < R), other=0.0)
        u = tl.load(up_ptr + offs_n[:, None].to(tl.int64) * stride_un + rr[None, :],
                    mask=nmask[:, None] & (rr[None, :] < R), other=0.0)
        acc = tl.dot(t, tl.trans(u), acc)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def launch_fp8_gemm(a, b, c, sx, sw, bias, lo, cs, t, up, m, cfg):
    """a (>= m, K) fp8, b (N, K) fp8, c (m, N) out; sx/lo (>= m,) fp32; sw/cs (N,) fp32; bias (N,) or None;
    t (m, r), up (N, r) or None. cfg: one of GEMM_CONFIGS."""
    bm, bn, bk, gm, warps, stages = cfg
    n, k = b.shape
    r = 0 if t is None else t.shape[1]
    rp = max(16, triton.next_power_of_2(r)) if r else 16
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    fp8_gemm_kernel[grid](a, b, c, sx, sw, bias if bias is not None else sx, lo if lo is not None else sx,
                          cs if cs is not None else sw, t if t is not None else c, up if up is not None else c,
                          m, n, k, a.stride(0), b.stride(0), c.stride(0), t.stride(0) if t is not None else 0,
                          up.stride(0) if up is not None else 0, r,
                          BM=bm, BN=bn, BK=bk, GROUP_M=gm, RP=rp, HAS_BIAS=bias is not None,
                          ASYM=lo is not None, HAS_LRB=t is not None, num_warps=warps, num_stages=stages)
