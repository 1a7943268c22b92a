"""Sibling fusion: quantized linears that read the same tensor with the same activation spec become one layer.

DiT's to_q / to_k / to_v and Llama's q/k/v and gate/up projections each quantize the same input again. After
lowering, `fuse_siblings` replaces such a group of `robuq::qlinear` calls by ONE call on concatenated weights, so
the input is rotated and quantized once and a GPU kernel runs one GEMM; each member's output is a `narrow` of it:

    x ─┬─ qlinear(to_q) ─ q         x ─ qlinear(fused_to_q_to_k_to_v, splits=[Nq, Nk, Nv]) ─┬─ narrow(0, Nq)  ─ q
       ├─ qlinear(to_k) ─ k   ==>                                                          ├─ narrow(Nq, Nk) ─ k
       └─ qlinear(to_v) ─ v                                                                └─ narrow(...)    ─ v

Siblings: same input node, same in_features, w_bits, a_bits, Hadamard block, a_sym, a_clip, scale dtype, weight
group size and LRB rank. The fused layer (`FusedLinear`, a PackedLinear) holds, in member order (graph order):
    qweight   codes of the rows [W'_1; W'_2; ...] packed as one (ΣN, K) matrix
    w_scale   (ΣN, G); a per-tensor member's scale repeated over its rows (the same values: the same products)
    bias      concatenated; zeros for a member without one (x W^T + 0 == x W^T bit for bit, tested)
    lrb_down  (Σr, K): the members' B stacked;   lrb_up (ΣN, Σr): block-diagonal diag(A_1, A_2, ...)
With the block-diagonal A the fused layer is an ordinary qlinear: a kernel that ignores `splits` computes every
member's math (the zero blocks add exact zeros). `splits` (the members' N) lets the reference compute each member's
GEMM on its own rows, bit-identical to the unfused layers on every BLAS (a stacked product's summation order may
differ: block-diagonal LRB products do on CPU); GPU kernels may use it to skip the zero blocks.

Checkpoints stay per layer (`unfused_state_dict` / `layer_modules`): a file does not depend on the fusion rules, and
`load_quantized` loads unfused, then fuses.
"""
from __future__ import annotations

import dataclasses
import operator
import weakref

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from .. import packing
from ..capture import source_meta
from ..modules import PackedLinear
from ..spec import LayerSpec
from .qat import ROBUQ_META, set_robuq_info

QLINEAR = torch.ops.robuq.qlinear.default
BUFFERS = ("qweight", "w_scale", "bias", "lrb_down", "lrb_up")
DERIVED = ("lrb_down_h", "w_colsum")  # a PackedLinear's buffers made from those (not in its checkpoint)
# robuq::qlinear's arguments after the 13 every call has
_OPTIONAL = ("splits", "input_act", "lrb_down_h", "output_act", "w_colsum", "a_group")
_aten = torch.ops.aten
# view ops that fail on a narrowed (non-contiguous) output where the layer's own output was contiguous
_VIEW_TO_RESHAPE = {_aten.view.default: _aten.reshape.default, _aten._unsafe_view.default: _aten.reshape.default,
                    torch.Tensor.view: torch.Tensor.reshape}
_ALIAS_METHODS = {"view", "transpose", "permute", "unsqueeze", "squeeze", "expand", "narrow", "select", "t",
                  "unflatten", "split", "chunk", "unbind", "movedim", "swapaxes", "__getitem__", "view_as", "flatten"}


def qlinear_node(g: fx.Graph, x, path: str, mod: PackedLinear) -> fx.Node:
    """robuq::qlinear(x, <the buffers of the PackedLinear at `path`>, <its op args>) as a graph node; for a rotated
    low-rank branch also lrb_down_h=<its B H buffer> (remade by a later device move or cast; read at each call), so
    that a graph reads the layer's B H as PackedLinear.forward does instead of recomputing it every forward (H200
    session 13: the sibling-fused q/k/v did, one GEMM and two kernels a block at batch 1)."""
    attrs = [g.get_attr(f"{path}.{b}") if getattr(mod, b) is not None else None for b in BUFFERS]
    kwargs = {}
    for derived in DERIVED:  # (the layer's buffers made from the weight: B H, the column sums)
        if getattr(mod, derived) is not None:
            kwargs[derived] = g.get_attr(f"{path}.{derived}")
    for act in ("input_act", "output_act"):  # (fuse_activations' marks: such a call is no fusion site, `_site`)
        if getattr(mod, act):
            kwargs[act] = getattr(mod, act)
    if mod.spec.a_group:
        kwargs["a_group"] = mod.spec.a_group
    return g.call_function(QLINEAR, (x, *attrs, *mod.op_args()), kwargs)


