"""Host side of the Triton activation quantizer (`triton_act_quant.py`): which tiling a row length takes, whether a
call fits it, and the launch. Used by the fp8 and dequant qlinear paths (`triton_fp8.py`), the benchmarks and the
GPU tests; importing it does not import triton (the kernel module is loaded on the first launch).

    act_quant(x2, block, a_bits, sym, ...) -> (fp8 codes or Q_a(x H), scale, lo)     see its docstring
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from .. import quantizers as Q
from . import triton_launch  # imports no triton
from .dispatch import dispatch_table, m_bucket

_NULL = contextlib.nullcontext()


def on_device(dev: torch.device):
    """Make `dev` current for a Triton launch (a no-op context when it already is)."""
    return _NULL if dev.index is None or dev.index == torch.cuda.current_device() else torch.cuda.device(dev)


def _aq():
    """The Triton activation-quantizer module, imported on first use."""
    from . import triton_act_quant
    return triton_act_quant


_DEFAULT_WARPS_SPLIT = 2048  # default tiling: one row a program, 1 warp up to this K, else 2 (best on H100/H200)


@functools.lru_cache(maxsize=None)
def make_plan(k: int, block: int, bm: int, warps: int, chunk: int = 0) -> tuple | None:
    """(piece widths, BM, num_warps, chunk) for `act_quant_bfly_kernel`, or None when K / block do not fit: K must
    split into at most four power-of-two pieces, each a multiple of max(block, 16) (1152 = 1024 + 128,
    4608 = 4096 + 512). chunk > 0 (a power of two dividing K, a multiple of the block): the two-pass kernel."""
    block = block if block > 1 else 0
    if block and (block & (block - 1) or block > 1024):
        return None
    if bm < 1 or bm & (bm - 1) or warps not in (1, 2, 4, 8, 16):
        return None
    unit = max(block, 16)
    if k % unit:
        return None
    n = k // unit
    widths = tuple(unit << i for i in reversed(range(n.bit_length())) if n >> i & 1)
    if len(widths) > 4:
        return None
    if chunk and (chunk & (chunk - 1) or k % chunk or chunk % unit):
        return None
    return widths, bm, warps, chunk


def quant_plan(k: int, block: int, m: int = 16384) -> tuple | None:
    """The tiling for (K, block) at M rows: measured choice from dispatch_table.json ("quant": [BM, warps, chunk]),
    else one row a program with 1 (K <= 2048) or 2 warps (K <= 8192), or for longer rows the two-pass kernel."""
    had = "h" if block > 1 else "n"
    tuned = dispatch_table().get("quant", {}).get(f"{k}/{had}", {}).get(str(m_bucket(m)))
    if tuned and len(tuned) in (2, 3):
        plan = make_plan(k, block, *(int(v) for v in tuned))
        if plan is not None:
            return plan
    if k <= 8192:
        return make_plan(k, block, 1, 1 if k <= _DEFAULT_WARPS_SPLIT else 2)
    chunk = 1024  # long rows: two passes over chunks, so a thread never holds more than 32 values
    while chunk > 16 and k % chunk:
        chunk //= 2
    return make_plan(k, block, 1, 1, chunk) or make_plan(k, block, 1, 4)


@functools.lru_cache(maxsize=None)
def _hscale(block: int, dtype: torch.dtype) -> float:
    """The normalization 1/sqrt(b) as `hadamard.hadamard_matrix(b, dtype)` stores it (rounded to dtype). A number made
    with the tracing modes off: a first call while a graph is traced (an Inductor decomposition's launch) otherwise
    records its float64 CPU tensor as a dead constant of that graph."""
    if block <= 1:
        return 1.0
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
        return float(torch.tensor(1.0 / block ** 0.5, dtype=torch.float64).to(dtype))


def quant_supported(k: int, block: int, a_bits: int, dtype: torch.dtype, clip: str = "absmax",
                    m: int = 16384) -> str | None:
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activation dtype {dtype} (needs bf16/fp16/fp32)"
    if not 1 <= a_bits <= 8:
        return f"a_bits={a_bits}"
    if clip not in ("absmax", "sigma"):
        return f"a_clip={clip!r}"
    if make_plan(k, block if block > 1 else 0, 1, 4) is None:
        return f"in_features={k} with Hadamard block {block} does not fit the Triton quantizer's tiling"
    if clip == "sigma" and _sigma_plan(k, block, m) is None:
        return f"a_clip='sigma' with in_features={k}: rows this long take the two-pass quantizer, which has no sigma"
    return None


_ROOMY_PER_THREAD = 72  # most row values a thread holds in a one-pass plan of the register-hungry forms


def _roomy_plan(k: int, block: int, m: int, one_pass: bool) -> tuple | None:
    """The tiling for the quantizer's register-hungry forms: `sigma` ranges (mean and deviation of the whole row in
    registers: one pass only) and an input activation (GELU's erf / tanh on every value). The tuned absmax plan
    where it is two-pass (and that is allowed) or a thread holds at most `_ROOMY_PER_THREAD` values, else one row a
    program on the fewest warps that keep to it. Offline sm_90 compiles (session 13) at K = 4608 on the table's one
    warp (144 values a thread): absmax 188 registers, no spills; sigma 255 registers and 183 spill stores; GELU 255
    and 18-22; on 2 warps none of them spills (165 / 159 registers)."""
    block = block if block > 1 else 0
    plan = quant_plan(k, block, m)
    if plan is not None and (not one_pass if plan[3] else k * plan[1] <= _ROOMY_PER_THREAD * 32 * plan[2]):
        return plan
    warps = 1
    while k > _ROOMY_PER_THREAD * 32 * warps and warps < 4:
        warps *= 2
    if k <= _ROOMY_PER_THREAD * 32 * warps:
        return make_plan(k, block, 1, warps)
    return None if one_pass else plan


def _sigma_plan(k: int, block: int, m: int) -> tuple | None:
    """A one-pass tiling for `sigma` ranges (`_roomy_plan`), None where rows are too long for one."""
    return _roomy_plan(k, block, m, one_pass=True)


def act_quant(x2: torch.Tensor, block: int, a_bits: int, sym: bool, dequant: bool = False,
              m_store: int | None = None, shift: bool = False, plan: tuple | None = None, clip: str = "absmax",
              traced: bool = False, act: str = "", out: torch.Tensor | None = None):
    """Fused x H -> per-token quantization of a 2-D (M, K) CUDA tensor (last dim contiguous).

    Returns (out, scale, lo): out (m_store, K) fp8 e4m3 codes, or Q_a(x H) in x's dtype when `dequant`;
    scale and lo (m_store,) fp32. Rows M..m_store-1 (padding) are written as zeros with scale 0. With `shift`
    (asymmetric only) the codes are centred, q - z with z the row's code of 0, and lo is lo + z * scale. `traced`:
    record the launch for torch.compile (called inside the `robuq::act_quant` triton_op, kernels/inductor.py). `act`: an
    input activation applied while loading x (robuq::qlinear's input_act: "gelu", "gelu_tanh"). `out`: where the
    codes go, (m_store, K) with contiguous rows of any stride (e.g. the last K columns of a wider buffer)."""
    m, k = x2.shape
    m_store = m if m_store is None else m_store
    dev = x2.device
    if out is None:
        out = torch.empty(m_store, k, device=dev, dtype=x2.dtype if dequant else torch.float8_e4m3fn)
    scale = torch.empty(m_store, device=dev, dtype=torch.float32)
    lo = torch.empty(m_store, device=dev, dtype=torch.float32)
    if m_store == 0:
        return out, scale, lo
    launcher = triton_launch.traced if traced else triton_launch.launch
    with _NULL if traced else on_device(dev):  # a traced launch has no device to switch to
        launcher(*act_quant_spec(x2, out, scale, lo, block, a_bits, sym, dequant, shift, plan, clip, act,
                                 gluon=not traced))  # (Inductor's wrapper launches Triton kernels only)
    return out, scale, lo


def _gq():
    from . import gluon_act_quant
    return gluon_act_quant


def _gluon_plan(x2, block: int, clip: str, dequant: bool, act: str) -> tuple | None:
    """The Gluon quantizer's plan where it takes the call (Hadamard block 128, absmax or sigma ranges, codes out, no
    input activation, 16-bit input, K it tiles) and is chosen, else None (the Triton kernel). Sigma ranges (unless
    ROBUQ_GLUON_SIGMA=0) take the tiling the table measured for absmax ones (the same loads, butterflies and stores;
    two more row sums). Chosen: ROBUQ_QUANT_KERNEL=gluon (its default tiling wherever it applies), =triton never,
    unset: where the dispatch table measured it faster than the Triton kernel's best tiling with equal codes
    ("quant_gluon": [lanes, max columns a thread(, warps)] per K and M bucket, `bench_linear.py --write-dispatch`)."""
    env = os.environ.get("ROBUQ_QUANT_KERNEL")
    if env == "triton":
        return None
    if block != 128 or clip not in ("absmax", "sigma") or dequant or act or x2.dtype not in (torch.bfloat16,
                                                                                           torch.float16):
        return None
    if clip == "sigma" and os.environ.get("ROBUQ_GLUON_SIGMA", "1") == "0":  # (on since session 19's H200 run)
        return None
    k = x2.shape[1]
    if env == "gluon":
        tiling = ()
    else:
        tiling = dispatch_table().get("quant_gluon", {}).get(f"{k}/h", {}).get(str(m_bucket(x2.shape[0])))
        if not tiling:
            return None
    return _gluon_tiling(k, *(int(v) for v in tiling[:3]))


@functools.lru_cache(maxsize=None)
def _gluon_tiling(k: int, lanes: int = 32, max_vt: int = 32, warps: int = 4) -> tuple | None:
    """The Gluon quantizer's plan for a table tiling [lanes, max columns a thread(, warps a program: 4)]."""
    try:
        return _gq().gluon_plan(k, lanes, warps=warps, max_vt=max_vt)
    except ImportError:  # no Gluon in this Triton
        return None


def _mma_here(x2, block: int) -> bool:
    """ROBUQ_QUANT_KERNEL=mma, or (unset) the dispatch table measured the tensor-core-rotation quantizer faster for this
    K and M bucket with the same codes ("quant_mma", `bench_linear.py --write-dispatch`); eager launches only."""
    env = os.environ.get("ROBUQ_QUANT_KERNEL")
    if env:
        return env == "mma"
    return block == 128 and bool(dispatch_table().get("quant_mma", {}).get(f"{x2.shape[1]}/h", {})
                                 .get(str(m_bucket(x2.shape[0]))))


def act_quant_spec(x2, out, scale, lo, block: int, a_bits: int, sym: bool, dequant: bool = False, shift: bool = False,
                   plan: tuple | None = None, clip: str = "absmax", act: str = "", gluon: bool = True) -> tuple:
    """The launch `act_quant` makes into its outputs out / scale / lo (m_store rows): (kernel, grid, runtime args,
    constexprs, options, no_specialize), for `triton_launch.launch` or a caller that binds it (kernels/fastcall.py).
    gluon: the Gluon kernel where ROBUQ_QUANT_KERNEL or the dispatch table selects it (`_gluon_plan`)."""
    m, k = x2.shape
    block = block if block > 1 else 0
    levels = float(Q.act_levels(a_bits, sym))
    sh = bool(shift and not sym and not dequant)  # asymmetric codes centred per row (triton_act_quant's docstring)
    if gluon and plan is None and _mma_here(x2, block):  # the tensor-core rotation (triton_mma_quant.py)
        from ..hadamard import hadamard_matrix
        from .triton_mma_quant import mma_quant_launch, mma_quant_ok
        if mma_quant_ok(x2, block, sym, clip, dequant):  # (symmetric codes: lo is not written)
            return mma_quant_launch(x2, hadamard_matrix(block, x2.dtype, x2.device), out, scale, out.shape[0],
                                    levels, act)
    sigma = clip == "sigma"
    # sigma: c of the MSE-optimal uniform quantizer of a normal with the code count of this range (quantizers.py)
    clip_c = Q.gaussian_clip(2 ** a_bits - 1 if sym else 2 ** a_bits) if sigma else 0.0
    g = _gluon_plan(x2, block, clip, dequant, act) if gluon and plan is None else None
    if g is not None:  # the Gluon kernel with hand-picked layouts, where the table or ROBUQ_QUANT_KERNEL picks it
        return _gq().act_quant_gluon_launch(x2, out, scale, lo, m, out.shape[0], _hscale(block, x2.dtype), levels,
                                            sh, sym, g, clip_c)
    plan = plan or (_roomy_plan(k, block, m, sigma) if sigma or act else quant_plan(k, block, m))
    return _aq().act_quant_launch(x2, out, scale, lo, m, out.shape[0], _hscale(block, x2.dtype), levels, sh, block,
                                  plan, sym, dequant, clip_c, act)
