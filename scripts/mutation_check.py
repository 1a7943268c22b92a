#!/usr/bin/env python
"""Mutation check: do the tests notice a wrong method? (issue 16)

Applies deliberate bugs to the math, one at a time, in a temporary copy of the repository, runs the tests that
should notice each, and writes benchmarks/results/summary_mutation.json: `mutants`, `caught`, `survivors`, and per
mutant the tests that failed. Every mutant must be caught (exit status 1 otherwise).

    .venv/bin/python scripts/mutation_check.py                 # all mutants, the working tree as it is
    .venv/bin/python scripts/mutation_check.py --head          # the committed tree (HEAD) instead
    .venv/bin/python scripts/mutation_check.py --only lrb_sign_flip hadamard_unnormalised --fast
    PYTHONPATH=/tmp/trit .venv/bin/python scripts/mutation_check.py    # with a triton: the interpreter tests run too

Each mutant is (file, exact old text, new text): the old text must occur exactly once, or the check stops (a mutant
that silently stops applying after a refactor would look "caught" by nothing, or "survived" for the wrong reason).
robuq_fx is installed editable from this repository, so the copy is imported explicitly: pytest runs in-process in a
Python started in the copy with PYTHONPATH=<copy>, and that process checks `robuq_fx.__file__` is inside the copy
before any test runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "summary_mutation.json"
ORACLE = ["tests/test_oracle_math.py", "tests/test_oracle_layers.py"]
Q, L, P = "robuq_fx/quantizers.py", "robuq_fx/layer.py", "robuq_fx/packing.py"

# name, file, old, new, what it breaks, tests to run (paths, then optional pytest args such as -k)
MUTANTS = [
    ("lrb_sign_flip", L, "    return a.to(wide) - b.to(wide)", "    return a.to(wide) + b.to(wide)",
     "R = W H + A B: the low-rank branch's sign flipped in layer.residual (its fp32 `wide_difference`)",
     ORACLE + ["tests/test_seed.py", "tests/passes/test_lower.py"]),
    ("sigma_sym_is_absmax", Q, "r = torch.minimum(mu.abs() + c * sigma, x32.abs().amax(dim=-1, keepdim=True))",
     "r = x32.abs().amax(dim=-1, keepdim=True)", "symmetric sigma clipping replaced by absmax",
     ORACLE + ["tests/test_quantizers.py", "tests/test_ops.py"]),
    ("act_round_half_up_sym", Q, "q = torch.round(x32 / safe).clamp_(-qmax, qmax)",
     "q = torch.floor(x32 / safe + 0.5).clamp_(-qmax, qmax)",
     "symmetric activation codes rounded half up instead of half to even",
     ORACLE + ["tests/test_quantizers.py"]),
    ("act_round_half_up_asym", Q, "q = torch.round((x32 - lo) / safe).clamp_(0, levels)",
     "q = torch.floor((x32 - lo) / safe + 0.5).clamp_(0, levels)",
     "asymmetric activation codes rounded half up instead of half to even",
     ORACLE + ["tests/test_quantizers.py"]),
    ("hadamard_unnormalised", "robuq_fx/hadamard.py", "return h / (b ** 0.5)", "return h",
     "Hadamard matrix without its 1/sqrt(b) scale", ORACLE + ["tests/test_hadamard.py"]),
    ("unpack3_shift_off_by_one", P, "src = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)",
     "src = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 15)", "3-bit unpack: third byte shifted by 15 instead of 16",
     ORACLE + ["tests/test_packing.py"]),
    ("lrb_unrotated_input", L, "return stacked_linear(xq, F.linear(xh, lrb_down), wq, lrb_up, bias)",
     "return stacked_linear(xq, F.linear(x, lrb_down), wq, lrb_up, bias)", "the low-rank branch fed the unrotated x",
     ORACLE + ["tests/passes/test_lower.py"]),
    ("weight_scale_denominator", Q, "s = _div(rg.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS), qmax)",
     "s = _div(rg.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS), qmax + 1)",
     "k-bit weight scale max|R| / 2^(k-1) instead of / (2^(k-1) - 1)", ORACLE + ["tests/test_quantizers.py"]),
    ("act_asym_scale_denominator", Q, "s = _div(hi - lo, levels)", "s = _div(hi - lo, levels + 1)",
     "asymmetric activation scale (hi - lo) / 2^k instead of / (2^k - 1)", ORACLE + ["tests/test_quantizers.py"]),
    ("act_asym_offset_sign", Q, "out = scale * q if sym else lo + scale * q",
     "out = scale * q if sym else scale * q - lo", "asymmetric dequantization subtracts the offset",
     ORACLE + ["tests/test_quantizers.py"]),
    ("ternary_absmax", Q, "s = rg.abs().mean(dim=-1, keepdim=True).clamp_min(_EPS)",
     "s = rg.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS)", "ternary scale absmax instead of absmean",
     ORACLE + ["tests/test_quantizers.py"]),
    ("ternary_threshold", Q, "s = rg.abs().mean(dim=-1, keepdim=True).clamp_min(_EPS)",
     "s = (0.7 * rg.abs().mean(dim=-1, keepdim=True)).clamp_min(_EPS)",
     "ternary threshold 0.35 mean|R| (TWN-style 0.7 scale) instead of 0.5 mean|R|", ORACLE),
    ("pack3_byte_order", P, "v = torch.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], dim=1)",
     "v = torch.stack([(v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF], dim=1)",
     "3-bit pack writes its 24-bit word big-endian", ORACLE + ["tests/test_packing.py"]),
    ("ste_mask_strict", Q, "return (x32 >= lo) & (x32 <= hi)", "return (x32 > lo) & (x32 < hi)",
     "activation STE blocks the gradient at the range ends", ORACLE + ["tests/test_ops.py"]),
    ("ampn_budget_off_by_one", "robuq_fx/ampn.py", "cap = math.floor(budget * W) - bmin * W",
     "cap = math.floor(budget * W) - bmin * W + 1", "AMPN knapsack allows one bit over the budget",
     ["tests/test_ampn.py", "-k", "choose_bits or budget"]),
    ("scale_dtype_not_applied", Q, "s = s.to(_DTYPES[scale_dtype]).to(rg.dtype)", "s = s",
     "codes computed with the fp32 scale, not the stored bf16/fp16 one", ORACLE),
    ("weight_round_half_up", Q, "codes = torch.round(rg / torch.where(s > 0, s, torch.ones_like(s)))",
     "codes = torch.floor(rg / torch.where(s > 0, s, torch.ones_like(s)) + 0.5)", "weight codes rounded half up",
     ORACLE + ["tests/test_quantizers.py"]),
    ("sigma_sym_levels", Q, "c = gaussian_clip(2 ** a_bits - 1)", "c = gaussian_clip(2 ** a_bits)",
     "symmetric sigma range with the c of 2^k levels instead of 2^k - 1", ORACLE),
    ("sigma_sample_std", Q, "sigma = x32.std(dim=-1, keepdim=True, unbiased=False)",
     "sigma = x32.std(dim=-1, keepdim=True, unbiased=True)", "sigma range from the sample std, not population",
     ORACLE),
    ("act_constant_token_nan", Q,
     "s = _div(hi - lo, levels)\n        safe = torch.where(s > 0, s, torch.ones_like(s))",
     "s = _div(hi - lo, levels)\n        safe = s", "asymmetric s = 0 tokens divide by zero",
     ORACLE + ["tests/test_quantizers.py"]),
    ("residual_unrotated_weight", L, "w = rotate_fn(weight, spec)", "w = weight",
     "R = W - A B: the weight not rotated", ORACLE),
    ("lrb_init_split", L, "root = s[:r].sqrt()", "root = s[:r]",
     "SVD initialisation A = U S, B = S V^T (A B = U S^2 V^T)", ORACLE),
    ("stacked_split_pairs", "robuq_fx/kernels/lrb_layout.py",
     "ext[:, :r], ext[:, r:2 * r], ext[:, 2 * r:3 * r] = v1, v2, v1",
     "ext[:, :r], ext[:, r:2 * r], ext[:, 2 * r:3 * r] = v1, v2, v2",
     "the stacked LRB mode pairs u2 with v2 instead of v1 (drops the u2 v1 term)", ["tests/kernels/test_lrb_stacked.py"]),
    ("terms_form_v2_box", "robuq_fx/kernels/lrb_layout.py", "ext[:, :r], ext[:, 128:128 + r] = v1, v2",
     "ext[:, :r], ext[:, 128:128 + r] = v1, v1",
     "the warp-specialized kernel's terms form (rank > 64) pairs u1 with v1 twice (drops the u1 v2 term)",
     ["tests/kernels/test_gluon_qgemm_ws.py"]),
    ("stacked_scale_c_dropped", "robuq_fx/kernels/lrb_layout.py", "v = up.float() * c / sw.view(-1, 1)",
     "v = up.float() / sw.view(-1, 1)", "the stacked LRB mode's weight side without the power-of-two c",
     ["tests/kernels/test_lrb_stacked.py"]),
    ("default_act_sym_from_4_bits", "robuq_fx/spec.py",
     "return self.a_sym if self.a_sym is not None else self.a_bits >= 3",
     "return self.a_sym if self.a_sym is not None else self.a_bits >= 4",
     "3-bit activations asymmetric by default (METHOD.md: symmetric for a_bits >= 3)", ORACLE),
    ("compiled_hadamard_unnormalised", "robuq_fx/kernels/inductor.py",
     "h = hadamard_matrix(block, x.dtype, x.device)", "h = hadamard_matrix(block, x.dtype, x.device) * block ** 0.5",
     "the compiled graph's Hadamard constant without its 1/sqrt(b)",
     ["tests/kernels/test_inductor.py", "-k", "qat_step"]),
    ("compile_cache_ignores_settings", "robuq_fx/kernels/compile_cache.py",
     'if k.startswith("ROBUQ_") and k not in _NOT_KEYED', 'if k.startswith("ROBUQ_NONE_") and k not in _NOT_KEYED',
     "torch.compile's caches blind to the ROBUQ_* settings: a warm cache answers with another setting's graph",
     ["tests/kernels/test_compile_cache.py"]),
    ("gaussian_clip_traced", Q, "    with _disable_current_modes():\n        return _golden_section(levels)",
     "    return _golden_section(levels)",
     "the sigma clip constant computed under the tracer's modes (a trace records its grid and fails)",
     ["tests/test_quantizers.py", "-k", "tracers"]),
    ("graph_calls_skip_derived", "robuq_fx/passes/fuse.py", 'kwargs[derived] = g.get_attr(f"{path}.{derived}")',
     "pass", "lowered graphs call qlinear without the layer's B H and column sums (every forward recomputes them)",
     ["tests/kernels/test_rotated_down.py"]),
    ("output_act_dropped", "robuq_fx/kernels/qlinear.py",
     "        return apply_input_act(fn(x, dataclasses.replace(args, output_act=\"\")), act)",
     "        return fn(x, dataclasses.replace(args, output_act=\"\"))",
     "a layer's output activation not applied by kernels that do not fuse it (the reference)",
     ["tests/passes/test_act_fuse.py", "-k", "producer or output_act"]),
    ("act_group_ignored", "robuq_fx/quantizers.py",
     "        return fake_quant_act(_act_groups(x, group), a_bits, sym, clip).reshape(x.shape)",
     "        return fake_quant_act(x, a_bits, sym, clip)",
     "a_group's fake-quant computed per token (the group ignored)",
     ["tests/test_act_group.py"]),
    ("block_scale_one_block", "robuq_fx/kernels/triton_fp8_kernels.py", "            s_ptrs += stride_sk\n", "",
     "the block-scaled GEMM applies the first K block's scales to every block",
     ["tests/kernels/test_block_scaled.py", "-k", "interpreter"]),
    ("sigma_second_piece_deviation_dropped", "robuq_fx/kernels/triton_act_quant.py",
     "            m2 += _dev2(y1, mu)\n", "            m2 += 0.0\n",
     "the sigma quantizer's one-row moments leave the second piece out of the deviation sum",
     ["tests/kernels/test_act_quant_interpreted.py"]),
    ("out_quant_head_overlap", "robuq_fx/kernels/triton_fp8_kernels.py",
     "head = (loc >= j * D) & (loc < (j + 1) * D)", "head = (loc >= j * D) & (loc <= (j + 1) * D)",
     "the GEMM's per-head fake-quant store lets a head's range take the next head's first column",
     ["tests/kernels/test_out_quant.py", "-k", "row_math"]),
    ("colsum_not_refreshed", "robuq_fx/modules.py", "        self._refresh_colsum()\n", "",
     "the asymmetric layers' column sums not remade with the weight",
     ["tests/kernels/test_colsum_buffer.py"]),
    ("roomy_plan_bound", "robuq_fx/kernels/quantizer.py", "_ROOMY_PER_THREAD = 72", "_ROOMY_PER_THREAD = 144",
     "sigma / GELU quantizer plans hold 144 row values a thread (the spilling tiling)",
     ["tests/kernels/test_roomy_plans.py"]),
    ("attention_choice_any_size", "robuq_fx/kernels/dispatch.py",
     "    if not (near <= 2 * rows and rows <= 2 * near):\n        return None\n", "",
     "the attention table's winner at one size applied at any size (batch 64's choice at batch 1)",
     ["tests/kernels/test_attention_dispatch.py"]),
    ("graph_replay_without_copy_in", "robuq_fx/qat_graph.py",
     "    _copy_in(g.inputs, copy_in)\n    backend().replay(g.graph, device)", "    backend().replay(g.graph, device)",
     "a QAT layer's CUDA graph replayed on the previous call's input (x / g not copied in)",
     ["tests/test_qat_graph.py"]),
    ("step_branch_grad_dropped", "robuq_fx/qat_step.py", "g_w, g_up, g_down = _weight_grads(g_wide, p_down, down,",
     "g_w, g_up, g_down = _weight_grads(g_wide, None if p_down is None else torch.zeros_like(p_down), down,",
     "weight_sides_per_forward loses the branch's g_t^T x H term of B's gradient", ["tests/test_qat_step.py"]),
    ("qat_act_grad_no_branch", "robuq_fx/kernels/triton_qat_act.py", "    acc = tl.dot(t, b, acc)\n", "",
     "the compiled QAT activation op's input gradient loses g_t (B H) (ROBUQ_QAT_ACT_KERNEL)",
     ["tests/kernels/test_qat_act_interpreted.py", "-k", "op_graph"]),
    ("qat_act_down_not_rotated", "robuq_fx/qat_step.py",
     "            down = qat_act.through_h(_to(down, c), layer.module.spec)  # B H, what the layer's op takes",
     "            down = _to(down, c)",
     "with ROBUQ_QAT_ACT_KERNEL the weight side hands over B instead of B H (t = x B^T)",
     ["tests/kernels/test_qat_act_interpreted.py", "-k", "training"]),
    ("qat_act_grad_fp64_scale", "robuq_fx/kernels/triton_qat_act.py",
     "    hscale = tl.cast(hscale, tl.float32)  # fp64 when Inductor launches it (see triton_act_quant)\n", "",
     "the act op's backward kernel keeps Inductor's fp64 hscale: an fp64 accumulator tl.dot refuses (session 22)",
     ["tests/kernels/test_qat_act_traced.py", "-k", "sm90"]),
    ("backend_builds_on_fakes", "robuq_fx/backend/runtime.py",
     "        if not any(isinstance(t, FakeTensor) for t in example_inputs):", "        if True:",
     "the compile backend builds on DDPOptimizer's fake example inputs (every branch refused under DDP)",
     ["tests/test_backend_ddp.py"]),
    ("step_graphs_one_key", "robuq_fx/qat_step_kernels.py", "MAX_KEYS = 64", "MAX_KEYS = 1",
     "the step weight sides keep one CUDA graph a plan: a graph shared by several blocks is not replayed",
     ["tests/test_backend.py", "-k", "shared_graph"]),
    ("hadamard_lifted_every_use", "robuq_fx/kernels/inductor.py", "    if hit is not None and hit[0]() is mode:",
     "    if False:", "H lifted anew at every use in a traced QAT graph: siblings' rotations of one input not merged",
     ["tests/kernels/test_inductor.py", "-k", "siblings"]),
    ("auto_hooks_under_fullgraph", "robuq_fx/qat_step_hooks.py",
     '        if tx.one_graph or bool(getattr(tx, "error_on_graph_break", False)):', "        if False:",
     "quantize's automatic weight-side hooks break the graph under fullgraph=True (torch.compile raises)",
     ["tests/test_qat_step_hooks.py"]),
    ("auto_hooks_in_eval", "robuq_fx/qat_step_hooks.py",
     "    if not (torch.compiler.is_compiling() and module.training):",
     "    if not torch.compiler.is_compiling():",
     "quantize's automatic weight-side hooks engage in eval mode too", ["tests/test_qat_step_hooks.py"]),
    ("auto_hooks_under_cudagraphs", "robuq_fx/qat_step_hooks.py",
     "        if _cudagraphs(tx.output.compiler_fn):", "        if False:",
     "quantize's automatic weight-side hooks engage under mode='reduce-overhead' (every step re-recorded on a GPU)",
     ["tests/test_qat_step_hooks.py", "-k", "stay_off"]),
    ("act_op_layer_takes_b", "robuq_fx/layer.py",
     "torch.cat([wq, lrb_up.to(c)], 1), through_h(lrb_down.to(c), spec), bias_c, True, spec)",
     "torch.cat([wq, lrb_up.to(c)], 1), lrb_down.to(c), bias_c, True, spec)",
     "the per-layer activation op (ROBUQ_QAT_ACT_KERNEL=1) handed B instead of B H", ["tests/test_qat_act_layer.py"]),
    ("wside_group_scales_at_row_0", "robuq_fx/kernels/triton_wside.py",
     "            by_block.setdefault(it.spec.hadamard_block, []).append((it, rows))",
     "            by_block.setdefault(it.spec.hadamard_block, []).append((it, 0))",
     "the grouped one-kernel weight side writes every layer's scales from row 0 (ROBUQ_QAT_WSIDE_KERNEL)",
     ["tests/kernels/test_wquant_interpreted.py", "-k", "group"]),
    ("wside_group_b_unrotated", "robuq_fx/kernels/triton_wside.py",
     "            v = tl.where(b_mode == 2, bh, bc.to(tl.float32))", "            v = bc.to(tl.float32)",
     "the grouped weight side writes B_c where the act op's layer takes B H",
     ["tests/kernels/test_wquant_interpreted.py", "-k", "group_writes"]),
    ("wgrad_group_drops_g_a_prime", "robuq_fx/kernels/triton_wgrad.py",
     "                 -_round_to(acc, CDT) + tail.to(tl.float32), mask=amask)",
     "                 -_round_to(acc, CDT), mask=amask)",
     "the grouped backward writes A's gradient without the stacked GEMM's own term g_A'",
     ["tests/kernels/test_wquant_interpreted.py", "-k", "grads_group or one_kernel_follow"]),
    ("wgrad_group_bias_skipped", "robuq_fx/kernels/triton_wgrad.py",
     "    if tl.load(d + 12) != 0:  # the bias's gradient, cast", "    if False:",
     "the grouped backward leaves the bias's gradient slot unwritten",
     ["tests/kernels/test_wquant_interpreted.py", "-k", "grads_group or one_kernel_follow"]),
    ("qat_switch_read_in_trace", "robuq_fx/qat_linear.py",
     "    if not plain_eager(x) or not x.is_floating_point():\n        return False\n    if _FUSED_OFF[0] is None:\n"
     "        import os\n        _FUSED_OFF[0] = os.environ.get(\"ROBUQ_QAT_FUSED\", \"1\") == \"0\"\n",
     "    if _FUSED_OFF[0] is None:\n        import os\n        _FUSED_OFF[0] = os.environ.get(\"ROBUQ_QAT_FUSED\", "
     "\"1\") == \"0\"\n    if not plain_eager(x) or not x.is_floating_point():\n        return False\n",
     "a compiled QAT model's trace reads ROBUQ_QAT_FUSED's unset switch (a second compile at the next call)",
     ["tests/test_qat_fused.py", "-k", "compiles_once"]),
    ("direct_switch_read_in_trace", "robuq_fx/modules.py",
     "    if (x.requires_grad and torch.is_grad_enabled()) or not plain_eager(x):\n        return False\n",
     "    if _DIRECT[0] is None:\n        _DIRECT[0] = True\n"
     "    if (x.requires_grad and torch.is_grad_enabled()) or not plain_eager(x):\n        return False\n",
     "a compiled lowered model's trace reads ROBUQ_DIRECT_CALL's unset switch (a second compile at the next call)",
     ["tests/test_direct_call.py", "-k", "compiles_once"]),
    ("act_op_not_default_under_cudagraphs", "robuq_fx/qat_linear.py",
     "    if not explicit and not (qat_act.enabled() and tracing_for_cudagraphs()):", "    if not explicit:",
     "the per-layer activation op stays opt-in under CUDA graph modes (its default there since session 28)",
     ["tests/test_qat_act_layer.py", "-k", "cuda_graph"]),
    ("act_op_default_warns", "robuq_fx/qat_linear.py",
     "        if explicit and (why, spec.short(), k) not in _ACT_WARNED:",
     "        if (why, spec.short(), k) not in _ACT_WARNED:",
     "the act op's default under CUDA graphs warns about the layers it leaves (only ROBUQ_QAT_ACT_KERNEL=1 should)",
     ["tests/test_qat_act_layer.py", "-k", "cuda_graph"]),
    ("static_forward_buffers_rotate", "robuq_fx/qat_step.py",
     "        if self.static_fwd and self._fwd_graphs.get(key):", "        if False:",
     "under CUDA graph modes (ROBUQ_QAT_STEP_WEIGHTS=cudagraphs) the plan's forward buffers rotate (a re-recording "
     "every step on a GPU)", ["tests/test_qat_step.py", "-k", "static_forward"]),
    ("cudagraphs_switch_ignored", "robuq_fx/qat_step_hooks.py",
     "            return STATIC if switch == \"cudagraphs\" else OFF", "            return OFF",
     "ROBUQ_QAT_STEP_WEIGHTS=cudagraphs leaves the hooks off under CUDA graph modes",
     ["tests/test_qat_step_hooks.py", "-k", "cudagraphs_switch"]),
    ("wside_group_bias_skipped", "robuq_fx/kernels/triton_wside.py",
     "    if tl.load(d + 17) != 0:", "    if False:",
     "the grouped weight side leaves the layers' bias_c unwritten", ["tests/kernels/test_wquant_interpreted.py", "-k",
                                                                    "group_writes"]),
    ("region_class_unshared", "robuq_fx/passes/region.py",
     "        return _SHARED.setdefault(key, cls)", "        return cls",
     "captured regions keep a class each: every block of a regionally compiled model compiles on its own",
     ["tests/test_regional.py"]),
    ("region_guards_unshared", "robuq_fx/passes/region.py",
     "        guards.forward = _GUARDS.setdefault(key, fn)", "        pass",
     "each region keeps its own export guard function: a code-object guard miss per block",
     ["tests/test_regional.py"]),
    ("region_pickle_meta_dropped", "robuq_fx/passes/region_pickle.py",
     "        out[k] = v\n", "        pass\n",
     "a pickled region loses its nodes' tags: a loaded QAT model lowers without the 8-bit attention",
     ["tests/test_region_pickle.py"]),
    ("region_pickle_symbolic_sizes_dropped", "robuq_fx/passes/region_pickle.py",
     "    return int(hint) if isinstance(hint, int) else None", "    return None",
     "a pickled region loses the shapes of its dynamic-batch tensors: the lowering's head-dimension check goes blind",
     ["tests/test_region_pickle.py"]),
    ("region_pickle_python_unchecked", "robuq_fx/passes/region_pickle.py",
     "    if tuple(state[\"python\"]) != tuple(sys.version_info[:2]):", "    if False:",
     "export's guard code loads under any Python version (marshal data of another one)",
     ["tests/test_region_pickle.py"]),
]


def sh(cmd, cwd=ROOT) -> str:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout


def copy_tree(dst: Path, head: bool) -> None:
    if head:
        archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
        return
    files = sh(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


RUNNER = """
import sys, robuq_fx, pytest
copy = sys.argv[1]
if not robuq_fx.__file__.startswith(copy):
    sys.exit(f"mutation_check: robuq_fx imported from {robuq_fx.__file__}, not from the copy {copy}")
