"""Tiny, randomly initialised real-world models for the end-to-end tests of tests/models/.

Each model is described by a `Case`: how to build it (seeded, with config overrides), how to make inputs, whether
`robuq_fx.quantize` gets `example_inputs` (the model cannot be symbolic-traced: robuq_fx runs it once on them, and
captures submodules or the whole graph with torch.export from them), which linear layers the policies skip, and how
to pull the main output tensor out of whatever the model returns.

    mlp    plain nn.Module MLP with dropout                                  (torch.fx.symbolic_trace)
    vit    transformers ViTForImageClassification, tiny config              (torch.export, positional input)
           -- stands in for timm's vit_tiny: timm is not installable here (its torchvision dependency has no
              CPU-torch-2.13 build), and the HF ViT has the same block structure (qkv/proj/fc1/fc2 + head).
    dit    diffusers DiTTransformer2DModel, tiny config                     (torch.export, keyword inputs)
    llama  transformers LlamaForCausalLM, tiny config, lm_head skipped      (torch.export, keyword inputs)

No downloads (HF_HUB_OFFLINE=1); everything is random init and small enough for 2 CPU cores.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from collections import Counter  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import robuq_fx  # noqa: E402

# ---- policies -----------------------------------------------------------------------------------------------------
# "lrb": the default low-rank-branch setting (RobuQ's ternary weights, A4, Hadamard, LRB rank 4 in these tiny models)
# "a2":  asymmetric 2-bit activations (a_sym resolves to False for a_bits <= 2), ternary weights, Hadamard, no LRB
# "w8a8": near-lossless reference point; each case says whether it uses the Hadamard rotation there
SPECS = {
    "lrb": {"w_bits": 1.58, "a_bits": 4, "hadamard": True, "lora_rank": 4},
    "a2": {"w_bits": 1.58, "a_bits": 2, "hadamard": True, "a_sym": False},
    "w8a8": {"w_bits": 8, "a_bits": 8, "hadamard": False},
    "w8a8_h": {"w_bits": 8, "a_bits": 8, "hadamard": True},
}


# ---- model factories ----------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, d_in=32, hidden=64, d_out=16, p=0.1):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x):
        x = self.drop(self.act(self.fc1(x)))
        x = self.drop(self.act(self.fc2(x)))
        return self.fc3(x)


def build_mlp(seed=0, **over):
    torch.manual_seed(seed)
    return MLP(**over)


def build_vit(seed=0, **over):
    from transformers import ViTConfig, ViTForImageClassification
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
               patch_size=8, num_channels=3, num_labels=10, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    cfg.update(over)
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**cfg))


def build_dit(seed=0, **over):
    from diffusers import DiTTransformer2DModel
    cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
               num_embeds_ada_norm=10, norm_num_groups=32)
    cfg.update(over)
    torch.manual_seed(seed)
    m = DiTTransformer2DModel(**cfg)
    # Class-label dropout (classifier-free guidance training) is a train-only Python branch with hard-coded
    # p=0.1: it makes the FP model's train-mode output random, and torch.export (captured in eval mode) does not
    # keep it. Turn it off so train-mode outputs are comparable.
    label_embedders = [mod for mod in m.modules() if type(mod).__name__ == "LabelEmbedding"]
    assert label_embedders, "diffusers changed: no LabelEmbedding in DiTTransformer2DModel"
    for mod in label_embedders:
        mod.dropout_prob = 0.0
    return m


def build_llama(seed=0, **over):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
               intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(over)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def mlp_inputs(batch=4, seed=0):
    return (torch.randn(batch, 32, generator=_gen(seed)),)


def vit_inputs(batch=2, seed=0):
    return (torch.randn(batch, 3, 16, 16, generator=_gen(seed)),)


def dit_inputs(batch=2, seed=0):
    g = _gen(seed)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "class_labels": torch.randint(0, 10, (batch,), generator=g),
            "return_dict": False}


def llama_inputs(batch=2, seed=0):
    # use_cache=False: no DynamicCache object in the exported graph's outputs. No return_dict=False: that keyword lands
    # in LlamaForCausalLM.forward's **kwargs, where torch.export (2.13) cannot match any dynamic_shapes spec, so the
    # capture falls back to a static batch size (tested separately in test_lower_models.py).
    return {"input_ids": torch.randint(0, 128, (batch, 8), generator=_gen(seed)), "use_cache": False}


def _main_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "logits"):  # transformers ModelOutput
        return out.logits
    raise TypeError(f"unexpected model output {type(out).__name__}")


@dataclass
class Case:
    name: str
    build: Callable[..., nn.Module]
    make_inputs: Callable[..., Any]
    needs_example_inputs: bool  # symbolic_trace fails: quantize/load_quantized need example_inputs (torch.export)
    w8a8: str  # which W8A8 policy this case uses for the accuracy checks ("w8a8" or "w8a8_h")
    skip: list = field(default_factory=list)  # globs of linear layers left in FP
    changed_config: dict = field(default_factory=dict)  # a config that differs ...
    first_changed_layer: str = ""  # ... and the first layer (graph order) whose shape it changes

    def policy(self, kind: str) -> dict:
        rules = [{"match": g, "skip": True} for g in self.skip]
        return {"rules": rules + [{"type": "Linear", **SPECS[kind]}]}

    def example(self, inputs):
        return inputs if self.needs_example_inputs else None

    def run_counts(self, model, inputs) -> Counter:
        return op_counts(self.run, model, inputs)

    def quantize(self, model, kind: str, inputs=None, **kw):
        inputs = self.make_inputs() if inputs is None else inputs
        return robuq_fx.quantize(model, self.policy(kind), self.example(inputs), **kw)

    def run(self, model, inputs) -> torch.Tensor:
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
        return _main_output(out)

    def expected_layers(self, model) -> list[str]:
        """Names of the nn.Linear modules the policy should quantize (all but the skipped ones)."""
        import fnmatch
        return [n for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and not any(fnmatch.fnmatchcase(n, g) for g in self.skip)]

    def call_counts(self, model, inputs) -> dict[str, int]:
        """How often each nn.Linear runs in one forward of the FP model (forward hooks): its call sites."""
        counts: dict[str, int] = {}
        hooks = [m.register_forward_hook(lambda mod, a, o, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
                 for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        try:
            was = model.training
            model.eval()
            with torch.no_grad():
                self.run(model, inputs)
            model.train(was)
        finally:
            for h in hooks:
                h.remove()
        return counts


CASES = {
    "mlp": Case("mlp", build_mlp, mlp_inputs, False, "w8a8",
                changed_config={"hidden": 48}, first_changed_layer="fc1"),
    "vit": Case("vit", build_vit, vit_inputs, True, "w8a8_h",
                changed_config={"hidden_size": 48}, first_changed_layer="vit.layers.0.attention.q_proj"),
    "dit": Case("dit", build_dit, dit_inputs, True, "w8a8_h", changed_config={"attention_head_dim": 8},
                first_changed_layer="transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"),
    "llama": Case("llama", build_llama, llama_inputs, True, "w8a8", skip=["lm_head"],
                  changed_config={"hidden_size": 32}, first_changed_layer="model.layers.0.self_attn.q_proj"),
}
MODEL_NAMES = list(CASES)


@pytest.fixture(params=MODEL_NAMES)
def case(request) -> Case:
    return CASES[request.param]


# ---- shared, read-only quantized models (building them is the slow part) --------------------------------------------
_CACHE: dict = {}


def cached(case: Case, kind: str):
    """(FP model, QAT model) for `case` under policy `kind`, built once per session. Callers must not mutate them:
    deepcopy first (tests that train or switch modes do)."""
    key = (case.name, kind)
    if key not in _CACHE:
        model = case.build(0)
        _CACHE[key] = (model, case.quantize(model, kind))
    model, qmodel = _CACHE[key]
    model.eval()
    qmodel.eval()
    return model, qmodel


_LOWERED: dict = {}


class OpCounter(TorchDispatchMode):
    """How often each op runs (at the dispatcher, so custom robuq:: ops count once per call, not their insides)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def op_counts(fn, *args, **kwargs) -> Counter:
    """{op: calls} of one `fn(*args, **kwargs)` (no grad): robuq_fx models are your modules now, with no single graph
    to read, so tests count what a forward runs."""
    with torch.no_grad(), OpCounter() as c:
        fn(*args, **kwargs)
    return c.counts


def cached_lowered(case: Case, kind: str, fuse: bool = True):
    """fuse=False: one PackedLinear and one qlinear call per layer (no sibling fusion, tests/passes/test_fuse.py)."""
    key = (case.name, kind, fuse)
    if key not in _LOWERED:
        _LOWERED[key] = robuq_fx.lower(cached(case, kind)[1], fuse=fuse)
    return _LOWERED[key]

