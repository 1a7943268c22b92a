"""The measured dispatch of the fp8 qlinear path (`dispatch_table.json`, written by
`benchmarks/bench_linear.py --write-dispatch`): from which M the fp8 path beats the bf16-dequant path per (N, K),
which Triton GEMM config and which epilogue mode to use, and the quantizer tiling per K (read by quantizer.py).

Environment: ROBUQ_FP8_MIN_M=<int> overrides every threshold; ROBUQ_FP8_EPI=addmm|triton the epilogue mode.
"""
from __future__ import annotations

import functools
import json
import os

from .switches import env_int

_TABLE_PATH = os.path.join(os.path.dirname(__file__), "dispatch_table.json")
_DEFAULT_FP8_MIN_M = 1024  # used for shapes the table does not list (and when there is no table)


def m_bucket(m: int) -> int:
    """The M bucket of the table's per-M choices."""
    return 256 if m <= 256 else 1024 if m <= 1024 else 4096 if m <= 4096 else 16384


@functools.lru_cache(maxsize=1)
def dispatch_table() -> dict:
    try:
        with open(_TABLE_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def fp8_min_m(n: int, k: int, epilogue: bool) -> int:
    """Smallest M from which the fp8 path beats the dequant path for this shape (measured table, else default)."""
    env = env_int("ROBUQ_FP8_MIN_M")
    if env is not None:
        return env
    t = dispatch_table()
    row = t.get("shapes", {}).get(f"{n}x{k}")
    field = "epi_fp8_min_m" if epilogue else "fp8_min_m"
    if row is not None and field in row:
        return int(row[field])
    return int(t.get("default_" + field, t.get("default_fp8_min_m", _DEFAULT_FP8_MIN_M)))


def _nearest(m, buckets: list[int]) -> int:
    """The bucket nearest to m on a log scale (m <= sqrt(b_i b_i+1) picks b_i), by integer comparisons only, so
    that a symbolic M (torch.compile with dynamic shapes) is guarded, not specialized."""
    for lo, hi in zip(buckets, buckets[1:]):
        if m * m <= lo * hi:
            return lo
    return buckets[-1]


def gemm_config(m: int, n: int, k: int) -> tuple:
    """Triton GEMM config: the table's measured choice for the nearest M bucket, else a size heuristic."""
    from .triton_fp8_kernels import GEMM_CONFIGS as cfgs  # imports triton: first use only
    row = dispatch_table().get("shapes", {}).get(f"{n}x{k}", {})
    tuned = row.get("gemm_cfg")
    if tuned:
        i = int(tuned[str(_nearest(m, sorted(int(x) for x in tuned)))])
        if 0 <= i < len(cfgs):
            return cfgs[i]
    if m <= 64:
        return cfgs[3]
    if m <= 1024:
        return cfgs[2]
    if m <= 4096:
        return cfgs[1]
    return cfgs[0]


def gemm_kernel(capability: tuple[int, int]) -> str:
    """Which fp8 GEMM runs the fused epilogue: "tma" (the persistent, TMA-fed Triton kernel), "gluon" (the Gluon
    wgmma kernel, kernels/gluon_fp8_gemm.py; opt-in until its GPU tests pass), both Hopper and later, or "pointer".
    ROBUQ_FP8_GEMM_KERNEL overrides the table's "gemm_kernel" (written by bench_linear --write-dispatch from the
    measured faster one); without a measurement the pointer kernel runs."""
    want = os.environ.get("ROBUQ_FP8_GEMM_KERNEL") or dispatch_table().get("gemm_kernel", "pointer")
    return want if want in ("tma", "gluon") and capability >= (9, 0) else "pointer"


def gluon_gemm_config(m: int, n: int, k: int) -> tuple:
    """Config of the Gluon GEMM: the table's measured choice ("gluon_gemm_cfg" per M bucket), else 128 x 128 tiles
    on 8 warps."""
    from .gluon_fp8_gemm import CONFIGS as cfgs  # imports triton: first use only
    env = env_int("ROBUQ_GLUON_GEMM_CFG")  # an index into CONFIGS, for sweeps
    if env is not None:
        return cfgs[env]
    tuned = dispatch_table().get("shapes", {}).get(f"{n}x{k}", {}).get("gluon_gemm_cfg", {}).get(str(m_bucket(m)))
    return cfgs[tuned] if tuned is not None and tuned < len(cfgs) else cfgs[0]


def tma_gemm_config(m: int, n: int, k: int) -> tuple:
    """Config of the TMA GEMM: the table's measured choice ("tma_gemm_cfg" per M bucket), else 128 x 128 tiles."""
    from .triton_fp8_kernels import TMA_GEMM_CONFIGS as cfgs  # imports triton: first use only
    env = env_int("ROBUQ_TMA_GEMM_CFG")  # an index into TMA_GEMM_CONFIGS, for sweeps
    if env is not None:
        return cfgs[env]
    tuned = dispatch_table().get("shapes", {}).get(f"{n}x{k}", {}).get("tma_gemm_cfg", {}).get(str(m_bucket(m)))
    if tuned is not None and 0 <= int(tuned) < len(cfgs):
        return cfgs[int(tuned)]
    return cfgs[1]


def small_m_max() -> int:
    """Largest M that runs the single-kernel small-M path (triton_qgemm_small.py): ROBUQ_FP8_SMALL_M, else the
    table's measured "small_m_fused_max_m", else 0 (off until measured)."""
    env = env_int("ROBUQ_FP8_SMALL_M")
    if env is not None:
        return env
    return int(dispatch_table().get("small_m_fused_max_m", 0))


def _shape_choice(var: str, value: str, key: str, n, k, m=None) -> bool:
    """An on/off choice per layer shape: the environment variable `var` forces it (on where it equals `value`, off
    for any other value); unset, the table's per-shape `key` for M's bucket (m None: for any bucket)."""
    env = os.environ.get(var)
    if env:
        return env == value
    per = dispatch_table().get("shapes", {}).get(f"{n}x{k}", {}).get(key)
    if not per:  # (before M's bucket: under torch.compile with dynamic shapes that would guard on M)
        return False
    return any(per.values()) if m is None else bool(per.get(str(m_bucket(m))))


def stacked_mode(m: int, n: int, k: int) -> bool:
    """Whether a symmetric absmax layer with a low-rank branch runs the branch stacked into `_scaled_mm`
    (lrb_stacked.py): ROBUQ_FP8_EPI=stacked forces it and any other ROBUQ_FP8_EPI value turns it off; else the
    table's measured choice for this shape and M bucket ("stacked"), off where the table has none."""
    return _shape_choice("ROBUQ_FP8_EPI", "stacked", "stacked", n, k, m)


def down_in_gemm(m: int, n: int, k: int) -> bool:
    """Whether an LRB layer on the Triton epilogue GEMM computes the branch's down-projection inside that GEMM's K
    loop (`fp8_gemm_kernel` DOWN) instead of `lrb_down`'s own launch(es): ROBUQ_FP8_DOWN_IN_GEMM=1 forces it (any
    other value: off); unset, the table's "down_in_gemm" for this shape and M bucket, off where it has none."""
    return _shape_choice("ROBUQ_FP8_DOWN_IN_GEMM", "1", "down_in_gemm", n, k, m)


def stacked_any(n: int, k: int) -> bool:
    """Whether `stacked_mode` may pick the stacked mode at some M for an N x K layer (ROBUQ_FP8_EPI=stacked, or any
    M bucket of the table's "stacked" for the shape): `lrb_stacked.prepare` extends such a layer's weight up front."""
    return _shape_choice("ROBUQ_FP8_EPI", "stacked", "stacked", n, k)


def stacked_fused(m: int, n: int, k: int) -> bool:
    """The stacked mode's codes from one kernel (triton_mma_quant.py: the quantizer and lrb_split fused, x read once,
    the rotation on tensor cores): ROBUQ_STACKED_QUANT=fused (any other value: the two kernels), unset where the
    table measured it faster ("stacked_fused" per shape and M bucket). Eager calls and CUDA graphs' opaque op only:
    default-mode compiled graphs keep the two kernels."""
    return _shape_choice("ROBUQ_STACKED_QUANT", "fused", "stacked_fused", n, k, m)


def _ws_key(rank: int) -> str:
    """The table's per-shape key of the warp-specialized kernel's choice for layers with a branch of this rank."""
    return "fused_ws" if rank == 0 else "fused_ws_terms" if rank > 64 else "fused_ws_lrb"


def fused_quant_mode(m: int, n: int, k: int, rank: int) -> str | None:
    """Which quantize-in-GEMM kernel takes a call (fused_quant.py), if any: ROBUQ_FP8_FUSED_QUANT=1 (v0,
    gluon_qgemm) or ws (gluon_qgemm_ws) forces one, any other value none; unset, "ws" where the table measured the
    warp-specialized kernel faster than the path the layer takes otherwise (per shape and M bucket: "fused_ws" for
    layers without a branch (rank 0), "fused_ws_lrb" with a rank-32 one, "fused_ws_terms" above rank 64), else
    none."""
    env = os.environ.get("ROBUQ_FP8_FUSED_QUANT")
    if env:
        return env if env in ("1", "ws") else None
    return "ws" if _shape_choice("ROBUQ_FP8_FUSED_QUANT", "ws", _ws_key(rank), n, k, m) else None


def fused_ws_any(n: int, k: int, rank: int) -> bool:
    """Whether `fused_quant_mode` may pick the warp-specialized kernel at some M for an N x K layer
    (ROBUQ_FP8_FUSED_QUANT=ws, or any bucket of the table's choice): `lrb_stacked.prepare` extends the weight of
    such a layer with a branch up front."""
    return _shape_choice("ROBUQ_FP8_FUSED_QUANT", "ws", _ws_key(rank), n, k)


def epilogue_mode(m: int | None = None, n: int | None = None, k: int | None = None) -> str:
    """How the asymmetric / LRB terms are added on the fp8 path: "addmm" (cuBLAS _scaled_mm, then one bf16 GEMM
    y += [t, lo'] [A, c]^T in place) or "triton" (our fp8 GEMM with everything in its epilogue). The table's measured
    choice for this shape and M bucket ("epi_mode"), else its global "epilogue"."""
    env = os.environ.get("ROBUQ_FP8_EPI")
    if env in ("addmm", "triton", "stacked"):  # stacked: `stacked_mode` decides it; layers it leaves take triton
        return env
    t = dispatch_table()
    if m is not None:
        per = t.get("shapes", {}).get(f"{n}x{k}", {}).get("epi_mode")
        if per:
            mode = per.get(str(m_bucket(m)))
            if mode in ("addmm", "triton"):
                return mode
    return t.get("epilogue", "addmm")


def attention_choice(d: int, causal: bool, rows: int) -> tuple[str, tuple] | None:
    """The 8-bit attention's GPU form (`robuq::attention8` on CUDA, ROBUQ_ATTENTION unset) for head dim d, causal or
    not, at `rows` = batch x heads x queries: ("fused" | "prequant", the flash kernel's launch config) where
    `bench_attention.py --sweep --write-dispatch` measured that kernel faster than quantizing q, k, v first and
    running flash SDPA ("attention" in the table, per measured size), else None (the row kernel + SDPA). A size is
    taken only within 2x of a measured one: the winner at batch 64 need not win at batch 1."""
    per = dispatch_table().get("attention", {}).get(f"{d}/{'c' if causal else 'n'}")
    if not per:
        return None
    sizes = sorted(int(s) for s in per)
    near = _nearest(rows, sizes)
    if not (near <= 2 * rows and rows <= 2 * near):
        return None
    form, cfg = per[str(near)]
    return (form, tuple(cfg)) if form in ("fused", "prequant") else None
