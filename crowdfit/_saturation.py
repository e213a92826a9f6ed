"""Saturated stars, and masked holes in stars: each is fitted on its valid wings.

A detector clips at its full well or its converter's range, so a bright star's core becomes a
plateau of one value. Fitted with the plateau, the star's flux comes out far too low and the
residual ring becomes false neighbours. Masked, the plateau is a hole in the star, and peak
finding answers the hole's rim several times, as it does for a star's core that the user
masked. So `fit_image` masks the saturated pixels (`saturation_level`), drops the detections on
the rim of each masked hole that sits in a star and seeds one source at its centre
(`seed_holes`, `clear_rims`), which the fit then measures from the wings.
"""

from __future__ import annotations

import math

import numpy as np
import skimage.measure

__all__ = ["saturation_level", "seed_holes", "clear_rims"]

# An automatic saturation level needs a plateau of at least this many connected pixels holding
# exactly the image's maximum (integer counts below a converter's limit tie by chance more
# often, so they need more)...
_MIN_PLATEAU, _MIN_PLATEAU_COUNTS = 2, 4
# ...this many noise standard deviations above the median (a low-count integer image repeats
# its maximum by chance).
_MIN_HEIGHT = 20.0
# The limits of 8- to 32-bit converters, 2^k - 1 and 2^k.
_ADC_LIMITS = {float(2**k - d) for k in range(8, 33) for d in (0, 1)}
# A masked hole sits in a star when its rim's median is this many noise σ above the background,
_MIN_RIM = 20.0
# and it is no larger than a disc of this many PSF widths in radius (a star that bright is
# 10^7 times its saturation level; a bigger hole is a masked region, not a star's core).
_MAX_RADIUS = 6.0


def saturation_level(image, good, noise, offset=0.0) -> float | None:
    """The image's saturation level if it has one: its maximum, when at least 2 connected valid
    pixels hold exactly that value and it lies over 20 noise σ above the median; else `None`.
    Two connected pixels at one value are a plateau that noisy real numbers do not make by
    themselves; integer counts need 4, unless the maximum (plus `offset`, which was subtracted
    from `image`) is a converter's limit, `2^k − 1` or `2^k`.
    """
    values = image[good]
    if values.size == 0:
        return None
    top = float(values.max())
    if top - float(np.median(values)) < _MIN_HEIGHT * noise:
        return None
    raw = values + offset
    counts = bool(np.all(raw == np.round(raw))) and top + offset not in _ADC_LIMITS
    need = _MIN_PLATEAU_COUNTS if counts else _MIN_PLATEAU
    at_top = good & (image == top)
    if np.count_nonzero(at_top) < need:
        return None
    sizes = np.bincount(skimage.measure.label(at_top, connectivity=2).ravel())[1:]
    return top if sizes.size and sizes.max() >= need else None


def seed_holes(image, good, background, noise, sigma) -> dict[str, np.ndarray]:
    """One starting source per masked hole that sits in a star.

    A hole is a connected (8-neighbour) group of masked pixels: a saturated plateau, or pixels
    the user masked or that were not finite. It sits in a star when the median of the valid
    pixels around it (its rim) lies more than 20 noise σ above the background and it is no
    larger than a disc of 6 PSF widths: a star's light falls off smoothly from the masked core,
    while a cosmic-ray hit or a hot pixel, a bad column or a masked border has a rim at the
    background, and a large masked region is not a star's core; those stay plain holes.

    **Returns:** a dict of `(S,)` `x`, `y` (the hole's centroid), `radius` (`r = √(area / π)`)
    and `flux_guess`: the Gaussian of width `sigma` through the rim's median `v` at `r + ½`,
    `2π σ² v exp((r + ½)² / 2σ²)`.
    """
    out = {k: np.zeros(0) for k in ("x", "y", "flux_guess", "radius")}
    excess = np.where(good, image - background, 0.0)
    bright = good & (excess > _MIN_RIM * noise)
    # Only holes next to a bright pixel can sit in a star: label those alone.
    near = np.zeros_like(bright)
    near[:-1] |= bright[1:]
    near[1:] |= bright[:-1]
    near[:, :-1] |= bright[:, 1:]
    near[:, 1:] |= bright[:, :-1]
    labels = skimage.measure.label(~good, connectivity=2)
    candidates = np.unique(labels[near & ~good])
    candidates = candidates[candidates > 0]
    if candidates.size == 0:
        return out
    h, w = image.shape
    s = float(np.sqrt(np.prod(sigma)))
    rows, cols, radii, fluxes = [], [], [], []
    for region in skimage.measure.regionprops(np.where(np.isin(labels, candidates), labels, 0)):
        r0, c0, r1, c1 = region.bbox
        r0, c0, r1, c1 = max(r0 - 1, 0), max(c0 - 1, 0), min(r1 + 1, h), min(c1 + 1, w)
        hole = labels[r0:r1, c0:c1] == region.label
        rim = np.zeros_like(hole)
        rim[:-1] |= hole[1:]
        rim[1:] |= hole[:-1]
        rim[:, :-1] |= hole[:, 1:]
        rim[:, 1:] |= hole[:, :-1]
        rim &= good[r0:r1, c0:c1]
        v = float(np.median(excess[r0:r1, c0:c1][rim])) if rim.any() else 0.0
        r = math.sqrt(region.area / math.pi)
        if v <= _MIN_RIM * noise or r > _MAX_RADIUS * s:
            continue
        rows.append(region.centroid[0])
        cols.append(region.centroid[1])
        radii.append(r)
        fluxes.append(2 * math.pi * s * s * v * math.exp((r + 0.5) ** 2 / (2 * s * s)))
    out["y"], out["x"] = np.array(rows, float), np.array(cols, float)
    out["radius"], out["flux_guess"] = np.array(radii, float), np.array(fluxes, float)
    return out


def clear_rims(det, stars, margin) -> dict[str, np.ndarray]:
    """`det` (a dict of `(N,)` columns) without the detections within `radius + margin` of a
    seeded hole's centre: the hole's rim, not sources of their own."""
    if stars["x"].size == 0 or det["x"].size == 0:
        return det
    d = np.hypot(det["x"][:, None] - stars["x"][None], det["y"][:, None] - stars["y"][None])
    keep = ~np.any(d < stars["radius"][None] + margin, axis=1)
    return {k: v[keep] for k, v in det.items()}
