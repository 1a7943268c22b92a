"""Shipped model factories for the `robuq-fx` CLI, benchmarks and examples: random init, no downloads.

    name         architecture                                                    submodules captured   policy
    dit-xl-2     diffusers DiTTransformer2DModel, DiT-XL/2 config (28 x 1152)    attn1 (torch.export)  dit-xl-2-robuq
    dit-tiny     the same class, 2 blocks x 64 hidden, 8x8 latents, 10 classes   attn1 (torch.export)  dit-xl-2-robuq
    vit-base     transformers ViTForImageClassification, ViT-B/16 config         attention (lowering)  vit
    llama-100m   transformers LlamaForCausalLM, 10 x 768, vocab 32000 (~95 M)    mlp (lowering)        llama
    mlp-digits   64 -> 128 -> 128 -> 10 MLP (8x8 digit images, 10 classes)      none                  default (W4A4)

All come back from `robuq_fx.quantize` as the same class with their linear layers swapped (the drop-in form); the
example inputs let it run the model once and capture the submodules listed.

`build(name)` returns the model in eval mode; `example_inputs(name, batch)` gives inputs in the form
`robuq_fx.quantize(model, policy, example_inputs)` needs (a tuple of positional inputs or a dict of keyword inputs).
Build on the meta device (`build(name, device="meta")`) when only shapes matter: DiT-XL/2 has 750 M parameters.

diffusers' DiT port gives every block its own timestep/label embedder inside adaLN-Zero (`norm1.emb`), hence 750 M
parameters instead of the paper's 675 M; the shipped DiT policies keep those embedders in full precision.
timm is not installable here (no torchvision build for this torch), so ViT is the transformers model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random init only: never reach for a hub


class MLPDigits(nn.Module):
    """The small classifier of the accuracy benchmarks: 8x8 grey digit images, flattened."""

    def __init__(self, d_in: int = 64, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def _dit(**cfg) -> nn.Module:
    from diffusers import DiTTransformer2DModel
    return DiTTransformer2DModel(**cfg)


# DiT-XL/2 (Peebles & Xie): 28 blocks, 16 heads x 72 = 1152 hidden, 256x256 images -> 32x32x4 latents, patch 2,
# 1000 ImageNet classes, learned sigma (8 output channels).
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=32)
DIT_TINY = dict(DIT_XL_2, num_attention_heads=2, attention_head_dim=32, num_layers=2, sample_size=8,
                num_embeds_ada_norm=10)


def _vit_base() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(num_labels=1000))  # ViTConfig() defaults are ViT-B/16 at 224 px


LLAMA_100M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                  num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True)


def _llama_100m() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**LLAMA_100M))


def _dit_inputs(sample: int, classes: int) -> Callable:
    def make(batch: int, g: torch.Generator) -> dict:
        return {"hidden_states": torch.randn(batch, 4, sample, sample, generator=g),
                "timestep": torch.randint(0, 1000, (batch,), generator=g),
                "class_labels": torch.randint(0, classes, (batch,), generator=g),
                "return_dict": False}
    return make


@dataclass(frozen=True)
class ShippedModel:
    name: str
    description: str
    factory: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], Any]
    policy: str  # the shipped policy `robuq-fx` uses when --policy is not given ("default": all Linear W4A4 + H)


SHIPPED = {m.name: m for m in [
    ShippedModel("dit-xl-2", "diffusers DiTTransformer2DModel, DiT-XL/2 config (28 blocks, 1152 hidden)",
                 lambda: _dit(**DIT_XL_2), _dit_inputs(32, 1000), "dit-xl-2-robuq"),
    ShippedModel("dit-tiny", "DiTTransformer2DModel, 2 blocks x 64 hidden, 8x8x4 latents, 10 classes",
                 lambda: _dit(**DIT_TINY), _dit_inputs(8, 10), "dit-xl-2-robuq"),
    ShippedModel("vit-base", "transformers ViTForImageClassification, ViT-B/16 config, 224 px, 1000 classes",
                 _vit_base, lambda b, g: (torch.randn(b, 3, 224, 224, generator=g),), "vit"),
    ShippedModel("llama-100m", "transformers LlamaForCausalLM, 10 layers x 768 hidden, vocab 32000 (~95 M)",
                 _llama_100m,
                 # use_cache=False: no DynamicCache object in the exported graph's outputs
                 lambda b, g: {"input_ids": torch.randint(0, 32000, (b, 16), generator=g), "use_cache": False},
                 "llama"),
    ShippedModel("mlp-digits", "MLP 64 -> 128 -> 128 -> 10 for 8x8 digit images", MLPDigits,
                 lambda b, g: (torch.randn(b, 64, generator=g),), "default"),
]}


def names() -> list[str]:
    return list(SHIPPED)


def get(name: str) -> ShippedModel:
    if name not in SHIPPED:
        raise KeyError(f"unknown shipped model {name!r}; shipped models: {', '.join(SHIPPED)}")
    return SHIPPED[name]


def build(name: str, seed: int = 0, device=None) -> nn.Module:
    """Randomly initialised model `name` in eval mode; the same seed gives the same weights. The global RNG is left
    as it was. device="meta" allocates no memory (for shape-only uses such as `robuq-fx inspect`)."""
    entry = get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device is None:
            model = entry.factory()
        else:
            with torch.device(device):
                model = entry.factory()
    return model.eval()


def example_inputs(name: str, batch: int = 2, seed: int = 0):
    """Inputs for `robuq_fx.quantize(..., example_inputs)` / `load_quantized` and for running the model."""
    return get(name).inputs(batch, torch.Generator().manual_seed(seed))
