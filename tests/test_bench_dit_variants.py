"""bench_dit.py's same-run A/B rows (--env-variant): the switch is in force while its row compiles and runs and is
restored after, the rows get their own summary keys, and malformed specs are a clear error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_dit as B  # noqa: E402


def test_env_variant_parses_and_rejects():
    assert B._env_variant("down:ROBUQ_FP8_DOWN_IN_GEMM=1") == ("down", {"ROBUQ_FP8_DOWN_IN_GEMM": "1"})
    assert B._env_variant("off:ROBUQ_X=") == ("off", {"ROBUQ_X": ""})
    for bad in ("ROBUQ_X=1", "down:ROBUQ_X", "a b:X=1", "a+b:X=1", ":X=1"):
        with pytest.raises(SystemExit, match="TAG:VAR=VALUE"):
            B._env_variant(bad)


def test_set_env_restores(monkeypatch):
    monkeypatch.delenv("ROBUQ_TEST_A", raising=False)
    monkeypatch.setenv("ROBUQ_TEST_B", "old")
    saved = B._set_env({"ROBUQ_TEST_A": "1", "ROBUQ_TEST_B": "new"})
    assert os.environ["ROBUQ_TEST_A"] == "1" and os.environ["ROBUQ_TEST_B"] == "new"
    B._set_env(saved)
    assert "ROBUQ_TEST_A" not in os.environ and os.environ["ROBUQ_TEST_B"] == "old"


def test_env_variant_rows_and_summary_keys(tmp_path):
    """A quick eager run with one variant: a ' +x' row per batch for the setting, keys w4a4h_x_b*_x beside w4a4h's
    (on the CPU ROBUQ_ATTENTION=reference changes no kernel: the rows' presence is asserted, not their speed)."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_dit.py"), "--quick", "--skip-train", "--no-compile",
                           "--settings", "W4A4+H", "--env-variant", "x:ROBUQ_ATTENTION=reference",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "bench_dit_quick.json").read_text())
    names = {(r["setting"], r["batch"]) for r in res["latency"]}
    assert {("robuq W4A4+H", 1), ("robuq W4A4+H +x", 1), ("robuq W4A4+H +x", 2)} <= names
    keys = B.summary(res)
    assert {"w4a4h_b1_x", "w4a4h_x_b1_x", "w4a4h_x_b2_x", "w4a4h_x_resident_x"} <= set(keys)


def test_profiles_skip_the_gpu_side_of_record_function_ranges():
    """profile_dit.py: a `record_function` range's GPU-side user annotation spans the kernels launched inside it;
    counted as a kernel it inflated the QAT profiles' totals (session 19). Real kernels (also those Inductor names on
    the CPU side) and CPU ops are kept apart by device type and the profiler's own annotation flag."""
    from types import SimpleNamespace as E
    import profile_dit as P
    assert P.is_annotation(E(device_type="DeviceType.CUDA", is_user_annotation=True))
    assert not P.is_annotation(E(device_type="DeviceType.CUDA", is_user_annotation=False))
    assert not P.is_annotation(E(device_type="DeviceType.CPU", is_user_annotation=True))  # the CPU range itself
    assert not P.is_annotation(E(device_type="DeviceType.CUDA"))  # a profiler without the flag


def test_train_rows_tags_name_their_summary_keys():
    """Train rows: an opt-in in force tags its row ' +tag' (key part 'tag'), a default turned off ' -tag' (key part
    'no_tag'), so that neither overwrites the plain rows' keys."""
    res = {"latency": [], "memory": [], "baseline": "bf16 eager", "train_step": [
        {"setting": "QAT W4A4+H", "mode": "eager", "x FP step time": 1.6},
        {"setting": "QAT dit-xl-2-robuq -wgraph", "mode": "eager", "x FP step time": 3.0},
        {"setting": "QAT W1.58A4+H +fp8 +wkernel", "mode": "compiled", "x FP step time": 1.2},
        {"setting": "QAT W4A4+H", "mode": "compiled"},  # its FP row failed: no ratio, no key
        # weight_sides_per_forward's rows, with an --env-variant row (session 21), and the backend's mode
        {"setting": "QAT dit-xl-2-robuq +stepw", "mode": "compiled", "x FP step time": 1.6},
        {"setting": "QAT dit-xl-2-robuq +stepw +actk", "mode": "compiled", "x FP step time": 1.5},
        {"setting": "QAT dit-xl-2-robuq", "mode": "backend", "x FP step time": 1.8}]}
    assert B.summary(res) == {"qat_eager_x": 1.6, "qat_paper_no_wgraph_eager_x": 3.0,
                              "qat_w158_fp8_wkernel_compiled_x": 1.2, "qat_paper_stepw_compiled_x": 1.6,
                              "qat_paper_stepw_actk_compiled_x": 1.5, "qat_paper_backend_x": 1.8}


