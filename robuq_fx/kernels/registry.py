"""Kernel registry for `robuq::qlinear`: implementations register with a machine check and a per-call predicate;
the op picks the highest-priority one that accepts the call. The passes never know which kernel runs.

    ROBUQ_KERNEL=reference python ...          # force one kernel by name (env var), or
    with robuq_fx.kernels.use("reference"): ...
    ROBUQ_KERNEL_DISABLE=cuda_dequant python ...   # never pick these (comma-separated); the others still compete

Automatic choice is only for kernels that compute the layer's spec exactly as the reference does (up to the
rounding of float sums): a kernel registered with `auto=False` (an adapter that approximates the math, or one never
run against the reference on hardware) runs only when forced by name. `table()` says what each kernel takes.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class QLinearArgs:
    """Everything a qlinear kernel needs besides x (see `robuq::qlinear`)."""
    qweight: torch.Tensor
    w_scale: torch.Tensor
    bias: torch.Tensor | None
    lrb_down: torch.Tensor | None
    lrb_up: torch.Tensor | None
    out_features: int
    in_features: int
    w_bits: float
    a_bits: int
    hadamard_block: int
    a_sym: bool
    a_clip: str
    splits: tuple[int, ...] | None = None  # a fused layer's member out_features (see robuq::qlinear); None: one layer
    input_act: str = ""  # an activation applied to x first ("gelu", "gelu_tanh"; see robuq::qlinear); "": none
    lrb_down_h: torch.Tensor | None = None  # B H, precomputed by the layer (see robuq::qlinear); None: made here
    output_act: str = ""  # an activation applied to the output ("gelu", "gelu_tanh"; see robuq::qlinear); "": none
    w_colsum: torch.Tensor | None = None  # c = sum_k s_w q_w (N,) fp32, kept by the layer (see robuq::qlinear)
    a_group: int = 0  # one activation range per token and a_group inputs (LayerSpec.a_group); 0: per token


@dataclass(frozen=True)
class Kernel:
    name: str
    priority: int
    fn: Callable  # fn(x, args: QLinearArgs) -> Tensor
    machine_check: Callable[[], str | None]  # None if this machine can run it, else why not
    supports: Callable[[torch.Tensor, QLinearArgs], str | None]  # None if it takes this call, else why not
    auto: bool = True  # picked automatically; False: only when forced (ROBUQ_KERNEL / use())
    takes: str = ""    # which specs it computes, and how exactly (shown by table() / `robuq-fx kernels`)


_KERNELS: dict[str, Kernel] = {}
_FORCED: list[str] = []


def version_of(t: torch.Tensor) -> int:
    """t's version counter, -1 for an inference tensor (it has none, and cannot change in place)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def tensor_key(t) -> tuple:
    """Identity + version of a tensor, for kernels' weight caches: any in-place update (load_state_dict, copy_,
    an optimizer step) or a replacement tensor changes it."""
    if t is None:
        return (None,)
    return (id(t), t.data_ptr(), version_of(t), tuple(t.shape), t.dtype)


_BY_PRIORITY: list = []  # (ids of the registered kernels, them sorted): the sort is not redone on every call


def _kernel_ids() -> tuple:
    """Identities of the registered kernels: changes when one is registered or replaced (tests do)."""
    return tuple(map(id, _KERNELS.values()))


def _by_priority() -> list[Kernel]:
    ids = _kernel_ids()
    if not _BY_PRIORITY or _BY_PRIORITY[0] != ids:
        _BY_PRIORITY[:] = [ids, sorted(_KERNELS.values(), key=lambda k: -k.priority)]
    return _BY_PRIORITY[1]


def register(name: str, priority: int, machine_check=lambda: None, supports=lambda x, a: None, *,
             auto: bool = True, takes: str = ""):
    def deco(fn):
        _KERNELS[name] = Kernel(name, priority, fn, machine_check, supports, auto, takes)
        return fn
    return deco


_ENVIRON = getattr(os.environ, "_data", None)  # POSIX: the bytes dict behind os.environ (kept in step with it)


def env_values(names: tuple) -> tuple:
    """os.environ.get of each name, for keys that per-call caches compare on every call: ~0.7 us a name through
    os.environ's mapping (it encodes the key), a plain dict lookup through its bytes dict where there is one."""
    if _ENVIRON is not None and os.name == "posix":
        return tuple(_ENVIRON.get(n) for n in _encoded(names))
    return tuple(os.environ.get(n) for n in names)


