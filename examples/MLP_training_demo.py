"""RobuQ reference flow, stage 1: quantization-aware training with the seed-compatible API.

    python examples/MLP_training_demo.py                   # writes runs/mlp_robuq.pt
    python examples/MLP_inference_demo.py                  # stage 2: reload, pack, evaluate

Step by step, as in the RobuQ reference code's `MLP_training_demo.py` (only the import path differs:
`robuq_fx.quant.replace` for `quant.replace`):
    0. a pretrained FP model (here: trained for --fp-epochs on sklearn digits; the reference loads a checkpoint)
    1. `model.fcN = replace_linear_layer(model.fcN, nbits=A, w_bits=W, if_hadamard=..., if_lora=...)`
    2. QAT: an ordinary training loop (Adam, lr 1e-3); the straight-through estimator handles the gradients
    3. `torch.save(model.state_dict(), path)`

Layer arguments (the inference demo must be given the same ones): `--nbits` activation bits, `--w-bits` weight
bits (1.58 = ternary), Hadamard and the low-rank branch (LRB, METHOD.md §1) on unless `--no-hadamard` /
`--no-lora`. The LRB goes on fc1 and fc2 only: on the 256->10 head its rank would be clamped to 10, the whole
weight, so the head would be stored in FP with a residual of ~0 to quantize.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _digits import MLP, accuracy, add_threads_arg, load_digits_data, logits, seed_everything, train  # noqa: E402

from robuq_fx.quant.replace import replace_linear_layer  # noqa: E402

DEFAULT_CKPT = Path(__file__).resolve().parents[1] / "runs" / "mlp_robuq.pt"


def w_bits_arg(text: str):
    """'1.58' -> 1.58 (ternary), '4' -> 4; anything else is passed on for RobuQLinear to reject."""
    v = float(text)
    return 1.58 if abs(v - 1.58) < 1e-6 else int(v) if v.is_integer() else v


def add_layer_args(p: argparse.ArgumentParser) -> None:
    """The replace_linear_layer arguments; MLP_inference_demo.py takes the same flags with the same defaults."""
    p.add_argument("--nbits", type=int, default=3, help="activation bits (default 3)")
    p.add_argument("--w-bits", type=w_bits_arg, default=1.58, help="weight bits, 1.58 = ternary (default 1.58)")
    p.add_argument("--no-hadamard", action="store_true", help="if_hadamard=False")
    p.add_argument("--no-lora", action="store_true", help="if_lora=False (no low-rank branch)")
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help=f"state_dict path (default {DEFAULT_CKPT})")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")


def replace_layers(model: MLP, args) -> MLP:
    """Step 1 of the reference flow (the same lines in MLP_inference_demo.py)."""
    w_bits, hadamard, lora = args.w_bits, not args.no_hadamard, not args.no_lora
    model.fc1 = replace_linear_layer(model.fc1, nbits=args.nbits, w_bits=w_bits, if_hadamard=hadamard, if_lora=lora)
    model.fc2 = replace_linear_layer(model.fc2, nbits=args.nbits, w_bits=w_bits, if_hadamard=hadamard, if_lora=lora)
    model.fc3 = replace_linear_layer(model.fc3, nbits=args.nbits, w_bits=w_bits, if_hadamard=hadamard, if_lora=False)
    return model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_args(p)
    p.add_argument("--seed", type=int, default=0, help="init / shuffling / dropout seed (the split is fixed)")
    p.add_argument("--fp-epochs", type=int, default=20, help="FP pretraining epochs (0: QAT from scratch)")
    p.add_argument("--epochs", type=int, default=15, help="QAT epochs (default 15)")
    p.add_argument("--lr", type=float, default=1e-3, help="QAT learning rate (default 1e-3, as the reference)")
    p.add_argument("--quick", action="store_true", help="tiny run for tests: 3 FP epochs, 2 QAT epochs")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    add_threads_arg(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.fp_epochs, args.epochs = 3, 2
    t0 = time.perf_counter()
    data = load_digits_data()

    # 0. the pretrained FP model
    seed_everything(args.seed)
    model = MLP()
    train(model, data, args.fp_epochs, 2e-3, args.seed, desc="FP pretrain", progress=not args.no_progress)
    fp_acc = accuracy(logits(model, data.x_test), data.y_test)

    # 1. replace the linear layers
    model = replace_layers(model, args)
    ptq_acc = accuracy(logits(model, data.x_test), data.y_test)

    # 2. QAT: an ordinary training loop
    seed_everything(args.seed + 1)
    train(model, data, args.epochs, args.lr, args.seed + 1, desc="QAT", progress=not args.no_progress)
    qat_acc = accuracy(logits(model, data.x_test), data.y_test)

    # 3. save the QAT state_dict (FP master weights, LRB factors and each layer's spec as extra state)
    args.ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.ckpt)

    runtime = time.perf_counter() - t0
    rows = [{"stage": f"FP MLP ({args.fp_epochs} epochs)", "test acc": fp_acc},
            {"stage": "after replace_linear_layer (no training yet)", "test acc": ptq_acc},
            {"stage": f"after QAT ({args.epochs} epochs, lr {args.lr:g})", "test acc": qat_acc}]
    print("\nlayers:")
    for name in ("fc1", "fc2", "fc3"):
        print(f"  model.{name}: RobuQLinear({getattr(model, name).extra_repr()})")
    print()
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".2f"))
    flags = f" --nbits {args.nbits} --w-bits {args.w_bits}" + " --no-hadamard" * args.no_hadamard + \
        " --no-lora" * args.no_lora
    print(f"\nsaved model.state_dict() to {args.ckpt} ({args.ckpt.stat().st_size:,} bytes); "
          f"next: python examples/MLP_inference_demo.py --ckpt {args.ckpt}{flags}")
    print(f"runtime {runtime:.1f} s")
    result = {"fp_acc": fp_acc, "ptq_acc": ptq_acc, "qat_acc": qat_acc, "ckpt": str(args.ckpt),
              "runtime_s": round(runtime, 2)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
