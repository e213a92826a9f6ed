#!/usr/bin/env bash
# One short GPU check of crowdfit from its source tree (no pip install): the devices JAX sees, the
# GPU-relevant tests on the GPU, the crowded-field benchmark with crowdfit on the GPU and the peers
# on the same machine's CPU (peers that cannot be imported fail their rows; photutils, astropy and
# crowdsourcephoto can travel as wheels; photutils' iterative mode, never the fastest peer and
# 3-4 min at 0.3 stars/FWHM² on its own, is left to the CPU run), tilted elliptical spots with
# the rotated PSF, and where a warm fit_image call spends its time on the GPU. With CPU16=1, also
# crowdfit alone on that machine's CPU cores. Needs jax (CUDA), optax, scikit-image, numpy,
# scipy, pytest. Output goes to the terminal and, when $OUT is set, to $OUT/gpu_log.txt with the
# result tables beside it. At most about 9 min (each step is bounded), plus the machine's start.
#
#     bash benchmarks/gpu_check.sh            # from the repository root
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DIR="${OUT:-/tmp}"
LOG=/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    LOG="$OUT/gpu_log.txt"
fi
export CROWDFIT_CACHE_DIR="$(mktemp -d)"  # (CPU programs only; a fresh machine has none)

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
    run 100 "$PY" -m pytest -q -rfE -p no:cacheprovider -m "not slow" tests/test_elongation.py \
        tests/test_fit.py tests/test_gradients.py tests/test_image.py
    run 270 "$PY" benchmarks/crowded_field.py --out "$DIR/crowded_field_gpu.md" \
        --methods crowdfit crowdfit_fast photutils crowdsource
    run 90 "$PY" benchmarks/elongated.py --no-peer --seeds 1 --densities 0.1 --angles 0.6 \
        --out "$DIR/elongated_gpu.md"
    run 50 "$PY" benchmarks/profile_fit_image.py --density 0.3 --top 25
    if [ -n "${CPU16:-}" ]; then
        JAX_PLATFORMS=cpu run 90 "$PY" benchmarks/crowded_field.py \
            --out "$DIR/crowded_field_cpu16.md" --methods crowdfit crowdfit_fast \
            --densities 0.02 0.1 0.3
    fi
    echo "=== done in $SECONDS s"
} 2>&1 | tee "$LOG"