def test_step_phases_time_each_phase_and_rank_cpu_ops():
    """_step_phases.py (profile_dit --train): each phase's host time is its own Python (a 20 ms sleep in one phase
    lands in that phase's row alone, a collection's time in its GC ms), the sum row adds them; the CPU-op table keeps CPU rows by self time."""
    import time
    from types import SimpleNamespace as E
    import _step_phases as S
    import gc

    def collect():  # full collections over 300k tracked objects: their time lands in this phase's GC ms
        junk = [[i] for i in range(300_000)]
        gc.collect()
        return junk
    rows = S.phase_times([("a", lambda: None), ("b", lambda: time.sleep(0.02)), ("c", collect)], 3, "cpu")
    by = {r["phase"]: r for r in rows}
    assert [r["phase"] for r in rows] == ["a", "b", "c", "sum"]
    assert by["b"]["host ms"] >= 19 and by["a"]["host ms"] < 5 and by["b"]["bound by"] == "host"
    assert by["sum"]["host ms"] == round(by["a"]["host ms"] + by["b"]["host ms"] + by["c"]["host ms"], 3)
    assert by["c"]["GC ms"] > 0.3 * by["c"]["host ms"] and by["a"]["GC ms"] == by["b"]["GC ms"] == 0
    ops = S.cpu_ops([E(device_type="DeviceType.CPU", key="aten::mm", count=4, self_cpu_time_total=2000),
                     E(device_type="DeviceType.CUDA", key="kernel", count=4, self_cpu_time_total=9000),
                     E(device_type="DeviceType.CPU", key="cudaLaunchKernel", count=8, self_cpu_time_total=6000)], 2)
    assert [(r["CPU op"], r["calls per step"], r["self CPU ms per step"]) for r in ops] == [
        ("cudaLaunchKernel", 4.0, 3.0), ("aten::mm", 2.0, 1.0)]


def test_gpu_idle_gaps_are_attributed_to_the_host_op_running_then():
    """_step_phases.gpu_idle: gaps between kernels (>= min_gap_us) summed per step, each attributed to the shortest
    CPU event containing its middle over all threads (here the backward thread's node, a synchronize, the step's own
    Python) and to that event's outermost ancestor."""
    from types import SimpleNamespace as N
    import _step_phases as S

    def ev(name, a, b, thread=1, parent=None, dev="DeviceType.CPU"):
        e = N(name=name, time_range=N(start=a, end=b), thread=thread, cpu_parent=parent, cpu_children=[],
              device_type=dev)
        if parent is not None:
            parent.cpu_children.append(e)
        return e
    step = ev("step", 0, 100)
    sync = ev("cudaStreamSynchronize", 50, 90, parent=step)
    bwd = ev("bwd node", 20, 40, thread=2)
    launch = ev("cudaLaunchKernel", 30, 31, thread=2, parent=bwd)
    kernels = [ev("k", a, b, dev="DeviceType.CUDA") for a, b in ((0, 5), (40, 45), (50, 55), (90, 100))]
    events = [step, sync, bwd, launch] + kernels
    idle, inner, outer = S.gpu_idle(events, 1, lambda e: e.device_type == "DeviceType.CUDA", min_gap_us=5)
    assert idle == 0.075
    assert {r["host op (innermost)"]: r["GPU idle ms per step"] for r in inner} == {
        "bwd node": 0.035, "cudaStreamSynchronize": 0.035, "step": 0.005}
    assert {r["host op (outermost)"]: r["GPU idle ms per step"] for r in outer} == {"step": 0.04, "bwd node": 0.035}


