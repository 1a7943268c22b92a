"""8-bit attention on the GPU (METHOD.md §5): one Triton flash-attention kernel that quantizes q, k and v per token
and head as it loads them (the codes never reach memory) and multiplies q by k on 8-bit integer tensor cores.

Per program: a block of BM queries of one (batch, head); loop over blocks of BN keys.

    q8, s_q = quant8(q)   k8, s_k = quant8(k)       symmetric absmax per row, exactly `quantizers.quantize_act`
    S = (q8 @ k8^T)[int32, exact] * s_q[m] * s_k[n] * scale        online softmax in fp32 (exp2)
    v_hat = RN_dtype(s_v[n] * v8)                                   the value the reference's fake-quant produces
    O += P[dtype] @ v_hat                                           16-bit tensor cores, fp32 accumulation

The difference from the reference (fake-quant q, k, v to the input dtype, then SDPA) is only where it rounds: the
reference rounds q_hat = s_q q8 and k_hat to bf16 before its QK^T, this kernel keeps q8 . k8 exact and rounds the
product of the scales once. P and v_hat are rounded to the input dtype for P.V as flash attention does.

A head dim that is no power of two is held as two pieces (`_pieces`: DiT-XL/2's 72 as 64 + 32 columns for q.k,
int8 wgmma taking K >= 32, and 64 + 16 for P.V and the output) instead of one block padded to 128 (78% more products,
offline 218 registers a thread against 179 at the default config); masked columns are zeros, which change neither
the row ranges nor the dot products, so both forms give the same output (Triton's interpreter: bit-identical).
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .triton_rowquant import quantize_row_pieces

_LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax(qk, row_scale, s_k, nmask, offs_m, offs_n, m_i, l_i, CAUSAL: tl.constexpr):
    """One key block of the online softmax: scores s = qk s_q s_k (log2 e / sqrt(d) folded into row_scale), masked
    (keys past SK; causal), new running max, the block's exp2 weights p, the old sum's factor alpha and the new sum."""
    s = qk.to(tl.float32) * row_scale[:, None] * s_k[None, :]
    keep = nmask[None, :]
    if CAUSAL:
        keep = keep & (offs_m[:, None] >= offs_n[None, :])
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _load_pieces(ptr, rows, rmask, offs_d, dmask, offs_e, emask, stride, HAS_E: tl.constexpr):
    """A [R, DP] tile of rows (columns offs_d) and, with HAS_E, its tail (columns offs_e): (x, mask, xe, emask2);
    without a tail xe / emask2 repeat x / mask (unused)."""
    mask = rmask[:, None] & dmask[None, :]
    x = tl.load(ptr + rows[:, None] + offs_d[None, :] * stride, mask=mask, other=0)
    if HAS_E:
        mask_e = rmask[:, None] & emask[None, :]
        xe = tl.load(ptr + rows[:, None] + offs_e[None, :] * stride, mask=mask_e, other=0)
    else:
        mask_e = mask
        xe = x
    return x, mask, xe, mask_e


@triton.jit
def attention8_kernel(q_ptr, k_ptr, v_ptr, o_ptr, sk_ptr,
                      sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
                      H, HK, SQ, SK, qk_scale, levels, D: tl.constexpr,
                      CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
                      ALIGN: tl.constexpr = 1, PREQUANT: tl.constexpr = False, SPLIT: tl.constexpr = False,
                      DE: tl.constexpr = 32, DV: tl.constexpr = 16):
    """PREQUANT: k and v were quantized beforehand, once (`attention8_prequant`): k_ptr holds k's int8 codes and
    sk_ptr their row scales, v_ptr v's fake-quant values RN_dtype(s_v v8), all with contiguous rows of D; only q is
    quantized here, once a program. The same values in the same order as without it, where every program
    re-quantizes each k / v tile it reads (SQ / BM times a tile) from loads that feed arithmetic, not a dot, so that
    Triton does not pipeline them; with it every loop load feeds a dot or a scale vector. ALIGN (the launcher's
    check: every row of q, k, v and out starts a multiple of ALIGN elements from a 16-byte aligned base) lets rows of
    72 load and store as vectors (without it: one element a thread, offline sm_90).

    SPLIT (`_pieces`): a head dim that is no power of two is held as two pieces instead of one padded block: columns
    [0, DP) and a tail [DP, DP + DE) for q and k (q.k: two int8 products, DE >= 32 as int8 wgmma takes), [DP,
    DP + DV) for v and the output (DV >= 16). At DiT's 72: 64 + 32 for q.k and 64 + 16 for P.V, against 128 + 128
    padded. The codes, the exact int32 q.k and the softmax are the same as padded."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 when Inductor launches it (see triton_act_quant)
    levels = tl.cast(levels, tl.float32)
    HAS_E: tl.constexpr = SPLIT
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HK)  # grouped-query attention: H // HK query heads share one key/value head
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    mmask = offs_m < SQ
    q_rows = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m.to(tl.int64) * sqs
    o_rows = b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m.to(tl.int64) * sos
    if ALIGN > 1:
        q_rows = tl.multiple_of(q_rows, ALIGN)
        o_rows = tl.multiple_of(o_rows, ALIGN)
    # the tails (HAS_E): q / k columns [DP, DP + DE), v / out columns [DP, DP + DV), masked past D
    offs_e = DP + tl.arange(0, DE)
    emask = offs_e < D
    offs_f = DP + tl.arange(0, DV)
    fmask = offs_f < D
    q, qmask, qe, qemask = _load_pieces(q_ptr, q_rows, mmask, offs_d, dmask, offs_e, emask, sqd, HAS_E)
    q = q.to(tl.float32)
    qe = qe.to(tl.float32)
    q_codes, qe_codes, s_q, q_lo = quantize_row_pieces(q, qmask, qe, qemask, levels, True, HAS_E)
    q8 = q_codes.to(tl.int8)
    qe8 = qe_codes.to(tl.int8)
    row_scale = s_q * qk_scale  # scale * log2(e) folded in: softmax with exp2

    k_base = b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    s_base = sk_ptr + (b.to(tl.int64) * HK + hk) * SK
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)
    if HAS_E:
        acc_f = tl.zeros([BM, DV], tl.float32)
    else:
        acc_f = acc
    hi = SK
    if CAUSAL:  # top-left aligned, as SDPA's is_causal: query i sees keys j <= i
        hi = tl.minimum(SK, (pid_m + 1) * BM)
    for start in range(0, hi, BN):
        offs_n = start + tl.arange(0, BN)
        nmask = offs_n < SK
        k_rows = k_base + offs_n.to(tl.int64) * sks
        v_rows = v_base + offs_n.to(tl.int64) * svs
        if ALIGN > 1:
            k_rows = tl.multiple_of(k_rows, ALIGN)
            v_rows = tl.multiple_of(v_rows, ALIGN)
        k, kvmask, ke, kemask = _load_pieces(k_ptr, k_rows, nmask, offs_d, dmask, offs_e, emask, skd, HAS_E)
        if PREQUANT:
            k8 = k
            ke8 = ke
            s_k = tl.load(s_base + offs_n, mask=nmask, other=0.0)
        else:
            k_codes, ke_codes, s_k, k_lo = quantize_row_pieces(k.to(tl.float32), kvmask, ke.to(tl.float32), kemask,
                                                            levels, True, HAS_E)
            k8 = k_codes.to(tl.int8)
            ke8 = ke_codes.to(tl.int8)
        qk = tl.dot(q8, tl.trans(k8), out_dtype=tl.int32)
        if HAS_E:
            qk = tl.dot(qe8, tl.trans(ke8), acc=qk, out_dtype=tl.int32)
        p, alpha, m_new, l_i = _online_softmax(qk, row_scale, s_k, nmask, offs_m, offs_n, m_i, l_i, CAUSAL)
        v, vmask, vf, vfmask = _load_pieces(v_ptr, v_rows, nmask, offs_d, dmask, offs_f, fmask, svd, HAS_E)
        if PREQUANT:
            v_hat = v
            vf_hat = vf
        else:
            v_codes, vf_codes, s_v, v_lo = quantize_row_pieces(v.to(tl.float32), kvmask, vf.to(tl.float32), vfmask,
                                                            levels, True, HAS_E)
            v_hat = (s_v[:, None] * v_codes).to(v.dtype)
            vf_hat = (s_v[:, None] * vf_codes).to(v.dtype)
        pv = p.to(v_hat.dtype)
        acc = acc * alpha[:, None] + tl.dot(pv, v_hat)
        if HAS_E:
            acc_f = acc_f * alpha[:, None] + tl.dot(pv, vf_hat)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + o_rows[:, None] + offs_d[None, :] * sod, out.to(o_ptr.dtype.element_ty), mask=qmask)
    if HAS_E:
        tl.store(o_ptr + o_rows[:, None] + offs_f[None, :] * sod, (acc_f / l_i[:, None]).to(o_ptr.dtype.element_ty),
                 mask=mmask[:, None] & fmask[None, :])


