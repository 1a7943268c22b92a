"""Our GPU kernels as Inductor sees them: under `torch.compile`, `robuq::qlinear` and `robuq::attention8` are
decomposed into `torch.library.triton_op`s (the Triton activation quantizer, the row quantizer, the fused-epilogue
fp8 GEMM, the low-rank branch's kernels, each launched through `wrap_triton`) and ATen ops (`_scaled_mm`, SDPA),
so the compiled code launches every kernel itself instead of calling an opaque op through Python (~110 us of CPU a
call, which made a default-mode `torch.compile` of W4A4+H DiT-XL/2 CPU-bound at batch 8; issue 17).

    robuq::act_quant(x2 (M, K), block, a_bits, sym, clip, m_store, shift) -> (fp8 codes (m_store, K), s, lo)
    robuq::rowquant(x, bits, keep_layout) -> Q_a(x)       symmetric absmax per row (the attention's q, k, v)
    robuq::fp8_gemm(codes, w8, sx, sw, bias?, lo?, cs?, t?, up?, m, dtype) -> y (m, N)   the Triton GEMM + epilogue
    robuq::lrb_down(x2, bh) -> t (M, r)                  the low-rank branch's down-projection (triton_lowrank.py)
    robuq::lowrank_add(y, t?, up?, lo?, cs?) -> y + t up^T + lo c    the addmm mode's add after `_scaled_mm`

Under CUDA graphs (`torch._inductor.config.triton.cudagraphs`, mode="reduce-overhead") a call for which the dispatch
table picks the Gluon quantizer keeps it through one opaque op, `robuq::act_quant_gluon` (Inductor's code launches
Triton kernels only; an opaque op costs nothing at graph replay); ROBUQ_INDUCTOR_GLUON_QUANT=0 keeps the Triton one.

The decompositions take exactly the calls the eager kernels would take with the same results: a qlinear call is
decomposed only when the registry would pick `triton_fp8` for it and the weight is in the fp8 layout (the module's
buffer is the GEMM operand; the packed layout keeps the opaque op), and it computes what `triton_fp8.fp8_qlinear`
computes, with the same kernels and the same dispatch (`dispatch.py`). The weight-side vectors the eager path caches
(fp32 per-channel scales, the asymmetric column sums, B H of the low-rank branch) are computed in the graph here,
where a cache keyed on tensor identity cannot live (they are a few kB to a few hundred kB per layer). Any other
call stays one opaque op.

The QAT graph's ops (`robuq::hadamard`, `fake_quant_weight`, `fake_quant_act`) decompose into their torch math, on
every device, so that Inductor fuses them with each other and with the ops around them instead of calling three
opaque ops a layer (their straight-through gradients stay the ops' own autograd formulas). Compiled QAT then matches
eager up to the rounding of reordered fp32 sums, not bit for bit.

ROBUQ_INDUCTOR_DECOMPOSE, a comma list of what to decompose: "qat" (the QAT ops), "qlinear", "attention8"; "1" /
"all" for all three, "0" for none. Default "qat,qlinear": the qlinear decomposition passed its GPU tests and made
default-mode W4A4+H DiT-XL/2 at batch 8 2.3x faster than the opaque op (0.60x vs 0.26x bf16, H200) at the same speed
under CUDA graphs; attention8's stays opt-in until the paper policy's compile time under it is measured. (The
asymmetric calls on the addmm epilogue once differed from eager by a bf16 ulp: Inductor keeps bf16 intermediates
in fp32, which zeroed the low half of the bf16 hi/lo split that carried the asymmetric term through cuBLAS's addmm;
that term is now added in fp32 by the same Triton kernel eagerly and compiled, `triton_lowrank.py`.) Inductor's
and AOTAutograd's on-disk caches key on the ROBUQ_* settings, the dispatch table and robuq's source through
torch.compile's cache-key tag (`compile_cache.py`; before session 12 they did not, and a warm cache answered with a
graph compiled under other settings).

How: a FunctionalTensorMode rule for each op (`_functional_rule`). AOTAutograd functionalizes the graph Dynamo
captured before Inductor lowers it; the rule decomposes the call there, and the triton_ops it calls decompose in
turn into Triton kernel nodes that Inductor launches from its generated code. (An entry in Inductor's decomposition
table is not enough: it runs below functionalization, so the triton_ops stay opaque extern calls.) Registration is
lazy: the fake kernels of the two ops call `register()` while Dynamo traces a model that uses them.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import weakref

import torch

from .. import packing
from .. import quantizers as Q
from ..hadamard import block_hadamard, hadamard_matrix, sylvester
from . import inductor_opaque
from .compile_cache import tag_compile_caches
from .inductor_opaque import _gluon_quant_here, _gluon_quant_op, _stacked_codes_op, _stacked_mm_op
from .qlinear import colsum_or_none, rotated_down_or_none
from .registry import QLinearArgs, select
from .registry import warn_once as _warn_once


DEFAULT = "qat,qlinear"
KINDS = ("qat", "qlinear", "attention8")


def enabled(kind: str = "qat") -> bool:
    """Whether ROBUQ_INDUCTOR_DECOMPOSE (module docstring; default "qat,qlinear") names `kind`."""
    return kind in _kinds(os.environ.get("ROBUQ_INDUCTOR_DECOMPOSE", DEFAULT))


@functools.lru_cache(maxsize=16)
def _kinds(value: str) -> frozenset:
    v = value.strip().lower()
    if v in ("1", "all"):
        return frozenset(KINDS)
    if v in ("0", "none", ""):
        return frozenset()
    names = frozenset(p.strip() for p in v.split(",") if p.strip())
    bad = names - set(KINDS)
    if bad:
        raise ValueError(f"ROBUQ_INDUCTOR_DECOMPOSE={value!r}: unknown {sorted(bad)}; expected a comma list of "
                         f"{list(KINDS)}, or 1 / all, or 0")
    return names


_DEFS: list = []


@functools.lru_cache(maxsize=None)
def _ops():
    """Define the triton_ops (once, on first use; needs triton)."""
    from torch.library import triton_op

    from .quantizer import act_quant
    from .triton_fp8 import run_fp8_gemm
    from .triton_launch import traced
    from .triton_rowquant import fake_quant_rows

    @triton_op("robuq::act_quant", mutates_args=())
    def act_quant_op(x2: torch.Tensor, block: int, a_bits: int, sym: bool, clip: str, m_store: int,
                     shift: bool, act: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return act_quant(x2, block, a_bits, sym, m_store=m_store, shift=shift, clip=clip, traced=True, act=act)

    @triton_op("robuq::rowquant", mutates_args=())
    def rowquant_op(x: torch.Tensor, bits: int, keep_layout: bool) -> torch.Tensor:
        return fake_quant_rows(x, bits, True, keep_layout=keep_layout, traced=True)

    @triton_op("robuq::lowrank_add", mutates_args=())
    def lowrank_add_op(y: torch.Tensor, t: torch.Tensor | None, up: torch.Tensor | None, lo: torch.Tensor | None,
                       cs: torch.Tensor | None) -> torch.Tensor:
        from .triton_lowrank import lowrank_add
        out = torch.empty_like(y)
        lowrank_add(y, out, t, up, lo, cs, traced)
        return out

    @triton_op("robuq::lrb_down", mutates_args=())
    def lrb_down_op(x2: torch.Tensor, bh: torch.Tensor, act: str = "") -> torch.Tensor:
        from .triton_lowrank import lrb_down
        t = torch.empty(x2.shape[0], bh.shape[0], device=x2.device, dtype=x2.dtype)
        lrb_down(x2, bh, t, traced, act=act)
        return t

    @triton_op("robuq::fp8_gemm", mutates_args=())
    def fp8_gemm_op(codes: torch.Tensor, w8: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor,
                    bias: torch.Tensor | None, lo: torch.Tensor | None, cs: torch.Tensor | None,
                    t: torch.Tensor | None, up: torch.Tensor | None, m: int,
                    out_dtype: torch.dtype, xd: torch.Tensor | None = None,
                    bhd: torch.Tensor | None = None, out_act: str = "") -> torch.Tensor:
        y = torch.empty(m, w8.shape[0], device=codes.device, dtype=out_dtype)
        run_fp8_gemm(codes, w8, y, sx, sw, bias, lo, cs, t, up, m, traced,
                     down=None if xd is None else (xd, bhd), out_act=out_act)
        return y

    _DEFS.extend((act_quant_op, rowquant_op, fp8_gemm_op, lowrank_add_op, lrb_down_op))
    return (torch.ops.robuq.act_quant, torch.ops.robuq.rowquant, torch.ops.robuq.fp8_gemm, torch.ops.robuq.lowrank_add,
            torch.ops.robuq.lrb_down)


# ---------------------------------------------------------------------------------------------------------------
# robuq::qlinear

def qlinear_traced(x, a: QLinearArgs) -> torch.Tensor:
    """`triton_fp8.fp8_qlinear` in graph-traceable form (fp8-layout weights): the weight-side tensors its caches
    hold are computed in the graph (`weight_cache`'s uncached helpers)."""
    from . import triton_fp8 as T
    from . import weight_cache as W
    from .dispatch import epilogue_mode
    from .reference import weight_codes
    act_quant_op, _, fp8_gemm_op, lowrank_add_op, lrb_down_op = _ops()
    k, n = a.in_features, a.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    m_pad = torch.sym_max(16, (m + 15) // 16 * 16)
    from .lrb_stacked import is_extended, takes_stacked
    if takes_stacked(a, m) and is_extended(a.qweight, k, a.lrb_down.shape[0]):
        return _stacked_traced(x, x2, a, m, m_pad).reshape(*lead, n)
    if _gluon_quant_here(x2, a):
        codes, sx, lo = _gluon_quant_op()(x2, a.hadamard_block, a.a_bits, a.a_sym, m_pad, True, a.input_act,
                                          a.a_clip)
    else:
        codes, sx, lo = act_quant_op(x2, a.hadamard_block, a.a_bits, a.a_sym, a.a_clip, m_pad, True, a.input_act)
    w8 = a.qweight.reshape(n, k)
    sw = W.scale_vec(a.w_scale, n)
    lrb = a.lrb_down is not None
    bh = W.rotated_down(a, x.dtype) if lrb else None
    down = T.down_in_gemm_ok(x2, bh, a, m)  # eager's choices
    t = T.down_proj(x2, bh, lrb_down_op, a.input_act) if lrb and not down else None
    # the offset term's column sums: the layer's buffer (PackedLinear.w_colsum), else summed in the graph
    cs = None if a.a_sym else a.w_colsum
    if cs is None and not a.a_sym:
        cs = Q.weight_code_colsum(weight_codes(a), a.w_scale)
    epi_addmm = epilogue_mode(m, n, k) == "addmm"
    if not (a.a_sym and not lrb) and epi_addmm and not _addmm_traced_ok():
        _warn_once("robuq_fx: under torch.compile the LRB / asymmetric layers take the Triton epilogue GEMM where "
                   "ROBUQ_FP8_EPI=addmm or the dispatch table picks the addmm mode (ROBUQ_INDUCTOR_LOWRANK_ADD=0 "
                   "turned its traced form off)")
    elif (a.a_sym and not lrb) or epi_addmm:
        if (a.output_act or os.environ.get("ROBUQ_FP8_GEMM") == "triton") and a.a_sym and not lrb:
            y = fp8_gemm_op(codes, w8, sx, sw, a.bias, None, None, None, None, m, x.dtype, None, None, a.output_act)
            return y.reshape(*lead, n)
        bias = None if a.bias is None else a.bias.to(torch.bfloat16)
        y = T._scaled_mm(codes, w8, sx, sw, bias)[:m]
        if lrb or not a.a_sym:  # the eager path's in-place kernel, out of place
            y = lowrank_add_op(y, t.to(torch.bfloat16) if lrb else None, T._up16(a, torch.bfloat16) if lrb else None,
                               None if a.a_sym else lo, cs)  # (symmetric: no offset term, as eagerly)
        return (y if y.dtype == x.dtype else y.to(x.dtype)).reshape(*lead, n)
    up = T._up16(a, x.dtype) if lrb else None
    y = fp8_gemm_op(codes, w8, sx, sw, a.bias, None if a.a_sym else lo, cs, t, up, m, x.dtype,
                    x2 if down else None, bh if down else None, a.output_act)
    return y.reshape(*lead, n)


def _stacked_traced(x, x2, a: QLinearArgs, m, m_pad) -> torch.Tensor:
    """`lrb_stacked.stacked_qlinear` in graph-traceable form: the codes by one opaque op (`robuq::stacked_codes`:
    quantizer + lrb_split, which reads c through qweight's pointer), then `robuq::stacked_mm` (`_scaled_mm` over the
    extended weight, made from qweight in the op: the graph holds no view of qweight beyond its own extent)."""
    from . import weight_cache as W
    n = a.out_features
    bh = W.rotated_down(a, x.dtype)
    wide, sx = _stacked_codes_op()(x2, bh, a.qweight, a.hadamard_block, a.a_bits, a.a_clip, m_pad, a.input_act,
                                   a.a_sym)
    bias = None if a.bias is None else a.bias.to(torch.bfloat16)
    y = _stacked_mm_op()(wide, a.qweight, sx, W.scale_vec(a.w_scale, n), bias)[:m]
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _addmm_traced_ok() -> bool:
    """Whether the addmm epilogue mode's LRB / asymmetric add (`robuq::lowrank_add` after `_scaled_mm`) is traced
    (default; ROBUQ_INDUCTOR_LOWRANK_ADD=0: the Triton epilogue GEMM instead, with a warning). Session 9 found it
    far from eager on the H200 (W1.58A4+H+LRB32, M = 74, max |diff| 13.9): the symmetric layer's lo went to the add
    kernel, switching on its offset term with a placeholder c. Fixed in session 10; on the H200 in session 11 every
    piece and the whole layer compiled equal eager, and the compiled-vs-eager tests pass in this mode."""
    return os.environ.get("ROBUQ_INDUCTOR_LOWRANK_ADD", "1") != "0"


def _qlinear_decomposition(x, qweight, w_scale, bias, lrb_down, lrb_up, out_features, in_features, w_bits, a_bits,
                           hadamard_block, a_sym, a_clip, splits=None, input_act="", lrb_down_h=None,
                           output_act="", w_colsum=None, a_group=0):
    if (not enabled("qlinear") or packing.FP8 is None or qweight.dtype != packing.FP8 or x.shape[-1] != in_features
            or a_group):  # (per-group ranges: the opaque op, whose eager path runs the block-scaled kernels)
        return NotImplemented
    # an input activation goes into the kernels that read x (the quantizer, the branch's down-projection), as eagerly
    a = QLinearArgs(qweight, w_scale, bias, lrb_down, lrb_up, out_features, in_features, w_bits, a_bits,
                    hadamard_block, a_sym, a_clip, tuple(splits) if splits else None, input_act,
                    rotated_down_or_none(lrb_down_h, lrb_down, hadamard_block), output_act,
                    colsum_or_none(w_colsum, qweight, out_features))
    try:
        kernel = select(x, a)
    except RuntimeError:
        return NotImplemented
    if kernel.name != "triton_fp8":
        return NotImplemented
    if _gluon_opt_in():  # the eager op runs the opt-in Gluon kernels, which Inductor cannot launch: keep it opaque
        return NotImplemented
    from .fused_quant import kernel_mode
    if kernel_mode(x.reshape(-1, in_features), a):  # the table picks the Gluon quantize-in-GEMM kernel: the same
        return NotImplemented
    from .lrb_stacked import is_extended, takes_stacked
    if takes_stacked(a, x.numel() // in_features) and not is_extended(qweight, in_features, lrb_down.shape[0]):
        # the stacked mode's weight is extended by PackedLinear.set_layout("fp8") (lrb_stacked.prepare); one that is
        # not (ROBUQ_FP8_EPI set after the layer went to the GPU) traces the Triton epilogue GEMM: an opaque call
        # extending it inside the graph would change an input's strides under the compiled code
        _warn_once(f"robuq_fx: a {out_features}x{in_features} layer takes the Triton epilogue GEMM under torch.compile "
                   "instead of the stacked LRB mode: its weight was not extended before compiling (move the model to "
                   "the GPU, or call use_device_layout, after setting ROBUQ_FP8_EPI / the dispatch table)")
    try:
        from .fp8_gemms import out_act_in_gemm
        if output_act and not out_act_in_gemm(a, x.numel() // in_features):
            # as eagerly (triton_fp8._fp8_qlinear): where the GEMM does not apply it, a graph op after the layer
            from .qlinear import apply_input_act
            return apply_input_act(qlinear_traced(x, dataclasses.replace(a, output_act="")), output_act)
        return qlinear_traced(x, a)
    except Exception as e:  # noqa: BLE001 - never fail a compile over the fast path: keep the eager op
        _warn_once(f"robuq_fx: robuq::qlinear left opaque under torch.compile ({type(e).__name__}: {e})")
        return NotImplemented


def _gluon_opt_in() -> bool:
    """Whether an opt-in Gluon kernel is switched on for the fp8 path (kernels/gluon_*.py)."""
    env = os.environ
    return (env.get("ROBUQ_FP8_FUSED_QUANT") in ("1", "ws") or env.get("ROBUQ_QUANT_KERNEL") == "gluon"
            or env.get("ROBUQ_FP8_GEMM_KERNEL") == "gluon")


# ---------------------------------------------------------------------------------------------------------------
# robuq::attention8

def _attention8_decomposition(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, bits):
    from ..ops import row_kernel
    from .attention import _quantized_sdpa
    if not enabled("attention8") or not q.is_cuda or os.environ.get("ROBUQ_ATTENTION") in ("fused", "reference"):
        return NotImplemented
    rows = row_kernel()
    if rows is None or any(rows.supported(t, bits) is not None for t in (q, k, v)):
        return NotImplemented
    try:
        rowquant_op = _ops()[1]
        return _quantized_sdpa(lambda t: rowquant_op(t, bits, True), q, k, v, attn_mask, dropout_p, is_causal,
                               scale, enable_gqa)
    except Exception as e:  # noqa: BLE001 - as in _qlinear_decomposition
        _warn_once(f"robuq_fx: robuq::attention8 left opaque under torch.compile ({type(e).__name__}: {e})")
        return NotImplemented


# ---------------------------------------------------------------------------------------------------------------

def _functional_rule(decomposition):
    """A FunctionalTensorMode rule: AOTAutograd functionalizes every graph torch.compile hands to Inductor, and the
    rule decomposes the call there, the way `triton_op`s themselves are decomposed (so that the triton_ops inside
    become Triton kernels in Inductor's graph). torch.export keeps the op, as it keeps triton_ops."""
    def rule(mode, func, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled
        if not custom_triton_ops_decomposition_disabled():
            with mode:
                out = decomposition(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return mode.__torch_dispatch__(func, types, args, kwargs)
    return rule


# ---------------------------------------------------------------------------------------------------------------
# the QAT graph's ops: their torch math, which Inductor fuses (with each other and with the ops around them)

def _constant_hadamard(block: int, x: torch.Tensor) -> torch.Tensor:
    """H (block x block) in x's dtype as a constant of the traced graph: the cached matrix, made with the tracing modes
    off and lifted in (one copy kernel, shared across the graph). Built from traced ops instead (before session 12),
    it cost six kernels a rotation (the Sylvester cat / neg levels): 672 of the 1558 kernels of the paper policy's
    batch-1 forward on the H200 (the branch's B H in every LRB layer), where that forward ran at 0.40x bf16 under
    CUDA graphs."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode
    from torch.utils._python_dispatch import _disable_current_modes
    if x.device.type == "cuda" and not torch.cuda.is_available():  # fake CUDA tensors on a CPU-only torch (tests)
        return sylvester(block, x.device).to(x.dtype)  # the same matrix, built from traced ops
    # one lifted H a trace (per block, dtype, device): lifted anew at every use, each rotation read its own copy, so
    # AOTAutograd's CSE could not merge the rotations (and fake-quants) of one input shared by sibling layers: DiT's
    # to_q / to_k / to_v each rotated and ranged the same x (CPU Inductor's code, session 21)
    mode = get_proxy_mode()
    key = None if mode is None else (id(mode), block, x.dtype, x.device)
    hit = _LIFTED.get(key) if key is not None else None
    if hit is not None and hit[0]() is mode:
        return hit[1]
    with _disable_current_modes():
        h = hadamard_matrix(block, x.dtype, x.device)
    out = torch.ops.aten.lift_fresh.default(h)
    if key is not None:
        for k in [k for k, (ref, _) in _LIFTED.items() if ref() is None]:  # traces that are over: their graphs go
            del _LIFTED[k]
        _LIFTED[key] = (weakref.ref(mode), out)
    return out


_LIFTED: dict = {}  # (id(proxy mode), block, dtype, device) -> (the mode, weakly; H lifted in its trace)


def _hadamard_decomposition(x, block):
    if not enabled() or (x.is_cuda and os.environ.get("ROBUQ_HADAMARD") == "fht"):
        return NotImplemented
    if block < 1 or block & (block - 1) or x.shape[-1] % block:
        return NotImplemented  # the op raises its own error
    return block_hadamard(x, block, _constant_hadamard(block, x)).contiguous()


def _fake_quant_weight_decomposition(w, w_bits, granularity, group_size, scale_dtype):
    if not enabled():
        return NotImplemented
    return Q.fake_quant_weight(w, w_bits, granularity, group_size, scale_dtype).contiguous()


def _fake_quant_act_decomposition(x, a_bits, sym, clip, group=0):
    if not enabled():
        return NotImplemented
    if a_bits >= 16:
        return x.clone().contiguous()
    return Q.fake_quant_act(x, a_bits, sym, clip, group).contiguous()


# ---------------------------------------------------------------------------------------------------------------

_REGISTERED: list[bool] = []


def register() -> None:
    """Install the decompositions (once). The qlinear / attention8 ones need triton only when they fire (CUDA calls
    the Triton path takes); the QAT ops' ones are torch math and apply on every device. The opaque ops a compiled
    graph may call at run time are defined here too: a graph loaded from Inductor's on-disk cache calls them without
    the decomposition (which defined them lazily) having run in this process (H200, session 11:
    `torch.ops.robuq.stacked_codes` missing on a cache hit)."""
    tag_compile_caches()  # every trace: the ROBUQ_* settings may have changed since the last compile
    if _REGISTERED:
        return
    _REGISTERED.append(True)
    inductor_opaque.define()
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    for name, fn in (("qlinear", _qlinear_decomposition), ("attention8", _attention8_decomposition),
                     ("hadamard", _hadamard_decomposition), ("fake_quant_weight", _fake_quant_weight_decomposition),
                     ("fake_quant_act", _fake_quant_act_decomposition)):
        torch.library.register_torch_dispatch(f"robuq::{name}", FunctionalTensorMode, _functional_rule(fn))
