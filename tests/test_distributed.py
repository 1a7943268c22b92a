"""Distributed QAT: DDP and FSDP2 (robuq_fx.distributed, examples/qat_distributed.py) on 2 CPU processes (gloo)
against single-process training on the same global batch.

Models: a small MLP-like net with a `blocks` ModuleList, through `robuq_fx.quantize` (the drop-in form: the net
with QATLinear layers, sharded per block as it is), through `robuq_fx.quantize(..., whole_graph=True)` (a flat FX
GraphModule: FSDP2 needs `robuq_fx.distributed.shard` to regroup it per block) and through the seed API
(`replace_linear_layer`: eager RobuQLinear modules); and the tiny diffusers DiT of the example (drop-in form, FSDP2
per transformer block). Every run: 4 steps, global batch 8, each rank trains on its half.

Tolerances, and why they are not zero: the single process sums the gradient over the 8 samples inside one GEMM; a
distributed run sums 4 per rank, then adds the two halves in the all-reduce (DDP) or reduce-scatter (FSDP2), and
divides by the world size before or after that sum. That changes float32 rounding (~1 ulp of a gradient) and
nothing else: the forward sees the same full weights (FSDP2 all-gathers them exactly) and the same samples.
After 4 SGD steps the weights agree to |d| <= 1e-6 + 1e-5 |w| (measured: |d| <= 3e-8) and the global-batch losses
to a relative 1e-6 (measured: <= 1.2e-7). Packed codes are compared byte for byte; a weight that sits on a
rounding threshold (|R/s| within 1e-3 of k + 1/2) may flip between runs, so such flips are allowed, at most 0.1 % of
a layer's codes, and counted (measured: none).

The worker processes are forked (torch.multiprocessing, start_method="fork") from this process after the models
are built: they inherit the captured models, which saves each child ~10 s of imports and ~10 s of torch.export
capture on 2 cores. `test_example_torchrun_*` runs the example script itself through torchrun (2 fresh processes).
Rendezvous: TCP on 127.0.0.1 only, on a port found by binding port 0.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import robuq_fx
from robuq_fx import distributed as rdist
from robuq_fx import layer
from robuq_fx import quantizers as Q
from robuq_fx.passes.lower import packed_path
from robuq_fx.spec import LayerSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "qat_distributed.py"
WORLD = 2
WORKER_TIMEOUT_S = 150  # whole fork run (5 trainings); it takes ~10 s on 2 idle cores
TORCHRUN_TIMEOUT_S = 150
LOSS_RTOL = 1e-6
W_ATOL, W_RTOL = 1e-6, 1e-5
FLIP_MARGIN, MAX_FLIP_FRACTION = 1e-3, 1e-3
JOBS = [("module_mlp", "ddp"), ("module_mlp", "fsdp2"), ("graph_mlp", "ddp"), ("graph_mlp", "fsdp2"), ("seed_mlp", "ddp"),
        ("seed_mlp", "fsdp2"), ("dit", "fsdp2"),
        # Q_w(R) cached between optimizer steps: must stay exact under FSDP2's in-place all-gathers
        ("module_mlp", "fsdp2+step-cache")]


def _load_example():
    spec = importlib.util.spec_from_file_location("qat_distributed_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ex = _load_example()
# torch.export GraphModules deep-copy through a pytree spec torch 2.13 itself flags as deprecated
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


# ---- models ---------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class Net(nn.Module):
    """16 -> 32, two residual MLP blocks, -> 8. No dropout: ranks draw different dropout masks than one process."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(16, 32)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        x = F.gelu(self.proj_in(x))  # not proj_in straight into fc1: robuq_fx.lower fails on b(a(x)) (KeyError)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def build_net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


POLICY = {"rules": [{"match": "head", "w_bits": 4, "a_bits": 8},
                    {"type": "Linear", "w_bits": 1.58, "a_bits": 4, "hadamard": True, "lora_rank": 4}]}
