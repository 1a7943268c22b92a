"""Kernels for `robuq::qlinear`. The reference (pure torch) is always registered; GPU kernels register
themselves on import when their machine check passes at call time."""
from . import attention  # noqa: F401  (defines torch.ops.robuq.attention8)
from . import reference  # noqa: F401  (registers "reference")
from .qlinear import qlinear  # noqa: F401  (defines torch.ops.robuq.qlinear)
from .registry import QLinearArgs, available, forced, register, select, table, use  # noqa: F401

# Optional kernels and adapters: each imports without its GPU/package (its machine check then says why it cannot
# run); a broken one must never take the others or a CPU install down with it.
import importlib as _importlib

for _name in ("triton_fp8", "fht", "nunchaku"):
    try:
        _importlib.import_module(f"{__name__}.{_name}")
    except ImportError:
        pass
