"""robuq_fx: RobuQ-style low-bit linear layers for any PyTorch model, through FX graph passes.

    policy -> capture -> passes/qat (quantize) -> passes/lower (lower) -> kernels (robuq::qlinear)
"""
from . import kernels, ops  # noqa: F401  (register torch.ops.robuq.*)
from .checkpoint import load_quantized, save_quantized  # noqa: F401
from .errors import (CaptureError, CheckpointError, LoweringError, PolicyError, RobuQError,  # noqa: F401
                     SpecError)
from .modules import PackedLinear  # noqa: F401
from .passes import fuse_activations, lower, quantize, robuq_info  # noqa: F401
from .policy import Policy  # noqa: F401
from .qat_weight_cache import quantize_weights_once_per_step  # noqa: F401
from .qat_step_hooks import weight_sides_per_forward  # noqa: F401
from .seed import RobuQLinear, replace_linear_layer  # noqa: F401
from .spec import LayerSpec  # noqa: F401
from .regional import compile_repeated_blocks  # noqa: F401
from .report import size_table  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use: the compile backend pulls in torch._dynamo (~1 s), distributed pulls in FSDP.
    # `robuq_fx.backend(policy, mode=...)` builds a torch.compile backend (the module itself is callable).
    if name in ("backend", "distributed", "ampn", "cli", "models"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'robuq_fx' has no attribute {name!r}")
