"""Library models stay usable after quantize / lower / load_quantized (issue 18): a diffusers DiTPipeline samples
end to end with the QAT and the lowered transformer, transformers' generate() runs with its KV cache, packed
checkpoints load into freshly built models of the same class and run in their pipeline. All tiny, random init."""
from __future__ import annotations

import pytest
import torch

import robuq_fx

from .conftest import CASES, build_dit, build_llama

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export's deprecated LeafSpec on deepcopy


def _pixel_decoder():
    """DiTPipeline decodes latents with `vae.decode(z / scaling_factor).sample`; at 8x8 the latents are the pixels."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput

    class PixelDecoder(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, scaling_factor: float = 1.0):
            super().__init__()
            self.register_buffer("anchor", torch.zeros(1))  # the pipeline reads a device from every component

        def decode(self, z, return_dict: bool = True):
            return DecoderOutput(sample=z)

    return PixelDecoder()


def _sample(transformer, steps: int = 3) -> torch.Tensor:
    from diffusers import DDIMScheduler, DiTPipeline
    pipe = DiTPipeline(transformer=transformer, vae=_pixel_decoder(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    # guidance_scale=1: DiTPipeline's classifier-free guidance uses ImageNet's null class 1000
    return pipe(class_labels=[0, 1, 1], guidance_scale=1.0, num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def _dit_policy(rank: int = 4) -> dict:
    """The paper's DiT-XL/2 policy (8-bit attention: a captured region per attention module) at a tiny LRB rank."""
    d = robuq_fx.Policy.load("dit-xl-2-robuq").to_dict()
    for r in d["rules"]:
        if r.get("lora_rank"):
            r["lora_rank"] = rank
    return d


DIT = dict(num_embeds_ada_norm=2, out_channels=4)  # 2 classes; the pipeline reads config.out_channels
_BUILT: dict = {}


def _dit():
    """(FP, QAT, lowered) tiny 2-class DiT under the paper's policy, built once."""
    if "dit" not in _BUILT:
        m = build_dit(0, **DIT).eval()
        ex = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([10, 900]),
              "class_labels": torch.tensor([0, 1])}
        q = robuq_fx.quantize(m, _dit_policy(), example_inputs=ex)
        _BUILT["dit"] = (m, q.eval(), robuq_fx.lower(q), ex)
    return _BUILT["dit"]


def test_dit_pipeline_samples_with_qat_and_lowered_transformers():
    m, q, low, _ = _dit()
    assert isinstance(q, type(m)) and isinstance(low, type(m))
    assert low.config.sample_size == 8 and low.dtype == torch.float32  # what DiTPipeline reads
    assert set(robuq_fx.robuq_info(low)["regions"]) == {f"transformer_blocks.{i}.attn1" for i in range(2)}
    fp, a, b = _sample(m), _sample(q), _sample(low)
    assert a.shape == (3, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)  # lowered == QAT (eval) through 3 DDIM steps
    assert not torch.equal(a, fp)


def test_lowered_dit_compiles_to_one_graph():
    """torch.compile traces the attention regions' call mapping: the lowered DiT is one Dynamo graph, no break."""
    _, _, low, ex = _dit()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            exp = torch._dynamo.explain(low)(**ex)
    finally:
        torch._dynamo.reset()
    assert exp.graph_count == 1 and exp.graph_break_count == 0, [b.reason for b in exp.break_reasons]


def test_dit_checkpoint_loads_into_a_fresh_model_that_samples_in_the_pipeline(tmp_path):
    m, _, low, ex = _dit()
    path = robuq_fx.save_quantized(low, tmp_path / "dit.safetensors")
    fresh = build_dit(7, **DIT)  # same class and config, other random weights
    loaded = robuq_fx.load_quantized(path, fresh, ex)
    assert type(loaded) is type(m)
    assert robuq_fx.robuq_info(loaded)["fused"] == robuq_fx.robuq_info(low)["fused"]
    assert torch.equal(_sample(loaded), _sample(low))


def _llama():
    if "llama" not in _BUILT:
        m = build_llama(0).eval()
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        q = robuq_fx.quantize(m, "llama", example_inputs=(ids,))  # as the model is called: no use_cache flag
        _BUILT["llama"] = (m, q.eval(), robuq_fx.lower(q), ids)
    return _BUILT["llama"]


def _greedy(model, ids, n: int = 4) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


def test_llama_generate_lowered_equals_qat(tmp_path):
    m, q, low, ids = _llama()
    assert type(q) is type(m) and type(low) is type(m) and low.config.vocab_size == 128
    a, b = _greedy(q, ids), _greedy(low, ids)
    assert a.shape == (2, 12) and torch.equal(a, b)
    low.save_pretrained(tmp_path)  # transformers' own methods keep working (the packed tensors are written)
    assert (tmp_path / "model.safetensors").exists()
    with torch.no_grad():  # the KV cache path and a full forward agree
        assert torch.equal(low(a).logits[:, -5:-1].argmax(-1), a[:, -4:])


def test_llama_checkpoint_loads_into_a_fresh_model_that_generates(tmp_path):
    _, _, low, ids = _llama()
    path = robuq_fx.save_quantized(low, tmp_path / "llama.safetensors")
    loaded = robuq_fx.load_quantized(path, build_llama(3), (ids,))
    assert torch.equal(_greedy(loaded, ids), _greedy(low, ids))


def test_hf_causal_lm_captures_as_called_on_the_whole_graph_path():
    """`example_inputs=(input_ids,)` also captures the whole model: config.use_cache is off during torch.export,
    so no DynamicCache is in the graph."""
    m, q, _, ids = _llama()
    g = robuq_fx.quantize(m, "llama", example_inputs=(ids,), whole_graph=True).eval()
    assert isinstance(g, torch.fx.GraphModule) and m.config.use_cache
    with torch.no_grad():
        assert torch.equal(g(ids).logits, q(ids).logits)


def test_files_of_the_whole_graph_form_load_into_the_drop_in_form(tmp_path):
    """The file format did not change: per-layer tensors under the model's own names."""
    case = CASES["vit"]
    m, x = case.build(0).eval(), case.make_inputs()
    g = robuq_fx.lower(case.quantize(m, "lrb", x, whole_graph=True))
    path = robuq_fx.save_quantized(g, tmp_path / "vit.safetensors")
    loaded = robuq_fx.load_quantized(path, case.build(9), x)
    assert type(loaded) is type(m)
    with torch.no_grad():
        assert torch.equal(case.run(loaded, x), case.run(g, x))
