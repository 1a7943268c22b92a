# Steps of scripts/gpu_session.sh: the GPU tests and the kernels alone: bench_linear, Nsight Compute, attention, quantizers.
# Sourced by it (after its setup: OUT, the compile cache, PYTHONPATH, GPU_TESTS, LM), so $1 is the step and
# $2.. its arguments, as on its command line; "$0" is still scripts/gpu_session.sh (steps that run others).
#
#   scripts/gpu_session.sh tests            GPU tests of the newest kernels (Inductor path, TMA GEMM, sigma, timm)
#   scripts/gpu_session.sh tests-start      the same tests detached (log in /tmp/robuq_tests.log)
#   scripts/gpu_session.sh tests-wait [S]   wait for them (at most S seconds, default 300) and collect the log
#   scripts/gpu_session.sh dit-gluon        the same DiT rows with the Gluon quantizer, GEMM and quantize-in-GEMM on
#   scripts/gpu_session.sh gluon-check      one-GPU call: the Gluon kernels' GPU tests, their CUDA-event times
#                                           (ncu_kernels.py), bench_linear with and without them, then the other GPU tests
#   scripts/gpu_session.sh verify           session 10's fixes: the stacked mode's GPU tests and stage check, the compiled
#                                           addmm-mode add with its fix (~4 min)
#   scripts/gpu_session.sh ws               the warp-specialized quantize-in-GEMM kernel (session 11, gluon_qgemm_ws.py;
#                                           with the paper's rank-32 branch stacked in it): its GPU tests (a hang = an
#                                           mbarrier phase bug: killed at 240 s), then bench_linear's "W4A4+H fused ws"
#                                           and "W1.58A4+H+LRB32 fused ws" columns at M = 1024 / 16384 (~8 min)
#   scripts/gpu_session.sh ws-diag          where the warp-specialized kernel's time goes (scripts/ws_diag.py), then dit-b1
#   scripts/gpu_session.sh verify13 [S]     session 13's kernels (lrb_down split / in the GEMM, B H in lowered graphs,
#                                           sigma / GELU plans, row kernel, prequant attention): their GPU tests
#   scripts/gpu_session.sh gelu-fc1         the GELU in fc1's GEMM store: its GPU tests, W4A4+H b64 with / without (~7 min)
#   scripts/gpu_session.sh gelu-fc1-diag    its GPU tests' failures and fc1's GEMM per config with / without it (~3 min)
#   scripts/gpu_session.sh ag128            a_group = 128 on the fp8 path: its GPU tests, DiT W4A4+H per token vs per block
#   scripts/gpu_session.sh gelu-fast        the tanh GELU's sigmoid form (ROBUQ_GELU_FORM=fast): its GPU tests, then DiT
#                                           W4A4+H batch 64 unfused / GELU in fc2's quantizer / GELU in fc1's store (~9 min)
#   scripts/gpu_session.sh out-quant        the qkv GEMM with q / k / v fake-quantized per head in its store vs the GEMM +
#                                           the row kernel (ncu_kernels --out-quant, M = 16384 and 256), then its tests
#   scripts/gpu_session.sh quick-checks     out-quant, the sigmoid-form GELU's GPU tests and census in one call (~6 min)
#   scripts/gpu_session.sh ag128-diag       a_group = 128 piece by piece (ncu_kernels --block-scale at M = 16384 / 1024),
#                                           then its GPU tests (~5 min)
#   scripts/gpu_session.sh linear-ag128     bench_linear with the a_group = 128 columns (per layer, CUDA graphs, ~5 min)
#   scripts/gpu_session.sh verify17         session 17's CPU-built changes: their GPU tests (~6 min)
#   scripts/gpu_session.sh verify12         session 12's fixes (H as a graph constant, B H as a layer buffer): their GPU
#                                           tests and the compiled-vs-eager ones, then dit-b1
#   scripts/gpu_session.sh mma              the tensor-core-rotation quantizer and fused stacked codes (session 10,
#                                           triton_mma_quant.py): their GPU tests, then bench_linear (table; its
#                                           "quant only (H, mma)" and "stacked fused" columns), ~5 min
#   scripts/gpu_session.sh block-cublas     a_group = 128 on cuBLAS's blockwise GEMM: its GPU tests, the output_act tests,
#                                           ncu_kernels --block-scale at M = 16384 (~3 min)
#   scripts/gpu_session.sh quant-plans      every Gluon quantizer tiling at K = 1152 / 4608, absmax and sigma (~3 min)
#   scripts/gpu_session.sh paper-wide       rank-96 q/k/v branches in the stacked mode: tests, paper b64 with / without (~9 min)
#   scripts/gpu_session.sh a2-fast          both -a2 opt-ins (Gluon sigma quantizer, asymmetric stacked mode): tests, -a2 vs paper (~9 min)
#   scripts/gpu_session.sh gluon-sigma      the Gluon quantizer with sigma ranges: its GPU tests, -a2 beside the paper (~8 min)
#   scripts/gpu_session.sh a2-vs-paper      the output_act GPU tests, then -a2 beside the paper policy at batch 64 (~7 min)
#   scripts/gpu_session.sh a3-sigma         the sigma quantizer's GPU tests, then -a3 at batch 64 alone (~6 min)
#   scripts/gpu_session.sh ncu-attention    Nsight Compute on the 8-bit attention kernels (the fused one: 0.064x SDPA)
#   scripts/gpu_session.sh ncu              Nsight Compute on the quantizer / GEMM kernels (benchmarks/ncu_kernels.py)
#   scripts/gpu_session.sh attention-sweep  its GPU tests, then bench_attention --sweep (the flash kernel's configs)
#   scripts/gpu_session.sh attention        bench_attention: the 8-bit attention op vs bf16 SDPA (summary_attention)
#   scripts/gpu_session.sh linear-down      bench_linear's extra columns at M = 256 / 1024 (the down-projection in the GEMM)
#   scripts/gpu_session.sh linear [table]   bench_linear --write-dispatch (quantizer tilings, GEMM kernels/configs), then
#                                           bench_linear with it (table: the committed table, no sweep)
case "${1:-}" in
tests)
    timeout "${2:-500}" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider $GPU_TESTS 2>&1 | grep -v DEBUG \
        | tee "$OUT/gpu_tests.log" | tail -60
    ;;