sys.exit(pytest.main(sys.argv[2:]))
"""


def run_tests(copy: Path, tests: list[str], fast: bool, timeout: int) -> tuple[int, list[str], str]:
    # the copy first; then whatever PYTHONPATH held (e.g. a triton for Triton's interpreter: PYTHONPATH=/tmp/trit)
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy)] + extra), PYTHONDONTWRITEBYTECODE="1")
    args = [sys.executable, "-c", RUNNER, str(copy) + os.sep, "-q", "-p", "no:cacheprovider", "-rfE",
            "-W", "ignore", *(["-x"] if fast else []), *tests]
    try:
        proc = subprocess.run(args, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, ["(timed out)"], ""
    out = proc.stdout + proc.stderr
    if "mutation_check: robuq_fx imported from" in out:
        raise SystemExit(out.strip().splitlines()[-1])
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in out.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    return proc.returncode, failed, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--head", action="store_true", help="mutate the committed tree (HEAD), not the working tree")
    ap.add_argument("--fast", action="store_true", help="stop each run at its first failing test (pytest -x)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test run (default 900)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"summary JSON (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    from tabulate import tabulate

    mutants = [m for m in MUTANTS if not args.only or m[0] in args.only]
    unknown = set(args.only or ()) - {m[0] for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutant(s) {sorted(unknown)}; --list shows them")
    if args.list:
        print(tabulate([(m[0], m[1], m[4]) for m in mutants], headers=["mutant", "file", "bug"], tablefmt="github"))
        return 0
    start = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="robuq_mutation_") as tmp:
        copy = Path(tmp).resolve()
        copy_tree(copy, args.head)
        for name, rel, *_ in mutants:  # every mutant applies exactly once, checked before anything runs
            n = (copy / rel).read_text().count(_[0])
            if n != 1:
                raise SystemExit(f"mutant {name}: its old text occurs {n} times in {rel} (expected exactly 1): "
                                 f"{_[0]!r}")
        union = sorted({t for m in mutants for t in m[5] if t.startswith("tests/")})
        t0 = time.time()
        rc, failed, out = run_tests(copy, union, False, args.timeout)
        print(f"baseline (no mutant): {'ok' if rc == 0 else 'FAILED'} in {time.time() - t0:.0f} s", flush=True)
        if rc != 0:
            print(out[-4000:])
            raise SystemExit("the tests fail without any mutant: fix them first")
        for name, rel, old, new, what, tests in mutants:
            path = copy / rel
            original = path.read_text()
            path.write_text(original.replace(old, new))
            t0 = time.time()
            try:
                rc, failed, out = run_tests(copy, tests, args.fast, args.timeout)
            finally:
                path.write_text(original)
            if rc == 5 or (rc != 0 and not failed):
                print(out[-3000:])
                raise SystemExit(f"mutant {name}: pytest exited {rc} without naming a failing test")
            res = {"mutant": name, "file": rel, "bug": what, "old": old, "new": new, "tests_run": tests,
                   "caught": rc != 0, "failed_tests": failed, "seconds": round(time.time() - t0, 1)}
            results.append(res)
            print(f"{name:30s} {'caught' if res['caught'] else 'SURVIVED':8s} {len(failed):3d} failing tests "
                  f"({res['seconds']:.0f} s)", flush=True)
    survivors = [r["mutant"] for r in results if not r["caught"]]
    dirty = sh(["git", "status", "--porcelain", "--untracked-files=no"]).strip()
    summary = {
        "mutants": len(results), "caught": len(results) - len(survivors), "survivors": survivors,
        "git_commit": sh(["git", "rev-parse", "HEAD"]).strip(),
        "tree": "HEAD" if args.head else ("working tree (uncommitted changes)" if dirty else "working tree (clean)"),
        "command": " ".join(["python", "scripts/mutation_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "torch": __import__("torch").__version__,
        "seconds": round(time.time() - start), "results": results,
    }
    print(tabulate([(r["mutant"], "yes" if r["caught"] else "NO", len(r["failed_tests"]),
                     (r["failed_tests"] or [""])[0][:70]) for r in results],
                   headers=["mutant", "caught", "failing tests", "first failing test"], tablefmt="github"))
    print(f"{summary['caught']}/{summary['mutants']} caught in {summary['seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
