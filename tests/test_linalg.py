"""The small solves: the CPU's loops and the library calls other platforms use agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import render

from crowdfit import _fit, _linalg


def _systems(rng, b, p):
    m = rng.normal(size=(b, p, p))
    return m @ m.transpose(0, 2, 1) + 0.1 * np.eye(p)


@pytest.mark.parametrize("chol", [_linalg._cholesky_loop, _linalg._cholesky_library])
@pytest.mark.parametrize("solve", [_linalg._cholesky_solve_loop, _linalg._cholesky_solve_library])
def test_both_implementations_solve_batches_and_fail_with_nan(x64, chol, solve):
    rng = np.random.default_rng(0)
    a = _systems(rng, 4, 9)
    b, bm = rng.normal(size=(4, 9)), rng.normal(size=(4, 9, 3))
    low = jax.jit(jax.vmap(chol))(a)
    np.testing.assert_allclose(np.tril(low), np.linalg.cholesky(a), rtol=1e-10, atol=1e-12)
    x = jax.jit(jax.vmap(solve))(low, b)
    np.testing.assert_allclose(x, np.linalg.solve(a, b[..., None])[..., 0], rtol=1e-9)
    np.testing.assert_allclose(jax.vmap(solve)(low, bm), np.linalg.solve(a, bm), rtol=1e-9)
    # Not positive definite: NaN in the solution, never an error.
    bad = jnp.array([[1.0, 2.0], [2.0, 1.0]])
    assert np.isnan(solve(chol(bad), jnp.ones(2))).any()


def test_the_cpu_takes_the_loops():
    # Lowered for the CPU, the program holds no LAPACK custom call (which hangs XLA's CPU
    # runtime when another program runs beside it; see `masked_inverse`).
    cpu = jax.devices("cpu")[0]
    p = _linalg._LOOP_MAX + 1
    a, active = (jax.device_put(v, cpu) for v in (jnp.eye(p) * 2.0, jnp.ones(p)))
    text = jax.jit(_linalg.masked_inverse).lower(a, active).as_text()
    assert "potrf" not in text and "trsm" not in text and "while" in text
    np.testing.assert_allclose(_linalg.masked_inverse(a, active), np.eye(p) / 2)


def test_fits_and_their_gradients_agree_through_either_implementation(x64, monkeypatch):
    # What a GPU runs (the library calls, for systems of more than `_LOOP_MAX` parameters),
    # run here on the CPU inside a whole fit and its implicit gradient (on the CPU also where
    # the default device is a GPU, whose programs take the library calls by default).
    with jax.default_device(jax.devices("cpu")[0]):
        _agree_through_either_implementation(monkeypatch)


def _agree_through_either_implementation(monkeypatch):
    import crowdfit

    rng = np.random.default_rng(4)
    corners = np.array([[3.5, 4.0], [8.0, 3.5], [4.2, 8.5], [9.0, 9.0]])
    xy = corners[None] + rng.uniform(-0.5, 0.5, (3, 4, 2))  # 3 regions of 4 sources
    truth = dict(x=xy[..., 0], y=xy[..., 1], flux=np.full((3, 4), 3000.0),
                 sigma=np.full((3, 4), 1.5), background=np.full(3, 10.0))  # fmt: skip
    images = render("gaussian", truth, (13, 13)) + rng.normal(0.0, 3.0, (3, 13, 13))
    init = dict(truth, x=truth["x"] + 0.3, y=truth["y"] - 0.2, flux=np.full((3, 4), 2000.0))
    kw = dict(psf="gaussian", fixed=("sigma",), tol=1e-10, max_iter=100)

    def run():  # -> (fit, gradient of the total flux, whether the program holds LAPACK calls)
        def total(im):
            fit = crowdfit.fit_regions(im, init, **kw)
            return fit.params["flux"].sum(), fit

        lowered = jax.jit(jax.value_and_grad(total, has_aux=True)).lower(jnp.asarray(images))
        (_, fit), grad = lowered.compile()(jnp.asarray(images))
        return fit, grad, "potrf" in lowered.as_text()

    loops, grad_loops, lapack = run()
    assert not lapack
    monkeypatch.setattr(_linalg, "_cholesky_loop", _linalg._cholesky_library)
    monkeypatch.setattr(_linalg, "_cholesky_solve_loop", _linalg._cholesky_solve_library)
    _fit._program.cache_clear()  # (its programs hold the loops)
    try:
        library, grad_library, lapack = run()
    finally:
        _fit._program.cache_clear()  # (no program with LAPACK calls may outlive the test)
    assert lapack
    assert np.all(np.asarray(library.status) == np.asarray(loops.status))
    for n in ("x", "y", "flux"):
        np.testing.assert_allclose(library.params[n], loops.params[n], rtol=1e-7)
        np.testing.assert_allclose(library.errors[n], loops.errors[n], rtol=1e-6)
    np.testing.assert_allclose(grad_library, grad_loops, rtol=1e-6, atol=1e-9)
