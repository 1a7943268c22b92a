"""Distributed RobuQ QAT of a DiT with torch's own engines (DDP, FSDP2), launched by torchrun.

    torchrun --nproc-per-node 2 examples/qat_distributed.py --engine fsdp2      # CPU: gloo, tiny DiT, 4 steps
    torchrun --nproc-per-node 2 examples/qat_distributed.py --engine ddp
    python examples/qat_distributed.py --engine none                            # the single-process reference
    torchrun --nproc-per-node 8 examples/qat_distributed.py --model dit-xl-2 --engine fsdp2 --batch 64 \\
        --steps 100 --save-packed dit_xl2_w158a4.safetensors                    # N GPUs: nccl, one GPU a rank

Every rank draws the same synthetic global batch (DiT noise-prediction loss on random latents, timesteps and class
labels; seeded) and trains on its own equal slice, so DDP / FSDP2 / none see the same data and the loss curves
agree up to all-reduce summation order. On GPUs the forward runs under bf16 autocast (fp32 masters; `--autocast none`
for fp32). The QAT model is `robuq_fx.quantize(DiT, policy, example_inputs)`;
FSDP2 shards each transformer block, then the root (`robuq_fx.distributed.shard`). At the end the full state dict
is gathered on rank 0 (`--save-state`); `--save-packed PATH` then rebuilds the QAT structure on a fresh model
(`quantize(..., init_lrb=False)`), loads that state dict, lowers it and writes a packed checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import robuq_fx  # noqa: E402
import robuq_fx.models  # noqa: E402
from robuq_fx import distributed as rdist  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

MODELS = ["dit-tiny", "dit-xl-2"]  # robuq_fx.models: diffusers DiTTransformer2DModel, random init
TRAIN_TIMESTEPS = 1000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--engine", choices=["ddp", "fsdp2", "none"], default="fsdp2",
                   help="DistributedDataParallel, FSDP2 fully_shard per block, or a plain single process")
    p.add_argument("--model", choices=MODELS, default="dit-tiny",
                   help="dit-tiny: 2 blocks x 64 wide, 8x8 latents; dit-xl-2: 28 x 1152, 32x32 latents (random init)")
    p.add_argument("--pretrained", metavar="DIR", help="load DiT weights from a local diffusers checkpoint dir "
                   "(e.g. a facebook/DiT-XL-2-256 snapshot; its 'transformer' subfolder) instead of random init; "
                   "--model still sets the capture inputs' shapes (dit-xl-2 for that one)")
    p.add_argument("--policy", default="dit-xl-2-robuq", help="policy name or file (default: the paper's "
                   "W1.58A4 + Hadamard + LRB setting; for dit-tiny the LRB rank is cut to --tiny-rank)")
    p.add_argument("--tiny-rank", type=int, default=4, help="LRB rank for dit-tiny (the paper's rank 32 is half "
                   "the width of its 64-wide layers: most of each weight would stay in full precision)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compile", choices=["off", "backend", "inductor", "regional", "regional-cg"], default="off",
                   help="backend: no quantize(); prepare_qat + torch.compile(model, backend=robuq_fx.backend(policy, "
                        "mode='qat', weight_sides='step')), inside DDP (each gradient bucket's piece of the graph "
                        "computes its weight sides itself, which keeps DDP's all-reduce overlapped); inductor: "
                        "quantize(), then torch.compile(DDP(qmodel)) (Dynamo splits the graph at DDP's buckets; each "
                        "QAT layer computes its own weight side in it); regional: quantize(), then "
                        "robuq_fx.compile_repeated_blocks(qmodel) before DDP wraps it (every block compiled in place, "
                        "one graph for all; DDP's hooks see the parameters as eagerly, so its all-reduce overlaps the "
                        "backward); regional-cg: the same with mode='reduce-overhead' (per-block CUDA graphs, "
                        "Inductor only); ddp / none only")
    p.add_argument("--compiler", choices=["inductor", "aot_eager"], default="inductor",
                   help="with --compile: Inductor, or AOTAutograd alone (a quick CPU run)")
    p.add_argument("--weights-once-per-step", action="store_true",
                   help="compute each layer's Q_w(R) once per optimizer step (robuq_fx.quantize_weights_once_per_step)")
    p.add_argument("--batch", type=int, default=8, help="global batch size (split evenly over ranks)")
    p.add_argument("--optim", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0, help="model init and data seed (the same on every rank)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda (nccl) when available, else cpu (gloo)")
    p.add_argument("--autocast", choices=["auto", "bf16", "none"], default="auto",
                   help="the forward under torch.autocast in bf16 (fp32 master weights, as DiT trains); auto: bf16 "
                        "on CUDA, none on the CPU")
    p.add_argument("--comm-hook", choices=["none", "bf16"], default="none",
                   help="DDP: bf16 all-reduces the gradients in bf16 (torch's bf16_compress_hook: half the bytes on "
                        "the wire, for links slower than NVLink; the masters and optimizer stay fp32)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (0: leave torch's default)")
    p.add_argument("--save-state", metavar="PATH", help="rank 0: torch.save the gathered full state dict here")
    p.add_argument("--save-packed", metavar="PATH", help="rank 0: quantize a fresh model, load the gathered state, "
                   "lower and save_quantized here (.safetensors)")
    p.add_argument("--json", metavar="PATH", help="rank 0: write losses and timings as JSON")
    return p.parse_args(argv)


# ---- model, policy, data --------------------------------------------------------------------------------------------
def build_model(args, seed: int | None = None):
    seed = args.seed if seed is None else seed
    if args.pretrained:
        from diffusers import DiTTransformer2DModel
        return DiTTransformer2DModel.from_pretrained(args.pretrained, subfolder="transformer")
    # DiT's class-label dropout (classifier-free guidance, p=0.1) draws random numbers in train mode: each rank
    # would draw its own, so N ranks would not reproduce one process. Off here (the whole-graph form never ran it:
    # torch.export captures eval mode); replace labels by the null class in the data pipeline if you need it.
    model = robuq_fx.models.build(args.model, seed=seed)
    for mod in model.modules():
        if type(mod).__name__ == "LabelEmbedding":
            mod.dropout_prob = 0.0
    return model


def build_policy(args) -> robuq_fx.Policy:
    policy = robuq_fx.Policy.coerce(args.policy)
    if args.model != "dit-tiny" or args.pretrained:
        return policy
    d = policy.to_dict()
    for rule in d["rules"]:
        if rule.get("lora_rank"):
            rule["lora_rank"] = args.tiny_rank
    return robuq_fx.Policy.from_dict(d, source=f"{args.policy} (dit-tiny: lora_rank {args.tiny_rank})")


def example_inputs(args, device="cpu") -> dict:
    inputs = robuq_fx.models.example_inputs(args.model, batch=2)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def global_batch(model_config, batch: int, step: int, seed: int) -> dict:
    """The same synthetic DDPM training batch on every rank: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, target eps
    (linear beta schedule 1e-4 .. 0.02 over 1000 steps, as in DiT)."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    c, s = model_config.in_channels, model_config.sample_size
    x0 = torch.randn(batch, c, s, s, generator=g)
    eps = torch.randn(batch, c, s, s, generator=g)
    t = torch.randint(0, TRAIN_TIMESTEPS, (batch,), generator=g)
    y = torch.randint(0, model_config.num_embeds_ada_norm, (batch,), generator=g)
    betas = torch.linspace(1e-4, 0.02, TRAIN_TIMESTEPS, dtype=torch.float64)
    a = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    return {"x_t": a.sqrt() * x0 + (1 - a).sqrt() * eps, "t": t, "y": y, "eps": eps}