def supported(q, k, v, attn_mask, dropout_p, bits) -> str | None:
    """None if the kernel computes this call, else why not (the op then runs the reference math)."""
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "inputs are not CUDA tensors"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (the kernel takes bf16/fp16)"
    if attn_mask is not None:
        return "an attn_mask (the kernel takes none, or is_causal)"
    if dropout_p:
        return f"dropout_p={dropout_p}"
    if bits != 8:
        return f"bits={bits} (the kernel is 8-bit)"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (needs (batch, heads, seq, head_dim))"
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        return f"head dims q {d}, k {k.shape[-1]}, v {v.shape[-1]} must be equal"
    if d > 256 or d % 8:
        return f"head_dim={d} (needs a multiple of 8 up to 256)"
    if k.shape[:2] != v.shape[:2] or k.shape[2] != v.shape[2] or q.shape[0] != k.shape[0] \
            or q.shape[1] % k.shape[1]:
        return f"batch/heads of q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match"
    return None


def _pieces(d: int, split: bool = True) -> tuple[int, int, int]:
    """(DP, DE, DV) of the kernel for head dim d: one padded power-of-two block (DE = DV = 0), or where d is no power
    of two (and split) a power-of-two head DP and tails DE (q, k: int8 wgmma needs K >= 32) and DV (v, out: >= 16)
    when they hold fewer columns than the padded block (72: 64 + 32 / 64 + 16 against 128)."""
    full = max(32, triton.next_power_of_2(d))
    if split and d >= 48 and d & (d - 1):
        head = 1 << (d.bit_length() - 1)
        rest = triton.next_power_of_2(d - head)
        de, dv = max(32, rest), max(16, rest)
        if head + dv < full:
            return head, de, dv
    return full, 0, 0


