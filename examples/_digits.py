"""Shared pieces of the digits examples: data, the MLP, training and evaluation loops.

sklearn's `load_digits` (1,797 8x8 images, 10 classes) ships with scikit-learn, so the examples run offline.
One fixed stratified split (80/20) for every example; pixels are standardised with the training set's statistics.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

SPLIT_SEED = 0  # the train/test split never changes with --seed: only init and shuffling do


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data() -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=SPLIT_SEED, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1.0  # +1: the border pixels are almost always 0 (std ~ 0)
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return Digits(f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te))


class MLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with ReLU; `fc1`, `fc2`, `fc3` as in the RobuQ reference MLP demo."""

    def __init__(self, in_features: int = 64, hidden: int = 256, classes: int = 10, dropout: float = 0.1):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = self.drop(F.relu(self.fc1(x)))
        x = self.drop(F.relu(self.fc2(x)))
        return self.fc3(x)


# Why one thread: the layers are at most 256 wide, so a second thread gains little, and on cores shared with other
# processes OpenMP threads waiting for each other made a --quick run 9x slower (86 s vs 10 s, torch 2.13, 2 cores).
def add_threads_arg(p) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: as fast for 256-wide layers, far faster on busy cores)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(model: nn.Module, data: Digits, epochs: int, lr: float, seed: int, batch_size: int = 64,
          desc: str = "train", progress: bool = True) -> nn.Module:
    """Adam + cross-entropy, cosine-decayed lr, a fixed shuffling generator (same seed -> same run)."""
    if epochs <= 0:
        return model
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    n = len(data.x_train)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    bar = tqdm(total=steps, desc=desc, leave=False, disable=not progress, unit="step")
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return model


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits of the whole test set in one batch (per-token activation quantization makes the result
    independent of the batch size, but one batch keeps the packed-vs-QAT comparison simple)."""
    model.eval()
    return model(x)


def accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (out.argmax(-1) == y).float().mean().item()
