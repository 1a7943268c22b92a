# Steps of scripts/gpu_session.sh: QAT training steps: bench_dit --train-only rows, their profiles and GPU tests (issue 19).
# Sourced by it (after its setup: OUT, the compile cache, PYTHONPATH, GPU_TESTS, LM), so $1 is the step and
# $2.. its arguments, as on its command line; "$0" is still scripts/gpu_session.sh (steps that run others).
#
#   scripts/gpu_session.sh recheck          one GPU, ~9 min: the compiled addmm-mode add piece by piece, the Inductor tests,
#                                           the fp8 GEMM kernel and fused-QAT tests
#   scripts/gpu_session.sh train-compiled [SETTING]  one compiled QAT row vs FP (W4A4+H, W1.58A4+H, dit-xl-2-robuq; ~4-6 min)
#   scripts/gpu_session.sh train-regional [S]  S whole-model compiled vs FP, then both with regional compilation
#   scripts/gpu_session.sh train-cpp [SETTING]  the compiled QAT step with Inductor's C++ wrapper on both sides (issue 19:
#                                           the compiled paper step was CPU-bound; default setting the paper's)
#   scripts/gpu_session.sh train-combo [SETTING]  the compiled QAT step with Inductor's combo kernels on both sides
#   scripts/gpu_session.sh train-cg [SETTING]  the same row under CUDA graphs (reduce-overhead both sides; default the paper's)
#   scripts/gpu_session.sh train-stepw [S [both]]  weight_sides_per_forward: its GPU tests, the compiled QAT step with it
#   scripts/gpu_session.sh stepw-profile    its GPU tests, the compiled paper row with it, then it profiled next to FP
#   scripts/gpu_session.sh train-actk [only]  the act op (the activation side as one triton_op, default): GPU tests,
#                                           the compiled paper row with weight_sides_per_forward with / without it
#   scripts/gpu_session.sh actk2            session 22: the act op's GPU tests, scripts/actk_diag.py, then the paper
#                                           step with weight_sides_per_forward with / without the act op (two runs)
#   scripts/gpu_session.sh backend-tests    GPU tests of the backend's weight_sides="step" and of the act op
#   scripts/gpu_session.sh train-backend [S]  the compile backend's qat mode (issue 19's second entry point) vs compiled FP
#                                           (each layer's weight side in the graph, and weight_sides="step")
#   scripts/gpu_session.sh backend-step [S]   backend-tests, then the backend's weight_sides="step" row alone vs FP
#   scripts/gpu_session.sh verify23 [S..]    session 23's fp32 weight quantization tests, then STEPW qat-profile of S
#   scripts/gpu_session.sh ws-profile       weight-kernel GPU tests, then where the step weight sides' GPU time goes
#   scripts/gpu_session.sh train-wside      the one-kernel forward weight side: GPU tests, paper row without / with it
#   scripts/gpu_session.sh s24a             session 23's CPU-built changes: their GPU tests, then weight_side_profile
#   scripts/gpu_session.sh s24b             the tiled one-kernel weight side: GPU tests, profile, paper row +wside vs FP
#   scripts/gpu_session.sh s25a             the grouped one-kernel weight side: GPU tests, then weight_side_profile
#   scripts/gpu_session.sh s26a             the hooks' CUDA tests, then the compiled W4A4+H step profiled with its phases
#   scripts/gpu_session.sh s27a             the grouped weight side writing every part: GPU tests, weight_side_profile
#   scripts/gpu_session.sh s27b             the one-kernel forms as default: their GPU tests, then profile_dit under CUDA
#                                           graphs (bf16 and the paper policy, 4 DiT-XL/2 blocks)
#   scripts/gpu_session.sh s28a             the act op's layer tests on CUDA, then the paper policy under CUDA graphs
#                                           (the act op now its default there) against FP
#   scripts/gpu_session.sh train-cg-ws [S]  the hooks' GPU tests, then S under CUDA graphs with the weight-side hooks
#                                           engaged there (ROBUQ_QAT_STEP_WEIGHTS=cudagraphs, row +cgws) against FP
#   scripts/gpu_session.sh s27c             s27b shorter, the profile first (2 blocks, 2 steps), then the tests
#   scripts/gpu_session.sh wside-sweep      weight_side_profile.py: the weight sides, then the grouped kernel's tiles
#   scripts/gpu_session.sh train-cg-actk [S]  both under CUDA graphs, S with / without the activation op in each layer
#   scripts/gpu_session.sh train-cg-actk1 [S]  its +actk row alone with FP (ROBUQ_QAT_ACT_KERNEL=1 for the run; ~6 min)
#   scripts/gpu_session.sh train-auto [S]   compiled QAT with quantize's automatic weight-side hooks vs without, vs FP
#   scripts/gpu_session.sh train-eager      the eager QAT rows at the defaults (bench_dit --train-only --no-compile)
#   scripts/gpu_session.sh train-lgraph     the graph GPU tests, then eager QAT rows: weight-side graphs vs whole layers
#   scripts/gpu_session.sh graph-diag       where the QAT CUDA graphs break: full logs of their tests and a diag script
#   scripts/gpu_session.sh train-graph      eager QAT rows without / with Q_w(R) replayed from CUDA graphs (+ its GPU test)
#   scripts/gpu_session.sh s19-final        the GPU tests of session 19's new defaults, then the eager QAT step profiled
#   scripts/gpu_session.sh train-regional-stepw [S]  regional / regional-cg, S without and with weight_sides_per_forward
#   scripts/gpu_session.sh train-opt        eager rows without / with ROBUQ_QAT_WEIGHT_KERNEL=1 ROBUQ_QAT_FP8=1 (A/B)
#   scripts/gpu_session.sh train-paper      the paper policy's compiled QAT step against FP
#   scripts/gpu_session.sh train            bench_dit --train-only: QAT step vs FP, eager and compiled (issue 19)
#   scripts/gpu_session.sh qat-profile [MODE [SETTING..]]  profile_dit --train (default: compiled, bf16 + paper), batch 16
case "${1:-}" in
recheck)  # session 9's open question first: where the compiled addmm-mode add goes wrong (pieces compiled vs eager,
    # Inductor's code under $OUT), then the Inductor tests (~4 min) and the fp8 GEMM / QAT kernel tests
    timeout 90 python3 scripts/debug_lowrank_add_compiled.py "$OUT" 2>&1 | tee "$OUT/debug_lowrank_add_compiled.txt" | tail -n 12
    timeout 300 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_inductor.py tests/kernels/test_inductor_traced.py 2>&1 \
        | grep -v DEBUG | tee "$OUT/gpu_tests_recheck_inductor.log" | tail -n 15
    timeout 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_fp8_gemm_kernels.py \
        tests/test_qat_fused.py 2>&1 | grep -v DEBUG | tee "$OUT/gpu_tests_recheck.log" | tail -n 10
    ;;