SEED_KW = dict(nbits=4, w_bits=1.58, if_hadamard=True, if_lora=True, lora_rank=4)
MLP_ARGS = SimpleNamespace(steps=4, batch=8, optim="sgd", lr=0.05, seed=0)
# SGD, not the example's default AdamW: an SGD update is linear in the gradient, so a 1-ulp gradient difference stays
# ~1 ulp in the weight. Adam divides by sqrt(v) and so amplifies the rounding of near-zero gradients: a property of
# Adam, not of the engines.
DIT_FLAGS = ["--optim", "sgd", "--lr", "0.01"]


def mlp_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    return {"x": torch.randn(8, 16, generator=g), "y": torch.randn(8, 8, generator=g)}


def mlp_loss(model, b):
    return F.mse_loss(model(b["x"]), b["y"])


def graph_layers(model) -> dict[str, tuple[nn.Module, LayerSpec]]:
    """{layer: (module holding weight / lrb_down / lrb_up, spec)} of a quantize() model."""
    return {n: (model.get_submodule(n), LayerSpec(**d)) for n, d in robuq_fx.robuq_info(model)["layers"].items()}


def seed_layers(model) -> dict[str, tuple[nn.Module, LayerSpec]]:
    return {n: (m, m.spec) for n, m in model.named_modules() if isinstance(m, robuq_fx.RobuQLinear)}


def lower_fresh(whole_graph: bool) -> Callable[[dict], dict[str, nn.Module]]:
    def run(state: dict) -> dict[str, nn.Module]:
        """What a user does with the gathered checkpoint: a fresh FP model (another random init), QAT structure
        without SVD, load, lower. Returns {layer: PackedLinear}."""
        q = robuq_fx.quantize(build_net(seed=1), POLICY, init_lrb=False, whole_graph=whole_graph)
        q.load_state_dict(state)
        lowered = robuq_fx.lower(q)
        return {n: lowered.get_submodule(packed_path(n)) for n in robuq_fx.robuq_info(lowered)["layers"]}
    return run


def lower_seed_fresh(state: dict) -> dict[str, nn.Module]:
    m = robuq_fx.replace_linear_layer(build_net(seed=1), **SEED_KW)
    m.load_state_dict(state)
    out = {}
    for n, mod in seed_layers(m).items():
        out[n] = mod[0].prepare_for_inference().packed
    return out


@dataclass
class Case:
    qmodel: nn.Module  # untrained QAT model, deep-copied for every run
    make_batch: Callable[[int], dict]
    loss: Callable
    args: SimpleNamespace
    layers: Callable  # model -> {layer: (module, spec)}
    lower_state: Callable  # full state dict -> {layer: PackedLinear}


def build_cases() -> dict[str, Case]:
    dit_args = ex.parse_args(DIT_FLAGS)  # test_example_torchrun_* runs the script with exactly these
    fp = ex.build_model(dit_args)
    dit = robuq_fx.quantize(fp, ex.build_policy(dit_args), ex.example_inputs(dit_args))

    def lower_dit(state):
        # the fresh-model path (another torch.export capture, ~10 s) is what the MLP case and the torchrun test do;
        # here a copy of the untrained structure takes the state
        q = copy.deepcopy(dit)
        q.load_state_dict(state)
        lowered = robuq_fx.lower(q, fuse=False)  # one PackedLinear per layer (to_q/k/v are not fused)
        return {n: lowered.get_submodule(packed_path(n)) for n in robuq_fx.robuq_info(lowered)["layers"]}

    return {
        "module_mlp": Case(robuq_fx.quantize(build_net(0), POLICY), mlp_batch, mlp_loss, MLP_ARGS, graph_layers,
                           lower_fresh(False)),
        "graph_mlp": Case(robuq_fx.quantize(build_net(0), POLICY, whole_graph=True), mlp_batch, mlp_loss, MLP_ARGS,
                          graph_layers, lower_fresh(True)),
        "seed_mlp": Case(robuq_fx.replace_linear_layer(build_net(0), **SEED_KW), mlp_batch, mlp_loss, MLP_ARGS,
                         seed_layers, lower_seed_fresh),
        "dit": Case(dit, lambda step: ex.global_batch(fp.config, dit_args.batch, step, dit_args.seed), ex.loss_fn,
                    dit_args, graph_layers, lower_dit),
    }


