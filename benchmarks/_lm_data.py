"""Data, model, training and measurements of bench_lm.py: a byte-level Llama trained on the Python standard library.

Data: every `.py` file under the running interpreter's `sysconfig.get_paths()["stdlib"]`, walked in sorted order of
the relative path, with the directories named in EXCLUDED_DIRS left out wherever they occur (the test suites:
`test/` = Lib/test, `tests/` e.g. lib2to3/tests and distutils/tests, `idle_test/` = idlelib/idle_test, and the
`test/` packages of ctypes, tkinter, unittest, sqlite3 where a version has them; plus third-party
`site-packages`/`dist-packages`, which some installs put under the stdlib folder, and `__pycache__`). Tokens are
bytes (vocabulary 256). A file goes to validation when sha256(f"{seed}:{relative path}") mod 10000 < 100 * val_percent,
so the split is by file, depends on nothing but the path and the seed, and is the same on every machine that has
that file. Files are joined with one NUL byte after each (NUL appears in no stdlib source, so it marks a file start;
it is counted in the stream). Different Python versions have different stdlibs: the byte counts differ.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import sysconfig
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")
SEP = 0  # the NUL byte after every file


# ---- data ---------------------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the stdlib's .py files (EXCLUDED_DIRS left out), sorted. Symlinked folders are not
    followed, so a file is read once."""
    root = Path(root or stdlib_root())
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in EXCLUDED_DIRS)
        rel = Path(d).relative_to(root)
        out += [(rel / f).as_posix() for f in files if f.endswith(".py") and (Path(d) / f).is_file()]
    return sorted(out)


def is_val(rel: str, seed: int, val_percent: float) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:8], "little")
    return h % 10000 < round(val_percent * 100)


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 byte stream
    val: torch.Tensor
    train_files: list[str]
    val_files: list[str]
    info: dict = field(default_factory=dict)


def load_corpus(seed: int = 0, val_percent: float = 5.0, root: Path | None = None,
                max_train_bytes: int | None = None, max_val_bytes: int | None = None) -> Corpus:
    """The split byte streams. max_*_bytes (the quick run's slice): keep files, in sorted order, while the split's
    source bytes stay within the cap (at least one file)."""
    root = Path(root or stdlib_root())
    files = stdlib_files(root)
    parts = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    caps = {"train": max_train_bytes, "val": max_val_bytes}
    for rel in files:
        split = "val" if is_val(rel, seed, val_percent) else "train"
        data = (root / rel).read_bytes()
        if caps[split] is not None and parts[split] and sizes[split] + len(data) > caps[split]:
            continue
        parts[split].append((rel, data))
        sizes[split] += len(data)

    def stream(items):
        buf = b"".join(d + bytes([SEP]) for _, d in items)
        return torch.frombuffer(bytearray(buf), dtype=torch.uint8)

    tr, va = stream(parts["train"]), stream(parts["val"])
    info = {"python": sys.version.split()[0], "stdlib": str(root), "excluded_dirs": list(EXCLUDED_DIRS),
            "split": f"sha256('{seed}:<relative path>') mod 10000 < {round(val_percent * 100)} -> validation",
            "files_found": len(files), "train_files": len(parts["train"]), "val_files": len(parts["val"]),
            "train_source_bytes": sizes["train"], "val_source_bytes": sizes["val"],
            "train_stream_bytes": int(tr.numel()), "val_stream_bytes": int(va.numel()),
            "sliced": max_train_bytes is not None or max_val_bytes is not None}
    return Corpus(tr, va, [r for r, _ in parts["train"]], [r for r, _ in parts["val"]], info)


def random_windows(stream: torch.Tensor, n: int, ctx: int, gen: torch.Generator) -> torch.Tensor:
    """n windows of ctx + 1 bytes at uniform random offsets: (n, ctx + 1) uint8."""
    starts = torch.randint(0, stream.numel() - ctx - 1, (n,), generator=gen)
    return stream[starts[:, None] + torch.arange(ctx + 1)]


def train_batches(stream: torch.Tensor, steps: int, batch: int, ctx: int, seed: int, device) -> list[torch.Tensor]:
    """`steps` batches of random windows, drawn from a generator seeded with `seed` (the data order of a run)."""
    gen = torch.Generator().manual_seed(seed)
    return [random_windows(stream, batch, ctx, gen).to(device) for _ in range(steps)]


