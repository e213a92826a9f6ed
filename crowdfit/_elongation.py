"""Elongated spots: is the PSF elliptical where the model holds it circular?

A circular Gaussian fitted to an elliptical spot leaves a quadrupole along the long axis, which
the split test takes for an unresolved pair: on a 256² field of 100 spots of σ = (1.6, 2.6),
`fit_image` with `psf="gaussian"` returned 203 sources (Jaccard 0.10, fluxes −20 %), with
`psf="elliptical_gaussian"` 100 (0.98, +0.4 %). Astigmatic microscopes (3-D SMLM), tracking
errors and optics off axis make such PSFs. `axis_ratio` measures the spots' shape from their
second moments, so that `fit_image` can say so before it fits them.
"""

from __future__ import annotations

import math

import numpy as np

from ._group import _pairs_within, pad_windows

__all__ = ["axis_ratio", "elongation_message"]

# Spots that measure the shape: peaks of this many noise σ, with no other detection within
# this many PSF widths (its light would skew the moments), the brightest this many.
_PEAK_SNR = 10.0
_ALONE = 6.0
_MAX_SPOTS = 100
# `fit_image` warns from this coherence and axis ratio, measured on 5 spots or more: at S/N 700
# spots of σ = (2.0, 2.1) came out as 134 of 100 with a circular PSF, 100 with an elliptical one.
_COHERENT = 5.0
_RATIO = 1.03
_MIN_SPOTS = 5
# An elliptical model holds its axes along x and y: farther than this (degrees) they are not
# ("rotated_gaussian" fits the angle).
_TILT = 15.0


def elongation_message(ratio, angle, n, z, psf_params, angle_held=False) -> str | None:
    """The warning for `axis_ratio`'s measurement, or `None` when the PSF model fits it: a round
    model and elongated spots, or an elliptical one whose axes the spots' are not (a rotated
    one fits any, unless `angle_held`: its `sigma` was given without an angle, so at 0)."""
    if not (n >= _MIN_SPOTS and z > _COHERENT and ratio > _RATIO):
        return None
    if "angle" in psf_params and not angle_held:
        return None
    tilt = min(abs(angle), abs(abs(angle) - 90.0))
    along = ("along x" if abs(angle) <= _TILT else "along y" if tilt <= _TILT else
             f"at {angle:.0f}° from x")  # fmt: skip
    seen = (f"the spots are elongated (axis ratio {ratio:.2f}, long axis {along}, measured on "
            f"{n} isolated spots)")  # fmt: skip
    if "sigma" in psf_params:
        fix = "psf='elliptical_gaussian'" if tilt <= _TILT else "psf='rotated_gaussian'"
        return f"{seen}: a round PSF takes each for an unresolved pair; pass {fix}"
    if tilt > _TILT and "angle" in psf_params:
        return (f"{seen}: sigma without an angle holds the rotated PSF at angle 0; pass "
                "sigma=(sigma_x, sigma_y, angle), or sigma=None to measure it")  # fmt: skip
    if tilt > _TILT:
        return f"{seen}: this PSF holds its axes along x and y; pass psf='rotated_gaussian'"
    return None


