"""The compile backend's qat mode with weight_sides="step" under DDP (2 CPU processes, gloo): a compiled model inside
DDP has its Dynamo graph split by DDPOptimizer at the gradient buckets' boundaries, and each piece compiled with our
backend (on fake example inputs: it builds at the first call). Each piece then gets its own WeightSides node, so the
gradients of one bucket's weights are ready when that piece's backward is done, and DDP can all-reduce them while
the rest of the backward runs (with `weight_sides_per_forward` on a quantize model every master's gradient arrives at
the backward's end). Checked here: the pieces (more than one WeightSides plan) and the result, which equals
single-process training on the global batch up to the all-reduce's float32 rounding (the bounds of
tests/test_distributed.py). Not measured here: speed.
"""
from __future__ import annotations

import copy
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import robuq_fx.backend as B
from robuq_fx.backend import weight_sides

WORLD, STEPS = 2, 3
POLICY = {"rules": [{"type": "Linear", "w_bits": 1.58, "a_bits": 4, "hadamard": True, "lora_rank": 4}]}


def _net() -> nn.Module:
    torch.manual_seed(0)
    # ~1 MB a layer: DDP's first bucket holds 1 MB (torch.distributed's default), and DDPOptimizer refuses later ones
    # smaller than that, so buckets of 1 MB put each layer in its own
    return nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 512, generator=g), torch.randn(8, 512, generator=g)


def _train(model, compiled, x, y) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(compiled(x), y).backward()
        opt.step()


def _backend():
    return B.make_backend(POLICY, mode="qat", compiler="aot_eager", weight_sides="step")


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        plans = []
        real = weight_sides.GraphSides.make.__func__

        def counted(cls, *a, **kw):
            sides = real(cls, *a, **kw)
            if sides is not None:
                plans.append(len(sides.plan.layers))
            return sides
        weight_sides.GraphSides.make = classmethod(counted)
        model = B.prepare_qat(_net().train(), POLICY)
        # DDP around the compiled model (DDPOptimizer then splits its graph wherever a bucket fills, and compiles each
        # piece on fake inputs: the backend builds at the first call). torch.compile(DDP(model)) never called a
        # backend here (torch 2.13, gloo): the model would train unquantized
        torch._dynamo.reset()
        ddp = nn.parallel.DistributedDataParallel(torch.compile(model, backend=_backend()), bucket_cap_mb=1)
        x, y = _data()
        half = slice(rank * 4, rank * 4 + 4)
        _train(model, ddp, x[half], y[half])
        if rank == 0:
            torch.save({"state": model.state_dict(), "plans": plans}, out)
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_ddp_compiled_qat_with_step_weight_sides_matches_one_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    # spawn, not fork: a process that compiled with Inductor before (other tests) holds its worker pool's threads,
    # and a forked child deadlocked on them
    ctx = mp.get_context("spawn")
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, port, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = torch.load(out)
    # single process, global batch (the mean loss over 8 samples = the mean of the two ranks' means)
    ref = B.prepare_qat(_net().train(), POLICY)
    x, y = _data()
    torch._dynamo.reset()
    _train(ref, torch.compile(ref, backend=_backend()), x, y)
    torch._dynamo.reset()
    assert len(got["plans"]) > 1, got["plans"]  # the graph split into pieces, each with its own WeightSides node
    assert sum(got["plans"]) >= 3, got["plans"]  # every quantized layer in some piece
    want = ref.state_dict()
    assert got["state"].keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_the_reference_trains():
    """The single-process reference above moves every trainable tensor (a test that cannot fail otherwise)."""
    ref = B.prepare_qat(_net().train(), POLICY)
    before = copy.deepcopy(ref.state_dict())
    x, y = _data()
    torch._dynamo.reset()
    _train(ref, torch.compile(ref, backend=_backend()), x, y)
    torch._dynamo.reset()
    moved = [k for k, v in ref.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) == len(before), sorted(set(before) - set(moved))


if __name__ == "__main__":  # (run it by hand: python tests/test_backend_ddp.py)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    pytest.main([__file__, "-q"])
