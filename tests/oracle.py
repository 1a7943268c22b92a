"""An independent float64 oracle of ../shared/METHOD.md: what one RobuQ layer must compute, written from the formulas.

It imports nothing of robuq_fx (no quantizers / hadamard / layer / packing): tests compare robuq_fx's QAT, lowered,
seed-API, checkpoint and compile-backend paths against it, so a wrong formula cannot hide behind "QAT == lowered"
(both call the same functions). Differently built on purpose where it matters:
  - Hadamard: entries (-1)^popcount(i & j) / sqrt(b), not Sylvester's concatenation.
  - rounding: floor + an explicit half-to-even rule, not torch.round.
  - Gaussian clip c: closed-form MSE derivative (erf) and bisection, not a grid integral and golden-section search;
    tests/test_oracle_math.py checks it against Max (1960).
  - packing: written from the layout tables in robuq_fx/packing.py's docstring (the file format), with plain ints.

Documented implementation choices the oracle models (robuq_fx/quantizers.py's docstring):
  - k-bit weight scale s = clamp_min(max|R|, 1e-8) / qmax; the scale is rounded to `scale_dtype` before the codes.
  - sigma ranges are kept inside the token's data range: r = min(|mu| + c sigma, max|x|) (sym),
    [max(mu - c sigma, min x), min(mu + c sigma, max x)] (asym). Symmetric c uses 2^k - 1 levels, asymmetric 2^k.
Not modelled: the implementation rotates in the input's dtype (a bf16 model's x H is rounded to bf16 before it is
quantized); the tests use fp32 models, where that rounding is the fp32 error below.

Everything here is float64; the implementation computes in fp32. The quantizers and `layer` turn that difference
into a stated tolerance: an error bound for each fp32 step (`err` / `rotation_error`), the code `margin` it implies
(codes closer to a rounding tie may round either way, by one step) and `Layer.bound` for outputs.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

F64 = torch.float64
EPS = 1e-8
U32 = 2.0 ** -24  # fp32 unit roundoff
# Relative error budget of the fp32 implementation: ~170 fp32 ulps. Far below any quantization step (the smallest,
# 8-bit, is ~1/127 of the range), far above fp32 rounding of sums of <= 256 terms (<= 256 * 2^-24 = 1.5e-5 worst
# case, ~1e-6 typical).
REL = 2e-5
# Rounding that can move a code: fp32 dot products of <= 128 terms (rotation, A B), one division. Bound used: 64 ulps
# of the summed magnitudes (8x the typical sqrt(128) ulps); codes closer than that to a tie may round either way.
ROT = 64 * U32
# Sigma ranges: fp32 mean / std, and c found on a grid by the implementation (within 2.4e-5 relative of this
# oracle's closed form for every level count used; tests/test_oracle_math.py checks 5e-5).
SIGMA_REL = 5e-5


# ---- Hadamard -----------------------------------------------------------------------------------------------------
def hadamard(b: int) -> torch.Tensor:
    i = torch.arange(b)
    parity = torch.zeros(b, b, dtype=torch.long)
    bits = i[:, None] & i[None, :]
    while bits.any():
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(F64) / math.sqrt(b)


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """x H along the last dimension, H block-diagonal of order `block` (0 or 1: identity)."""
    x = x.to(F64)
    if block <= 1:
        return x
    k = x.shape[-1]
    return (x.reshape(*x.shape[:-1], k // block, block) @ hadamard(block)).reshape(x.shape)


def residual(w, down=None, up=None, block: int = 0) -> torch.Tensor:
    """R = W H - A B (A = lrb_up (N, r), B = lrb_down (r, K))."""
    r = rotate(w, block)
    if down is not None:
        r = r - up.to(F64) @ down.to(F64)
    return r


def top_r(w_h: torch.Tensor, r: int) -> torch.Tensor:
    """A B of the top-r SVD of W H (the LRB initialisation; the split between A and B does not change A B)."""
    u, s, vh = torch.linalg.svd(w_h.to(F64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


# ---- rounding -------------------------------------------------------------------------------------------------------
def round_half_even(t: torch.Tensor) -> torch.Tensor:
    f = torch.floor(t)
    d = t - f
    up = (d > 0.5) | ((d == 0.5) & (torch.remainder(f, 2) == 1))
    return f + up.to(t.dtype)


def tie_distance(u: torch.Tensor) -> torch.Tensor:
    """Distance of an unrounded code value to the nearest rounding boundary (a half-integer)."""
    return (u - torch.floor(u) - 0.5).abs()


# ---- Gaussian clip (MSE-optimal uniform quantizer of N(0, 1)) -------------------------------------------------------
def _phi(t):
    return 0.0 if math.isinf(t) else math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def _Phi(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


def _dmse(c: float, levels: int) -> float:
    """d MSE / dc for levels y_i = -c + i * 2c / (L - 1), nearest-level rounding: with dy_i/dc = y_i / c,
    dMSE/dc = (2 / c) sum_i y_i [y_i (Phi(t_i+1) - Phi(t_i)) + phi(t_i+1) - phi(t_i)] over the cells [t_i, t_i+1]."""
    step = 2 * c / (levels - 1)
    total = 0.0
    for i in range(levels):
        y = -c + i * step
        a = -math.inf if i == 0 else y - step / 2
        b = math.inf if i == levels - 1 else y + step / 2
        total += y * (y * (_Phi(b) - _Phi(a)) + _phi(b) - _phi(a))
    return 2 * total / c


@functools.lru_cache(maxsize=None)
def gaussian_clip(levels: int) -> float:
    lo, hi = 1e-3, 12.0  # dMSE/dc < 0 below the optimum, > 0 above (unimodal)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _dmse(mid, levels) < 0 else (lo, mid)
    return (lo + hi) / 2


# ---- quantizers ---------------------------------------------------------------------------------------------------
# Each quantizer takes `err`: how far the implementation's fp32 input may be from this float64 one (absolute, per
# element; None = exact). From it the quantizer derives, in code units, `margin`: how far the implementation's
# unrounded code may be from u (codes closer than that to a rounding tie may round either way), and `rel_s`, the
# relative error of its scale (`dlo`: the absolute error of an asymmetric offset).
@dataclass
class Quant:
    q: torch.Tensor       # integer codes (float64 holding integers)
    u: torch.Tensor       # the unrounded code value
    s: torch.Tensor       # scale, broadcastable to q (weights: (N, G) or (1, 1))
    lo: torch.Tensor      # offset (asymmetric) or -r (symmetric)
    deq: torch.Tensor     # the dequantized value
    margin: torch.Tensor  # see above; zeros when exact
    rel_s: torch.Tensor
    dlo: torch.Tensor

    def near_tie(self) -> torch.Tensor:
        return tie_distance(self.u) < self.margin


def weight_qmax(w_bits) -> int:
    return 1 if w_bits == 1.58 else 2 ** (int(w_bits) - 1) - 1


def _safe(s):
    return torch.where(s > 0, s, torch.ones_like(s))


def quant_weight(r, w_bits, granularity="channel", group_size=0, scale_dtype="float32", err=None) -> Quant:
    """R (N, K) -> codes (N, K), scale (N, G) or (1, 1); q = clip(round(R / s), -qmax, qmax), Q_w(R) = s q."""
    r = r.to(F64)
    n, k = r.shape
    g = k if group_size == 0 else group_size
    view = (1, 1, n * k) if granularity == "tensor" else (n, k // g, g)
    rg = r.reshape(view)
    qmax = weight_qmax(w_bits)
    if w_bits == 1.58:
        s = rg.abs().mean(-1, keepdim=True).clamp_min(EPS)
    else:
        s = rg.abs().amax(-1, keepdim=True).clamp_min(EPS) / qmax
    s = s.to(getattr(torch, scale_dtype)).to(F64)
    u = torch.where(s > 0, rg / _safe(s), 0.0)  # fp16 flushes the 1e-8 floor to 0: codes 0
    q = round_half_even(u).clamp(-qmax, qmax)
    margin, rel_s = torch.zeros_like(u), torch.zeros_like(s)
    if err is not None:
        e = err.to(F64).reshape(view)
        ds = e.mean(-1, keepdim=True) if w_bits == 1.58 else e.amax(-1, keepdim=True) / qmax
        rel_s = ds / _safe(s) + ROT
        margin = e / _safe(s) + rel_s * u.abs()
    full = (n, k)
    return Quant(q.reshape(full), u.reshape(full), s.squeeze(-1), (-s * qmax).squeeze(-1), (s * q).reshape(full),
                 margin.reshape(full), rel_s.expand_as(rg).reshape(full), torch.zeros(()))


def act_range(x, a_bits, sym, clip="absmax", c=None):
    x = x.to(F64)
    mx, mn, amax = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True), x.abs().amax(-1, keepdim=True)
    if clip == "absmax":
        return (-amax, amax) if sym else (mn, mx)
    mu = x.mean(-1, keepdim=True)
    sigma = ((x - mu) ** 2).mean(-1, keepdim=True).sqrt()  # population std
    if c is None:
        c = gaussian_clip(2 ** a_bits - 1 if sym else 2 ** a_bits)
    if sym:
        r = torch.minimum(mu.abs() + c * sigma, amax)
        return -r, r
    return torch.maximum(mu - c * sigma, mn), torch.minimum(mu + c * sigma, mx)


def quant_act(xh, a_bits, sym, clip="absmax", err=None) -> Quant:
    """Per token (row): sym q in [-qmax, qmax], x ~ s q; asym q in [0, 2^k - 1], x ~ lo + s q. s = 0 -> q = 0.
    With `err`, the range's error is that of its data ends (max err of the token), and for sigma ranges also
    SIGMA_REL (fp32 mean / std, and the implementation's c)."""
    xh = xh.to(F64)
    lo, hi = act_range(xh, a_bits, sym, clip)
    top = 2 ** (a_bits - 1) - 1 if sym else 2 ** a_bits - 1
    s = hi / top if sym else (hi - lo) / top
    off = torch.zeros_like(lo) if sym else lo
    u = torch.where(s > 0, (xh - off) / _safe(s), 0.0)
    q = round_half_even(u).clamp(-top if sym else 0, top)
    margin, rel_s, dlo = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(s)
    if err is not None:
        e = err.to(F64).amax(-1, keepdim=True)
        rng = SIGMA_REL * (lo.abs() + hi.abs()) if clip == "sigma" else 0.0
        dlo = torch.zeros_like(s) if sym else e + rng
        rel_s = (2 * e + rng) / _safe(hi - lo) + ROT
        margin = (err.to(F64) + dlo) / _safe(s) + rel_s * u.abs()
    return Quant(q, u, s, lo, off + s * q, margin, rel_s, dlo)


def ste_mask(xh, a_bits, sym, clip="absmax") -> torch.Tensor:
    """Where the activation STE passes the gradient: lo <= x <= hi (everywhere when a_bits = 16)."""
    if a_bits >= 16:
        return torch.ones_like(xh, dtype=torch.bool)
    lo, hi = act_range(xh, a_bits, sym, clip)
    xh = xh.to(F64)
    return (xh >= lo) & (xh <= hi)


# ---- the layer ------------------------------------------------------------------------------------------------------
def rotation_error(x, block) -> torch.Tensor:
    """Bound on |fp32 x H - x H|: ROT of sum_j |x_j| |H_jk| (zero without a rotation: x H = x)."""
    if block <= 1:
        return torch.zeros(x.shape, dtype=F64)
    mag = x.to(F64).abs()
    return ROT * (mag.reshape(*x.shape[:-1], -1, block) @ hadamard(block).abs()).reshape(x.shape)


@dataclass
class Layer:
    y: torch.Tensor
    xh: torch.Tensor
    xq: torch.Tensor
    act: Quant | None
    w: Quant
    ab: torch.Tensor | None
    terms: torch.Tensor  # allowed fp32 error without code flips (see `layer`)

    def bound(self) -> torch.Tensor:
        """Allowed |y_impl - y| per element: `terms` plus one quantization step for every code within its margin
        of a rounding tie (fp32 may round it the other way): s_x |Q_w| over near-tie activations, |xq| s_w over
        near-tie weights."""
        n, k = self.w.q.shape
        slack = torch.zeros_like(self.y)
        if self.act is not None:
            near = self.act.near_tie().to(F64)
            slack = slack + self.act.s * (near @ self.w.deq.abs().T)
        s_w = self.w.s.repeat_interleave(k // self.w.s.shape[-1], dim=1).expand(n, k)
        return self.terms + slack + self.xq.abs() @ (self.w.near_tie() * s_w).T


def layer(x, weight, bias=None, down=None, up=None, *, w_bits=4, a_bits=4, sym=True, clip="absmax", block=0,
          granularity="channel", group_size=0, scale_dtype="float32", ab=None, exact=False, w_codes=None) -> Layer:
    """y = Q_a(x H) Q_w(R)^T + (x H)(A B)^T + bias, R = W H - A B. `ab` overrides A B: a branch the implementation
    initialised itself by an fp32 SVD (A B within 4e-6 of max |W H|, measured at K=128; allowed 1e-5).
    exact=True: inputs built so that the fp32 implementation computes x H, R, ranges and scales exactly.
    w_codes: the implementation's weight codes (e.g. unpacked from its buffer); they must equal these codes except
    one step at near-ties, and are then used there, so that the output bound needs no slack for weight codes.

    Allowed error without code flips (`Layer.terms`): REL of |xq| |Q_w|^T + |xh| |AB|^T + |bias| (fp32 sums),
    the scales' relative errors times the terms they multiply, an asymmetric offset's error times sum |Q_w|, and
    the rotation's error through the branch (and through the weight when activations are not quantized)."""
    svd = ab is not None
    if ab is None and down is not None:
        ab = up.to(F64) @ down.to(F64)
    ab = ab.to(F64) if ab is not None else None
    wh = rotate(weight, block)
    r = wh - (ab if ab is not None else 0)
    xh = rotate(x, block)
    ex = None if exact else rotation_error(x, block)
    er = None
    if not exact:
        er = rotation_error(weight, block)
        if down is not None:
            er = er + ROT * up.to(F64).abs() @ down.to(F64).abs()
        if svd:
            er = er + 1e-5 * wh.abs().amax()
    w = quant_weight(r, w_bits, granularity, group_size, scale_dtype, er)
    if w_codes is not None:
        diff = (w_codes.to(F64) - w.q).abs()
        assert diff.max() <= 1 and not ((diff > 0) & ~w.near_tie()).any(), "weight codes differ from the oracle"
        n, k = w.q.shape
        w.q = w_codes.to(F64)
        w.deq = w.q * w.s.repeat_interleave(k // w.s.shape[-1], dim=1).expand(n, k)
        w.margin = torch.zeros_like(w.margin)
    act = None if a_bits >= 16 else quant_act(xh, a_bits, sym, clip, ex)
    xq = xh if act is None else act.deq
    wa = w.deq.abs()
    y = xq @ w.deq.T
    terms = REL * (xq.abs() @ wa.T) + xq.abs() @ (wa * w.rel_s).T
    if act is not None:
        terms = terms + act.rel_s * (xq.abs() @ wa.T) + act.dlo * wa.sum(1)
    elif ex is not None:
        terms = terms + ex @ wa.T
    if ab is not None:
        y = y + xh @ ab.T
        terms = terms + REL * (xh.abs() @ ab.abs().T)
        if ex is not None:
            terms = terms + ex @ ab.abs().T + (1e-5 * wh.abs().amax() * xh.abs().sum(-1, keepdim=True) if svd else 0)
    if bias is not None:
        y = y + bias.to(F64)
        terms = terms + REL * bias.to(F64).abs()
    return Layer(y, xh, xq, act, w, ab, terms)


# ---- packing (the file format of robuq_fx/packing.py's docstring) ---------------------------------------------------
_GROUP = {1.58: 5, 2: 4, 3: 8, 4: 2, 8: 1}
_OFFSET = {1.58: 1, 2: 2, 3: 4, 4: 8, 8: 0}


def pack(codes: torch.Tensor, bits) -> bytes:
    flat = [int(c) for c in codes.reshape(-1).tolist()]
    group = _GROUP[bits]
    flat += [0] * (-len(flat) % group)
    out = bytearray()
    for i in range(0, len(flat), group):
        u = [c + _OFFSET[bits] for c in flat[i:i + group]]
        if bits == 8:
            out.append(flat[i] & 0xFF)
        elif bits == 1.58:
            out.append(sum(v * 3 ** j for j, v in enumerate(u)))
        elif bits == 3:
            word = sum(v << (3 * j) for j, v in enumerate(u))
            out += bytes([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF])
        else:
            out.append(sum(v << (bits * j) for j, v in enumerate(u)))
    return bytes(out)


def unpack(data: bytes, bits, shape) -> torch.Tensor:
    n = math.prod(shape)
    vals: list[int] = []
    if bits == 8:
        vals = [b - 256 if b > 127 else b for b in data]
    elif bits == 1.58:
        for b in data:
            vals += [(b // 3 ** j) % 3 - 1 for j in range(5)]
    elif bits == 3:
        for i in range(0, len(data), 3):
            word = data[i] | data[i + 1] << 8 | data[i + 2] << 16
            vals += [((word >> (3 * j)) & 7) - 4 for j in range(8)]
    else:
        per = 8 // bits
        for b in data:
            vals += [((b >> (bits * j)) & ((1 << bits) - 1)) - _OFFSET[bits] for j in range(per)]
    return torch.tensor(vals[:n], dtype=F64).reshape(shape)


# ---- inputs whose every step is exact in fp32 (dyadic values, H entries +-1/2, 1/4, 1/8): codes sit on ties ---------
def tie_activations(m, k, a_bits, sym, block, gen, step=2.0 ** -3) -> torch.Tensor:
    """x (m, k) fp32 such that x H (block 0/4/16/64) holds, per token, the range ends exactly (so the scale is
    exactly `step`) and codes exactly halfway between two levels (u = j + 0.5) or on a level."""
    if sym:
        top = 2 ** (a_bits - 1) - 1
        j = torch.randint(-top, top, (m, k), generator=gen).to(F64)
        lo = torch.zeros(m, 1, dtype=F64)
    else:
        top = 2 ** a_bits - 1
        j = torch.randint(0, top, (m, k), generator=gen).to(F64)
        lo = -torch.randint(0, 4 * top + 1, (m, 1), generator=gen).to(F64) * step / 4
    half = torch.rand(m, k, generator=gen) < 0.7
    y = lo + (j + half.to(F64) * 0.5) * step
    end = torch.randint(0, k, (m, 2), generator=gen)
    rows = torch.arange(m)
    if sym:
        sign = torch.where(torch.rand(m, generator=gen) < 0.5, -1.0, 1.0).to(F64)
        y[rows, end[:, 0]] = sign * top * step
    else:
        y[rows, end[:, 0]] = lo[:, 0]
        y[rows, (end[:, 0] + 1 + end[:, 1] % (k - 1)) % k] = lo[:, 0] + top * step
    x = rotate(y, block)  # H H = I: x H = y exactly
    assert torch.equal(x.float().double(), x)
    return x.float()


def tie_residual(n, k, w_bits, gen, group=0, step=2.0 ** -4) -> torch.Tensor:
    """R (n, k) with codes on ties: k-bit rows (or groups) hold +-qmax * step once and (j + 0.5) * step elsewhere;
    ternary rows (groups) have mean |R| = step exactly: 1/4 at +-step/2 (ties 0 | +-1), 1/4 at +-1.5 step, 1/2 at
    +-step."""
    g = group or k
    if w_bits == 1.58:
        mags = torch.tensor([0.5] * (g // 4) + [1.5] * (g // 4) + [1.0] * (g - g // 2), dtype=F64)
        cols = [mags[torch.randperm(g, generator=gen)] for _ in range(n * (k // g))]
        r = torch.stack(cols).reshape(n, k)
    else:
        top = weight_qmax(w_bits)
        r = torch.randint(-top, max(top, 1), (n, k), generator=gen).to(F64) + 0.5
        r.reshape(n, k // g, g)[:, :, 0] = top
    sign = torch.where(torch.rand(n, k, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    return r * sign * step


def dyadic(shape, gen, scale=2.0 ** -2) -> torch.Tensor:
    return torch.randint(-2, 3, shape, generator=gen).to(torch.float32) * scale
