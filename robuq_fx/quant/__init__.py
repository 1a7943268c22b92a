"""Import path of the RobuQ reference code (`from robuq_fx.quant.replace import replace_linear_layer`)."""
