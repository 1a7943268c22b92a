# Steps of scripts/gpu_session.sh: whole-model inference: bench_dit rows, profiles, graph census, Inductor's code.
# Sourced by it (after its setup: OUT, the compile cache, PYTHONPATH, GPU_TESTS, LM), so $1 is the step and
# $2.. its arguments, as on its command line; "$0" is still scripts/gpu_session.sh (steps that run others).
#
#   scripts/gpu_session.sh dit              bench_dit W4A4+H and the paper policy (and with the GELU fused), batch 1 / 64
#                                           under CUDA graphs, then the call-overhead table with its cProfile
#   scripts/gpu_session.sh profile          profile_dit at batch 64 (bf16, dit, paper; default-mode compile): the kernel
#                                           breakdown issue 17 asks for next to the 9389614 one
#   scripts/gpu_session.sh dit-freezing     W4A4+H, the paper policy and -a2 at batch 64 under CUDA graphs with Inductor's
#                                           freezing (the qlinear decomposition's weight-side tensors folded at compile time)
#   scripts/gpu_session.sh dit-stacked      the paper policy with ROBUQ_FP8_EPI=stacked (LRB inside _scaled_mm), b1 / b64
#   scripts/gpu_session.sh dit-b1-down      paper batch 1 with / without the down-projection in the GEMM, same run
#   scripts/gpu_session.sh dit-b1-nosplit   paper batch 1 with / without the split down-projection, same run
#   scripts/gpu_session.sh dit-gelu-paper   the same for the paper policy (its fc2's branch applies the GELU too)
#   scripts/gpu_session.sh gelu-fast-paper  the paper policy at batch 64 with / without its fc1 applying the GELU in the
#                                           store, sigmoid form (its fc2 has a branch: only the producer route applies)
#   scripts/gpu_session.sh paper-ag128      the paper policy per token vs a_group = 128 at batch 64 (~8 min)
#   scripts/gpu_session.sh census           the paper policy's batch-1 graph after our decompositions: op counts, the
#                                           source lines of its lift_fresh copies (scripts/graph_census.py, ~2 min)
#   scripts/gpu_session.sh gelu-fc1-b1      the same W4A4+H rows at batch 1
#   scripts/gpu_session.sh diag-a2          gelu-fc1-diag, then -a2 at batch 64 alone (~6 min)
#   scripts/gpu_session.sh dit-gelu         W4A4+H batch 64 with / without the GELU fused into fc2 (its spill fixed)
#   scripts/gpu_session.sh profile-b1-cg    batch 1 under CUDA graphs: kernel sums against wall time (bf16, dit, paper)
#   scripts/gpu_session.sh inductor-b64     the LayerNorm kernels' autotuned configs, paper policy and -a2 at batch 64 (~2 min)
#   scripts/gpu_session.sh ln-configs       the LayerNorm kernels' autotuning configs timed one by one (~3 min)
#   scripts/gpu_session.sh inductor-code    Inductor's Triton code for 2 DiT blocks per setting: the LayerNorm kernels (~4 min)
#   scripts/gpu_session.sh profile-pair     the paper policy and -a2 profiled side by side at batch 64 (~8 min)
#   scripts/gpu_session.sh profile-low [S]  profile_dit of dit-xl-2-robuq-a3 (or S: paper-a2) at batch 64 (default-mode compile)
#   scripts/gpu_session.sh profile-b1 [S]   profile_dit of the paper policy at batch 1 (default-mode compile)
#   scripts/gpu_session.sh dit-b1           the batch-1 rows of W4A4+H and the paper policy (CUDA graphs)
#   scripts/gpu_session.sh dit-b64          the batch-64 rows of W4A4+H and the paper policy (CUDA graphs)
#   scripts/gpu_session.sh dit-ws           DiT-XL/2 W4A4+H and the paper policy with it (rows " +fusedws"), b1 / b64
#   scripts/gpu_session.sh dit-low          the -a3 / -a2 policies next to dit-xl-2-robuq, batch 1 / 64, CUDA graphs
#   scripts/gpu_session.sh low-vs-paper     the paper policy and -a3 at batch 64 in one run (~7 min)
#   scripts/gpu_session.sh overhead-census  bench_call_overhead --profile, then the batch-1 graph census (~3 min)
#   scripts/gpu_session.sh host-profile [S..]  the compiled step's host time by Python function (host_profile_step.py)
#   scripts/gpu_session.sh host-gc [S..]    phase times only: bf16, dit, dit:gcfreeze, bf16 again (process state against
#                                           the setting's cost), with the host probe and the garbage collector's time
#   scripts/gpu_session.sh static-diag      whether Inductor's static launcher takes the act op's kernels (W4A4+H, the
#                                           option set from the start, in-process compiles: bypass reasons, launches)
#   scripts/gpu_session.sh host-inter [S..] the phases' host time, settings side by side in interleaved rounds
#   scripts/gpu_session.sh host-ablate [S..]  host_profile_step's unprofiled phase times: bf16, dit, dit:noactk, dit:static
#   scripts/gpu_session.sh dit-default      batch 8 under default-mode torch.compile: decomposed qlinear vs opaque op
case "${1:-}" in
dit)  # dit [gelu]: CUDA-graph rows on the default path (gelu: also with the GELU fused into fc2: session 10's run with
    # it timed out before the paper policy's rows; W4A4+H with it measured 1.02x against 1.20x without)
    timeout 480 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "W4A4+H" "dit-xl-2-robuq (" --batches 1 64 --iters 10 --warmup 3 ${2:+--fuse-gelu} \
        --tag _reduce-overhead 2>&1 | tail -40
    timeout 60 python3 benchmarks/bench_call_overhead.py --profile --out "$OUT" 2>&1 | tail -20
    ;;