train-compiled)  # one setting's compiled QAT step against FP (${2:-W4A4+H}: W4A4+H, W1.58A4+H or dit-xl-2-robuq); FP + one
    # QAT setting compile and run in 4-6 minutes, all three do not fit one call
    timeout 560 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes compiled --iters 12 \
        --settings "QAT ${2:-W4A4+H}" --tag "_train_compiled_$(echo "${2:-W4A4+H}" | tr -c 'A-Za-z0-9\n' _)" 2>&1 | tail -n 14
    ;;
train-regional)  # train-regional [S]: S (default W4A4+H) whole-model compiled against FP, then both with regional
    # compilation (robuq_fx.compile_repeated_blocks: one graph for the 28 blocks), interleaved rows with their build +
    # warm-up seconds; the whole-model mode's rows are saved before the regional ones start (~7 min cold)
    timeout 560 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes compiled regional --iters 12 \
        --settings "QAT ${2:-W4A4+H}" --tag "_train_regional_$(echo "${2:-W4A4+H}" | tr -c 'A-Za-z0-9\n' _)" 2>&1 | tail -n 14
    ;;
train-cpp)  # the same with Inductor's C++ wrapper on both sides (default mode): the launch-bound compiled paper step
    # (~4000 kernels a step against ~1000 for FP) without a Python call a launch
    timeout 560 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes cppwrapper --iters 12 \
        --settings "QAT ${2:-dit-xl-2-robuq}" --tag "_train_cpp_$(echo "${2:-dit-xl-2-robuq}" | tr -c 'A-Za-z0-9\n' _)" 2>&1 | tail -n 14
    ;;
train-combo)  # the same with Inductor's combo kernels on both sides (default mode): independent small kernels (a
    # layer's weight-side casts and fake-quants) launched as one; the compiled paper step is launch-bound (session 19)
    timeout 560 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes combo --iters 12 \
        --settings "QAT ${2:-dit-xl-2-robuq}" --tag "_train_combo_$(echo "${2:-dit-xl-2-robuq}" | tr -c 'A-Za-z0-9\n' _)" 2>&1 | tail -n 14
    ;;
