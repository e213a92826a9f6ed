"""Noise models: the per-pixel negative log-likelihood of the data given the model.

Each model also gives the two quantities Levenberg–Marquardt needs per pixel: the derivative of
the loss with respect to the model value, and the Fisher weight (expected curvature).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["NoiseModel", "get_noise"]


@dataclasses.dataclass(frozen=True)
class NoiseModel:
    """A per-pixel loss `loss(model, data, weight)`, with `loss = 0` at a perfect fit.

    `gradient` is `d loss / d model` and `fisher` the expected curvature `E[d² loss / d model²]`;
    both default to automatic differentiation of `loss` (then `fisher` is the observed curvature).
    Twice the summed loss is the fit's χ² (Gaussian) or deviance (Poisson).
    """

    name: str
    loss: Callable
    gradient: Callable | None = None
    fisher: Callable | None = None
    known_scale: bool = True

    def grad(self, mu, d, w):
        if self.gradient is not None:
            return self.gradient(mu, d, w)
        # The loss is per pixel, so the gradient of its sum is the per-pixel derivative.
        return jax.grad(lambda m: jnp.sum(self.loss(m, d, w)))(mu)

    def curvature(self, mu, d, w):
        if self.fisher is not None:
            return self.fisher(mu, d, w)
        return jax.jvp(lambda m: self.grad(m, d, w), (mu,), (jnp.ones_like(mu),))[1]


# Model values below this floor are treated as this floor by the Poisson likelihood.
_POISSON_FLOOR = 1e-6


def _poisson_mu(mu):
    return jnp.maximum(mu, _POISSON_FLOOR)


def _poisson_loss(mu, d, w):
    # Half the Poisson deviance, mu - d + d log(d / mu); a pixel with d = 0 contributes mu.
    mu = _poisson_mu(mu)
    return w * (mu - d + d * jnp.log(jnp.where(d > 0, d, 1.0) / mu))


_GAUSSIAN = NoiseModel(
    "gaussian",
    loss=lambda mu, d, w: 0.5 * w * (mu - d) ** 2,
    gradient=lambda mu, d, w: w * (mu - d),
    fisher=lambda mu, d, w: w + 0.0 * mu,
    known_scale=False,
)

_POISSON = NoiseModel(
    "poisson",
    loss=_poisson_loss,
    gradient=lambda mu, d, w: w * (1.0 - d / _poisson_mu(mu)),
    fisher=lambda mu, d, w: w / _poisson_mu(mu),
    known_scale=True,
)

NOISE_NAMES = ("gaussian", "poisson")


def get_noise(noise) -> NoiseModel:
    """Turn `"gaussian"`, `"poisson"`, a `NoiseModel` or a function `loss(model, data, weight)`
    into a `NoiseModel`.

    >>> import crowdfit
    >>> crowdfit.get_noise("poisson").name
    'poisson'
    """
    if isinstance(noise, NoiseModel):
        return noise
    if noise == "gaussian":
        return _GAUSSIAN
    if noise == "poisson":
        return _POISSON
    if callable(noise):
        return NoiseModel(getattr(noise, "__name__", "custom"), loss=noise)
    raise ValueError(
        f"unknown noise {noise!r}: expected 'gaussian', 'poisson', or a function "
        "loss(model, data, weight) -> per-pixel loss"
    )
