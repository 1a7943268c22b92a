"""What `robuq-fx` reads from its command line (cli.py): the MODEL argument (a shipped name or an importable
factory), the policy, and state dicts; bad input raises `CLIError` naming what was expected."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from . import models
from .policy import Policy


class CLIError(Exception):
    """Bad command-line input: printed as one line on stderr, exit status 2."""


# ---- MODEL --------------------------------------------------------------------------------------------------------

@dataclass
class ModelRef:
    text: str  # as given on the command line
    shipped: str | None  # a `robuq_fx.models` name, or None for module:factory
    factory: Callable[[], nn.Module] | None = None
    inputs: Callable[[], Any] | None = None  # example inputs for capture, if known

    def build(self, seed: int = 0, meta: bool = False) -> nn.Module:
        if self.shipped is not None:
            return models.build(self.shipped, seed=seed, device="meta" if meta else None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if meta:
                try:  # shapes are all `inspect` needs; a factory that cannot build on meta is built for real
                    with torch.device("meta"):
                        model = self.factory()
                    if isinstance(model, nn.Module):
                        return model
                except Exception:  # noqa: BLE001
                    pass
            return self._call()

    def _call(self) -> nn.Module:
        try:
            model = self.factory()
        except Exception as e:  # noqa: BLE001 - the user's factory: report, do not crash
            raise CLIError(f"MODEL {self.text}: calling the factory failed: {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise CLIError(f"MODEL {self.text}: the factory returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def example_inputs(self, batch: int):
        if self.shipped is not None:
            return models.example_inputs(self.shipped, batch)
        return self.inputs() if self.inputs is not None else None

    @property
    def default_policy(self) -> str:
        return models.get(self.shipped).policy if self.shipped is not None else "default"


def resolve_model(text: str) -> ModelRef:
    """A shipped name or `module.path:factory` / `file.py:factory`; errors name what is missing."""
    if text in models.SHIPPED:
        return ModelRef(text, text)
    if ":" not in text:
        raise CLIError(f"unknown model {text!r}: expected a shipped model ({', '.join(models.names())}) or "
                       "module.path:factory")
    mod_name, _, attr = text.rpartition(":")
    if not mod_name or not attr:
        raise CLIError(f"MODEL {text!r}: expected module.path:factory")
    module = _import(mod_name, text)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"MODEL {text}: module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"MODEL {text}: '{attr}' is a {type(obj).__name__}, not a callable returning an nn.Module")
    inputs = getattr(module, "example_inputs", None)
    return ModelRef(text, None, obj, inputs if callable(inputs) else None)


def _import(mod_name: str, text: str):
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise CLIError(f"MODEL {text}: file {path} not found")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"MODEL {text}: importing {path} failed: {type(e).__name__}: {e}") from e
        return module
    if os.getcwd() not in sys.path:  # console scripts do not put the working directory on sys.path; `python -m` does
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise CLIError(f"MODEL {text}: no module named '{mod_name}'") from e
        raise CLIError(f"MODEL {text}: importing '{mod_name}' failed: {type(e).__name__}: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"MODEL {text}: importing '{mod_name}' failed: {type(e).__name__}: {e}") from e


def load_policy(arg: str | None, ref: ModelRef) -> Policy:
    """--policy: a JSON/YAML file, a shipped policy name, or `default` (every Linear W4A4 + Hadamard)."""
    name = arg if arg is not None else ref.default_policy
    if name == "default" and not Path(name).exists():
        return Policy.default()
    return Policy.load(name)  # PolicyError names the file and the line / rule / key at fault


# ---- state dicts --------------------------------------------------------------------------------------------------

def read_state_dict(path: str, flag: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{flag} {path}: file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt / foreign files raise many error types
        raise CLIError(f"{flag} {path}: not a readable state_dict (.pt/.pth/.bin via torch.save, or "
                       f".safetensors): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CLIError(f"{flag} {path}: expected a dict of tensors (a state_dict), got {type(sd).__name__}")
    return sd


def load_fitting(module: nn.Module, sd: dict, path: str, flag: str, what: str) -> None:
    """load_state_dict, after naming the first key (in the model's order) that is missing or has the wrong shape,
    or the first unexpected key of the file."""
    expected = module.state_dict()
    for k, v in expected.items():
        if k not in sd:
            raise CLIError(f"{flag} {path} does not fit {what}: key '{k}' is missing ({len(sd)} keys in the file, "
                           f"{len(expected)} in the model)")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CLIError(f"{flag} {path} does not fit {what}: key '{k}' has shape {tuple(sd[k].shape)}, the "
                           f"model's is {tuple(v.shape)}")
    for k in sd:
        if k not in expected:
            raise CLIError(f"{flag} {path} does not fit {what}: unexpected key '{k}'")
    module.load_state_dict(sd)