train-cg)  # the same under CUDA graphs (torch.compile mode=reduce-overhead on both sides): the step without the CPU
    # launch cost that made the paper policy's compiled step exceed its kernel time
    timeout 560 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes cudagraphs --iters 12 \
        --settings "QAT ${2:-dit-xl-2-robuq}" --tag "_train_cg_$(echo "${2:-dit-xl-2-robuq}" | tr -c 'A-Za-z0-9\n' _)" 2>&1 | tail -n 14
    ;;
train-stepw)  # session 20's robuq_fx.weight_sides_per_forward (qat_step.py: every layer's weight side once a forward
    # for the whole model, one CUDA graph replay each way; the compiled graph keeps only the activation side): its GPU
    # tests, then the compiled paper QAT step with it against FP in one run (issue 19: 1.811x without, launch-bound;
    # a third argument "both" adds the row without it, if the call's time allows a second cold compile), ~8 min
    # session 21's first run: 883 ms a step (12.6x), each layer's slice of the node's one flat output sent back a
    # gradient of the whole flat tensor (fixed: one output a part); its tests now run the GPU ones alone (~40 s)
    timeout 90 python3 -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_qat_step.py -k "cuda or own_output" \
        > "$OUT/stepw_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/stepw_tests.log" | head -12
    timeout 460 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes compiled --iters 12 \
        --settings "QAT ${2:-dit-xl-2-robuq}" --step-weights "${3:-on}" \
        --tag "_train_stepw_$(echo "${2:-dit-xl-2-robuq}" | tr -c 'A-Za-z0-9\n' _)" > "$OUT/stepw_bench.log" 2>&1
    grep -vE "^\s*$" "$OUT/stepw_bench.log" | grep -iE "warn|error|\||ms" | tail -n 20
    ;;
stepw-profile)  # session 21: weight_sides_per_forward with its hook's Python cut (~600 tensors made a step): its GPU
    # tests, the compiled paper row against FP, then both profiled (kernels by category, wall time, kernels a step,
    # the hook and node's CPU time; the compiles cached by the bench run), ~8 min
    timeout 60 python3 -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_qat_step.py -k "cuda or own_output" \
        > "$OUT/stepw_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/stepw_tests.log" | head -8
    timeout 250 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes compiled --iters 12 \
        --settings "QAT dit-xl-2-robuq" --step-weights on --tag _train_stepw_paper > "$OUT/stepw_bench.log" 2>&1
    grep -E "^\|" "$OUT/stepw_bench.log" | tail -n 4
    timeout 210 python3 benchmarks/profile_dit.py --train compiled --batch 16 --steps 3 --settings bf16 paper \
        --step-weights --out "$OUT" > "$OUT/stepw_profile.log" 2>&1
    grep -E "^## |TOTAL|wall time|kernels a step|WeightSides|GEMM|other|optim|Error" "$OUT/stepw_profile.log" | head -30
    ;;
train-actk)  # the act op (kernels/qat_act.py: with weight_sides_per_forward, an LRB layer's activation side as one
    # triton_op forward and one kernel backward; on by default since session 22): its GPU tests, then the compiled
    # paper row with weight_sides_per_forward with it (the default) and without it (+noactk) in one run (two cold
    # compiles: ~8 min on a fast host; a slow one may cut the second row, whose partial JSON then holds the first).
    # Second argument "only": the row with it alone
    timeout 90 python3 -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_qat_step.py \
        -k "act_op" > "$OUT/actk_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/actk_tests.log" | head -8
    variant=(--env-variant noactk:ROBUQ_QAT_ACT_KERNEL=0)
    [ "${2:-}" = only ] && variant=()
    timeout 520 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes compiled --iters 12 \
        --settings "QAT dit-xl-2-robuq" --step-weights on "${variant[@]}" --tag _train_actk_paper \
        > "$OUT/actk_bench.log" 2>&1
    grep -iE "^\||warn|error|train " "$OUT/actk_bench.log" | tail -n 10
    ;;
actk2)  # session 22: the act op's new GPU tests (against act_side_reference, eager and compiled) and
    # scripts/actk_diag.py (which run moved in the first call's compiled comparison), then two benches in one call:
    # FP + the paper step with weight_sides_per_forward and the act op, then FP + without the op (the time left)
    ROBUQ_QAT_ACT_KERNEL=1 timeout 150 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging \
        tests/test_qat_step.py -k "act_op" > "$OUT/actk_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/actk_tests.log" | head -12
    timeout 90 python3 scripts/actk_diag.py > "$OUT/actk_diag.log" 2>&1; grep -v Warn "$OUT/actk_diag.log" | tail -10
    ROBUQ_QAT_ACT_KERNEL=1 timeout 330 python3 benchmarks/bench_dit.py --out "$OUT" --train-only \
        --train-modes compiled --iters 12 --settings "QAT dit-xl-2-robuq" --step-weights on \
        --tag _train_actk_paper > "$OUT/actk_bench.log" 2>&1
    grep -iE "^\||warn|error|train " "$OUT/actk_bench.log" | tail -n 6
    left=$((555 - SECONDS)); echo "stepw row: ${left} s left"
    if [ "$left" -gt 120 ]; then
        timeout "$left" python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes compiled --iters 12 \
            --settings "QAT dit-xl-2-robuq" --step-weights on --tag _train_stepw_paper > "$OUT/stepw_bench.log" 2>&1
        grep -iE "^\||warn|error|train " "$OUT/stepw_bench.log" | tail -n 6
    fi
    ;;