tests-start)  # its own copy of the checkout, as lm-start
    rm -rf /tmp/robuq_tests && cp -r . /tmp/robuq_tests && rm -rf /tmp/robuq_tests/.git
    (cd /tmp/robuq_tests && PYTHONPATH=/tmp/robuq_tests:${PYTHONPATH#$PWD:} setsid nohup timeout 1500 python3 -m pytest \
        -q -rfE --tb=short -p no:cacheprovider $GPU_TESTS >/tmp/robuq_tests.log 2>&1 </dev/null &)
    sleep 2 && echo "tests started"
    ;;
tests-wait)
    end=$(($(date +%s) + ${2:-300}))
    while [ "$(date +%s)" -lt $end ] && pgrep -f "pytest.*test_inductor" >/dev/null; do sleep 5; done
    pgrep -f "pytest.*test_inductor" >/dev/null && echo "tests still running"
    grep -v DEBUG /tmp/robuq_tests.log > "$OUT/gpu_tests.log"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log"
    ;;
dit-gluon)  # the Gluon kernels on a whole DiT (rows named "+gluonquant +gluongemm +fusedquant"; run after their tests)
    ROBUQ_QUANT_KERNEL=gluon ROBUQ_FP8_GEMM_KERNEL=gluon ROBUQ_FP8_FUSED_QUANT=1 timeout 540 python3 \
        benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "W4A4+H" "dit-xl-2-robuq (" --batches 1 64 --iters 10 --warmup 3 --tag _reduce-overhead_gluon \
        2>&1 | tail -30
    ;;
