"""Hopper / Ada fp8 path for `robuq::qlinear` (issue #5) and its bf16 fallback. See docs/gpu.md.

Two kernels are registered:

    triton_fp8   (priority 20)  fused Triton activation quantizer (block Hadamard + per-token absmax/min-max +
                                round-half-even + fp8 e4m3 codes) -> fp8 tensor-core GEMM on the weight codes
                                expanded ONCE to fp8 and cached. Symmetric, no low-rank branch: torch._scaled_mm
                                with row-wise scales (s_x per token, s_w per channel), fast accumulation and the
                                bias fused. Asymmetric and/or LRB ("epilogue" in the table): our Triton fp8 GEMM
                                with s_x s_w acc + lo_x c + bias + t A^T fused (t = x (B H)^T: `down_proj`), or
                                _scaled_mm, then t A^T + lo' c added to its output in place by one Triton
                                kernel (kernels/triton_lowrank.py; the table's mode "addmm").
    cuda_dequant (priority 10)  weights dequantized once to the activation dtype (cached); the same Triton
                                quantizer in DEQUANT mode writes Q_a(x H) in that dtype; cuBLAS F.linear. Takes
                                every CUDA call (groups, 8-bit, a_clip='sigma', fp32 ... with torch math where
                                the Triton quantizer does not apply).

Dispatch (`dispatch.py`): `triton_fp8.supports` refuses a call when `dispatch_table.json` (measured by
`benchmarks/bench_linear.py --write-dispatch`) says the dequant path is faster at this (M, N, K), so the registry
falls through to `cuda_dequant`. Forcing `triton_fp8` (ROBUQ_KERNEL / kernels.use) skips that check.
Environment: ROBUQ_FP8_MIN_M=<int> overrides the table's threshold for every shape; ROBUQ_FP8_EPI=addmm|triton
overrides the table's epilogue mode; ROBUQ_FP8_GEMM=triton makes the symmetric case use the Triton GEMM too.

Weight caches (fp8 codes where the buffer is not already them, scales, column sums, B H): `weight_cache.py`. Which
Triton GEMM, config and fused terms (DOWN, the output activation) a call gets: `fp8_gemms.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.nn.functional as F

from .. import layer
from .. import quantizers as Q
from . import block_scaled, fused_quant
from .dispatch import epilogue_mode, fp8_min_m, small_m_max
from .fp8_gemms import _capability, _k, down_in_gemm_ok, out_act_in_gemm, run_fp8_gemm  # noqa: F401 (_k: benchmarks)
from .lrb_stacked import stacked_or_none, takes_stacked
from .qlinear import apply_input_act
from .quantizer import act_quant, on_device, quant_supported
from .reference import spec_of
from .registry import QLinearArgs, forced, register, warn_once
from .weight_cache import (_WCACHE, _Entry, _deq_weight, _fp8_layout, _fp8_weights, _rot_down,  # noqa: F401
                           clear_caches)

FP8 = "triton_fp8"
DEQUANT = "cuda_dequant"


# ---------------------------------------------------------------------------------------------------------------
# machine checks (cheap, cached; never import triton at module import time)

@functools.lru_cache(maxsize=None)
def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


@functools.lru_cache(maxsize=None)
def fp8_machine_check() -> str | None:
    why = _cuda_reason()
    if why:
        return why
    cap = _capability(torch.cuda.current_device())
    if cap < (8, 9):
        return f"CUDA capability {cap[0]}.{cap[1]} < 8.9: no fp8 tensor cores (needs Ada or Hopper)"
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no float8_e4m3fn / _scaled_mm"
    return _triton_reason()


@functools.lru_cache(maxsize=None)
def dequant_machine_check() -> str | None:
    return _cuda_reason()


@functools.lru_cache(maxsize=None)
def _triton_quant_ok(index: int) -> bool:
    return _triton_reason() is None and _capability(index) >= (8, 0)


# ---------------------------------------------------------------------------------------------------------------
# dispatch

def _uses_epilogue(a: QLinearArgs) -> bool:
    """True when the call needs more than _scaled_mm + bias (asymmetric codes or an LRB)."""
    return (not a.a_sym) or a.lrb_down is not None


def _fp8_supports(x: torch.Tensor, a: QLinearArgs) -> str | None:
    if not x.is_cuda:
        return "input is not on a CUDA device"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"activation dtype {x.dtype} (fp8 path takes bf16/fp16)"
    if a.a_bits > 4:
        return f"a_bits={a.a_bits}: codes beyond +-15 are not exact in fp8 e4m3"
    if a.a_group and not block_scaled.takes(a):
        return (f"a_group={a.a_group}: the fp8 path takes per-block activation ranges only with a_group = the "
                f"Hadamard block = 128 and symmetric absmax codes")
    if a.w_bits not in (1.58, 2, 3, 4):
        return f"w_bits={a.w_bits}: codes beyond +-15 are not exact in fp8 e4m3"
    if a.w_scale.dim() != 2 or a.w_scale.shape[1] != 1 or a.w_scale.shape[0] not in (1, a.out_features):
        return f"w_scale shape {tuple(a.w_scale.shape)}: weight groups are not supported by the fp8 path"
    n, k = a.out_features, a.in_features
    if k % 16 or n % 16:
        return f"in/out features ({k}, {n}) must be multiples of 16 for fp8 GEMMs"
    epi = _uses_epilogue(a)
    m = x.numel() // max(k, 1)
    if (epi and epilogue_mode(m, n, k) == "triton" or os.environ.get("ROBUQ_FP8_GEMM") == "triton") and k % 128:
        return f"in_features={k} must be a multiple of 128 for the fused-epilogue fp8 GEMM"
    why = quant_supported(k, a.hadamard_block, a.a_bits, x.dtype, a.a_clip, x.numel() // max(k, 1))
    if why:
        return why
    if forced() != FP8 and not _fp8_layout(a):  # fp8 layout: no 16-bit weight to fall back on, fp8 at every M
        thr = fp8_min_m(n, k, epi)
        if m < thr:
            return f"dispatch: M={m} < {thr}, where the bf16 dequant path is faster for {n}x{k} " \
                   f"(kernels/dispatch_table.json)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# the two paths

_SCALED_MM_BIAS = [True]  # False once this torch refused a bias with row-wise scales


def _scaled_mm(codes, w8, sx, sw, bias):
    """bf16 (M, N) = (codes w8^T) * sx[m] * sw[n] + bias, cuBLAS fp8 with row-wise scales, fast accumulation."""
    if bias is not None and _SCALED_MM_BIAS[0]:
        try:
            return torch._scaled_mm(codes, w8.t(), scale_a=sx.view(-1, 1), scale_b=sw.view(1, -1), bias=bias,
                                    out_dtype=torch.bfloat16, use_fast_accum=True)
        except RuntimeError:
            _SCALED_MM_BIAS[0] = False
    y = torch._scaled_mm(codes, w8.t(), scale_a=sx.view(-1, 1), scale_b=sw.view(1, -1),
                         out_dtype=torch.bfloat16, use_fast_accum=True)
    return y if bias is None else y.add_(bias)


def _up16(a: QLinearArgs, dtype: torch.dtype) -> torch.Tensor:
    """The branch's A (N, r) in `dtype` with contiguous rows, as the epilogue kernels read it."""
    up = a.lrb_up
    return up if up.dtype == dtype and up.is_contiguous() else up.to(dtype).contiguous()


