"""Packed safetensors checkpoints on an MLP (model-level round trips live in tests/models)."""
import json

import pytest
import torch
import torch.nn as nn

import robuq_fx
from robuq_fx import CheckpointError


def mlp(h=96, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, 10))


POL = {"rules": [{"match": "0", "w_bits": 1.58, "a_bits": 3, "lora_rank": 4}, {"type": "Linear", "w_bits": 4, "a_bits": 2}]}


@pytest.fixture
def saved(tmp_path):
    low = robuq_fx.lower(robuq_fx.quantize(mlp(), POL))
    path = robuq_fx.save_quantized(low, tmp_path / "m.safetensors")
    return low, path


def test_round_trip_identical(saved):
    low, path = saved
    back = robuq_fx.load_quantized(path, mlp(seed=123))
    x = torch.randn(6, 64)
    assert torch.equal(back(x), low(x))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert not any(k.endswith(".weight") for k in f.keys())  # no FP weights of quantized layers in the file
        meta = f.metadata()
    assert meta["format_version"] == "1" and json.loads(meta["layers"])["0"]["spec"]["w_bits"] == 1.58


def test_checkpoint_size(saved, tmp_path):
    low = robuq_fx.lower(robuq_fx.quantize(nn.Linear(1152, 1152), {"rules": [{"type": "Linear", "w_bits": 1.58, "a_bits": 4}]}))
    p = robuq_fx.save_quantized(low, tmp_path / "big.safetensors")
    assert p.stat().st_size < 0.12 * 1152 * 1152 * 2  # ternary codes + scales + bias + header vs bf16 weight


def test_shape_mismatch_names_layer(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="layer '0' was saved as 64->96 features, this model has 64->128"):
        robuq_fx.load_quantized(path, mlp(h=128))


def test_spec_mismatch_names_layer(saved, tmp_path):
    low = robuq_fx.lower(robuq_fx.quantize(mlp(), {"rules": [{"type": "Linear", "w_bits": 4, "a_bits": 4}]}))
    p = robuq_fx.save_quantized(low, tmp_path / "w4.safetensors")
    # the saved policy rebuilds W4; a model with an extra quantizable layer is reported by name
    bigger = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10), nn.Linear(10, 10))
    with pytest.raises(CheckpointError, match="layer '3'"):
        robuq_fx.load_quantized(p, bigger)


def test_truncated_and_corrupt(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    t = tmp_path / "trunc.safetensors"
    t.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        robuq_fx.load_quantized(t, mlp())
    c = tmp_path / "junk.safetensors"
    c.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        robuq_fx.load_quantized(c, mlp())
    with pytest.raises(CheckpointError, match="not found"):
        robuq_fx.load_quantized(tmp_path / "missing.safetensors", mlp())


def test_unknown_version(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    _, path = saved
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta["format_version"] = "99"
    p = tmp_path / "v99.safetensors"
    save_file(tensors, str(p), metadata=meta)
    with pytest.raises(CheckpointError, match="unknown format version '99'"):
        robuq_fx.load_quantized(p, mlp())


def test_save_needs_lowered_and_writable_dir(tmp_path):
    q = robuq_fx.quantize(mlp(), POL)
    with pytest.raises(CheckpointError, match="output of robuq_fx.lower"):
        robuq_fx.save_quantized(q, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        robuq_fx.save_quantized(robuq_fx.lower(q), tmp_path / "nope" / "x.safetensors")


def test_tied_weights_stored_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 64)
            self.fc = nn.Linear(64, 64)
            self.head = nn.Linear(64, 100, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.fc(self.emb(ids))))

    torch.manual_seed(0)
    low = robuq_fx.lower(robuq_fx.quantize(Tied(), {"rules": [{"match": "fc", "w_bits": 4, "a_bits": 4},
                                                             {"match": "*", "skip": True}]}))
    p = robuq_fx.save_quantized(low, tmp_path / "tied.safetensors")
    assert p.stat().st_size < 1.5 * 100 * 64 * 4  # the 100x64 fp32 embedding once, not twice
    torch.manual_seed(1)
    back = robuq_fx.load_quantized(p, Tied())
    ids = torch.randint(0, 100, (3, 5))
    assert torch.equal(back(ids), low(ids))