gluon-check)  # ~9.5 min on one GPU: what the Gluon kernels do on a real Hopper, before any DiT row uses them
    SECONDS=0
    timeout 200 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_gluon_act_quant.py \
        tests/kernels/test_gluon_fp8_gemm.py tests/kernels/test_gluon_qgemm.py 2>&1 | grep -v DEBUG \
        > "$OUT/gluon_tests.log"; tail -n 25 "$OUT/gluon_tests.log"
    echo "--- ncu_kernels.py (CUDA events) at ${SECONDS}s"
    timeout 120 python3 benchmarks/ncu_kernels.py 2>&1 | tee "$OUT/kernel_times.txt" | tail -n 30
    echo "--- bench_linear, default kernels, at ${SECONDS}s"
    timeout 110 python3 benchmarks/bench_linear.py --modes graph --m 256 1024 16384 --no-extra --out "$OUT" \
        --tag _default 2>&1 | tail -n 14
    echo "--- bench_linear, Gluon quantizer + GEMM + quantize-in-GEMM, at ${SECONDS}s"
    ROBUQ_QUANT_KERNEL=gluon ROBUQ_FP8_GEMM_KERNEL=gluon ROBUQ_FP8_FUSED_QUANT=1 timeout 110 python3 \
        benchmarks/bench_linear.py --modes graph --m 256 1024 16384 --no-extra --out "$OUT" --tag _gluon 2>&1 | tail -n 14
    rest=$((560 - SECONDS)); echo "--- the other GPU tests at ${SECONDS}s (${rest}s left)"
    [ $rest -gt 30 ] && timeout $rest python3 -m pytest -q -rfE --tb=short -p no:cacheprovider \
        $(echo $GPU_TESTS | tr ' ' '\n' | grep -v test_gluon) 2>&1 | grep -v DEBUG | tee "$OUT/gpu_tests.log" | tail -n 30
    ;;
verify)  # session 10's fixes on a GPU (~4 min): the stacked mode stage by stage, its tests and the Inductor ones for
    # it (codes-last weight, robuq::stacked_mm, c read through qweight), then the compiled addmm-mode add with the
    # symmetric lo fix: the piece-by-piece script and the compiled-vs-eager tests with ROBUQ_INDUCTOR_LOWRANK_ADD=1
    timeout 100 python3 scripts/debug_stacked.py "$OUT" 2>&1 | grep -v Warn | tail -n 16
    timeout 200 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_lrb_stacked.py \
        tests/kernels/test_inductor.py tests/kernels/test_inductor_traced.py -k "stacked" 2>&1 | grep -v DEBUG | tee "$OUT/gpu_tests_stacked.log" | tail -n 6
    timeout 90 python3 scripts/debug_lowrank_add_compiled.py "$OUT" 2>&1 | tee "$OUT/debug_lowrank_add_compiled.txt" | tail -n 10
    ROBUQ_INDUCTOR_LOWRANK_ADD=1 timeout 200 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider \
        tests/kernels/test_inductor.py tests/kernels/test_inductor_traced.py -k "compiled_qlinear or functional_decomposition" 2>&1 | grep -v DEBUG \
        | tee "$OUT/gpu_tests_addmm_traced.log" | tail -n 8
    ;;
ws)  # the warp-specialized quantize-in-GEMM kernel: each form once in its own process (a hang names its form), then
    # the tests (a deadlock shows as the timeout), then timings, each only if the step before passed
    SECONDS=0
    timeout 200 python3 scripts/ws_smoke.py --timeout 60 2>&1 | tee "$OUT/ws_smoke.txt" | tail -n 20
    if grep -q "TIMED OUT\|failed" "$OUT/ws_smoke.txt"; then echo "ws smoke run failed: no tests, no timings"; exit 0; fi
    timeout 220 python3 -m pytest -v -rfE --tb=short -p no:cacheprovider tests/kernels/test_gluon_qgemm_ws.py -k "schedule or table_choice" \
        > "$OUT/gpu_tests_ws.log" 2>&1; rc=$?
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests_ws.log" | tail -n 16
    rest=$((575 - SECONDS))
    if [ $rc -eq 0 ] && [ $rest -gt 150 ]; then
        timeout $rest python3 benchmarks/bench_linear.py --modes graph --m 1024 16384 --out "$OUT" --tag _ws \
            2>&1 | tail -n 16
    else echo "ws tests rc=$rc (124: timed out, a hang), ${rest}s left: no timings"; fi
    ;;
ws-diag)  # where the warp-specialized kernel's time goes (scripts/ws_diag.py: its pieces from CUDA-graph replays
    # next to the two-kernel path's), the ws tests again, then the batch-1 rows of `dit`
    timeout 150 python3 scripts/ws_diag.py --out "$OUT" 2>&1 | tail -n 14
    timeout 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_gluon_qgemm_ws.py -k "schedule or table_choice" \
        > "$OUT/gpu_tests_ws.log" 2>&1; tail -n 4 "$OUT/gpu_tests_ws.log"
    DIT_LIMIT=$((570 - SECONDS)) "$0" dit-b1
    ;;