# ---- runs -----------------------------------------------------------------------------------------------------------
_CASES: dict[str, Case] = {}  # set before forking: the workers inherit it
CPU = torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                           timeout=timedelta(seconds=60))
    seen: list = []
    real = Q.fake_quant_weight

    def spy(r, *a, **k):  # what robuq::fake_quant_weight is handed inside forward
        seen.append((type(r).__name__, tuple(r.shape)))
        return real(r, *a, **k)

    Q.fake_quant_weight = spy
    try:
        for name, engine in JOBS:
            case = _CASES[name]
            base, _, variant = engine.partition("+")
            model = ex.wrap(copy.deepcopy(case.qmodel), base, CPU)
            params = {n: p for n, p in model.named_parameters()}
            shards = {n: (type(p).__name__, [_placement(x) for x in getattr(p, "placements", ())],
                          tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape), tuple(p.shape))
                      for n, p in params.items()}
            seen.clear()
            args = copy.copy(case.args)
            args.weights_once_per_step = variant == "step-cache"
            losses = ex.train(model, case.make_batch, case.loss, args, rank, WORLD, CPU)
            fq_inputs = sorted(set(seen))
            state = ex.gather_state(model, base)
            skipped = getattr(getattr(model, "module", model), "_robuq_fsdp_skipped", None)
            if rank == 0:
                torch.save({"losses": losses, "state": state, "shards": shards, "fq_inputs": fq_inputs,
                            "skipped": skipped}, Path(out_dir) / f"{name}-{engine}.pt")
    finally:
        Q.fake_quant_weight = real
        dist.destroy_process_group()


def _placement(x) -> str:
    from torch.distributed.tensor import Shard
    return f"Shard({x.dim})" if isinstance(x, Shard) else type(x).__name__


