"""The one-kernel forms' tables for a step plan (qat_step.Plan; on unless ROBUQ_QAT_WSIDE_KERNEL=0): which layers
the grouped forward weight side (`kernels/triton_wside.Group`) and the grouped backward
(`kernels/triton_wgrad.GradGroup`) cover, and where each layer's parts and gradients lie in the plan's flat
buffers. Built once a key, before any CUDA graph capture (their tables are copied to the GPU), and kept while the
masters stay where they are."""
from __future__ import annotations

import warnings

import torch

from . import qat_graph
from .ops import weight_grad_kernel, weight_side_kernel
from .qat_fused import _wside_on, _wside_requested
from .qat_step_layout import _contiguous, _master_spans, _per_layer, _unpack

MAX_KEYS = 64  # keys a plan keeps CUDA graphs and tables for, a direction (masters that keep moving: op by op)
# why-nots of the setting itself, named only where the switch was set to 1 explicitly (as the act op's "not on CUDA")
QUIET = frozenset({"not a CUDA tensor", "not under 16-bit autocast", "triton does not import"})


def forward_group(plan, masters: tuple, ptrs: tuple):
    """Unless ROBUQ_QAT_WSIDE_KERNEL=0: the one-kernel forward weight side's tables for the layers it covers
    (`kernels/triton_wside.Group`: all their parts), kept per (masters' addresses, c, autocast, which layers take
    B H) like the graphs; else None. Built here, before any capture. The first time a setting is seen, one warning
    names the layers it leaves to the op-by-op form, and why (the same math): those on CUDA under 16-bit autocast,
    or all of them where the switch was set to 1."""
    if not _wside_on():
        return None
    autocast = qat_graph._autocast_dtype(masters[0].device)
    key = (ptrs, plan.c, autocast, plan.act)
    if key in plan._groups:
        return plan._groups[key]
    if masters[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return None  # (its tables are copied to the GPU: not inside someone else's capture)
    ws = weight_side_kernel()
    items, why = [], []
    entries = _per_layer(plan.layers, plan.layout)  # each layer's stacked part: (shape, strides, offset)
    for i, ((layer, span), (_, stacked, down_at, bias_at)) in enumerate(zip(_master_spans(plan.layers), entries)):
        w, down, up, bias = _unpack(layer, list(masters[span]))
        no = "triton does not import" if ws is None else ws.supported(w, down, up, layer.module.spec, plan.c)
        if no is None and bias is not None and (bias.dtype != torch.float32 or bias.stride(-1) != 1):
            no = "bias not an fp32 master"
        why.append(no)
        if no is None:  # all of the layer's parts: Q_w(R) and A_c in its stacked part, B_c (or B H), bias_c
            items.append(ws.Item(i, w, down, up, layer.module.spec, stacked[2], stacked[1][0], with_up=True,
                                 bias=bias, bias_offset=bias_at[2] if bias_at else 0,
                                 down_offset=down_at[2] if down_at else None, down_rotated=plan.act[i]))
    if (plan.c, autocast) not in plan._wside_checked:
        plan._wside_checked.add((plan.c, autocast))
        loud = _wside_requested()
        left = [w for w in why if w is not None and (loud or w not in QUIET)]
        if left:
            warnings.warn(f"ROBUQ_QAT_WSIDE_KERNEL: {len(left)} of {len(why)} QAT layers keep the op-by-op weight "
                          f"side ({'; '.join(sorted(set(left)))})", RuntimeWarning, stacklevel=5)
    if len(plan._groups) >= MAX_KEYS:  # masters that keep moving: op by op, as the graphs (`_room`); none
        return None  # is dropped, since a captured graph reads its tables
    plan._groups[key] = ws.Group(items, plan.c, masters[0].device) if items else None
    return plan._groups[key]


def _fp32_slot(slot, shape: tuple) -> bool:
    """A packed gradient's slot (`_pack_grads`' (dtype, offset, shape, strides)) that is fp32, of this shape and
    contiguous."""
    return slot is not None and slot[0] == torch.float32 and slot[2] == shape and slot[3] == _contiguous(shape)


def grad_group(plan, key, masters: tuple, packed: tuple, needs: tuple, r_dtypes: tuple, g_flat: torch.Tensor):
    """Unless ROBUQ_QAT_WSIDE_KERNEL=0: the one-kernel backward's tables (`kernels/triton_wgrad.GradGroup`) for
    the layers whose gradients it can write (16-bit g_R under autocast's dtype, fp32 masters and slots, a
    Hadamard block of 16-128), kept per graph key; else None. packed: the packed gradients' layout
    (`_pack_grads`), whose fp32 buffer the slots are in."""
    if not _wside_on() or plan.c != plan.ab or plan.c not in (torch.bfloat16, torch.float16):
        return None
    if key in plan._grad_groups:
        return plan._grad_groups[key]
    ws = weight_grad_kernel()
    if ws is None or not ws.grads_device_ok(g_flat):
        return None
    slots = packed[1]  # per gradient, in the masters' order: (dtype, offset, shape, strides) or None
    out = []
    entries = _per_layer(plan.layers, plan.layout)
    for i, ((layer, span), (_, stacked, _, bias_at), r_dtype) in enumerate(
            zip(_master_spans(plan.layers), entries, r_dtypes)):
        w, down, up, bias = _unpack(layer, list(masters[span]))
        spec, need = layer.module.spec, needs[span]
        slot = slots[span]  # this layer's: g_W, then B's and A's with a branch, then the bias's
        if (layer.transposed or not need[0] or r_dtype != plan.c or not spec.hadamard
                or spec.hadamard_block not in (16, 32, 64, 128) or layer.k % spec.hadamard_block
                or not _fp32_slot(slot[0], tuple(w.shape))
                or (down is not None and (down.dtype != torch.float32 or down.stride(-1) != 1
                                          or down.shape[0] > ws.MAX_RANK))
                or (layer.r and need[2] and not _fp32_slot(slot[2], tuple(up.shape)))
                or (layer.has_bias and need[-1] and not _fp32_slot(slot[-1], tuple(bias.shape)))):
            continue
        out.append(ws.GradItem(i, w.shape[0], layer.k, spec, stacked[2], stacked[1][0], slot[0][1], down,
                               slot[2][1] if layer.r and need[2] else None,
                               bias_at[2] if layer.has_bias and need[-1] else None,
                               slot[-1][1] if layer.has_bias and need[-1] else None))
    group = ws.GradGroup(out, plan.c, g_flat.device) if out else None
    if len(plan._grad_groups) < MAX_KEYS:
        plan._grad_groups[key] = group
    return group
