# Steps of scripts/gpu_session.sh: DDP / FSDP2: bench_ddp, ddp_overlap, the distributed example (issue 19 item 4).
# Sourced by it (after its setup: OUT, the compile cache, PYTHONPATH, GPU_TESTS, LM), so $1 is the step and
# $2.. its arguments, as on its command line; "$0" is still scripts/gpu_session.sh (steps that run others).
#
#   scripts/gpu_session.sh ddp              bench_ddp: 1 GPU vs all GPUs, DDP and FSDP2 (on nvidia-h200-x2)
#   scripts/gpu_session.sh ddp-compiled     bench_ddp --compile backend: both sides compiled, DDP around the model
#   scripts/gpu_session.sh ddp-inductor     bench_ddp --compile inductor: quantize(), then torch.compile(DDP(qmodel))
#   scripts/gpu_session.sh ddp-x2 [bf16]   two GPUs: eager and regional-cg DDP scaling (issue 19's ddp2_scaling_x)
#   scripts/gpu_session.sh s31a             session 30's pickling tests on CUDA and the example's regional-cg run
#   scripts/gpu_session.sh ddp-overlap [C [S..]]  one GPU: when DDP's gradient buckets are ready, predicted 2-GPU scaling
#   scripts/gpu_session.sh ddp-regional [cg]  bench_ddp --compile regional[-cg]: compile_repeated_blocks, then DDP
case "${1:-}" in
ddp)
    timeout 540 python3 benchmarks/bench_ddp.py --engines ddp fsdp2 --steps 10 --out "$OUT" 2>&1 | grep -v "step [0-9]*:" | tail -30
    ;;
ddp-compiled)  # session 22: one process vs DDP, both compiled through the backend's qat mode with weight_sides="step"
    # (DDP around the compiled model: each bucket's piece computes its own weight sides, keeping the overlap);
    # two cold compiles of DiT-XL/2 a process, so ~9 min (summary key ddp<N>_compiled_scaling_x)
    timeout 560 python3 benchmarks/bench_ddp.py --engines ddp --compile backend --steps 10 --out "$OUT" 2>&1 \
        | grep -v "step [0-9]*:" | tail -20
    ;;
ddp-inductor)  # session 25: one process vs DDP, quantize() then torch.compile(DDP(qmodel)) (Dynamo's DDP optimizer
    # splits the graph at the buckets; each QAT layer its own weight side; with ROBUQ_QAT_ACT_KERNEL=1 set by the
    # caller, the activation op too): ~9 min (summary key ddp<N>_inductor_scaling_x)
    timeout 560 python3 benchmarks/bench_ddp.py --engines ddp --compile inductor --steps 10 --out "$OUT" 2>&1 \
        | grep -v "step [0-9]*:" | tail -20
    ;;
ddp-x2)  # session 31, for nvidia-h200-x2 (issue 19's last target): bench_ddp's one process vs 2-GPU DDP, eager then
    # regional-cg (bf16 autocast, per-GPU batch 16), ~8 min; each run's summary kept as summary_ddp_<compile>.json
    # (merge both). ddp-x2 bf16: the same two with the gradients all-reduced in bf16 (keys _bf16grad)
    for v in "off:200" "regional-cg:320"; do
        c=${v%%:*}
        timeout "${v#*:}" python3 benchmarks/bench_ddp.py --engines ddp --compile "$c" --steps 10 --out "$OUT" \
            ${2:+--comm-hook "$2"} 2>&1 | grep -v "step [0-9]*:" | tail -8
        for f in "$OUT"/summary_ddp_NVIDIA*.json; do if [ -e "$f" ]; then mv "$f" "$OUT/summary_ddp_$c${2:+_$2}.json"; fi; done
    done
    ;;
s31a)  # session 30's CPU-built work on CUDA: pickled region models (tests/test_region_pickle.py, its CUDA test), the
    # regional tests, then the example's --compile regional-cg in one process (per-block CUDA graphs, tiny DiT)
    timeout 150 python3 -m pytest -q -p no:logging tests/test_region_pickle.py tests/test_regional.py 2>&1 | tail -4
    timeout 150 python3 examples/qat_distributed.py --engine none --compile regional-cg --model dit-tiny --steps 5 \
        --device cuda --batch 8 2>&1 | grep -v -i warn | tail -8
    ;;
ddp-overlap)  # session 31, one GPU: DDP in a one-rank group, each gradient bucket's ready time in the backward and the
    # predicted 2-GPU exposed all-reduce (benchmarks/ddp_overlap.py); ddp-overlap [COMPILE [SETTINGS..]] (default
    # eager: fp, dit, the paper's, the paper's +stepw; COMPILE regional / regional-cg)
    c="${2:-off}"; shift $(( $# > 1 ? 2 : 1 ))
    timeout 540 python3 benchmarks/ddp_overlap.py --compile "$c" --out "$OUT" \
        --settings ${@:-fp dit dit-xl-2-robuq dit-xl-2-robuq+stepw} 2>&1 | grep -v -i "warn" | tail -24
    ;;
ddp-regional)  # session 30: one process vs DDP, quantize() then compile_repeated_blocks(qmodel[, mode=reduce-overhead])
    # before DDP wraps it (DDP's own hooks, overlap kept; the blocks' compiles took ~1 min on one H200): ddp-regional
    # [cg] (summary keys ddp<N>_regional_scaling_x / ddp<N>_regional_cg_scaling_x)
    timeout 560 python3 benchmarks/bench_ddp.py --engines ddp --compile "regional${2:+-cg}" --steps 10 --out "$OUT" \
        2>&1 | grep -v "step [0-9]*:" | tail -20
    ;;
esac