def _run_workers(out_dir: Path) -> None:
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False,
                             start_method="fork")
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish in {WORKER_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        _CASES.update(build_cases())
        ref = {}
        for name, case in _CASES.items():
            model = copy.deepcopy(case.qmodel)
            losses = ex.train(model, case.make_batch, case.loss, case.args, 0, 1, CPU)
            ref[name] = {"losses": losses, "model": model,
                         "state": {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                   for k, v in model.state_dict().items()}}
        out = tmp_path_factory.mktemp("distributed")
        t1 = time.perf_counter()
        _run_workers(out)
        t2 = time.perf_counter()
        got = {(n, e): torch.load(out / f"{n}-{e}.pt", weights_only=False) for n, e in JOBS}
        print(f"\nbuild + reference {t1 - t0:.1f} s, {len(JOBS)} distributed runs (2 forked ranks) {t2 - t1:.1f} s")
        yield {"ref": ref, "got": got}
    finally:
        torch.set_num_threads(threads)
        _CASES.clear()


# ---- tests ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,engine", JOBS)
def test_loss_curve_matches_single_process(runs, name, engine):
    ref, got = runs["ref"][name]["losses"], runs["got"][(name, engine)]["losses"]
    assert len(got) == len(ref) == 4
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                               rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("name,engine", JOBS)
def test_final_weights_match_single_process(runs, name, engine):
    ref, got = runs["ref"][name]["state"], runs["got"][(name, engine)]["state"]
    assert set(got) == set(ref)  # gathered full state dict: plain keys (no DDP "module."), grouping changes none
    moved = 0
    for k, v in ref.items():
        if not isinstance(v, torch.Tensor):
            continue
        assert not hasattr(got[k], "placements"), f"{k}: gathered state is still a DTensor"
        torch.testing.assert_close(got[k], v, atol=W_ATOL, rtol=W_RTOL, msg=lambda m: f"{k}: {m}")
        if k.endswith(("weight", "lrb_down", "lrb_up")):
            init = _CASES[name].qmodel.state_dict()[k]
            moved += int(not torch.equal(v, init))
    assert moved > 0, "training did not change the weights: the comparison would be vacuous"


@pytest.mark.parametrize("name", ["module_mlp", "graph_mlp", "seed_mlp", "dit"])
def test_fsdp2_shards_params_and_ops_see_full_weights(runs, name):
    r = runs["got"][(name, "fsdp2")]
    assert r["skipped"] in (None, {})  # every block got its own FSDP group
    shards = r["shards"]
    lrb = [n for n in shards if n.endswith(("lrb_down", "lrb_up"))]
    assert lrb, "no LRB parameters"
    for n, (kind, placements, local, full) in shards.items():
        assert kind == "DTensor" and placements == ["Shard(0)"], (n, kind, placements)
        assert local[0] == -(-full[0] // WORLD) and local[1:] == full[1:], (n, local, full)  # rank 0's rows
    # robuq::fake_quant_weight got plain tensors of the full (N, K) weight: per-channel scales see whole rows
    case = _CASES[name]
    full = {tuple(m.weight.shape) for m, _ in case.layers(case.qmodel).values()}
    assert {t for t, _ in r["fq_inputs"]} == {"Tensor"}
    assert {s for _, s in r["fq_inputs"]} == full


@pytest.mark.parametrize("name,engine", JOBS)
def test_checkpoint_lowers_to_same_packed_weights(runs, name, engine):
    ref_model = runs["ref"][name]["model"]
    case = _CASES[name]
    want = case.lower_state(runs["ref"][name]["state"])
    have = case.lower_state(runs["got"][(name, engine)]["state"])
    residuals = {n: layer.residual(m.weight.detach(), getattr(m, "lrb_down", None), getattr(m, "lrb_up", None), s)
                 for n, (m, s) in case.layers(ref_model).items()}
    assert set(want) == set(have) == set(residuals)
    flips = 0
    for n in want:
        a, b = want[n], have[n]
        torch.testing.assert_close(b.w_scale, a.w_scale, rtol=W_RTOL, atol=0)
        flips += _assert_same_codes(a, b.qweight, residuals[n], n)
    assert flips == 0 or flips <= MAX_FLIP_FRACTION * sum(w.qweight.numel() for w in want.values())


def _assert_same_codes(ref, qweight: torch.Tensor, residual: torch.Tensor, name: str) -> int:
    """`qweight` byte-equal to `ref.qweight` (a PackedLinear), or differing only in codes whose R/s (from the
    single-process residual R) is within FLIP_MARGIN of a rounding threshold. Returns the number of flips."""
    if torch.equal(ref.qweight, qweight):
        return 0
    from robuq_fx import packing
    ca = ref.weight_codes()
    cb = packing.unpack(qweight, ref.spec.w_bits, (ref.out_features, ref.in_features))
    diff = ca != cb
    s = Q.dequantize_weight(torch.ones_like(ca), ref.w_scale, torch.float32)
    x = (residual.float() / s).abs()
    margin = ((x - x.floor()) - 0.5).abs()
    assert (margin[diff] < FLIP_MARGIN).all(), f"{name}: codes differ away from a rounding threshold"
    assert diff.float().mean() <= MAX_FLIP_FRACTION, f"{name}: {int(diff.sum())} codes flipped"
    return int(diff.sum())


def test_example_torchrun_fsdp2_matches_reference(runs, tmp_path):
    """The example script as a user runs it: torchrun, 2 ranks, FSDP2, full state gathered on rank 0, then
    quantize(fresh DiT, init_lrb=False) + load_state_dict + lower + save_quantized on rank 0."""
    packed, res = tmp_path / "dit.safetensors", tmp_path / "run.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", str(EXAMPLE), "--engine", "fsdp2", "--threads", "1", *DIT_FLAGS,
           "--save-packed", str(packed), "--json", str(res)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(res.read_text())
    assert out["world"] == WORLD and out["engine"] == "fsdp2"
    torch.testing.assert_close(torch.tensor(out["losses"], dtype=torch.float64),
                               torch.tensor(runs["ref"]["dit"]["losses"], dtype=torch.float64), rtol=LOSS_RTOL, atol=0)
    from safetensors.torch import load_file
    file = load_file(str(packed))
    case = _CASES["dit"]
    want = case.lower_state(runs["ref"]["dit"]["state"])
    for n, (m, spec) in case.layers(runs["ref"]["dit"]["model"]).items():
        a = want[n]
        torch.testing.assert_close(file[f"{packed_path(n)}.w_scale"], a.w_scale, rtol=W_RTOL, atol=0)
        r = layer.residual(m.weight.detach(), getattr(m, "lrb_down", None), getattr(m, "lrb_up", None), spec)
        _assert_same_codes(a, file[f"{packed_path(n)}.qweight"], r, n)


@pytest.mark.parametrize("compile_mode", ["backend", "inductor", "regional"])
def test_example_torchrun_ddp_compiled_matches_reference(runs, tmp_path, compile_mode):
    """`--compile backend`: prepare_qat and DDP around torch.compile(model, backend=robuq_fx.backend(policy,
    mode="qat", weight_sides="step")); `--compile inductor`: quantize() and torch.compile(DDP(qmodel)), each QAT layer
    computing its own weight side; `--compile regional`: compile_repeated_blocks(qmodel) and DDP around it
    (AOTAutograd alone here for all: Inductor's CPU compile would take minutes a rank).
    The global-batch losses follow the single-process quantize run's: rtol 1e-5, not 1e-6, since the compiled graph
    pieces sum in another order than the eager layers (measured ~2e-6); the gathered state loads into a fresh
    quantize() model and lowers."""
    packed, res = tmp_path / "dit.safetensors", tmp_path / "run.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", str(EXAMPLE), "--engine", "ddp", "--compile", compile_mode, "--compiler",
           "aot_eager", "--threads", "1", *DIT_FLAGS, "--save-packed", str(packed), "--json", str(res)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(res.read_text())
    assert (out["world"], out["engine"], out["compile"]) == (WORLD, "ddp", compile_mode)
    assert out["dynamo_graphs"] > 0
    if compile_mode == "regional":  # the tiny DiT's two blocks, compiled in place before DDP wrapped the model
        assert out["compiled_blocks"] == ["transformer_blocks.0", "transformer_blocks.1"]
    torch.testing.assert_close(torch.tensor(out["losses"], dtype=torch.float64),
                               torch.tensor(runs["ref"]["dit"]["losses"], dtype=torch.float64), rtol=1e-5, atol=0)
    assert packed.stat().st_size > 0


def test_example_autocast_choice(tmp_path):
    """--autocast: bf16 on CUDA by default (as DiT trains and bench_dit times), none on the CPU; --autocast bf16 on the
    CPU runs the forward in bf16 for real: the losses move off the fp32 run's by bf16 rounding, not by nothing."""
    from argparse import Namespace as N
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [ex.bf16_forward(N(autocast=a), d) for a in ("auto", "bf16", "none") for d in (cpu, cuda)] == \
        [False, True, True, True, False, False]
    runs = {}
    for mode in ("none", "bf16"):
        out = tmp_path / f"{mode}.json"
        ex.main(["--engine", "none", "--autocast", mode, "--steps", "2", "--device", "cpu", "--json", str(out)])
        runs[mode] = json.loads(out.read_text())
    assert (runs["none"]["autocast_bf16"], runs["bf16"]["autocast_bf16"]) == (False, True)
    a, b = (torch.tensor(runs[m]["losses"], dtype=torch.float64) for m in ("none", "bf16"))
    assert not torch.equal(a, b) and torch.allclose(a, b, rtol=2e-2)


def test_example_comm_hook_refuses_what_it_cannot_run():
    """--comm-hook bf16 is DDP's (torch's bf16_compress_hook) and NCCL's: a clear error, before any process group."""
    import torch.distributed as dist
    with pytest.raises(SystemExit, match="with --engine ddp"):
        ex.main(["--engine", "none", "--comm-hook", "bf16"])
    with pytest.raises(SystemExit, match="CUDA ranks only"):
        ex.main(["--engine", "ddp", "--comm-hook", "bf16", "--device", "cpu"])
    assert not dist.is_initialized()


# ---- group_blocks on one process -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["graph_mlp"])
def test_group_blocks_is_exact_and_keeps_state_dict_keys(runs, name):
    """Regrouping a flat QAT graph per block (what FSDP2 needs) changes no number: forward and every gradient are
    bit-identical, and the state dict has the same keys, order and tensors."""
    case = _CASES[name]
    flat = copy.deepcopy(case.qmodel)
    grouped = copy.deepcopy(case.qmodel)
    blocks = rdist.block_names(grouped)
    done, skipped = rdist.group_blocks(grouped, blocks)
    assert done == blocks and skipped == {}
    assert all(isinstance(grouped.get_submodule(b), torch.fx.GraphModule) for b in blocks)
    a, b = flat.state_dict(), grouped.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    batch = case.make_batch(0)
    flat.train()
    grouped.train()
    la, lb = case.loss(flat, batch), case.loss(grouped, batch)
    assert torch.equal(la, lb)
    la.backward()
    lb.backward()
    ga, gb = dict(flat.named_parameters()), dict(grouped.named_parameters())
    assert all(torch.equal(ga[k].grad, gb[k].grad) for k in ga)


class SharedNet(Net):
    """blocks.0.fc1's weight is read again by the root (a tied weight); blocks.1.fc2 runs again after the head's
    input is ready (a second call outside its block that depends on the block's own output)."""

    def forward(self, x):
        x = F.gelu(self.proj_in(x))
        x = self.blocks[0](x) + F.linear(x, self.blocks[0].fc1.weight[:32, :32])
        x = self.blocks[1](x)
        return self.head(self.blocks[1].fc2(torch.cat([x, x], -1)))


def test_group_blocks_leaves_blocks_it_cannot_move_in_the_root():
    torch.manual_seed(0)
    flat = robuq_fx.quantize(SharedNet(), POLICY, whole_graph=True)
    q = copy.deepcopy(flat)
    done, skipped = rdist.group_blocks(q, ["blocks.0", "blocks.1"])
    assert done == [] and set(skipped) == {"blocks.0", "blocks.1"}
    assert "used outside the block" in skipped["blocks.0"]
    assert "dependency cycle" in skipped["blocks.1"]
    x = torch.randn(4, 16)
    assert torch.equal(q(x), flat(x))  # untouched


def test_bench_ddp_quick_run(tmp_path):
    """benchmarks/bench_ddp.py --quick (CPU, 2 gloo processes): one row per engine, weak scaling (the global batch
    grows with the processes), steady step times from the example's per-step timings, losses finite."""
    spec = importlib.util.spec_from_file_location("bench_ddp", ROOT / "benchmarks" / "bench_ddp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--quick", "--out", str(tmp_path)])
    assert [r["engine"] for r in rows] == ["none", "ddp"]
    assert rows[1]["global batch"] == 2 * rows[0]["global batch"]
    assert all(r["steady step ms"] > 0 and math.isfinite(r["final loss"]) for r in rows)
    saved = json.loads((tmp_path / "bench_ddp_quick.json").read_text())
    assert all(len(r["step_s"]) == 4 for r in saved["runs"])
    assert rows[1]["x one process"] == round(rows[1]["samples/s"] / rows[0]["samples/s"], 3)
