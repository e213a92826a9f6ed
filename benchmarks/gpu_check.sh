#!/usr/bin/env bash
# One short GPU check of crowdfit from its source tree (no pip install): the devices JAX sees, the
# crowded-field benchmark with crowdfit on the GPU and the peers on the CPU (peers that cannot be
# imported fail their rows; photutils and crowdsourcephoto can travel as wheels), where a warm
# fit_image call spends its time, then the throughput benchmarks at GPU sizes. Needs jax (CUDA),
# optax, scikit-image, numpy, scipy. Output goes to the terminal and, when $OUT is set, to
# $OUT/gpu_log.txt with the result tables beside it. About 8 min on an H100 (4 of them the
# crowded-field run, peers included), plus the machine's start.
#
#     bash benchmarks/gpu_check.sh            # from the repository root
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
LOG=/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    LOG="$OUT/gpu_log.txt"
fi

run() {  # run STEP_SECONDS CMD...: bounded, its output teed, its exit status noted
    local limit=$1
    shift
    echo "=== $* (limit ${limit} s)"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== exit $rc after $((SECONDS - t0)) s"
    return 0
}

{
    echo "=== crowdfit GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    run 60 "$PY" -c "import jax, crowdfit; print('jax', jax.__version__, jax.default_backend(), jax.devices())"
    run 270 "$PY" benchmarks/crowded_field.py --out "${OUT:-/tmp}/crowded_field_gpu.md"
    run 75 "$PY" benchmarks/profile_fit_image.py --density 0.3 --top 25
    run 120 "$PY" benchmarks/fit_throughput.py --gpu
    if [ -n "${OUT:-}" ] && [ -f benchmarks/results/fit_throughput_gpu.md ]; then
        cp benchmarks/results/fit_throughput_gpu.md "$OUT/"
    fi
    run 60 "$PY" benchmarks/gpu_fits.py --json "${OUT:-/tmp}/gpu_fits.json"
    echo "=== done in $SECONDS s"
} 2>&1 | tee "$LOG"
