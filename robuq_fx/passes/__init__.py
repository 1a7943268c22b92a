from .act_fuse import fuse_activations  # noqa: F401
from .lower import lower  # noqa: F401
from .qat import quantize, robuq_info  # noqa: F401
