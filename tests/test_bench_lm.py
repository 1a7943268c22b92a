"""benchmarks/bench_lm.py (issue 21): the stdlib data split, and the --quick run end to end on CPU (2 x 64 byte-level
Llama, a slice of the data, every setting for a few steps; ~25 s on 2 shared cores), and the same on two worker
processes (--devices cpu cpu, a few settings at 2 seeds; ~35 s for both runs). The quick run's numbers say
nothing about RobuQ: it checks the pipeline (data -> FP -> outliers -> QAT settings, AMPN -> lower -> tables, JSON,
summary)."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _lm_data as L  # noqa: E402
from _provenance import gpu_tag  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

ISSUE_KEYS = ["lm_fp_bpb", "lm_w4a4h_dbpb", "lm_w158a4h_dbpb", "lm_w158a3h_dbpb", "lm_w158a3_noh_dbpb",
              "lm_w158a2h_dbpb", "lm_ampn_a2_dbpb", "lm_outlier_max_over_rms", "lm_lowered_gap_bpb", "gpu", "torch",
              "date"]


def test_data_split_is_deterministic_and_disjoint_by_file():
    a, b = L.load_corpus(seed=0), L.load_corpus(seed=0)
    assert a.train_files == b.train_files and a.val_files == b.val_files and a.info == b.info
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.val_files and a.train_files and not set(a.train_files) & set(a.val_files)
    assert sorted(a.train_files + a.val_files) == L.stdlib_files()  # every file in exactly one split
    assert all(L.is_val(f, 0, 5.0) for f in a.val_files) and not any(L.is_val(f, 0, 5.0) for f in a.train_files)
    # no test suite, no third-party package: no excluded folder anywhere in a path
    assert not any(set(f.split("/")[:-1]) & set(L.EXCLUDED_DIRS) for f in a.train_files + a.val_files)
    # one NUL separator per file, counted in the stream; the source bytes are the files' sizes
    root = L.stdlib_root()
    assert a.info["val_source_bytes"] == sum((root / f).stat().st_size for f in a.val_files)
    assert a.info["train_stream_bytes"] == a.info["train_source_bytes"] + len(a.train_files) == a.train.numel()
    assert int((a.val == L.SEP).sum()) == len(a.val_files)  # no stdlib source contains a NUL byte
    # the split is a function of the path and the seed: another seed moves files, a slice keeps the assignment
    assert L.load_corpus(seed=1).val_files != a.val_files
    sl = L.load_corpus(seed=0, max_train_bytes=200_000, max_val_bytes=50_000)
    assert set(sl.val_files) <= set(a.val_files) and set(sl.train_files) <= set(a.train_files)
    assert sl.info["val_source_bytes"] <= 50_000 and sl.info["sliced"]


def test_eval_windows_predict_every_byte_once():
    s = torch.arange(1, 42, dtype=torch.uint8)  # 41 bytes, context 8: 5 windows of 9, bytes 2..41 predicted
    w = L.eval_windows(s, 8)
    assert w.shape == (5, 9)
    assert torch.equal(w[:, 1:].reshape(-1), s[1:41]) and torch.equal(w[1:, 0], w[:-1, -1])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    import bench_lm
    out = tmp_path_factory.mktemp("bench_lm")
    threads = torch.get_num_threads()
    try:
        result = bench_lm.main(["--quick", "--out", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)  # --quick runs single-threaded; the rest of the session keeps its threads
    return out, result


def test_quick_run_end_to_end(quick):
    out, result = quick
    for name in ("bench_lm_quick.txt", "bench_lm_quick.json", f"summary_lm_quick_{gpu_tag()}.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / f"summary_lm_quick_{gpu_tag()}.json").read_text())
    assert set(ISSUE_KEYS) <= set(summary), sorted(set(ISSUE_KEYS) - set(summary))
    assert summary["lm_python"] == result["data"]["python"] and summary["lm_val_source_bytes"] > 0
    # BPB finite and below 8 (8 = a uniform guess over 256 bytes) for FP and every setting, before and after QAT
    fp = summary["lm_fp_bpb"]
    assert 0 < fp < 8
    for key, r in result["results"].items():
        bpbs = r["bpb"] + (r["ptq_bpb"] if isinstance(r["ptq_bpb"], list) else [r["ptq_bpb"]])
        assert all(math.isfinite(b) and 0 < b < 8 for b in bpbs), (key, bpbs)
        assert summary[f"lm_{key}_dbpb"] == pytest.approx(r["bpb"][0] - fp, abs=1e-4)
    assert len(result["results"]) == 16  # every setting of every table ran once
    # on CPU the lowered model runs the reference kernel, bit-identical to the QAT model: the gap is exactly 0
    assert summary["lm_lowered_gap_bpb"] == 0.0
    assert all(set(r["lowered"]["kernels"]) == {"reference"} for r in result["results"].values())
    # AMPN met its budget (MAC-weighted average) and used more than one bit width
    for key, budget in (("ampn_a3", 3), ("ampn_a2", 2)):
        assert summary[f"lm_{key}_mean_bits"] <= budget + 1e-9
        assert len(set(result["ampn"][key][0]["bits"].values())) > 1
    # outliers: one row per quantized linear (2 layers x 7), statistics before and after the rotation
    assert len(result["outliers"]) == 14 and summary["lm_outlier_max_over_rms"] > 1
    assert all(r["kurtosis_h"] > 0 and r["max_over_rms_h"] > 1 for r in result["outliers"])


def test_quick_run_tables(quick):
    out, result = quick
    text = (out / "bench_lm_quick.txt").read_text()
    for title in ("outliers", "QAT settings", "ablation at W1.58A3", "activation quantizer", "AMPN: mean activation",
                  "lowered vs QAT"):
        assert f"## {title}" in text, title
    assert "| W1.58A3 " in text and "| + LRB " in text and "lm_head full precision" in text
    saved = json.loads((out / "bench_lm_quick.json").read_text())
    assert saved["tables"].keys() == result["tables"].keys() and saved["data"]["excluded_dirs"] == list(L.EXCLUDED_DIRS)
    assert saved["provenance"]["command"].endswith("--quick --out " + str(out) + " --no-progress")


def test_plan_fits_the_qat_budget_to_the_time_budget():
    import bench_lm
    args = bench_lm.parse_args([])
    args.device = "cuda"
    settings = bench_lm.all_settings()
    assert len(settings) == 16 and sum(s.ampn for s in settings) == 2
    speed = dict(fp_tok_s=8e5, qat_tok_s=4e5, qat_sigma_tok_s=2.5e5, eval_tok_s=1.5e6, quantize_s=1.5, lower_s=3.0)
    p = bench_lm.plan(args, settings, 8, 2000 * 512, speed, 30.0)
    step_s = 3 * sum(64 * 512 / (2.5e5 if s.a_clip == "sigma" else 4e5) for s in settings)  # one more step each
    assert p["qat_runs"] == 48 and args.min_qat_steps < p["qat_steps"] < args.max_qat_steps
    assert 1200 - step_s <= p["eta_s"] <= 1200 and p["qat_tokens"] == p["qat_steps"] * 64 * 512
    slow = {k: v / 10 if k.endswith("tok_s") else v for k, v in speed.items()}  # floor: the ETA says it overruns
    p = bench_lm.plan(args, settings, 8, 2000 * 512, slow, 30.0)
    assert p["qat_steps"] == args.min_qat_steps and p["eta_s"] > 1200
    args.qat_tokens = 8_000_000  # given: used as is (whole steps), the ETA still printed
    p = bench_lm.plan(args, settings, 8, 2000 * 512, speed, 30.0)
    assert p["qat_steps"] == 8_000_000 // (64 * 512) and p["budget_s"] is None and p["eta_s"] > 0


def test_plan_divides_the_qat_work_over_the_devices():
    """Two devices: the QAT jobs' work (training, their evaluations, quantize / lower, AMPN) is halved, the FP
    training, its control and evaluations are not, so the same budget buys about twice the QAT steps."""
    import bench_lm
    speed = dict(fp_tok_s=8e5, qat_tok_s=4e5, qat_sigma_tok_s=2.5e5, eval_tok_s=1.5e6, quantize_s=1.5, lower_s=3.0)
    plans = {}
    for devices in (["cuda"], ["cuda:0", "cuda:1"]):
        args = bench_lm.parse_args(["--minutes", "9", "--max-qat-steps", "100000"])
        args.device, args.devices = "cuda", devices
        plans[len(devices)] = bench_lm.plan(args, bench_lm.all_settings(), 8, 2000 * 512, speed, 30.0)
    one, two = plans[1], plans[2]
    assert "worker start-up (allowance)" in two["fixed_s"] and "worker start-up (allowance)" not in one["fixed_s"]
    assert two["fixed_s"]["FP training (at most)"] == one["fixed_s"]["FP training (at most)"]
    assert two["fixed_s"]["quantize / lower"] < one["fixed_s"]["quantize / lower"]
    assert 1.7 * one["qat_steps"] < two["qat_steps"] < 2 * one["qat_steps"] and 500 < two["eta_s"] <= 540
    args.max_qat_steps = 50  # the cap holds
    assert bench_lm.plan(args, bench_lm.all_settings(), 8, 2000 * 512, speed, 30.0)["qat_steps"] == 50


def test_quick_run_on_two_worker_processes_gives_the_one_device_results(tmp_path):
    """--devices cpu cpu: the QAT jobs (setting x seed, AMPN seeds) on two spawned worker processes give exactly the
    one-device run's results (same FP model, same seeds; one thread each), in the same structures and tables."""
    import bench_lm
    quick = ["--quick", "--seeds", "2", "--settings", "w158a3h,w158a3h_sigma,ampn_a2", "--no-progress"]
    threads = torch.get_num_threads()
    try:
        one = bench_lm.main(quick + ["--out", str(tmp_path / "one")])
        two = bench_lm.main(quick + ["--out", str(tmp_path / "two"), "--devices", "cpu", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert one["devices"] == ["cpu"] and two["devices"] == two["provenance"]["devices"] == ["cpu", "cpu"]
    assert two["fp"]["bpb"] == one["fp"]["bpb"] and two["fp_control_bpb"] == one["fp_control_bpb"]
    assert list(two["results"]) == list(one["results"]) == ["w158a3h", "w158a3h_sigma", "ampn_a2"]
    for key, r in one["results"].items():  # exact, key order included (the JSON is written in that order)
        assert list(two["results"][key]) == list(r) and two["results"][key] == r, key
        assert r["seeds"] == [0, 1] and len(r["bpb"]) == 2
    assert two["ampn"] == one["ampn"] and two["tables"] == one["tables"]
    assert "devices cpu, cpu;" in (tmp_path / "two" / "bench_lm_quick.txt").read_text().splitlines()[1]
    assert not list((tmp_path / "two").glob(".bench_lm_fp_state*"))  # the state file for the workers is removed


def test_a_failing_worker_raises_its_traceback(tmp_path):
    """A worker that raises (here: its state file is missing) makes the main process raise with the worker's
    traceback instead of waiting for results that never come."""
    import _lm_workers as W
    import bench_lm
    args = bench_lm.parse_args(["--quick", "--devices", "cpu", "--out", str(tmp_path)])
    args.qat_steps = 1
    pool = W.Pool(args, log=lambda msg: None)
    try:
        with pytest.raises(W.WorkerError, match=r"(?s)worker cpu failed on job w158a3h seed 0.*FileNotFoundError"):
            pool.run([W.Job("setting", "w158a3h", 0)], str(tmp_path / "missing.pt"), bar=None, on_done=None)
    finally:
        pool.close()
    assert not any(p.is_alive() for p in pool.procs.values())


def test_a_lowering_failure_is_recorded_not_raised(monkeypatch):
    import _lm_report as R
    import bench_lm
    args = bench_lm.parse_args(["--quick"])
    corpus = L.load_corpus(max_train_bytes=50_000, max_val_bytes=20_000)
    val = L.eval_windows(corpus.val, args.ctx, 4)
    from _lm_settings import MAIN
    q = bench_lm.robuq_fx.quantize(L.build_model(L.QUICK, 0), bench_lm.policy(MAIN["+H"][2], 8, 64),
                                   (val[:2, :-1].long(),))

    def broken(model, **kw):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(bench_lm.robuq_fx, "lower", broken)
    g = bench_lm.lowered_gap(q, 5.0, val, args, "cpu")
    assert g["error"] == "RuntimeError: kernel exploded" and g["gap"] is None
    s = MAIN["+H"][2]
    res = {s.key: {"ptq_bpb": 5.5, "bpb": [5.0], "lowered": g}}
    outl = [{"max_over_rms": 2.0, "kurtosis": 3.0, "token_max_over_rms": 2.0, "token_kurtosis": 3.0,
             "max_over_rms_h": 2.0, "kurtosis_h": 3.0, "token_max_over_rms_h": 2.0, "token_kurtosis_h": 3.0}]
    fig = R.summary([s], res, 4.5, outl, corpus.info, {})
    assert fig["lm_lowered_gap_bpb"] is None and fig["lm_lowered_failed_settings"] == 1
    rows = R.make_tables(bench_lm.GROUPS, [s], res, 4.5, {})["lowered vs QAT, seed 0 (bound 0.01 BPB)"]
    assert rows == [{"setting": "W1.58A3 +H", "QAT BPB": "5.0000", "QAT cast BPB": "5.0000", "lowered BPB": "failed",
                     "kernels (calls)": "RuntimeError: kernel exploded"}]


def test_train_fp_restores_the_best_evaluated_weights(monkeypatch):
    """A validation curve that rises again (overfitting a small corpus) must not leave the last weights as the FP
    model: train_fp restores the weights of its best evaluation."""
    model = L.build_model({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 32}, 0)
    curve = iter([3.0, 2.0] + [2.5 + 0.125 * j for j in range(100)])  # best at step 2, then rising
    seen = {}

    def fake_bpb(m, windows, batch, device, amp=False):
        v = next(curve)
        seen[v] = {k: t.clone() for k, t in m.state_dict().items()}
        return v
    monkeypatch.setattr(L, "bpb", fake_bpb)
    stream = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    run = L.train_fp(model, stream, tokens=8 * 4 * 16, batch=4, ctx=16, lr=1e-3, seed=0, device="cpu", amp=False,
                     val=torch.zeros(1, 17, dtype=torch.uint8), eval_every=1, patience=2, log=lambda *_: None)
    assert run["restored_step"] == 2 and run["steps"] > 2
    assert all(torch.equal(t, seen[2.0][k]) for k, t in model.state_dict().items())
    assert not all(torch.equal(t, seen[run["curve"][-1]["val_bpb"]][k]) for k, t in model.state_dict().items())
