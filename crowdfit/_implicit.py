"""Exact derivatives of a fitted optimum by the implicit function theorem.

At the optimum `grad_u L(u*, data) = 0`, so `du* = -H⁻¹ ∂(grad_u L)/∂data · d(data)` with `H` the
full Hessian of the loss. One linear solve replaces differentiating every solver iteration.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

__all__ = ["implicit_optimum"]


@functools.lru_cache(maxsize=None)
def implicit_optimum(problem):
    """`f(u_star, data, ok) -> u_star` whose derivative with respect to `data` is the implicit one.

    `ok` is False for regions that did not converge: they get a zero derivative (and never a
    NaN), since their `u_star` is not an optimum. `u_star` itself is treated as a constant.
    """

    @jax.custom_jvp
    def f(u, data, ok):
        return u

    @f.defjvp
    def f_jvp(primals, tangents):
        u, data, ok = primals
        _, ddata, _ = tangents
        active = problem.active(data, u.dtype)
        grad_u = lambda d: jax.grad(problem.loss)(u, d) * active
        _, dg = jax.jvp(grad_u, (data,), (ddata,))
        hess = jax.hessian(problem.loss)(u, data)
        # Padded sources and inactive parameters get an identity block (their derivative is 0).
        outer = active[:, None] * active[None, :]
        hess = hess * outer + jnp.diag(1.0 - active)
        factor, lower = cho_factor(hess, lower=True)
        good = ok & jnp.all(jnp.isfinite(factor))
        factor = jnp.where(good, factor, jnp.eye(u.shape[0], dtype=u.dtype))
        du = -cho_solve((factor, lower), dg) * active
        return u, jnp.where(good, du, 0.0)

    return f