class FusedLinear(PackedLinear):
    """One PackedLinear for several sibling layers (`members`, their module paths, in order); `splits` holds each
    member's out_features. Built by `fuse_packed`; `member(i)` gives member i back as its own PackedLinear."""

    def __init__(self, in_features: int, members: list[tuple[str, LayerSpec, int, bool]],
                 dtype: torch.dtype = torch.float32, device=None):
        """members: (path, spec, out_features, has_bias) per member; the specs agree on everything `_key` checks."""
        spec0 = members[0][1]
        spec = dataclasses.replace(spec0, w_granularity="channel", lora_rank=spec0.lora_rank * len(members))
        super().__init__(in_features, sum(m[2] for m in members), spec, any(m[3] for m in members), dtype, device)
        self.members = tuple(m[0] for m in members)
        self.member_specs = tuple(m[1] for m in members)
        self.splits = tuple(m[2] for m in members)
        self.member_bias = tuple(m[3] for m in members)

    def op_args(self) -> tuple:
        c = self.__dict__.get("_fused_op_args")
        if c is None:
            s = self.spec
            c = self.__dict__["_fused_op_args"] = (self.out_features, self.in_features, float(s.w_bits), s.a_bits,
                                                   s.hadamard_block or 0, bool(s.sym), s.a_clip, list(self.splits))
        return c

    def _rows(self, i: int) -> slice:
        o = sum(self.splits[:i])
        return slice(o, o + self.splits[i])

    @torch.no_grad()
    def member(self, i: int) -> PackedLinear:
        """Member i as the PackedLinear the unfused lowering builds (same buffers, same values)."""
        spec, rows, r = self.member_specs[i], self._rows(i), self.member_specs[i].lora_rank
        fdt = next((t.dtype for t in (self.bias, self.lrb_down) if t is not None), torch.float32)
        m = PackedLinear(self.in_features, self.splits[i], spec, self.member_bias[i], fdt, self.qweight.device)
        m.qweight.copy_(packing.pack(self.weight_codes()[rows], spec.w_bits))
        m.w_scale.copy_(self.w_scale[rows][: m.w_scale.shape[0]])  # per-tensor: all its rows hold the one scale
        if self.member_bias[i]:
            m.bias.copy_(self.bias[rows])
        if r:
            m.lrb_down.copy_(self.lrb_down[i * r:(i + 1) * r])
            m.lrb_up.copy_(self.lrb_up[rows, i * r:(i + 1) * r])
        m._refresh_derived()
        return m

    def label(self) -> str:
        """`a.b.to_q+to_k+to_v`: the members' paths with their common parent written once."""
        parts = [p.split(".") for p in self.members]
        n = len(_common_parent(parts))
        return ".".join(parts[0][:n] + ["+".join(".".join(p[n:]) for p in parts)])

    def extra_repr(self):
        return (f"in_features={self.in_features}, members={list(self.members)}, splits={list(self.splits)}, "
                f"spec={self.member_specs[0].short()}")


# ---- building a fused layer ---------------------------------------------------------------------------------------
def _float_dtype(m: PackedLinear):
    return next((t.dtype for t in (m.bias, m.lrb_down) if t is not None), None)


@torch.no_grad()
def fuse_packed(mods: list[PackedLinear], names=None) -> FusedLinear:
    """One FusedLinear from sibling PackedLinears (see the module docstring for the layout)."""
    names = list(names) if names is not None else [str(i) for i in range(len(mods))]
    k = mods[0].in_features
    dtype = next((d for d in map(_float_dtype, mods) if d is not None), torch.float32)
    dev = mods[0].qweight.device
    with torch.inference_mode(False):  # fused tensors must stay usable outside an inference_mode block
        f = FusedLinear(k, [(n, m.spec, m.out_features, m.bias is not None) for n, m in zip(names, mods)], dtype, dev)
        f.qweight.copy_(packing.pack(torch.cat([m.weight_codes() for m in mods]), f.spec.w_bits))
        g = f.w_scale.shape[1]
        f.w_scale.copy_(torch.cat([m.w_scale.expand(m.out_features, g) for m in mods]))
        if f.bias is not None:
            f.bias.copy_(torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=dtype,
                                                                                   device=dev) for m in mods]))
        if f.lrb_down is not None:
            f.lrb_down.copy_(torch.cat([m.lrb_down for m in mods]))
            f.lrb_up.copy_(torch.block_diag(*[m.lrb_up for m in mods]))
    return f.use_device_layout()  # fp8 codes on fp8-capable GPUs, like its members (modules.PackedLinear)


