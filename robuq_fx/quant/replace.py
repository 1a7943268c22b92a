"""`from robuq_fx.quant.replace import replace_linear_layer` for scripts ported from the RobuQ reference code."""
from ..seed import RobuQLinear, replace_linear_layer  # noqa: F401
