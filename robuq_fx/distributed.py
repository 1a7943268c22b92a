"""Distributed QAT with torch's own engines: DDP and FSDP2 (`torch.distributed.fsdp.fully_shard`).

    qmodel = robuq_fx.quantize(model, policy, example_inputs)      # or the seed API: replace_linear_layer(model)
    ddp    = DistributedDataParallel(qmodel)                       # DDP: nothing robuq-specific
    fsdp   = robuq_fx.distributed.shard(qmodel)                    # FSDP2: one group per block, then the root
    ... train ...
    state  = robuq_fx.distributed.full_state_dict(fsdp)            # rank 0: full CPU state dict; others: {}

Why `shard` and not a loop of `fully_shard(block)`: FSDP2 all-gathers a module's parameters in a forward pre-hook
*of that module*. A drop-in QAT model (your model with QATLinear layers) mostly works as it is, except where the
model calls a block's submodule from outside the block (diffusers' DiT runs block 0's timestep embedder again for
the final layer): `shard` gives such a submodule its own group. A whole-graph QAT model is one flat FX graph: it reads `blocks.3.attn.qkv.weight` with a
`get_attr` and never calls `blocks.3`, so a per-block `fully_shard` never fires and the graph would see sharded
DTensor parameters (torch 2.13: "Operator robuq.hadamard.default does not have a sharding strategy registered").
`group_blocks` first moves each block's nodes into a `GraphModule` installed at the block's own path (parameter
names, and so state-dict keys, are unchanged), so the block is called and its hooks fire. Inside forward every
parameter is then a plain, full tensor: per-channel weight scales are computed on the full weight, and the robuq
ops never see a DTensor. Models built with the seed API are eager modules: `fully_shard` works on them as is.

A block whose parameters are also read outside its own nodes (a weight shared with another module), or whose
nodes cannot be moved as one unit (a dependency cycle through the rest of the graph), stays in the root's FSDP
group: `shard` reports it and gathers those parameters for the whole forward instead of one block at a time.
"""
from __future__ import annotations

import copy
import heapq
import operator
import re
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

from .passes.qat import ROBUQ_META
from .probe import outside_calls

_INDEX = re.compile(r"^\d+$")


def block_names(model: nn.Module) -> list[str]:
    """Default FSDP2 units: for every quantized layer, its name up to the first numeric component (a ModuleList
    item: `transformer_blocks.3.attn1.to_q` -> `transformer_blocks.3`), else the layer itself (`fc1`).
    Quantized layers: the robuq layers of a `quantize()` model, the `RobuQLinear` modules of a seed-API model."""
    info = getattr(model, ROBUQ_META, None)
    if info is not None:
        layers = list(info["layers"])
    else:
        from .seed import RobuQLinear
        layers = [n for n, m in model.named_modules() if isinstance(m, RobuQLinear)]
    blocks: list[str] = []
    for name in layers:
        parts = name.split(".")
        cut = next((i + 1 for i, p in enumerate(parts) if _INDEX.match(p)), len(parts))
        block = ".".join(parts[:cut])
        if block and block not in blocks:
            blocks.append(block)
    # a block nested in another one adds nothing (and FSDP2 would nest the groups): keep the outer one
    return [b for b in blocks if not any(b != o and b.startswith(o + ".") for o in blocks)]