def eval_windows(stream: torch.Tensor, ctx: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive windows of ctx + 1 bytes with stride ctx: every byte after the stream's first is predicted once
    (each window from a fresh context); the tail shorter than a window is left out."""
    n = (stream.numel() - 1) // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[torch.arange(n)[:, None] * ctx + torch.arange(ctx + 1)]


# ---- model --------------------------------------------------------------------------------------------------------
FULL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=8, max_position_embeddings=512)
QUICK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=64)


def build_model(cfg: dict, seed: int, device="cpu"):
    """LlamaForCausalLM over bytes: untied lm_head (it stays FP anyway), no KV cache (never generates here)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, tie_word_embeddings=False, use_cache=False, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None, **cfg)
    return LlamaForCausalLM(config).to(device)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def autocast(device: str, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device == "cuda" else nullcontext()


def lm_loss(model, batch: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of a (B, ctx + 1) batch of bytes; logits scored in fp32."""
    x = batch[:, :-1].long()
    y = batch[:, 1:].long()
    with autocast(batch.device.type, amp):
        logits = model(x).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def bpb(model, windows: torch.Tensor, batch: int, device, amp: bool = False) -> float:
    """Validation bits per byte: summed NLL over every predicted byte / ln 2 / the number of predicted bytes."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch].to(device)
        total += lm_loss(model, w, amp).item() * w[:, 1:].numel()
        count += w[:, 1:].numel()
    model.train(was)
    return total / count / math.log(2)


def lr_at(step: int, steps: int, warmup: int, peak: float, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to floor * peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def make_opt(model, lr: float, wd: float, device: str):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=device == "cuda")


def step(model, opt, batch, lr: float, amp: bool, clip: float = 1.0) -> float:
    for g in opt.param_groups:
        g["lr"] = lr
    loss = lm_loss(model, batch, amp)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.item() if not loss.is_cuda else float("nan")  # no sync per step on GPU


def train_qat(model, batches: list, lr: float, amp: bool, bar=None, warmup_frac: float = 0.05) -> None:
    """QAT (or any fixed-budget run): AdamW, warm-up then cosine, no weight decay (the weights are quantized)."""
    device = batches[0].device.type
    opt = make_opt(model, lr, 0.0, device)
    model.train()
    n = len(batches)
    for i, b in enumerate(batches):
        step(model, opt, b, lr_at(i, n, max(1, int(warmup_frac * n)), lr), amp)
        if bar is not None:
            bar.update(b[:, 1:].numel())
    model.eval()


def fp_control(fp, stream, seeds: int, steps: int, batch: int, ctx: int, lr: float, device, amp: bool,
               val: torch.Tensor, eval_batch: int, bar=None) -> list[float]:
    """Validation BPB of the FP model trained on with the QAT loop (the same batches per seed, schedule and learning
    rate as every QAT run, no quantization): what the QAT runs' extra tokens alone are worth. A QAT Δ BPB below
    this control's is the price of quantization; one below 0 vs the FP model alone can be extra training."""
    import copy
    out = []
    for seed in range(seeds):
        m = copy.deepcopy(fp)
        train_qat(m, train_batches(stream, steps, batch, ctx, 1000 + seed, device), lr, amp, bar)
        out.append(bpb(m, val, eval_batch, device, amp))
        del m
    return out


def train_fp(model, stream, tokens: int, batch: int, ctx: int, lr: float, seed: int, device, amp: bool,
             val: torch.Tensor, eval_every: int, patience: int = 3, min_gain: float = 0.003, bar=None,
             log=print) -> dict:
    """FP training until the validation BPB flattens, warm-up / stable / decay: constant LR after a 2% warm-up while
    the validation BPB improves (by >= min_gain within `patience` evaluations every `eval_every` steps) and 80% of
    the budget is left; then a linear decay to 0 over max(20% of the steps so far, 10 steps). The decay starts when
    the curve flattens, so where it stops is read off the run rather than fixed in advance. The weights of the best
    evaluation are restored at the end (a curve that rises again is overfitting, not progress). Returns the curve."""
    steps = max(1, tokens // (batch * ctx))
    warmup = max(1, steps // 50)
    gen = torch.Generator().manual_seed(seed)
    opt = make_opt(model, lr, 0.1, device)
    history, best, since = [], float("inf"), 0
    kept = {"bpb": float("inf"), "step": 0, "state": None}  # the best evaluated weights, restored at the end
    decay_from, decay_len, why = None, 0, "budget (80% of the steps at constant LR)"
    i = 0
    t0 = time.perf_counter()
    while True:
        if decay_from is None and (i >= int(0.8 * steps)):
            decay_from, decay_len = i, max(10, i // 5)
        if decay_from is not None and i >= decay_from + decay_len:
            break
        if i < warmup:
            cur = lr * (i + 1) / warmup
        elif decay_from is None:
            cur = lr
        else:
            cur = lr * (1 - (i - decay_from) / decay_len)
        model.train()
        b = random_windows(stream, batch, ctx, gen).to(device)
        step(model, opt, b, cur, amp)
        i += 1
        if bar is not None:
            bar.update(batch * ctx)
        if i % eval_every == 0 or (decay_from is not None and i == decay_from + decay_len):
            v = bpb(model, val, 64, device, amp)
            history.append({"step": i, "tokens": i * batch * ctx, "val_bpb": round(v, 5), "lr": cur,
                            "s": round(time.perf_counter() - t0, 1)})
            if v < kept["bpb"]:
                kept.update(bpb=v, step=i, state={k: t.detach().to("cpu", copy=True)
                                                  for k, t in model.state_dict().items()})
            if decay_from is None:
                if v < best - min_gain:
                    best, since = v, 0
                else:
                    since += 1
                if since >= patience and i > warmup:
                    decay_from, decay_len = i, max(10, i // 5)
                    why = f"validation BPB flat for {patience} evaluations ({eval_every} steps each)"
                    log(f"FP: validation BPB flat at step {i} ({v:.4f}); decaying the LR over {decay_len} steps")
    model.eval()
    restored = None
    if kept["state"] is not None and kept["step"] != i:
        # a small corpus seen for several epochs: the validation BPB can rise again (it did on the H200, 0.883 at
        # step 1200 -> 0.926 at 2160), and the quantized models should start from the best FP model, not the last
        model.load_state_dict(kept["state"])
        restored = kept["step"]
        log(f"FP: restored the weights of step {restored} (validation {kept['bpb']:.4f}, the best evaluated; "
            f"last {history[-1]['val_bpb']:.4f} at step {i})")
    return {"steps": i, "tokens": i * batch * ctx, "decay_from_step": decay_from, "decay_steps": decay_len,
            "decay_started_by": why, "restored_step": restored, "curve": history}


# ---- outlier statistics -------------------------------------------------------------------------------------------
def _stats(x: torch.Tensor) -> dict:
    """x (T, K) fp32: max|x| / RMS over the whole input, Pearson kurtosis of all its values (normal = 3), and the
    per-token means of the same two figures (what a per-token quantizer's range sees)."""
    rms = x.pow(2).mean().sqrt()
    c = x - x.mean()
    tok_rms = x.pow(2).mean(-1).sqrt().clamp_min(1e-12)
    tc = x - x.mean(-1, keepdim=True)
    tok_kurt = tc.pow(4).mean(-1) / tc.pow(2).mean(-1).pow(2).clamp_min(1e-24)
    return {"max_over_rms": (x.abs().max() / rms).item(), "kurtosis": (c.pow(4).mean() / c.pow(2).mean() ** 2).item(),
            "token_max_over_rms": (x.abs().amax(-1) / tok_rms).mean().item(), "token_kurtosis": tok_kurt.mean().item()}


@torch.no_grad()
def outlier_stats(model, layers: list[str], windows: torch.Tensor, block: int, device, amp: bool) -> list[dict]:
    """Statistics of each named linear's input on `windows` (forward pre-hooks on the FP model), before and after
    the block Hadamard rotation robuq_fx applies (hadamard.block_hadamard, in fp32)."""
    from robuq_fx.hadamard import block_hadamard
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.__setitem__(n, args[0].detach().float().reshape(-1, args[0].shape[-1])))
        for n in layers]
    try:
        model.eval()
        with autocast(device, amp):
            model(windows[:, :-1].long().to(device))
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for n in layers:
        x = seen[n]
        before, after = _stats(x), _stats(block_hadamard(x, block))
        rows.append({"layer": n, "in": x.shape[-1], **{f"{k}": round(v, 3) for k, v in before.items()},
                     **{f"{k}_h": round(v, 3) for k, v in after.items()}})
    return rows