def loss_fn(model, b: dict) -> torch.Tensor:
    out = model(hidden_states=b["x_t"], timestep=b["t"], class_labels=b["y"], return_dict=False)[0]
    c = b["eps"].shape[1]
    return F.mse_loss(out[:, :c], b["eps"])  # learn_sigma models (DiT-XL/2) also predict variances: not trained here


# ---- distributed plumbing -------------------------------------------------------------------------------------------
def on_cuda(args) -> bool:
    """Whether the ranks train on GPUs (`--device`)."""
    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


def setup(args) -> tuple[int, int, torch.device]:
    """Process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT); none for --engine none."""
    use_cuda = on_cuda(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.engine == "none":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("--engine none is the single-process reference: run it with python, not torchrun")
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    if "RANK" not in os.environ:
        raise SystemExit(f"--engine {args.engine} needs torchrun (or RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set)")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def wrap(qmodel, engine: str, device: torch.device, comm_hook: str = "none"):
    qmodel.to(device)
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel(qmodel, device_ids=[device.index] if device.type == "cuda" else None)
        if comm_hook == "bf16":  # gradients all-reduced in bf16 (half the bytes), back to fp32 in the buckets
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
            ddp.register_comm_hook(None, bf16_compress_hook)
        return ddp
    if engine == "fsdp2":
        return rdist.shard(qmodel)
    return qmodel


def bf16_forward(args, device: torch.device) -> bool:
    """Whether the forward runs under bf16 autocast (`--autocast`)."""
    mode = getattr(args, "autocast", "none")
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


def autocast(args, device: torch.device):
    """The forward's autocast context (`--autocast`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_forward(args, device))


def make_optimizer(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optim == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)


def train(model, make_batch, loss, args, rank: int, world: int, device: torch.device,
          step_s: list[float] | None = None) -> list[float]:
    """`args.steps` steps of `loss(model, slice)` on this rank's slice of `make_batch(step)` (a dict of global-batch
    tensors, the same on every rank); returns each step's global-batch loss (the mean of the ranks' slice losses).
    step_s: a list that gets each step's wall time."""
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must divide evenly over {world} ranks")
    local = args.batch // world
    opt = make_optimizer(model, args)
    # Q_w(R) once per optimizer step (eager QAT): pays off with gradient accumulation; keyed on the steps, so it
    # stays exact under FSDP2, whose all-gathers rewrite the unsharded weights without moving their versions
    cache = robuq_fx.quantize_weights_once_per_step(opt) if getattr(args, "weights_once_per_step", False) else None
    model.train()
    losses = []
    for step in range(args.steps):
        t = time.perf_counter()
        b = {k: v[rank * local:(rank + 1) * local].to(device) for k, v in make_batch(step).items()}
        if getattr(args, "compile", "off") == "regional-cg":
            torch.compiler.cudagraph_mark_step_begin()  # (a new step: the last one's graph outputs may be reused)
        with autocast(args, device):
            value = loss(model, b)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        seen = value.detach().clone()
        if world > 1:
            dist.all_reduce(seen)  # equal slices: the mean of slice means is the global-batch mean
            seen /= world
        losses.append(seen.item())  # waits for the step (and the other ranks): the step time below is the step's
        if step_s is not None:
            step_s.append(time.perf_counter() - t)
    if cache is not None:
        cache.remove()
    return losses


