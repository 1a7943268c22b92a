"""Every path that runs a RobuQ layer against the independent float64 oracle (tests/oracle.py): the QAT model
(`robuq_fx.quantize`, eval and its STE gradients), the lowered model (`robuq_fx.lower`: outputs, packed codes and
bytes), the seed API, packed checkpoints and the torch.compile backend; every weight / activation bit width and
option, on random, outlier, zero / constant-token and tie-heavy inputs.

Tolerances (oracle.layer / Layer.bound): |y - y_oracle| <= 2e-5 * (|xq| |Q_w|^T + |xh| |AB|^T + |bias|) per
element (fp32 accumulation), plus each scale's bounded relative error times the terms it multiplies (64 fp32 ulps of
the magnitudes R and x H are summed from; 5e-5 more for sigma ranges, whose c the implementation finds on a grid),
plus one quantization step for each code the oracle finds within that error of a rounding tie (fp32 may round it the
other way). Weight codes from the packed bytes must equal the oracle's except at such near-ties. Tie-heavy inputs are
exact in fp32 by construction, so there no code may move: the bound is the 2e-5 term alone and codes compare exactly.
A wrong formula moves outputs by whole quantization steps on many codes, far outside these bounds.
"""
import pytest
import torch
import torch.nn as nn

import oracle as O
import robuq_fx
from robuq_fx import RobuQLinear, replace_linear_layer
from test_oracle_math import random_tokens

K, N = 128, 48

CONFIGS = [
    dict(w_bits=1.58, a_bits=1),
    dict(w_bits=1.58, a_bits=2, lora_rank=8),
    dict(w_bits=1.58, a_bits=3, lora_rank=8, hadamard_block=16),
    dict(w_bits=1.58, a_bits=4, lora_rank=8, w_granularity="tensor"),
    dict(w_bits=1.58, a_bits=2, a_clip="sigma", lora_rank=8),
    dict(w_bits=1.58, a_bits=8, scale_dtype="float16", group_size=32),
    dict(w_bits=2, a_bits=2, hadamard=False),
    dict(w_bits=2, a_bits=4, a_sym=False, lora_rank=4),
    dict(w_bits=2, a_bits=3, w_granularity="tensor", a_clip="sigma"),
    dict(w_bits=3, a_bits=3, lora_rank=8),
    dict(w_bits=3, a_bits=3, a_clip="sigma", hadamard=False),
    dict(w_bits=3, a_bits=8, group_size=32),
    dict(w_bits=4, a_bits=4),
    dict(w_bits=4, a_bits=4, a_clip="sigma", lora_rank=8),
    dict(w_bits=4, a_bits=4, a_sym=False, a_clip="sigma"),
    dict(w_bits=4, a_bits=16, lora_rank=8),
    dict(w_bits=4, a_bits=1, group_size=16, lora_rank=4),
    dict(w_bits=4, a_bits=3, scale_dtype="bfloat16", lora_rank=4),
    dict(w_bits=8, a_bits=8, lora_rank=8),
    dict(w_bits=8, a_bits=8, a_sym=False, a_clip="sigma", hadamard=False),
    dict(w_bits=8, a_bits=16, hadamard=False),
]


