"""Any optax optimizer on one region's loss: for custom losses, or to compare with LM.

L-BFGS and other optimizers that need the loss value get it through optax's extra arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from .._solution import Status

__all__ = ["optax_minimise"]


def optax_minimise(problem, u0, data, *, solver, max_iter: int, tol: float, unroll=False):
    """Minimise `problem.loss(u, data)` from `u0` with the optax `solver`.

    The optimizer sees parameters rescaled by the square root of the Fisher information at the
    start (so one unit is about one standard error) and the loss per degree of freedom, which
    makes one learning rate suit every parameter. Converges when the loss changes by less than
    `tol` times the loss per degree of freedom over one step.

    **Returns:** `(u, status, iterations)`.
    """
    dtype = u0.dtype
    active = problem.active(data, dtype)
    dof = jnp.maximum(jnp.sum(data["mask"]) - jnp.sum(active), 1.0)
    solver = optax.with_extra_args_support(solver)
    loss0, _, h0 = problem.normal_equations(u0, data)
    diag = jnp.diagonal(h0)
    scale = jnp.where(diag > 0, jax.lax.rsqrt(jnp.where(diag > 0, diag, 1.0)), 1.0)
    norm = jnp.where(jnp.isfinite(loss0) & (loss0 > 0), loss0 / dof, 1.0)
    # The optimizer works on z, with u = u0 + scale * z.
    loss_fn = lambda z: problem.loss(u0 + scale * z, data) / norm
    value_and_grad = jax.value_and_grad(loss_fn)

    def step(carry):
        u, state, loss_prev, it, done, status = carry
        value, grad = value_and_grad(u)
        grad = grad * active
        updates, new_state = solver.update(grad, state, u, value=value, grad=grad, value_fn=loss_fn)
        u_new = u + updates * active
        loss_new = loss_fn(u_new)
        finite = jnp.isfinite(loss_new) & jnp.all(jnp.isfinite(u_new))
        converged = finite & (jnp.abs(loss_prev - loss_new) <= tol * jnp.abs(loss_new) / dof)
        new_status = jnp.where(
            converged, Status.CONVERGED, jnp.where(finite, status, Status.NOT_FINITE)
        ).astype(jnp.int32)
        new = (
            jnp.where(finite, u_new, u),
            new_state,
            jnp.where(finite, loss_new, loss_prev),
            it + 1,
            converged | ~finite,
            new_status,
        )
        return jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), carry, new)

    z0 = jnp.zeros_like(u0)
    loss0 = loss_fn(z0)
    finite0 = jnp.isfinite(loss0)
    carry = (
        z0,
        solver.init(z0),
        loss0,
        jnp.asarray(0, jnp.int32),
        ~finite0,
        jnp.where(finite0, Status.MAX_ITERATIONS, Status.NOT_FINITE).astype(jnp.int32),
    )
    if unroll:
        carry, _ = jax.lax.scan(lambda c, _: (step(c), None), carry, None, length=max_iter)
    else:
        carry = jax.lax.while_loop(lambda c: ~c[4] & (c[3] < max_iter), step, carry)
    z, _, _, it, _, status = carry
    return u0 + scale * z, status, it
