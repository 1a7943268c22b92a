"""Packed checkpoints (`save_quantized` / `load_quantized`) of real model families: a round trip into a fresh,
differently initialised model of the same class reproduces the lowered model exactly; bad inputs raise
CheckpointError naming what is wrong. Models: see conftest.py (the HF ViT stands in for timm's vit_tiny, which cannot
be installed here)."""
from __future__ import annotations

import json

import pytest
import torch

import robuq_fx
from robuq_fx import CheckpointError

from .conftest import CASES, cached, cached_lowered

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    """One packed checkpoint per (model, policy), written once."""
    d = tmp_path_factory.mktemp("ckpt")
    files = {}

    def get(case, kind):
        key = (case.name, kind)
        if key not in files:
            files[key] = robuq_fx.save_quantized(cached_lowered(case, kind), d / f"{case.name}-{kind}.safetensors")
        return files[key]
    return get


@pytest.mark.parametrize("kind", ["lrb", "a2"])
def test_round_trip_into_fresh_model(case, kind, saved_files):
    path = saved_files(case, kind)
    lowered = cached_lowered(case, kind)
    x = case.make_inputs()
    fresh = case.build(seed=123)  # same class and config, different random weights
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = robuq_fx.load_quantized(path, fresh, case.example(x))
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())  # `fresh` is not modified
    assert robuq_fx.robuq_info(loaded)["stage"] == "lowered"
    assert set(loaded.state_dict()) == set(lowered.state_dict())
    with torch.no_grad():
        ref = case.run(lowered, x)
        out = case.run(loaded, x)
        assert torch.equal(out, ref)
        # and still equal to the QAT model it came from (eval mode)
        assert torch.equal(out, case.run(cached(case, kind)[1].eval(), x))
        # `fresh` really computes something else, so every weight behind the equality above (quantized layers and
        # FP parts alike: embeddings, norms, lm_head) came from the file
        assert not torch.equal(case.run(fresh.eval(), x), case.run(cached(case, kind)[0].eval(), x))


@pytest.mark.parametrize("name", ["mlp", "vit", "dit", "llama"])
def test_load_into_different_config_names_first_differing_layer(name, saved_files):
    case = CASES[name]
    path = saved_files(case, "lrb")
    other = case.build(seed=0, **case.changed_config)
    x = case.make_inputs()
    with pytest.raises(CheckpointError) as e:
        robuq_fx.load_quantized(path, other, case.example(x))
    msg = str(e.value)
    assert f"'{case.first_changed_layer}'" in msg, msg
    assert str(path) in msg
    # no other layer named: it is the first difference in model order
    layers = list(json.loads(robuq_fx.checkpoint.read_metadata(path)["layers"]))
    assert [n for n in layers if f"'{n}'" in msg] == [case.first_changed_layer]


def _mlp_file(saved_files):
    return saved_files(CASES["mlp"], "lrb")


@pytest.mark.parametrize("keep", [0.5, 0.9, 40])
def test_truncated_file(saved_files, tmp_path, keep):
    src = _mlp_file(saved_files)
    data = src.read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)  # 40 bytes: inside the header
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        robuq_fx.load_quantized(bad, CASES["mlp"].build(1))


def test_wrong_format_version(saved_files, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    src = _mlp_file(saved_files)
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format_version"] == "1"
    for version in ("2", "0", "one"):
        bad = tmp_path / f"v{version}.safetensors"
        save_file(tensors, str(bad), metadata={**meta, "format_version": version})
        with pytest.raises(CheckpointError, match="version"):
            robuq_fx.load_quantized(bad, CASES["mlp"].build(1))
    # the same file with the right version loads: the version really is what was rejected
    good = tmp_path / "v1.safetensors"
    save_file(tensors, str(good), metadata=meta)
    robuq_fx.load_quantized(good, CASES["mlp"].build(1))


def test_not_a_robuq_file(tmp_path):
    from safetensors.torch import save_file
    bad = tmp_path / "plain.safetensors"
    save_file({"fc1.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(CheckpointError, match="not a robuq_fx packed checkpoint"):
        robuq_fx.load_quantized(bad, CASES["mlp"].build(1))
