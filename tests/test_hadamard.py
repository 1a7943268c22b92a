import pytest
import torch

from robuq_fx.hadamard import block_hadamard, hadamard_matrix
from robuq_fx.spec import default_block


@pytest.mark.parametrize("b", [1, 2, 4, 16, 128])
def test_orthonormal_and_symmetric(b):
    h = hadamard_matrix(b, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(b, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)
    assert torch.allclose(h.abs(), torch.full_like(h, b ** -0.5))


@pytest.mark.parametrize("k,b", [(64, 64), (256, 128), (1152, 128), (96, 32)])
def test_linear_invariance(k, b):
    torch.manual_seed(0)
    x, w = torch.randn(7, k), torch.randn(13, k)
    ref, rot = x @ w.T, block_hadamard(x, b) @ block_hadamard(w, b).T
    assert ((ref - rot).abs().max() / ref.abs().max()).item() < 1e-5  # fp32 sums of K products: relative bound


def test_block_diagonal_structure():
    x = torch.zeros(1, 8)
    x[0, 5] = 1.0
    y = block_hadamard(x, 4)
    assert torch.equal(y[0, :4], torch.zeros(4))  # the first block is untouched by an input in the second
    assert torch.allclose(y[0, 4:].abs(), torch.full((4,), 0.5))


def test_involution():
    x = torch.randn(3, 5, 256, dtype=torch.float64)
    assert torch.allclose(block_hadamard(block_hadamard(x, 128), 128), x, atol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)
    with pytest.raises(ValueError, match="does not divide"):
        block_hadamard(torch.randn(2, 10), 4)


def test_default_block():
    assert default_block(1152) == 128 and default_block(4608) == 128 and default_block(96) == 32
    assert default_block(10) == 2 and default_block(7) == 1
