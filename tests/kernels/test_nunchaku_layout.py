"""Our packed layers -> nunchaku's W4A4 layout (robuq_fx/kernels/nunchaku.py), checked on CPU.

The decoders below are written from the layout as nunchaku's sources state it (docs/backends.md: packer.py's
NunchakuWeightPacker and the store-order tables in src/kernels/zgemm/gemm_base.cuh), by index arithmetic on every
output position, not by undoing the adapter's reshape/permute. Round trips are bit-exact: codes are integers and
scales/LRB values are only moved (after the one cast to the activation dtype, which the expected values get too).
"""
import pytest
import torch

from robuq_fx import kernels
from robuq_fx.kernels import nunchaku as nk
from robuq_fx.kernels.reference import reference_qlinear
from robuq_fx.kernels.registry import QLinearArgs
from robuq_fx.layer import lrb_init
from robuq_fx.modules import PackedLinear
from robuq_fx.spec import LayerSpec


# ---- independent decoders, from the spec ----------------------------------------------------------------------------

def _signed4(v):
    return v - 16 * (v >= 8).long()


def decode_weight(q: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """int8 (N', K/2) -> codes (N', K). Tiles of 128 rows x 64 columns in (row tile, column tile) order; in a tile,
    32-bit little-endian words ordered (np:8, nl:8, kl:4, ns:2, ks:2), nibble j of a word (bits 4j..4j+3) is
    row 128 nt + 16 np + 8 ns + nl, column 64 kt + 32 ks + 8 kl + j."""
    b = q.contiguous().view(torch.uint8).reshape(-1).long()
    i = torch.arange(b.numel())
    word, byte = i // 4, i % 4
    ks, ns, kl = word % 2, word // 2 % 2, word // 4 % 4
    nl, np_, tile = word // 16 % 8, word // 128 % 8, word // 1024
    kt, nt = tile % (k // 64), tile // (k // 64)
    row = 128 * nt + 16 * np_ + 8 * ns + nl
    col = 64 * kt + 32 * ks + 8 * kl + 2 * byte  # nibble j = 2 * byte (low) and 2 * byte + 1 (high)
    out = torch.full((q.shape[0], k), 99, dtype=torch.long)
    out[row, col] = _signed4(b & 0xF)
    out[row, col + 1] = _signed4(b >> 4)
    return out


def decode_scales(s: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """packed (G, N') -> (N', G). Memory (row tile, group, lane:32, e:4), channel 128 nt + 16 (lane // 4)
    + 8 (e // 2) + 2 (lane % 4) + e % 2 (the 'wscales store order' table)."""
    flat = s.reshape(-1)
    i = torch.arange(flat.numel())
    e, lane, g, nt = i % 4, i // 4 % 32, i // 128 % groups, i // (128 * groups)
    ch = 128 * nt + 16 * (lane // 4) + 8 * (e // 2) + 2 * (lane % 4) + e % 2
    out = torch.full((s.numel() // groups, groups), float("nan"), dtype=s.dtype)
    out[ch, g] = flat
    return out


def decode_lowrank(p: torch.Tensor, down: bool) -> torch.Tensor:
    """proj_down (K, r') -> B (r', K); proj_up (N', r') -> A (N', r'). 16x16 fragments, inner memory order
    (nl:8, kl:4, ns:2, ks:2, l:2) for element (8 ns + nl, 8 ks + 2 kl + l); down: (rank, K) fragments ordered
    (K/16, r/16); up: (N, rank) fragments ordered (N/16, r/16)."""
    rows, r = p.shape
    flat = p.reshape(-1)
    i = torch.arange(flat.numel())
    l, ks, ns, kl, nl, frag = i % 2, i // 2 % 2, i // 4 % 2, i // 8 % 4, i // 32 % 8, i // 256
    rf, outer = frag % (r // 16), frag // (r // 16)
    a, b = 8 * ns + nl, 8 * ks + 2 * kl + l
    out = torch.full((r, rows) if down else (rows, r), float("nan"), dtype=p.dtype)
    if down:
        out[16 * rf + a, 16 * outer + b] = flat
    else:
        out[16 * outer + a, 16 * rf + b] = flat
    return out


# ---- spec examples --------------------------------------------------------------------------------------------------

def test_weight_word_holds_eight_k_neighbours_low_nibble_first():
    codes = torch.zeros(128, 128, dtype=torch.int8)
    codes[0, :8] = torch.tensor([1, 2, 3, 4, 5, 6, 7, -1])
    codes[1, 0] = -7  # nl = 1: word 16 of the tile (words run ks, ns, kl fastest), byte 64
    codes[0, 32] = 3  # ks = 1: word 1, byte 4
    codes[0, 64] = -2  # second 64-wide column tile: 1024 words of 4 bytes on, byte 4096
    q = nk.pack_weight(codes).view(torch.uint8).reshape(-1)
    assert q[:4].tolist() == [0x21, 0x43, 0x65, 0xF7]
    assert q[64].item() == 0x9 and q[4].item() == 0x3 and q[4096].item() == 0xE
    assert int((q != 0).sum()) == 7


def test_scale_store_order_matches_nunchakus_table():
    # gemm_base.cuh / packer.py: lane 0 loads channels 0 1 8 9, lane 1: 2 3 10 11, ..., lane 4: 16 17 24 25,
    # lane 31: 118 119 126 127
    s = torch.arange(128, dtype=torch.float16).reshape(128, 1)
    flat = nk.pack_scales(s).reshape(-1).long().tolist()
    assert flat[:20] == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, 16, 17, 24, 25]
    assert flat[-4:] == [118, 119, 126, 127]


def test_scales_are_group_major_within_each_128_channel_tile():
    s = (torch.arange(256).reshape(256, 1) * 10 + torch.arange(3)).to(torch.float32)  # value = 10 n + g
    p = nk.pack_scales(s).reshape(-1)
    assert p.shape == (768,)
    assert p[128:132].tolist() == [1, 11, 81, 91]  # tile 0, group 1, lane 0
    assert p[384:388].tolist() == [1280, 1290, 1360, 1370]  # tile 1, group 0, lane 0


# ---- round trips ----------------------------------------------------------------------------------------------------

def _layer(spec_kw, n, k, bias=True, seed=0):
    torch.manual_seed(seed)
    spec = LayerSpec(**spec_kw).resolve(k, n)
    w = torch.randn(n, k)
    down, up = lrb_init(w, spec) if spec.lora_rank else (None, None)
    return PackedLinear.from_float(w, torch.randn(n) if bias else None, down, up, spec)


def _args(m):
    return QLinearArgs(m.qweight, m.w_scale, m.bias, m.lrb_down, m.lrb_up, *m.op_args())


CASES = [
    (dict(w_bits=4, a_bits=4), 256, 384),
    (dict(w_bits=1.58, a_bits=4, lora_rank=32), 256, 256),
    (dict(w_bits=1.58, a_bits=4, lora_rank=20), 200, 128),  # N and r padded (to 256 and 32)
    (dict(w_bits=2, a_bits=4, group_size=128), 128, 512),  # group scales repeat over two nunchaku groups
    (dict(w_bits=3, a_bits=4, w_granularity="tensor"), 384, 128),
    (dict(w_bits=4, a_bits=4, group_size=64, lora_rank=16), 136, 256),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec_kw,n,k", CASES)
def test_round_trip_codes_scales_bias_lrb(spec_kw, n, k, dtype):
    m = _layer(spec_kw, n, k)
    w = nk.convert_args(_args(m), dtype)
    n_pad = -(-n // 128) * 128
    assert w.qweight.shape == (n_pad, k // 2) and w.qweight.dtype == torch.int8
    assert w.wscales.shape == (k // 64, n_pad) and w.wscales.dtype == dtype

    codes = decode_weight(w.qweight, n_pad, k)
    assert torch.equal(codes[:n], m.weight_codes().long())  # bit-exact: our codes -> nunchaku -> our codes
    assert not codes[n:].any()

    groups = k // 64
    scales = decode_scales(w.wscales, n_pad, groups)
    ws = m.w_scale.expand(n, 1) if m.w_scale.shape == (1, 1) else m.w_scale
    expected = ws.repeat_interleave(groups // ws.shape[1], dim=1).to(dtype)
    assert torch.equal(scales[:n], expected) and not scales[n:].any()

    bias = decode_scales(w.bias, n_pad, 1).reshape(-1)
    assert torch.equal(bias[:n], m.bias.to(dtype)) and not bias[n:].any()

    r = m.spec.lora_rank
    down, up = decode_lowrank(w.proj_down, down=True), decode_lowrank(w.proj_up, down=False)
    r_pad = -(-r // 16) * 16 if r else 16
    assert down.shape == (r_pad, k) and up.shape == (n_pad, r_pad)
    if r:
        assert torch.equal(down[:r], m.lrb_down.to(dtype)) and torch.equal(up[:n, :r], m.lrb_up.to(dtype))
    assert not down[r:].any() and not up[n:].any() and not up[:, r:].any()


def test_decoded_layout_computes_the_layer():
    """The decoded tensors, used the way nunchaku's GEMM uses them (int products per 64-group, times activation and
    weight group scales, plus (x H) proj_down proj_up and bias), give the reference output when the activation
    scales are per token (RobuQ's quantizer; nunchaku's own is per token and 64-group)."""
    from robuq_fx import layer
    from robuq_fx import quantizers as Q
    from robuq_fx.kernels.reference import spec_of
    n, k = 200, 256
    m = _layer(dict(w_bits=1.58, a_bits=4, lora_rank=8), n, k)
    a = _args(m)
    w = nk.convert_args(a, torch.float16)
    codes = decode_weight(w.qweight, 256, k).double()
    sw = decode_scales(w.wscales, 256, k // 64).double()
    x = torch.randn(7, k)
    xh = layer.rotate(x, spec_of(a))
    qx, sx, _ = Q.quantize_act(xh, 4, True)
    acc = torch.einsum("mgk,ngk->mng", qx.double().reshape(7, k // 64, 64), codes.reshape(256, k // 64, 64))
    y = sx.double() * (acc * sw).sum(-1)
    y = y + xh.double() @ decode_lowrank(w.proj_down, True).double().T @ decode_lowrank(w.proj_up, False).double().T
    y = (y + decode_scales(w.bias, 256, 1).double().reshape(-1))[:, :n]
    ref = reference_qlinear(x, a).double()
    # fp16 scales / LRB / bias (rel. 2^-11 each) vs the fp32 reference: a few 1e-3 of the output scale
    assert torch.allclose(y, ref, rtol=0, atol=5e-3 * ref.abs().max().item())


def test_8bit_and_bad_shapes_are_refused():
    m = _layer(dict(w_bits=8, a_bits=8), 128, 128)
    with pytest.raises(ValueError, match="8-bit"):
        nk.convert_args(_args(m), torch.float16)
    m = _layer(dict(w_bits=4, a_bits=4), 128, 192)
    with pytest.raises(ValueError, match="multiple of 128"):
        nk.convert_args(_args(m), torch.float16)
    m = _layer(dict(w_bits=4, a_bits=4, group_size=32), 128, 128)
    with pytest.raises(ValueError, match="group_size 32"):
        nk.convert_args(_args(m), torch.float16)


# ---- registry -------------------------------------------------------------------------------------------------------

def test_registered_and_says_why_not_here():
    rows = {r["kernel"]: r for r in kernels.available()}
    assert "nunchaku" in rows
    try:
        import nunchaku.ops.gemm  # noqa: F401
    except Exception:  # noqa: BLE001
        assert not rows["nunchaku"]["available"] and "nunchaku" in rows["nunchaku"]["why not"]


@pytest.mark.parametrize("cap,expect", [((8, 9), None), ((7, 5), None), ((9, 0), "Hopper"), ((12, 0), "NVFP4"),
                                        ((7, 0), "sm_75")])
def test_capability_reasons(cap, expect):
    why = nk._capability_reason(cap)
    assert why is None if expect is None else expect in why


def test_supports_refuses_what_nunchaku_cannot_compute(monkeypatch):
    a = _args(_layer(dict(w_bits=4, a_bits=4), 128, 128))
    assert "CUDA" in nk.supports(torch.randn(2, 128), a)
    x_cuda = type("FakeCudaInput", (), {"is_cuda": True, "dtype": torch.float16})()  # supports() reads only these
    x_bf16 = type("FakeCudaInput", (), {"is_cuda": True, "dtype": torch.bfloat16,
                                        "device": torch.device("cuda", 0)})()
    nk._capability.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    assert "sm_80" in nk.supports(x_bf16, a)  # Turing: fp16 only
    nk._capability.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 6))
    assert nk.supports(x_bf16, a) is None
    nk._capability.cache_clear()
    assert nk.supports(x_cuda, a) is None
    assert "a_bits=2" in nk.supports(x_cuda, _args(_layer(dict(w_bits=1.58, a_bits=2), 128, 128)))
    assert "w_bits=8" in nk.supports(x_cuda, _args(_layer(dict(w_bits=8, a_bits=4), 128, 128)))
    assert "multiple of 128" in nk.supports(x_cuda, _args(_layer(dict(w_bits=4, a_bits=4), 128, 192)))
    assert "float16" in nk.supports(type("F", (), {"is_cuda": True, "dtype": torch.float32})(), a)
