#!/usr/bin/env bash
# Create the two virtual environments the peer benchmarks run in. Idempotent: re-running only
# installs what is missing (pip skips satisfied requirements).
#
#   benchmarks/.venv-peers    crowdfit (editable) + photutils, astropy, crowdsourcephoto, scipy,
#                             scikit-image, numpy, tqdm.  Benchmark scripts run with this python.
#   benchmarks/.venv-picasso  picassosr + numpy only; picasso pins its own numpy/numba stack, so it
#                             lives apart and benchmarks/_peers.py calls it through a subprocess.
#
# Usage:  bash benchmarks/setup_peers.sh          (from anywhere)
# Env:    PYTHON=python3.11  to choose the base interpreter (default: python3, needs >= 3.11).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PY="${PYTHON:-python3}"
REQ="$HERE/requirements.txt"
PEERS="$HERE/.venv-peers"
PICASSO="$HERE/.venv-picasso"

make_venv() {
    if [ ! -x "$1/bin/python" ]; then
        echo ">>> creating $1"
        "$PY" -m venv "$1"
        "$1/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
    else
        echo ">>> $1 exists"
    fi
}

# ---------------------------------------------------------------- peers venv
make_venv "$PEERS"
# crowdsourcephoto 0.5.9 (2023) is a pure-Python sdist, but its install_requires pull in
# tensorflow>=2 + keras (used only by crowdsource.nebulosity_mask) and guppy3 (a C-extension
# memory profiler used only by crowdsource.decam_proc): ~1 GB and nothing fit_im touches.
# Install it --no-deps and list what fit_im/psf really import in requirements.txt.
"$PEERS/bin/pip" install --quiet -r <(sed -n '/^# --- peers/,/^# --- picasso/p' "$REQ" \
    | grep -vE '^(#|crowdsourcephoto|$)')
"$PEERS/bin/pip" install --quiet --no-deps --no-build-isolation \
    -r <(grep -E '^crowdsourcephoto' "$REQ")
# crowdfit itself, editable, with its dev extras. It may not be importable yet while the
# package is being written: tolerate failure, fall back to a bare editable install.
if ! "$PEERS/bin/pip" install --quiet -e "$ROOT[dev]"; then
    echo "!!! pip install -e '$ROOT[dev]' failed; trying without extras" >&2
    "$PEERS/bin/pip" install --quiet -e "$ROOT" \
        || echo "!!! crowdfit not installed in $PEERS (peers still usable)" >&2
fi

# ---------------------------------------------------------------- picasso venv
make_venv "$PICASSO"
"$PICASSO/bin/pip" install --quiet -r <(sed -n '/^# --- picasso/,$p' "$REQ" | grep -vE '^(#|$)')

echo ">>> checking imports"
"$PEERS/bin/python" - <<'EOF'
import importlib
import importlib.metadata as md
dists = {"numpy": "numpy", "scipy": "scipy", "skimage": "scikit-image", "astropy": "astropy",
         "photutils": "photutils", "crowdsource": "crowdsourcephoto", "tqdm": "tqdm"}
for m, dist in dists.items():
    importlib.import_module(m)
    print(f"  peers:   {dist:16s} {md.version(dist)}")
try:
    import crowdfit  # noqa: F401
    print("  peers:   crowdfit         importable")
except Exception as e:  # crowdfit may be mid-rewrite; peers do not need it
    print(f"  peers:   crowdfit         NOT importable ({type(e).__name__}: {e})")
EOF
"$PICASSO/bin/python" - <<'EOF'
import importlib.metadata as md
import numpy, numba
from picasso import gaussmle  # noqa: F401
print(f"  picasso: picassosr        {md.version('picassosr')}  numpy {numpy.__version__}  numba {numba.__version__}")
EOF
echo ">>> done"
