"""The environment variables robuq_fx reads, in one table: what each one switches, its default, and whether a path
is opt-in until it has been measured or tested on a GPU. `robuq-fx kernels` prints it with the values set now;
tests/test_cli.py checks that every ROBUQ_* name the package reads is listed here."""
from __future__ import annotations

import os

# (name, default, what it does)
SWITCHES: tuple[tuple[str, str, str], ...] = (
    ("ROBUQ_KERNEL", "(auto)", "force one qlinear kernel: reference, triton_fp8, cuda_dequant, nunchaku"),
    ("ROBUQ_KERNEL_DISABLE", "(none)", "comma-separated kernels the registry never picks"),
    ("ROBUQ_FP8_MIN_M", "(table)", "smallest M on the fp8 path for every shape (below: cuda_dequant)"),
    ("ROBUQ_FP8_SMALL_M", "(table: 0)", "largest M for the one-kernel small-M path; off until measured"),
    ("ROBUQ_FP8_EPI", "(table)", "asymmetric / LRB terms: addmm after _scaled_mm, or triton (fused epilogue); "
                                 "stacked: symmetric absmax LRB layers as one _scaled_mm over K + 3r + 16 columns "
                                 "(lrb_stacked.py; the table's 'stacked' where it lists one)"),
    ("ROBUQ_FP8_GEMM", "(cuBLAS)", "triton: our fp8 GEMM also for symmetric layers without LRB"),
    ("ROBUQ_QUANT_KERNEL", "(table)", "gluon: the activation quantizer with hand-picked layouts "
                                      "(kernels/gluon_act_quant.py) wherever it applies; triton: never; unset: where "
                                      "the dispatch table measured it faster with equal codes ('quant_gluon'); mma: "
                                      "the rotation on tensor cores (kernels/triton_mma_quant.py: symmetric absmax, "
                                      "block 128; eager calls; 2-22x slower than the butterfly kernel on the H200)"),
    ("ROBUQ_GLUON_SIGMA", "1", "0: sigma-clipped layers (-a3 / -a2) keep the Triton quantizer where the table picks "
                               "the Gluon one (kernels/gluon_act_quant.py) for absmax layers"),
    ("ROBUQ_FP8_GEMM_KERNEL", "(table: pointer)", "tma: the persistent TMA-fed Triton GEMM; gluon: the Gluon "
                                                  "wgmma GEMM (kernels/gluon_fp8_gemm.py; slower on the H200)"),
    ("ROBUQ_FP8_FUSED_QUANT", "(table)", "1: the activation quantizer inside the fp8 GEMM (kernels/gluon_qgemm.py; "
                                         "W4A4+H style layers, K <= 1152; GPU tests pass, slower on the H200); ws: "
                                         "its warp-specialized form (kernels/gluon_qgemm_ws.py; rank-32 and 65..96 "
                                         "branches stacked in it; equal, 2.1-2.6x slower on the H200); 0: "
                                         "neither; unset: ws where the dispatch table measured it faster "
                                         "('fused_ws', 'fused_ws_lrb', 'fused_ws_terms')"),
    ("ROBUQ_FP8_DOWN_IN_GEMM", "(table)", "1: LRB layers on the Triton epilogue GEMM compute the branch's "
                                          "down-projection in its K loop (no lrb_down launch; for few rows; "
                                          "interpreter-checked, not yet timed); 0: never; unset: the table's "
                                          "'down_in_gemm'"),
    ("ROBUQ_LRB_DOWN_SPLIT", "(by M)", "at most this many K ranges for the branch's down-projection kernel at few "
                                       "rows (1: no split, no reduce kernel), for A/B runs"),
    ("ROBUQ_GLUON_GEMM_CFG", "(table)", "index into gluon_fp8_gemm.CONFIGS, for sweeps"),
    ("ROBUQ_TMA_GEMM_CFG", "(table)", "index into TMA_GEMM_CONFIGS, for sweeps"),
    ("ROBUQ_ROWQ_TILING", "(tuned)", "rows,warps of the per-row quantizer, for sweeps"),
    ("ROBUQ_WEIGHT_LAYOUT", "fp8", "packed: keep the packed bytes as the buffer on fp8 GPUs too (the fp8 path then "
                                   "caches a converted copy)"),
    ("ROBUQ_ATTENTION", "(table)", "fused: the single Triton attention8 kernel; prequant: k / v quantized first, "
                                   "then the flash kernel (same output); rows: the row kernel + flash SDPA; "
                                   "reference: torch math; unset: the flash kernel where the dispatch table's "
                                   "'attention' measured it faster, else the row kernel + SDPA"),
    ("ROBUQ_HADAMARD", "(matmul)", "fht: fast-hadamard-transform's CUDA kernel for the rotation where the torch "
                                   "math runs (equal up to rounding, not bit-identical)"),
    ("ROBUQ_INDUCTOR_DECOMPOSE", "qat,qlinear", "what torch.compile decomposes, a comma list of qat (the QAT ops), "
                                                "qlinear, attention8 (into our Triton kernels + ATen); 1: all, 0: none"),
    ("ROBUQ_INDUCTOR_GLUON_QUANT", "1", "0: compiled graphs under CUDA graphs take the Triton quantizer where "
                                        "the table picks the Gluon one (kept there through an opaque op)"),
    ("ROBUQ_GELU_FORM", "exact", "fast: a tanh GELU fused into our kernels (input_act / output_act) computed as "
     "x sigma(2 inner) on the special-function unit (~8 instructions a value against ATen's ~31; a rare value one "
     "bf16 step from torch's); exact: ATen's formula, bit-equal"),
    ("ROBUQ_BLOCK_QUANT_ROT", "mma", "butterfly: the a_group = 128 block quantizer (kernels/triton_block_quant.py) "
     "rotates with the per-token quantizer's butterfly instead of tensor cores (slower on the H200)"),
    ("ROBUQ_BLOCK_GEMM", "(cublas)", "triton: a_group = 128 layers without a branch take our block-scaled Triton GEMM "
     "instead of cuBLAS's 1 x 128 blockwise _scaled_mm (kernels/block_scaled.py)"),
    ("ROBUQ_STACKED_ASYM", "1", "0: asymmetric LRB layers (the -a3 / -a2 policies) keep the Triton epilogue GEMM "
     "instead of the stacked mode (the offset term as digit columns in its padding, rows out of e4m3's range "
     "rescued: kernels/lrb_stacked.py)"),
    ("ROBUQ_STACKED_WIDE", "1", "0: LRB layers of rank 65..128 (the sibling-fused q/k/v's 96) keep the "
     "warp-specialized kernel's two-box layout (its terms form) and the Triton epilogue GEMM instead of the stacked "
     "mode's flat layout (3r + 16 columns, kernels/lrb_stacked.py)"),
    ("ROBUQ_STACKED_QUANT", "", "fused: the stacked LRB mode's codes from one kernel (quantizer + lrb_split, x read "
     "once, the rotation on tensor cores: kernels/triton_mma_quant.py)"),
    ("ROBUQ_INDUCTOR_LOWRANK_ADD", "1", "0: compiled LRB / asymmetric layers in ROBUQ_FP8_EPI=addmm mode take the "
                                        "Triton epilogue GEMM instead of tracing _scaled_mm + the low-rank add kernel"),
    ("ROBUQ_TRITON_FAST_LAUNCH", "1", "0: launch Triton kernels through kernel[grid] (also turns bound calls off)"),
    ("ROBUQ_DIRECT_CALL", "1", "0: eager PackedLinear calls go through the robuq::qlinear op"),
    ("ROBUQ_QAT_FUSED", "1", "0: eager QAT runs the op graph instead of one autograd node a layer"),
    ("ROBUQ_QAT_WEIGHT_KERNEL", "1", "0: QAT on CUDA computes Q_w(R) (and R = W H - A B in fp32) with ~12 ATen "
                                     "kernels over the weight instead of one Triton kernel"),
    ("ROBUQ_QAT_WSIDE_KERNEL", "1", "0: weight_sides_per_forward / the backend's step mode compute every layer's "
                                    "weight side op by op (11-14 ATen kernels a layer each way, in CUDA graphs) "
                                    "instead of one grouped Triton launch a Hadamard block size each way: Q_w(W H - "
                                    "A B), A, B or B H and the bias forward; g_W, A's and the bias's gradients "
                                    "backward (triton_wside.py, triton_wgrad.py)"),
    ("ROBUQ_QAT_STEP_WEIGHTS", "auto", "0: a torch.compile'd QAT model from robuq_fx.quantize keeps each layer's "
                                       "weight side in the compiled graph instead of all of them once a forward "
                                       "(qat_step_hooks.py; H200 paper step 1.11x vs 1.81x FP); cudagraphs "
                                       "(experimental, not yet timed): also under CUDA graph modes, the weight sides "
                                       "at fixed addresses (qat_step.Plan.static_fwd)"),
    ("ROBUQ_QAT_WEIGHT_GRAPH", "1", "0: eager QAT computes each layer's Q_w(R) and its backward's weight side with "
                                    "ATen calls instead of replaying them from CUDA graphs (qat_graph.py; H200, "
                                    "DiT-XL/2 paper policy: 526 -> 370 ms a step)"),
    ("ROBUQ_QAT_LAYER_GRAPH", "1", "0: eager QAT replays only each layer's weight side from CUDA graphs, not its "
                                   "whole forward and backward (qat_graph.py; H200, DiT-XL/2 paper policy: 1.53x FP "
                                   "with whole layers, 1.97x without)"),
    ("ROBUQ_QAT_FP8", "0", "1: eager QAT's forward GEMM on fp8 tensor cores (W<=4, A<=4 symmetric absmax, bf16, "
                           "no low-rank branch; GPU test passes; no clear gain in the H200 eager step)"),
    ("ROBUQ_QAT_ACT_KERNEL", "1", "0: with weight_sides_per_forward, CUDA QAT layers with symmetric absmax "
                                  "activations keep the op graph's activation side (~5 launches forward, ~3 backward) "
                                  "instead of one triton_op for [Q_a(x H), x (B H)^T] and one kernel for its input "
                                  "gradient (kernels/qat_act.py; H200, DiT-XL/2 paper policy compiled: 1.41x FP with "
                                  "it, 1.53-1.60x without); unset, it also goes into compiled QAT layers without the "
                                  "step hooks under CUDA graph modes (mode='reduce-overhead'; paper policy 1.488x FP "
                                  "with it, 1.52x without in other calls); 1 (set explicitly): into those layers in "
                                  "every mode (fullgraph=True, DDP: qat_linear._act_supported), naming those it leaves"),
    ("ROBUQ_GIT_COMMIT", "(git)", "not a switch: the commit the benchmarks record where the checkout has no git "
                                  "history (left out of the compile-cache key, kernels/compile_cache.py)"),
)


def env_int(name: str) -> int | None:
    """The integer the environment variable `name` holds, None where it is unset or empty; anything else is an error
    naming the variable (int()'s own message does not say which one)."""
    env = os.environ.get(name)
    if not env:
        return None
    try:
        return int(env)
    except ValueError:
        raise ValueError(f"{name}={env!r}: expected an integer (robuq-fx kernels lists the switches)") from None


def names() -> list[str]:
    return [s[0] for s in SWITCHES]


def table() -> str:
    from tabulate import tabulate
    rows = [{"variable": n, "set to": os.environ.get(n, ""), "default": d, "what it does": w} for n, d, w in SWITCHES]
    return tabulate(rows, headers="keys", tablefmt="github")
