"""The asymmetric layers' column sums c = sum_k s_w q_w (`w_colsum`, robuq::qlinear's optional argument; PackedLinear
keeps it, as it keeps B H) replace the reduction over the weight codes that a compiled graph otherwise ran on every
forward (issue 17's leftover for -a3 / -a2): outputs are unchanged, the buffer follows every change of the weight,
stays fp32 through casts, is not in the checkpoint, and a wrong one is refused.

CPU here; lowered graphs pass it: test_rotated_down.py; the compiled graph's side: tests/kernels/test_inductor_traced.py
(the -a3 / -a2 trace holds no sum with it)."""
from __future__ import annotations

import pickle

import pytest
import torch

import robuq_fx
from robuq_fx import quantizers as Q
from robuq_fx.modules import PackedLinear


def _layer(a_bits=3, rank=8, k=256, n=96, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype)
    dn = (torch.randn(rank, k, generator=g) * 0.05).to(dtype)
    up = (torch.randn(n, rank, generator=g) * 0.05).to(dtype)
    spec = robuq_fx.LayerSpec(w_bits=1.58, a_bits=a_bits, hadamard=True, hadamard_block=128, lora_rank=rank,
                              a_sym=a_bits >= 4, a_clip="sigma" if a_bits < 4 else "absmax").resolve(k, n)
    return PackedLinear.from_float(w, b, dn, up, spec)


def _op(m, x, **kw):
    return torch.ops.robuq.qlinear(x, m.qweight, m.w_scale, m.bias, m.lrb_down, m.lrb_up, *m.op_args(), **kw)


def _expected(m):
    return Q.weight_code_colsum(m.weight_codes(), m.w_scale)


def test_asymmetric_layers_keep_their_column_sums():
    m = _layer()
    assert not m.spec.sym and m.w_colsum is not None
    assert m.w_colsum.dtype == torch.float32 and torch.equal(m.w_colsum, _expected(m))
    assert _layer(a_bits=4).w_colsum is None  # symmetric: no offset term
    x = torch.randn(5, 256)
    assert torch.equal(m(x), _op(m, x)) and torch.equal(_op(m, x, w_colsum=m.w_colsum), _op(m, x))
    with pytest.raises(ValueError, match=r"w_colsum has shape \(48,\), expected \(96,\)"):
        _op(m, x, w_colsum=m.w_colsum[:48])
    assert "w_colsum" not in m.state_dict()
    m.bfloat16()  # a cast keeps the sums in fp32, as the codes' scales
    assert m.w_colsum.dtype == torch.float32 and torch.equal(m.w_colsum, _expected(m))
    other = _layer(seed=1, dtype=torch.bfloat16)
    m.load_state_dict(other.state_dict())  # a new weight: new sums
    assert torch.equal(m.w_colsum, _expected(other)) and not torch.equal(m.w_colsum, _expected(_layer()))


def test_a_layer_pickled_before_the_buffer_existed_still_runs():
    m = _layer()
    x = torch.randn(3, 256)
    ref = m(x)
    del m._buffers["w_colsum"]
    m._non_persistent_buffers_set.discard("w_colsum")
    old = pickle.loads(pickle.dumps(m))
    assert old.w_colsum is None and torch.equal(old(x), ref)


def test_fused_layers_stack_their_members_sums():
    """A sibling-fused layer of the lowered -a3 DiT (q/k/v) holds its members' sums stacked, each member taken back
    out its own. (That every lowered graph passes the buffer: test_rotated_down.py.)"""
    from robuq_fx.passes.fuse import FusedLinear
    from tests.models.conftest import CASES
    case = CASES["dit"]
    q = robuq_fx.quantize(case.build(0), robuq_fx.Policy.load("dit-xl-2-robuq-a3"), example_inputs=case.make_inputs())
    fused = [m for m in robuq_fx.lower(q, progress=False).modules() if isinstance(m, FusedLinear)]
    assert fused and all(not f.spec.sym for f in fused)
    for f in fused:
        assert torch.equal(f.w_colsum, _expected(f))
        parts = [f.member(i) for i in range(len(f.splits))]
        assert all(torch.equal(p.w_colsum, _expected(p)) for p in parts)
        assert torch.equal(torch.cat([p.w_colsum for p in parts]), f.w_colsum)
