"""RobuQ reference flow, stage 2: reload the QAT model, pack it with `prepare_for_inference()`, evaluate.

    python examples/MLP_training_demo.py                   # stage 1 writes runs/mlp_robuq.pt
    python examples/MLP_inference_demo.py                  # this script

Step by step, as in the RobuQ reference code's `MLP_inference_demo.py`:
    1. rebuild the model and call `replace_linear_layer` again with exactly the arguments used for training
    2. `model.load_state_dict(torch.load(path))`
    3. `prepare_for_inference()` on every RobuQLinear: the residual W H - A B is quantized once and packed
       (ternary codes at 2 bits), the low-rank branch stays in FP, the FP master weight is dropped
    4. `model.eval()` and `torch.no_grad()`

The QAT model in eval mode is evaluated before step 3, and the packed model's logits must equal them exactly
(`torch.equal`): packing changes the storage, not the arithmetic.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _digits import MLP, accuracy, add_threads_arg, load_digits_data  # noqa: E402
from MLP_training_demo import add_layer_args  # noqa: E402  (same flags, same defaults as the training demo)

from robuq_fx import CheckpointError  # noqa: E402
from robuq_fx.quant.replace import RobuQLinear, replace_linear_layer  # noqa: E402


def layer_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the RobuQ layers: FP parameters before packing, packed buffers after."""
    total = 0
    for m in model.modules():
        if isinstance(m, RobuQLinear):
            tensors = m.packed.buffers() if m.packed is not None else m.parameters(recurse=False)
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_args(p)
    add_threads_arg(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.ckpt.exists():
        sys.exit(f"{args.ckpt} not found: run examples/MLP_training_demo.py first (or pass --ckpt)")
    data = load_digits_data()
    w_bits, hadamard, lora = args.w_bits, not args.no_hadamard, not args.no_lora

    # 1. rebuild, and replace the same layers with the same arguments as in training
    model = MLP()
    model.fc1 = replace_linear_layer(model.fc1, nbits=args.nbits, w_bits=w_bits, if_hadamard=hadamard, if_lora=lora)
    model.fc2 = replace_linear_layer(model.fc2, nbits=args.nbits, w_bits=w_bits, if_hadamard=hadamard, if_lora=lora)
    model.fc3 = replace_linear_layer(model.fc3, nbits=args.nbits, w_bits=w_bits, if_hadamard=hadamard, if_lora=False)

    # 2. load the QAT weights (each RobuQLinear checks its saved spec against its own)
    try:
        model.load_state_dict(torch.load(args.ckpt, weights_only=True))
    except CheckpointError as e:
        sys.exit(f"{args.ckpt}: {e}\n(pass the --nbits/--w-bits/--no-hadamard/--no-lora flags used for training)")

    # the QAT model in eval mode: the reference point for the packed model
    model.eval()
    qat_bytes = layer_bytes(model)
    with torch.no_grad():
        qat_out = model(data.x_test)

    # 3. pack every RobuQLinear
    for m in model.modules():
        if isinstance(m, RobuQLinear):
            m.prepare_for_inference()

    # 4. inference
    model.eval()
    with torch.no_grad():
        packed_out = model(data.x_test)

    same = torch.equal(packed_out, qat_out)
    qat_acc, packed_acc = accuracy(qat_out, data.y_test), accuracy(packed_out, data.y_test)
    rows = [{"model": "QAT (fake-quant, FP master weights)", "test acc": qat_acc, "layer bytes": qat_bytes,
             "== QAT output": "-"},
            {"model": "packed (prepare_for_inference)", "test acc": packed_acc, "layer bytes": layer_bytes(model),
             "== QAT output": same}]
    print(f"\n{args.ckpt}: {len(data.x_test)} test images")
    for name in ("fc1", "fc2", "fc3"):
        print(f"  model.{name}: RobuQLinear({getattr(model, name).extra_repr()})")
    print()
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".2f", intfmt=","))
    print(f"\npacked output == QAT eval output (torch.equal): {same}")
    result = {"qat_acc": qat_acc, "packed_acc": packed_acc, "packed_equal": same, "qat_bytes": qat_bytes,
              "packed_bytes": layer_bytes(model)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["packed_equal"] else 1)
