"""Cheaper Triton launches for small, frequent kernels.

`fn[grid](*args, **constexprs)` binds the arguments, computes Triton's specialization key and looks the compiled
kernel up on every call: ~23 us of CPU on the H100 machine for the activation quantizer, which at small M is more
than its GPU time. `launch` keeps the compiled kernel per specialization (what Triton itself keys on: argument
dtypes, 16-byte alignment of pointers, integers equal to 1 / divisible by 16 / beyond int32, the constexprs and
launch options) and calls it directly (~7 us). The first call of each specialization goes through Triton.

Off with ROBUQ_TRITON_FAST_LAUNCH=0, and by itself if the compiled-kernel object lacks what it needs (another
Triton version).
"""
from __future__ import annotations

import os

import torch


def rank_pad(r: int) -> int:
    """RP: a low-rank branch's rank r padded to the power of two (at least 16) its kernels' dot tiles take; 16
    without a branch (r = 0)."""
    return max(16, 1 << (r - 1).bit_length()) if r > 0 else 16


_CACHE: dict = {}
_ENABLED = os.environ.get("ROBUQ_TRITON_FAST_LAUNCH", "1") != "0"


def _arg_key(a, specialize: bool):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        if not specialize:
            return (int, a >= 2 ** 31 or a < -2 ** 31)
        return (a == 1, a % 16 == 0, a >= 2 ** 31 or a < -2 ** 31)
    return type(a)


_TRITON: list = []  # (driver, knobs), imported on the first launch


def launch(fn, grid: tuple, args: tuple, constexprs: dict, options: dict, no_specialize: tuple = ()):
    """Launch the @triton.jit `fn` on `grid` with positional runtime `args` (the first parameters, in order),
    `constexprs` (the remaining parameters, by name; always passed in the same order by a caller) and launch
    `options` (num_warps, num_stages)."""
    if not _ENABLED:
        fn[grid](*args, **constexprs, **options)
        return
    if not _TRITON:
        from triton import knobs
        from triton.runtime import driver
        _TRITON.extend((driver.active, knobs.runtime))
    drv = _TRITON[0]
    dev = drv.get_current_device()
    key = _key(fn, dev, args, constexprs, options, no_specialize)
    hit = _CACHE.get(key)
    if hit is None:
        kern = fn[grid](*args, **constexprs, **options)
        names = fn.arg_names[len(args):]
        if kern is not None and all(hasattr(kern, a) for a in ("run", "function", "packed_metadata")) \
                and list(names) == list(constexprs):
            _CACHE[key] = (kern, tuple(constexprs.values()))
        return
    run(hit, tuple(grid) + (1,) * (3 - len(grid)), args, dev)


def _key(fn, dev, args, constexprs, options, no_specialize) -> tuple:
    return (id(fn), dev, tuple(_arg_key(a, i not in no_specialize) for i, a in enumerate(args)),
            tuple(constexprs.values()), tuple(options.values()))


def compiled(fn, args: tuple, constexprs: dict, options: dict, no_specialize: tuple = ()):
    """The (kernel, constexpr tail) that `launch` keeps for this exact specialization on the current device, or None
    (not launched yet, fast launches off): for callers that bind a launch once and repeat it (`fastcall.py`)."""
    if not _ENABLED or not _TRITON:
        return None
    return _CACHE.get(_key(fn, _TRITON[0].get_current_device(), args, constexprs, options, no_specialize))


def hook(h):
    """A launch hook that does something, or None. Triton 3.6 keeps each hook as a `HookChain` that is never None
    (no hook = an empty chain); older Tritons use None. An active hook (a profiler's) needs the launch metadata,
    which costs a few us a launch to build: only then is it built and the hook passed."""
    if h is None or not getattr(h, "calls", True):
        return None
    return h


def run(hit, grid3: tuple, args: tuple, dev: int) -> None:
    """Launch a kept kernel (`compiled`'s answer) on a 3-D grid with its runtime args, on the current stream."""
    kern, tail = hit
    drv, rt = _TRITON
    stream = drv.get_current_stream(dev)
    params = args + tail
    enter, leave = hook(rt.launch_enter_hook), hook(rt.launch_exit_hook)
    kern.run(grid3[0], grid3[1], grid3[2], stream, kern.function, kern.packed_metadata,
             None if enter is None and leave is None else kern.launch_metadata(grid3, stream, *params), enter, leave,
             *params)


def traced(fn, grid: tuple, args: tuple, constexprs: dict, options: dict, no_specialize: tuple = ()):
    """The same launch, recorded for torch.compile: `torch.library.wrap_triton` inside a `torch.library.triton_op`
    (kernels/inductor.py), so that Inductor sees the kernel and launches it from its generated code. Launch options
    Triton's autotuner configs do not carry (enable_fp_fusion) are dropped: callers use `traced` only where the
    kernel's result does not depend on them."""
    from torch.library import wrap_triton
    opts = {k: v for k, v in options.items() if k in ("num_warps", "num_stages")}
    wrap_triton(fn)[grid](*args, **constexprs, **opts)


def clear():
    _CACHE.clear()