profile)  # profile_dit at batch 64 (bf16, dit, paper; default-mode compile): the kernel breakdown issue 17 asks for
    timeout 560 python3 benchmarks/profile_dit.py --batch 64 --steps 5 --out "$OUT" 2>&1 | grep -v Warning | tail -n 60
    ;;
dit-freezing)  # rows named " +freezing" (their own summary keys); bf16 compiled with freezing too
    timeout 540 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train --freezing \
        --settings "W4A4+H" "dit-xl-2-robuq (" "-a2 (" --batches 64 --iters 10 --warmup 3 \
        --tag _reduce-overhead_freezing 2>&1 | tail -n 25
    ;;
dit-stacked)  # dit-stacked [fused|gelu]: the paper policy with its low-rank branch stacked into _scaled_mm
    # (ROBUQ_FP8_EPI=stacked; rows named " +stacked", their own summary keys), batch 1 / 64 under CUDA graphs;
    # "fused": the codes from one kernel (ROBUQ_STACKED_QUANT=fused, rows " +stacked +fusedcodes"); "gelu" adds the
    # rows with fc2 applying the GELU (fuse_activations now takes LRB layers)
    [ "${2:-}" = fused ] && export ROBUQ_STACKED_QUANT=fused
    [ "${2:-}" = gelu ] || set -- "$1"
    ROBUQ_FP8_EPI=stacked timeout 560 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead \
        --skip-train --settings "dit-xl-2-robuq (" ${2:+--fuse-gelu} --batches 1 64 --iters 10 --warmup 3 \
        --tag "_reduce-overhead_stacked${ROBUQ_STACKED_QUANT:+_fused}" 2>&1 | tail -n 20
    ;;
dit-b1-down|dit-b1-nosplit)  # the paper policy at batch 1 with and without one switch, same run (--env-variant:
    # rows " +down" / " +nosplit"). down: the branch's down-projection inside the epilogue GEMM (at batch 1 the forward
    # costs ~6 us a kernel and DOWN removes six kernels a block: lrb_down + its reduce, three LRB layers); nosplit:
    # ROBUQ_LRB_DOWN_SPLIT=1 (one kernel a call, 4 programs streaming K, no reduce kernel: what the split bought)
    variant=${1#dit-b1-}
    [ "$variant" = down ] && switch=ROBUQ_FP8_DOWN_IN_GEMM=1 || switch=ROBUQ_LRB_DOWN_SPLIT=1
    timeout 560 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "dit-xl-2-robuq (" --batches 1 --iters 10 --warmup 3 \
        --env-variant "$variant:$switch" --tag "_reduce-overhead_b1_$variant" 2>&1 | tail -n 14
    ;;
dit-gelu-paper)  # the paper policy at batch 64 with the GELU in fc2's quantizer and branch (lrb_down applies it)
    timeout 560 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "dit-xl-2-robuq (" --batches 64 --iters 10 --warmup 3 --fuse-gelu \
        --tag _reduce-overhead_gelu_paper 2>&1 | tail -20
    ;;
