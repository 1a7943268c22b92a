"""A diffusion user's run: train a tiny class-conditional DiT on 8x8 digits, QAT it with the RobuQ paper's policy,
lower it, and sample it with an unmodified diffusers `DiTPipeline` (DDIM), next to the FP model.

    .venv/bin/python examples/dit_pipeline.py                  # ~3-4 min on 2 CPU cores; writes examples/results/
    .venv/bin/python examples/dit_pipeline.py --fp-steps 200 --qat-steps 40 --samples 4 --out /tmp/dit  # smoke run

1. data, model: sklearn's digits (1,797 images, pixels in [-1, 1], fixed 80/20 split) and a diffusers
   DiTTransformer2DModel with 2 blocks of 2 heads x 32 (64 wide), patch 2 (16 tokens), 10 classes
   (benchmarks/_digits_dit.py, the DiT of bench_accuracy.py).
2. FP training: DDPM epsilon prediction on diffusers' own schedule (DDPMScheduler: 1000 steps, linear betas
   1e-4..0.02), so the pipeline's DDIMScheduler samples what the model was trained for.
3. QAT: `robuq_fx.quantize(fp, policy, example_inputs)` with `dit-xl-2-robuq` (METHOD.md section 5: block linears
   W1.58A4 + Hadamard + low-rank branch, adaLN modulation W4A4, attention q/k/v 8-bit, embeddings and final layer
   FP), its LRB rank 32 cut to 8: the paper's rank is for 1152-wide DiT-XL/2, and at width 64 rank 32 would hold
   half of every weight in full precision. The result is the DiTTransformer2DModel itself (attention modules
   captured as graphs for their 8-bit q/k/v); it trains with the same loop as the FP model.
4. `robuq_fx.lower`: packed ternary / 4-bit weights, one robuq::qlinear per layer (q/k/v fused), robuq::attention8.
5. Both models go into `DiTPipeline(transformer, vae=PixelDecoder(), scheduler=DDIMScheduler)`; at 8x8 there is
   no VAE: the decoder returns the latents, which are the pixels. Samples are judged by a logistic regression
   trained on the real training digits (the same judge as bench_accuracy.py).

Writes OUT/dit_pipeline.png (a grid per model: one row per class 0-9), OUT/dit_pipeline.json and OUT/dit_pipeline.txt.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tabulate import tabulate  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import robuq_fx  # noqa: E402
from _digits_dit import build_dit, fit_judge, judged_accuracy, load_digit_images  # noqa: E402

CLASSES = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--fp-steps", type=int, default=1500, help="FP training steps, batch 128 (default 1500)")
    p.add_argument("--qat-steps", type=int, default=300, help="QAT steps (default 300)")
    p.add_argument("--lr", type=float, default=2e-3, help="FP learning rate (AdamW, cosine)")
    p.add_argument("--qat-lr", type=float, default=5e-4, help="QAT learning rate")
    p.add_argument("--rank", type=int, default=8, help="LRB rank replacing the policy's 32 (default 8)")
    p.add_argument("--samples", type=int, default=20, help="samples per class for the judged accuracy (default 20)")
    p.add_argument("--ddim-steps", type=int, default=25, help="DDIM steps in the pipeline (default 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "results", help="output folder")
    return p.parse_args(argv)


def pixel_decoder():
    """The pipeline's `vae`: DiTPipeline calls vae.decode(latents / scaling_factor).sample; 8x8 latents are pixels."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput

    class PixelDecoder(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, scaling_factor: float = 1.0):
            super().__init__()
            self.register_buffer("anchor", torch.zeros(1))  # pipelines read each component's device

        def decode(self, z, return_dict: bool = True):
            return DecoderOutput(sample=z)

    return PixelDecoder()


