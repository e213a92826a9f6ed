"""PSF wings: the light a Gaussian PSF misses, measured on the image as one radial profile.

Stars are not Gaussians: a Moffat or seeing PSF puts 10-30 % of its light in wings that a Gaussian
fit leaves in the residual, where it is taken for faint neighbours, and out of the fluxes.

Two measurements: `measure_wings`, each bright isolated star's rings (its sky in its outer
rings), the median over the stars, for fields where stars are apart; `measure_wings_jointly`,
one least-squares fit of the profile to every source at once, on the pixels away from every
source's core, for crowds (from 0.07 sources/FWHM², where few stars are isolated and their outer
rings hold their neighbours' wings: Moffat fluxes went from -8 to -20 % to within -2.4 to
+2.9 % at 0.1-0.2 stars/FWHM²; Gaussian crowds of 0.02-0.3 measured -0.01 to +0.01 of the light,
far below the 2 % that counts).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.fft

from ._group import _pairs_within

__all__ = ["Wings", "measure_wings", "measure_wings_jointly", "render_wings"]

# Rings half a PSF width wide out to 4 FWHM (9.4 σ): a Moffat of β = 2.5 holds 1 % of its light
# beyond that.
_STEP = 0.5
_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))  # (per unit σ)
_REACH = 4.0 * _FWHM
# A star measures them when no other has 5 % of its flux within 2 FWHM; its sky is the median
# of its rings from 3 FWHM on.
_ALONE = 2.0 * _FWHM
_FAINT = 0.05
_SKY = 3.0 * _FWHM
# Stars that carry the measurement: this many above this S/N (spread over the ranking by flux).
_MAX_STARS = 200
_MIN_SNR = 20.0
_MIN_STARS = 10
# The joint measurement (`measure_wings_jointly`) uses the pixels at least 1 FWHM from every
# source, clipped at 3 times the noise (twice refitted), on at most a 512² piece of the image.
_CORE = 1.0 * _FWHM
_CLIP = 3.0
_JOINT_SIDE = 512
# Sources rendered together (memory: a stamp of 41² pixels each at σ = 2).
_CHUNK = 2000
# `render_wings` draws the sources by one FFT convolution when their stamps ((8 FWHM)² pixels
# each) cover at least this many times the image with its margins, else stamp by stamp: on
# 256² 295 sources took 3.3 ms against 42 ms stamp by stamp, 60 sources 4.4 against 4.9 ms;
# on 2048² 300 sources took 204 ms against 38 ms (the FFT's cost is the image's).
_FFT_COVER = 1.0


class Wings(NamedTuple):
    """The radial profile `m(r)` that a source adds to its Gaussian of flux `f`: `f · m(r)`.

    `knots` `(K,)` radii (pixels) and `values` `(K,)` the profile there, per unit of the
    Gaussian's flux, interpolated linearly between knots (flat inside the first), zero from
    `reach` on; `light` the light it adds (`Σ m` over the pixels about a source) as a fraction
    of the Gaussian's, so a source's total flux is `(1 + light)` times its Gaussian's;
    `errors` `(K,)` the 1σ errors of `values`; `n_stars` how many stars measured it.
    """

    knots: np.ndarray
    values: np.ndarray
    reach: float
    light: float
    errors: np.ndarray
    n_stars: int

    @property
    def significance(self) -> float:
        """`Σ (values / errors)²`, whose mean is the number of knots for a Gaussian PSF."""
        ok = self.errors > 0
        return float(np.sum((self.values[ok] / self.errors[ok]) ** 2))


def _stamps(x, y, shape, reach):
    """`(N, S, S)` rows, columns and distances of each source's stamp, and which are inside."""
    h, w = shape
    half = int(math.ceil(reach))
    d = np.arange(-half, half + 1)
    rows = np.rint(y)[:, None, None].astype(int) + d[None, :, None]
    cols = np.rint(x)[:, None, None].astype(int) + d[None, None, :]
    rows, cols = np.broadcast_arrays(rows, cols)
    r = np.hypot(cols - x[:, None, None], rows - y[:, None, None])
    inside = (r < reach) & (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1), r, inside