def group_blocks(gm: fx.GraphModule, blocks: list[str]) -> tuple[list[str], dict[str, str]]:
    """In place: for every block name, move the nodes of `gm`'s flat graph that belong to it into one
    `GraphModule` installed at that path and call it from `gm`'s graph. Returns (grouped, {skipped: reason}).

    A node belongs to block P when it reads one of P's attributes (`get_attr` / `call_module` under P) or its
    `nn_module_stack` (recorded by both symbolic_trace and torch.export) passes through P. Values from outside
    (activations, root parameters, constants) become inputs of the block; values used outside become outputs.
    """
    grouped, skipped = [], {}
    for name in blocks:
        reason = _group_one(gm, name)
        if reason is None:
            grouped.append(name)
        else:
            skipped[name] = reason
    if grouped:
        _stable_toposort(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return grouped, skipped


def shard(model: nn.Module, blocks: list[str] | None = None, **fsdp_kwargs) -> nn.Module:
    """FSDP2 `fully_shard` on every block (default: `block_names(model)`), then on the root; in place, returns
    the model. A whole-graph `quantize()` GraphModule is regrouped first (`group_blocks`). A drop-in model (your
    model with QATLinear layers) is sharded as it is, and a block's submodule that also runs outside the block
    (found by running the example inputs quantize() kept) gets its own group first. `fsdp_kwargs` go to every
    `fully_shard` call (mesh, reshard_after_forward, mp_policy, ...)."""
    from torch.distributed.fsdp import fully_shard

    blocks = block_names(model) if blocks is None else list(blocks)
    if isinstance(model, fx.GraphModule):
        blocks, skipped = group_blocks(model, blocks)
        if skipped:
            warnings.warn("robuq_fx.distributed.shard: these blocks stay in the root FSDP group (their parameters "
                          f"are gathered for the whole forward): {skipped}", stacklevel=2)
        model._robuq_fsdp_skipped = skipped
    else:
        inputs = getattr(model, "_robuq_inputs", None)  # kept by quantize() (passes/dropin.py)
        for name in outside_calls(model, inputs, blocks) if inputs is not None else []:
            fully_shard(model.get_submodule(name), **fsdp_kwargs)  # its own group: gathered wherever it is called
    for name in blocks:
        fully_shard(model.get_submodule(name), **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective (call it on every rank): the full, unsharded state dict on CPU on rank 0, `{}` on the others.
    Keys are the plain model's (no `module.` from DDP; unchanged by `group_blocks`), so
    `robuq_fx.quantize(fresh_model, policy, example_inputs, init_lrb=False).load_state_dict(state)` takes it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- graph regrouping ----------------------------------------------------------------------------------------------
def _under(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def _in_block(node: fx.Node, prefix: str) -> bool:
    if node.op in ("placeholder", "output"):
        return False
    if node.op in ("get_attr", "call_module") and _under(str(node.target), prefix):
        return True
    if node.op == "get_attr":  # another module's attribute: read in the root graph, passed in as an input
        return False
    stack = node.meta.get("nn_module_stack") or {}
    return any(_under(str(v[0]), prefix) for v in stack.values())


def _group_one(gm: fx.GraphModule, prefix: str) -> str | None:
    """Regroup one block; returns None, or why it was left alone (the graph is then untouched)."""
    graph = gm.graph
    try:
        old = gm.get_submodule(prefix)
    except AttributeError:
        return "no such submodule"
    if isinstance(old, fx.GraphModule):
        return "already grouped"
    region = [n for n in graph.nodes if _in_block(n, prefix)]
    if not any(n.op not in ("get_attr",) for n in region):
        return "no computation in the graph belongs to it"
    inside = set(region)
    for n in region:
        if n.op == "get_attr" and any(u not in inside for u in n.users):
            outside = next(u for u in n.users if u not in inside)
            return f"its attribute {n.target} is also used outside the block (by node {outside.name})"
        if n.op == "call_module" and not _under(str(n.target), prefix):
            mod = gm.get_submodule(n.target)
            if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
                return f"it calls {n.target}, a module with state outside the block"
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    if _reaches(outputs, inside):
        return "its nodes cannot be moved as one call (a dependency cycle through the rest of the graph)"

    inputs: list[fx.Node] = []
    for n in region:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = copy.copy(a.meta)
    aliases: dict[str, nn.Module] = {}
    for n in region:
        new = sub.node_copy(n, lambda a: env[a])
        if n.op in ("get_attr", "call_module"):
            target = str(n.target)
            if _under(target, prefix):
                new.target = target[len(prefix) + 1:]
            else:  # a stateless module (dropout) owned by the root: the block gets its own reference
                new.target = "_outer_" + target.replace(".", "_")
                aliases[new.target] = gm.get_submodule(target)
        env[n] = new
    sub.output(tuple(env[o] for o in outputs))

    holder = nn.Module()
    holder._modules.update(old._modules)
    holder._modules.update(aliases)
    holder._parameters.update(old._parameters)
    holder._buffers.update(old._buffers)
    new_mod = fx.GraphModule(holder, sub, class_name=f"RobuQBlock_{prefix.replace('.', '_')}")
    # GraphModule copies only the attributes its graph reads, through fresh intermediate modules: put the block's
    # own children, parameters and buffers back so that names and unused entries stay exactly as they were.
    new_mod._modules.update(old._modules)
    new_mod._parameters.update(old._parameters)
    new_mod._buffers.update(old._buffers)
    new_mod._non_persistent_buffers_set.update(old._non_persistent_buffers_set)
    new_mod.train(old.training)

    with graph.inserting_after(region[-1]):
        call = graph.call_module(prefix, tuple(inputs))
    call.meta["robuq_block"] = prefix
    last = call
    for i, o in enumerate(outputs):
        with graph.inserting_after(last):
            item = graph.call_function(operator.getitem, (call, i))
        item.meta = {k: v for k, v in o.meta.items() if k == "val"}
        o.replace_all_uses_with(item, delete_user_cb=lambda u: u not in inside)
        last = item
    for n in reversed(region):
        graph.erase_node(n)
    parent, _, leaf = prefix.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new_mod)
    return None


def _reaches(starts: list[fx.Node], region: set) -> bool:
    """True when a path leaves the region and comes back into it (the region is not convex)."""
    seen: set = set()
    todo = [u for s in starts for u in s.users if u not in region]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u in region:
                return True
            todo.append(u)
    return False


def _stable_toposort(graph: fx.Graph) -> None:
    """Reorder nodes so that every node follows its inputs, keeping the existing order wherever it is valid."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    pending = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(index[n], n.name) for n in nodes if pending[n] == 0]
    by_name = {n.name: n for n in nodes}
    heapq.heapify(ready)
    order = []
    while ready:
        _, name = heapq.heappop(ready)
        n = by_name[name]
        order.append(n)
        for u in n.users:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, (index[u], u.name))
    if len(order) != len(nodes):
        raise RuntimeError("robuq_fx.distributed: the regrouped graph has a cycle (please report this)")
    for a, b in zip(order, order[1:]):
        if a.next is not b:
            a.append(b)