def cid(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


def linear(seed=0, k=K, n=N):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight[:, :4] *= 8.0  # outlier input channels
    return lin


def policy(cfg):
    return {"rules": [{"type": "Linear", **cfg}]}


def spec_kw(spec) -> dict:
    """The oracle's arguments for a resolved robuq_fx spec (a dict from robuq_info or a LayerSpec)."""
    s = spec if isinstance(spec, dict) else spec.to_dict()
    return dict(w_bits=s["w_bits"], a_bits=s["a_bits"], sym=s["a_sym"], clip=s["a_clip"],
                block=s["hadamard_block"] if s["hadamard"] else 0, granularity=s["w_granularity"],
                group_size=s["group_size"], scale_dtype=s["scale_dtype"])


def expect(x, weight, bias, down, up, kw, ab=None, exact=False, packed=None):
    """(oracle layer, allowed error) for x through one layer. packed: the layer's PackedLinear, whose codes (checked
    against the oracle's: equal, or one step apart at a near-tie) settle the near-ties."""
    codes = None if packed is None else packed.weight_codes()
    o = O.layer(x, weight, bias, down, up, ab=ab, exact=exact, w_codes=codes, **kw)
    return o, o.bound()


def assert_within(y, o, bound, what):
    err = (y.double() - o.y).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (f"{what}: |y - oracle| = {err.flatten()[worst]:.3g} > allowed "
                                        f"{bound.flatten()[worst]:.3g} (|y| max {o.y.abs().max():.3g})")


def assert_packed(packed, o):
    """The packed buffer holds the oracle's codes (exactly, or up to rounding ties) in the documented layout."""
    data = bytes(packed.qweight.tolist())
    codes = O.unpack(data, packed.spec.w_bits, (packed.out_features, packed.in_features))
    assert O.pack(codes, packed.spec.w_bits) == data
    diff = (codes - o.w.q).abs()
    assert diff.max() <= 1 and not bool(((diff > 0) & ~o.w.near_tie()).any()), "packed codes differ from the oracle"
    s = packed.w_scale.double()
    rel = o.w.rel_s.reshape(*s.shape, -1)[..., 0]  # one per scale group
    # bf16 / fp16 storage: the implementation's fp32 scale and this float64 one round to the same value unless they
    # straddle a rounding boundary (half an ulp: 2^-9 bf16, 2^-11 fp16)
    rel = rel + {"float32": 0.0, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -10}[packed.spec.scale_dtype]
    assert bool(((s - o.w.s).abs() <= rel * o.w.s).all()), "packed weight scales differ from the oracle"


def qat_layer(cfg, seed=0):
    q = robuq_fx.quantize(nn.Sequential(linear(seed)), policy(cfg))
    m = q.get_submodule("0")
    if getattr(m, "lrb_down", None) is not None:
        with torch.no_grad():  # a trained branch, not the SVD init
            m.lrb_down.add_(0.02 * torch.randn_like(m.lrb_down))
            m.lrb_up.add_(0.02 * torch.randn_like(m.lrb_up))
    kw = spec_kw(robuq_fx.robuq_info(q)["layers"]["0"])
    # METHOD.md's defaults: symmetric activation codes from 3 bits, Hadamard block 128 (when it divides K)
    assert kw["sym"] == cfg.get("a_sym", cfg["a_bits"] >= 3)
    assert kw["block"] == (0 if not cfg.get("hadamard", True) else cfg.get("hadamard_block", 128))
    return q, m, kw


def lrb(m):
    return getattr(m, "lrb_down", None), getattr(m, "lrb_up", None)


# ---- QAT and lowered, every option ------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=cid)
def test_qat_and_lowered_match_oracle(cfg):
    q, m, kw = qat_layer(cfg)
    x = random_tokens(K, kw["block"], seed=7).reshape(2, 6, K)
    low = robuq_fx.lower(q)
    assert_packed(low.get_submodule("0"), O.layer(x, m.weight, m.bias, *lrb(m), **kw))
    o, bound = expect(x, m.weight, m.bias, *lrb(m), kw, packed=low.get_submodule("0"))
    with torch.no_grad():
        assert_within(q.eval()(x), o, bound, "QAT")
        assert_within(low(x), o, bound, "lowered")


TIES = [dict(w_bits=1.58, a_bits=1, hadamard_block=16), dict(w_bits=1.58, a_bits=2, lora_rank=4),
        dict(w_bits=2, a_bits=3, hadamard=False), dict(w_bits=3, a_bits=3, a_sym=False, lora_rank=4),
        dict(w_bits=4, a_bits=4, hadamard_block=4, lora_rank=4), dict(w_bits=4, a_bits=2, group_size=16),
        dict(w_bits=8, a_bits=8, lora_rank=4), dict(w_bits=8, a_bits=8, a_sym=False, hadamard_block=16)]


@pytest.mark.parametrize("cfg", TIES, ids=cid)
def test_tie_heavy_inputs_exact(cfg):
    """Weights and activations whose codes sit exactly on rounding ties (exact fp32 arithmetic): round half to even,
    no tolerance on codes."""
    k = 64
    q = robuq_fx.quantize(nn.Sequential(nn.Linear(k, 32)), policy(cfg))
    m = q.get_submodule("0")
    kw = spec_kw(robuq_fx.robuq_info(q)["layers"]["0"])
    g = torch.Generator().manual_seed(3)
    r = O.tie_residual(32, k, kw["w_bits"], g, kw["group_size"])
    down, up = lrb(m)
    with torch.no_grad():
        ab = torch.zeros(32, k, dtype=torch.float64)
        if down is not None:
            down.copy_(O.dyadic(down.shape, g, 2.0 ** -3))
            up.copy_(O.dyadic(up.shape, g))
            ab = up.double() @ down.double()
        m.weight.copy_(O.rotate(r + ab, kw["block"]).float())
        m.bias.copy_(O.dyadic((32,), g))
    x = O.tie_activations(10, k, kw["a_bits"], kw["sym"], kw["block"], g)
    o, bound = expect(x, m.weight, m.bias, down, up, kw, exact=True)
    assert (O.tie_distance(o.w.u) == 0).float().mean() > 0.2 and (O.tie_distance(o.act.u) == 0).float().mean() > 0.3
    with torch.no_grad():
        assert_within(q.eval()(x), o, bound, "QAT")
        low = robuq_fx.lower(q)
        assert_within(low(x), o, bound, "lowered")
    assert_packed(low.get_submodule("0"), o)


# ---- STE gradients --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(w_bits=4, a_bits=4, lora_rank=8),
                                 dict(w_bits=1.58, a_bits=2, a_clip="sigma", lora_rank=8),
                                 dict(w_bits=3, a_bits=3, a_clip="sigma", hadamard_block=16)], ids=cid)