backend-tests)  # session 22's weight_sides="step" backend mode and the act op on CUDA
    timeout 300 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging tests/test_backend.py \
        tests/test_qat_step.py -k "cuda or act_op" > "$OUT/backend_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/backend_tests.log" | head -12
    ;;
train-backend)  # issue 19's second entry point: torch.compile(model, backend=robuq_fx.backend(policy, mode="qat"))
    # (prepare_qat for the branch) against plain torch.compile of FP, one setting (default the paper's), each layer's
    # weight side in the graph and (row "+stepw") weight_sides="step" (session 22: all of them once a call before it,
    # with the act op); two cold compiles, ~8 min
    timeout 520 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes backend --iters 12 \
        --step-weights both --settings "QAT ${2:-dit-xl-2-robuq}" --tag "_train_backend_$(echo "${2:-dit-xl-2-robuq}" | tr -c 'A-Za-z0-9\n' _)" \
        > "$OUT/backend_bench.log" 2>&1
    grep -iE "^\||warn|error" "$OUT/backend_bench.log" | tail -n 8
    ;;
backend-step)  # session 23: backend-tests (~2 min) then the backend's weight_sides="step" row alone against compiled FP
    # (two cold compiles, ~6 min): the fast path of issue 19's second entry point
    [ -n "${SKIP_TESTS:-}" ] || timeout 150 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging \
        tests/test_backend.py tests/test_qat_step.py -k "cuda or act_op" > "$OUT/backend_tests.log" 2>&1
    grep -sE "^E |Error|passed|failed" "$OUT/backend_tests.log" | head -12
    timeout 480 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes backend --iters 12 \
        --step-weights on --settings "QAT ${2:-dit-xl-2-robuq}" \
        --tag "_train_backend_stepw_$(echo "${2:-dit-xl-2-robuq}" | tr -c 'A-Za-z0-9\n' _)" > "$OUT/backend_bench.log" 2>&1
    grep -iE "^\||warn|error" "$OUT/backend_bench.log" | tail -n 8
    ;;
verify23)  # session 23: R = W H - A B and Q_w(R) in fp32, the weight kernel on by default (with the difference in it):
    # its GPU tests, the fused-path and step tests on CUDA (~2 min), then STEPW=1 qat-profile of the settings named
    # after it (default: the paper's alone, ~4 min; "none": the tests alone)
    timeout 150 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging tests/kernels/test_triton_wquant.py \
        tests/test_qat_fused.py tests/test_qat_step.py -k "cuda or act_op or kernel" > "$OUT/verify23_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/verify23_tests.log" | head -12
    [ $# -ge 2 ] && settings=("${@:2}") || settings=(paper)
    [ "${settings[0]}" = none ] || timeout 420 python3 benchmarks/profile_dit.py --train compiled --batch 16 --steps 3 --settings "${settings[@]}" \
        --step-weights --out "$OUT" 2>&1 | tail -60
    ;;
ws-profile)  # session 23's last call: the weight kernel's GPU tests (two shapes) and the step's CUDA-graph test (~100 s),
    # then scripts/weight_side_profile.py: where WeightSides' 12.4 + 17.7 ms of GPU time a step go (~2 min)
    timeout 100 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging tests/kernels/test_triton_wquant.py \
        tests/test_qat_step.py -k "shape1 or cuda_graphs_equal or step_with_the_kernel" > "$OUT/ws_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/ws_tests.log" | head -12
    timeout 140 python3 scripts/weight_side_profile.py --out "$OUT" > "$OUT/ws_profile.log" 2>&1
    tail -n 75 "$OUT/ws_profile.log"
    ;;
