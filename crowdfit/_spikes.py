"""Pixels sharper than the PSF: hot pixels, hot columns and cosmic-ray hits.

A camera's hot pixel or a cosmic ray's hit lights one pixel (or a short track), a hot column a
line of pixels. The matched filter still answers them (a spike of `H` counts reads as a source
of flux `2H`), so they become false sources with bad fits, or, on a star, add their counts to
the star's flux. A PSF of width `σ` cannot make them: along each axis, however the PSF sits,
its brightest pixel's brighter neighbour holds at least `exp(-1 / (2σ²))` of that pixel's light
above the background (exactly that fraction for a point-sampled Gaussian centred on the pixel;
more off centre or pixel-integrated). A pixel far brighter than that along either axis is no
star's.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["find_spikes"]

# A spike exceeds what its brightest neighbour allows by this many noise standard deviations...
SPIKE_THRESHOLD = 5.0
# ...and is more than this many times what that neighbour allows (a bright star's shot noise
# can lift its peak pixel by many read-noise σ, never to twice its PSF's value).
SPIKE_RATIO = 2.0


def find_spikes(image, sigma, noise, *, mask=None, background=None,
                threshold=SPIKE_THRESHOLD, ratio=SPIKE_RATIO, shot=False):  # fmt: skip
    """`(H, W)` True at the pixels sharper than a PSF of width `sigma` can make.

    With `d` the image minus the background, `m_x` the larger of a pixel's valid left and right
    neighbours (at least 0) and `r_x = exp(-1 / (2 σ_x²))`, the PSF allows the pixel
    `a_x = m_x / r_x` along x; likewise along y. The pixel is a spike when, along x or along y,
    `d > ratio · a` and `d − a > threshold · noise · √(1 + 1 / r²)` (the noise of the
    difference); an axis along which a neighbour is missing (an edge, a masked pixel) does not
    count. Pure Gaussian noise gives a false spike with probability under 1e-13 per pixel at
    the defaults; a hot pixel of `H` counts is found from `H ≈ 7.6 noise` on an empty sky at
    σ = 2, far below where the detector would report it (`H ≈ 18 noise`), and on a star once it
    exceeds `1.27×` the star's peak. A hot column or a cosmic-ray track one pixel wide is found
    along its width; a blob two pixels wide both ways is not.

    **Arguments:**

    - `image`: `(H, W)` pixel values.
    - `sigma`: the PSF width in pixels, a number or `(sigma_x, sigma_y)`.
    - `noise`: the per-pixel noise standard deviation (e.g. `estimate_noise`).
    - `mask`: optional `(H, W)` True where a pixel is valid; invalid pixels are never spikes and
      never count as neighbours.
    - `background`: optional `(H, W)` or scalar background (default 0).
    - `threshold`, `ratio`: see above.
    - `shot`: the image is in counts (Poisson): the noise of the difference also holds the
      pixel's and its neighbour's own shot noise, `d + m / r²`. Without it a faint spot's peak
      pixel in a sparse photon-counting frame (0.05–0.3 photons per pixel) passed for a spike
      whenever its neighbours fell short by chance: 12–16 of them on a 128² frame of 40 spots.

    **Returns:** `(H, W)` bool.

    >>> import numpy as np
    >>> from crowdfit._spikes import find_spikes
    >>> yy, xx = np.mgrid[:32, :32]
    >>> image = 10 + 400 * np.exp(-((xx - 10) ** 2 + (yy - 12) ** 2) / 8)  # a star, σ = 2
    >>> image[20, 25] += 100  # a hot pixel
    >>> [tuple(map(int, p)) for p in np.argwhere(find_spikes(image, 2.0, 1.0, background=10))]
    [(20, 25)]
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    sx, sy = (float(sigma), float(sigma)) if np.ndim(sigma) == 0 else map(float, sigma)
    if not (sx > 0 and sy > 0):
        raise ValueError(f"sigma must be positive, got {sigma}")
    valid = np.isfinite(img) if mask is None else np.asarray(mask, bool) & np.isfinite(img)
    d = img - (0.0 if background is None else np.asarray(background, dtype=np.float64))
    d = np.where(valid, d, -np.inf)  # invalid pixels never raise a neighbour's maximum
    pad = np.pad(d, 1, constant_values=-np.inf)
    spike = np.zeros(img.shape, bool)
    for a, b, s in ((pad[1:-1, :-2], pad[1:-1, 2:], sx), (pad[:-2, 1:-1], pad[2:, 1:-1], sy)):
        # Both neighbours along the axis must be valid: past an edge or a mask may lie the
        # centre of a star whose brightest valid pixel this is.
        m = np.where(np.isfinite(a) & np.isfinite(b), np.maximum(a, b), np.nan)
        r = math.exp(-0.5 / s**2)
        allowed = np.maximum(m, 0.0) / r
        var = float(noise) ** 2 * (1.0 + 1.0 / r**2)
        if shot:
            var = var + np.maximum(d, 0.0) + np.maximum(np.nan_to_num(m), 0.0) / r**2
        scale = threshold * np.sqrt(var)
        with np.errstate(invalid="ignore"):
            spike |= np.isfinite(m) & (d > ratio * allowed) & (d - allowed > scale)
    return valid & spike
