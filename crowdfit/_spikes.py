"""Single-pixel spikes: hot pixels and cosmic-ray hits, which no PSF can make.

A camera's hot pixel or a cosmic ray's hit lights one pixel. The matched filter still answers
it (a spike of `H` counts reads as a source of flux `2H`), so it becomes a source of a quarter
of a star's flux with a bad fit, or, on a star, adds its counts to the star's flux. A PSF of
width `σ` cannot make it: however the PSF sits, its brightest pixel's brightest 4-neighbour
holds at least `exp(-1 / (2σ²))` of that pixel's light above the background (exactly that
fraction for a point-sampled Gaussian centred on the pixel; more off centre or pixel-integrated).
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
                threshold=SPIKE_THRESHOLD, ratio=SPIKE_RATIO):  # fmt: skip
    """`(H, W)` True at the pixels that stand out from their 4 neighbours more than a PSF allows.

    With `d` the image minus the background, `m_x` and `m_y` the largest of the valid left/right
    and up/down neighbours of a pixel (at least 0) and `r = exp(-1 / (2 σ²))` along each axis,
    the PSF allows the pixel `a = max(m_x / r_x, m_y / r_y)`. The pixel is a spike when
    `d > ratio · a` and `d − a > threshold · noise · √(1 + 1 / r²)` (the noise of the difference,
    with `r` the smaller of the two). Pure Gaussian noise gives a false spike with probability
    under 1e-13 per pixel at the defaults; a spike of `H` counts is found from `H ≈ 7.6 noise` on
    an empty sky, far below where the detector would report it (`H ≈ 18 noise` at σ = 2), and on a
    star once it exceeds `1.27×` the star's peak. Spikes of two or more adjacent pixels (a
    cosmic-ray track) are not found. A pixel without a valid neighbour is never a spike.

    **Arguments:**

    - `image`: `(H, W)` pixel values.
    - `sigma`: the PSF width in pixels, a number or `(sigma_x, sigma_y)`.
    - `noise`: the per-pixel noise standard deviation (e.g. `estimate_noise`).
    - `mask`: optional `(H, W)` True where a pixel is valid; invalid pixels are never spikes and
      never count as neighbours.
    - `background`: optional `(H, W)` or scalar background (default 0).
    - `threshold`, `ratio`: see above.

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
    m_x = np.maximum(pad[1:-1, :-2], pad[1:-1, 2:])
    m_y = np.maximum(pad[:-2, 1:-1], pad[2:, 1:-1])
    has_neighbour = np.isfinite(m_x) | np.isfinite(m_y)
    r_x, r_y = math.exp(-0.5 / sx**2), math.exp(-0.5 / sy**2)
    allowed = np.maximum(np.maximum(m_x, 0.0) / r_x, np.maximum(m_y, 0.0) / r_y)
    scale = threshold * float(noise) * math.sqrt(1.0 + 1.0 / min(r_x, r_y) ** 2)
    with np.errstate(invalid="ignore"):
        return valid & has_neighbour & (d > ratio * allowed) & (d - allowed > scale)