def test_qat_gradients_match_oracle(cfg):
    """y = Q_a(xH) Q_w(R)^T + xH (AB)^T + b with R = WH - AB; STE: dQ_w/dR = 1, dQ_a/dxH = [lo <= xH <= hi].
    Tolerance: 2e-5 of each formula's summed magnitudes (fp32 sums), the scales' errors, and for codes and clip
    decisions within fp32 reach of a tie or a range end, the whole term they may move (rotated by |H|)."""
    q, m, kw = qat_layer(cfg, seed=1)
    q.train()
    x = random_tokens(K, kw["block"], seed=5).requires_grad_(True)
    g = torch.randn(x.shape[0], N, generator=torch.Generator().manual_seed(9))
    q(x).backward(g)
    down, up = (t if t is None else t.detach() for t in lrb(m))
    o = O.layer(x.detach(), m.weight.detach(), m.bias.detach(), down, up, **kw)
    a, wq = o.act, o.w
    gd, xh, blk = g.double(), o.xh, kw["block"]
    ab = o.ab if o.ab is not None else torch.zeros(N, K, dtype=torch.float64)
    mask = O.ste_mask(xh, kw["a_bits"], kw["sym"], kw["clip"])
    top = 2 ** (kw["a_bits"] - 1) - 1 if kw["sym"] else 2 ** kw["a_bits"] - 1
    end = torch.minimum((a.u - top).abs(), (a.u + top).abs() if kw["sym"] else a.u.abs()) < a.margin
    if kw["clip"] == "absmax":
        end[:] = False  # the range ends are data values: inside in both, no rounding involved
    s_w = wq.s.repeat_interleave(K // wq.s.shape[-1], dim=1).expand(N, K)
    A = lambda t: t.abs()  # noqa: E731  (magnitude of each formula: what fp32 rounding is relative to)
    grad_r, mag_r = gd.T @ o.xq, A(gd).T @ A(o.xq)
    # codes near a tie may move one step; the scale and offset are off by rel_s / dlo (sigma ranges: the c)
    slack_r = A(gd).T @ (a.near_tie() * a.s + A(o.xq) * a.rel_s + a.dlo)
    slack_xh = A(gd @ wq.deq) * end + A(gd) @ (wq.near_tie() * s_w)
    want = {"x": (O.rotate((gd @ wq.deq) * mask + gd @ ab, blk), A(gd) @ A(wq.deq) + A(gd) @ A(ab), slack_xh),
            "weight": (O.rotate(grad_r, blk), mag_r, slack_r), "bias": (gd.sum(0), A(gd).sum(0), 0.0)}
    got = {"x": x.grad, "weight": m.weight.grad, "bias": m.bias.grad}
    if down is not None:
        ad, bd = up.double(), down.double()
        mag_l = mag_r + A(gd).T @ A(xh)
        want["lrb_up"] = (-grad_r @ bd.T + gd.T @ (xh @ bd.T), mag_l @ A(bd).T, slack_r @ A(bd).T)
        want["lrb_down"] = (-ad.T @ grad_r + ad.T @ gd.T @ xh, A(ad).T @ mag_l, A(ad).T @ slack_r)
        got.update(lrb_up=m.lrb_up.grad, lrb_down=m.lrb_down.grad)
    for name, (w, mag, slack) in want.items():
        if name in ("x", "weight") and blk > 1:  # magnitudes before the rotation spread over their block
            rot = lambda t: (t.reshape(*t.shape[:-1], -1, blk) @ O.hadamard(blk).abs()).reshape(t.shape)  # noqa
            mag, slack = rot(mag), rot(slack)
        err = (got[name].double() - w).abs()
        assert bool((err <= O.REL * mag + slack).all()), f"{name}: max error {err.max():.3g}"


# ---- seed API, checkpoints, compile backend -----------------------------------------------------------------------
SEED = [dict(nbits=3, w_bits=1.58, if_lora=True), dict(nbits=2, w_bits=4, if_lora=False, a_clip="sigma"),
        dict(nbits=8, w_bits=8, if_lora=True, group_size=32)]


@pytest.mark.parametrize("cfg", SEED, ids=cid)
def test_seed_api_matches_oracle(cfg):
    lin = linear(2)
    m = RobuQLinear.from_linear(lin, if_hadamard=True, **cfg)
    if m.lrb_down is not None:
        with torch.no_grad():
            m.lrb_down.mul_(0.9)
    kw = spec_kw(m.spec)
    x = random_tokens(K, kw["block"], seed=4)
    o, bound = expect(x, m.weight, m.bias, m.lrb_down, m.lrb_up, kw)
    with torch.no_grad():
        assert_within(m(x), o, bound, "RobuQLinear")
        m.prepare_for_inference()
        assert_within(m.eval()(x), o, bound, "prepare_for_inference")
    assert_packed(m.packed, o)
    seq = replace_linear_layer(nn.Sequential(linear(2)), if_hadamard=True, **cfg)
    if cfg["if_lora"]:
        ab = O.top_r(O.rotate(lin.weight, kw["block"]), seq[0].spec.lora_rank)  # its own SVD initialisation
        o, bound = expect(x, lin.weight, lin.bias, None, None, kw, ab=ab)
    with torch.no_grad():
        assert_within(seq(x), o, bound, "replace_linear_layer")


@pytest.mark.parametrize("cfg", [CONFIGS[2], CONFIGS[9], CONFIGS[14]], ids=cid)
def test_checkpoint_round_trip_matches_oracle(cfg, tmp_path):
    q, m, kw = qat_layer(cfg)
    low = robuq_fx.lower(q)
    path = robuq_fx.save_quantized(low, tmp_path / "m.safetensors")
    back = robuq_fx.load_quantized(path, nn.Sequential(linear(seed=99)))  # other FP weights: unused
    x = random_tokens(K, kw["block"], seed=6)
    assert_packed(back.get_submodule("0"), O.layer(x, m.weight, m.bias, *lrb(m), **kw))
    o, bound = expect(x, m.weight, m.bias, *lrb(m), kw, packed=back.get_submodule("0"))
    with torch.no_grad():
        assert_within(back(x), o, bound, "loaded checkpoint")


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("cfg,mode", [(dict(w_bits=1.58, a_bits=3, lora_rank=8), "inference"),
                                      (dict(w_bits=4, a_bits=2, a_clip="sigma", lora_rank=4), "qat")], ids=str)
def test_compile_backend_matches_oracle(cfg, mode):
    """Dynamo -> the backend's QAT / lowering passes, run without Inductor (compiler='eager', ~1 s): the rewrite is
    what is under test; Inductor only fuses FP ops around the opaque robuq ops (tests/test_backend.py)."""
    import robuq_fx.backend as B
    torch._dynamo.reset()
    model = nn.Sequential(linear(3))
    if mode == "qat":
        B.prepare_qat(model, policy(cfg))
    be = robuq_fx.backend(policy(cfg), mode=mode, compiler="eager")
    kw = spec_kw(robuq_fx.LayerSpec(**cfg).resolve(K, N))
    x = random_tokens(K, kw["block"], seed=8)
    with torch.no_grad():
        y = torch.compile(model.eval(), backend=be)(x)
    torch._dynamo.reset()
    lin = model[0]
    if mode == "qat":
        o, bound = expect(x, lin.weight, lin.bias, lin.lrb_down, lin.lrb_up, kw)
    else:
        ab = O.top_r(O.rotate(lin.weight, kw["block"]), cfg["lora_rank"])
        o, bound = expect(x, lin.weight, lin.bias, None, None, kw, ab=ab)
    assert_within(y, o, bound, f"compile backend ({mode})")


# ---- high precision stays close to FP -------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, 32])
def test_w8a16_close_to_fp(rank):
    """8-bit weights, activations off: the relative output error is ~0.5% (s / sqrt(12) per weight, s = max|R| / 127);
    a broken scale, rotation or branch is off by far more than 1%."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    x = torch.randn(64, 256)
    q = robuq_fx.quantize(nn.Sequential(lin), policy(dict(w_bits=8, a_bits=16, lora_rank=rank))).eval()
    with torch.no_grad():
        ref = lin(x)
        for out in (q(x), robuq_fx.lower(q)(x)):
            rel = ((out - ref).norm() / ref.norm()).item()
            assert 1e-4 < rel < 0.01, rel
