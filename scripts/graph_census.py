"""What the graph Inductor receives for a lowered DiT holds, op by op: the forward traced by torch.compile through
AOTAutograd (functionalized, robuq's decompositions applied: kernels/inductor.py), without compiling it. Prints the
call counts by target and, for the targets named by --watch, each node with the last frames of its stack trace, so
that a kernel seen in a profile (session 13's batch-1 profile: a `triton_poi_fused_lift_fresh_0` copy kernel in
every block, which session 12's did not have) can be traced to the line that makes it.

    python scripts/graph_census.py                              # DiT-XL/2 paper policy, batch 1, on the GPU
    python scripts/graph_census.py --model tiny --device cpu    # the same on the CPU (decompositions off there)
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _dit_setup import TINY, XL2, build, inputs  # noqa: E402

import robuq_fx  # noqa: E402


def census(gm: torch.fx.GraphModule, watch: list[str], frames: int) -> collections.Counter:
    counts = collections.Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        counts[name] += 1
        if any(w in name for w in watch):
            trace = (node.meta.get("stack_trace") or "").strip().splitlines()
            print(f"--- {node.name}: {name}")
            for line in trace[-2 * frames:]:
                print("    " + line.strip())
    return counts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["xl2", "tiny"], default="xl2")
    ap.add_argument("--policy", default="dit-xl-2-robuq")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--watch", nargs="*", default=["lift_fresh", "_to_copy", "copy_", "clone"])
    ap.add_argument("--frames", type=int, default=3, help="stack frames shown per watched node")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    cfg = XL2 if args.model == "xl2" else TINY
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    x = inputs(cfg, args.batch, args.device, dtype)
    model = build(cfg).to(args.device, dtype)
    q = robuq_fx.quantize(model, robuq_fx.Policy.load(args.policy), example_inputs=inputs(cfg, 2, args.device, dtype))
    low = robuq_fx.lower(q, progress=False).to(args.device).eval()
    total = collections.Counter()

    def fw(gm, example_inputs):
        total.update(census(gm, args.watch, args.frames))
        return make_boxed_func(gm.forward)

    with torch.no_grad():
        torch.compile(low, backend=aot_autograd(fw_compiler=fw))(**x)
    print(f"\n{sum(total.values())} call_function nodes; by target:")
    for name, n in total.most_common(args.top):
        print(f"{n:6d}  {name}")


if __name__ == "__main__":
    main()