def axis_ratio(image, x, y, sigma, *, background, noise, mask=None):
    """The spots' axis ratio and the long axis's angle, from their Gaussian-weighted moments.

    Each bright isolated detection's stamp (the image minus `background`) is weighted by a
    circular Gaussian of width `sigma` about the detection; the medians over the spots of the
    normalised second moments make one tensor, whose eigenvalues are those of the spot's
    ellipse times the weight (`1/s'² = 1/s² + 1/sigma²` along each axis), undone here.

    **Arguments:** `image` `(H, W)`; `x, y` `(N,)` detections; `sigma` the PSF's width (one
    number); `background` a number or `(H, W)`; `noise` the per-pixel noise σ; `mask` `(H, W)`
    True where a pixel counts.

    **Returns:** `(ratio, angle, n, z)`: the long axis over the short one (1 for round spots),
    its angle in degrees from the x axis (in (-90, 90]), the number of spots measured (`ratio`
    is NaN when none could be), and the coherence `z`: the spots' mean ellipticity over its
    standard error. Round spots gave `z` ≤ 2.2 (σ 0.8–4, peaks 30–1000 noise σ, 0.02–0.3 spots
    per FWHM², where isolated spots in crowds are often blends), elliptical ones 8–44 (axis
    ratios 1.09–1.64).

    >>> import numpy as np
    >>> yy, xx = np.mgrid[:64, :64]
    >>> spots = [(16, 16), (46, 18), (20, 46), (48, 48)]
    >>> image = sum(100 * np.exp(-((xx - cx) ** 2 / 4.5 + (yy - cy) ** 2 / 8.0))
    ...             for cx, cy in spots)
    >>> ratio, angle, n, z = axis_ratio(image, *np.array(spots, float).T, 1.7, background=0.0,
    ...                                 noise=1.0)
    >>> round(ratio, 2), round(angle), n
    (1.33, 90, 4)
    """
    img = np.asarray(image, float)
    good = np.isfinite(img) if mask is None else np.asarray(mask, bool) & np.isfinite(img)
    resid = np.where(good, img - background, 0.0)
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return math.nan, math.nan, 0, 0.0
    h, w = img.shape
    rows = np.clip(np.rint(np.where(ok, y, 0)), 0, h - 1).astype(int)
    cols = np.clip(np.rint(np.where(ok, x, 0)), 0, w - 1).astype(int)
    peak = np.where(ok, resid[rows, cols], -np.inf)
    alone = np.ones(x.size, bool)
    a, b = _pairs_within(np.where(ok, x, -1e9), np.where(ok, y, -1e9), _ALONE * sigma)
    alone[a] = alone[b] = False
    use = np.flatnonzero(ok & alone & (peak > _PEAK_SNR * noise))
    use = use[np.argsort(-peak[use], kind="stable")][:_MAX_SPOTS]
    if use.size == 0:
        return math.nan, math.nan, 0, 0.0
    half = int(math.ceil(3.0 * sigma))
    windows = np.column_stack(
        [rows[use] - half, rows[use] + half + 1, cols[use] - half, cols[use] + half + 1]
    )
    stamps, valid, _ = pad_windows(resid, windows, (2 * half + 1,) * 2, mask=good)
    off = np.arange(-half, half + 1, dtype=float)
    dx = off[None, None, :] + (cols[use] - x[use])[:, None, None]
    dy = off[None, :, None] + (rows[use] - y[use])[:, None, None]
    weight = stamps * valid * np.exp(-0.5 * (dx**2 + dy**2) / sigma**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        total = weight.sum(axis=(1, 2))
        m = {k: (weight * v).sum(axis=(1, 2)) / total
             for k, v in (("xx", dx * dx), ("yy", dy * dy), ("xy", dx * dy))}  # fmt: skip
    # (whole stamps only: one cut by the image's edge or a mask loses light on one side, and in
    # a crowd the isolated spots are mostly at the edges, which made round spots 15 % long)
    fine = valid.all(axis=(1, 2)) & (total > 0)
    fine &= np.isfinite(m["xx"]) & np.isfinite(m["yy"]) & np.isfinite(m["xy"])
    if fine.sum() < 2:
        return math.nan, math.nan, int(fine.sum()), 0.0
    # Coherence: one PSF elongates every spot alike, unresolved blends each their own way.
    tr = m["xx"][fine] + m["yy"][fine]
    e = np.stack([(m["xx"][fine] - m["yy"][fine]) / tr, 2.0 * m["xy"][fine] / tr])
    n = e.shape[1]
    z = float(np.hypot(*e.mean(axis=1)) / np.sqrt(np.mean(e.var(axis=1)) / n + 1e-12))
    mxx, myy, mxy = (float(np.median(m[k][fine])) for k in ("xx", "yy", "xy"))
    mean, diff = 0.5 * (mxx + myy), math.hypot(0.5 * (mxx - myy), mxy)
    # (an axis as wide as the weight or wider measures as the weight: held just under it)
    inner = [min(v, 0.999 * sigma**2) for v in (mean + diff, mean - diff)]
    if inner[1] <= 0:
        return math.nan, math.nan, n, z
    long, short = (1.0 / (1.0 / v - 1.0 / sigma**2) for v in inner)
    angle = math.degrees(0.5 * math.atan2(2.0 * mxy, mxx - myy))
    return math.sqrt(long / short), (angle if angle > -90 else angle + 180), n, z
