"""Size accounting for lowered models: packed bytes per layer vs the bf16 bytes the same layers would take."""
from __future__ import annotations

import torch.nn as nn

from . import packing
from .modules import PackedLinear
from .passes.fuse import FusedLinear


def _nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def size_rows(model: nn.Module) -> list[dict]:
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, PackedLinear):
            continue
        n, k = m.out_features, m.in_features
        bf16 = 2 * n * k + (2 * n if m.bias is not None else 0)
        # the packed bytes a checkpoint holds, whichever layout qweight has in memory (modules.PackedLinear)
        codes = packing.packed_numel(n * k, m.spec.w_bits) + _nbytes(m.w_scale)
        lrb = _nbytes(m.lrb_down) + _nbytes(m.lrb_up)
        packed = codes + lrb + _nbytes(m.bias)
        label, spec = name, m.spec.short()
        if isinstance(m, FusedLinear):  # sibling layers in one: named by its members (lrb_up is block-diagonal)
            label, spec = m.label(), f"{m.member_specs[0].short()} fused x{len(m.members)}"
        rows.append({"layer": label, "spec": spec, "bf16 bytes": bf16, "codes+scales": codes,
                     "lrb bytes": lrb, "packed bytes": packed, "codes/bf16": round(codes / bf16, 4),
                     "packed/bf16": round(packed / bf16, 4)})
    return rows


def size_table(model: nn.Module, print_table: bool = True) -> list[dict]:
    """Rows per PackedLinear plus a TOTAL row; prints a tabulate table unless print_table=False."""
    rows = size_rows(model)
    if rows:
        tot = {k: sum(r[k] for r in rows) for k in ("bf16 bytes", "codes+scales", "lrb bytes", "packed bytes")}
        rows.append({"layer": "TOTAL", "spec": "", **tot, "codes/bf16": round(tot["codes+scales"] / tot["bf16 bytes"], 4),
                     "packed/bf16": round(tot["packed bytes"] / tot["bf16 bytes"], 4)})
    if print_table:
        from tabulate import tabulate
        print(tabulate(rows, headers="keys", tablefmt="github"))
    return rows