def _config(d: int, sq: int) -> tuple[int, int, int]:
    """(BM, BN, warps) of the default launch, by the head dim's padded width (heads past 128 take smaller tiles)."""
    wide = max(32, triton.next_power_of_2(d)) > 128
    bm = 128 if sq >= 128 and not wide else 64
    bn = 32 if wide else 64
    warps = 8 if bm == 128 else 4
    return bm, bn, warps


# Launch configs `bench_attention.py --sweep` times against the default (`_config`, head dims in `_pieces`): (BM,
# BN, warps, stages, maxnreg[, split]); split False: the head dim padded to a power of two in one block. Offline
# sm_90 at d = 72 the padded default (128, 64, 8 warps) took 218 registers a thread, one program an SM; a register
# cap buys programs an SM (64 x 32 x 4 warps at 128: four, no spills in the prequant form).
SWEEP = [(128, 64, 8, 3, None, False),  # the padded head dim (sessions <= 14)
         (128, 64, 8, 3, None), (128, 64, 8, 2, 168), (128, 32, 8, 3, None), (64, 64, 4, 3, None),
         (64, 64, 4, 3, 168), (64, 32, 4, 3, 128), (64, 128, 8, 2, None), (128, 128, 8, 2, None)]


def attention8(q, k, v, is_causal: bool, scale: float | None, levels: float = 127.0, config=None) -> torch.Tensor:
    """The kernel quantizing q, k and v as it loads them (config: one of `SWEEP`'s tuples, default `_config`)."""
    return _launch(q, k, v, None, is_causal, scale, levels, stages=2, config=config)