gelu-fast-paper)  # the paper policy (LRB on every linear: fc2 materializes an input activation, so only fc1's
    # epilogue GEMM store can take the GELU) with ROBUQ_GELU_FORM=fast, batch 64, one run (~8 min)
    ROBUQ_GELU_FORM=fast timeout 540 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead \
        --skip-train --settings "dit-xl-2-robuq (" --batches 64 --iters 8 --warmup 2 --gelu-in-fc1 \
        --tag _reduce-overhead_gelu_fast_paper 2>&1 | grep -v Warning | tail -12
    ;;
paper-ag128)  # the paper policy per token vs a_group = 128 at batch 64 (its LRB layers on the block-scaled GEMM with
    # t A^T in the epilogue; summary key paper_ag128_b64_x), ~8 min
    timeout 560 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "dit-xl-2-robuq (" "dit-xl-2-robuq(ag128)" --batches 64 --iters 8 --warmup 2 \
        --tag _reduce-overhead_paper_ag128 2>&1 | grep -v Warning | tail -12
    ;;
census)  # the graph Inductor receives for the paper policy at batch 1 (AOT, decompositions applied, not compiled): op
    # counts and where each lift_fresh / copy node comes from (session 13's b1 profile: a lift_fresh copy kernel a
    # block that session 12's did not have), ~2 min
    timeout 300 python3 scripts/graph_census.py --batch 1 --watch lift_fresh 2>&1 | grep -v Warning | tail -60
    ;;
gelu-fc1-b1)  # the GELU in fc1's store at batch 1 (W4A4+H): there the saved launch may outweigh the store's work
    timeout 400 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "W4A4+H" --batches 1 --iters 20 --warmup 5 --gelu-in-fc1 --tag _reduce-overhead_gelu_fc1_b1 \
        2>&1 | grep -v Warning | tail -12
    ;;
diag-a2)  # session 16, one call: gelu-fc1-diag, then -a2 alone at batch 64 (issue 17 item 5: -a3 ran at 90.3% of the
    # paper policy's speed in one run; -a2 was last measured before the sigma fix)
    GPU_SESSION_NESTED=1 "$0" gelu-fc1-diag
    timeout 330 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "-a2 (" --batches 64 --iters 8 --warmup 2 --tag _reduce-overhead_a2 2>&1 | grep -v Warning | tail -8
    ;;
dit-gelu)  # W4A4+H at batch 64 with and without the GELU fused into fc2's quantizer (its K = 4608 plan spilled until
    # session 13: 1.02x against 1.20x without; if it now wins, lower() could fuse it by default)
    timeout 540 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "W4A4+H" --batches 64 --iters 10 --warmup 3 --fuse-gelu --tag _reduce-overhead_gelu 2>&1 | tail -20
    ;;
profile-b1-cg)  # batch 1 under CUDA graphs: each setting's kernel sum against its wall time a forward (6.6 ms paper,
    # 3.7 ms of kernels in default mode: where do the other ~3 ms go?), bf16 and W4A4+H beside it
    timeout 560 python3 benchmarks/profile_dit.py --settings bf16 dit paper --batch 1 --steps 5 \
        --compile-mode reduce-overhead --out "$OUT" 2>&1 | grep -v Warning | grep -E "^##|TOTAL|wall|kernels a"
    ;;
inductor-b64)  # the LayerNorm kernels' autotuned configs under the paper policy and -a2 at batch 64 (2 blocks, ~2 min)
    timeout ${2:-200} python3 scripts/inductor_code.py --settings paper paper-a2 --no-bf16 --batch 64 --out "$OUT" 2>&1 \
        | grep -E "^(=|#)" | tail -n 40
    ;;
ln-configs)  # the LayerNorm kernels' autotuning configs timed one by one (Inductor's benchmark harness, random inputs
    # of their shapes) under -a2 and the paper policy at batch 64: does the config the autotuner kept explain -a2's
    # second LayerNorm at ~96 us a call against the paper's ~62 (session 18's profile-pair)? (~3 min)
    timeout ${2:-250} python3 scripts/inductor_code.py --settings paper-a2 paper --no-bf16 --batch 64 --bench-configs \
        --out "$OUT" 2>&1 | grep -E "^(=|#|    )" | tail -n 60
    ;;
