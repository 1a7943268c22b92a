"""robuq_fx/kernels/fht.py: fast_hadamard_transform as a block Hadamard, against robuq_fx.hadamard.block_hadamard."""
import pytest
import torch

from robuq_fx.hadamard import block_hadamard
from robuq_fx.kernels import fht


def test_available_says_why_not_or_none():
    why = fht.available()
    try:
        import fast_hadamard_transform  # noqa: F401
        has_pkg = True
    except Exception:  # noqa: BLE001
        has_pkg = False
    if not has_pkg:
        assert "fast_hadamard_transform" in why
    elif not torch.cuda.is_available():
        assert "CUDA" in why
    else:
        assert why is None


def test_refuses_cpu_and_bad_blocks_with_a_reason():
    x = torch.randn(2, 96)
    assert "CUDA" in fht.supports(x, 32)
    x_cuda = type("FakeCudaInput", (), {"is_cuda": True, "dtype": torch.float16, "shape": (2, 96)})()
    assert fht.supports(x_cuda, 32) is None
    assert "power of two" in fht.supports(x_cuda, 48)
    assert "does not divide" in fht.supports(x_cuda, 64)
    with pytest.raises(RuntimeError, match="block_hadamard_fht"):
        fht.block_hadamard_fht(x, 32)


@pytest.mark.gpu
@pytest.mark.skipif(fht.available() is not None, reason=f"fast_hadamard_transform unusable: {fht.available()}")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("block", [2, 32, 128, 1024])
def test_parity_with_block_hadamard(block, dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 2048, device="cuda", dtype=dtype)
    ref = block_hadamard(x.double(), block)
    y = fht.block_hadamard_fht(x, block)
    assert y.shape == x.shape and y.dtype == dtype
    # butterflies sum in a different order than the matmul: float rounding of log2(block) additions, relative to
    # the values' scale (tol ~ a few ulps of dtype times log2(block))
    assert torch.allclose(y.double(), ref, rtol=0, atol=tol * ref.abs().max().item())
