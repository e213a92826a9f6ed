"""Point-spread-function models: one source's image as a pure JAX function of its parameters.

A PSF is any function `(params: dict, x, y) -> image`; the built-ins below are looked up by name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

__all__ = ["PSF", "get_psf", "PSF_NAMES", "ellipse_covariance", "ellipse_from_covariance"]


@dataclasses.dataclass(frozen=True)
class PSF:
    """A point-spread-function model.

    **Arguments:**

    - `name`: what the model is called.
    - `params`: the names of one source's parameters, in order (e.g. `("x", "y", "flux", "sigma")`),
      or `None` to take them from the keys of the `init` dict a fit is given.
    - `render`: `render(params, x, y) -> image`, where `params` maps each name to a scalar, `x` is
      the column coordinate with shape `(1, W)` and `y` the row coordinate with shape `(H, 1)`
      (pixel centres at integers). The result broadcasts to `(H, W)` and holds the source's counts
      per pixel (so it sums to about `flux` for a source well inside the window).
    - `profile`: for a separable model, its 1-D factor `profile(d, s)` (elementwise in the
      offsets `d` from the centre and the width `s`), such that `render` is
      `flux * profile(y - y0, s_y) * profile(x - x0, s_x)`, with `s_x, s_y` the `sigma_x`,
      `sigma_y` parameters (or both `sigma`), and `params` holds no other names. Fits then
      build the Jacobian from the profiles, and with Gaussian noise on unmasked windows use a
      cheaper, exact Gauss–Newton matrix (see `RegionProblem`). `None`: not separable.
    """

    name: str
    params: tuple[str, ...] | None
    render: Callable
    profile: Callable | None = None

    def widths(self, p):
        """`(s_x, s_y)` of a separable model from its parameters `p`."""
        if "sigma_x" in p:
            return p["sigma_x"], p["sigma_y"]
        return p["sigma"], p["sigma"]

    def __call__(self, params, x, y):
        return self.render(params, x, y)


def _gauss_1d(d, sigma):
    return jnp.exp(-0.5 * (d / sigma) ** 2)


def _integrated_1d(d, sigma):
    # Fraction of a unit 1-D Gaussian that falls on the pixel [d - 1/2, d + 1/2].
    s = sigma * math.sqrt(2.0)
    return 0.5 * (erf((d + 0.5) / s) - erf((d - 0.5) / s))


def _gauss_profile(d, sigma):
    return _gauss_1d(d, sigma) / (math.sqrt(2 * math.pi) * sigma)


def _gaussian(p, x, y):
    s = p["sigma"]
    amplitude = p["flux"] / (2 * math.pi * s * s)
    return amplitude * _gauss_1d(y - p["y"], s) * _gauss_1d(x - p["x"], s)


def _elliptical_gaussian(p, x, y):
    sx, sy = p["sigma_x"], p["sigma_y"]
    amplitude = p["flux"] / (2 * math.pi * sx * sy)
    return amplitude * _gauss_1d(y - p["y"], sy) * _gauss_1d(x - p["x"], sx)


def _rotated_gaussian(p, x, y):
    # The seed question's 7-parameter model, same angle convention, with its amplitude
    # written as flux / (2 pi sigma_x sigma_y).
    sx, sy, t = p["sigma_x"], p["sigma_y"], p["angle"]
    a = jnp.cos(t) ** 2 / (2 * sx**2) + jnp.sin(t) ** 2 / (2 * sy**2)
    b = -jnp.sin(2 * t) / (4 * sx**2) + jnp.sin(2 * t) / (4 * sy**2)
    c = jnp.sin(t) ** 2 / (2 * sx**2) + jnp.cos(t) ** 2 / (2 * sy**2)
    dx, dy = x - p["x"], y - p["y"]
    amplitude = p["flux"] / (2 * math.pi * sx * sy)
    return amplitude * jnp.exp(-(a * dx**2 + 2 * b * dx * dy + c * dy**2))


def ellipse_covariance(sigma_x, sigma_y, angle):
    """`(c_xx, c_yy, c_xy)`: the covariance of `"rotated_gaussian"` spots of widths
    `sigma_x, sigma_y` at `angle` (radians; any shapes that broadcast, numpy).

    The `sigma_x` axis points along `(cos angle, -sin angle)` in `(x, y)` (rows grow downwards,
    so on a displayed image `angle` turns it anticlockwise from x).

    >>> [round(float(c), 3) for c in ellipse_covariance(1.0, 2.0, 0.0)]
    [1.0, 4.0, 0.0]
    """
    c, s = np.cos(angle), np.sin(angle)
    vx, vy = np.square(sigma_x), np.square(sigma_y)
    return vx * c * c + vy * s * s, vx * s * s + vy * c * c, (vy - vx) * s * c


def ellipse_from_covariance(c_xx, c_yy, c_xy):
    """`(sigma_x, sigma_y, angle)` of `"rotated_gaussian"` spots with this covariance
    (`ellipse_covariance`'s inverse), with `angle` in `(-pi/4, pi/4]`: `sigma_x` is the width
    along the axis nearest x (so an ellipse along x and y has angle 0, like
    `"elliptical_gaussian"`).

    >>> [round(float(v), 3) for v in ellipse_from_covariance(*ellipse_covariance(1.0, 2.0, 1.2))]
    [2.0, 1.0, -0.371]
    """
    c_xx, c_yy, c_xy = (np.asarray(v, float) for v in (c_xx, c_yy, c_xy))
    mean = 0.5 * (c_xx + c_yy)
    diff = np.hypot(0.5 * (c_xx - c_yy), c_xy)
    major = -0.5 * np.arctan2(2.0 * c_xy, c_xx - c_yy)  # (the sigma_x axis on the major one)
    swap = np.abs(major) > math.pi / 4
    angle = np.where(swap, major - np.sign(major) * math.pi / 2, major)
    big, small = np.sqrt(mean + diff), np.sqrt(np.maximum(mean - diff, 0.0))
    return np.where(swap, small, big), np.where(swap, big, small), angle


def _integrated_gaussian(p, x, y):
    s = p["sigma"]
    return p["flux"] * _integrated_1d(y - p["y"], s) * _integrated_1d(x - p["x"], s)


def _integrated_elliptical_gaussian(p, x, y):
    return (
        p["flux"]
        * _integrated_1d(y - p["y"], p["sigma_y"])
        * _integrated_1d(x - p["x"], p["sigma_x"])
    )


_BUILTIN = {
    "gaussian": PSF("gaussian", ("x", "y", "flux", "sigma"), _gaussian, _gauss_profile),
    "elliptical_gaussian": PSF(
        "elliptical_gaussian",
        ("x", "y", "flux", "sigma_x", "sigma_y"),
        _elliptical_gaussian,
        _gauss_profile,
    ),
    "rotated_gaussian": PSF(
        "rotated_gaussian",
        ("x", "y", "flux", "sigma_x", "sigma_y", "angle"),
        _rotated_gaussian,
    ),
    "integrated_gaussian": PSF(
        "integrated_gaussian", ("x", "y", "flux", "sigma"), _integrated_gaussian, _integrated_1d
    ),
    "integrated_elliptical_gaussian": PSF(
        "integrated_elliptical_gaussian",
        ("x", "y", "flux", "sigma_x", "sigma_y"),
        _integrated_elliptical_gaussian,
        _integrated_1d,
    ),
}

PSF_NAMES = tuple(_BUILTIN)


def get_psf(psf: str | PSF | Callable) -> PSF:
    """Turn a PSF name, a `PSF`, or a bare `(params, x, y) -> image` function into a `PSF`.

    **Arguments:**

    - `psf`: one of `"gaussian"`, `"elliptical_gaussian"`, `"rotated_gaussian"`,
      `"integrated_gaussian"`, `"integrated_elliptical_gaussian"`; a `PSF`; or a JAX function.

    **Returns:** a `PSF`. A bare function gets `params=None`: its parameter names are taken from
    the `init` dict of the fit.

    >>> import crowdfit
    >>> crowdfit.get_psf("gaussian").params
    ('x', 'y', 'flux', 'sigma')
    """
    if isinstance(psf, PSF):
        return psf
    if isinstance(psf, str):
        try:
            return _BUILTIN[psf]
        except KeyError:
            raise ValueError(
                f"unknown psf {psf!r}: expected one of {', '.join(PSF_NAMES)}, "
                "or a JAX function (params, x, y) -> image"
            ) from None
    if callable(psf):
        return PSF(getattr(psf, "__name__", "custom"), None, psf)
    raise ValueError(f"psf must be a name, a PSF or a callable, got {type(psf).__name__}")


def amplitude(params: dict, psf: str | PSF = "gaussian"):
    """Peak value (counts per pixel at the centre) of point-sampled Gaussian sources.

    **Arguments:** `params` with `flux` and `sigma` (or `sigma_x`, `sigma_y`), any shapes that
    broadcast; `psf` the model they belong to.

    **Returns:** `flux / (2 pi sigma_x sigma_y)`; for the integrated Gaussians the value of the
    central pixel of a source centred on a pixel.

    >>> import crowdfit
    >>> round(float(crowdfit.amplitude({"flux": 2 * 3.14159265 * 4, "sigma": 2.0})), 3)
    1.0
    """
    psf = get_psf(psf)
    sx = params.get("sigma_x", params.get("sigma"))
    sy = params.get("sigma_y", params.get("sigma"))
    if sx is None:
        raise ValueError("amplitude needs 'sigma' or 'sigma_x' and 'sigma_y' in params")
    if psf.name.startswith("integrated"):
        return params["flux"] * _integrated_1d(0.0, sx) * _integrated_1d(0.0, sy)
    return params["flux"] / (2 * math.pi * sx * sy)
