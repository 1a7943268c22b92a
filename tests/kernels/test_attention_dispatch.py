"""Which GPU form `robuq::attention8` takes (CPU tests, no GPU): the dispatch table's measured flash-kernel choices
(`dispatch.attention_choice`, written by `bench_attention.py --sweep --write-dispatch`) by head dim, causality and
size (a size within 2x of a measured one only), ROBUQ_ATTENTION forcing a form or the row kernel, and the writer
keeping the table's other keys."""
import json
import sys
from pathlib import Path

import pytest
import torch

from robuq_fx.kernels import attention as A
from robuq_fx.kernels import dispatch as D

TABLE = {"shapes": {"1x1": {}}, "attention": {"72/n": {"262144": ["prequant", [64, 32, 4, 3, 128]],
                                                        "4096": ["fused", [128, 64, 8, 2, None, False]]},
                                               "128/c": {"262144": ["bogus", [1, 2, 3, 4, None]]}}}


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(D, "dispatch_table", lambda: TABLE)
    monkeypatch.delenv("ROBUQ_ATTENTION", raising=False)


def test_choice_by_head_dim_causality_and_size(table):
    assert D.attention_choice(72, False, 262144) == ("prequant", (64, 32, 4, 3, 128))
    assert D.attention_choice(72, False, 200000) == ("prequant", (64, 32, 4, 3, 128))  # within 2x
    assert D.attention_choice(72, False, 4096) == ("fused", (128, 64, 8, 2, None, False))
    assert D.attention_choice(72, False, 32768) is None  # 8x from either measured size
    assert D.attention_choice(72, True, 262144) is None  # causal: not measured
    assert D.attention_choice(64, False, 262144) is None
    assert D.attention_choice(128, True, 262144) is None  # an unknown form is no choice


def test_environment_forces_a_form_or_the_rows(table, monkeypatch):
    q = torch.zeros(64, 16, 256, 72)
    assert A._flash_choice(q, q, False) == ("prequant", (64, 32, 4, 3, 128))
    monkeypatch.setenv("ROBUQ_ATTENTION", "fused")
    assert A._flash_choice(q, q, False) == ("fused", None)
    for mode in ("rows", "reference"):
        monkeypatch.setenv("ROBUQ_ATTENTION", mode)
        assert A._flash_choice(q, q, False) is None


def test_no_table_no_choice(monkeypatch):
    monkeypatch.setattr(D, "dispatch_table", lambda: {})
    monkeypatch.delenv("ROBUQ_ATTENTION", raising=False)
    assert D.attention_choice(72, False, 262144) is None


def test_the_writer_keeps_the_other_keys(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_attention
    path = tmp_path / "dispatch_table.json"
    path.write_text(json.dumps({"shapes": {"96x256": {"gemm_cfg": {"256": 1}}}, "attention": {"old": {}}}))
    monkeypatch.setattr(D, "_TABLE_PATH", str(path))
    D.dispatch_table.cache_clear()
    try:
        new = {"72/n": {"262144": ["fused", [64, 32, 4, 3, 128]]}}
        bench_attention._write_attention_choices(new)
        got = json.loads(path.read_text())
        assert got["attention"] == new and got["shapes"] == {"96x256": {"gemm_cfg": {"256": 1}}}
        assert D.attention_choice(72, False, 262144) == ("fused", (64, 32, 4, 3, 128))
    finally:
        D.dispatch_table.cache_clear()