def down_proj(x2: torch.Tensor, bh: torch.Tensor, traced_op=None, act: str = "") -> torch.Tensor:
    """The LRB's t = x (B H)^T (M, r) in x's dtype, accumulated and reduced in fp32, rounded once: our Triton kernel
    where it applies (`triton_lowrank.lrb_down`: x streamed once; cuBLAS took ~2-3x x's bytes at the memory's rate
    on the H200), else cuBLAS with an fp32 output (`mm` out_dtype), which reduces in fp32 whatever
    `torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction` says (F.linear in bf16 may split this
    long-K, narrow-N product and add the partial sums in bf16 where it is on, torch's default; docs/gpu.md).
    traced_op: the kernel's triton_op (`robuq::lrb_down`), which the Inductor decomposition passes to trace it.
    act: the layer's input activation (robuq::qlinear's input_act), applied to x2 first (in the kernel, where it
    runs)."""
    if x2.is_cuda and _triton_reason() is None:
        from .triton_lowrank import lrb_down, lrb_down_ok
        if lrb_down_ok(x2, bh):
            if traced_op is not None:
                return traced_op(x2, bh, act)
            t = torch.empty(x2.shape[0], bh.shape[0], device=x2.device, dtype=x2.dtype)
            with on_device(x2.device):
                lrb_down(x2, bh, t, act=act)
            return t
    if act:
        x2 = apply_input_act(x2, act)
    if x2.is_cuda and x2.dtype in (torch.bfloat16, torch.float16) and _MM_OUT_DTYPE:
        return torch.mm(x2, bh.t(), out_dtype=torch.float32).to(x2.dtype)
    return F.linear(x2, bh)


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=) (torch >= 2.8)


