"""Small dense linear algebra for the solvers: masked, damped Cholesky solves of `(P, P)` systems.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

__all__ = ["masked_solve", "masked_inverse"]


def _masked(h, active):
    # Inactive parameters (padded sources) get an identity block, so the system stays regular
    # and their step is exactly zero.
    outer = active[:, None] * active[None, :]
    return h * outer + jnp.diag(1.0 - active)


def masked_solve(h, g, active):
    """Solve `h x = g` on the active parameters; `x` is 0 on the others (NaN if `h` is singular)."""
    c = cho_factor(_masked(h, active), lower=True)
    return cho_solve(c, g * active) * active


def masked_inverse(h, active):
    """Inverse of `h` on the active block, zeros elsewhere (NaN if that block is singular)."""
    c = cho_factor(_masked(h, active), lower=True)
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    return cho_solve(c, eye) * (active[:, None] * active[None, :])