verify13)  # verify13 [SECS]: session 13's CPU-built kernels on the GPU: lrb_down split over K for few rows (+ its reduce
    # kernel) and inside the epilogue GEMM (DOWN), B H read by the sibling-fused q/k/v, quantizer plans that do not
    # spill (sigma, GELU input), unpadded row-kernel rows, the k/v-prequant attention: their tests (~8 min)
    timeout ${2:-500} python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_rotated_down.py \
        tests/kernels/test_roomy_plans.py tests/kernels/test_input_act.py tests/kernels/test_act_quant_kernel.py \
        tests/kernels/test_fp8_gemm_kernels.py tests/kernels/test_inductor.py tests/kernels/test_inductor_traced.py tests/kernels/test_attention8.py \
        -k "not (test_inductor or test_attention8) or compiled_qlinear or sigma_clipped or rotated or row_kernel \
            or attention8_kernel_vs" 2>&1 \
        | grep -v DEBUG | tee "$OUT/gpu_tests_verify13.log" | tail -n 12
    ;;
gelu-fc1)  # session 16: the GELU in fc1's GEMM store (robuq::qlinear output_act; fuse_activations into="producer"):
    # its GPU tests, then W4A4+H at batch 64 with / without it (issue 17's 1.3x: 1.259x in session 15)
    timeout 200 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_input_act.py \
        -k "output" 2>&1 | tail -8
    timeout 380 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "W4A4+H" --batches 64 --iters 10 --warmup 3 --gelu-in-fc1 --tag _reduce-overhead_gelu_fc1 \
        2>&1 | grep -v Warning | tail -16
    ;;
gelu-fc1-diag)  # why the GELU in fc1's store lost (1.02x vs 1.24x, session 16): the output_act GPU tests with their
    # failures shown, then fc1's GEMM per config with / without the activation against _scaled_mm + the GELU pass
    timeout 240 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_input_act.py \
        -k "output" 2>&1 | grep -E "^E |assert|passed|failed" | head -40
    timeout 200 python3 benchmarks/ncu_kernels.py --out-act --reps 20 2>&1 | tail -30
    ;;
ag128)  # issue 20's a_group = 128 on the fp8 path (session 16: the one-pass block quantizer and the block-scaled GEMM,
    # tested in Triton's interpreter and built offline): its GPU tests, then DiT-XL/2 W4A4+H per token vs per block at
    # batch 64 (~7 min)
    timeout 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_block_scaled.py \
        tests/test_act_group.py 2>&1 | grep -E "^E |passed|failed" | head -20
    timeout 400 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "W4A4+H" "W4A4(ag128)" --batches 64 --iters 10 --warmup 3 --tag _reduce-overhead_ag128 2>&1 \
        | grep -v Warning | tail -12
    ;;
gelu-fast)  # session 17: the fused tanh GELU as x sigma(2 inner) (~8 instructions a value against ATen's ~31: offline
    # the fc2 quantizer with it 38 vs 60 an element, fc1's store 1496 vs 2904 a tile); both fusions lost with ATen's form
    ROBUQ_GELU_FORM=fast timeout 120 python3 -m pytest -q -rfE --tb=line -p no:cacheprovider \
        tests/kernels/test_input_act.py -k "fast" 2>&1 | grep -E "AssertionError|passed|failed" | cut -c1-300 | head -12
    ROBUQ_GELU_FORM=fast timeout 430 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead \
        --skip-train --settings "W4A4+H" --batches 64 --iters 10 --warmup 3 --fuse-gelu --gelu-in-fc1 \
        --tag _reduce-overhead_gelu_fast 2>&1 | grep -v Warning | tail -14
    ;;
out-quant)  # session 17's OUT_QUANT store (the producer route for issue 17 item 1's attention): is the per-head store
    # cheaper than the row kernel it would replace (~65 us a call at batch 64)? (~3 min)
    for m in 16384 256; do
        timeout 150 python3 benchmarks/ncu_kernels.py --out-quant --m $m --reps 20 2>&1 | grep -v Warning | tail -22
    done
    timeout 120 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_out_quant.py 2>&1 | tail -3
    ;;
quick-checks)  # session 18's first call: three short steps for the price of one machine start (~6 min)
    GPU_SESSION_NESTED=1 "$0" out-quant
    timeout 120 python3 -m pytest -q -rfE --tb=line -p no:cacheprovider tests/kernels/test_input_act.py -k "fast" \
        2>&1 | grep -E "AssertionError|passed|failed" | cut -c1-300 | head -12
    GPU_SESSION_NESTED=1 "$0" census
    ;;
