"""`robuq::attention8`: scaled-dot-product attention on per-token 8-bit q, k, v (METHOD.md §5), the inference form of
an attention rule (`attn_bits: 8`). Lowering replaces "fake-quant q, k, v -> SDPA" by this one op.

    attention8(q, k, v (batch, heads, seq, head_dim), attn_mask?, dropout_p, is_causal, scale?, enable_gqa, bits)
        = SDPA(Q_a(q), Q_a(k), Q_a(v), ...)      Q_a: symmetric absmax, one scale per token and head, `bits` bits

Reference (any device): exactly the QAT graph's calls, `robuq::fake_quant_act` on q, k, v then
`F.scaled_dot_product_attention`, so a lowered model stays bit-identical to its QAT model in eval mode. On CUDA
`fake_quant_act` is one Triton kernel per tensor (kernels/triton_rowquant.py, bit-identical to the torch math) and
SDPA runs torch's flash kernel. The default CUDA path computes the same values, quantizing each tensor in its own
memory order (q, k, v usually are (batch, heads, seq, dim) views of (batch, seq, heads, dim) memory) instead of
through the op's contiguous copy; where q, k and v are the thirds of one fused qkv output (`qkv_union`, the lowered
DiT), all three in one launch over that buffer. (The opt-in Inductor decomposition quantizes them one by one.)

`ROBUQ_ATTENTION=fused` runs the single Triton flash kernel of `triton_attention8.py` instead (`prequant`: k and v
quantized first by the row kernel, then the flash kernel with q quantized inside; the same output) (quantization while
loading, q.k on int8 tensor cores) for the calls it takes. Unset, it runs where the dispatch table says it measured
faster (`dispatch.attention_choice`, written by `bench_attention.py --sweep --write-dispatch`; on the H200 through
session 14 it was slower than quantize + flash SDPA at every measured shape, docs/gpu.md); ROBUQ_ATTENTION=rows forces
the row kernel + SDPA.
Calls no GPU path takes (masks, dropout, fp32, odd head dims) run the reference; lowering warns once per such
module (passes/attention.py). ROBUQ_ATTENTION=reference forces the reference everywhere.

The output is laid out as (batch, seq, heads, head_dim) and viewed as (batch, heads, seq, head_dim): the usual next
step, `out.transpose(1, 2).reshape(batch, seq, -1)`, is then free.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..ops import row_kernel

_LIB = torch.library.Library("robuq", "FRAGMENT")
_LIB.define("attention8(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, bool is_causal, "
            "float? scale, bool enable_gqa, int bits) -> Tensor")


def _layout(out: torch.Tensor) -> torch.Tensor:
    """`out` (b, h, s, d) with (b, s, h, d) memory, as the kernel writes it (SDPA's flash kernel already does)."""
    if out.dim() != 4:
        return out.contiguous()
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _quantized_sdpa(quant, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """SDPA on quant(q), quant(k), quant(v), the output in the op's layout."""
    return _sdpa(quant(q), quant(k), quant(v), attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    kw = {"enable_gqa": True} if enable_gqa else {}
    return _layout(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, **kw))


def reference(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, bits):
    def fq(t):
        return torch.ops.robuq.fake_quant_act.default(t, bits, True, "absmax")
    return _quantized_sdpa(fq, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def why_not_kernel(q, k, v, attn_mask, dropout_p, bits) -> str | None:
    """None if the fused GPU kernel can take this call, else why not."""
    if not q.is_cuda:
        return "inputs are not CUDA tensors"
    from .triton_fp8 import _triton_reason
    why = _triton_reason()
    if why:
        return why
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "CUDA capability < 8.0 (int8 tensor cores)"
    from . import triton_attention8
    return triton_attention8.supported(q, k, v, attn_mask, dropout_p, bits)


def qkv_union(q, k, v) -> torch.Tensor | None:
    """The (batch, seq, 3 * heads, head_dim) view of memory whose thirds along dim 2 are q, k and v, when they are
    exactly that: the lowered DiT's attention reads q, k, v as (batch, heads, seq, head_dim) views of one fused
    to_q/to_k/to_v output (passes/fuse.py), each token's row holding q's heads, then k's, then v's. Else None.
    Quantizing that one dense view is one launch over rows in memory order instead of three strided ones."""
    if q.dim() != 4 or not (q.shape == k.shape == v.shape) or not (q.stride() == k.stride() == v.stride()):
        return None
    b, h, s, d = q.shape
    sb, sh, ss, sd = q.stride()
    if sd != 1 or sh != d or ss != 3 * h * d or (b > 1 and sb != s * ss) or q.dtype != k.dtype or q.dtype != v.dtype:
        return None
    st = q.untyped_storage().data_ptr()
    if k.untyped_storage().data_ptr() != st or v.untyped_storage().data_ptr() != st:
        return None
    o = q.storage_offset()
    if k.storage_offset() != o + h * d or v.storage_offset() != o + 2 * h * d:
        return None
    return q.as_strided((b, s, 3 * h, d), (s * ss, ss, d, 1), o)


def _flash_choice(q, k, is_causal) -> tuple[str, tuple | None] | None:
    """(form, config) of the flash kernel for this call: ROBUQ_ATTENTION=fused / prequant forces that form (its
    default config), =rows / reference none; unset, the dispatch table's measured choice (`dispatch.attention_choice`)."""
    mode = os.environ.get("ROBUQ_ATTENTION")
    if mode in ("fused", "prequant"):
        return mode, None
    if mode or q.dim() != 4:
        return None
    from .dispatch import attention_choice
    return attention_choice(q.shape[-1], bool(is_causal), q.shape[0] * q.shape[1] * q.shape[2])


def _cuda(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, bits):
    choice = _flash_choice(q, k, is_causal)
    if choice is not None and (enable_gqa or q.shape[1] == k.shape[1]) \
            and why_not_kernel(q, k, v, attn_mask, dropout_p, bits) is None:
        from . import triton_attention8
        fn = triton_attention8.attention8 if choice[0] == "fused" else triton_attention8.attention8_prequant
        return fn(q, k, v, is_causal, scale, float(2 ** (bits - 1) - 1), config=choice[1])
    rows = row_kernel()
    if rows is not None and all(rows.supported(t, bits) is None for t in (q, k, v)) \
            and os.environ.get("ROBUQ_ATTENTION") != "reference":
        union = qkv_union(q, k, v)
        if union is not None and rows.supported(union, bits) is None:  # q, k, v: one launch, rows in memory order
            h = q.shape[1]
            qkv = rows.fake_quant_rows(union, bits, True)
            parts = [qkv.narrow(2, i * h, h).transpose(1, 2) for i in range(3)]  # q's own strides
            return _sdpa(*parts, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        # the reference's values, each tensor quantized in its own memory order (no transposing copy)
        def fq(t):
            return rows.fake_quant_rows(t, bits, True, keep_layout=True)
        return _quantized_sdpa(fq, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return reference(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, bits)


_LIB.impl("attention8", reference, "CompositeExplicitAutograd")
_LIB.impl("attention8", _cuda, "CUDA")


@torch.library.register_fake("robuq::attention8", lib=_LIB)
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, bits):
    from . import inductor
    inductor.register()  # as robuq::qlinear's fake kernel
    shape = (*q.shape[:-1], v.shape[-1])
    if len(shape) != 4:
        return q.new_empty(shape)
    b, h, s, d = shape
    return q.new_empty(b, s, h, d).transpose(1, 2)


attention8 = torch.ops.robuq.attention8
