"""Close pairs: is one source really two, and are two close sources really one?

Two sources closer than about one PSF width merge into one peak, and the detector and the
residual search (which look for peaks) cannot see the second. Fitted as one source, the pair
leaves a quadrupole in the residual: for two equal sources at `±d/2` along the angle `θ` around
the fitted centre, the residual's anisotropic part is `f d² / (16 σ²) [cos 2θ T₁ + sin 2θ T₂]`
to second order in `d`, with `T₁ = G (u² − v²)`, `T₂ = 2 G u v`, `G` the fitted PSF and `u, v`
pixel offsets in units of the PSF's widths. A weighted least-squares projection of the residual
on `T₁, T₂` (`quadrupole_screen`) gives the angle, the separation `d = 4 σ √(c / f)` and the χ²
drop, which picks the candidates.

Whether a pair is warranted is then a likelihood-ratio test (`nested_test`), the criterion of
ThunderSTORM's multi-emitter fitting: on a window around the pair, fit one source and two
sources, each with a background and every other source's light held as known light, and keep
the pair when twice the log-likelihood gain exceeds `threshold` (3 more parameters; 20 is a
p-value of about 2e-4 for χ²₃, and only the few sources the screen picks are tested). With
Gaussian noise of unknown level the χ² gain is scaled by the window's residual variance under
the two-source model (an F test). The same test, as a
weak source with its close neighbours against the neighbours alone, protects a close pair from
`flux / flux_err` pruning (`fit_image`'s `_warranted`): in a pair closer than a PSF width the
fluxes are strongly anti-correlated, so each part's Wald significance is low even when the pair
as a whole is beyond doubt.
"""

from __future__ import annotations

import math

import numpy as np

from ._background import sky_shape
from ._fit import fit_regions
from ._group import pad_windows
from ._render import render_windows

__all__ = ["quadrupole_screen", "nested_test", "find_splits"]

# The least twice-log-likelihood gain for two sources over one (3 more parameters). 30 left
# the mean flux bias at +2.0 % on the 0.1 stars/FWHM² benchmark field; 20 gives +1.6 % with the
# same precision, and the catalogs of 540 sparse stars (S/N 70–7000) hold no extra source.
PAIR_THRESHOLD = 20.0
# Convergence tolerance of the whole-image fits: stop when the last step's predicted χ²
# decrease is below 1e-4 of one pixel's (a 1 % shift of a parameter's 1σ error at most).
FIT_TOL = 1e-4
# The least χ² drop of the residual quadrupole for a split candidate (2 parameters).
SCREEN_THRESHOLD = 10.0


def quadrupole_screen(residual, variance, good, x, y, flux, sigma_x, sigma_y):
    """Per source: the residual quadrupole's χ² drop, angle and implied pair separation.

    **Arguments:** `residual`, `variance`, `good`: `(H, W)` data − model, per-pixel variance and
    the pixels that count; `x, y, flux`: `(N,)` fitted sources; `sigma_x, sigma_y`: the PSF.

    **Returns:** `(drop, angle, separation)`, each `(N,)`: the χ² drop of the two-template fit,
    the pair's angle (radians, from the x axis) and its separation in pixels.

    >>> import numpy as np
    >>> from crowdfit._split import quadrupole_screen
    >>> yy, xx = np.mgrid[:32, :32]
    >>> pair = sum(np.exp(-((xx - 16 - s) ** 2 + (yy - 16) ** 2) / 8) / (8 * np.pi)
    ...            for s in (-0.8, 0.8))
    >>> one = np.exp(-((xx - 16) ** 2 + (yy - 16) ** 2) / 8) / (8 * np.pi)
    >>> drop, angle, sep = quadrupole_screen(1000 * (pair - 2 * one), np.ones((32, 32)),
    ...     np.ones((32, 32), bool), np.array([16.0]), np.array([16.0]), np.array([2000.0]),
    ...     2.0, 2.0)
    >>> round(abs(float(angle[0])), 2), round(float(sep[0]), 1)
    (0.0, 1.6)
    """
    h, w = residual.shape
    r = int(math.ceil(3.0 * max(sigma_x, sigma_y)))
    off = np.arange(-r, r + 1)
    cols = np.rint(x).astype(int)[:, None, None] + off[None, None, :]
    rows = np.rint(y).astype(int)[:, None, None] + off[None, :, None]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    rc, cc = np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)
    inside = inside & good[rc, cc]
    wt = np.where(inside, 1.0 / np.maximum(variance[rc, cc], 1e-12), 0.0)
    res = np.where(inside, residual[rc, cc], 0.0)
    u = (cols - x[:, None, None]) / sigma_x
    v = (rows - y[:, None, None]) / sigma_y
    g = np.exp(-0.5 * (u**2 + v**2)) / (2 * math.pi * sigma_x * sigma_y)
    t1, t2 = g * (u**2 - v**2), 2.0 * g * u * v
    a11 = np.sum(wt * t1 * t1, axis=(1, 2))
    a12 = np.sum(wt * t1 * t2, axis=(1, 2))
    a22 = np.sum(wt * t2 * t2, axis=(1, 2))
    b1 = np.sum(wt * res * t1, axis=(1, 2))
    b2 = np.sum(wt * res * t2, axis=(1, 2))
    det = a11 * a22 - a12**2
    with np.errstate(divide="ignore", invalid="ignore"):
        c1 = np.where(det > 0, (a22 * b1 - a12 * b2) / det, 0.0)
        c2 = np.where(det > 0, (a11 * b2 - a12 * b1) / det, 0.0)
        drop = c1 * b1 + c2 * b2
        d_sigma = 4.0 * np.sqrt(np.where(flux > 0, np.hypot(c1, c2) / flux, 0.0))
    angle = 0.5 * np.arctan2(c2, c1)
    sep = d_sigma * np.hypot(sigma_x * np.cos(angle), sigma_y * np.sin(angle))
    return np.nan_to_num(drop), angle, np.nan_to_num(sep)


