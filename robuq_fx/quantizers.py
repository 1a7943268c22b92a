"""The quantization math: the one copy that QAT, lowering, the reference kernel, GPU-kernel tests and benchmarks use.

Formulas follow ../shared/METHOD.md §2-3. Rounding is `torch.round` (half to even) of a true division, so a GPU
kernel that wants identical codes must divide exactly (IEEE `div_rn`, not an approximate reciprocal) and round
half-to-even (`rint`).

Weights (per output channel by default; R is the residual after the Hadamard rotation and the low-rank branch):
    ternary (1.58):  s = clamp_min(mean|R|, 1e-8)          q = clip(round(R / s), -1, 1)
    k-bit (2,3,4,8): s = clamp_min(max|R|, 1e-8) / qmax     q = clip(round(R / s), -qmax, qmax),  qmax = 2^(k-1)-1
    Q_w(R) = s * q                      (group_size g: one s per g consecutive inputs of a row)
    all in fp32 whatever R's dtype (a bf16 R under autocast too), q s rounded once to R's dtype

Activations (per token = per row of the last dimension, dynamic; with a group g (`LayerSpec.a_group`), per token
and each g consecutive inputs: the same formulas on every (token, group) slice, one scale / offset each):
    symmetric  (a_bits >= 3 default): r = max|x| (or |mu| + c*sigma, capped at max|x|), s = r / qmax,
               q = clamp(round(x / s), -qmax, qmax), Q_a(x) = s * q
    asymmetric (always for a_bits <= 2): [lo, hi] = [min x, max x] (or mu -/+ c*sigma, kept inside [min, max]),
               s = (hi - lo) / (2^k - 1), q = clamp(round((x - lo) / s), 0, 2^k - 1), Q_a(x) = lo + s * q
    s == 0 (constant token) gives q = 0 and Q_a(x) = lo (0 when symmetric): never NaN.
    The STE passes gradients where lo <= x <= hi (|x| <= r) and zero elsewhere.
"""
from __future__ import annotations

import functools
import math

import torch

_EPS = 1e-8  # BitNet's absmean epsilon: keeps an all-zero row from dividing by zero (its codes are then 0)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _div(t: torch.Tensor, n: int) -> torch.Tensor:
    """t / n as a true IEEE division on every device (CUDA turns division by a Python scalar into a multiply by
    its reciprocal, which moves values sitting on a rounding tie and flips codes vs the CPU reference)."""
    return t / torch.full_like(t, float(n))


def weight_qmax(w_bits) -> int:
    return 1 if w_bits == 1.58 else 2 ** (int(w_bits) - 1) - 1