def train(model, sched, x, y, steps: int, lr: float, seed: int, desc: str):
    """DDPM epsilon-MSE with the scheduler's own noising; AdamW, cosine lr, seeded batches."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, unit="step")
    for _ in bar:
        i = torch.randint(0, len(x), (128,), generator=gen)
        noise = torch.randn(x[i].shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(i),), generator=gen)
        pred = model(hidden_states=sched.add_noise(x[i], noise, t), timestep=t, class_labels=y[i], return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cos.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return model.eval()


@torch.no_grad()
def heldout_loss(model, sched, x, y, seed: int = 1234) -> float:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(x),), generator=gen)
    pred = model.eval()(hidden_states=sched.add_noise(x, noise, t), timestep=t, class_labels=y, return_dict=False)[0]
    return F.mse_loss(pred, noise).item()


def sample(transformer, labels: list[int], steps: int, seed: int) -> torch.Tensor:
    """Images in [-1, 1] from diffusers' DiTPipeline (no classifier-free guidance: the pipeline's null class is
    ImageNet's 1000)."""
    from diffusers import DDIMScheduler, DiTPipeline
    pipe = DiTPipeline(transformer=transformer, vae=pixel_decoder(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=labels, guidance_scale=1.0, num_inference_steps=steps, output_type="pt",
               generator=torch.Generator().manual_seed(seed)).images
    return out * 2 - 1  # the pipeline returns (x / 2 + 0.5).clamp(0, 1)


def save_grid(panels: dict[str, torch.Tensor], path: Path, per_class: int = 8, scale: int = 5) -> None:
    """Side by side, one panel per model: rows = classes 0-9, columns = samples (labels repeat_interleaved)."""
    from PIL import Image, ImageDraw
    cell, pad, top = 8 * scale + 2, 12, 18
    w = per_class * cell
    img = Image.new("L", (len(panels) * (w + pad) + pad, top + CLASSES * cell + pad), 255)
    draw = ImageDraw.Draw(img)
    for p, (title, x) in enumerate(panels.items()):
        x0 = pad + p * (w + pad)
        draw.text((x0, 3), title, fill=0)
        x = x.reshape(CLASSES, -1, 8, 8)[:, :per_class]
        for c in range(CLASSES):
            for j in range(x.shape[1]):
                tile = ((1 - (x[c, j].clamp(-1, 1) + 1) / 2) * 255).round().to(torch.uint8)  # dark ink on white
                im = Image.fromarray(tile.numpy(), "L").resize((8 * scale, 8 * scale), Image.NEAREST)
                img.paste(im, (x0 + j * cell, top + c * cell))
    img.save(path)


def provenance() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"commit": commit, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers import DDPMScheduler
    t0 = time.perf_counter()
    data = load_digit_images()
    sched = DDPMScheduler()  # 1000 steps, linear betas 1e-4..0.02: what DDIMScheduler() assumes too
    judge, real_acc = fit_judge(data)
    fp = train(build_dit(args.seed), sched, data.x_train, data.y_train, args.fp_steps, args.lr, args.seed, "FP")
    t_fp = time.perf_counter() - t0

    policy = robuq_fx.Policy.load("dit-xl-2-robuq").to_dict()
    for rule in policy["rules"]:
        if rule.get("lora_rank"):
            rule["lora_rank"] = args.rank
    example = {"hidden_states": data.x_train[:4], "timestep": torch.tensor([10, 300, 600, 900]),
               "class_labels": data.y_train[:4]}
    qat = robuq_fx.quantize(fp, policy, example_inputs=example)
    assert isinstance(qat, type(fp))
    qat = train(qat, sched, data.x_train, data.y_train, args.qat_steps, args.qat_lr, args.seed + 1, "QAT")
    t_qat = time.perf_counter() - t0 - t_fp
    lowered = robuq_fx.lower(qat)

    labels = [c for c in range(CLASSES) for _ in range(args.samples)]
    t1 = time.perf_counter()
    fp_x = sample(fp, labels, args.ddim_steps, args.seed)
    t_fp_sample = time.perf_counter() - t1
    q_x = sample(lowered, labels, args.ddim_steps, args.seed)
    t_q_sample = time.perf_counter() - t1 - t_fp_sample
    same = torch.equal(sample(qat, labels[:CLASSES * 2], 3, 7), sample(lowered, labels[:CLASSES * 2], 3, 7))

    y = torch.tensor(labels)
    size = robuq_fx.size_table(lowered, print_table=False)[-1]
    rows = [
        {"model": "real held-out digits (judge)", "judged acc %": round(real_acc, 1), "held-out ε-MSE": "-",
         "quantized layers, bytes vs bf16": "-"},
        {"model": "FP DiT", "judged acc %": round(judged_accuracy(judge, fp_x, y), 1),
         "held-out ε-MSE": round(heldout_loss(fp, sched, data.x_test, data.y_test), 4),
         "quantized layers, bytes vs bf16": "-"},
        {"model": f"RobuQ dit-xl-2-robuq (LRB {args.rank}), lowered", "judged acc %":
            round(judged_accuracy(judge, q_x, y), 1),
         "held-out ε-MSE": round(heldout_loss(lowered, sched, data.x_test, data.y_test), 4),
         "quantized layers, bytes vs bf16": f"{size['packed bytes']} / {size['bf16 bytes']} "
                                            f"({size['packed/bf16']:.2f}x)"},
    ]
    table = tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True)
    args.out.mkdir(parents=True, exist_ok=True)
    acc = [r["judged acc %"] for r in rows]
    save_grid({f"FP DiT: judged {acc[1]}%": fp_x, f"RobuQ W1.58A4, lowered: judged {acc[2]}%": q_x},
              args.out / "dit_pipeline.png")
    info = robuq_fx.robuq_info(lowered)
    notes = [f"diffusers DiTPipeline + DDIMScheduler ({args.ddim_steps} steps, no guidance), {args.samples} samples "
             f"per class, seed {args.seed}; judge: logistic regression on the real training digits",
             f"FP {args.fp_steps} steps, QAT {args.qat_steps} steps (batch 128); captured regions: "
             f"{sorted(info['regions'])}; fused: {sorted(info['fused'])}",
             f"lowered == QAT model in the pipeline (20 samples, 3 steps, torch.equal): {same}",
             f"time: FP train {t_fp:.0f} s, quantize + QAT {t_qat:.0f} s, sampling FP {t_fp_sample:.1f} s / "
             f"lowered {t_q_sample:.1f} s (reference kernel, CPU)"]
    text = "\n".join([table, "", *notes])
    print(text)
    result = {"provenance": provenance(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "lowered_equals_qat": same, "notes": notes}
    (args.out / "dit_pipeline.json").write_text(json.dumps(result, indent=2))
    (args.out / "dit_pipeline.txt").write_text(f"command: {result['provenance']['command']}\n"
                                               f"commit: {result['provenance']['commit']}\n\n{text}\n")
    print(f"wrote {args.out / 'dit_pipeline.png'}")
    return result


if __name__ == "__main__":
    main()