_FUSED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # first member -> {member ids: (weakrefs, FusedLinear)}


def fused_of(mods: list[PackedLinear], names=None) -> FusedLinear:
    """`fuse_packed`, cached on the members' identity (the compile backend rebuilds nothing per call: its
    PackedLinears are replaced, not updated, when a weight changes)."""
    per = _FUSED.get(mods[0])
    if per is None:
        per = _FUSED[mods[0]] = {}
    key = tuple(map(id, mods))
    hit = per.get(key)
    if hit is not None and all(r() is m for r, m in zip(hit[0], mods)):
        return hit[1]
    f = fuse_packed(mods, names)
    per[key] = (tuple(map(weakref.ref, mods)), f)
    return f


# ---- the graph pass -----------------------------------------------------------------------------------------------
def _site(gm: fx.GraphModule, node: fx.Node):
    """(module path, PackedLinear) when `node` is an unfused qlinear reading exactly one PackedLinear's buffers."""
    if node.op != "call_function" or node.target is not QLINEAR or len(node.args) < 13:
        return None
    extra = dict(zip(_OPTIONAL, node.args[13:]), **node.kwargs)  # a traced call spells the defaults out
    if (extra.get("splits") is not None or extra.get("input_act", "") or extra.get("output_act", "")
            or set(extra) - set(_OPTIONAL)):
        return None
    q = node.args[1]
    if not (isinstance(q, fx.Node) and q.op == "get_attr" and str(q.target).endswith(".qweight")):
        return None
    path = q.target[: -len(".qweight")]
    try:
        mod = gm.get_submodule(path)
    except AttributeError:
        return None
    if type(mod) is not PackedLinear or set(dict(mod.named_buffers())) - set(BUFFERS) - set(DERIVED):
        return None  # already fused, or holds another tensor (a tied FP weight) that the graph reads
    for b, a in [*zip(BUFFERS, node.args[1:6]), *((d, extra.get(d)) for d in DERIVED)]:
        if b not in DERIVED and (a is None) != (getattr(mod, b) is None):
            return None
        if a is not None and not (isinstance(a, fx.Node) and a.op == "get_attr" and a.target == f"{path}.{b}"):
            return None
    return path, mod


def _key(node: fx.Node, mod: PackedLinear) -> tuple:
    """Members of one group quantize x identically and have one weight format."""
    s = mod.spec
    return (node.args[0], *node.args[7:13], s.scale_dtype, s.group_size, s.lora_rank, s.a_group, mod.qweight.device)


def find_siblings(gm: fx.GraphModule) -> list[list[tuple[fx.Node, str, PackedLinear]]]:
    """Groups of >= 2 qlinear calls that can run as one, each in graph order."""
    sites = [(n, *s) for n in gm.graph.nodes if (s := _site(gm, n)) is not None]
    uses: dict[str, int] = {}
    for _, path, _ in sites:
        uses[path] = uses.get(path, 0) + 1
    groups: dict[tuple, list] = {}
    for node, path, mod in sites:
        if uses[path] == 1:  # a layer called twice keeps its own module (its other call still reads it)
            groups.setdefault(_key(node, mod), []).append((node, path, mod))
    out = []
    for members in groups.values():
        # a member without bias or LRB has no float dtype of its own: it joins the others if they agree
        dtypes = {d for m in members if (d := _float_dtype(m[2])) is not None}
        split = [members] if len(dtypes) <= 1 else [[m for m in members if _float_dtype(m[2]) == d]
                                                                for d in sorted(dtypes, key=str)]
        out += [g for g in split if len(g) > 1]
    return out


def _common_parent(parts: list[list[str]]) -> list[str]:
    common = []
    for level in zip(*[p[:-1] for p in parts]):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return common


def _fused_path(gm: fx.GraphModule, paths: list[str]) -> str:
    """`a.b.to_q`, `a.b.to_k` -> `a.b.fused_to_q_to_k` (deterministic; the common parent holds it)."""
    parts = [p.split(".") for p in paths]
    common = _common_parent(parts)
    parent = ".".join(common)
    leaf = "fused_" + "_".join("_".join(p[len(common):]) for p in parts)
    owner = gm.get_submodule(parent) if parent else gm
    while hasattr(owner, leaf):
        leaf += "_"
    return f"{parent}.{leaf}" if parent else leaf


