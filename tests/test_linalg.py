"""The small solves: the CPU's loops and the library calls other platforms use agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crowdfit import _linalg


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