@functools.lru_cache(maxsize=None)
def _encoded(names: tuple) -> tuple:
    return tuple(os.fsencode(n) for n in names)


_STATE_ENV = ("ROBUQ_KERNEL", "ROBUQ_KERNEL_DISABLE", "ROBUQ_FP8_MIN_M")


def state_key() -> tuple:
    """Everything besides the call itself that `select` depends on: the forced and disabled kernels, the threshold
    override, and which kernels are registered (callers that cache a selection key it on this)."""
    return tuple(_FORCED[-1:]), env_values(_STATE_ENV), _kernel_ids()


def forced() -> str | None:
    return _FORCED[-1] if _FORCED else (os.environ.get("ROBUQ_KERNEL") or None)


@contextlib.contextmanager
def use(name: str):
    """Force kernel `name` inside the block (raises at call time if it cannot take a call)."""
    if name not in _KERNELS:
        raise ValueError(f"unknown kernel {name!r}; registered: {sorted(_KERNELS)}")
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def select(x: torch.Tensor, args: QLinearArgs) -> Kernel:
    name = forced()
    if name is not None:
        k = _KERNELS.get(name)
        if k is None:
            raise ValueError(f"ROBUQ_KERNEL={name!r} is not a registered kernel; registered: {sorted(_KERNELS)}")
        why = k.machine_check() or k.supports(x, args)
        if why:
            raise RuntimeError(f"kernel {name!r} was forced but cannot run this call: {why}")
        return k
    env = os.environ.get("ROBUQ_KERNEL_DISABLE")
    disabled = set(filter(None, env.split(","))) if env else ()
    for k in _by_priority():
        if k.auto and k.name not in disabled and k.machine_check() is None and k.supports(x, args) is None:
            return k
    raise RuntimeError("no qlinear kernel accepts this call (the reference kernel should always do)")


_SELECTED: dict = {}
# environment the kernels' `supports` read besides the registry state (the fp8 path's GEMM and epilogue choices)
_SUPPORT_ENV = ("ROBUQ_FP8_GEMM", "ROBUQ_FP8_EPI")


def _props(t) -> tuple | None:
    return None if t is None else (t.dtype, tuple(t.shape))


def select_cached(x: torch.Tensor, args: QLinearArgs) -> Kernel:
    """`select`, remembered per call form: every kernel's choice depends only on the properties in the key (shapes,
    dtypes, device, strides, the layer's scalars, the registry state and the dispatch variables), never on values;
    ~3 us where `select` costs 5-15 (robuq::qlinear's opaque calls in a default-mode compiled graph)."""
    key = (x.shape, x.stride(), x.dtype, x.device, _props(args.qweight), _props(args.w_scale), _props(args.bias),
           _props(args.lrb_down), _props(args.lrb_up), args.out_features, args.in_features, args.w_bits, args.a_bits,
           args.hadamard_block, args.a_sym, args.a_clip, args.splits, args.input_act, args.output_act, args.a_group,
           state_key(),
           env_values(_SUPPORT_ENV))
    k = _SELECTED.get(key)
    if k is None:
        k = select(x, args)
        if len(_SELECTED) >= 4096:
            _SELECTED.clear()
        _SELECTED[key] = k
    return k


def available() -> list[dict]:
    """One row per registered kernel: can it run on this machine, and if not, why."""
    rows = []
    for k in sorted(_KERNELS.values(), key=lambda k: -k.priority):
        why = k.machine_check()
        if k.name in set(filter(None, os.environ.get("ROBUQ_KERNEL_DISABLE", "").split(","))):
            why = "disabled by ROBUQ_KERNEL_DISABLE"
        rows.append({"kernel": k.name, "priority": k.priority, "available": why is None,
                     "picked": "automatically" if k.auto else "only when forced", "takes": k.takes,
                     "why not": why or ""})
    return rows


def table() -> str:
    from tabulate import tabulate
    rows = available()
    short = [{k: v for k, v in r.items() if k != "takes"} for r in rows]
    notes = "\n".join(f"  {r['kernel']}: {r['takes']}" for r in rows if r["takes"])
    return tabulate(short, headers="keys", tablefmt="github") + ("\n\nWhat each kernel takes:\n" + notes if notes else "")


_WARNED: set = set()


def warn_once(msg: str) -> None:
    """warnings.warn(msg) the first time this process meets msg (the kernels' fallbacks name the layer and why)."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)
