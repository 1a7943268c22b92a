"""A tiny class-conditional DiT trained as a DDPM on sklearn's 8x8 digits: data, model, noise schedule, training,
sampling and the two metrics `bench_accuracy.py` reports for it.

    images:   load_digits, pixels 0..16 scaled to [-1, 1], shape (N, 1, 8, 8); fixed stratified 80/20 split
    model:    diffusers DiTTransformer2DModel, sample_size 8, patch 2 (16 tokens), 2 heads x 32 dims, adaLN-Zero
    training: epsilon prediction, MSE, t ~ U{0..T-1}, linear betas (the usual 1e-4..0.02 at T=1000, rescaled to T)
    sampling: deterministic DDIM (eta = 0) over a subsequence of the T steps, x0 clipped to [-1, 1]
    metrics:  class accuracy of generated samples judged by a logistic regression trained on real digits, and the
              denoising loss on the held-out digits with fixed noise and timesteps (same for every setting)

Everything is seeded through explicit `torch.Generator`s, so a setting is reproducible on its own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

SPLIT_SEED = 0
NUM_CLASSES = 10


@dataclass
class DigitImages:
    x_train: torch.Tensor  # (N, 1, 8, 8) in [-1, 1]
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digit_images() -> DigitImages:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=SPLIT_SEED, stratify=y)
    f = lambda a: torch.tensor(a / 8.0 - 1.0, dtype=torch.float32).reshape(-1, 1, 8, 8)  # noqa: E731
    return DigitImages(f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te))


def build_dit(seed: int, num_layers: int = 2) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=1, out_channels=1,
                              num_layers=num_layers, sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
                              norm_num_groups=1)
    # Class-label dropout (for classifier-free guidance) is a train-only Python branch that torch.export, which
    # captures in eval mode, drops anyway: turn it off so the FP and QAT models train the same way.
    for mod in m.modules():
        if type(mod).__name__ == "LabelEmbedding":
            mod.dropout_prob = 0.0
    return m


def dit_policy(w_bits, a_bits, *, hadamard="all", lora_rank: int = 0, a_sym=None, a_clip: str = "absmax",
               adaln: str = "w4a4") -> dict:
    """METHOD.md §5 for the tiny DiT: the four kinds of block linear (to_q/k/v, to_out.0, ff.net.0.proj, ff.net.2)
    at (w_bits, a_bits); the adaLN modulation linear (norm1.linear) at W4A4 (or FP with adaln="fp"); timestep /
    label embeddings and the final layer (proj_out_1/2) in FP.
    hadamard: "all" (every block linear), "out" (only attention out and fc2: the paper's baseline), "none"."""
    spec = {"w_bits": w_bits, "a_bits": a_bits, "lora_rank": lora_rank, "a_clip": a_clip}
    if a_sym is not None:
        spec["a_sym"] = a_sym
    rot_out = hadamard in ("all", "out")
    rot_in = hadamard == "all"
    rules = [
        {"match": "transformer_blocks.*.attn1.to_out.0", **spec, "hadamard": rot_out},
        {"match": "transformer_blocks.*.ff.net.2", **spec, "hadamard": rot_out},
        {"match": "re:transformer_blocks\\.\\d+\\.attn1\\.to_[qkv]", **spec, "hadamard": rot_in},
        {"match": "transformer_blocks.*.ff.net.0.proj", **spec, "hadamard": rot_in},
    ]
    if adaln == "w4a4":
        rules.append({"match": "transformer_blocks.*.norm1.linear", "w_bits": 4, "a_bits": 4, "hadamard": True})
    return {"rules": rules}


BLOCK_LINEARS = ["transformer_blocks.*.attn1.*", "transformer_blocks.*.ff.*"]  # AMPN allocates these only


class Diffusion:
    """DDPM with T steps; the model sees timesteps spread over 0..999 (DiT's sinusoidal embedding range)."""

    def __init__(self, steps: int = 100):
        self.T = steps
        scale = 1000.0 / steps
        self.betas = torch.linspace(1e-4 * scale, 0.02 * scale, steps, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.abar = torch.cumprod(self.alphas, 0)
        self.stride = 1000 // steps

    def eps(self, model, x_t, t, y) -> torch.Tensor:
        return model(hidden_states=x_t, timestep=t * self.stride, class_labels=y, return_dict=False)[0]

    def noisy(self, x0, t, noise):
        a = self.abar[t].float().view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(self, model, x0, y, gen: torch.Generator | None = None) -> torch.Tensor:
        t = torch.randint(0, self.T, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        return F.mse_loss(self.eps(model, self.noisy(x0, t, noise), t, y), noise)

    @torch.no_grad()
    def heldout_loss(self, model, x0, y, repeats: int = 4, seed: int = 1234) -> float:
        """Mean epsilon-MSE over `repeats` passes of the held-out set, noise and timesteps fixed by `seed`."""
        model.eval()
        gen = torch.Generator().manual_seed(seed)
        return sum(self.loss(model, x0, y, gen).item() for _ in range(repeats)) / repeats

    @torch.no_grad()
    def sample(self, model, labels: torch.Tensor, steps: int = 25, seed: int = 0) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) over `steps` evenly spaced timesteps, x0 clipped to [-1, 1] each step."""
        model.eval()
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((len(labels), 1, 8, 8), generator=gen).double()
        ts = torch.linspace(self.T - 1, 0, min(steps, self.T)).round().long().unique_consecutive().tolist()
        for i, t in enumerate(ts):
            ab = self.abar[t]
            ab_prev = self.abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
            eps = self.eps(model, x.float(), torch.full((len(labels),), t, dtype=torch.long), labels).double()
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # the noise consistent with the clipped x0
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        return x.float()


def train_diffusion(model, diff: Diffusion, data: DigitImages, steps: int, lr: float, seed: int,
                    batch_size: int = 128, desc: str = "train", progress: bool = True):
    """AdamW, cosine-decayed lr, batches drawn with a seeded generator."""
    if steps <= 0:
        return model
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    n = len(data.x_train)
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress, unit="step")
    for _ in bar:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        loss = diff.loss(model, data.x_train[idx], data.y_train[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.eval()
    return model


def fit_judge(data: DigitImages):
    """Logistic regression on the real training digits (the same [-1, 1] pixels the DiT generates)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=3000)
    clf.fit(data.x_train.reshape(len(data.x_train), -1).numpy(), data.y_train.numpy())
    real_acc = 100.0 * clf.score(data.x_test.reshape(len(data.x_test), -1).numpy(), data.y_test.numpy())
    return clf, real_acc


def judged_accuracy(clf, samples: torch.Tensor, labels: torch.Tensor) -> float:
    pred = clf.predict(samples.reshape(len(samples), -1).clamp(-1, 1).numpy())
    return 100.0 * float((torch.from_numpy(pred) == labels).float().mean())


def capture_dit(model: nn.Module, data: DigitImages):
    """Capture the (trained) FP DiT once with torch.export; `robuq_fx.quantize` on the returned GraphModule then
    only re-traces it (~0.2 s) instead of exporting again for every setting (~2-5 s on 2 shared cores). The
    quantized layers keep the DiT's qualified names, and the outputs are bit-identical to quantizing the DiT."""
    from robuq_fx.capture import capture, private_copy

    example = {"hidden_states": data.x_train[:4], "timestep": torch.zeros(4, dtype=torch.long),
               "class_labels": data.y_train[:4], "return_dict": False}
    gm, _ = capture(private_copy(model), example)
    return gm
