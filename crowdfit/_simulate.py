"""Simulated images with known truth: crowded fields, isolated spots in windows, and close pairs.

Sources are rendered with any crowdfit PSF (or a user's JAX function); a truth catalog comes along.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._psf import PSF, get_psf

__all__ = [
    "lognormal_flux",
    "powerlaw_flux",
    "simulate_field",
    "simulate_pairs",
    "simulate_spots",
]

# The seed question's spots: amplitude 100 with sigma 2, i.e. flux = 100 * 2 pi sigma^2.
_SEED_FLUX = 100.0 * 2.0 * math.pi * 2.0**2
_NOISE_MODELS = ("gaussian", "poisson", "none")
# Pixels rendered per device call: about 16 MiB of float32.
_PIXELS_PER_CALL = 1 << 22

FluxSpec = (
    float | Sequence[float] | np.ndarray | str | Callable[[np.random.Generator, int], np.ndarray]
)
Seed = int | np.random.Generator | None


def lognormal_flux(median: float = 1000.0, width: float = 0.5) -> Callable:
    """A log-normal flux distribution, for `flux=` of the simulators.

    **Arguments:**

    - `median`: the median flux (counts).
    - `width`: the standard deviation of `ln(flux)`.

    **Returns:** a function `(rng, n) -> (n,) fluxes`. `flux="lognormal"` is `lognormal_flux()`.

    >>> import numpy as np
    >>> from crowdfit._simulate import lognormal_flux
    >>> lognormal_flux(500.0, 0.2)(np.random.default_rng(0), 3).shape
    (3,)
    """
    if not median > 0 or not width >= 0:
        raise ValueError(f"lognormal_flux needs median > 0 and width >= 0, got {median}, {width}")

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        return median * np.exp(width * rng.standard_normal(n))

    return draw


def powerlaw_flux(f_min: float = 1000.0, f_max: float = 1e6, index: float = 2.5) -> Callable:
    """A truncated power-law luminosity function, `dN/dF ∝ F^-index` on `[f_min, f_max]`.

    The default `index = 2.5` is the Euclidean number count of a uniform population of stars
    (`N(>F) ∝ F^-1.5`): most stars are faint, a few are very bright.

    **Arguments:**

    - `f_min`, `f_max`: the faintest and brightest flux (counts), `0 < f_min < f_max`.
    - `index`: the power-law slope of the differential counts.

    **Returns:** a function `(rng, n) -> (n,) fluxes` (inverse-CDF sampling).
    `flux="powerlaw"` is `powerlaw_flux()`.

    >>> import numpy as np
    >>> from crowdfit._simulate import powerlaw_flux
    >>> f = powerlaw_flux(10.0, 100.0)(np.random.default_rng(0), 1000)
    >>> bool(f.min() >= 10.0 and f.max() <= 100.0)
    True
    """
    if not 0 < f_min < f_max:
        raise ValueError(f"powerlaw_flux needs 0 < f_min < f_max, got {f_min}, {f_max}")

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        u = rng.random(n)
        if abs(index - 1.0) < 1e-12:
            return f_min * (f_max / f_min) ** u
        a = 1.0 - index
        return (f_min**a + u * (f_max**a - f_min**a)) ** (1.0 / a)

    return draw


_FLUX_DISTRIBUTIONS = {"lognormal": lognormal_flux, "powerlaw": powerlaw_flux}


def simulate_field(
    shape: tuple[int, int],
    n_sources: int,
    *,
    psf: str | PSF | Callable = "gaussian",
    sigma: float = 2.0,
    flux: FluxSpec = _SEED_FLUX,
    background: float | tuple[float, float, float] | np.ndarray = 5.0,
    noise: str = "gaussian",
    read_noise: float | None = None,
    offset: float = 0.0,
    gain: float = 1.0,
    min_separation: float | None = None,
    border: float = 0.0,
    integer_positions: bool = False,
    positions: np.ndarray | None = None,
    stamp_radius: int | None = None,
    seed: Seed = None,
    **psf_params,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Simulate a field of (possibly overlapping) sources on a background, with noise.

    The defaults are the seed question's field: point-sampled Gaussians of `sigma = 2` and amplitude
    100, on a background of 5 with Gaussian noise of standard deviation 5. With
    `shape=(200, 400), n_sources=50, integer_positions=True` it is the seed's scenario.

    The image is, pixel by pixel, `offset + gain * counts + read noise`, where `counts` is the
    expected number of photons (background plus every source) for `noise="none"` and `"gaussian"`,
    and a Poisson draw of it for `noise="poisson"`. `flux` and `background` are therefore in
    photons; `read_noise` and `offset` in image units. `noise="none"` adds no read noise.

    Each source is rendered with the PSF's own `render` on a square stamp of `±stamp_radius` pixels
    around it (all sources in one vmapped JAX call) and added into the image on the host; pixels
    that fall outside the image are dropped, so sources near or across the border are clipped.

    **Arguments:**

    - `shape`: `(H, W)` of the image.
    - `n_sources`: how many sources (`>= 0`).
    - `psf`: a PSF name (`"gaussian"`, `"elliptical_gaussian"`, `"rotated_gaussian"`,
      `"integrated_gaussian"`, `"integrated_elliptical_gaussian"`), a `PSF`, or a JAX function
      `(params, x, y) -> image` (it gets `x`, `y`, `flux`, `sigma` and every `psf_params` entry).
    - `sigma`: the PSF width in pixels; also the default of `sigma_x` and `sigma_y`.
    - `flux`: each source's total counts: a number, an `(n_sources,)` array, a function
      `(rng, n) -> (n,) array`, or `"lognormal"` / `"powerlaw"` (the defaults of
      [`lognormal_flux`][] and [`powerlaw_flux`][]; call those for other parameters).
    - `background`: expected counts per pixel: a number; a tuple `(b0, slope_x, slope_y)` for the
      tilted plane `b0 + slope_x * x + slope_y * y`; or an `(H, W)` array.
    - `noise`: `"gaussian"`, `"poisson"` or `"none"`.
    - `read_noise`: standard deviation of the additive Gaussian noise (image units); by default 5
      (the seed's) with `noise="gaussian"` and 0 with `noise="poisson"`.
    - `offset`: the camera's constant offset (image units).
    - `gain`: image units per photon (`> 0`).
    - `min_separation`: if given, no two sources are closer than this (pixels); positions are drawn
      by rejection, and a `ValueError` says so when they cannot be placed.
    - `border`: keep drawn positions at least this far (pixels) from the outermost pixel centres.
    - `integer_positions`: draw positions on pixel centres, as the seed question does.
    - `positions`: an `(n_sources, 2)` array of `(x, y)` to use instead of random ones (then
      `border`, `min_separation` and `integer_positions` are not applied).
    - `stamp_radius`: half-width of each source's stamp; default `ceil(5 * largest sigma + 2)`.
    - `seed`: an integer, a `numpy.random.Generator`, or `None` for fresh randomness.
    - `psf_params`: further PSF shape parameters (`sigma_x`, `sigma_y`, `angle`, ...), each a number
      or an `(n_sources,)` array. `angle` defaults to 0.

    **Returns:** `(image, truth)`: the `(H, W)` float64 image, and a dict of `(n_sources,)` numpy
    arrays: `x`, `y`, `flux`, `amplitude` (the PSF's value at the source's own position: the peak,
    `flux / (2 pi sigma_x sigma_y)`, for point-sampled Gaussians), `background` (expected background
    counts at the source), and the PSF's shape parameters.

    >>> from crowdfit._simulate import simulate_field
    >>> image, truth = simulate_field((200, 400), 50, integer_positions=True, seed=4)
    >>> image.shape, truth["x"].shape, round(float(truth["amplitude"][0]), 6)
    ((200, 400), (50,), 100.0)
    """
    height, width = _check_shape(shape, "shape")
    n = _check_count(n_sources, "n_sources")
    read_noise = _check_noise(noise, read_noise, gain)
    psf = get_psf(psf)
    rng = np.random.default_rng(seed)

    if positions is not None:
        xy = np.asarray(positions, dtype=float)
        if xy.shape != (n, 2):
            raise ValueError(
                f"positions must have shape (n_sources, 2) = ({n}, 2) of (x, y), got {xy.shape}"
            )
        if not np.all(np.isfinite(xy)):
            raise ValueError("positions must be finite")
        x, y = xy[:, 0].copy(), xy[:, 1].copy()
    else:
        x, y = _draw_positions(rng, n, width, height, border, min_separation, integer_positions)

    flux = _resolve_flux(flux, n, rng)
    shape_params = _shape_params(psf, sigma, psf_params, n)
    radius = _stamp_radius(shape_params, sigma, stamp_radius)

    sky = _background_image(background, height, width)
    expected = sky + _render_field(psf, x, y, flux, shape_params, height, width, radius)
    image = _apply_noise(expected, noise, read_noise, gain, offset, rng)

    truth = {"x": x, "y": y, "flux": flux}
    truth["amplitude"] = _peak_values(psf, x, y, flux, shape_params)
    truth["background"] = _background_at(background, sky, x, y)
    truth.update(shape_params)
    return image, truth