ag128-diag)  # session 17: a_group = 128 piece by piece (DiT W4A4+H ran at 0.725x with it vs 1.247x per token):
    # ncu_kernels --block-scale at M = 16384 and 1024 (quantizers, cuBLAS's 1 x 128 block-scaled _scaled_mm, our
    # BLOCK_SCALE GEMM per config), then the GPU tests with their failures (~5 min)
    for m in 16384 1024; do
        timeout 200 python3 benchmarks/ncu_kernels.py --block-scale --m $m --reps 20 2>&1 | grep -v Warning | tail -80
    done
    timeout 200 python3 -m pytest -q -rfE --tb=line -p no:cacheprovider tests/kernels/test_block_scaled.py \
        tests/test_act_group.py 2>&1 | grep -vE "^  " | tail -25
    ;;
linear-ag128)  # bench_linear's per-layer table with the a_group = 128 columns (summary keys w4a4h_ag128_m*_x:
    # issue 20's per-layer figures for the per-block form), CUDA graphs, the committed dispatch table (~5 min)
    timeout 500 python3 benchmarks/bench_linear.py --modes graph --out "$OUT" --tag ag128 2>&1 | tail -n 40
    ;;
verify17)  # session 17's CPU-built changes on the GPU: the sigma quantizer's two-pass moments (test_act_quant_kernel),
    # the bound call's re-binding (test_direct_call, test_fastcall), lrb_down's int64 cast (test_rotated_down,
    # test_traced_constants) and the fp8 GEMM's STEP refactor (test_fp8_gemm_kernels), ~6 min
    timeout 420 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_act_quant_kernel.py \
        tests/test_direct_call.py tests/kernels/test_fastcall.py tests/kernels/test_rotated_down.py \
        tests/kernels/test_traced_constants.py tests/kernels/test_fp8_gemm_kernels.py 2>&1 | grep -v DEBUG \
        | tee "$OUT/gpu_tests_verify17.log" | tail -n 25
    ;;
verify12)  # session 12's CPU-built fixes on the GPU (the constant Hadamard matrix in compiled graphs, the layer's B H
    # buffer): their tests and the compiled-vs-eager ones, then the batch-1 rows they are for (paper 0.398x before)
    timeout 240 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_rotated_down.py \
        tests/kernels/test_inductor.py tests/kernels/test_inductor_traced.py tests/test_weight_layout.py tests/test_direct_call.py tests/kernels/test_fastcall.py \
        2>&1 | grep -v DEBUG | tee "$OUT/gpu_tests_verify12.log" | tail -n 12
    DIT_LIMIT=$((570 - SECONDS)) "$0" dit-b1
    ;;
mma)  # the tensor-core-rotation quantizer (ROBUQ_QUANT_KERNEL=mma) and the fused stacked codes: tests, then timings
    timeout 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_mma_quant.py \
        tests/kernels/test_lrb_stacked.py -k "mma or fused or sm90" 2>&1 | grep -v DEBUG | tee "$OUT/gpu_tests_mma.log" | tail -n 6
    timeout 330 python3 benchmarks/bench_linear.py --modes graph --out "$OUT" --tag mma 2>&1 | tail -n 30
    ;;
block-cublas)  # session 17's last call: a_group = 128 on cuBLAS's blockwise _scaled_mm and the tensor-core block
    # quantizer (kernels/block_scaled.py): its GPU tests, the output_act tests with the exact-GELU bound fixed, then
    # ncu_kernels --block-scale at M = 16384 (the whole-layer rows now take both changes), ~4 min
    timeout 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_block_scaled.py 2>&1 \
        | grep -E "^E  |passed|failed" | cut -c1-300 | head -20
    timeout 100 python3 -m pytest -q -rfE --tb=line -p no:cacheprovider tests/kernels/test_input_act.py \
        -k "output" 2>&1 | grep -E "AssertionError|passed|failed" | cut -c1-300 | head -12
    timeout 150 python3 benchmarks/ncu_kernels.py --block-scale --m 16384 --reps 20 2>&1 | grep -v Warning \
        | grep -E "^---|layer|quant|_scaled_mm|BLOCK_SCALE max|config" | cut -c1-200
    ;;
