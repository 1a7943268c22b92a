# Steps of scripts/gpu_session.sh: the LM accuracy benchmark (bench_lm).
# Sourced by it (after its setup: OUT, the compile cache, PYTHONPATH, GPU_TESTS, LM), so $1 is the step and
# $2.. its arguments, as on its command line; "$0" is still scripts/gpu_session.sh (steps that run others).
#
#   scripts/gpu_session.sh lm               the whole bench_lm in one call on every visible GPU (--devices), ~8.6 min
#   scripts/gpu_session.sh lm-start [MIN]   bench_lm detached on one GPU (default 18 min; dies if the machine goes back)
#   scripts/gpu_session.sh lm-wait [SECS]   wait for it (at most SECS, default 540), then collect what it wrote
case "${1:-}" in
lm)  # the whole bench_lm in this one call on every visible GPU (~9 min on 2 H200s): nothing to lose between calls
    SECONDS=0
    devs=$(python3 -c "import torch; print(' '.join(f'cuda:{i}' for i in range(torch.cuda.device_count())))")
    minutes=7
    if [ "$(echo $devs | wc -w)" -gt 1 ] && ! timeout 120 python3 benchmarks/bench_lm.py --quick --devices $devs \
            --no-progress --out /tmp/lm_smoke >/tmp/lm_smoke.log 2>&1; then  # the worker processes, first (~1 min)
        echo "bench_lm --devices $devs failed its --quick run; one GPU instead:"; tail -8 /tmp/lm_smoke.log
        devs=cuda:0; minutes=8
    fi
    timeout $((575 - SECONDS)) python3 benchmarks/bench_lm.py --minutes $minutes --min-qat-steps 32 --devices $devs \
        --no-progress --out "$OUT/lm" 2>&1 | tee "$OUT/bench_lm_log.txt" | grep -v "^\[cuda" | tail -60
    ;;
lm-start)
    rm -rf $LM && mkdir -p $LM/out && cp -r . $LM/repo && rm -rf $LM/repo/.git
    (cd $LM/repo && setsid nohup python3 benchmarks/bench_lm.py --minutes "${2:-18}" --no-progress --out $LM/out ${LM_ARGS:-} \
        >$LM/log.txt 2>&1 </dev/null &)
    sleep 5 && tail -3 $LM/log.txt
    ;;
lm-wait)
    end=$(($(date +%s) + ${2:-540}))
    while [ "$(date +%s)" -lt $end ] && pgrep -f bench_lm.py >/dev/null; do sleep 5; done
    pgrep -f bench_lm.py >/dev/null && echo "bench_lm still running"
    tail -40 $LM/log.txt
    cp $LM/log.txt "$OUT/bench_lm_log.txt"
    tar czf "$OUT/bench_lm.tgz" -C $LM out
    ;;
esac