def m_store(m: int) -> int:
    """Rows the activation codes and scales are allocated with: M rounded up to 16, at least 16 (the GEMMs' row
    tiles read whole 16-row groups; the padding rows' codes and scales are zeros)."""
    return max(16, -(-m // 16) * 16)


def _small_m_ok(x: torch.Tensor, a: QLinearArgs, m: int) -> bool:
    """The single-kernel path takes this call (dispatch.small_m_max; absmax ranges, K in Hadamard-block chunks)."""
    if (m == 0 or m > small_m_max() or a.a_clip != "absmax" or x.dtype not in (torch.bfloat16, torch.float16)
            or a.a_group):
        return False
    from .triton_qgemm_small import chunk_of
    return chunk_of(a.in_features, a.hadamard_block) > 0 and (a.lrb_down is None or a.lrb_down.shape[0] <= 64) \
        and (a.qweight.dtype != torch.float8_e4m3fn or a.qweight.is_contiguous())  # K-byte weight rows


def _small_m_args(x2: torch.Tensor, a: QLinearArgs, e: "_Entry", m: int, y: torch.Tensor) -> tuple:
    """The arguments of `triton_qgemm_small.launch_qgemm_small` for this call (y: its (m, N) output); the branch
    factors and the bias in x's dtype, converted where they are not (kernels/fastcall.py binds only calls that
    need no conversion)."""
    from ..hadamard import hadamard_matrix
    dt = x2.dtype
    h = hadamard_matrix(a.hadamard_block, dt, x2.device) if a.hadamard_block > 1 else None
    down = up = None
    if a.lrb_down is not None:
        down, up = (t if t.dtype == dt and t.is_contiguous() else t.to(dt).contiguous() for t in (a.lrb_down, a.lrb_up))
    bias = a.bias if a.bias is None or a.bias.dtype == dt else a.bias.to(dt)
    return (x2, h, e.fp8, y, e.sw, bias, None if a.a_sym else e.cs, down, up, m, Q.act_levels(a.a_bits, a.a_sym),
            a.hadamard_block, a.a_sym)


def _small_m(x2: torch.Tensor, a: QLinearArgs, e: "_Entry", m: int) -> torch.Tensor:
    from . import triton_qgemm_small as S
    y = torch.empty(m, a.out_features, device=x2.device, dtype=x2.dtype)
    with on_device(x2.device):
        S.launch_qgemm_small(*_small_m_args(x2, a, e, m, y))
    return y


def fp8_qlinear(x: torch.Tensor, a: QLinearArgs) -> torch.Tensor:
    """The triton_fp8 kernel's entry: a repeated plain eager call (e.g. the op inside a default-mode compiled graph)
    runs its bound form, kept on the weight's cache entry (kernels/fastcall.py); anything else `_fp8_qlinear`."""
    from .fastcall import call
    return call(x, a, _fp8_qlinear)


def _fp8_qlinear(x: torch.Tensor, a: QLinearArgs) -> torch.Tensor:
    k, n = a.in_features, a.out_features
    m = x.numel() // k
    small = _small_m_ok(x, a, m)
    if a.output_act and (small or not out_act_in_gemm(a, m)):
        # the output activation goes into the Triton GEMM's store (out_act_in_gemm); every other path writes y,
        # then the activation runs as the model's GELU module ran it
        return apply_input_act(_fp8_qlinear(x, dataclasses.replace(a, output_act="")), a.output_act)
    lead = x.shape[:-1]
    if a.input_act and small:  # the small-M kernel has no activation: materialize it first
        x, a = apply_input_act(x, a.input_act), dataclasses.replace(a, input_act="")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    e = _fp8_weights(a)
    if a.a_group:  # per-block ranges (`block_scaled.takes`: _fp8_supports took the call only then)
        if a.input_act:
            x2, a = apply_input_act(x2, a.input_act), dataclasses.replace(a, input_act="")
        y = block_scaled.qlinear(x2, a, e, m)
        return y if x.dim() == 2 else y.reshape(*lead, n)
    if small:  # one kernel: quantize + GEMM + epilogue
        y = _small_m(x2, a, e, m)
        return y if x.dim() == 2 else y.reshape(*lead, n)
    mode = fused_quant.takes(x2, a, e) if m and not a.output_act else None
    if mode:  # the quantizer inside the GEMM (kernels/gluon_qgemm*.py): forced, or where the table picks it
        y = fused_quant.run(x2, a, e, m, n, mode)
        if y is not None:
            return y if x.dim() == 2 else y.reshape(*lead, n)
    m_pad = m_store(m)
    lrb = a.lrb_down is not None
    if takes_stacked(a, m):
        y = stacked_or_none(x2, a, e, _rot_down(a, x2.dtype), m_pad)
        if y is not None:
            return y if x.dim() == 2 else y.reshape(*lead, n)
    codes, sx, lo = act_quant(x2, a.hadamard_block, a.a_bits, a.a_sym, m_store=m_pad, shift=True, clip=a.a_clip,
                              act=a.input_act)  # the input activation applied while loading x
    epi_addmm = epilogue_mode(m, n, k) == "addmm"
    bh = _rot_down(a, x.dtype) if lrb else None
    down = (x2, bh) if down_in_gemm_ok(x2, bh, a, m) else None
    # the branch reads act(x) too; or the GEMM computes t itself (down)
    t = down_proj(x2, bh, act=a.input_act) if lrb and down is None else None
    if (a.a_sym and not lrb) or epi_addmm:
        if (a.output_act or os.environ.get("ROBUQ_FP8_GEMM") == "triton") and a.a_sym and not lrb:
            y = torch.empty(m, n, device=x.device, dtype=x.dtype)  # the output activation in the Triton GEMM's store
            if m:
                with on_device(x.device):
                    run_fp8_gemm(codes, e.fp8, y, sx, e.sw, a.bias, None, None, None, None, m,
                                 out_act=a.output_act)
            return y if x.dim() == 2 else y.reshape(*lead, n)
        bias = None if a.bias is None else a.bias.to(torch.bfloat16)
        y = _scaled_mm(codes, e.fp8, sx, e.sw, bias)
        if m != m_pad:
            y = y[:m]
        if lrb or not a.a_sym:  # + t A^T + lo' c in place, one rounding (kernels/triton_lowrank.py)
            from .triton_lowrank import lowrank_add
            t16, up16 = (t.to(torch.bfloat16), _up16(a, torch.bfloat16)) if lrb else (None, None)
            with on_device(x.device):
                lowrank_add(y, y, t16, up16, None if a.a_sym else lo, None if a.a_sym else e.cs)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
    else:
        up = _up16(a, x.dtype) if lrb else None
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        if m:
            with on_device(x.device):
                run_fp8_gemm(codes, e.fp8, y, sx, e.sw, a.bias, None if a.a_sym else lo, None if a.a_sym else e.cs,
                             t, up, m, down=down, out_act=a.output_act)
    return y if x.dim() == 2 else y.reshape(*lead, n)


def _dequant_supports(x: torch.Tensor, a: QLinearArgs) -> str | None:
    return None if x.is_cuda else "input is not on a CUDA device"


def dequant_qlinear(x: torch.Tensor, a: QLinearArgs) -> torch.Tensor:
    k, n = a.in_features, a.out_features
    wq = _deq_weight(a, x.dtype)
    if a.a_group and a.a_bits < 16:
        warn_once(f"robuq_fx: layers with a_group={a.a_group} (per-group activation scales) run the reference math "
                  "on the GPU: the fp8 path takes only a_group = Hadamard block = 128 with symmetric absmax codes")
    fused = (a.a_bits < 16 and not a.a_group and _triton_quant_ok(x.device.index or 0)
             and quant_supported(k, a.hadamard_block, a.a_bits, x.dtype, a.a_clip, x.numel() // max(k, 1)) is None)
    if not fused:  # the reference math with the cached dequantized weight: bit-identical to `reference`
        return layer.robuq_linear(x, wq, a.bias, a.lrb_down, a.lrb_up, spec_of(a), a.splits)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    xq, _, _ = act_quant(x2, a.hadamard_block, a.a_bits, a.a_sym, dequant=True, clip=a.a_clip)
    y = F.linear(xq, wq, a.bias)
    if a.lrb_down is not None:
        y.addmm_(down_proj(x2, _rot_down(a, x.dtype)), a.lrb_up.to(x.dtype).t())
    return y.reshape(*lead, n)


register(FP8, priority=20, machine_check=fp8_machine_check, supports=_fp8_supports,
         takes="bf16/fp16 input, W1.58/2/3/4, A1-4 absmax or sigma (sym/asym), per-channel or per-tensor scales, LRB, "
               "K and N % 16 == 0, M above the dispatch threshold; activation codes equal to the reference's except "
               "where fp32 Hadamard sums round differently (tested >= 99.9% equal), exact integer GEMM. Paths: "
               "_scaled_mm, or a Triton GEMM with the asymmetric / LRB epilogue (pointer or persistent TMA kernel, "
               "dispatch table 'gemm_kernel'); up to 'small_m_fused_max_m' rows one kernel does it all; an input_act "
               "(GELU) applied by the quantizer while it loads x, an output_act by the Triton GEMM's store; "
               "a_group = Hadamard block = 128 (symmetric absmax): the block quantizer and the block-scaled "
               "GEMM")(fp8_qlinear)


def _bind(x: torch.Tensor, a: QLinearArgs):
    from .fastcall import bind
    return bind(x, a)


fp8_qlinear.bind = _bind  # PackedLinear's eager fast path binds repeated calls (kernels/fastcall.py)
fp8_qlinear.fuses_input_act = True  # the quantizer applies robuq::qlinear's input_act while loading x
fp8_qlinear.fuses_output_act = True  # the Triton GEMM applies output_act in its store, other paths after it

register(DEQUANT, priority=10, machine_check=dequant_machine_check, supports=_dequant_supports,
         takes="every CUDA call: Triton quantizer (same codes as triton_fp8) + cuBLAS on dequantized weights; "
               "the reference math where the quantizer does not apply")(dequant_qlinear)
