"""robuq_fx end to end on sklearn's 8x8 digits, on CPU in well under a minute.

    python examples/qat_digits.py                 # FP MLP, then five RobuQ settings: quantize -> QAT -> lower
    python examples/qat_digits.py --quick         # a few seconds (used by tests/test_examples.py)
    python examples/qat_digits.py --json runs/qat_digits.json

For every setting: `robuq_fx.quantize(fp_model, policy)` gives a QAT copy (the FP model is untouched), a short QAT
fine-tune follows, then `robuq_fx.lower(qmodel)` packs the weights (ternary codes at 2 bits, 4-bit codes at 4 bits,
plus scales and the full-precision low-rank branch). The lowered model must give *bit-identical* logits to the QAT
model in eval mode (`torch.equal`), so the "packed" accuracy equals the "QAT" accuracy. Finally one packed model
goes through `save_quantized` / `load_quantized` on a freshly initialised MLP.

The classifier head (fc3, 256 -> 10) is quantized too (all three linear layers); `--fp-head` keeps it in full
precision with a policy skip rule, as the RobuQ paper does for DiT's final layer. The low-rank branch (LRB,
METHOD.md §1) is given to fc1 and fc2 only: rank 16 exceeds the head's 10 outputs, and a branch of rank >= 10
would represent the whole head in FP, leaving nothing to quantize.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import robuq_fx  # noqa: E402
from _digits import MLP, accuracy, add_threads_arg, load_digits_data, logits, seed_everything, train  # noqa: E402

# (label, w_bits, a_bits, lora_rank); every setting rotates activations with the block Hadamard transform.
SETTINGS = [
    ("W4A4 +H", 4, 4, 0),
    ("W1.58A4 +H", 1.58, 4, 0),
    ("W1.58A3 +H", 1.58, 3, 0),
    ("W1.58A3 +H +LRB16", 1.58, 3, 16),
    ("W1.58A2 +H +LRB16", 1.58, 2, 16),
]
SAVE_SETTING = "W1.58A3 +H +LRB16"  # the one that goes through save_quantized / load_quantized
HEAD = "fc3"


def policy_for(w_bits, a_bits, lora_rank: int, fp_head: bool) -> dict:
    rules = []
    if fp_head:
        rules.append({"match": HEAD, "skip": True})
    elif lora_rank:
        rules.append({"match": HEAD, "w_bits": w_bits, "a_bits": a_bits})  # no LRB on the 10-output head
    rules.append({"type": "Linear", "w_bits": w_bits, "a_bits": a_bits, "lora_rank": lora_rank})
    return {"rules": rules, "defaults": {"hadamard": True}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20, help="FP training epochs (default 20)")
    p.add_argument("--qat-epochs", type=int, default=15, help="QAT epochs per setting (default 15)")
    p.add_argument("--lr", type=float, default=2e-3, help="FP learning rate (Adam, cosine decay; default 2e-3)")
    p.add_argument("--qat-lr", type=float, default=1e-3, help="QAT learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="init / shuffling / dropout seed (the split is fixed)")
    p.add_argument("--fp-head", action="store_true", help="keep the classifier head fc3 in full precision")
    p.add_argument("--quick", action="store_true", help="tiny run for tests: 3 FP epochs, 2 QAT epochs")
    p.add_argument("--json", metavar="PATH", help="write the table (and the reload check) as JSON")
    p.add_argument("--save", metavar="PATH", help=f"keep the packed checkpoint of '{SAVE_SETTING}' here "
                   "(.safetensors; default: a temporary file)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    add_threads_arg(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.qat_epochs = 3, 2
    return args


def size_cells(lowered) -> tuple[int, int, int]:
    """(packed bytes, of which LRB, bf16 bytes) of the quantized layers: codes + scales + LRB + bias vs the same
    layers' weight + bias in bf16."""
    total = robuq_fx.size_table(lowered, print_table=False)[-1]
    return total["packed bytes"], total["lrb bytes"], total["bf16 bytes"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    progress = not args.no_progress
    data = load_digits_data()
    x_all = torch.cat([data.x_test, data.x_train])  # the packed == QAT check runs on every image

    seed_everything(args.seed)
    fp = MLP()
    train(fp, data, args.epochs, args.lr, args.seed, desc="FP", progress=progress)
    fp_acc = accuracy(logits(fp, data.x_test), data.y_test)
    fp_bf16 = sum(2 * p.numel() for p in fp.parameters())  # all weights and biases of the 3 linear layers
    rows = [{"setting": "FP32 (baseline)", "head": "FP", "PTQ acc": None, "FP/QAT acc": fp_acc,
             "packed acc": None, "packed == QAT": None, "packed bytes": None, "LRB bytes": None,
             "bf16 bytes": fp_bf16, "packed/bf16": None}]

    keep = {}
    for i, (label, w_bits, a_bits, rank) in enumerate(SETTINGS):
        qmodel = robuq_fx.quantize(fp, policy_for(w_bits, a_bits, rank, args.fp_head))
        ptq_acc = accuracy(logits(qmodel, data.x_test), data.y_test)
        seed_everything(args.seed + 1 + i)  # each setting reproducible on its own (dropout, shuffling)
        train(qmodel, data, args.qat_epochs, args.qat_lr, args.seed + 1 + i, desc=f"QAT {label}",
              progress=progress)
        lowered = robuq_fx.lower(qmodel)
        q_out, p_out = logits(qmodel, x_all), logits(lowered, x_all)
        n_test = len(data.x_test)
        packed, lrb, bf16 = size_cells(lowered)
        head = robuq_fx.robuq_info(lowered)["layers"].get(HEAD)
        rows.append({"setting": label,
                     "head": "FP (skip rule)" if head is None else robuq_fx.LayerSpec(**head).short(),
                     "PTQ acc": ptq_acc, "FP/QAT acc": accuracy(q_out[:n_test], data.y_test),
                     "packed acc": accuracy(p_out[:n_test], data.y_test),
                     "packed == QAT": torch.equal(q_out, p_out),
                     "packed bytes": packed, "LRB bytes": lrb, "bf16 bytes": bf16,
                     "packed/bf16": round(packed / bf16, 3)})
        if label == SAVE_SETTING:
            keep = {"lowered": lowered, "out": p_out}

    reload = check_reload(keep["lowered"], keep["out"], x_all, args)
    runtime = time.perf_counter() - t0

    head_note = "full precision (policy skip rule)" if args.fp_head else "quantized (no LRB: rank 16 > its 10 outputs)"
    print(f"\nsklearn digits: {len(data.x_train)} train / {len(data.x_test)} test images, MLP 64-256-256-10, "
          f"{args.epochs} FP epochs, {args.qat_epochs} QAT epochs per setting, seed {args.seed}; head fc3: {head_note}")
    print("acc: % of the test set (PTQ = right after quantize(), before QAT); packed == QAT: torch.equal of the "
          "logits of all 1,797 images;\nbytes: weights + biases of the quantized layers (packed = codes + scales + "
          "bias + LRB, which stays in the model's FP32)\n")
    print(format_table(rows))
    print(f"\nsave_quantized('{reload['setting']}') -> {reload['file_bytes']:,} bytes; "
          f"load_quantized(path, MLP()) on a fresh random init: outputs identical = {reload['identical']}")
    print(f"runtime {runtime:.1f} s")

    result = {"args": vars(args), "rows": rows, "reload": reload,
              "runtime_s": round(runtime, 2)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def format_table(rows: list[dict]) -> str:
    def cell(k, v):
        if v is None:
            return "-"
        if isinstance(v, bool):
            return str(v)
        if k.endswith("acc"):
            return f"{v:.2f}"
        if k.endswith("bytes"):
            return f"{v:,}"
        return str(v)
    return tabulate([{k: cell(k, v) for k, v in r.items()} for r in rows], headers="keys", tablefmt="github",
                    disable_numparse=True)


def check_reload(lowered, out, x_all, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.save) if args.save else Path(tmp) / "digits_packed.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        robuq_fx.save_quantized(lowered, path)
        torch.manual_seed(args.seed + 1000)  # a different random init: nothing may come from it
        reloaded = robuq_fx.load_quantized(path, MLP())
        identical = torch.equal(logits(reloaded, x_all), out)
        return {"setting": SAVE_SETTING, "path": str(path) if args.save else None,
                "file_bytes": path.stat().st_size, "identical": identical}


if __name__ == "__main__":
    res = main()
    ok = all(r["packed == QAT"] is not False for r in res["rows"]) and res["reload"]["identical"]
    sys.exit(0 if ok else 1)