def _window_size(width):
    return 16 if 8 * width <= 16 else 32 * int(math.ceil(8 * width / 32))


def nested_test(
    img, good, model, removed, smaller, larger, background, *, psf, shape_vals,
    background_model, noise, sky=None, sky_tol=np.inf, unit=1.0,
):  # fmt: skip
    """Are the extra sources of `larger` warranted over `smaller`? A likelihood-ratio statistic
    for each of `C` candidates, on a window around each.

    **Arguments:**

    - `img`, `good`: `(H, W)` data (offset subtracted) and the pixels that count.
    - `model`: `(H, W)` light of the current catalog's sources.
    - `removed`: dict of `(C, R)` `x, y, flux` (flux 0 pads): the catalog sources both models
      replace; their light is taken out of `model`, and the rest of `model` is known light.
    - `smaller`, `larger`: dicts of `(C, K)` starting `x, y, flux` and `valid` of the two
      models; `larger` has 1 more source (3 more parameters) where `smaller` is nested in it.
    - `background`: `(C,)` starting background level.
    - `sky`, `sky_tol`: optional `(H, W)` smooth background map; its shape on each window where
      it varies by more than `sky_tol` is added to the known light (`_background.sky_shape`),
      and the fitted background is the level on top.
    - `unit`: the fits see the data divided by it (`fit_image`'s `_fit_unit`); `fit` is in the
      data's units.

    **Returns:** `(gain, ok, fit)`: `(C,)` twice the log-likelihood gain of `larger` (χ² gain
    over the residual variance for Gaussian noise, an F test), `(C,)` True where both fits
    converged, and the fit of `larger`, a dict of `(C, K)` `x, y, flux` in image coordinates.
    """
    c, k = larger["x"].shape
    width = max(v for n, v in shape_vals.items() if n != "angle")
    size = _window_size(width)
    wts = np.where(larger["valid"], np.maximum(larger["flux"], 1e-3), 0.0)
    wts = wts / wts.sum(1, keepdims=True)
    cx, cy = (wts * larger["x"]).sum(1), (wts * larger["y"]).sum(1)
    oy, ox = np.rint(cy).astype(int) - size // 2, np.rint(cx).astype(int) - size // 2
    windows = np.column_stack([oy, oy + size, ox, ox + size])
    crops, masks, _ = pad_windows(img, windows, (size, size), mask=good)
    model_crops, _, _ = pad_windows(model, windows, (size, size))
    q = dict(x=removed["x"] - ox[:, None], y=removed["y"] - oy[:, None], flux=removed["flux"])
    own = render_windows(psf, {**q, **shape_vals}, size)
    known = model_crops - own
    if sky is not None:
        known = known + sky_shape(sky, windows, size, masks, sky_tol)[0]
    # One batch: the C smaller models, then the C larger ones (one compiled shape).
    both = {n: np.concatenate([smaller[n], larger[n]]) for n in ("x", "y", "flux", "valid")}
    valid = both.pop("valid")
    init = {
        "x": np.where(valid, both["x"] - np.concatenate([ox, ox])[:, None], size / 2),
        "y": np.where(valid, both["y"] - np.concatenate([oy, oy])[:, None], size / 2),
        "flux": np.where(valid, np.maximum(both["flux"] / unit, 1e-3), 1.0),
    }
    for name, v in shape_vals.items():
        init[name] = np.full((2 * c, k), v)
    bg = np.concatenate([background, background])
    init["background"] = (
        bg if background_model == "constant" else np.column_stack([bg, np.zeros((2 * c, 2))])
    )
    init["background"] = init["background"] / unit
    res = fit_regions(
        np.concatenate([crops, crops]) / unit, init, psf=psf, background=background_model,
        noise=noise, mask=np.concatenate([masks, masks]), valid=valid,
        known=np.concatenate([known, known]) / unit, fixed=tuple(shape_vals), tol=FIT_TOL,
    )  # fmt: skip
    loss = np.asarray(res.loss)
    gain = loss[:c] - loss[c:]
    if noise == "gaussian":  # χ² in data units: scale by the residual variance (an F test)
        nb = 1 if background_model == "constant" else 3
        n_par = 3 * larger["valid"].sum(1) + nb
        dof = np.maximum(masks.reshape(c, -1).sum(1) - n_par, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = gain / (loss[c:] / dof)
    status = np.asarray(res.status)
    ok = (status[:c] == 0) & (status[c:] == 0) & np.isfinite(gain)
    p = {n: np.asarray(v)[c:] for n, v in res.params.items()}
    fit = dict(x=p["x"] + ox[:, None], y=p["y"] + oy[:, None], flux=p["flux"] * unit)
    return np.where(ok, gain, -np.inf), ok, fit


def find_splits(
    img, good, cat, model, sky, *, psf, shape_vals, background_model, noise, noise_level,
    screen=SCREEN_THRESHOLD, threshold=PAIR_THRESHOLD, exclude=None, psf_error=0.0,
    sky_tol=np.inf, unit=1.0,
):  # fmt: skip
    """Which sources of a fitted catalog are unresolved pairs, and the pairs' fits.

    **Arguments:** `img`, `good` `(H, W)` (offset-subtracted data and valid pixels); `cat` the
    catalog columns (dict of `(N,)`); `model` `(H, W)` its sources' light; `sky` `(H, W)` the
    smooth background; `noise_level` the Gaussian noise σ; `psf_error` the PSF model's
    fractional error, added to each pixel's variance for the screen; `sky_tol`: the range
    across a test window beyond which `sky`'s shape there is known light, and `unit` the
    fits' unit (see `nested_test`); `screen` the least residual-quadrupole χ² drop for a
    candidate; `exclude` `(N,)` sources not to try (e.g.
    next to a new residual detection, which explains their residual better).

    **Returns:** `(parents, children)`: `(P,)` indices of sources to replace, and a dict of
    `(P, 2)` `x, y, flux` for their two parts.
    """
    none = np.zeros(0, int), {k: np.zeros((0, 2)) for k in ("x", "y", "flux")}
    if cat["x"].size == 0:
        return none
    sx = float(np.median(cat["sigma_x"]))
    sy = float(np.median(cat["sigma_y"]))
    if noise == "poisson":
        variance = np.maximum(model + sky, 1.0)
    else:
        variance = np.full(img.shape, max(noise_level, 1e-12) ** 2)
    variance = variance + (psf_error * model) ** 2  # the PSF's own error, as a fraction
    width = max(sx, sy)
    cand = (cat["flux"] > 0) & np.isfinite(cat["x"])
    if exclude is not None:
        cand &= ~exclude
    idx = np.flatnonzero(cand)
    drop, angle, sep = quadrupole_screen(
        img - model - sky, variance, good, cat["x"][idx], cat["y"][idx], cat["flux"][idx], sx, sy
    )
    pick = drop > screen
    idx, angle, sep = idx[pick], angle[pick], sep[pick]
    if idx.size == 0:
        return none
    sep_c = np.clip(sep, 0.5 * width, 2.0 * width)
    dx, dy = 0.5 * sep_c * np.cos(angle), 0.5 * sep_c * np.sin(angle)
    px, py, pf = cat["x"][idx], cat["y"][idx], cat["flux"][idx]
    children = dict(
        x=np.column_stack([px + dx, px - dx]), y=np.column_stack([py + dy, py - dy]),
        flux=np.column_stack([pf / 2, pf / 2]),
    )  # fmt: skip
    removed = {k: cat[k][idx][:, None] for k in ("x", "y", "flux")}
    one = dict(
        x=np.column_stack([px, px]),
        y=np.column_stack([py, py]),
        flux=np.column_stack([pf, pf]),
        valid=np.array([[True, False]] * idx.size),
    )
    two = dict(children, valid=np.ones((idx.size, 2), bool))
    gain, ok, fit = nested_test(
        img, good, model, removed, one, two, np.nan_to_num(cat["background"][idx]), psf=psf,
        shape_vals=shape_vals, background_model=background_model, noise=noise, sky=sky,
        sky_tol=sky_tol, unit=unit,
    )  # fmt: skip
    sep = np.hypot(fit["x"][:, 0] - fit["x"][:, 1], fit["y"][:, 0] - fit["y"][:, 1])
    # Both parts stay around the parent (a part that ran onto a neighbour is fitting that
    # neighbour's residual, not a hidden source), apart by more than the merge distance.
    drift = np.hypot(fit["x"] - px[:, None], fit["y"] - py[:, None])
    accept = (
        ok & (gain > threshold) & np.all(fit["flux"] > 0, axis=1) & (sep >= 0.5 * width)
        & np.all(drift < 1.5 * width, axis=1)
    )  # fmt: skip
    return idx[accept], {k: v[accept] for k, v in fit.items()}