train-wside)  # session 23's one-kernel forward weight side (ROBUQ_QAT_WSIDE_KERNEL=1, opt-in): its GPU tests, then the
    # compiled paper row with weight_sides_per_forward without / with it (+wside) in one run (~8 min on a fast host)
    timeout 80 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging tests/kernels/test_triton_wquant.py \
        -k "weight_side or weight_grads" > "$OUT/wside_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/wside_tests.log" | head -8
    timeout 500 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes compiled --iters 12 \
        --settings "QAT dit-xl-2-robuq" --step-weights on --env-variant wside:ROBUQ_QAT_WSIDE_KERNEL=1 \
        --tag _train_wside_paper > "$OUT/wside_bench.log" 2>&1
    grep -iE "^\||warn|error" "$OUT/wside_bench.log" | tail -n 8
    ;;
s24a)  # session 24's first call (~5 min): session 23's CPU-built changes on the GPU (verify23's tests, the one-kernel
    # weight sides' tests, the uncopied replays through test_qat_step on CUDA), then scripts/weight_side_profile.py
    timeout 200 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging tests/kernels/test_triton_wquant.py \
        tests/test_qat_fused.py tests/test_qat_step.py tests/test_backend.py -k "cuda or act_op or kernel or weight" \
        > "$OUT/s24a_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/s24a_tests.log" | head -16
    timeout 200 python3 scripts/weight_side_profile.py --out "$OUT" > "$OUT/ws_profile.log" 2>&1
    tail -n 90 "$OUT/ws_profile.log"
    ;;
s24b)  # session 24: the one-kernel forward weight side as row tiles (e253237): its GPU tests (~40 s),
    # scripts/weight_side_profile.py (~1 min), then the compiled paper row with weight_sides_per_forward and
    # ROBUQ_QAT_WSIDE_KERNEL=1 on (row tag +wside) against FP in the same run (two cold compiles, ~5 min)
    # (SKIP_TESTS=1: the bench alone, with more time: session 24's slow host cut it off at 400 s after the FP row)
    if [ -z "${SKIP_TESTS:-}" ]; then
        timeout 90 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging \
            tests/kernels/test_triton_wquant.py -k "weight_side or weight_grads" > "$OUT/wside_tests.log" 2>&1
        grep -E "^E |Error|passed|failed" "$OUT/wside_tests.log" | head -8
        timeout 120 python3 scripts/weight_side_profile.py --out "$OUT" > "$OUT/ws_profile.log" 2>&1
        grep -E "^## |wside_|wgrad_group|TOTAL" "$OUT/ws_profile.log"
    fi
    ROBUQ_QAT_WSIDE_KERNEL=1 timeout "$([ -n "${SKIP_TESTS:-}" ] && echo 560 || echo 400)" python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes compiled \
        --iters 12 --settings "QAT dit-xl-2-robuq" --step-weights on --tag _train_wside_paper > "$OUT/wside_bench.log" 2>&1
    grep -iE "^\||warn|error" "$OUT/wside_bench.log" | tail -n 8
    ;;
s25a)  # session 25's first call (~3 min): the grouped one-kernel forward weight side's GPU tests (the per-layer entry
    # point is a one-layer group) and quantize's automatic weight-side hooks' CUDA test (they engage under Inductor
    # and equal the explicit call), then scripts/weight_side_profile.py (both one-kernel forms, op by op and through
    # the graphs)
    timeout 120 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging tests/kernels/test_triton_wquant.py \
        tests/test_qat_step.py tests/test_qat_step_hooks.py -k "weight_side or weight_grads or cuda" \
        > "$OUT/s25a_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/s25a_tests.log" | head -8
    timeout 150 python3 scripts/weight_side_profile.py --out "$OUT" > "$OUT/ws_profile.log" 2>&1
    grep -E "^## |wside_|wgrad_group|TOTAL|Error" "$OUT/ws_profile.log"
    timeout 60 python3 scripts/step_hook_overhead.py | tee "$OUT/step_hook_overhead.txt"  # the host's Python a step
    ;;
s26a)  # session 26's first call (~3 min): the automatic hooks' CUDA tests (the new one: under mode="reduce-overhead"
    # they stay off and the cudagraph trees record nothing after the warm-up), then the compiled W4A4+H step profiled
    # with its per-phase table (host time against the GPU's wait), the CPU ops with the most self time and the GPU's
    # idle time between kernels by what the host was running then
    timeout 150 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging tests/test_qat_step_hooks.py \
        tests/test_qat_act_layer.py > "$OUT/s26a_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/s26a_tests.log" | head -8
    timeout 400 python3 benchmarks/profile_dit.py --train compiled --batch 16 --steps 3 --settings bf16 dit \
        --out "$OUT" > "$OUT/s26a_profile.log" 2>&1
    grep -E "^## |^\| (forward|loss|backward|optimizer|sum|TOTAL|wall)" "$OUT/s26a_profile.log" | head -30
    tail -n 45 "$OUT"/profile_dit_train_compiled_*.txt  # the QAT setting's CPU ops and GPU idle tables
    ;;