def measure_wings(residual, good, x, y, flux, snr, width: float, previous=None, robust=True):
    """The radial profile of the light that the Gaussians of a catalog leave in its residual.

    **Arguments:** `residual` `(H, W)` the image minus the catalog's light (Gaussians, and wings
    `previous` if given) and its smooth background; `good` `(H, W)` True where a pixel counts;
    `x, y, flux, snr` `(N,)` the catalog (Gaussian fluxes); `width` the Gaussian's σ (pixels);
    `previous` the `Wings` in the catalog's light, or `None`; `robust`: each ring's median
    (else its mean: 2-3× faster, for a first look).

    Each of up to 200 isolated sources above S/N 20 (all of them, or 200 spread evenly over
    their ranking by flux) gives, in rings half a width wide out to 4 FWHM, the median of its
    residual (plus its own `previous` wings) over the ring, per unit flux, less the median of
    its rings from 3 FWHM on (its sky); the profile is the median of those over the sources.
    The median, because a neighbour missing from the catalog sits in a few sources' rings: at
    the second fit of a field of bright Gaussian stars, close pairs still fitted as one made a
    least-squares profile hold 6 % of the light.

    **Returns:** a `Wings`, or `None` when fewer than 10 sources are bright and isolated.

    >>> import numpy as np
    >>> yy, xx = np.mgrid[:64, :640]
    >>> xs, ys = 32.0 + 64 * np.arange(10), np.full(10, 32.0)
    >>> r = np.hypot(xx[..., None] - xs, yy[..., None] - ys).min(-1)
    >>> ring = 0.01 * np.exp(-((r - 6) ** 2) / 4)  # per unit flux: light 1.336
    >>> w = measure_wings(1e4 * ring, np.ones(r.shape, bool), xs, ys, np.full(10, 1e4),
    ...                   np.full(10, 100.0), 2.0)
    >>> round(float(np.interp(6.0, w.knots, w.values)), 4), round(w.light, 2)
    (0.0092, 1.29)
    """
    use = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux > 0) & (snr > _MIN_SNR)
    # Isolated ones: no catalog neighbour of 5 % of their flux within 2 FWHM.
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux > 0)
    a, b = _pairs_within(x[ok], y[ok], _ALONE * width)
    a, b = np.where(ok)[0][a], np.where(ok)[0][b]
    crowded = np.zeros(x.size, bool)
    crowded[a[flux[b] > _FAINT * flux[a]]] = True
    crowded[b[flux[a] > _FAINT * flux[b]]] = True
    idx = np.where(use & ~crowded)[0]
    if idx.size < _MIN_STARS:
        return None
    idx = idx[np.argsort(-flux[idx], kind="stable")]
    if idx.size > _MAX_STARS:
        # Spread evenly over the ranking by flux, not the brightest: where the stars' fluxes are
        # alike, the brightest are unresolved pairs, wider than the PSF. On a 1024² Gaussian
        # field at 0.1 stars/FWHM² (4700 stars) the 200 brightest of the first look were
        # mostly pairs, and made "wings" of 15 % of the light.
        idx = idx[np.linspace(0, idx.size - 1, _MAX_STARS).round().astype(int)]
    x, y, flux = x[idx], y[idx], flux[idx]
    step = _STEP * width
    n_rings = int(math.ceil(_REACH / _STEP))
    reach = n_rings * step
    rows, cols, r, inside = _stamps(x, y, residual.shape, reach)
    inside &= good[rows, cols]
    values = residual[rows, cols]
    # The pixels' noise, from the outer rings: the least error a ring's value can have.
    sky = values[inside & (r >= _SKY * width)]
    pixel_noise = 1.4826 * float(np.median(np.abs(sky - np.median(sky)))) if sky.size else 0.0
    if previous is not None:
        values = values + flux[:, None, None] * _profile(previous, r)
    values = values / flux[:, None, None]
    ring = np.minimum((r / step).astype(int), n_rings - 1)
    key = (np.arange(x.size)[:, None, None] * n_rings + ring)[inside]
    values = values[inside]
    if robust:
        # The median of each (source, ring), from one sort by ring and then value (the values
        # mapped into (0, 1) without changing their order).
        scale = 1.0 / max(float(np.median(np.abs(values))), 1e-300)
        order = np.argsort(key + 0.5 + np.arctan(values * scale) / np.pi)
        key, values = key[order], values[order]
        start = np.searchsorted(key, np.arange(x.size * n_rings))
        count = np.diff(np.append(start, key.size))
        low = np.where(count > 0, start + (count - 1) // 2, 0)
        high = np.where(count > 0, start + count // 2, 0)
        rings = np.where(count > 0, 0.5 * (values[low] + values[high]), np.nan)
    else:
        total = np.bincount(key, values, x.size * n_rings)
        count = np.bincount(key, None, x.size * n_rings)
        with np.errstate(all="ignore"):
            rings = np.where(count > 0, total / count, np.nan)
    rings = rings.reshape(x.size, n_rings)
    # Each source's own sky: its outer rings, 3-4 FWHM out (the smooth background map is off
    # by tenths of the noise under a crowd, and over the 1100 pixels within 4 FWHM at σ = 2 a
    # tenth of a count is 4 % of a star of 2500).
    outer = knots_of(n_rings, step) >= _SKY * width
    with np.errstate(all="ignore"):
        rings = rings - np.nanmedian(rings[:, outer], axis=1, keepdims=True)
    profile = np.nanmedian(rings, axis=0)
    n = np.sum(np.isfinite(rings), axis=0)
    spread = 1.4826 * np.nanmedian(np.abs(rings - profile), axis=0)
    # (floored at the noise: from 8 stars the spread came out 100 times too small at times,
    # and a faint Gaussian field's noise was taken for wings)
    with np.errstate(all="ignore"):
        alone = pixel_noise / (flux[:, None] * np.sqrt(count.reshape(x.size, n_rings)))
    spread = np.maximum(spread, np.nanmedian(np.where(np.isfinite(rings), alone, np.nan), axis=0))
    errors = 1.2533 * spread / np.sqrt(np.maximum(n, 1))
    profile = np.nan_to_num(profile)
    knots = knots_of(n_rings, step)
    # Less its part along the Gaussian: what the Gaussian's flux would take up anyway. (Any
    # split of a star's light between its Gaussian and its wings fits equally well; without
    # this, each remeasurement moved it, and the fluxes of regions not refitted since drifted
    # off: +4 to +7 % after three rounds.)
    return _less_gaussian(Wings(knots, profile, reach, 0.0, errors, int(x.size)), width)


def measure_wings_jointly(residual, good, x, y, flux, width: float):
    """The radial profile of the light a crowd's Gaussians leave, fitted to all sources at once.

    **Arguments:** `residual` `(H, W)` the image minus the catalog's Gaussians and its smooth
    background; `good` `(H, W)` True where a pixel counts; `x, y, flux` `(N,)` the catalog
    (Gaussian fluxes); `width` the Gaussian's σ (pixels).

    In a crowd few stars are isolated, and each one's outer rings hold its neighbours' wings
    (`measure_wings` there measured a Moffat's as a third to two thirds of what they are, or
    not at all). Here every source adds `flux · m(r)` to every pixel within the reach, the
    profile `m` (same knots as `measure_wings`) and a constant sky are one linear least-squares
    fit, on the pixels at least 1 FWHM from every source (a Gaussian crowd's blends, unresolved
    pairs and missed faint neighbours sit within a source's core; fitted there too, a joint
    profile gave false wings of 5-20 % of the light at 0.1-0.3 stars/FWHM²) and a reach from the
    image's edge (beyond it are sources no catalog holds), clipped at 3 times the noise. The
    profile is 0 within 1 FWHM less half a ring, and the light it measures there is left to the
    Gaussians; its part along the Gaussian is taken out as in `measure_wings`.
    Biased low where the smooth background took up the wings' diffuse light (it is fitted with
    the Gaussians alone): `fit_image` measures them again on a background estimated with them
    (`_image._joint_wings`).

    **Returns:** a `Wings` (`n_stars` the number of sources), or `None` when fewer than 10
    sources or 100 such pixels.
    """
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux > 0)
    x, y, flux = x[ok], y[ok], flux[ok]
    step = _STEP * width
    n_rings = int(math.ceil(_REACH / _STEP))
    reach = n_rings * step
    knots = knots_of(n_rings, step)
    free = knots >= _CORE * width - step
    # Not the pixels within reach of the image's edge: they hold the wings of sources beyond it,
    # which no catalog holds. (In `fit_image_dask`'s tiles of 256² on a 1024² Moffat field, β = 3
    # at 0.1 stars/FWHM², the wings came out at 0.13-0.23 of the light from tile to tile and the
    # fluxes at -2.8 %; without those pixels -1.2 %, and whole 512² fields as before.)
    h, w = residual.shape
    edge = int(math.ceil(reach))
    good = good.copy()
    good[:edge], good[h - edge :], good[:, :edge], good[:, w - edge :] = False, False, False, False
    # (a big image: its central piece, and the sources within reach of it)
    r0, c0 = max(0, (h - _JOINT_SIDE) // 2), max(0, (w - _JOINT_SIDE) // 2)
    residual = residual[r0 : r0 + _JOINT_SIDE, c0 : c0 + _JOINT_SIDE]
    good = good[r0 : r0 + _JOINT_SIDE, c0 : c0 + _JOINT_SIDE]
    x, y = x - c0, y - r0
    h, w = residual.shape
    near = (x > -reach) & (x < w + reach) & (y > -reach) & (y < h + reach)
    x, y, flux = x[near], y[near], flux[near]
    if x.size < _MIN_STARS:
        return None
    use = good & ~cores_of(x, y, (h, w), width) & np.isfinite(residual)
    if use.sum() < 100:
        return None
    # Each knot's hat, summed over the sources (by FFT, as `render_wings` draws many).
    half = int(math.ceil(reach))
    d = np.arange(-half, half + 1)
    r = np.hypot(d[None, :], d[:, None])
    none = np.zeros(n_rings)
    hats = [_profile(Wings(knots, np.eye(n_rings)[k], reach, 0.0, none, 0), r)
            for k in np.flatnonzero(free)]  # fmt: skip
    design = np.ones((int(use.sum()), len(hats) + 1))
    design[:, :-1] = _convolved(np.stack(hats), x, y, flux, (h, w), np.float32)[:, use].T
    b = residual[use]
    keep = np.ones(b.size, bool)
    for _ in range(3):
        # (by its normal equations: numpy's lstsq of the 40000 × 17 design took 0.14 s)
        kept = design[keep]
        gram = kept.T @ kept
        coef = np.linalg.lstsq(gram, kept.T @ b[keep], rcond=None)[0]
        fit_res = b - design @ coef
        noise = 1.4826 * float(np.median(np.abs(fit_res[keep])))
        keep = np.abs(fit_res) < _CLIP * noise
    cov = np.linalg.pinv(gram) * noise**2
    values, errors = np.zeros(n_rings), np.zeros(n_rings)
    values[free], errors[free] = coef[:-1], np.sqrt(np.maximum(np.diag(cov)[:-1], 0.0))
    return _less_gaussian(Wings(knots, values, reach, 0.0, errors, int(x.size)), width)


def cores_of(x, y, shape, width: float) -> np.ndarray:
    """`(H, W)` True within 1 FWHM of a source at `x, y` `(N,)` (`width` the Gaussian's σ):
    where a Gaussian model, wings or not, misses a non-Gaussian PSF's core, and the joint
    measurement and the background under it (`_image._joint_wings`) look away."""
    h, w = shape
    out = np.zeros(h * w, bool)
    for a in range(0, x.size, _CHUNK):
        rows, cols, _, inside = _stamps(x[a : a + _CHUNK], y[a : a + _CHUNK], shape, _CORE * width)
        out[(rows * w + cols)[inside]] = True
    return out.reshape(shape)


def _less_gaussian(wings, width):
    """The profile less its part along the Gaussian (what the Gaussian's flux takes up anyway),
    with its `light`."""
    half = int(math.ceil(wings.reach))
    d = np.arange(-half, half + 1)
    rr = np.hypot(d[None, :], d[:, None])
    gauss = np.exp(-0.5 * (rr / width) ** 2)
    along = np.sum(_profile(wings, rr) * gauss) / np.sum(gauss * gauss)
    profile = wings.values - along * np.exp(-0.5 * (wings.knots / width) ** 2)
    wings = wings._replace(values=profile)
    light = float(render_wings(wings, np.zeros(1), np.zeros(1), np.ones(1), None).sum())
    return wings._replace(light=light)


def knots_of(n_rings, step):
    return step * (np.arange(n_rings) + 0.5)


def _profile(wings, r):
    return np.where(r < wings.reach, np.interp(r, wings.knots, wings.values), 0.0)


def render_wings(wings: Wings, x, y, flux, shape) -> np.ndarray:
    """`(H, W)` the wings of sources at `x, y` `(N,)` whose Gaussians hold `flux` `(N,)`.

    `shape` `None`: one stamp about the first source, `x, y` at its centre (for sums).

    >>> import numpy as np
    >>> w = Wings(np.arange(8.0), np.r_[np.zeros(4), 0.01, 0.01, 0, 0], 8.0, 0.0, np.zeros(8), 1)
    >>> img = render_wings(w, np.array([10.0]), np.array([10.0]), np.array([100.0]), (21, 21))
    >>> float(img[10, 14]), float(img[10, 10])
    (1.0, 0.0)
    """
    if shape is None:
        half = int(math.ceil(wings.reach))
        d = np.arange(-half, half + 1)
        return flux[0] * _profile(wings, np.hypot(d[None, :], d[:, None]))
    h, w = shape
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    if wings is None or not ok.any():
        return np.zeros(shape)
    x, y, flux = x[ok], y[ok], flux[ok]
    half = int(math.ceil(wings.reach))
    if x.size * (2 * half + 1) ** 2 < _FFT_COVER * (h + 2 * half) * (w + 2 * half):
        out = np.zeros(h * w)
        for a in range(0, x.size, _CHUNK):
            b = a + _CHUNK
            rows, cols, r, inside = _stamps(x[a:b], y[a:b], shape, wings.reach)
            light = flux[a:b, None, None] * _profile(wings, r)
            out += np.bincount((rows * w + cols)[inside], light[inside], h * w)
        return out.reshape(shape)
    # Many sources: each one's flux spread bilinearly over the 4 pixels about it (on a grid
    # with a margin of `reach`, so sources just outside still shine in), convolved with the
    # profile by FFT. The profile is smooth on the scale of a pixel (knots 0.5σ apart), so this
    # differs from drawing each source at its own position by under 1 % of the wings' mean
    # (rms), at most 4 % of their peak (`test_many_sources_are_drawn_by_fft_like_stamp_by_stamp`).
    d = np.arange(-half, half + 1)
    kernel = _profile(wings, np.hypot(d[None, :], d[:, None]))
    return _convolved(kernel[None], x, y, flux, shape)[0]


def _convolved(kernels, x, y, flux, shape, dtype=np.float64) -> np.ndarray:
    """`(M, H, W)`: the sources' fluxes at `x, y` `(N,)`, each spread bilinearly over the 4
    pixels about it (on a grid with a margin of the kernels' reach, so sources just outside
    still shine in), convolved by FFT with each of the `(M, 2r + 1, 2r + 1)` `kernels`, in
    `dtype` (float32 takes half the time of float64)."""
    h, w = shape
    half = kernels.shape[-1] // 2
    hp, wp = h + 2 * half, w + 2 * half
    gx, gy = np.clip(x + half, 0, wp - 1.001), np.clip(y + half, 0, hp - 1.001)
    c0, r0 = np.floor(gx).astype(int), np.floor(gy).astype(int)
    fx, fy = gx - c0, gy - r0
    grid = np.zeros(hp * wp)
    for dr, dc, wt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                       (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):  # fmt: skip
        grid += np.bincount((r0 + dr) * wp + c0 + dc, flux * wt, hp * wp)
    size = tuple(scipy.fft.next_fast_len(n + 2 * half, real=True) for n in (hp, wp))
    spectrum = scipy.fft.rfft2(grid.reshape(hp, wp).astype(dtype), size, workers=-1)
    spectra = scipy.fft.rfft2(kernels.astype(dtype), size, workers=-1)
    out = scipy.fft.irfft2(spectrum * spectra, size, workers=-1)
    return out[:, 2 * half : 2 * half + h, 2 * half : 2 * half + w]
