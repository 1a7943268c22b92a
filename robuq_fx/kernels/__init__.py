"""Kernels for `robuq::qlinear`. The reference (pure torch) is always registered; GPU kernels register
themselves on import when their machine check passes at call time."""
from . import reference  # noqa: F401  (registers "reference")
from .qlinear import qlinear  # noqa: F401  (defines torch.ops.robuq.qlinear)
from .registry import QLinearArgs, available, forced, register, select, table, use  # noqa: F401

try:  # GPU kernels are optional: importing them must never break a CPU install
    from . import triton_fp8  # noqa: F401
except ImportError:
    pass