s27a)  # session 27's first call (~5 min): the grouped forward weight side writing all of a layer's parts: its GPU
    # tests (interpreter ones included), then weight_side_profile (the forward graph's nodes and its replay's host time)
    timeout 200 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging tests/kernels/test_triton_wquant.py \
        tests/kernels/test_wquant_interpreted.py -k "group or step or wside or weight_side" > "$OUT/s27a_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/s27a_tests.log" | head -8
    timeout 200 python3 scripts/weight_side_profile.py --out "$OUT" > "$OUT/ws_profile.log" 2>&1
    grep -E "^## |rows .*warps|TOTAL|Error" "$OUT/ws_profile.log"
    ;;
s27b)  # session 27's last call (~5 min): the one-kernel forms as the default (the grouped backward against the op-by-op
    # one on the GPU, the whole plan), then the first kernel profile under CUDA graphs: bf16 and the paper policy,
    # 4 DiT-XL/2 blocks (short compiles; a block's kernels are the same), where the paper's step is 1.52x FP
    timeout 100 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging tests/kernels/test_triton_wquant.py \
        -k "group or step" > "$OUT/s27b_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/s27b_tests.log" | head -8
    timeout 240 python3 benchmarks/profile_dit.py --train cudagraphs --blocks 4 --batch 16 --steps 3 \
        --settings bf16 paper --out "$OUT" > "$OUT/cg_profile.log" 2>&1
    grep -E "^## |TOTAL|wall|Error" "$OUT/cg_profile.log" | head -20
    ;;
s28a)  # session 28's changes (~7 min): the act op's layer tests on CUDA (the per-layer path's op, now the default
    # under CUDA graphs), then the paper policy under CUDA graphs with that default against FP (1.488x with
    # ROBUQ_QAT_ACT_KERNEL=1 in session 28; qat_paper_cudagraphs_x)
    timeout 100 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging tests/test_qat_act_layer.py \
        > "$OUT/s28a_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/s28a_tests.log" | head -8
    timeout 450 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes cudagraphs --iters 12 \
        --settings "QAT dit-xl-2-robuq" --tag _train_cg_dit_xl_2_robuq > "$OUT/s28a_cg.log" 2>&1
    grep -iE "^\||warn|error" "$OUT/s28a_cg.log" | tail -n 6
    ;;
train-cg-ws)  # train-cg-ws [S]: both under CUDA graphs, S (default the paper policy) with quantize's weight-side
    # hooks engaged there too (ROBUQ_QAT_STEP_WEIGHTS=cudagraphs: the grouped weight-side kernels, fixed forward
    # buffers; row " +cgws"), with its FP row; first the hooks' GPU tests (a re-recording every step shows there)
    timeout 120 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging tests/test_qat_step_hooks.py \
        > "$OUT/cgws_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/cgws_tests.log" | head -8
    ROBUQ_QAT_STEP_WEIGHTS=cudagraphs timeout 430 python3 benchmarks/bench_dit.py --out "$OUT" --train-only \
        --train-modes cudagraphs --iters 12 --settings "QAT ${2:-dit-xl-2-robuq}" \
        --tag "_train_cg_ws_$(echo "${2:-dit-xl-2-robuq}" | tr -c 'A-Za-z0-9\n' _)" > "$OUT/cg_ws.log" 2>&1
    grep -iE "^\||warn|error" "$OUT/cg_ws.log" | tail -n 6
    ;;
s27c)  # s27b in the order and size of session 27's last minutes: the CUDA-graph profile first (2 blocks, 2 steps),
    # then the GPU tests of the one-kernel forms as the default
    timeout 170 python3 benchmarks/profile_dit.py --train cudagraphs --blocks 2 --batch 16 --steps 2 \
        --settings bf16 paper --out "$OUT" > "$OUT/cg_profile.log" 2>&1
    grep -E "^## |TOTAL|wall|Error" "$OUT/cg_profile.log" | head -20
    timeout 90 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -p no:logging tests/kernels/test_triton_wquant.py \
        -k "group or step" > "$OUT/s27c_tests.log" 2>&1
    grep -E "^E |Error|passed|failed" "$OUT/s27c_tests.log" | head -8
    ;;
wside-sweep)  # scripts/weight_side_profile.py alone (~2 min): the weight sides op by op and through the graphs, then the
    # grouped forward kernel's tile heights and warps (16-64 rows, 4 / 8 warps; 16 x 4 ran at ~1 TB/s in session 25)
    timeout 200 python3 scripts/weight_side_profile.py --out "$OUT" > "$OUT/ws_profile.log" 2>&1
    grep -E "^## |rows .*warps|TOTAL|Error" "$OUT/ws_profile.log"
    ;;
