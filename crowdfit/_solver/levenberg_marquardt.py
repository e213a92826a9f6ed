"""Levenberg–Marquardt for one region: damped Gauss–Newton with accept/reject steps.

Written for `vmap`: every region carries its own damping, iteration count and status, and a
finished region stops moving while the rest of its batch goes on.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._linalg import masked_solve
from .._solution import Status

__all__ = ["levenberg_marquardt"]

_LAMBDA0 = 1e-3
_LAMBDA_MAX = 1e10


class _State(NamedTuple):
    u: jax.Array
    loss: jax.Array
    g: jax.Array
    h: jax.Array
    lam: jax.Array
    iteration: jax.Array
    done: jax.Array
    status: jax.Array


def levenberg_marquardt(problem, u0, data, *, max_iter: int, tol: float, unroll: bool = False):
    """Minimise `problem.loss(u, data)` from `u0` `(P,)`.

    Convergence: the decrease the quadratic model predicts for the last step is below
    `tol` times the loss per degree of freedom (a fraction of one pixel's contribution, far
    below the statistical uncertainty), or the step is below `tol` relative to `u`.

    **Returns:** `(u, status, iterations)`.
    """
    dtype = u0.dtype
    active = problem.active(data, dtype)
    n_pix = jnp.sum(data["mask"])
    dof = jnp.maximum(n_pix - jnp.sum(active), 1.0)
    tiny = jnp.finfo(dtype).eps

    loss0, g0, h0 = problem.normal_equations(u0, data)
    finite0 = jnp.isfinite(loss0) & jnp.all(jnp.isfinite(g0)) & jnp.all(jnp.isfinite(h0))
    g0 = jnp.where(finite0, g0, 0.0)
    h0 = jnp.where(finite0, h0, 0.0)
    scale_floor = 10 * tiny * jnp.abs(loss0) / dof

    state = _State(
        u=u0,
        loss=loss0,
        g=g0 * active,
        h=h0,
        lam=jnp.asarray(_LAMBDA0, dtype),
        iteration=jnp.asarray(0, jnp.int32),
        done=~finite0,
        status=jnp.where(finite0, Status.MAX_ITERATIONS, Status.NOT_FINITE).astype(jnp.int32),
    )

    def step(s: _State) -> _State:
        diag = jnp.diagonal(s.h)
        diag = jnp.maximum(diag, tiny * jnp.max(diag) + tiny)
        delta = -masked_solve(s.h + s.lam * jnp.diag(diag), s.g, active)
        solved = jnp.all(jnp.isfinite(delta))
        delta = jnp.where(solved, delta, 0.0)
        pred = -(s.g @ delta + 0.5 * delta @ s.h @ delta)

        u_new = s.u + delta
        loss_new, g_new, h_new = problem.normal_equations(u_new, data)
        finite = (
            jnp.isfinite(loss_new) & jnp.all(jnp.isfinite(g_new)) & jnp.all(jnp.isfinite(h_new))
        )
        accept = solved & finite & (loss_new < s.loss)

        scale = jnp.maximum(jnp.where(accept, loss_new, s.loss) / dof, scale_floor)
        small_pred = solved & (pred <= tol * scale)
        small_step = solved & jnp.all(jnp.abs(delta) <= tol * (jnp.abs(s.u) + tol))
        converged = small_pred | small_step
        lam = jnp.where(accept, jnp.maximum(s.lam / 10, 1e-9), s.lam * 10)
        stalled = ~accept & (lam > _LAMBDA_MAX) & ~converged

        new = _State(
            u=jnp.where(accept, u_new, s.u),
            loss=jnp.where(accept, loss_new, s.loss),
            g=jnp.where(accept, g_new * active, s.g),
            h=jnp.where(accept, h_new, s.h),
            lam=lam,
            iteration=s.iteration + 1,
            done=converged | stalled,
            status=jnp.where(
                converged, Status.CONVERGED, jnp.where(stalled, Status.SINGULAR, s.status)
            ).astype(jnp.int32),
        )
        # A finished region keeps its state: under vmap every region runs the same steps.
        return jax.tree_util.tree_map(lambda a, b: jnp.where(s.done, a, b), s, new)

    if unroll:
        state, _ = jax.lax.scan(lambda s, _: (step(s), None), state, None, length=max_iter)
    else:
        state = jax.lax.while_loop(lambda s: ~s.done & (s.iteration < max_iter), step, state)
    return state.u, state.status, state.iteration
