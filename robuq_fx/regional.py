"""Regional compilation: `torch.compile` of a model's repeated blocks instead of the whole model.

A whole DiT-XL/2 under `torch.compile` is one graph of 28 blocks, traced and compiled op by op: minutes cold for the
paper policy's QAT graph on the H200's host. Its 28 blocks run the same code, so compiling one block serves all of
them (PyTorch's regional compilation recipe; diffusers' `ModelMixin.compile_repeated_blocks`, which needs the class
to list its block classes in `_repeated_blocks`; DiT's does not):

    qmodel = robuq_fx.quantize(model, "dit-xl-2-robuq", example_inputs=ex)
    robuq_fx.compile_repeated_blocks(qmodel)                 # each transformer block compiled, in place
    robuq_fx.compile_repeated_blocks(qmodel, mode="reduce-overhead")

QAT and lowered models alike: `quantize` keeps the blocks' classes, and the attention regions it captured share one
class where their code is the same (`passes/region.py`), so the blocks share one compiled graph (a block whose input
has other strides, as the first block's often does, gets one more). What is outside the blocks (embeddings, final
norm and projection) stays eager. Each QAT layer then computes its own weight side inside its block's graph: the
automatic once-a-forward weight-side hooks (`qat_step_hooks`) engage only under a compile of the whole model. Call
`robuq_fx.weight_sides_per_forward(qmodel)` first to have them here too (its hook runs in the eager root, and the
blocks' graphs take what it computed; `fixed_buffers=True` with mode="reduce-overhead").
"""
from __future__ import annotations

import torch.nn as nn

from .errors import RobuQError


def repeated_blocks(model: nn.Module) -> list[str]:
    """The names of model's repeated blocks: the modules whose class diffusers' `_repeated_blocks` lists, else the
    children of every `nn.ModuleList` of at least two modules of one class (the outermost such lists)."""
    wanted = set(getattr(model, "_repeated_blocks", None) or ())
    names: list[str] = []
    if wanted:
        for name, m in model.named_modules():
            if type(m).__name__ in wanted and not any(name.startswith(n + ".") for n in names):
                names.append(name)
        return names
    for name, m in model.named_modules():
        if any(name.startswith(n + ".") for n in names):
            continue
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1:
            names.extend(f"{name}.{i}" if name else str(i) for i in range(len(m)))
    return names


def compile_repeated_blocks(model: nn.Module, **compile_kwargs) -> list[str]:
    """`module.compile(**compile_kwargs)` on each of model's repeated blocks (`repeated_blocks`), in place; returns
    their names. Raises RobuQError where model has none (a whole-graph QAT model, a GraphModule, has no blocks:
    compile it whole)."""
    names = repeated_blocks(model)
    if not names:
        raise RobuQError(
            f"robuq_fx.compile_repeated_blocks: {type(model).__name__} has no repeated blocks (an nn.ModuleList of "
            "two or more modules of one class, or the classes its `_repeated_blocks` names); compile it whole with "
            "torch.compile(model)")
    mods = dict(model.named_modules())
    for name in names:
        mods[name].compile(**compile_kwargs)
    return names