quant-plans)  # every Gluon quantizer tiling (lanes, columns a thread, warps) at K = 1152 / 4608, M = 16384 and 1024,
    # absmax and sigma, with code checks (bench_act_quant --gluon-plans): fc2's K = 4608 quantizer runs at ~1.9 TB/s
    # (~3.5 ms of W4A4+H's batch-64 forward); a faster tiling goes into the table's quant_gluon as [lanes, vt, warps]
    timeout 400 python3 benchmarks/bench_act_quant.py --gluon-plans --m 16384 1024 2>&1 | grep -v Warning | tail -90
    ;;
paper-wide)  # session 18's ROBUQ_STACKED_WIDE=1 (the sibling-fused q/k/v's rank-96 branch in the stacked mode, flat
    # layout): its GPU tests, then the paper policy at batch 64 with / without it in one run (row " +wide"), ~9 min
    # (session 19: with the asymmetric stacked mode's and the Gluon sigma quantizer's tests, one line a failure; the
    # a2-fast call's report cut its summary line off)
    timeout 180 python3 -m pytest -q -rf --tb=line -p no:cacheprovider tests/kernels/test_lrb_stacked.py \
        tests/kernels/test_lrb_stacked_asym.py tests/kernels/test_gluon_act_quant.py -k "rank_96 or wide or asymmetric or sigma" 2>&1 | tail -n 16
    timeout 400 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "dit-xl-2-robuq (" --batches 64 --iters 8 --warmup 2 --env-variant wide:ROBUQ_STACKED_WIDE=1 \
        --tag _reduce-overhead_paper_wide 2>&1 | grep -v Warning | tail -14
    ;;
a2-fast)  # session 18's two opt-ins for -a2 (issue 17 item 5): the Gluon quantizer with sigma ranges and asymmetric
    # layers in the stacked mode: their GPU tests, then -a2 beside the paper policy at batch 64 with both (~9 min)
    timeout 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_gluon_act_quant.py \
        tests/kernels/test_lrb_stacked_asym.py -k "sigma or asymmetric" 2>&1 | grep -E "^E |assert|passed|failed" | head -20
    ROBUQ_GLUON_SIGMA=1 ROBUQ_STACKED_ASYM=1 timeout 420 python3 benchmarks/bench_dit.py --out "$OUT" \
        --compile-mode reduce-overhead --skip-train --settings "dit-xl-2-robuq (" "-a2 (" --batches 64 --iters 8 \
        --warmup 2 --tag _reduce-overhead_a2_fast 2>&1 | grep -v Warning | tail -16
    ;;
gluon-sigma)  # session 18: the Gluon quantizer with sigma ranges (ROBUQ_GLUON_SIGMA=1): its GPU tests (codes within
    # one of the Triton kernel's, >= 99.9% equal; sm_90 build), then -a2 beside the paper policy at batch 64 with it
    # (session 17 without it: -a2 at 88.2% of the paper's speed; issue 17 item 5 wants 90%), ~8 min
    timeout 100 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_gluon_act_quant.py \
        2>&1 | grep -E "^E |assert|passed|failed" | head -20
    ROBUQ_GLUON_SIGMA=1 timeout 470 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead \
        --skip-train --settings "dit-xl-2-robuq (" "-a2 (" --batches 64 --iters 8 --warmup 2 \
        --tag _reduce-overhead_a2_gluon_sigma 2>&1 | grep -v Warning | tail -16
    ;;
a2-vs-paper)  # session 17: the output_act GPU tests with their failures (is the exact-GELU tolerance real?), then
    # issue 17 item 5's -a2 beside the paper policy at batch 64 in one run (-a3: 90.3% of the paper's speed)
    timeout 100 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_input_act.py \
        -k "output" 2>&1 | grep -E "^E |assert|passed|failed" | head -30
    timeout 480 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "dit-xl-2-robuq (" "-a2 (" --batches 64 --iters 8 --warmup 2 --tag _reduce-overhead_a2_vs_paper \
        2>&1 | grep -v Warning | tail -16
    ;;
a3-sigma)  # session 15's sigma moments (one Welford reduction a piece, no row layout conversion): the sigma
    # quantizer's GPU tests, then -a3 alone at batch 64 (0.512x in session 15 with the sigma kernel 30 of 61 ms)
    timeout 120 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_act_quant_kernel.py \
        tests/kernels/test_roomy_plans.py -k "sigma or roomy" 2>&1 | tail -8
    timeout 330 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "-a3 (" --batches 64 --iters 8 --warmup 2 --tag _reduce-overhead_a3 2>&1 | grep -v Warning | tail -16
    ;;
