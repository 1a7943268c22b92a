"""torch.compile's on-disk caches keyed on what robuq's decompositions depend on.

The decompositions (kernels/inductor.py) run inside AOTAutograd, after Dynamo captured a graph that holds only the
robuq ops; Inductor's FX graph cache and AOTAutograd's cache key on that graph, so a warm cache answered a compile
made under other ROBUQ_* settings, another dispatch table or other robuq code with the graph compiled before (on the
CPU: ROBUQ_INDUCTOR_DECOMPOSE=0 after a run with the QAT ops decomposed got the decomposed graph back). Both caches
include `torch.compiler.config.cache_key_tag` in their keys; `tag_compile_caches` (called by `inductor.register`,
which the ops' fake kernels call while Dynamo traces) appends a fingerprint of the ROBUQ_* environment, the dispatch
table and robuq_fx's source to whatever tag the user set.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

_NOT_KEYED = {"ROBUQ_GIT_COMMIT"}  # provenance the benchmarks record, not a setting
_SOURCE: list[str] = []
_MEMO: dict = {}  # (ROBUQ_* items, id(table)) -> (table, fingerprint); holding the table keeps its id from reuse
_STATE: dict = {}  # "base": the user's tag, "set": the tag this module last set


def _source_digest() -> str:
    """robuq_fx's .py and .json files (paths and bytes), once a process."""
    if not _SOURCE:
        root = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        for p in sorted([*root.rglob("*.py"), *root.rglob("*.json")]):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
        _SOURCE.append(h.hexdigest()[:16])
    return _SOURCE[0]


def fingerprint() -> str:
    """16 hex digits of the ROBUQ_* environment, the dispatch table in use and the package source."""
    from .dispatch import dispatch_table
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("ROBUQ_") and k not in _NOT_KEYED))
    table = dispatch_table()
    key = (env, id(table))
    hit = _MEMO.get(key)
    if hit is None:
        h = hashlib.sha256(repr(env).encode())
        h.update(_source_digest().encode())
        h.update(json.dumps(table, sort_keys=True, default=str).encode())
        if len(_MEMO) >= 64:
            _MEMO.clear()
        hit = _MEMO[key] = (table, h.hexdigest()[:16])
    return hit[1]


def tag_compile_caches() -> None:
    """Set torch.compiler.config.cache_key_tag to the user's tag plus "robuq-<fingerprint>" (a torch without the
    option keeps its caches as they are)."""
    cfg = getattr(torch.compiler, "config", None)
    if cfg is None or not hasattr(cfg, "cache_key_tag"):
        return
    cur = cfg.cache_key_tag
    base = _STATE.get("base", "") if cur == _STATE.get("set") else cur  # a tag we did not set is the user's
    new = f"{base}|robuq-{fingerprint()}" if base else f"robuq-{fingerprint()}"
    if new != cur:
        cfg.cache_key_tag = new
    _STATE["base"], _STATE["set"] = base, new