def test_kernel_growth_ranks_names_against_the_base():
    """profile_dit.kernel_growth: rows summed per kernel name (a name may come twice), the setting's kernels against
    the base's, ranked by GPU time gained; a QAT-only kernel has no base time, a kernel gone shows its loss."""
    import profile_dit as P
    base = [{"kernel": "mm", "category": "GEMM", "calls per step": 2, "ms per step": 1.0},
            {"kernel": "gone", "category": "x", "calls per step": 1, "ms per step": 0.5}]
    other = [{"kernel": "mm", "category": "GEMM", "calls per step": 2, "ms per step": 1.25},
             {"kernel": "mm", "category": "GEMM", "calls per step": 1, "ms per step": 0.25},
             {"kernel": "quant", "category": "red", "calls per step": 4, "ms per step": 0.75}]
    rows = P.kernel_growth(base, other)
    assert [(r["kernel"], r["delta ms"]) for r in rows] == [("quant", 0.75), ("mm", 0.5), ("gone", -0.5)]
    assert rows[0]["base ms per step"] == 0.0 and rows[1]["calls per step"] == 3 and rows[2]["calls per step"] == 0.0


def test_interleaved_rounds_pair_each_row_with_the_base_of_its_round():
    """_dit_train.interleaved: every row runs once a round in an order rotated by one each round, and a row's ratio is
    the median over rounds of its time over the base's time in the same round. A host whose speed drifts 2x from
    round to round then still gives each row's own cost ratio exactly, while medians of the rows' times do not."""
    import _dit_train as T
    cost = {"FP": 10.0, "A": 15.0, "B": 12.0}
    drift = [1.0, 2.0, 1.2, 1.9, 1.0, 2.1, 1.1]  # the host's slowdown in each round
    order, clock = [], {"round": 0, "calls": 0}

    def timer(fn):
        name = fn()
        order.append(name)
        ms = cost[name] * drift[clock["round"]]
        clock["calls"] += 1
        clock["round"] = clock["calls"] // len(cost)
        return ms
    steps = {n: (lambda n=n: n) for n in cost}
    got = T.interleaved(steps, rounds=len(drift), timer=timer, base="FP")
    assert order[:6] == ["FP", "A", "B", "A", "B", "FP"]  # round 2 starts one row later
    assert sorted(order) == sorted(list(cost) * len(drift))
    assert got["A"][1] == pytest.approx(1.5) and got["B"][1] == pytest.approx(1.2) and got["FP"][1] == 1.0
    assert got["A"][2] == pytest.approx((1.5, 1.5)) and got["FP"][2] == (1.0, 1.0)  # no spread: drift cancels
    assert got["A"][0] == pytest.approx(15.0 * 1.2)  # (the median time keeps the drift's median)


def test_compiled_train_rows_interleave_and_keep_their_ratio(tmp_path):
    """A quick compiled training run: its rows are timed in interleaved rounds ('timing': 'interleaved') with the
    paired ratio in 'x FP step time'; --no-interleave gives the sequential rows without the marker."""
    for extra, marker in (([], "interleaved"), (["--no-interleave"], None)):
        out = tmp_path / ("seq" if extra else "inter")
        proc = subprocess.run([sys.executable, str(BENCH / "bench_dit.py"), "--quick", "--train-only", "--iters", "4",
                               "--train-modes", "compiled", "--settings", "W4A4+H", "--out", str(out), *extra],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = json.loads((out / "bench_dit_quick.json").read_text())["train_step"]
        assert [r["setting"] for r in rows] == ["FP", "QAT W4A4+H"]
        assert all(r.get("timing") == marker and r["mode"] == "compiled" for r in rows)
        assert rows[0]["x FP step time"] == 1.0 and rows[1]["x FP step time"] > 0
        if marker:
            lo, hi = rows[1]["x FP range"]
            assert lo <= rows[1]["x FP step time"] <= hi