train-cg-actk)  # train-cg-actk [S]: both sides under CUDA graphs, S (default the paper policy) with the per-layer
    # path as it is and with ROBUQ_QAT_ACT_KERNEL=1 (rows " +actk": the activation op in each compiled layer, where the
    # step hooks stay off; qat_linear._act_supported), one run (three cold compiles: give it a call of its own)
    timeout 580 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes cudagraphs --iters 12 \
        --settings "QAT ${2:-dit-xl-2-robuq}" --env-variant actk:ROBUQ_QAT_ACT_KERNEL=1 \
        --tag "_train_cg_actk_$(echo "${2:-dit-xl-2-robuq}" | tr -c 'A-Za-z0-9\n' _)" > "$OUT/cg_actk.log" 2>&1
    grep -iE "^\||warn|error" "$OUT/cg_actk.log" | tail -n 8
    ;;
train-cg-actk1)  # train-cg-actk1 [S]: the +actk row of train-cg-actk alone with its FP row (the three rows did not fit a
    # call in session 27): both sides under CUDA graphs, S (default the paper policy) with ROBUQ_QAT_ACT_KERNEL=1
    ROBUQ_QAT_ACT_KERNEL=1 timeout 560 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes cudagraphs \
        --iters 12 --settings "QAT ${2:-dit-xl-2-robuq}" \
        --tag "_train_cg_actk1_$(echo "${2:-dit-xl-2-robuq}" | tr -c 'A-Za-z0-9\n' _)" > "$OUT/cg_actk1.log" 2>&1
    grep -iE "^\||warn|error" "$OUT/cg_actk1.log" | tail -n 8
    ;;
train-auto)  # session 24's default for torch.compile(quantize(model)) (qat_step_hooks.py: every weight side once a
    # forward) against the per-layer weight sides (ROBUQ_QAT_STEP_WEIGHTS=0, rows " +layerws") and FP in one run:
    # ${2:-W4A4+H} (three cold compiles: ~8 min for W4A4+H, too long for the paper policy on a slow host)
    timeout 570 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes compiled --iters 12 \
        --settings "QAT ${2:-W4A4+H}" --env-variant layerws:ROBUQ_QAT_STEP_WEIGHTS=0 \
        --tag "_train_auto_$(echo "${2:-W4A4+H}" | tr -c 'A-Za-z0-9\n' _)" > "$OUT/auto_bench.log" 2>&1
    grep -iE "^\||warn|error" "$OUT/auto_bench.log" | tail -n 8
    ;;
train-eager)  # the eager QAT rows at the defaults (whole-layer graphs since session 20), ~3 min
    timeout 200 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --no-compile --iters 10 \
        --tag _train_eager 2>&1 | tail -n 12
    ;;
train-lgraph)  # session 20's ROBUQ_QAT_LAYER_GRAPH=1 (each QAT layer's whole forward and backward replayed from CUDA
    # graphs, x / g / the saved tensors copied in): the graph GPU tests (weight sides and whole layers), then the eager
    # QAT rows with the default weight-side graphs and with whole-layer graphs in one call (~6 min)
    timeout 100 python3 -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_qat_graph.py tests/test_qat_fused.py \
        > "$OUT/graph_tests.log" 2>&1; grep -E "^E |Error|passed|failed" "$OUT/graph_tests.log" | head -20
    timeout 170 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --no-compile --iters 10 \
        --tag _train_eager_wgraph 2>&1 | tail -n 6
    ROBUQ_QAT_LAYER_GRAPH=1 timeout 170 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --no-compile \
        --iters 10 --tag _train_eager_lgraph 2>&1 | tail -n 6
    ;;
graph-diag)  # session 20: where ROBUQ_QAT_WEIGHT_GRAPH=1 breaks (train-graph: its GPU test failed, and the W1.58A4+H
    # bench row died on "Offset increment outside graph capture" in the next step's torch.rand): full logs under $OUT
    timeout 150 python3 scripts/qat_graph_diag.py > "$OUT/graph_diag.log" 2>&1
    timeout 120 python3 -m pytest -q -rf --tb=long -p no:cacheprovider tests/test_qat_graph.py -k cuda \
        > "$OUT/graph_test.log" 2>&1
    timeout 120 python3 -m pytest -q -rf --tb=long -p no:cacheprovider tests/kernels/test_gluon_act_quant.py -k sigma \
        > "$OUT/sigma_test.log" 2>&1
    grep -E "^==|bit-equal|graphs \(kept|FAILED|generator|step ms|Error" "$OUT/graph_diag.log" | head -60
    tail -n 3 "$OUT/graph_test.log" "$OUT/sigma_test.log"
    ;;
