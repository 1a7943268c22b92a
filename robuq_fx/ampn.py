"""AMPN, activation-only mixed precision (METHOD.md §6): weights keep the bits the policy gives them; each
selected layer gets its own activation bits from `candidates` so that the (MAC-weighted or plain) average meets a
budget, chosen to minimise the summed, separately measured sensitivity.

    policy, report = robuq_fx.ampn.allocate(model, policy, calib_batches, avg_a_bits=2,
                                            loss_fn=loss_fn, train_batches=train_batches)
    print(report)                                   # per-layer sensitivities, chosen bits, mean bits by layer kind
    qmodel = robuq_fx.quantize(model, policy)       # the returned policy: exact per-layer rules + the original ones

1. quantize a private copy with every selected layer at the highest candidate, and QAT-warm it up for a few steps
   (a layer that looks fragile on the untrained model can recover; needs `loss_fn` and `train_batches`);
2. sensitivity: for each layer and candidate b, set only that layer to b and record the increase of the metric
   (the loss, or the output MSE against the FP model when no `loss_fn` is given) over all-at-highest, on the
   calibration batches with the same random numbers every pass. Bits change in place, in the layer's QATLinear
   spec (or its `robuq::fake_quant_act` nodes on the whole-graph path): no re-capture, no new SVD per measurement;
3. exact knapsack (`choose_bits`): minimise the summed sensitivity subject to
   sum_i w_i b_i <= avg_a_bits * sum_i w_i, with w_i = MACs_i / gcd(MACs) (weight="macs"; MACs = in * out *
   tokens seen in calibration) or w_i = 1 (weight="plain").
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import PolicyError
from .passes.qat import quantize, robuq_info
from .policy import Policy, Rule
from .ampn_sites import act_handles, counting, set_bits, site_shape
from .spec import ACT_BITS, LayerSpec

CANDIDATES = (1, 2, 3, 4)


# ---- 1-2. sensitivity ---------------------------------------------------------------------------------------------
@dataclass
class Sensitivity:
    """What `measure` found; `allocate_from` turns it into a policy for any budget / weighting / candidate subset."""
    policy: Policy
    layers: list[str]
    specs: dict[str, LayerSpec]  # each layer's rule spec, unresolved (a_sym=None stays automatic)
    shapes: dict[str, tuple[int, int]]  # (in_features, out_features)
    tokens: dict[str, int]  # rows that entered the layer over all calibration batches
    candidates: tuple[int, ...]
    sens: dict[str, dict[int, float]]  # metric(layer at b, others at max) - metric(all at max)
    metric: str
    base: float  # the metric with every layer at the highest candidate
    warmup_steps: int
    notes: list[str] = field(default_factory=list)

    def macs(self, name: str) -> int:
        k, n = self.shapes[name]
        return k * n * self.tokens[name]


def measure(model: nn.Module, policy, calib_batches: Iterable, candidates: Sequence[int] = CANDIDATES, *,
            loss_fn: Callable | None = None, warmup_steps: int | None = None, train_batches: Iterable | None = None,
            seed: int = 0, layers=None, example_inputs=None, lr: float = 1e-3,
            progress: bool = True) -> Sensitivity:
    """Sensitivity of every selected layer to its activation bits (steps 1-2 of the module docstring).

    calib_batches / train_batches: lists (or re-iterable) of batches. Without `loss_fn` a batch is the model's
    input (a tensor, a tuple of positional inputs or a dict of keyword inputs) and the metric is the MSE of the
    main output against the FP model's; with `loss_fn(model, batch) -> scalar loss` a batch is whatever loss_fn
    takes (e.g. (x, y)), and then `example_inputs` is needed if the model cannot be symbolic-traced.
    layers: glob / "re:" pattern(s) choosing which matched layers AMPN allocates (default: all whose activations
    the policy quantizes); the others keep the policy's spec and do not count towards the average.
    warmup_steps: QAT steps at the highest candidate before measuring; default min(200, 20 * number of layers).
    """
    policy = Policy.coerce(policy)
    cands = _check_candidates(candidates)
    calib = list(calib_batches)
    if not calib:
        raise PolicyError("AMPN needs at least one calibration batch")
    if example_inputs is None and loss_fn is None:
        example_inputs = calib[0]
    gm = quantize(model, policy, example_inputs)
    info = robuq_info(gm)
    nodes = act_handles(gm)
    notes: list[str] = []
    patterns = [layers] if isinstance(layers, str) else layers
    selected = []
    for name in info["layers"]:
        if patterns is not None and not any(Rule(match=p).matches(name, None) for p in patterns):
            continue
        if name not in nodes:  # a_bits=16 in the policy: no activation quantizer to set
            notes.append(f"{name}: activations not quantized by the policy (a_bits=16): left out")
            continue
        selected.append(name)
    if not selected:
        raise PolicyError(f"AMPN: no layer to allocate (policy layers: {list(info['layers'])[:10]}, layers={layers!r})")
    specs = {n: _rule_spec(policy, model, n) for n in selected}
    top = cands[-1]
    for n in selected:
        set_bits(gm, nodes, n, top, specs[n])

    devices = sorted({p.device.index or 0 for p in gm.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):  # the caller's RNG state is left as it was
        torch.manual_seed(seed)
        steps = min(200, 20 * len(selected)) if warmup_steps is None else int(warmup_steps)
        if steps > 0 and (loss_fn is None or train_batches is None):
            msg = (f"warm-up skipped ({steps} steps asked): it needs both loss_fn and train_batches; sensitivities "
                   "come from the untrained quantized model, which METHOD.md §6 warns can mislead")
            warnings.warn("AMPN: " + msg, stacklevel=2)
            notes.append(msg)
            steps = 0
        if steps > 0:
            _warmup(gm, loss_fn, train_batches, steps, lr, progress)
        gm.eval()
        ref = None
        if loss_fn is None:
            with torch.no_grad():
                was = model.training
                model.eval()
                ref = [_main_output(_call(model, b)).detach().float() for b in calib]
                model.train(was)
        metric = "loss" if loss_fn is not None else "output MSE vs FP"

        total = 1 + len(selected) * (len(cands) - 1)
        bar = tqdm(total=total, desc="AMPN sensitivity", disable=not progress, unit="pass")
        tokens = {n: 0 for n in selected}
        with counting(gm, nodes, selected, tokens):
            base = _evaluate(gm, calib, loss_fn, ref, seed)
        bar.update()
        sens = {}
        for n in selected:
            sens[n] = {top: 0.0}
            for b in cands[:-1]:
                set_bits(gm, nodes, n, b, specs[n])
                sens[n][b] = _evaluate(gm, calib, loss_fn, ref, seed) - base
                bar.update()
            set_bits(gm, nodes, n, top, specs[n])
        bar.close()
    shapes = {n: (site_shape(gm, n)) for n in selected}
    return Sensitivity(policy, selected, specs, shapes, tokens, cands, sens, metric, base, steps, notes)


def _check_candidates(candidates) -> tuple[int, ...]:
    cands = tuple(sorted(set(int(b) for b in candidates)))
    if not cands or any(b not in ACT_BITS or b >= 16 for b in cands) or len(cands) != len(list(candidates)):
        raise PolicyError(f"candidates={tuple(candidates)!r}: expected distinct activation bits from "
                          f"{tuple(b for b in ACT_BITS if b < 16)}")
    return cands


def _rule_spec(policy: Policy, model: nn.Module, name: str) -> LayerSpec:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    _, spec = policy.match(name, module)
    if spec is None:  # pragma: no cover - quantize() matched it with the same policy
        raise PolicyError(f"AMPN: layer '{name}' is quantized but no policy rule matches it")
    return spec


def _warmup(gm, loss_fn, train_batches, steps: int, lr: float, progress: bool) -> None:
    opt = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=lr)
    gm.train()
    it = iter(train_batches)
    for _ in tqdm(range(steps), desc="AMPN warm-up", disable=not progress, unit="step", leave=False):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(train_batches)
            batch = next(it)
        loss = loss_fn(gm, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    gm.eval()


@torch.no_grad()
def _evaluate(gm, calib: list, loss_fn, ref, seed: int) -> float:
    torch.manual_seed(seed)  # common random numbers: every pass draws the same noise inside loss_fn
    total = 0.0
    for i, batch in enumerate(calib):
        if loss_fn is not None:
            total += float(loss_fn(gm, batch))
        else:
            total += F.mse_loss(_main_output(_call(gm, batch)).float(), ref[i]).item()
    return total / len(calib)


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _main_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _main_output(out[0])
    for key in ("logits", "sample", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    raise PolicyError(f"AMPN: cannot find the output tensor in a {type(out).__name__}; pass loss_fn instead")


# ---- 3. exact allocation ------------------------------------------------------------------------------------------
def exact_budget(avg_a_bits) -> Fraction:
    """The budget as an exact fraction; a float is read through its shortest repr (2.3 -> 23/10, not the binary
    2.2999...), so that a budget of a decimal average is met exactly as written."""
    if isinstance(avg_a_bits, (int, Fraction)):
        return Fraction(avg_a_bits)
    return Fraction(repr(float(avg_a_bits)))


def choose_bits(costs: Sequence[dict], weights: Sequence[int], candidates: Sequence[int], avg_a_bits) -> list[int]:
    """Exact minimum of sum_i costs[i][b_i] subject to sum_i w_i b_i <= avg_a_bits * sum_i w_i, b_i in candidates.

    Integer weights keep it exact: with E = floor(avg * W) - min(candidates) * W (W = sum w_i, computed in
    fractions), the constraint is sum_i w_i (b_i - b_min) <= E over integers. Dynamic programming over layers keeps,
    for every reachable integer load e <= E, the least cost (a Pareto frontier: a load is dropped when a smaller
    one costs no more), so at most E + 1 states per layer. Ties go to the smaller load (fewer bits).
    """
    cands = sorted(set(candidates))
    if any(isinstance(w, bool) or int(w) != w or w <= 0 for w in weights):
        raise PolicyError(f"weights must be positive integers, got {list(weights)[:10]}")
    weights = [int(w) for w in weights]
    W, bmin = sum(weights), cands[0]
    budget = exact_budget(avg_a_bits)
    if budget < bmin:
        raise PolicyError(f"avg_a_bits={avg_a_bits} is below the smallest candidate {bmin}: no allocation of "
                          f"{tuple(cands)} can meet it")
    cap = math.floor(budget * W) - bmin * W
    frontier: dict[int, float] = {0: 0.0}
    back: list[dict[int, tuple[int, int]]] = []
    for cost, w in zip(costs, weights):
        new: dict[int, float] = {}
        ptr: dict[int, tuple[int, int]] = {}
        for e, c in frontier.items():
            for b in cands:
                e2 = e + w * (b - bmin)
                if e2 > cap:
                    break
                c2 = c + float(cost[b])
                if e2 not in new or c2 < new[e2]:
                    new[e2], ptr[e2] = c2, (e, b)
        frontier, best = {}, math.inf
        for e in sorted(new):
            if new[e] < best:
                frontier[e] = best = new[e]
        back.append(ptr)
    e = min(frontier, key=lambda k: (frontier[k], k))
    bits = []
    for ptr in reversed(back):
        e, b = ptr[e]
        bits.append(b)
    return bits[::-1]


def allocate_from(sens: Sensitivity, avg_a_bits, weight: str = "macs", candidates: Sequence[int] | None = None):
    """(Policy, AllocationReport) from measured sensitivities; `candidates` may be a subset of the measured ones."""
    if weight not in ("macs", "plain"):
        raise PolicyError(f"weight={weight!r}: expected 'macs' (MAC-weighted average) or 'plain'")
    cands = sens.candidates if candidates is None else _check_candidates(candidates)
    if not set(cands) <= set(sens.candidates):
        raise PolicyError(f"candidates {cands} were not all measured (measured: {sens.candidates})")
    macs = [sens.macs(n) for n in sens.layers]
    if weight == "macs":
        if min(macs) <= 0:
            raise PolicyError("weight='macs': some layer saw no tokens during calibration; use weight='plain'")
        g = math.gcd(*macs)
        weights = [m // g for m in macs]
    else:
        weights = [1] * len(macs)
    bits = choose_bits([sens.sens[n] for n in sens.layers], weights, cands, avg_a_bits)
    chosen = dict(zip(sens.layers, bits))
    return _policy(sens, chosen, avg_a_bits, weight), _report(sens, chosen, macs, weights, avg_a_bits, weight, cands)


def allocate(model: nn.Module, policy, calib_batches: Iterable, avg_a_bits, candidates: Sequence[int] = CANDIDATES,
             weight: str = "macs", loss_fn: Callable | None = None, warmup_steps: int | None = None,
             train_batches: Iterable | None = None, seed: int = 0, **kw):
    """Measure (see `measure`, which takes the extra keywords layers / example_inputs / lr / progress) and allocate.
    Returns (Policy with exact per-layer rules ahead of the original ones, AllocationReport)."""
    if weight not in ("macs", "plain"):
        raise PolicyError(f"weight={weight!r}: expected 'macs' (MAC-weighted average) or 'plain'")
    cands = _check_candidates(candidates)
    if exact_budget(avg_a_bits) < cands[0]:  # fail before the (slow) measurement
        raise PolicyError(f"avg_a_bits={avg_a_bits} is below the smallest candidate {cands[0]}: no allocation of "
                          f"{cands} can meet it")
    sens = measure(model, policy, calib_batches, cands, loss_fn=loss_fn, warmup_steps=warmup_steps,
                   train_batches=train_batches, seed=seed, **kw)
    return allocate_from(sens, avg_a_bits, weight)


# ---- the policy and the report ------------------------------------------------------------------------------------
def _exact_match(name: str) -> str:
    return "re:" + re.escape(name) if any(c in name for c in "*?[") else name


def _policy(sens: Sensitivity, chosen: dict[str, int], avg_a_bits, weight: str) -> Policy:
    raw = sens.policy.to_dict()
    defaults = raw.get("defaults") or {}
    plain = LayerSpec().to_dict()
    rules = []
    for name, b in chosen.items():
        spec = sens.specs[name].to_dict()
        # Keys the original `defaults` set are written out too: they would otherwise be merged into this rule.
        d = {k: v for k, v in spec.items() if k in defaults or v != plain[k]}
        d["a_bits"] = b
        if b <= 2 and spec["a_sym"]:
            d["a_sym"] = None  # 1-2-bit activations are asymmetric; a_sym=true there is a SpecError
        rules.append({"match": _exact_match(name), **d})
    raw["rules"] = rules + raw["rules"]
    raw["description"] = (f"AMPN: {len(rules)} layers at average A{avg_a_bits} ({weight}-weighted), then the "
                          f"original rules" + (f" ({raw['description']})" if raw.get("description") else ""))
    return Policy.from_dict(raw, source="AMPN policy")


def layer_kind(name: str) -> str:
    """The layer's name with its block index replaced by '*' (first numeric path segment that is not the last):
    transformer_blocks.3.attn1.to_q -> transformer_blocks.*.attn1.to_q."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            parts[i] = "*"
            break
    return ".".join(parts)