def attention8_prequant(q, k, v, is_causal: bool, scale: float | None, levels: float = 127.0,
                        config=None) -> torch.Tensor:
    """`attention8` with k and v quantized first by the row kernel (k: int8 codes and scales, v: its fake-quant
    values; rows contiguous), then the kernel's PREQUANT form: the same output, k / v quantized once instead of once
    per query block, loads the compiler can pipeline (ROBUQ_ATTENTION=prequant)."""
    from .triton_rowquant import fake_quant_rows, quantize_rows_int8
    bits = int(round(math.log2(levels + 1))) + 1
    k8, s_k = quantize_rows_int8(k, bits)  # (b, hk, sk, d) contiguous, (b, hk, sk)
    vh = fake_quant_rows(v, bits, True).contiguous()  # the same values the inline kernel makes
    return _launch(q, k8, vh, s_k, is_causal, scale, levels, stages=3, config=config)


def _launch(q, k, v, s_k, is_causal: bool, scale: float | None, levels: float, stages: int,
            config=None) -> torch.Tensor:
    """out (b, h, sq, d) of `attention8_kernel` (PREQUANT where k's row scales s_k are given: k int8 codes, v its
    fake-quant values); config (BM, BN, warps, stages, maxnreg[, split]) overrides `_config`, `stages` and
    whether a head dim that is no power of two is held as two pieces (`_pieces`; default yes)."""
    b, h, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    # (batch, seq, heads, head_dim) memory viewed as (batch, heads, seq, head_dim): the usual next step,
    # out.transpose(1, 2).reshape(batch, seq, heads * head_dim), is then a view, not a copy
    out = torch.empty(b, sq, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    if out.numel() == 0:
        return out
    sm = (1.0 / math.sqrt(d)) if scale is None else float(scale)
    bm, bn, warps = _config(d, sq)
    extra, split = {}, True
    if config is not None:
        bm, bn, warps, stages, maxnreg, *rest = config
        split = rest[0] if rest else True
        if maxnreg:
            extra["maxnreg"] = maxnreg
    dp, de, dv = _pieces(d, split)
    grid = (triton.cdiv(sq, bm), b * h)
    ctx = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    align = 8 if _rows_aligned((q, k, v, out), 8) else 1
    with ctx:
        attention8_kernel[grid](q, k, v, out, q if s_k is None else s_k, *q.stride(), *k.stride(), *v.stride(),
                                *out.stride(), h, hk, sq, sk, sm * _LOG2E, levels,
                                D=d, CAUSAL=bool(is_causal), BM=bm, BN=bn, DP=dp, ALIGN=align,
                                PREQUANT=s_k is not None, SPLIT=de > 0, DE=de or 32, DV=dv or 16,
                                num_warps=warps, num_stages=stages,
                                **extra)
    return out


def _rows_aligned(tensors, align: int) -> bool:
    """Every row of each (b, h, s, d) tensor starts a multiple of `align` elements past a base aligned to 16 bytes
    (contiguous rows; every other stride a multiple of align); what the kernels' ALIGN hint promises."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(st % align == 0 for st in t.stride()[:-1])
               for t in tensors)
