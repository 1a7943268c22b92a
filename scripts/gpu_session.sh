#!/usr/bin/env bash
# Batches of GPU work for a session on a lent GPU machine (commands run from the repository root there; results go
# under $OUT, or ./gpu_out when OUT is unset). Each step is one call of at most ~9.5 minutes.
#
#   scripts/gpu_session.sh pair A B         step A on GPU 0 and step B on GPU 1 side by side (own output folders)
#   scripts/gpu_session.sh STEP [ARGS]  a step of scripts/gpu_steps/*.sh, each file listing its own:
#                                       dit.sh (30), kernels.sh (33), training.sh (39), distributed.sh (7), lm.sh (3)
#
# Set ROBUQ_GIT_COMMIT first where the machine has no git history (benchmarks record it).
# The machine goes back ~30 s after a call returns, and with it everything detached or left in /tmp: make every
# call self-contained, and send the next one at once. On nvidia-h200-x2, `pair A B` runs two steps at once (one a
# GPU) for the device time of one: use it. A cold compile of the paper policy takes ~3-4 min on the machine: a call
# holds about two (policy, batch) rows. Session 32's plan (session 31, one H200, slow host: regional-cg paper 1.162x
# with weight_sides_per_forward vs 1.297x without; ddp_overlap: QAT's gradient buckets ready at FP's pace, predicted
# 2.0x at 350 GB/s; s31a passed):
#   0. if status lists nvidia-h200-x2: ddp-x2 (~8 min; issue 19's ddp2_scaling_x), then ddp-x2 bf16 and
#      ddp-regional / ddp-inductor as time allows (merge the summaries)
#   1. ddp-overlap off fp dit, then regional-cg fp dit-xl-2-robuq (~6 min): the interleaved DDP cost (session 31
#      timed it sequentially: +3%..+47% on one setting; eager W4A4+H >= +21% in all five runs, FP +3..+25%)
#   2. host-inter dit dit:static (~6 min): whether the static launcher pays for the act op's launches
#   3. train-backend dit-xl-2-robuq: the compile backend's paper row, interleaved (1.357x was session 23, sequential)
#   Send each call at once after the last returns: the machine goes back 30 s after a call (session 28 lost its last
#   205 s to a cold start after a pause).
#   The host varies a lot from call to call (compiled FP step 72.6 vs 118.6 ms in session 21): compare rows of one
#   call only, and give a bench the time of a cold paper compile on a slow host (~5 min).
#   The compile cache comes back as xz pieces (compile_cache.txz.NN): copy them over .snap/.cache/compile_cache.*
#   after each call (delete the old pieces first). Eager-only calls need no cache: move it aside for them (restoring
#   ~420 MB takes time). It is near its 45 MB limit: past it, a call says "too large to bring back".
#   Not to run again: train-cpp (the FP step alone did not compile in 9.4 min, session 19), train-combo (1.971x, worse
#   than default mode, session 20), gelu-fast (both fusions lose, session 18), ag128 steps, out-quant (17 us a call).
# Session 22 ran: train-actk (its tests compared with the compiled op graph, which moved, not the kernel; stepw alone
# 1.781x on a slow host), actk2 (the act op's tests against its reference pass; actk_diag: the compiled op graph is
# 1.2-1.6% from eager; the DiT backward did not compile: Inductor's fp64 hscale; stepw alone 1.530x), train-actk only
# (stepw + act op 1.413x; GPU tests pass but A's gradient at 1.07e-2 vs a 1e-2 bound, now 3e-2).
# Session 21 ran: train-stepw (883 ms a step: the slice-backward bug; fixed), train-stepw again (compiled paper
# 1.598x; GPU tests pass), stepw-profile (GPU tests pass at ed8ab78; the bench hit its 250 s timeout on a slow host,
# nothing else), the Gluon sigma test (9 passed).
# Session 20 ran: train-graph (weight-side graphs: the GPU test failed, a released graph pool broke the CUDA generator),
# graph-diag (found it), train-graph again (eager paper 2.98x -> 2.44x), train-combo (1.971x), train-lgraph
# (whole-layer graphs: eager 1.12x / 1.05x / 1.53x; 65 GPU tests pass), train-eager (at the new defaults: 1.115x /
# 1.181x / 1.691x).
# Session 19 ran: a2-fast (-a2 0.854x vs paper 0.903x: 94.6%; the sigma test's offset bound too tight), paper-wide
# (paper 0.925x with the rank-96 flat stacked layout vs 0.910x; GPU tests of the asymmetric and wide modes pass),
# train-cpp (the FP step did not finish compiling in 9.4 min), s19-final (the new defaults' GPU tests pass but the
# sigma test's reference check at 1e-5; the eager QAT step profiled: paper 485 ms wall vs 107 ms of kernels).
# Session 18 ran: quick-checks (OUT_QUANT store: 195.8 us vs GEMM 135.5 + row kernel 77.8 at M = 16384; the fast
# GELU's GPU tests pass; census still 57 clones), gelu-fast (W4A4+H 1.230x unfused, 1.156x / 1.193x fused: both lose),
# profile-pair (paper 34.8 ms vs -a2 38.4 ms of kernels: GEMMs +1.0, sigma quantizer +1.7, a LayerNorm +0.9),
# inductor-code / inductor-b64 (that LayerNorm kernel's code is identical; its autotuned config differs).
# Session 17 ran: ag128 (DiT W4A4+H a_group 128 0.725x vs 1.247x per token), ag128-diag (the breakdown: the
# block-scaled GEMM is 1.45-1.55x rowwise in cuBLAS), a2-vs-paper (paper 0.882x, -a2 0.778x: 88.2%), block-cublas
# (GPU tests pass; cuBLAS's blockwise GEMM in the a_group path), overhead-census (eager call table; census: no
# lift_fresh in the b1 graph, 57 clones, and Inductor's mutation analysis failing on lrb_down_reduce_kernel: fixed).
# Session 16 ran: low-vs-paper (paper 0.905x, -a3 0.817x, one run), gelu-fc1 (the GELU in fc1's store: 1.023x vs
# 1.236x unfused, loses; its exact-GELU tests failed bit-equality, tanh passed). No machine after those two calls.
# Session 15 ran: dit-gelu (fused 1.149x vs 1.259x unfused: loses), dit-low (-a3 / -a2 0.512 / 0.499),
# profile-low (the sigma quantizer 30 of 61 ms: a layout conversion, fixed), dit-b1-down (+2%), a3-sigma (-a3 0.795x).
# Session 14 ran: verify13 (173 passed, 4 stale test expectations, fixed), attention (the op 0.545x SDPA at DiT
# b64, fused 0.23x, prequant 0.366x), the paper policy's batch-1 row alone (0.612x).
# Session 13 ran: verify12 (74 passed; b1 rows), dit-b64 (+ c4c1d19's W4A4+H b1 row: the machine's b1 is slower
# than session 12's), profile-b1 (858 kernels a forward, was 1558), dit-low (-a3 / -a2 only).
# Earlier sessions' plans and what they ran: this file's git history and docs/gpu.md.
set -uo pipefail
if [ "${1:-}" = pair ]; then  # pair STEP0 STEP1: STEP0 on GPU 0 and STEP1 on GPU 1 side by side, both waited for
    [ $# -eq 3 ] || { echo "usage: $0 pair STEP_ON_GPU0 STEP_ON_GPU1"; exit 2; }
    OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
    mkdir -p "$OUT/$2.gpu0" "$OUT/$3.gpu1"  # each its own folder: two bench_dit runs write the same file names
    OUT=$OUT/$3.gpu1 CUDA_VISIBLE_DEVICES=1 "$0" "$3" >"$OUT/$3.gpu1/log.txt" 2>&1 &
    OUT=$OUT/$2.gpu0 CUDA_VISIBLE_DEVICES=0 "$0" "$2" 2>&1 | tee "$OUT/$2.gpu0/log.txt" | tail -25
    wait
    echo "--- GPU 1: $3"; tail -25 "$OUT/$3.gpu1/log.txt"
    exit 0
fi
# a step is any label of a case in scripts/gpu_steps/*.sh (a hand-kept list of names once printed the usage instead)
GPU_STEPS=$(cd "$(dirname "$0")" && pwd)/gpu_steps  # the steps, by topic
if ! grep -qE "^([a-z0-9-]+[|])*${1:-NONE}([|][a-z0-9-]+)*[)]" "$GPU_STEPS"/*.sh; then  # usage: every file's header
    sed -n '2,/^set -uo/p' "$0" | sed '$d'
    for f in "$GPU_STEPS"/*.sh; do echo "# --- $f"; sed -n '1,/^case /p' "$f" | sed '$d'; done
    exit 2
fi
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # diffusers and its needs, carried as wheels
    # one folder per subcommand: two steps started side by side (lm-start, tests) must not install into one
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_$1_${CUDA_VISIBLE_DEVICES:-all} \
        .whl/*.whl && export PYTHONPATH=/tmp/site_$1_${CUDA_VISIBLE_DEVICES:-all}:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
# A warm compile cache carried from call to call: a call brings back $OUT/compile_cache.txz.NN (xz; 15 MB pieces: a
# file back from the machine is at most 16 MB, and the carried tree at most 64 MiB, so at most 45 MB in all); replace
# .snap/.cache/compile_cache.* with them here before the next call. Safe since session 12: the caches key on the
# ROBUQ_* settings, the dispatch table and robuq's source (robuq_fx/kernels/compile_cache.py). A cold compile of the
# paper policy took >200 s on the machine. Until session 18 the pieces were gzip (.tgz.NN), which at 47-55 MB no
# longer came back; xz -3 halves them (the session-17 cache: 41 -> 21 MB).
export TORCHINDUCTOR_CACHE_DIR=/tmp/robuq_compile_cache TRITON_CACHE_DIR=/tmp/robuq_compile_cache/triton
restore_compile_cache() {  # the newest format carried: xz pieces, else gzip ones
    local fmt
    if ls .cache/compile_cache.txz.* >/dev/null 2>&1; then fmt=(txz xJ)
    elif ls .cache/compile_cache.tgz.* >/dev/null 2>&1; then fmt=(tgz xz)
    else return 0; fi
    mkdir -p "$TORCHINDUCTOR_CACHE_DIR" && cat .cache/compile_cache.${fmt[0]}.* | tar "${fmt[1]}" -C "$TORCHINDUCTOR_CACHE_DIR" \
        && echo "compile cache: $(du -sh "$TORCHINDUCTOR_CACHE_DIR" | cut -f1) from .cache/ (${fmt[0]})"
}
[ -d "$TORCHINDUCTOR_CACHE_DIR" ] || restore_compile_cache
save_compile_cache() {  # at most 3 pieces (45 MB): the 8 files back include the step's own
    [ -d "$TORCHINDUCTOR_CACHE_DIR" ] || return 0
    local out=/tmp/compile_cache.txz ext=txz
    if command -v xz >/dev/null; then
        tar cf - -C "$TORCHINDUCTOR_CACHE_DIR" . 2>/dev/null | xz -T0 -3 >"$out" || return 0
    else
        out=/tmp/compile_cache.tgz ext=tgz
        tar czf "$out" -C "$TORCHINDUCTOR_CACHE_DIR" . 2>/dev/null || return 0
    fi
    local size; size=$(stat -c %s "$out")
    if [ "$size" -lt 45000000 ]; then split -b 15000000 -d "$out" "$OUT/compile_cache.$ext."
    else echo "compile cache $((size / 1000000)) MB: too large to bring back"; fi
}
[ -z "${GPU_SESSION_NESTED:-}" ] && trap save_compile_cache EXIT
export GPU_SESSION_NESTED=1  # steps calling "$0" for another step: only the outer one saves the cache
LM=/tmp/robuq_lm
GPU_TESTS="tests/kernels/test_gluon_act_quant.py tests/kernels/test_gluon_fp8_gemm.py tests/kernels/test_gluon_qgemm.py tests/kernels/test_inductor.py tests/kernels/test_inductor_traced.py tests/kernels/test_triton_fp8.py tests/kernels/test_act_quant_kernel.py tests/kernels/test_fp8_gemm_kernels.py tests/kernels/test_fastcall.py tests/kernels/test_triton_wquant.py tests/kernels/test_input_act.py
    tests/test_direct_call.py tests/models/test_timm_dropin.py tests/test_qat_fused.py tests/test_weight_layout.py tests/kernels/test_rotated_down.py tests/test_act_group.py tests/kernels/test_block_scaled.py"

# the step: a label of the case in one of scripts/gpu_steps/*.sh, sourced here (its "exit" ends this script)
step_file=$(grep -lE "^([a-z0-9-]+[|])*${1:-NONE}([|][a-z0-9-]+)*[)]" "$GPU_STEPS"/*.sh | head -n 1)
source "$step_file"