train-graph)  # session 19's ROBUQ_QAT_WEIGHT_GRAPH=1 (each layer's Q_w(R) replayed from a CUDA graph, qat_graph.py):
    # its GPU test, then the eager QAT rows without / with it in one call (issue 19: the paper policy's eager step is
    # CPU-bound, 485 ms wall vs 107 ms of kernels, Q_w(R) 0.82 ms of CPU a layer), ~7 min
    timeout 120 python3 -m pytest -q -rf --tb=line -p no:cacheprovider tests/test_qat_graph.py \
        tests/kernels/test_gluon_act_quant.py -k "graph or sigma" 2>&1 | tail -n 10
    timeout 230 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --no-compile --iters 10 \
        --tag _train_eager_plain 2>&1 | tail -n 6
    ROBUQ_QAT_WEIGHT_GRAPH=1 timeout 230 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --no-compile \
        --iters 10 --tag _train_eager_wgraph 2>&1 | tail -n 6
    ;;
s19-final)  # session 19: the GPU tests of the defaults it turned on (Gluon sigma quantizer, asymmetric stacked mode,
    # flat rank-96 layout; the ws kernel's terms form under ROBUQ_STACKED_WIDE=0), then issue 19's eager QAT step
    # profiled (bf16 vs the paper policy, batch 16: where its 2.74x goes), ~6 min
    timeout 100 python3 -m pytest -q -rf --tb=line -p no:cacheprovider tests/kernels/test_gluon_act_quant.py \
        tests/kernels/test_lrb_stacked.py tests/kernels/test_lrb_stacked_asym.py tests/kernels/test_gluon_qgemm_ws.py \
        2>&1 | tail -n 12
    timeout 270 python3 benchmarks/profile_dit.py --train eager --batch 16 --steps 3 --settings bf16 paper \
        --out "$OUT" 2>&1 | grep -v Warning | tail -n 60
    ;;
train-regional-stepw)  # session 30, CPU-checked: weight_sides_per_forward then compile_repeated_blocks (the root runs
    # eagerly, so its hook computes every weight side in one replay and the blocks' graphs take them; bit-equal to
    # eager under aot_eager, one graph for the blocks): the paper policy regional and regional-cg, without / with
    # (rows " +stepw"; under CUDA graphs with fixed_buffers=True), ~4 min
    timeout 540 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes regional regional-cg \
        --step-weights both --iters 12 --settings "QAT ${2:-dit-xl-2-robuq}" \
        --tag "_train_regional_stepw_$(echo "${2:-dit-xl-2-robuq}" | tr -c 'A-Za-z0-9\n' _)" 2>&1 | tail -n 16
    ;;
train-opt)  # eager QAT without, then with the opt-in kernels (weight quant, fp8 forward GEMM) on the same GPU: an A/B
    timeout 280 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --no-compile --iters 16 --tag _train_plain \
        2>&1 | tail -8
    ROBUQ_QAT_WEIGHT_KERNEL=1 ROBUQ_QAT_FP8=1 timeout 280 python3 benchmarks/bench_dit.py --out "$OUT" --train-only \
        --no-compile --iters 16 --tag _train_opt 2>&1 | tail -8
    ROBUQ_QAT_WEIGHT_KERNEL=1 timeout 200 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --no-compile \
        --iters 16 --settings "W4A4+H" --tag _train_wkernel 2>&1 | tail -5
    ;;
train-paper)  # the compiled QAT step of the paper's policy (cut from the last full train run) against FP
    timeout 540 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --train-modes compiled --iters 16 \
        --settings "dit-xl-2-robuq" --tag _train_paper 2>&1 | tail -12
    ;;
train)
    timeout 540 python3 benchmarks/bench_dit.py --out "$OUT" --train-only --iters 16 --tag _train 2>&1 | tail -20
    ;;
qat-profile)  # qat-profile [MODE [SETTING ...]]: default compiled, bf16 and the paper policy (~4 min each compiled)
    mode=${2:-compiled}
    [ $# -ge 3 ] && settings=("${@:3}") || settings=(bf16 paper)
    timeout 540 python3 benchmarks/profile_dit.py --train "$mode" --batch 16 --steps 3 --settings "${settings[@]}" \
        ${STEPW:+--step-weights} --out "$OUT" 2>&1 | tail -70  # STEPW=1: the QAT settings with weight_sides_per_forward
    ;;
esac