inductor-code)  # the Triton code Inductor writes for 2 blocks of DiT-XL/2 (bf16, W4A4+H, -a2, paper): the LayerNorm
    # kernels' loads / stores and call sites, the whole output code gzipped under $OUT (~4 min)
    timeout ${2:-330} python3 scripts/inductor_code.py --settings dit paper-a2 paper --out "$OUT" 2>&1 \
        | grep -v Warning | tail -n 60
    ;;
profile-pair)  # session 18: the paper policy and -a2 profiled in one process at batch 64 (default-mode compile): where
    # -a2's ~4.9 ms a forward over the paper policy goes (issue 17 item 5: 88.2% of its speed, target 90%)
    timeout 560 python3 benchmarks/profile_dit.py --settings paper paper-a2 --batch 64 --steps 3 --out "$OUT" 2>&1 \
        | grep -v Warning | tail -n 70
    ;;
profile-low)  # profile-low [SETTING]: where the -a3 (or paper-a2) policy's batch-64 time goes (default-mode compile)
    timeout 560 python3 benchmarks/profile_dit.py --settings "${2:-paper-a3}" --batch 64 --steps 3 --out "$OUT" 2>&1 \
        | grep -v Warning | tail -n 34
    ;;
profile-b1)  # profile-b1 [SECS]: the paper policy's kernels at batch 1 (default-mode compile; cold compile ~3 min)
    timeout ${2:-290} python3 benchmarks/profile_dit.py --settings paper --batch 1 --steps 3 --out "$OUT" 2>&1 \
        | grep -v Warning | tail -n 30
    ;;
dit-b1|dit-b64)  # the batch-1 / batch-64 rows of `dit` (W4A4+H and the paper policy, CUDA graphs, the committed table)
    b=${1#dit-b}
    timeout ${DIT_LIMIT:-560} python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead \
        --skip-train --settings "dit-xl-2-robuq (" "W4A4+H" --batches "$b" --iters 10 --warmup 3 \
        --tag "_reduce-overhead_b$b" 2>&1 | tail -n 16
    ;;
dit-ws)  # the warp-specialized quantize-in-GEMM kernel on a whole DiT (after `ws` passed)
    ROBUQ_FP8_FUSED_QUANT=ws timeout 560 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead \
        --skip-train --settings "W4A4+H" "dit-xl-2-robuq (" --batches 64 1 --iters 10 --warmup 3 \
        --tag _reduce-overhead_fusedws 2>&1 | tail -n 20
    ;;
dit-low)  # the asymmetric sigma policies (issue 17 item 5: within 10% of dit-xl-2-robuq's speed) at batch 64, with
    # Inductor's perf hints kept (session 13: -a3 0.354x vs 0.875x, ~48 ms its kernels do not explain; a forward that
    # lost its CUDA graphs would: "skipping cudagraphs" lines are kept in $OUT/dit_low_hints.log)
    TORCH_LOGS=perf_hints,recompiles,graph_breaks timeout 540 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead \
        --skip-train --settings "-a3 (" "-a2 (" --batches 64 --iters 10 --warmup 3 --tag _reduce-overhead_a3a2 \
        > /tmp/dit_low.log 2>&1
    grep -iE "cudagraph|skipping|graph break|recompil|warn|fall back|falls back|reference|opaque" /tmp/dit_low.log | sort | uniq -c | sort -rn | head -40 | tee "$OUT/dit_low_hints.log"
    gzip -c /tmp/dit_low.log | head -c 15000000 > "$OUT/dit_low.log.gz"  # the whole log (warnings, hints, rows)
    grep -v -iE "perf_hints|cudagraph" /tmp/dit_low.log | tail -n 24
    ;;
low-vs-paper)  # issue 17 item 5 side by side: the paper policy and -a3 at batch 64 in one run (CUDA graphs)
    timeout 560 python3 benchmarks/bench_dit.py --out "$OUT" --compile-mode reduce-overhead --skip-train \
        --settings "dit-xl-2-robuq (" "-a3 (" --batches 64 --iters 8 --warmup 2 --tag _reduce-overhead_low_vs_paper \
        2>&1 | grep -v Warning | tail -16
    ;;