def simulate_spots(
    n: int,
    *,
    shape: tuple[int, int] = (7, 7),
    psf: str | PSF | Callable = "integrated_gaussian",
    sigma: float = 1.3,
    flux: FluxSpec = 1000.0,
    background: float | np.ndarray = 10.0,
    noise: str = "poisson",
    read_noise: float | None = None,
    offset: float = 0.0,
    gain: float = 1.0,
    jitter: float = 0.5,
    seed: Seed = None,
    **psf_params,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Simulate isolated spots, one per small window (the single-molecule localisation benchmark).

    The defaults are picasso's `gaussmle` benchmark: 7×7 windows, a pixel-integrated Gaussian of
    `sigma = 1.3`, 1000 photons on a background of 10 per pixel, Poisson noise.

    **Arguments:**

    - `n`: the number of windows (`>= 0`).
    - `shape`: `(H, W)` of each window.
    - `psf`, `sigma`, `flux`, `noise`, `read_noise`, `offset`, `gain`, `psf_params`: as for
      [`simulate_field`][].
    - `background`: expected counts per pixel, a number or an `(n,)` array (one per window).
    - `jitter`: each spot's centre is drawn uniformly within `±jitter` pixels (in x and in y) of the
      window centre `((W - 1) / 2, (H - 1) / 2)`.
    - `seed`: an integer, a `numpy.random.Generator`, or `None`.

    **Returns:** `(windows, truth)`: an `(n, H, W)` float64 array, and a dict of `(n,)` arrays `x`,
    `y` (window coordinates), `flux`, `amplitude`, `background` and the PSF's shape parameters.

    >>> from crowdfit._simulate import simulate_spots
    >>> windows, truth = simulate_spots(4, seed=0)
    >>> windows.shape, truth["x"].shape
    ((4, 7, 7), (4,))
    """
    height, width = _check_shape(shape, "shape")
    n = _check_count(n, "n")
    read_noise = _check_noise(noise, read_noise, gain)
    if not jitter >= 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    psf = get_psf(psf)
    rng = np.random.default_rng(seed)

    x = (width - 1) / 2 + rng.uniform(-jitter, jitter, n)
    y = (height - 1) / 2 + rng.uniform(-jitter, jitter, n)
    flux = _resolve_flux(flux, n, rng)
    shape_params = _shape_params(psf, sigma, psf_params, n)
    sky = _window_background(background, n)

    params = {"x": x, "y": y, "flux": flux, **shape_params}
    expected = sky[:, None, None] + _render_windows(psf, params, height, width)
    windows = _apply_noise(expected, noise, read_noise, gain, offset, rng)

    truth = {"x": x, "y": y, "flux": flux}
    truth["amplitude"] = _peak_values(psf, x, y, flux, shape_params)
    truth["background"] = sky
    truth.update(shape_params)
    return windows, truth


def simulate_pairs(
    n: int,
    separation: float | np.ndarray,
    *,
    shape: tuple[int, int] = (16, 16),
    psf: str | PSF | Callable = "integrated_gaussian",
    sigma: float = 1.3,
    flux: FluxSpec = 1000.0,
    background: float | np.ndarray = 10.0,
    noise: str = "poisson",
    read_noise: float | None = None,
    offset: float = 0.0,
    gain: float = 1.0,
    jitter: float = 0.0,
    seed: Seed = None,
    **psf_params,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Simulate pairs of sources at a chosen separation, one pair per window.

    Each pair's midpoint is the window centre (moved by up to `±jitter` pixels in x and y), and its
    orientation is uniform on `[0, pi)`.

    **Arguments:**

    - `n`: the number of windows (`>= 0`).
    - `separation`: the distance between the two sources in pixels, a number or an `(n,)` array.
    - `shape`: `(H, W)` of each window.
    - `flux`: a number, an `(n, 2)` array, or a distribution as for [`simulate_field`][] (drawn
      for all `2 n` sources).
    - `psf`, `sigma`, `noise`, `read_noise`, `offset`, `gain`, `psf_params`: as for
      [`simulate_field`][] (per-source `psf_params` arrays have shape `(n, 2)`).
    - `background`: expected counts per pixel, a number or an `(n,)` array (one per window).
    - `jitter`: the midpoint moves uniformly within `±jitter` pixels of the window centre.
    - `seed`: an integer, a `numpy.random.Generator`, or `None`.

    **Returns:** `(windows, truth)`: an `(n, H, W)` float64 array, and a dict of `(n, 2)` arrays
    `x`, `y` (window coordinates), `flux`, `amplitude`, `background` and the PSF's shape
    parameters; `truth["x"][i]` holds the two sources of window `i`.

    >>> from crowdfit._simulate import simulate_pairs
    >>> windows, truth = simulate_pairs(3, 2.0, seed=0)
    >>> windows.shape, truth["x"].shape
    ((3, 16, 16), (3, 2))
    """
    height, width = _check_shape(shape, "shape")
    n = _check_count(n, "n")
    read_noise = _check_noise(noise, read_noise, gain)
    if not jitter >= 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    try:
        separation = np.broadcast_to(np.asarray(separation, dtype=float), (n,))
    except ValueError:
        raise ValueError(
            f"separation must be a number or have shape ({n},), got {np.shape(separation)}"
        ) from None
    if not np.all(np.isfinite(separation) & (separation >= 0)):
        raise ValueError("separation must be finite and >= 0")
    psf = get_psf(psf)
    rng = np.random.default_rng(seed)

    theta = rng.uniform(0.0, math.pi, n)
    cx = (width - 1) / 2 + rng.uniform(-jitter, jitter, n)
    cy = (height - 1) / 2 + rng.uniform(-jitter, jitter, n)
    half = np.stack([-0.5 * separation, 0.5 * separation], axis=1)
    x = cx[:, None] + half * np.cos(theta)[:, None]
    y = cy[:, None] + half * np.sin(theta)[:, None]

    if isinstance(flux, str) or callable(flux):
        flux = _resolve_flux(flux, 2 * n, rng).reshape(n, 2)
    else:
        flux = np.asarray(flux, dtype=float)
        if flux.ndim != 0 and flux.shape != (n, 2):
            raise ValueError(
                f"flux must be a number or an (n, 2) = ({n}, 2) array, got {flux.shape}"
            )
        flux = _resolve_flux(flux.reshape(-1) if flux.ndim else flux, 2 * n, rng).reshape(n, 2)
    flat_params = {k: _per_source(v, n, k) for k, v in psf_params.items()}
    shape_params = _shape_params(psf, _per_source(sigma, n, "sigma"), flat_params, 2 * n)
    sky = _window_background(background, n)

    params = {"x": x.reshape(-1), "y": y.reshape(-1), "flux": flux.reshape(-1), **shape_params}
    sources = _render_windows(psf, params, height, width).reshape(n, 2, height, width)
    expected = sky[:, None, None] + sources.sum(axis=1)
    windows = _apply_noise(expected, noise, read_noise, gain, offset, rng)

    truth = {"x": x, "y": y, "flux": flux}
    truth["amplitude"] = _peak_values(
        psf, x.reshape(-1), y.reshape(-1), flux.reshape(-1), shape_params
    ).reshape(n, 2)
    truth["background"] = np.repeat(sky[:, None], 2, axis=1)
    truth.update({k: v.reshape(n, 2) for k, v in shape_params.items()})
    return windows, truth


def _per_source(value, n: int, name: str):
    # A pair's parameter: a number, one per window (n,), or one per source (n, 2).
    value = np.asarray(value, dtype=float)
    if value.ndim == 0:
        return value
    if value.shape == (n,):
        return np.repeat(value, 2)
    if value.shape == (n, 2):
        return value.reshape(-1)
    raise ValueError(f"{name} must be a number or have shape ({n},) or ({n}, 2), got {value.shape}")


# --- checks ------------------------------------------------------------------------------------


def _check_shape(shape, name: str) -> tuple[int, int]:
    try:
        height, width = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (H, W), got {shape!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"{name} must be positive, got {shape!r}")
    return height, width


def _check_count(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {n!r}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return int(n)


def _check_noise(noise: str, read_noise: float | None, gain: float) -> float:
    if noise not in _NOISE_MODELS:
        raise ValueError(f"unknown noise {noise!r}: expected one of {', '.join(_NOISE_MODELS)}")
    if read_noise is None:
        read_noise = 5.0 if noise == "gaussian" else 0.0
    if not (read_noise >= 0 and math.isfinite(read_noise)):
        raise ValueError(f"read_noise must be >= 0, got {read_noise}")
    if not (gain > 0 and math.isfinite(gain)):
        raise ValueError(f"gain must be > 0, got {gain}")
    return float(read_noise)


# --- what to render ------------------------------------------------------------------------------


def _resolve_flux(flux: FluxSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(flux, str):
        try:
            flux = _FLUX_DISTRIBUTIONS[flux]()
        except KeyError:
            raise ValueError(
                f"unknown flux distribution {flux!r}: expected one of "
                f"{', '.join(_FLUX_DISTRIBUTIONS)}, a number, an array or a function (rng, n)"
            ) from None
    if callable(flux):
        values = np.asarray(flux(rng, n), dtype=float)
        if values.shape != (n,):
            raise ValueError(f"flux function must return shape ({n},), got {values.shape}")
    else:
        values = np.asarray(flux, dtype=float)
        if values.ndim == 0:
            values = np.full(n, float(values))
        elif values.shape != (n,):
            raise ValueError(f"flux must be a number or have shape ({n},), got {values.shape}")
        values = values.copy()
    if not np.all(np.isfinite(values) & (values >= 0)):
        raise ValueError("fluxes must be finite and >= 0")
    return values


def _shape_params(psf: PSF, sigma: float, psf_params: dict, n: int) -> dict[str, np.ndarray]:
    if psf.params is None:
        wanted = {"sigma": sigma, **psf_params}
    else:
        names = [p for p in psf.params if p not in ("x", "y", "flux")]
        unknown = set(psf_params) - set(names)
        if unknown:
            raise ValueError(
                f"psf {psf.name!r} takes shape parameters {names}, not {sorted(unknown)}"
            )
        defaults = {"sigma": sigma, "sigma_x": sigma, "sigma_y": sigma, "angle": 0.0}
        wanted = {}
        for name in names:
            if name in psf_params:
                wanted[name] = psf_params[name]
            elif name in defaults:
                wanted[name] = defaults[name]
            else:
                raise ValueError(f"psf {psf.name!r} needs the shape parameter {name!r}")
    out = {}
    for name, value in wanted.items():
        value = np.asarray(value, dtype=float)
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} must be finite")
        if name.startswith("sigma") and not np.all(value > 0):
            raise ValueError(f"{name} must be > 0, got {value.min()}")
        try:
            out[name] = np.broadcast_to(value, (n,)).copy()
        except ValueError:
            raise ValueError(
                f"{name} must be a number or have shape ({n},), got {value.shape}"
            ) from None
    return out


def _stamp_radius(shape_params: dict, sigma: float, stamp_radius: int | None) -> int:
    if stamp_radius is not None:
        if int(stamp_radius) < 0:
            raise ValueError(f"stamp_radius must be >= 0, got {stamp_radius}")
        return int(stamp_radius)
    widths = [v for k, v in shape_params.items() if k.startswith("sigma") and v.size]
    largest = max((float(v.max()) for v in widths), default=float(np.max(sigma)))
    if not largest > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return math.ceil(5.0 * largest + 2.0)


def _draw_positions(
    rng: np.random.Generator,
    n: int,
    width: int,
    height: int,
    border: float,
    min_separation: float | None,
    integer: bool,
) -> tuple[np.ndarray, np.ndarray]:
    if not border >= 0:
        raise ValueError(f"border must be >= 0, got {border}")
    lo_x, hi_x = float(border), width - 1.0 - border
    lo_y, hi_y = float(border), height - 1.0 - border
    if integer:
        lo_x, hi_x, lo_y, hi_y = (
            math.ceil(lo_x),
            math.floor(hi_x),
            math.ceil(lo_y),
            math.floor(hi_y),
        )
    if n and (hi_x < lo_x or hi_y < lo_y):
        raise ValueError(
            f"border {border} leaves no room for sources in an image of {height}×{width}"
        )

    def draw(k: int) -> tuple[np.ndarray, np.ndarray]:
        if integer:
            return (
                rng.integers(lo_x, hi_x + 1, k).astype(float),
                rng.integers(lo_y, hi_y + 1, k).astype(float),
            )
        return rng.uniform(lo_x, hi_x, k), rng.uniform(lo_y, hi_y, k)

    if not min_separation:
        return draw(n)
    if not min_separation > 0:
        raise ValueError(f"min_separation must be > 0, got {min_separation}")

    d = float(min_separation)
    # Disks of diameter d packed hexagonally in the area grown by d/2 on every side.
    densest = (hi_x - lo_x + d) * (hi_y - lo_y + d) / (math.sqrt(3) / 2 * d * d)
    if n > densest:
        raise ValueError(
            f"cannot place {n} sources at least {d} px apart in a "
            f"{hi_x - lo_x:g}×{hi_y - lo_y:g} px area: at most about {int(densest)} fit"
        )
    cells: dict[tuple[int, int], list[int]] = {}
    xs: list[float] = []
    ys: list[float] = []
    d2 = d * d
    tries, max_tries = 0, 200 * n + 10_000
    while len(xs) < n:
        if tries >= max_tries:
            raise ValueError(
                f"could only place {len(xs)} of {n} sources at least {d} px apart after "
                f"{tries} random tries (random placement jams near half the densest packing); "
                "lower n_sources or min_separation"
            )
        batch = min(max(64, 2 * (n - len(xs))), max_tries - tries)
        for cx, cy in zip(*draw(batch), strict=True):
            tries += 1
            i, j = int(cx // d), int(cy // d)
            clash = False
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    for k in cells.get((i + di, j + dj), ()):
                        if (xs[k] - cx) ** 2 + (ys[k] - cy) ** 2 < d2:
                            clash = True
                            break
                    if clash:
                        break
                if clash:
                    break
            if clash:
                continue
            cells.setdefault((i, j), []).append(len(xs))
            xs.append(float(cx))
            ys.append(float(cy))
            if len(xs) == n:
                break
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


# --- rendering -----------------------------------------------------------------------------------


def _background_image(background, height: int, width: int) -> np.ndarray:
    if isinstance(background, tuple):
        if len(background) != 3:
            raise ValueError(
                "a tilted background is a tuple (b0, slope_x, slope_y), "
                f"got {len(background)} values"
            )
        b0, slope_x, slope_y = (float(b) for b in background)
        cols = np.arange(width, dtype=float)[None, :]
        rows = np.arange(height, dtype=float)[:, None]
        sky = b0 + slope_x * cols + slope_y * rows
    else:
        sky = np.asarray(background, dtype=float)
        if sky.ndim == 0:
            sky = np.full((height, width), float(sky))
        elif sky.shape != (height, width):
            raise ValueError(
                f"background must be a number, a tuple (b0, slope_x, slope_y) or an array of "
                f"shape {(height, width)}, got shape {sky.shape}"
            )
        else:
            sky = sky.copy()
    if not np.all(np.isfinite(sky)):
        raise ValueError("background must be finite")
    return sky


def _background_at(background, sky: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if isinstance(background, tuple):
        b0, slope_x, slope_y = (float(b) for b in background)
        return b0 + slope_x * x + slope_y * y
    height, width = sky.shape
    rows = np.clip(np.rint(y).astype(int), 0, height - 1)
    cols = np.clip(np.rint(x).astype(int), 0, width - 1)
    return sky[rows, cols] if x.size else np.zeros(0)


def _window_background(background, n: int) -> np.ndarray:
    try:
        sky = np.broadcast_to(np.asarray(background, dtype=float), (n,)).copy()
    except ValueError:
        raise ValueError(
            f"background must be a number or have shape ({n},), got {np.shape(background)}"
        ) from None
    if not np.all(np.isfinite(sky)):
        raise ValueError("background must be finite")
    return sky


@functools.lru_cache(maxsize=64)
def _batched_renderer(render: Callable, kind: str, height: int, width: int) -> Callable:
    """One jitted, vmapped renderer per PSF and grid, compiled once per chunk size."""
    if kind == "stamp":
        # Stamp grid relative to the stamp's corner `(left, top)`, in image coordinates.
        def render_one(p):
            cols = (p["left"] + jnp.arange(width))[None, :]
            rows = (p["top"] + jnp.arange(height))[:, None]
            q = {k: v for k, v in p.items() if k not in ("left", "top")}
            return jnp.broadcast_to(render(q, cols, rows), (height, width))

    elif kind == "window":

        def render_one(p):
            cols = jnp.arange(width)[None, :] + 0.0
            rows = jnp.arange(height)[:, None] + 0.0
            return jnp.broadcast_to(render(p, cols, rows), (height, width))

    else:  # "peak": the PSF's value at the source's own position.

        def render_one(p):
            at_x, at_y = jnp.reshape(p["x"], (1, 1)), jnp.reshape(p["y"], (1, 1))
            return jnp.reshape(render(p, at_x, at_y), ())

    return jax.jit(jax.vmap(render_one))


def _render_batched(
    psf: PSF, kind: str, params: dict[str, np.ndarray], height: int = 1, width: int = 1
) -> np.ndarray:
    n = params["x"].size
    if n == 0:
        return np.zeros((0,) if kind == "peak" else (0, height, width))
    batched = _batched_renderer(psf.render, kind, height, width)
    # Chunks of a power-of-two size, at least 256 sources, bound memory and the number of
    # compiled programs.
    largest = 1 << (max(1, _PIXELS_PER_CALL // (height * width)).bit_length() - 1)
    chunk = min(max(1 << (n - 1).bit_length(), 256), largest)
    outs = []
    for start in range(0, n, chunk):
        part = {k: v[start : start + chunk] for k, v in params.items()}
        m = part["x"].size
        if m < chunk:
            # Pad by repeating the first source: zeros could make a user's PSF divide by zero.
            part = {k: np.concatenate([v, np.repeat(v[:1], chunk - m)]) for k, v in part.items()}
        # Cast on the host: jax would compile a conversion for each new shape.
        part = {k: v.astype(jax.dtypes.canonicalize_dtype(v.dtype)) for k, v in part.items()}
        outs.append(np.asarray(batched(part))[:m])
    return np.concatenate(outs, axis=0)


def _render_field(
    psf: PSF,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    shape_params: dict[str, np.ndarray],
    height: int,
    width: int,
    radius: int,
) -> np.ndarray:
    col = np.rint(x).astype(np.int64)
    row = np.rint(y).astype(np.int64)
    # A stamp whose centre pixel is more than `radius` outside the image misses it entirely.
    touches = (col >= -radius) & (col < width + radius) & (row >= -radius) & (row < height + radius)
    if not touches.any():
        return np.zeros((height, width))
    size = 2 * radius + 1
    params = {"x": x, "y": y, "flux": flux, **shape_params}
    params = {k: v[touches] for k, v in params.items()}
    left, top = col[touches] - radius, row[touches] - radius
    params["left"], params["top"] = left.astype(float), top.astype(float)
    stamps = _render_batched(psf, "stamp", params, size, size)

    # Add the stamps into a canvas with a margin that holds every stamp whole, then crop it.
    margin = 2 * radius
    canvas_w = width + 2 * margin
    canvas_h = height + 2 * margin
    corner = (top + margin) * canvas_w + (left + margin)
    within = (np.arange(size)[:, None] * canvas_w + np.arange(size)[None, :]).ravel()
    index = (corner[:, None] + within[None, :]).ravel()
    canvas = np.bincount(index, weights=stamps.reshape(-1), minlength=canvas_h * canvas_w)
    canvas = canvas.reshape(canvas_h, canvas_w)
    return canvas[margin : margin + height, margin : margin + width].copy()


def _render_windows(psf: PSF, params: dict[str, np.ndarray], height: int, width: int) -> np.ndarray:
    return _render_batched(psf, "window", params, height, width).astype(float)


def _peak_values(
    psf: PSF, x: np.ndarray, y: np.ndarray, flux: np.ndarray, shape_params: dict[str, np.ndarray]
) -> np.ndarray:
    params = {"x": x, "y": y, "flux": flux, **shape_params}
    return _render_batched(psf, "peak", params).astype(float)


def _apply_noise(
    expected: np.ndarray,
    noise: str,
    read_noise: float,
    gain: float,
    offset: float,
    rng: np.random.Generator,
) -> np.ndarray:
    if noise == "poisson":
        if not np.all(expected >= 0):
            raise ValueError(
                "Poisson noise needs expected counts >= 0 everywhere; "
                f"the smallest is {expected.min():g} (check the background and the PSF)"
            )
        counts = rng.poisson(expected).astype(float)
    else:
        counts = expected
    image = offset + gain * counts
    if noise != "none" and read_noise > 0:
        image = image + rng.normal(0.0, read_noise, expected.shape)
    return image
