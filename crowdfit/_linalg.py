"""Small dense linear algebra for the solvers: masked Cholesky solves of `(P, P)` systems.

On the CPU, written as plain array arithmetic rather than LAPACK calls: under `vmap` a LAPACK
call runs once per region, while this runs once per batch, which is many times faster for the
small `P` of a region fit. On other platforms (GPUs) the same loops cost one step of an XLA
while loop per column, each a few kernel launches and a check of the loop's condition: 3 × P
steps per solve, the bulk of a fit's time (on an H200 at 0.3 stars/FWHM², 1.5 s of a 2.7 s
`fit_image` call was the fits'). There the factorisation and the triangular solves are the
platform's batched library calls (`jax.lax.linalg`), chosen when the program is lowered
(`jax.lax.platform_dependent`), except for systems of at most `_LOOP_MAX` parameters. On an
H200, against the loops: Gpufit's benchmark (5 parameters) 6.3 against 7.5 × 10^6 fits/s,
16 × 16 windows of 4 sources (13 parameters) 2.7 against 1.5 × 10^6 sources/s, and the fits of
that `fit_image` call 0.28 s against 1.5 s (16 sources, 49 parameters). A
non-positive-definite system gives NaN, never an error.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["cholesky", "cholesky_solve", "exact_matmuls", "masked_solve", "masked_inverse"]

# Up to this many parameters the loops are used on every platform (the crossover on a GPU lies
# between 5 and 13, unmeasured in between).
_LOOP_MAX = 8


def exact_matmuls(fn):
    """`fn` traced with float32 matrix products at full precision.

    On recent GPUs XLA's default float32 product rounds its inputs to TF32 (10-bit mantissa).
    Normal equations built from such products are too coarse for Gauss–Newton: fits of
    several sources then crawl to `max_iter`. Wrap every traced entry point (the fit program,
    the implicit derivative's rule, the CRLB program) so each product in them is exact; on CPU
    this changes nothing.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped


def cholesky(a):
    """Lower Cholesky factor of a symmetric positive-definite `(P, P)` matrix (NaN if it is not).

    On the CPU a loop over the columns, not straight-line code: unrolled, a 7 × 7 system (two
    sources) took 1.5 s longer to compile and ran no faster. Elsewhere the library's.
    """
    return _per_platform(_cholesky_loop, _cholesky_library, a)


def _per_platform(loop, library, *args):
    """`loop(*args)` on the CPU and for systems of at most `_LOOP_MAX` parameters, else
    `library(*args)`, chosen when the program is lowered for its platform."""
    if args[0].shape[-1] <= _LOOP_MAX:
        return loop(*args)
    return jax.lax.platform_dependent(*args, cpu=loop, default=library)


def _cholesky_library(a):
    # NaN where the factorisation fails, as the loop gives.
    return jax.lax.linalg.cholesky(a, symmetrize_input=False)


def _cholesky_loop(a):
    p = a.shape[0]
    idx = jnp.arange(p)

    def body(j, low):
        col = a[:, j] - low @ low[j, :]
        d = jnp.sqrt(col[j])
        col = jnp.where(idx >= j, col / d, 0.0)
        return low.at[:, j].set(col)

    return jax.lax.fori_loop(0, p, body, jnp.zeros_like(a))


def _triangular_solve(low, b, lower: bool):
    # Solves low z = b (lower) or low.T z = b (upper), for b (P,) or (P, M).
    p = low.shape[0]
    m = low if lower else low.T

    def body(t, z):
        i = t if lower else p - 1 - t
        acc = b[i] - m[i] @ z
        return z.at[i].set(acc / m[i, i])

    return jax.lax.fori_loop(0, p, body, jnp.zeros_like(b))


def _cholesky_solve_loop(low, b):
    return _triangular_solve(low, _triangular_solve(low, b, lower=True), lower=False)


def _cholesky_solve_library(low, b):
    col = b.ndim == 1
    b2 = b[:, None] if col else b
    solve = jax.lax.linalg.triangular_solve
    z = solve(low, b2, left_side=True, lower=True)
    x = solve(low, z, left_side=True, lower=True, transpose_a=True)
    return x[:, 0] if col else x


def cholesky_solve(low, b):
    """Solve `(low low.T) x = b` for `b` `(P,)` or `(P, M)` (loops on the CPU, else the
    library's triangular solves)."""
    b = jnp.asarray(b, low.dtype)
    return _per_platform(_cholesky_solve_loop, _cholesky_solve_library, low, b)


def _masked(h, active):
    # Inactive parameters (padded sources) get an identity block, so the system stays regular
    # and their step is exactly zero.
    outer = active[:, None] * active[None, :]
    return h * outer + jnp.diag(1.0 - active)


def masked_solve(h, g, active):
    """Solve `h x = g` on the active parameters; `x` is 0 on the others (NaN if `h` is singular)."""
    return cholesky_solve(cholesky(_masked(h, active)), g * active) * active


def masked_inverse(h, active):
    """Inverse of `h` on the active block, zeros elsewhere (NaN if that block is singular).

    By the same Cholesky factorisation as `masked_solve`, not LAPACK's: a program holding
    LAPACK's custom call hangs on XLA's CPU runtime when another runs at the same time, and
    `fit_regions` runs its chunks on every core at once (see `_threads`).
    """
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    inv = cholesky_solve(cholesky(_masked(h, active)), eye)
    return inv * (active[:, None] * active[None, :])
