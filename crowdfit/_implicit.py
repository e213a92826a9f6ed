"""Exact derivatives of a fitted optimum by the implicit function theorem.

At the optimum `grad_u L(u*, data) = 0`, so `du* = -H⁻¹ ∂(grad_u L)/∂data · d(data)` with `H` the
full Hessian of the loss. One small linear solve replaces differentiating every solver iteration.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ._background import render_background
from ._linalg import cholesky, cholesky_solve, exact_matmuls
from ._problem import RegionProblem, _pixel_sum

__all__ = ["implicit_optimum", "loss_hessian"]


def loss_hessian(problem: RegionProblem, u: jax.Array, data: dict) -> jax.Array:
    """Full `(P, P)` Hessian of `problem.loss` with respect to `u`, assembled by hand.

    The model is a sum of sources, each moved only by its own parameters, plus a background, so
    `H = Jᵀ diag(ℓ'') J + Σ_k ℓ'ᵀ ∇²(source k) + ℓ'ᵀ ∇²(background)`, with `J` the model's Jacobian
    and `ℓ'`, `ℓ''` the per-pixel loss's first and second derivatives in the model value (the
    observed curvature, not the Fisher weight that Levenberg–Marquardt uses). The second-order
    terms are small per-source blocks, so this costs a few times less than `jax.hessian` of the
    loss for regions of several sources (whose cost grows as the square of their number), and is
    exact all the same (`tests/test_gradients.py` holds it to `jax.hessian`).

    **Arguments:** `problem` a `RegionProblem`, `u` the `(P,)` free parameters, `data` the region.

    **Returns:** the `(P, P)` Hessian.
    """
    mu, jac = problem.model_and_jacobian(u, data)
    d, w, m = data["image"], data["weight"], data["mask"]
    pixel_loss = lambda mu: _pixel_sum(m * problem.noise.loss(mu, d, w))
    # The loss is a sum over pixels, so its gradient's derivative along ones is its diagonal.
    r, c = jax.jvp(jax.grad(pixel_loss), (mu,), (jnp.ones_like(mu),))
    h = (jac * c.reshape(1, -1)) @ jac.T

    src, bg = problem._split(u)
    k, nf = src.shape
    x, y = problem.grid(u.dtype)
    fixed = {n: data["fixed"][n] for n in problem.names if n in problem.fixed}

    def source_block(v, fixed_k, valid_k):
        curvature = lambda v: _pixel_sum(r * problem._source_image(v, fixed_k, x, y))
        return valid_k * jax.hessian(curvature)(v)

    blocks = jax.vmap(source_block)(src, fixed, data["valid"].astype(u.dtype))  # (K, nf, nf)
    eye_k = jnp.eye(k, dtype=u.dtype)
    block_diag = (eye_k[:, None, :, None] * blocks[:, :, None, :]).reshape(k * nf, k * nf)
    h = h.at[: k * nf, : k * nf].add(block_diag)
    if problem.background_free:
        background = lambda b: _pixel_sum(
            r * jnp.broadcast_to(render_background(problem.background, b, x, y), problem.shape)
        )
        h = h.at[k * nf :, k * nf :].add(jax.hessian(background)(bg))
    return h


def _mask_tangent(t, keep):
    # Integer and boolean inputs (`valid`) carry float0 tangents, which hold nothing to mask.
    if t.dtype == jax.dtypes.float0:
        return t
    return jnp.where(keep, t, jnp.zeros_like(t))


@functools.cache
def implicit_optimum(problem: RegionProblem):
    """`f(u_star, u0, data, ok) -> u_star` whose derivative is the one of the implicit function
    theorem.

    `u_star` `(P,)` is the solver's result and `u0` `(P,)` its start. The active entries of
    `u_star` (see `problem.active`) are the optimum: their derivative with respect to every array
    in `data` (the image, the weights, the `fixed` parameters) is `-H⁻¹ ∂(grad_u L)/∂data`, and
    they do not depend on `u0` at all. The inactive entries (padded or held sources) never moved
    from `u0`, so they pass its derivative through, and the optimum depends on them through the
    model like on any other data. Forward and reverse mode, under `jit` and `vmap`.

    Inactive entries get an identity block in `H`, so they cannot make it singular. A region with
    `ok` False (it did not converge), or whose Hessian is not positive definite, gets an exact
    zero derivative of its optimum, in both modes: its tangents are masked before they reach the
    solve, so a NaN there can never leak into a sum over the batch.

    **Arguments:** `problem` a `RegionProblem`.

    **Returns:** `f(u_star, u0, data, ok)`, with `data` the region's dict and `ok` a boolean
    scalar.
    """

    @jax.custom_jvp
    def f(u, u0, data, ok):
        return u

    @f.defjvp
    @exact_matmuls
    def f_jvp(primals, tangents):
        u, _, data, ok = primals
        _, du0, ddata, _ = tangents
        dtype = u.dtype
        active = problem.active(data, dtype)
        du0 = du0 * (1.0 - active)
        ok = ok & jnp.all(jnp.isfinite(u))
        # Linearise a failed region about a harmless point, so its (discarded) terms stay finite.
        u_lin = jnp.where(ok, u, jnp.zeros_like(u))
        hess = loss_hessian(problem, u_lin, data)
        outer = (active[:, None] * active[None, :]) > 0
        hess = jnp.where(outer, hess, jnp.diag(1.0 - active))
        factor = cholesky(hess)
        good = ok & jnp.all(jnp.isfinite(factor))
        factor = jnp.where(good, factor, jnp.eye(u.shape[0], dtype=dtype))
        ddata, du0_moved = jax.tree_util.tree_map(lambda t: _mask_tangent(t, good), (ddata, du0))
        grad_u = lambda u, d: jax.grad(problem.loss)(u, d) * active
        _, dg = jax.jvp(grad_u, (u_lin, data), (du0_moved, ddata))
        du = -cholesky_solve(factor, dg) * active
        return u, jnp.where(good, du, jnp.zeros_like(du)) + du0

    return f