class AllocationReport(list):
    """One row per layer; `summary` (mean bits by layer kind), `info` (budget, achieved averages, metric, notes);
    str() / `table` is the printed form."""

    def __init__(self, rows, summary, info):
        super().__init__(rows)
        self.summary, self.info = summary, info

    @property
    def table(self) -> str:
        from tabulate import tabulate
        lines = [tabulate(self, headers="keys", tablefmt="github", floatfmt=".4g"), "",
                 tabulate(self.summary, headers="keys", tablefmt="github", floatfmt=".3f"), ""]
        lines += [f"{k}: {v}" for k, v in self.info.items() if k != "notes"]
        lines += [f"note: {n}" for n in self.info["notes"]]
        return "\n".join(lines)

    def __str__(self):
        return self.table

    def to_dict(self) -> dict:
        return {"rows": list(self), "summary": self.summary, "info": self.info}


def _report(sens, chosen, macs, weights, avg_a_bits, weight, cands) -> AllocationReport:
    rows = []
    for name, m in zip(sens.layers, macs):
        k, n = sens.shapes[name]
        row = {"layer": name, "kind": layer_kind(name), "in": k, "out": n, "tokens": sens.tokens[name], "MACs": m}
        row.update({f"Δ@A{b}": sens.sens[name][b] for b in sens.candidates})
        row["bits"] = chosen[name]
        rows.append(row)
    kinds: dict[str, list[int]] = {}
    for r in rows:
        kinds.setdefault(r["kind"], []).append(r["bits"])
    summary = [{"kind": k, "layers": len(v), "mean bits": sum(v) / len(v)} for k, v in kinds.items()]
    bits = [chosen[n] for n in sens.layers]
    info = {"budget": f"A{avg_a_bits} ({weight}-weighted, candidates {tuple(cands)})",
            "mean bits (plain)": round(sum(bits) / len(bits), 4),
            "mean bits (MAC-weighted)": round(sum(b * m for b, m in zip(bits, macs)) / sum(macs), 4),
            "load / capacity": f"{sum(b * w for b, w in zip(bits, weights))} / "
                               f"{math.floor(exact_budget(avg_a_bits) * sum(weights))} (integer weights {weight})",
            "summed sensitivity": sum(sens.sens[n][chosen[n]] for n in sens.layers),
            "metric": f"{sens.metric} (all at A{sens.candidates[-1]}: {sens.base:.5g})",
            "warm-up steps": sens.warmup_steps, "notes": list(sens.notes)}
    return AllocationReport(rows, summary, info)
