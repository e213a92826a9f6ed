"""`crlb`: the Cramér–Rao lower bound on the parameters of sources in a region, jointly.

The best precision any unbiased fit can reach, from the Fisher information of the model image; a
fit is efficient when its scatter over noise draws, and the errors it reports, match this bound.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._background import n_background_params
from ._linalg import exact_matmuls, masked_inverse
from ._noise import _POISSON_FLOOR, NoiseModel, get_noise
from ._problem import RegionProblem
from ._psf import PSF, get_psf

__all__ = ["CRLBResult", "crlb"]

_TRACE_COUNT = [0]  # incremented each time a bound program is traced (tests use it)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CRLBResult:
    """What [`crlb`][] returns; its fields mirror those of `FitResult`, so fit and bound compare
    entry by entry (`fit.errors["x"] / bound.errors["x"]`).

    **Fields:**

    - `errors`: dict with the same keys as the `params` given: the 1σ bound (square root of the
      diagonal of the inverse Fisher matrix) of each parameter, shaped like the region layout of
      `params` (`(B, K)`, `(K,)` or `()` per source parameter; `"background"` `(B,)` / `(B, 3)`,
      `()` / `(3,)`). 0 for fixed parameters, NaN for padded sources, and NaN everywhere in a
      region whose Fisher matrix is singular.
    - `covariance`: `(..., P, P)` inverse Fisher matrix of the free parameters in the order of
      `names` (rows of padded sources are 0); the same layout as `FitResult.covariance`.
    - `fisher`: `(..., P, P)` Fisher information matrix itself, in the same order.
    - `names`: `(P,)` tuple of `(parameter, source_index)` labelling the rows; the background's
      are `("background", i)`.
    """

    errors: dict
    covariance: jax.Array
    fisher: jax.Array
    names: tuple = dataclasses.field(metadata=dict(static=True), default=())


def _information(noise: NoiseModel, has_read_noise: bool) -> Callable:
    """Per-pixel Fisher weight `1 / var` of the data about its mean `mu`."""
    if noise is get_noise("poisson"):
        return lambda mu, w, r: w / (jnp.maximum(mu, _POISSON_FLOOR) + r * r)
    if noise is get_noise("gaussian"):
        if has_read_noise:
            return lambda mu, w, r: w / (r * r) + 0.0 * mu
        return lambda mu, w, r: w + 0.0 * mu
    # Any other likelihood: its expected curvature at data equal to the model, pixel by pixel
    # (a loss written for scalars is differentiated one pixel at a time).
    return lambda mu, w, r: jnp.vectorize(noise.curvature)(mu, mu, w)


@functools.lru_cache(maxsize=128)
def _program(free: RegionProblem, has_read_noise: bool, batched: bool):
    """The compiled bound for one region layout (batched with `vmap` when `batched`)."""
    # The same region with every parameter held: its `model` is then a function of the natural
    # parameters alone, which is what the Fisher information is about.
    everything = frozenset((*free.names, "background"))
    model_problem = dataclasses.replace(free, fixed=everything)
    information = _information(free.noise, has_read_noise)
    free_source = free.free_names
    k, nb = free.n_sources, free.n_background

    def one(params, valid, weight, read_noise):
        dtype = params["background"].dtype
        no_u = jnp.zeros((0,), dtype)
        held = {n: v for n, v in params.items() if n not in free_source and n != "background"}
        if not free.background_free:
            held["background"] = params["background"]

        def model(p):
            return model_problem.model(no_u, dict(valid=valid, fixed={**held, **p}))

        theta = {n: params[n] for n in free_source}
        if free.background_free:
            theta["background"] = params["background"]
        mu = model(theta)
        jac = jax.jacfwd(model)(theta)  # name -> (H, W, K) or (H, W, nb)
        npix = mu.size
        cols = [jac[n].reshape(npix, k) for n in free_source]
        parts = [jnp.stack(cols, axis=-1).reshape(npix, k * len(free_source))] if cols else []
        if free.background_free:
            parts.append(jac["background"].reshape(npix, nb))
        j = jnp.concatenate(parts, axis=1) if parts else jnp.zeros((npix, 0), dtype)

        info = information(mu, weight, read_noise).reshape(-1)
        fisher = (j.T * info[None, :]) @ j
        active = free.active(dict(valid=valid), dtype)
        # Scaling to a unit diagonal first keeps the Cholesky accurate in float32 when
        # positions (information ~ N / sigma²) and fluxes (~ 1 / N) share one matrix.
        d = jnp.sqrt(jnp.diagonal(fisher))
        d = jnp.where((active > 0) & (d > 0), d, 1.0)
        scale = d[:, None] * d[None, :]
        cov = masked_inverse(fisher / scale, active) / scale
        sd = jnp.sqrt(jnp.maximum(jnp.diagonal(cov), 0.0))
        sd = jnp.where(jnp.all(jnp.isfinite(cov)), sd, jnp.nan)

        nf = len(free_source)
        src = sd[: k * nf].reshape(k, nf)
        errors = {}
        for n in free.names:
            if n in free.fixed:
                errors[n] = jnp.zeros((k,), dtype)
            else:
                errors[n] = jnp.where(valid, src[:, free_source.index(n)], jnp.nan)
        errors["background"] = sd[k * nf :] if free.background_free else jnp.zeros((nb,), dtype)
        return errors, cov, fisher

    @exact_matmuls
    def run(params, valid, weight, read_noise):
        _TRACE_COUNT[0] += 1
        f = jax.vmap(one) if batched else one
        return f(params, valid, weight, read_noise)

    return jax.jit(run)


def _float_dtype(arrays):
    dtype = jnp.result_type(*arrays) if arrays else jnp.asarray(0.0).dtype
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.asarray(0.0).dtype


def crlb(
    params: dict,
    *,
    psf: str | PSF | Callable = "gaussian",
    background: str = "constant",
    noise: str | NoiseModel | Callable = "poisson",
    shape: tuple[int, int],
    valid=None,
    fixed: Sequence[str] = (),
    weights=None,
    read_noise=None,
) -> CRLBResult:
    """Cramér–Rao lower bound of every free parameter of one or many regions, jointly.

    The Fisher information of the expected image `mu` about the parameters `theta` is
    `I_ij = sum_k w_k d_i mu_k d_j mu_k / var_k`, with the derivatives taken by `jax.jacfwd` of
    the region model with respect to the natural parameters (so any PSF, a user's own function
    included, works); the bound is the inverse `I⁻¹`. All sources of a region and its background
    share one matrix: its off-diagonal blocks are the price of crowding. The bound is the same
    for `x` whether or not the fit frees `sigma`, etc. only when the parameters decouple, so ask
    for the bound of the free-parameter set the fit actually uses.

    **Arguments:**

    - `params`: the true (or fitted) parameters, keyed by name like `fit_regions`' `init`: every
      source parameter of the PSF and `"background"`. Three layouts are accepted:
      - a batch of `B` regions of `K` sources: `(B, K)` per source parameter (anything that
        broadcasts to it), `"background"` `(B,)` (`"constant"`) or `(B, 3)` (`"plane"`);
      - one region of `K` sources: `(K,)` (or scalars) per source parameter, `"background"`
        a number (or `(1,)`) or `(3,)`;
      - one source: scalars per source parameter and a scalar background.
      The layout is taken from the largest number of dimensions among the source parameters.
    - `psf`: a PSF name, a `PSF`, or a JAX function `(params, x, y) -> image`, as for
      `fit_regions`.
    - `background`: `"constant"` or `"plane"`.
    - `noise`: `"poisson"` (variance `mu`, or `mu + read_noise²` when `read_noise` is given),
      `"gaussian"` (variance `read_noise²`, or `1 / weights`: give exactly one of them), or a
      `NoiseModel` / loss function (its expected curvature at data equal to the model).
    - `shape`: `(H, W)` of the window.
    - `valid`: `(B, K)` / `(K,)` True for real sources; padded slots get NaN bounds and change
      nothing else.
    - `fixed`: names of the parameters taken as known (e.g. `("sigma",)`, `("background",)`).
    - `weights`: `(H, W)` or `(B, H, W)` per-pixel factor on the information: the inverse
      variance for Gaussian noise, and a mask (0 drops a pixel) for any noise model.
    - `read_noise`: Gaussian read noise per pixel (counts): a number, or an `(H, W)` /
      `(B, H, W)` map.

    **Returns:** a [`CRLBResult`][] with `errors` (the 1σ bounds, keyed like `params`: `(B, K)`,
    `(K,)` or `()` per source parameter, the background's `(B,)` / `(B, 3)` or `()` / `(3,)`),
    `covariance` and `fisher` (`(B, P, P)`, or `(P, P)` for one region) and `names`.

    >>> import crowdfit
    >>> b = crowdfit.crlb({"x": 3.0, "y": 3.0, "flux": 1000.0, "sigma": 1.3, "background": 10.0},
    ...                   psf="integrated_gaussian", shape=(7, 7))
    >>> round(float(b.errors["x"]), 3), b.covariance.shape
    (0.056, (5, 5))
    """
    psf = get_psf(psf)
    noise_model = get_noise(noise)
    nb = n_background_params(background)
    try:
        h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (H, W), got {shape!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"shape must be positive, got {shape!r}")
    if not isinstance(params, dict):
        raise ValueError("params must be a dict of values keyed by parameter name")
    names = psf.params if psf.params is not None else tuple(n for n in params if n != "background")
    missing = [n for n in (*names, "background") if n not in params]
    if missing:
        raise ValueError(
            f"params is missing {missing} (psf {psf.name!r} needs {list(names)} and 'background')"
        )
    extra = [n for n in params if n not in (*names, "background")]
    if extra:
        raise ValueError(f"params has unknown parameters {extra} for psf {psf.name!r}")
    unknown_fixed = [n for n in fixed if n not in (*names, "background")]
    if unknown_fixed:
        raise ValueError(f"fixed names unknown parameters {unknown_fixed}")
    gaussian = noise_model is get_noise("gaussian")
    poisson = noise_model is get_noise("poisson")
    if gaussian and (weights is None) == (read_noise is None):
        raise ValueError(
            "gaussian noise needs its level: give exactly one of read_noise "
            "(standard deviation) or weights (inverse variances)"
        )
    if read_noise is not None and not (gaussian or poisson):
        raise ValueError(
            "read_noise goes with noise='poisson' or 'gaussian'; a custom noise "
            "model carries its own variance"
        )

    if read_noise is not None and not isinstance(read_noise, jax.core.Tracer):
        r = np.asarray(read_noise, float)
        if not (np.all(np.isfinite(r)) and np.all(r > 0 if gaussian else r >= 0)):
            raise ValueError(f"read_noise must be finite and {'> 0' if gaussian else '>= 0'}")

    arrays = {n: jnp.asarray(params[n]) for n in (*names, "background")}
    dtype = _float_dtype([a for a in arrays.values() if jnp.issubdtype(a.dtype, jnp.number)])
    for n, a in arrays.items():
        if not jnp.issubdtype(a.dtype, jnp.number):
            raise ValueError(f"params[{n!r}] must hold numbers, got dtype {a.dtype}")
    ndim = max((arrays[n].ndim for n in names), default=0)
    if ndim > 2:
        raise ValueError(f"source parameters must be (B, K), (K,) or scalars; got {ndim} dims")
    batched = ndim == 2
    try:
        lead = np.broadcast_shapes(*(arrays[n].shape for n in names)) if names else ()
    except ValueError:
        shapes = {n: arrays[n].shape for n in names}
        raise ValueError(f"source parameters do not broadcast together: {shapes}") from None
    if batched:
        b, k = lead
        bg = arrays["background"]
        if nb == 1 and bg.ndim <= 1:
            bg = bg.reshape(-1, 1) if bg.ndim == 1 else bg
        try:
            bg = jnp.broadcast_to(bg, (b, nb))
        except ValueError:
            want = "(B,)" if nb == 1 else "(B, 3)"
            raise ValueError(
                f"params['background'] has shape {arrays['background'].shape}; "
                f"background {background!r} needs {want} with B = {b}"
            ) from None
        region = (b,)
    else:
        b, k = None, (lead[0] if lead else 1)
        bg = arrays["background"]
        if bg.shape not in ((), (nb,)):
            want = "a number" if nb == 1 else "(3,)"
            raise ValueError(
                f"params['background'] has shape {bg.shape}; background "
                f"{background!r} needs {want} for one region"
            )
        bg = jnp.broadcast_to(bg.reshape(-1), (nb,))
        region = ()
    p = {n: jnp.broadcast_to(arrays[n], (*region, k)).astype(dtype) for n in names}
    p["background"] = bg.astype(dtype)

    if valid is None:
        valid = jnp.ones((*region, k), bool)
    else:
        valid = jnp.asarray(valid)
        try:
            valid = jnp.broadcast_to(valid, (*region, k)).astype(bool)
        except ValueError:
            raise ValueError(f"valid has shape {valid.shape}; expected {(*region, k)}") from None

    def pixel_map(a, what):
        a = jnp.asarray(a, dtype)
        try:
            return jnp.broadcast_to(a, (*region, h, w))
        except ValueError:
            raise ValueError(
                f"{what} has shape {a.shape}; expected a number, (H, W) = "
                f"{(h, w)}" + (f" or (B, H, W) = {(b, h, w)}" if batched else "")
            ) from None

    weight = pixel_map(1.0 if weights is None else weights, "weights")
    has_read_noise = read_noise is not None
    rn = pixel_map(0.0 if read_noise is None else read_noise, "read_noise")

    problem = RegionProblem(psf, tuple(names), frozenset(fixed), background, noise_model, k, (h, w))
    errors, cov, fisher = _program(problem, has_read_noise, batched)(p, valid, weight, rn)
    out = {n: errors[n].reshape(lead) for n in names}
    out["background"] = errors["background"][..., 0] if nb == 1 else errors["background"]
    return CRLBResult(errors=out, covariance=cov, fisher=fisher, names=problem.labels())
