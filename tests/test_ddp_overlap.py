"""benchmarks/ddp_overlap.py: the all-reduce timeline model against hand-worked cases, and a quick CPU run whose
recorded buckets must cover every trainable parameter's gradient, inside the backward."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _ddp_timeline as T  # noqa: E402

GB = 10**9


def test_comm_time_is_the_ring_formula():
    # 2 GPUs: 2 (n-1)/n = 1, so 1 GB at 100 GB/s is 10 ms, plus the latency
    assert T.comm_ms(GB, 100.0, world=2, latency_us=0) == pytest.approx(10.0)
    assert T.comm_ms(GB, 100.0, world=4, latency_us=0) == pytest.approx(15.0)  # 2 * 3/4
    assert T.comm_ms(GB, 100.0, world=2, latency_us=50) == pytest.approx(10.05)
    assert T.comm_ms(GB, 100.0, world=1) == 0.0
    with pytest.raises(ValueError, match="positive"):
        T.comm_ms(GB, 0.0)


def test_simulate_queues_all_reduces_in_ready_order():
    # at 100 GB/s a 0.5 GB bucket takes 5 ms. Ready at 0, 2 (queued behind the first: starts at 5) and 20 ms;
    # the backward ends at 18: the third runs 20..25, 7 ms after the backward
    b = [T.Bucket(20.0, GB // 2), T.Bucket(0.0, GB // 2), T.Bucket(2.0, GB // 2)]
    sim = T.simulate(b, backward_ms=18.0, busbw_gbs=100.0, latency_us=0)
    assert sim["comm_ms"] == pytest.approx(15.0)
    assert sim["finish_ms"] == pytest.approx(25.0)
    assert sim["exposed_ms"] == pytest.approx(7.0)
    # everything ready at the end: nothing overlaps, all of it exposed
    late = [T.Bucket(18.0, GB // 2)] * 3
    assert T.simulate(late, 18.0, 100.0, latency_us=0)["exposed_ms"] == pytest.approx(15.0)
    # ready early enough and fast enough: nothing exposed
    assert T.simulate([T.Bucket(1.0, GB // 100)], 18.0, 100.0, latency_us=0)["exposed_ms"] == 0.0


def test_scaling_and_breakeven():
    assert T.predicted_scaling(100.0, 0.0) == 2.0
    assert T.predicted_scaling(100.0, 100.0 / 9) == pytest.approx(1.8)
    # DDP's own cost in: a 110 ms DDP step, nothing exposed, against a 100 ms step without DDP
    assert T.predicted_scaling(110.0, 0.0, one_gpu_ms=100.0) == pytest.approx(2 * 100 / 110)
    # one 1 GB bucket ready at the backward's end, step 100 ms: 1.8x needs exposed <= 100/9 ms, so
    # 1 GB / bw <= 11.11 ms -> bw >= 90 GB/s
    b = [T.Bucket(50.0, GB)]
    assert T.breakeven_busbw(b, 50.0, 100.0, 1.8, latency_us=0) == pytest.approx(90.0, rel=2e-3)
    # the same bucket ready at the start has 50 ms of backward to hide behind: 1 GB / 50 ms = 20 GB/s suffices fully,
    # and 1.8x needs 1 GB / (50 + 100/9) ms
    early = [T.Bucket(0.0, GB)]
    assert T.breakeven_busbw(early, 50.0, 100.0, 1.8, latency_us=0) == pytest.approx(
        1e3 / (50 + 100 / 9), rel=2e-3)
    assert T.breakeven_busbw(b, 50.0, 100.0, 2.0, latency_us=0) is None  # 2x would need infinite bandwidth
    assert T.ready_fraction([T.Bucket(1.0, 3), T.Bucket(5.0, 1)], 2.0) == 0.75


def test_quick_run_records_every_gradient(tmp_path):
    import ddp_overlap
    import torch.distributed as dist
    rows = ddp_overlap.main(["--quick", "--settings", "fp", "dit-xl-2-robuq", "--out", str(tmp_path)])
    assert not dist.is_initialized()
    assert [r["setting"] for r in rows] == ["fp", "dit-xl-2-robuq"]
    for r in rows:
        # DDP's buckets hold every trainable parameter's gradient once (fp32 here), each ready inside the backward
        assert r["bucket_mb"] == pytest.approx(r["grad_mb"])
        assert all(0.0 <= ms <= r["backward_ms"] for ms, _ in r["buckets"])
        assert r["plain_step_ms"] > 0 and r["step_ms"] > r["backward_ms"]
        assert set(r["predictions"]) == {"350.0", "100.0", "25.0"}
        p = r["predictions"]["350.0"]
        assert p["total_x"] == pytest.approx(2 * r["plain_step_ms"] / (r["step_ms"] + p["exposed_ms"]))
    assert rows[1]["grad_mb"] > rows[0]["grad_mb"]  # the paper policy adds the low-rank branch's parameters
    saved = json.loads((tmp_path / "ddp_overlap_quick.json").read_text())
    assert [t["setting"] for t in saved["table"]] == ["fp", "dit-xl-2-robuq"]


def test_quick_run_without_the_recording_hook(tmp_path):
    """--hook none times DDP's own all-reduce: no timeline, so no predictions (nothing made up in their place)."""
    import ddp_overlap
    rows = ddp_overlap.main(["--quick", "--settings", "fp", "--hook", "none", "--tag", "_n", "--out", str(tmp_path)])
    assert rows[0]["buckets"] == [] and rows[0]["predictions"] == {} and rows[0]["breakeven_gbs"] is None
    assert len(rows[0]["plain_steps_ms"]) == len(rows[0]["ddp_steps_ms"]) == 2  # one a round, two rounds
    table = json.loads((tmp_path / "ddp_overlap_quick_n.json").read_text())["table"]
    assert table[0]["ready at half"] == "-" and table[0]["x2 @350"] == "-"