overhead-census)  # session 17, the last minutes of device time: the eager call-overhead table (issue 17 item 6's
    # 30 us at M = 16; last measured in session 8) and the batch-1 graph census (~4 min)
    timeout 90 python3 benchmarks/bench_call_overhead.py --profile --out "$OUT" 2>&1 | grep -v Warning | tail -22
    timeout 200 python3 scripts/graph_census.py --batch 1 --watch lift_fresh 2>&1 | grep -v Warning | tail -50
    ;;
host-profile)  # host-profile [S..]: scripts/host_profile_step.py (default bf16 dit dit:opbyop dit:per-layer; ~8 min cold
    # compiles): the compiled step's host time function by function, each QAT setting against FP
    S="${*:2}"
    # shellcheck disable=SC2086
    timeout 560 python3 scripts/host_profile_step.py --settings ${S:-bf16 dit dit:opbyop dit:per-layer} --out "$OUT" \
        > "$OUT/host_profile.log" 2>&1
    grep -E "^\||^## |Error|wrote" "$OUT/host_profile.log" | head -120
    ;;
host-gc)  # host-gc [S..]: is the QAT forward's extra host time the QAT setting's own, or the process's (a run of
    # bf16 after the QAT settings, the garbage collector's time, gc.freeze, the host's speed before each; ~6 min)
    S="${*:2}"
    # shellcheck disable=SC2086
    timeout 540 python3 scripts/host_profile_step.py --no-cprofile --steps 8 \
        --settings ${S:-bf16 dit dit:gcfreeze bf16} --out "$OUT" > "$OUT/host_gc.log" 2>&1
    grep -E "^\| (setting|bf16|dit)|skipped|Error|wrote" "$OUT/host_gc.log" | tail -6
    ;;
static-diag)  # does Inductor's static launcher take the act op's kernels (user-defined Triton kernels, launched through
    # Triton's own launcher at ~19 us in sessions 27-28, also with the :static variant)? W4A4+H with the option set from
    # the process's start and compiles in-process (their "Bypassing" reasons logged here), cProfile's launch counts (~5 min)
    TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1 TORCHINDUCTOR_COMPILE_THREADS=1 timeout 420 \
        python3 scripts/host_profile_step.py --steps 3 --settings dit --out "$OUT" > "$OUT/static_diag.log" 2>&1
    grep -E "^\| (setting|dit)|launcher|Error" "$OUT/static_diag.log" | head -8
    ;;
host-inter)  # host-inter [S..]: the phases' host time, the settings side by side in interleaved rounds (paired
    # ratios against bf16; default bf16 dit dit:noactk dit:per-layer; ~6 min of cold compiles)
    S="${*:2}"
    # shellcheck disable=SC2086
    timeout 540 python3 scripts/host_profile_step.py --interleave --steps 12 \
        --settings ${S:-bf16 dit dit:noactk dit:per-layer} --out "$OUT" > "$OUT/host_inter.log" 2>&1
    grep -E "^\| |Error|wrote" "$OUT/host_inter.log" | tail -12
    ;;
host-ablate)  # host-ablate [S..]: host_profile_step.py's unprofiled phase times (and its cProfile) for the ablations of
    # the W4A4+H compiled step's host time (default bf16 dit dit:noactk dit:static; ~8 min cold compiles): what the act
    # op's launches cost (noactk: Inductor's ops instead; static: Inductor's static launcher for them)
    S="${*:2}"
    # shellcheck disable=SC2086
    timeout 560 python3 scripts/host_profile_step.py --steps 4 --settings ${S:-bf16 dit dit:noactk dit:static} \
        --out "$OUT" > "$OUT/host_ablate.log" 2>&1
    grep -E "^\| (setting|bf16|dit)|skipped|Error|wrote" "$OUT/host_ablate.log" | head -12
    ;;
dit-default)  # batch 8 under torch.compile's default mode: the opaque op vs the Inductor decomposition vs bf16
    timeout 560 python3 benchmarks/bench_dit.py --out "$OUT" --only-default-mode --cpp-wrapper-rows --skip-train --iters 10 --warmup 3 \
        --tag _default-mode 2>&1 | tail -12
    ;;
esac
