"""Constraints by reparameterisation: each bounded parameter is a smooth function of a free one.

Positions stay in (or near) the window, widths within sane bounds, fluxes non-negative; the
solver works on the unconstrained values, so no step is ever clipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["bounds_for", "to_internal", "to_natural"]

# Widths below this are unresolved by pixels; above max(H, W) the window cannot tell a source
# from the background.
SIGMA_MIN = 0.25
_EDGE = 1e-4  # fraction of a bounded interval kept clear of its ends when starting a fit


def bounds_for(name: str, shape: tuple[int, int]):
    """`("interval", lo, hi)`, `("positive",)` or `("free",)` for a parameter of a window."""
    h, w = shape
    # Positions may leave the window by its own size: a neighbour just outside a window, whose
    # light reaches in, can be fitted or held there.
    if name == "x":
        return ("interval", -0.5 - w, 2 * w - 0.5)
    if name == "y":
        return ("interval", -0.5 - h, 2 * h - 0.5)
    if name in ("sigma", "sigma_x", "sigma_y"):
        return ("interval", SIGMA_MIN, float(max(h, w)))
    if name == "flux":
        return ("positive",)
    return ("free",)


def to_natural(name: str, u, shape):
    kind, *b = bounds_for(name, shape)
    if kind == "interval":
        lo, hi = b
        return lo + (hi - lo) * jax.nn.sigmoid(u)
    if kind == "positive":
        return jax.nn.softplus(u)
    return u


def to_internal(name: str, theta, shape):
    """Inverse of `to_natural`; values on or beyond a bound start just inside it."""
    kind, *b = bounds_for(name, shape)
    if kind == "interval":
        lo, hi = b
        t = jnp.clip((theta - lo) / (hi - lo), _EDGE, 1 - _EDGE)
        return jnp.log(t) - jnp.log1p(-t)
    if kind == "positive":
        f = jnp.maximum(theta, 1e-3)
        # softplus^-1(f) = f + log(1 - exp(-f)), stable for large and small f.
        return f + jnp.log(-jnp.expm1(-f))
    return theta