def _reshape_views(node: fx.Node) -> None:
    """`view` consumers of a narrowed output (directly or through other views) become `reshape`: same values, and
    no error where the member's own output was contiguous and the narrowed one is not."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        for u in list(n.users):
            if u in seen:
                continue
            seen.add(u)
            if u.op == "call_function" and u.target in _VIEW_TO_RESHAPE:
                u.target = _VIEW_TO_RESHAPE[u.target]
            elif u.op == "call_method" and u.target in ("view", "view_as"):
                u.target = "reshape" if u.target == "view" else "reshape_as"
            elif not _aliases(u):
                continue
            todo.append(u)


def _aliases(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _ALIAS_METHODS
    if n.op != "call_function":
        return False
    schema = getattr(n.target, "_schema", None)
    if schema is not None:
        return any(r.alias_info is not None for r in schema.returns)
    return n.target in (operator.getitem, torch.narrow, torch.transpose, torch.permute, torch.unsqueeze,
                        torch.squeeze, torch.split, torch.chunk, torch.flatten, torch.unflatten)


def fuse_siblings(gm: fx.GraphModule, build=fuse_packed) -> dict[str, list[str]]:
    """In place: every sibling group of `gm`'s lowered graph -> one robuq::qlinear on a FusedLinear installed next
    to the members (which are removed once nothing reads them). Returns {fused path: [member paths]}.
    build(mods, paths) makes the fused module (the compile backend passes the cached `fused_of`)."""
    g, done = gm.graph, {}
    for members in find_siblings(gm):
        nodes, paths, mods = zip(*members)
        fused = build(list(mods), list(paths))
        path = _fused_path(gm, list(paths))
        parent, _, leaf = path.rpartition(".")
        (gm.get_submodule(parent) if parent else gm).add_module(leaf, fused)
        with g.inserting_before(nodes[0]):
            new = qlinear_node(g, nodes[0].args[0], path, fused)
            new.meta = source_meta(nodes[0])
            new.meta["robuq_lowered"] = path
            new.meta["robuq_fused"] = [n.meta.get("robuq_lowered", p) for n, p in zip(nodes, paths)]
            start = 0
            for node, n in zip(nodes, fused.splits):
                part = g.call_function(_aten.narrow.default, (new, -1, start, n))
                part.meta = source_meta(node)
                start += n
                node.replace_all_uses_with(part)
                _reshape_views(part)
        for node in nodes:
            args = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, fx.Node)]
            g.erase_node(node)
            for a in args:
                if not a.users:
                    g.erase_node(a)
        read = {str(n.target).rpartition(".")[0] for n in g.nodes if n.op == "get_attr"}
        for p in paths:
            if p not in read:
                owner_path, _, name = p.rpartition(".")
                delattr(gm.get_submodule(owner_path) if owner_path else gm, name)
        done[path] = list(paths)
    if done:
        g.lint()
        gm.recompile()
    return done


# ---- lowered models: fuse, and the per-layer view checkpoints use ---------------------------------------------------
def fuse_lowered(gm: fx.GraphModule) -> dict[str, list[str]]:
    """`fuse_siblings` on a `robuq_fx.lower` model; records the groups in its robuq info under "fused"."""
    info = getattr(gm, ROBUQ_META)
    done = fuse_siblings(gm)
    fused = {**info.get("fused", {}), **done}
    set_robuq_info(gm, dict(info, fused=fused))
    return done


def fused_modules(model: nn.Module) -> dict[str, FusedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FusedLinear)}


def layer_modules(model: nn.Module) -> dict[str, PackedLinear]:
    """{module path: PackedLinear} of every quantized layer, members of fused layers rebuilt as their own modules."""
    out = {n: m for n, m in model.named_modules() if type(m) is PackedLinear}
    for f in fused_modules(model).values():
        out.update({p: f.member(i) for i, p in enumerate(f.members)})
    return out


def unfused_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every FusedLinear's tensors replaced by its members' (the unfused keys)."""
    fused = fused_modules(model)
    out, emitted = {}, set()
    for k, v in model.state_dict().items():
        owner = k.rpartition(".")[0]
        if owner not in fused:
            out[k] = v
        elif owner not in emitted:
            emitted.add(owner)
            f = fused[owner]
            for i, p in enumerate(f.members):
                out.update({f"{p}.{b}": t for b, t in f.member(i).state_dict().items()})
    return out