def steady_step_s(step_s: list[float]) -> float:
    """Median step time without the first steps (compilation, allocator and communicator warm-up)."""
    skip = min(2, len(step_s) - 1)
    return statistics.median(step_s[skip:])


def gather_state(model, engine: str) -> dict:
    """Full state dict on CPU on rank 0 ({} elsewhere); a collective for ddp / fsdp2."""
    if engine == "none":
        return {k.removeprefix("_orig_mod."): v.detach().cpu() for k, v in model.state_dict().items()}
    return rdist.full_state_dict(model)


def save_packed(state: dict, args, path) -> Path:
    """Rank 0: what a user does with the checkpoint later, on another machine: fresh model -> QAT structure (no SVD)
    -> load the trained state -> lower -> packed safetensors."""
    fresh = build_model(args, seed=args.seed + 1)  # a different random init: nothing may come from it
    qmodel = robuq_fx.quantize(fresh, build_policy(args), example_inputs(args), init_lrb=False)
    qmodel.load_state_dict(state)
    return robuq_fx.save_quantized(robuq_fx.lower(qmodel), path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.comm_hook != "none" and args.engine != "ddp":
        raise SystemExit(f"--comm-hook {args.comm_hook}: a DDP communication hook, with --engine ddp")
    if args.comm_hook == "bf16" and not on_cuda(args):
        raise SystemExit("--comm-hook bf16: torch's bf16_compress_hook all-reduces through NCCL: CUDA ranks only")
    rank, world, device = setup(args)
    blocks: list[str] = []
    t0 = time.perf_counter()
    # Capture on the training device: torch.export records device-checking asserts and constants in the graph.
    model = build_model(args).to(device)
    policy = build_policy(args)
    if args.compile == "backend":
        if args.engine == "fsdp2":
            raise SystemExit("--compile backend: with --engine ddp or none (FSDP2 shards the masters its weight "
                             "sides need whole)")
        qmodel = robuq_fx.backend.prepare_qat(model, policy)  # your model, with the trainable branch
        t_quant = time.perf_counter() - t0
        # DDP around the compiled model: torch.compile(DDP(model)) did not call the backend (it trained unquantized)
        engine_model = wrap(torch.compile(qmodel, backend=robuq_fx.backend(
            policy, mode="qat", weight_sides="step", compiler=args.compiler)), args.engine, device, args.comm_hook)
    else:
        if args.compile != "off" and args.engine == "fsdp2":
            raise SystemExit(f"--compile {args.compile}: with --engine ddp or none")
        qmodel = robuq_fx.quantize(model, policy, example_inputs(args, device=device))
        t_quant = time.perf_counter() - t0
        if args.compile.startswith("regional"):
            if args.compile == "regional-cg" and args.compiler != "inductor":
                raise SystemExit("--compile regional-cg: CUDA graphs need --compiler inductor")
            kw = {"mode": "reduce-overhead"} if args.compile == "regional-cg" else {"backend": args.compiler}
            blocks = robuq_fx.compile_repeated_blocks(qmodel, **kw)
        engine_model = wrap(qmodel, args.engine, device, args.comm_hook)
    trained = engine_model  # (the state is gathered from the uncompiled wrapper)
    if args.compile == "inductor":
        engine_model = torch.compile(engine_model, backend=args.compiler)
    t1 = time.perf_counter()
    make_batch = lambda step: global_batch(model.config, args.batch, step, args.seed)  # noqa: E731
    step_s: list[float] = []
    losses = train(engine_model, make_batch, loss_fn, args, rank, world, device, step_s)
    t_train = time.perf_counter() - t1
    state = gather_state(trained, args.engine)
    steady = steady_step_s(step_s)
    result = {"engine": args.engine, "compile": args.compile, "model": args.model, "world": world,
              "device": str(device), "autocast_bf16": bf16_forward(args, device), "comm_hook": args.comm_hook,
              "global_batch": args.batch, "steps": args.steps, "losses": losses,
              "quantize_s": round(t_quant, 2), "train_s": round(t_train, 2),
              "step_s": [round(v, 5) for v in step_s], "steady_step_s": round(steady, 5),
              "samples_per_s": round(args.batch / steady, 3), "compiled_blocks": blocks,
              "dynamo_graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"])}
    if rank == 0:
        print(f"{args.engine} x{world} on {device}: {args.model}, global batch {args.batch}, {args.steps} steps, "
              f"quantize {t_quant:.1f} s, train {t_train:.1f} s; steady step {steady * 1e3:.1f} ms "
              f"({args.batch / steady:.2f} samples/s, the median without the first {min(2, args.steps - 1)} steps)")
        for i, l in enumerate(losses):
            print(f"  step {i}: loss {l:.6f}")
        if args.save_state:
            torch.save(state, args.save_state)
            print(f"full state dict ({len(state)} tensors) -> {args.save_state}")
        if args.save_packed:
            path = save_packed(state, args, args.save_packed)
            result["packed_bytes"] = path.stat().st_size
            print(f"packed checkpoint -> {path} ({result['packed_bytes']:,} bytes)")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if not all(math.isfinite(v) for v in losses):
        raise SystemExit("non-finite loss")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
