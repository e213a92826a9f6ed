"""Shared test set-up: strict JAX, float64 on demand, and small helpers."""

import os
import tempfile

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# Compiled programs are shared between test processes and the notebooks they run.
CACHE_DIR = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "crowdfit-jax-cache")
)
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# crowdfit's own cache of compiled fit programs (`_disk_cache`), kept out of the home directory.
os.environ.setdefault(
    "CROWDFIT_CACHE_DIR", os.path.join(tempfile.gettempdir(), "crowdfit-program-cache")
)


@pytest.fixture
def x64():
    """Run a test in float64 (restored afterwards)."""
    with jax.enable_x64(True):
        yield


def tree_allclose(a, b, **kw):
    """True when two pytrees have the same structure and all leaves are close."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(np.allclose(x, y, **kw) for x, y in zip(la, lb, strict=True))


def render(psf, params, shape):
    """`(B, H, W)` noiseless images of `(B, K)` sources plus `params["background"]` `(B,)`,
    rendered with numpy broadcasting of the library's PSF (an independent path from the fitter's
    per-source Jacobian code)."""
    import crowdfit

    psf = crowdfit.get_psf(psf)
    h, w = shape
    x = np.arange(w, dtype=float)[None, None, None, :]
    y = np.arange(h, dtype=float)[None, None, :, None]
    p = {n: np.asarray(v, float)[:, :, None, None] for n, v in params.items() if n != "background"}
    img = np.asarray(psf(p, x, y)).sum(1)
    return img + np.asarray(params["background"], float)[:, None, None]
