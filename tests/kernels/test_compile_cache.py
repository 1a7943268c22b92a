"""torch.compile's on-disk caches see robuq's settings (robuq_fx/kernels/compile_cache.py): a warm cache must not
answer a compile made under other ROBUQ_* settings with the graph compiled before (it did: the decompositions run
inside AOTAutograd, after the graph the caches key on was captured)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from robuq_fx.kernels import compile_cache as C
from robuq_fx.kernels import dispatch as D


def test_fingerprint_follows_env_and_table_and_keeps_the_users_tag(monkeypatch):
    cfg = torch.compiler.config
    with cfg.patch(cache_key_tag="mine"):  # (a config module: restored by its own patch, not monkeypatch)
        _check_tags(cfg, monkeypatch)


def _check_tags(cfg, monkeypatch):
    monkeypatch.setattr(C, "_STATE", {})
    monkeypatch.delenv("ROBUQ_FP8_EPI", raising=False)
    C.tag_compile_caches()
    first = cfg.cache_key_tag
    assert first.startswith("mine|robuq-") and len(first) == len("mine|robuq-") + 16
    C.tag_compile_caches()
    assert cfg.cache_key_tag == first  # stable while nothing changes
    monkeypatch.setenv("ROBUQ_FP8_EPI", "addmm")
    C.tag_compile_caches()
    assert cfg.cache_key_tag.startswith("mine|robuq-") and cfg.cache_key_tag != first  # replaced, not appended
    epi = cfg.cache_key_tag
    table = {**D.dispatch_table(), "epilogue": "other"}
    monkeypatch.setattr(D, "dispatch_table", lambda: table)
    C.tag_compile_caches()
    assert cfg.cache_key_tag not in (first, epi)
    cfg.cache_key_tag = "theirs"  # the user sets a new tag: it becomes the base
    C.tag_compile_caches()
    assert cfg.cache_key_tag.startswith("theirs|robuq-")


_SCRIPT = textwrap.dedent("""
    import torch, robuq_fx as R
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 128))
    pol = {"rules": [{"match": "*", "w_bits": 1.58, "a_bits": 4, "hadamard": True, "hadamard_block": 128}]}
    x = torch.randn(16, 256)
    q = R.quantize(m, pol, example_inputs=(x,))
    with torch.no_grad():
        _, code = run_and_get_code(lambda: torch.compile(q)(x))
    print("OPAQUE", "\\n".join(code).count("torch.ops.robuq.fake_quant_act.default("))
""")


def test_a_warm_cache_does_not_answer_for_other_settings(tmp_path):
    """Two processes on one cache directory: the QAT ops decomposed, then kept opaque (ROBUQ_INDUCTOR_DECOMPOSE=0).
    The second must compile its own graph (opaque calls in its code), not get the first one's back."""
    def run(decompose: str) -> int:
        env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "ROBUQ_INDUCTOR_DECOMPOSE": decompose,
               "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split("OPAQUE")[-1])
    assert run("qat") == 0
    assert run("0") == 2
