"""nunchaku (SVDQuant W4A4, github nunchaku-tech/nunchaku) as a `robuq::qlinear` kernel. See docs/backends.md.

A RobuQ layer with weight codes of at most 4 bits (ternary, 2, 3, 4: all fit signed int4) and symmetric 4-bit
activations is the computation nunchaku's fused W4A4 GEMM does: int4 x int4 tensor-core products with per-group
scales, plus a 16-bit low-rank branch (`proj_down` / `proj_up`, our `lrb_down` / `lrb_up`) added in the epilogue.
This file converts our packed weights into nunchaku's layout (pure torch, runs and is tested on CPU) and calls its ops.

Layout, from nunchaku's `nunchaku/lora/flux/packer.py` (NunchakuWeightPacker) and `src/kernels/zgemm/gemm_base.cuh`
at commit 3a3cc3d0 (docs/backends.md has the details). N = out_features, K = in_features; K % 128 == 0, N padded to
a multiple of 128 with zero rows:

    qweight int8 (N, K/2)    tiles of 128 rows x 64 columns, tile (nt, kt) in row-major tile order; in a tile, 32-bit
                             words in the order (np:8, nl:8, kl:4, ns:2, ks:2), each holding 8 signed nibbles j = 0..7
                             (nibble j at bits 4j..4j+3, little-endian) of
                                 row n = 128 nt + 16 np + 8 ns + nl,   column k = 64 kt + 32 ks + 8 kl + j
    wscales fp16/bf16 (K/64, N)   one scale per (group of 64 inputs, output channel); memory order (nt, group, lane:32,
                             e:4) with channel n = 128 nt + 16 (lane // 4) + 8 (e // 2) + 2 (lane % 4) + e % 2.
                             The (K/64, N) shape is nominal: the memory is NOT row-major (G, N).
    bias    fp16/bf16 (N,)   packed like one group of wscales
    proj_down (K, r), proj_up (N, r)   16x16 fragments; element (p, q) of fragment rows/cols
                             p = 8 ns + nl, q = 8 ks + 2 kl + l, memory order (nl:8, kl:4, ns:2, ks:2, l:2);
                             down: p along r, q along K, fragments ordered (K/16, r/16);
                             up:   p along N, q along r, fragments ordered (N/16, r/16).   r padded to 16 with zeros.

Opt-in only (`ROBUQ_KERNEL=nunchaku` or `with robuq_fx.kernels.use("nunchaku")`), never picked automatically: it
approximates the per-token spec (below) and has not run against the reference on sm_75-89 hardware. The RobuQ
reference code runs its W4A4 layers on it. What differs from the reference kernel:
  * nunchaku quantizes activations per token AND per group of 64 inputs (absmax / 7, approximate reciprocal); RobuQ
    uses one scale per token. The GEMM is the same, the activation rounding is finer: outputs differ from the
    reference by a fraction of the A4 quantization error, not bit-exactly.
  * weight scales and bias are stored in the activation dtype (fp16/bf16), ours default to fp32 (policy key
    `scale_dtype` lets QAT train with the rounded scales).
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch

from .. import layer, packing
from .reference import spec_of
from .registry import QLinearArgs, register, tensor_key

NAME = "nunchaku"
INT4_SM = ((7, 5), (8, 0), (8, 6), (8, 9))  # the int4 targets of nunchaku's setup.py (Turing, Ampere, Ada)
GROUP = 64  # inputs per scale group of nunchaku's INT4 path
TILE_N = 128  # output rows per weight / scale tile (BLOCK_N = WARP_N)
K_MULTIPLE = 128  # two unrolled 64-wide k tiles; nunchaku does not bounds-check the second one
FRAG = 16  # low-rank fragments are 16 x 16
_ACT_DTYPES = (torch.float16, torch.bfloat16)


# ---- machine check and per-call check ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _import_reason() -> str | None:
    try:
        import nunchaku  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return (f"nunchaku is not importable ({type(e).__name__}: {e}); install a nunchaku-tech wheel "
                "(docs/backends.md)")
    try:
        from nunchaku.ops.gemm import svdq_gemm_w4a4_cuda  # noqa: F401
        from nunchaku.ops.quantize import svdq_quantize_w4a4_act_fuse_lora_cuda  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return (f"the installed 'nunchaku' has no W4A4 ops ({type(e).__name__}: {e}): PyPI's 'nunchaku' is an "
                "unrelated project; install nunchaku-tech's wheel (docs/backends.md)")
    return None


def _capability_reason(cap: tuple[int, int]) -> str | None:
    if cap in INT4_SM:
        return None
    sm = f"sm_{cap[0]}{cap[1]}"
    if cap == (9, 0):
        return (f"{sm} (Hopper) has no native int4 tensor cores and nunchaku builds no sm_90 kernels; use "
                "triton_fp8 / cuda_dequant there")
    if cap[0] >= 10:
        return (f"{sm} (Blackwell): nunchaku runs only its NVFP4 path there, and RobuQ's integer codes (e.g. +-5, "
                "+-7) are not fp4 e2m1 values; its INT4 path needs sm_75/80/86/89")
    return f"{sm}: nunchaku's INT4 W4A4 kernels target sm_75, sm_80, sm_86 and sm_89"


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def machine_check() -> str | None:
    why = _import_reason()
    if why:
        return why
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return _capability_reason(_capability(None))


def _scale_groups_reason(w_scale: torch.Tensor, k: int) -> str | None:
    if w_scale.shape == (1, 1) or w_scale.shape[1] == 1:
        return None
    g = k // w_scale.shape[1]
    return None if g % GROUP == 0 else f"weight group_size {g} is not a multiple of nunchaku's {GROUP}"


def supports(x: torch.Tensor, a: QLinearArgs) -> str | None:
    if not x.is_cuda:
        return "input is not on a CUDA device"
    if x.dtype not in _ACT_DTYPES:
        return f"nunchaku takes float16/bfloat16 activations, got {x.dtype}"
    if x.dtype == torch.bfloat16 and _capability(x.device.index) < (8, 0):
        return "nunchaku's bfloat16 kernels need sm_80+ (MIN_ARCH 800); use float16 on sm_75"
    if a.w_bits not in (1.58, 2, 3, 4):
        return f"w_bits={a.w_bits}: nunchaku's weights are int4 (codes of 1.58-4 bits fit, 8-bit do not)"
    if a.a_bits != 4 or not a.a_sym or a.a_clip != "absmax" or a.a_group:
        return (f"nunchaku quantizes activations to symmetric absmax int4 per token; this layer is a_bits="
                f"{a.a_bits}, a_sym={a.a_sym}, a_clip={a.a_clip}, a_group={a.a_group}")
    if a.in_features % K_MULTIPLE:
        return f"in_features={a.in_features} is not a multiple of {K_MULTIPLE}"
    return _scale_groups_reason(a.w_scale, a.in_features)


# ---- layout conversion (pure torch) -------------------------------------------------------------------------------

def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -t.shape[0] % multiple
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


def _pad_cols(t: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -t.shape[1] % multiple
    return torch.cat([t, t.new_zeros(t.shape[0], pad)], 1) if pad else t


def pack_weight(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes in [-8, 7], shape (N, K) with N % 128 == 0 and K % 128 == 0 -> int8 (N, K/2), nunchaku's order."""
    n, k = codes.shape
    if n % TILE_N or k % K_MULTIPLE:
        raise ValueError(f"nunchaku weights need N % {TILE_N} == 0 and K % {K_MULTIPLE} == 0, got ({n}, {k})")
    c = codes.to(torch.int16).reshape(n // TILE_N, 8, 2, 8, k // 64, 2, 4, 8)  # nt np ns nl kt ks kl j
    c = c.permute(0, 4, 1, 3, 6, 2, 5, 7)  # nt kt np nl kl ns ks j
    nib = (c & 0xF).to(torch.uint8).reshape(-1, 2)  # two's-complement nibbles; pairs (j even, j odd) = one byte
    return (nib[:, 0] | (nib[:, 1] << 4)).view(torch.int8).reshape(n, k // 2)


def pack_scales(s: torch.Tensor) -> torch.Tensor:
    """Per-(channel, group) values (N, G), N % 128 == 0 -> nunchaku's scale order, returned with shape (G, N)."""
    n, g = s.shape
    t = s.reshape(n // TILE_N, 8, 2, 4, 2, g)  # nt, lane // 4, e // 2, lane % 4, e % 2, group
    return t.permute(0, 5, 1, 3, 2, 4).contiguous().reshape(g, n)


def pack_lowrank(w: torch.Tensor, down: bool) -> torch.Tensor:
    """lrb_down B (r, K) -> proj_down (K, r'); lrb_up A (N, r) -> proj_up (N, r'); r' = r padded to 16 with zeros."""
    if down:
        w = _pad_rows(_pad_cols(w, FRAG), FRAG)  # (r', K')
        r, k = w.shape
        t = w.reshape(r // FRAG, 2, 8, k // FRAG, 2, 4, 2)  # rf ns nl kf ks kl l
        return t.permute(3, 0, 2, 5, 1, 4, 6).contiguous().reshape(k, r)
    w = _pad_rows(_pad_cols(w, FRAG), FRAG)  # (N', r')
    n, r = w.shape
    t = w.reshape(n // FRAG, 2, 8, r // FRAG, 2, 4, 2)  # nf ns nl rf ks kl l
    return t.permute(0, 3, 2, 5, 1, 4, 6).contiguous().reshape(n, r)


def group_scales(w_scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Our scales (N, G) or (1, 1) -> one scale per (channel, group of 64 inputs): (N, K/64). Per-channel and
    per-tensor scales repeat; group sizes that are multiples of 64 repeat within each group."""
    if w_scale.shape == (1, 1):
        return w_scale.reshape(1, 1).expand(n, k // GROUP)
    why = _scale_groups_reason(w_scale, k)
    if why:
        raise ValueError(why)
    return w_scale.repeat_interleave(k // GROUP // w_scale.shape[1], dim=1)


@dataclass
class NunchakuWeights:
    """One layer in nunchaku's layout; tensors on the source device, N padded to a multiple of 128."""
    qweight: torch.Tensor  # int8 (N', K/2)
    wscales: torch.Tensor  # dtype (K/64, N') nominal shape
    bias: torch.Tensor | None  # dtype (N',)
    proj_down: torch.Tensor  # dtype (K, r')
    proj_up: torch.Tensor  # dtype (N', r')
    smooth: torch.Tensor  # ones (K,): nunchaku divides x by it before quantizing; RobuQ has no smoothing
    out_features: int


def convert(qweight: torch.Tensor, w_scale: torch.Tensor, bias, lrb_down, lrb_up, out_features: int,
            in_features: int, w_bits, dtype: torch.dtype = torch.bfloat16) -> NunchakuWeights:
    """Our packed layer (robuq_fx.packing codes, scales, bias, low-rank branch) -> nunchaku's tensors in `dtype`.
    Without a low-rank branch a zero rank-16 branch is used (nunchaku's activation kernel always computes one)."""
    n, k = out_features, in_features
    if packing.normalize_bits(w_bits) == 8:
        raise ValueError("8-bit weight codes do not fit nunchaku's int4 weights")
    if k % K_MULTIPLE:
        raise ValueError(f"in_features={k} is not a multiple of {K_MULTIPLE}")
    codes = _pad_rows(packing.codes_of(qweight, w_bits, (n, k)), TILE_N)  # either layout (modules.PackedLinear)
    scales = _pad_rows(group_scales(w_scale, n, k).to(dtype), TILE_N)
    if lrb_down is None:
        lrb_down = torch.zeros(FRAG, k, dtype=dtype, device=qweight.device)
        lrb_up = torch.zeros(n, FRAG, dtype=dtype, device=qweight.device)
    return NunchakuWeights(
        qweight=pack_weight(codes),
        wscales=pack_scales(scales),
        bias=None if bias is None else pack_scales(_pad_rows(bias.to(dtype).reshape(n, 1), TILE_N)).reshape(-1),
        proj_down=pack_lowrank(lrb_down.to(dtype), down=True),
        proj_up=pack_lowrank(_pad_rows(lrb_up.to(dtype), TILE_N), down=False),
        smooth=torch.ones(k, dtype=dtype, device=qweight.device),
        out_features=n)


def convert_args(a: QLinearArgs, dtype: torch.dtype) -> NunchakuWeights:
    return convert(a.qweight, a.w_scale, a.bias, a.lrb_down, a.lrb_up, a.out_features, a.in_features, a.w_bits, dtype)


# ---- the kernel ---------------------------------------------------------------------------------------------------

_ver = tensor_key  # one definition for every weight cache (kernels/registry.py)


_CACHE: dict[int, tuple] = {}  # id(qweight) -> (key, weakref to qweight, NunchakuWeights)


def _weights(a: QLinearArgs, dtype: torch.dtype) -> NunchakuWeights:
    """Converted once per layer and dtype; an in-place update of any source tensor (load_state_dict) converts again."""
    key = (_ver(a.qweight), _ver(a.w_scale), _ver(a.bias), _ver(a.lrb_down), _ver(a.lrb_up), dtype)
    hit = _CACHE.get(id(a.qweight))
    if hit is not None and hit[0] == key and hit[1]() is a.qweight:
        return hit[2]
    w = convert_args(a, dtype)
    wid = id(a.qweight)
    _CACHE[wid] = (key, weakref.ref(a.qweight, functools.partial(_drop, wid)), w)
    return w


def _drop(wid: int, ref) -> None:
    hit = _CACHE.get(wid)
    if hit is not None and hit[1] is ref:
        del _CACHE[wid]


@register(NAME, priority=30, machine_check=machine_check, supports=supports, auto=False,
          takes="opt-in only (ROBUQ_KERNEL=nunchaku): W<=4-bit, A4 sym absmax, K % 128 == 0; quantizes activations "
                "per token AND per 64 inputs, so it approximates RobuQ's per-token spec; never run on hardware here")
def nunchaku_qlinear(x: torch.Tensor, a: QLinearArgs) -> torch.Tensor:
    from nunchaku.ops.gemm import svdq_gemm_w4a4_cuda
    from nunchaku.ops.quantize import svdq_quantize_w4a4_act_fuse_lora_cuda
    w = _weights(a, x.dtype)
    xh = layer.rotate(x, spec_of(a)).reshape(-1, a.in_features).contiguous()  # H online; W H is in the codes
    m = xh.shape[0]
    act, ascales, lora_act = svdq_quantize_w4a4_act_fuse_lora_cuda(xh, lora_down=w.proj_down, smooth=w.smooth)
    n_pad = w.qweight.shape[0]
    out = torch.empty(m, n_pad, dtype=x.dtype, device=x.device)
    svdq_gemm_w4a4_cuda(act=act, wgt=w.qweight, out=out, ascales=ascales, wscales=w.wscales, lora_act_in=lora_act,
                        lora_up=w.proj_up, bias=w.bias)
    if n_pad != a.out_features:
        out = out[:, :a.out_features]
    return out.reshape(*x.shape[:-1], a.out_features)
