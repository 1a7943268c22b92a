"""DiT-XL/2 benchmark setup shared by bench_dit.py and profile_dit.py: the model configs (random init), example
inputs, the robuq policies timed, CUDA-event timing, and the resident-bytes accounting of quantized layers."""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import robuq_fx  # noqa: E402
from robuq_fx.modules import PackedLinear  # noqa: E402

XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
           sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=32)
TINY = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=32)


def build(cfg):
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    m = DiTTransformer2DModel(**cfg)
    m.config.class_dropout_prob = 0.0  # no label dropout: outputs comparable in train mode
    return m.eval()


def inputs(cfg, b, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(b)
    s = cfg["sample_size"]
    return {"hidden_states": torch.randn(b, cfg["in_channels"], s, s, generator=g).to(device, dtype),
            "timestep": torch.randint(0, 1000, (b,), generator=g).to(device),
            "class_labels": torch.randint(0, cfg["num_embeds_ada_norm"], (b,), generator=g).to(device),
            "return_dict": False}


def policies():
    dit = robuq_fx.Policy.load("dit").to_dict()
    ternary = copy.deepcopy(dit)
    ternary["rules"][1]["w_bits"] = 1.58
    grouped = copy.deepcopy(dit)  # issue 20's a_group: one activation range per token and Hadamard block of 128
    grouped["rules"][1]["a_group"] = 128
    paper = robuq_fx.Policy.load("dit-xl-2-robuq").to_dict()
    paper_grouped = copy.deepcopy(paper)
    for rule in paper_grouped["rules"]:
        if "a_bits" in rule:
            rule["a_group"] = 128
    return {"robuq W4A4+H": dit, "robuq W1.58A4+H": ternary, AG128: grouped, PAPER: paper, PAPER_AG128: paper_grouped,
            PAPER_A3: robuq_fx.Policy.load("dit-xl-2-robuq-a3").to_dict(),
            PAPER_A2: robuq_fx.Policy.load("dit-xl-2-robuq-a2").to_dict()}


# (not matched by --settings "dit-xl-2-robuq (")
PAPER_AG128 = "robuq dit-xl-2-robuq(ag128) (W1.58A4+H+LRB32, attn 8, a_group 128)"
AG128 = "robuq W4A4(ag128)+H"  # (no "W4A4+H" in it: --settings W4A4+H keeps selecting the per-token row alone)
PAPER = "robuq dit-xl-2-robuq (W1.58A4+H+LRB32, attn 8)"
PAPER_A3 = "robuq dit-xl-2-robuq-a3 (W1.58A3 asym sigma +H+LRB32, attn 8)"
PAPER_A2 = "robuq dit-xl-2-robuq-a2 (W1.58A2 asym sigma +H+LRB32, attn 8)"
# the short setting names profile_dit.py and scripts/inductor_code.py take, to the policies() keys
SHORT_NAMES = {"dit": "robuq W4A4+H", "w158": "robuq W1.58A4+H", "paper": PAPER, "paper-a3": PAPER_A3,
               "paper-a2": PAPER_A2}

def time_once(fn, device) -> float:
    """ms of one call of fn, the device idle at its start (CUDA events on the GPU, perf_counter on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def timeit(fn, iters, warmup, device):
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(iters))


def recompile_room(models: int):
    """Dynamo's config patched to hold `models` compiled models side by side (each model's forward is one more
    compiled entry of the same code object): the benchmarks that interleave settings."""
    import torch._dynamo.config as dc
    limit = "recompile_limit" if hasattr(dc, "recompile_limit") else "cache_size_limit"  # (older torch's name)
    return dc.patch(**{limit: max(getattr(dc, limit), 8 * models),
                       "accumulated_recompile_limit": max(dc.accumulated_recompile_limit, 64 * models)})


def _unique_bytes(tensors, seen: set) -> int:
    total = 0
    for x in tensors:
        if isinstance(x, torch.Tensor) and x.numel():
            key = (x.untyped_storage().data_ptr(), x.device)
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
    return total


def quantized_weight_bytes(model) -> tuple[int, int, int]:
    """(resident bytes of the quantized layers' buffers + every kernel-side weight cache, each storage counted once;
    bf16 bytes of the same weights; of which kernel caches)."""
    seen: set = set()
    res = bf16 = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            res += _unique_bytes(m.buffers(recurse=False), seen)
            bf16 += 2 * m.in_features * m.out_features + (2 * m.out_features if m.bias is not None else 0)
    cache = kernel_cache_bytes(seen)
    return res + cache, bf16, cache


def model_bytes(model) -> int:
    """GPU bytes a model holds while it is idle: its parameters and buffers (each storage once) and, for a lowered
    model, the kernels' weight caches of its layers (bench_dit's per-model peak memory starts from this)."""
    seen: set = set()
    own = _unique_bytes([t for t in (*model.parameters(), *model.buffers()) if t.is_cuda], seen)
    return own + kernel_cache_bytes(seen)


def kernel_cache_bytes(seen: set | None = None) -> int:
    """GPU weight caches of the fp8 / dequant kernels (fp8 codes, bf16 dequantized weights, scales, B H) that are
    not the modules' own buffers."""
    try:
        from robuq_fx.kernels import triton_fp8 as t
    except ImportError:
        return 0
    seen = set() if seen is None else seen
    total = 0
    for e in list(t._WCACHE.values()):
        stk = getattr(e, "stk", None)  # the stacked LRB mode's extended weight (shares qweight's storage on fp8)
        total += _unique_bytes([e.fp8, e.sw, e.cs, *e.deq.values(), *e.bh.values(), stk and stk.w], seen)
    return total
