"""Policy: ordered rules that say which linear layers get which `LayerSpec`. First matching rule wins.

    {"rules": [
        {"match": "blocks.*.mlp.*", "w_bits": 1.58, "a_bits": 3},        # fnmatch glob on the qualified name
        {"match": "re:.*attn\\.(q|k|v)$", "lora_rank": 8},               # `re:` = Python regex, full match
        {"match": "head", "skip": True},                                # keep in full precision
        {"type": "Linear", "w_bits": 4, "a_bits": 4},                   # class name (or a base class's name);
                                                                        # "Conv1D": transformers' transposed linear
    {"match": "blocks.*.attn", "attn_bits": 8},                     # attention rule: 8-bit q/k/v of SDPA
     ],
     "defaults": {"hadamard": True},     # merged into every rule (a rule's own keys win)
     "strict": True}                     # compile backend: error (True) or warn (False) on layers left in FP

A rule with both `match` and `type` needs both; a rule with neither matches every linear layer.
Attention rules (key `attn_bits`) apply to the modules that call `scaled_dot_product_attention`, never to linears.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from .errors import PolicyError, SpecError
from .spec import LayerSpec

_RULE_KEYS = {"match", "type", "skip"}
ATTN_BITS = (4, 8)
_TOP_KEYS = {"rules", "defaults", "strict", "name", "description"}
POLICY_DIR = Path(__file__).parent / "policies"


@dataclass(frozen=True)
class Rule:
    match: str | None = None
    type: str | None = None
    skip: bool = False
    spec: LayerSpec | None = None
    raw: dict = field(default_factory=dict, compare=False)
    attn_bits: int | None = None  # set on attention rules only

    def matches(self, name: str, module: nn.Module | None) -> bool:
        if self.match is not None:
            if self.match.startswith("re:"):
                if re.fullmatch(self.match[3:], name) is None:
                    return False
            elif not fnmatch.fnmatchcase(name, self.match):
                return False
        if self.type is not None:
            if module is None or self.type not in {c.__name__ for c in type(module).__mro__}:
                return False
        return True


class Policy:
    def __init__(self, rules: list[Rule], strict: bool = True, raw: dict | None = None):
        self.rules = list(rules)
        self.strict = strict
        self.raw = raw if raw is not None else {"rules": [r.raw for r in rules], "strict": strict}

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def default(cls) -> "Policy":
        """Every nn.Linear (and transformers' Conv1D: GPT-2's projections) at W4A4 with a Hadamard rotation."""
        spec = {"w_bits": 4, "a_bits": 4, "hadamard": True}
        return cls.from_dict({"rules": [{"type": "Linear", **spec}, {"type": "Conv1D", **spec}]})

    @classmethod
    def coerce(cls, policy) -> "Policy":
        if policy is None:
            return cls.default()
        if isinstance(policy, Policy):
            return policy
        if isinstance(policy, dict):
            return cls.from_dict(policy)
        if isinstance(policy, (str, os.PathLike)):
            return cls.load(policy)
        raise PolicyError(f"policy must be a Policy, a dict, a file path or a shipped name; got {type(policy).__name__}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "policy") -> "Policy":
        if not isinstance(d, dict):
            raise PolicyError(f"{source}: expected a mapping with a 'rules' list, got {type(d).__name__}")
        unknown = sorted(set(d) - _TOP_KEYS)
        if unknown:
            raise PolicyError(f"{source}: unknown top-level key(s) {unknown}; expected any of {sorted(_TOP_KEYS)}")
        rules_raw = d.get("rules")
        if not isinstance(rules_raw, list) or not rules_raw:
            raise PolicyError(f"{source}: 'rules' must be a non-empty list of rules")
        defaults = d.get("defaults", {}) or {}
        if not isinstance(defaults, dict):
            raise PolicyError(f"{source}: 'defaults' must be a mapping of spec keys")
        strict = d.get("strict", True)
        if not isinstance(strict, bool):
            raise PolicyError(f"{source}: 'strict' must be true or false, got {strict!r}")
        rules = [cls._rule(i, r, defaults, source) for i, r in enumerate(rules_raw)]
        raw = {**d, "rules": [r.raw for r in rules]}
        try:
            raw = json.loads(json.dumps(raw))
        except TypeError as e:
            raise PolicyError(f"{source}: values must be plain JSON types (numbers, strings, booleans): {e}") from None
        return cls(rules, strict=strict, raw=raw)

    @staticmethod
    def _rule(i: int, r, defaults: dict, source: str) -> Rule:
        where = f"{source}: rule {i} ({r!r}): "
        if not isinstance(r, dict):
            raise PolicyError(where + "expected a mapping")
        match, typ, skip = r.get("match"), r.get("type"), r.get("skip", False)
        if match is not None and not isinstance(match, str):
            raise PolicyError(where + f"'match' must be a glob or 're:<regex>' string, got {match!r}")
        if match is not None and match.startswith("re:"):
            try:
                re.compile(match[3:])
            except re.error as e:
                raise PolicyError(where + f"invalid regex: {e}") from None
        if typ is not None and not isinstance(typ, str):
            typ = getattr(typ, "__name__", None)
            if typ is None:
                raise PolicyError(where + "'type' must be a class or a class name")
        if not isinstance(skip, bool):
            raise PolicyError(where + f"'skip' must be true or false, got {skip!r}")
        spec_keys = {k: v for k, v in r.items() if k not in _RULE_KEYS}
        if "attn_bits" in r:
            bits = r["attn_bits"]
            others = sorted(set(spec_keys) - {"attn_bits"})
            if others or skip:
                raise PolicyError(where + f"an attention rule takes only 'attn_bits' (got {others or ['skip']})")
            if isinstance(bits, bool) or bits not in ATTN_BITS:
                raise PolicyError(where + f"attn_bits={bits!r}: expected one of {ATTN_BITS}")
            return Rule(match, typ, False, None, dict(r), attn_bits=int(bits))
        if skip:
            if spec_keys:
                raise PolicyError(where + f"a skip rule takes no spec keys, got {sorted(spec_keys)}")
            return Rule(match, typ, True, None, dict(r))
        try:
            spec = LayerSpec.from_dict({**defaults, **spec_keys})
        except SpecError as e:
            raise PolicyError(where + str(e)) from None
        raw = dict(r)
        if typ is not None:
            raw["type"] = typ
        return Rule(match, typ, False, spec, raw)

    @classmethod
    def load(cls, path_or_name) -> "Policy":
        """Load from a .json / .yaml / .yml file, or a shipped policy by name (see `Policy.shipped()`; "default" is
        `Policy.default()`)."""
        p = Path(path_or_name)
        if str(path_or_name) == "default" and not p.exists():
            return cls.default()
        if not p.exists() and p.suffix == "" and (POLICY_DIR / f"{p.name}.yaml").exists():
            p = POLICY_DIR / f"{p.name}.yaml"
        if not p.exists():
            raise PolicyError(f"policy file not found: {path_or_name} (shipped policies: {cls.shipped()})")
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            yaml = _yaml()
            try:
                d = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise PolicyError(f"{p}: invalid YAML: {e}") from None
        else:
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise PolicyError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return cls.from_dict(d, source=str(p))

    @staticmethod
    def shipped() -> list[str]:
        return sorted(q.stem for q in POLICY_DIR.glob("*.yaml"))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self.raw))

    def save(self, path) -> None:
        p = Path(path)
        if p.suffix in (".yaml", ".yml"):
            p.write_text(_yaml().safe_dump(self.to_dict(), sort_keys=False))
        else:
            p.write_text(json.dumps(self.to_dict(), indent=2))

    # ---- matching -----------------------------------------------------------------------------------------
    def match(self, name: str, module: nn.Module | None) -> tuple[int | None, LayerSpec | None]:
        """(index of the first matching linear rule or None, its spec or None when skipped / unmatched)."""
        for i, rule in enumerate(self.rules):
            if rule.attn_bits is None and rule.matches(name, module):
                return i, rule.spec
        return None, None

    def match_attention(self, name: str, module: nn.Module | None) -> tuple[int | None, int | None]:
        """(index of the first matching attention rule, its attn_bits) for a module calling SDPA."""
        for i, rule in enumerate(self.rules):
            if rule.attn_bits is not None and rule.matches(name, module):
                return i, rule.attn_bits
        return None, None

    @property
    def attention_rules(self) -> list[tuple[int, Rule]]:
        return [(i, r) for i, r in enumerate(self.rules) if r.attn_bits is not None]

    def explain(self, model: nn.Module, print_table: bool = True) -> "Explanation":
        """Which linear layers of `model` this policy quantizes, and how. Prints a table and returns the rows."""
        from .qat_linear import linear_dims
        rows = []
        for name, mod in model.named_modules():
            dims = linear_dims(mod)
            if dims is None:
                continue
            k, n, _ = dims
            i, spec = self.match(name, mod)
            row = {"layer": name, "type": type(mod).__name__, "in": k, "out": n, "rule": "-" if i is None else i}
            if spec is None:
                row["spec"] = "no rule (FP)" if i is None else "skip (FP)"
            else:
                try:
                    row["spec"] = spec.resolve(k, n).short()
                except SpecError as e:
                    row["spec"] = f"ERROR: {e}"
            rows.append(row)
        for name, mod in model.named_modules():
            i, bits = self.match_attention(name, mod)
            if bits is not None and linear_dims(mod) is None:
                rows.append({"layer": name, "type": type(mod).__name__, "in": "-", "out": "-", "rule": i,
                             "spec": f"attention q/k/v A{bits} (per token and head)"})
        ex = Explanation(rows)
        if print_table:
            print(ex)
        return ex

    def __repr__(self):
        return f"Policy({len(self.rules)} rules, strict={self.strict})"


class Explanation(list):
    """Rows of `Policy.explain`; str() is a table."""

    def __str__(self):
        from tabulate import tabulate
        if not self:
            return "(no nn.Linear layers)"
        return tabulate(self, headers="keys", tablefmt="github")


def _yaml():
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - pyyaml is a declared dependency
        raise PolicyError("YAML policies need PyYAML: pip install pyyaml") from e
    return yaml