def act_levels(a_bits: int, sym: bool) -> int:
    """Largest activation code: qmax = 2^(k-1) - 1 (symmetric, codes in [-qmax, qmax]) or 2^k - 1 (asymmetric,
    codes in [0, 2^k - 1]); the per-token scale is range / this."""
    return 2 ** (a_bits - 1) - 1 if sym else 2 ** a_bits - 1


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype weight quantization computes in: fp32, or `dtype` where that is wider (fp64 in tests)."""
    return torch.promote_types(dtype, torch.float32)


def _grouped(r: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """View R (N, K) as (N', G, K / G) so that one scale covers each [:, g, :] slice."""
    n, k = r.shape
    if granularity == "tensor":
        return r.reshape(1, 1, n * k)
    g = group_size or k
    return r.reshape(n, k // g, g)


def quantize_weight(r: torch.Tensor, w_bits, granularity: str = "channel", group_size: int = 0,
                    scale_dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """R (N, K) -> (codes int8 (N, K), scale (N, G) or (1, 1) in `scale_dtype`). See the module docstring."""
    if r.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight (out_features, in_features), got {tuple(r.shape)}")
    # In fp32 (or R's dtype if wider) whatever R's dtype: a 16-bit R (QAT under autocast) would otherwise give a
    # 16-bit scale and quotient eagerly, which Inductor keeps in fp32 inside its fused kernels, so compiled and eager
    # codes differed (0.065% of ternary codes, session 22); in fp32 they agree, and agree with the lowered model's.
    rg = _grouped(r.detach(), granularity, group_size).to(_wide(r.dtype))
    qmax = weight_qmax(w_bits)
    if w_bits == 1.58:
        s = rg.abs().mean(dim=-1, keepdim=True).clamp_min(_EPS)
    else:
        s = _div(rg.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS), qmax)
    # Round the scale to its storage dtype before computing codes, so QAT and the packed model agree exactly.
    s = s.to(_DTYPES[scale_dtype]).to(rg.dtype)
    # A scale that underflows to 0 in a 16-bit scale_dtype (eps 1e-8 is below fp16's range) would make R / s
    # NaN, whose int8 cast is undefined: divide by 1 there (codes round(R) of a row that tiny are 0, Q_w = 0 s = 0).
    codes = torch.round(rg / torch.where(s > 0, s, torch.ones_like(s))).clamp_(-qmax, qmax)
    return codes.to(torch.int8).reshape(r.shape), s.squeeze(-1).to(_DTYPES[scale_dtype])


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes (N, K) int, scale (N, G) or (1, 1) -> s * q in `dtype`, shape (N, K): the product in fp32 (or `dtype`
    if wider), rounded once to `dtype` (as a GEMM epilogue or an Inductor kernel computes it)."""
    n, k = codes.shape
    ct = _wide(dtype)
    if scale.shape == (1, 1):
        return (codes.to(ct) * scale.to(ct)).to(dtype)
    g = scale.shape[1]
    return (codes.to(ct).reshape(n, g, k // g) * scale.to(ct).unsqueeze(-1)).reshape(n, k).to(dtype)


def fake_quant_weight(r: torch.Tensor, w_bits, granularity: str = "channel", group_size: int = 0,
                      scale_dtype: str = "float32") -> torch.Tensor:
    """Q_w(R) = s * q, in R's dtype (forward of the weight STE)."""
    codes, scale = quantize_weight(r, w_bits, granularity, group_size, scale_dtype)
    return dequantize_weight(codes, scale, r.dtype)


@torch.compiler.assume_constant_result  # Dynamo calls it and keeps the float (it traced the body: 5 graph breaks)
def gaussian_clip(levels: int) -> float:
    """Half-range c of the MSE-optimal uniform quantizer with `levels` evenly spaced output levels on
    [-c, c] for a standard normal input (nearest-level rounding, clipping beyond the end levels).

    Found numerically (golden-section search over c on a fine integration grid) rather than copied from a
    table; `tests/test_quantizers.py` checks it against Max (1960): 2 levels -> 0.798, 4 -> 1.494, 8 -> 2.051,
    16 -> 2.514. A number, not a tensor of the caller's graph: made with every tracing mode off, so that a call
    made while a graph is traced (the kernels' Inductor decompositions: the first sigma-clipped layer a process
    compiles) computes it instead of recording its grid and failing on the float (before session 13 that failure
    left every sigma-clipped qlinear opaque under torch.compile in a process that compiled before any eager call).
    """
    if levels < 2:
        raise ValueError(f"gaussian_clip needs at least 2 levels, got {levels}")
    return _gaussian_clip_grid(levels)


@functools.lru_cache(maxsize=None)
def _gaussian_clip_grid(levels: int) -> float:
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
        return _golden_section(levels)


def _golden_section(levels: int) -> float:
    x = torch.linspace(-14.0, 14.0, 400_001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    dx = float(x[1] - x[0])

    def mse(c: float) -> float:
        step = 2 * c / (levels - 1)
        q = torch.round((x + c) / step).clamp(0, levels - 1) * step - c
        return float(((x - q) ** 2 * pdf).sum() * dx)

    lo, hi = 1e-3, 12.0
    phi = (math.sqrt(5) - 1) / 2
    a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
    fa, fb = mse(a), mse(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - phi * (hi - lo)
            fa = mse(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + phi * (hi - lo)
            fb = mse(b)
    return (lo + hi) / 2


def act_range(x: torch.Tensor, a_bits: int, sym: bool, clip: str = "absmax"):
    """Per-token quantization range, computed in fp32: returns (lo, hi), each (..., 1).
    Symmetric ranges are [-r, r]."""
    x32 = x.float()
    if clip == "absmax":
        if sym:
            r = x32.abs().amax(dim=-1, keepdim=True)
            return -r, r
        return x32.amin(dim=-1, keepdim=True), x32.amax(dim=-1, keepdim=True)
    if clip != "sigma":
        raise ValueError(f"a_clip={clip!r}: expected 'absmax' or 'sigma'")
    mu = x32.mean(dim=-1, keepdim=True)
    sigma = x32.std(dim=-1, keepdim=True, unbiased=False)
    if sym:
        c = gaussian_clip(2 ** a_bits - 1)
        r = torch.minimum(mu.abs() + c * sigma, x32.abs().amax(dim=-1, keepdim=True))
        return -r, r
    c = gaussian_clip(2 ** a_bits)
    lo = torch.maximum(mu - c * sigma, x32.amin(dim=-1, keepdim=True))
    hi = torch.minimum(mu + c * sigma, x32.amax(dim=-1, keepdim=True))
    return lo, hi


def _act_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """x (..., K) viewed as (..., K / group, group): one activation range per slice of the last dimension."""
    k = x.shape[-1]
    if k % group:
        raise ValueError(f"activation group {group} does not divide the last dimension {k}")
    return x.reshape(*x.shape[:-1], k // group, group)


def quantize_act(x: torch.Tensor, a_bits: int, sym: bool, clip: str = "absmax", group: int = 0):
    """x (..., K) -> (codes fp32 (..., K) holding integers, scale (..., 1), lo (..., 1)), all fp32; with a group g,
    scale and lo are (..., K / g), one per (token, group).

    Symmetric: codes in [-qmax, qmax], x ~ scale * codes (lo is -r, unused by dequantize).
    Asymmetric: codes in [0, 2^k - 1], x ~ lo + scale * codes.
    """
    if group:
        q, s, lo = quantize_act(_act_groups(x, group), a_bits, sym, clip)
        return q.reshape(x.shape), s.squeeze(-1), lo.squeeze(-1)
    lo, hi = act_range(x, a_bits, sym, clip)
    x32 = x.float()
    if sym:
        qmax = act_levels(a_bits, True)
        s = _div(hi, qmax)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(x32 / safe).clamp_(-qmax, qmax)
    else:
        levels = act_levels(a_bits, False)
        s = _div(hi - lo, levels)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round((x32 - lo) / safe).clamp_(0, levels)
    return q, s, lo


def dequantize_act(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, sym: bool,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out = scale * q if sym else lo + scale * q
    return out.to(dtype)


def fake_quant_act(x: torch.Tensor, a_bits: int, sym: bool, clip: str = "absmax", group: int = 0) -> torch.Tensor:
    """Q_a(x) in x's dtype (forward of the activation STE); a_bits=16 is the identity. group: `quantize_act`."""
    if a_bits >= 16:
        return x
    if group:
        return fake_quant_act(_act_groups(x, group), a_bits, sym, clip).reshape(x.shape)
    q, s, lo = quantize_act(x, a_bits, sym, clip)
    return dequantize_act(q, s, lo, sym, x.dtype)


def act_ste_mask(x: torch.Tensor, a_bits: int, sym: bool, clip: str = "absmax", group: int = 0) -> torch.Tensor:
    """Where the activation STE lets the gradient through: inside the per-token (per-group) range."""
    if a_bits >= 16:
        return torch.ones_like(x, dtype=torch.bool)
    if group:
        return act_ste_mask(_act_groups(x, group), a_bits, sym, clip).reshape(x.shape)
    lo, hi = act_range(x, a_bits, sym, clip)
    x32 = x.float()
    return (x32 >= lo) & (x32 <= hi)


def weight_code_colsum(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """c[n] = sum_k s_w[n, k] q_w[n, k] in fp32: the asymmetric-activation epilogue term (METHOD.md §3),
    y = s_x * (q_x @ (s_w q_w)^T) + lo_x * c."""
    return dequantize_weight(codes, scale, torch.float64).sum(dim=1).float()
