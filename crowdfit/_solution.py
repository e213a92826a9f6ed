"""What a fit returns: a small pytree of batched arrays, and the status codes of a region."""

from __future__ import annotations

import dataclasses
import enum

import jax

__all__ = ["FitResult", "Status"]


class Status(enum.IntEnum):
    """Outcome of one region's fit."""

    CONVERGED = 0
    MAX_ITERATIONS = 1
    SINGULAR = 2
    NOT_FINITE = 3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FitResult:
    """Result of `fit_regions` for a batch of `B` regions of `K` source slots.

    **Fields:**

    - `params`: dict like `init`: `(B, K)` per source parameter, `"background"` `(B,)` or `(B, 3)`.
    - `errors`: dict of 1σ uncertainties, same shapes; 0 for fixed parameters and padded sources,
      NaN where the fit was singular, and NaN for a source whose flux collapsed to zero (it
      carries no information; it is left out of the covariance so the region keeps its errors).
    - `covariance`: `(B, P, P)` covariance of the free parameters in the order of `names`
      (rows of fixed or padded parameters are 0).
    - `status`: `(B,)` int codes, see `Status` (0 = converged).
    - `iterations`: `(B,)` iterations used.
    - `loss`: `(B,)` χ² (Gaussian noise) or Poisson deviance at the optimum.
    - `chi2_reduced`: `(B,)` Pearson χ² per degree of freedom.
    - `names`: `(P,)` tuple of `(parameter, source_index)` labelling the covariance rows;
      the background's are `("background", i)`.
    """

    params: dict
    errors: dict
    covariance: jax.Array
    status: jax.Array
    iterations: jax.Array
    loss: jax.Array
    chi2_reduced: jax.Array
    names: tuple = dataclasses.field(metadata=dict(static=True), default=())

    @property
    def converged(self):
        """`(B,)` True where the region's fit converged."""
        return self.status == Status.CONVERGED