ncu-attention)  # Nsight Compute on the 8-bit attention kernels at DiT-XL/2 batch 64 (the fused one: 0.064x SDPA)
    if command -v ncu >/dev/null; then
        timeout 400 ncu --nvtx --nvtx-include "regex:.+/" --section SpeedOfLight --section Occupancy \
            --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
            -f -o "$OUT/ncu_attention" python3 benchmarks/ncu_kernels.py --attention --reps 1 2>&1 | tail -8
        ncu --import "$OUT/ncu_attention.ncu-rep" --csv --page details > "$OUT/ncu_attention.csv" 2>&1
        ncu --import "$OUT/ncu_attention.ncu-rep" --page details 2>&1 | grep -E "^  [a-zA-Z_].*\(|Duration|Throughput|Registers|Occupancy|Ipc|Stall|Warp Cycles" | head -120
    else
        python3 benchmarks/ncu_kernels.py --attention --reps 5
    fi
    ;;
ncu)  # Nsight Compute on the quantizer and GEMM kernels (benchmarks/ncu_kernels.py): why they run at the speed they do
    if command -v ncu >/dev/null; then
        timeout 500 ncu --nvtx --nvtx-include "regex:.+/" --section SpeedOfLight --section Occupancy \
            --section LaunchStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
            -f -o "$OUT/ncu_kernels" python3 benchmarks/ncu_kernels.py --reps 1 2>&1 | tail -20
        ncu --import "$OUT/ncu_kernels.ncu-rep" --csv --page details > "$OUT/ncu_kernels.csv" 2>&1
        ncu --import "$OUT/ncu_kernels.ncu-rep" --page details 2>&1 | grep -E "^  [a-zA-Z_].*\(|Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Executed Ipc|Issue Slots" | head -150
    else
        echo "no ncu on this machine: CUDA-event times only"; timeout 200 python3 benchmarks/ncu_kernels.py
    fi
    ;;
attention-sweep)  # the same table, then the flash kernel's launch configs (triton_attention8.SWEEP: tiles, warps,
    # stages, register caps, the padded head dim) on five shapes, both forms, the winners that beat the op's row
    # kernel + SDPA written into the dispatch table (brought back as dispatch_table_attention.json: commit it if
    # they hold up); the GPU tests first (~7 min)
    timeout 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/kernels/test_attention8.py \
        -k "sweep_config or routes" 2>&1 | tail -n 4
    timeout 420 python3 benchmarks/bench_attention.py --sweep --write-dispatch --out "$OUT" 2>&1 | tail -n 75
    cp robuq_fx/kernels/dispatch_table.json "$OUT/dispatch_table_attention.json"  # its "attention" winners, if any
    ;;
attention)  # 8-bit attention vs bf16 SDPA (DiT-XL/2, ViT, Llama shapes), incl. q/k/v as thirds of one qkv buffer
    timeout 300 python3 benchmarks/bench_attention.py --out "$OUT" 2>&1 | tail -n 16
    ;;
linear-down)  # the LRB layer with the down-projection inside the epilogue GEMM against the two kernels, M = 256 / 1024
    # (bench_linear's extra columns; "W1.58A4+H+LRB32 down-in-GEMM" against "W1.58A4+H+LRB32")
    timeout 540 python3 benchmarks/bench_linear.py --modes graph --m 256 1024 --out "$OUT" --tag _down 2>&1 \
        | tail -n 30
    ;;
linear)  # linear [table]: "table" skips the dispatch sweep (bench_linear with the committed table only)
    SECONDS=0
    [ "${2:-}" = table ] || timeout 360 python3 benchmarks/bench_linear.py --write-dispatch --dispatch-only \
        --dispatch-out "$OUT/dispatch_table.json" 2>&1 | tail -60
    # then the per-layer table with it (summary_linear: w4a4h_m256_x ... m16384_x), CUDA graphs, W4A4+H and W1.58A4+H
    # (with the sweep's ws timings since session 11 the sweep may leave too little of the call: then `linear table`)
    [ -s "$OUT/dispatch_table.json" ] && cp "$OUT/dispatch_table.json" robuq_fx/kernels/dispatch_table.json
    rest=$((570 - SECONDS)); [ $rest -gt 120 ] && timeout $rest python3 benchmarks/bench_linear.py --modes graph \
        --out "$OUT" 2>&1 | tail -n 30 || echo "bench_linear skipped: ${rest}s left in the call"
    ;;
esac
