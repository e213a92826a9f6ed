"""Region backgrounds: one per region, shared by all of its sources.

`"constant"` is one offset; `"plane"` is an offset plus slopes in x and y about the window centre.
Where the image's smooth background map changes across a window by more than the noise,
`fit_image` adds the map's shape there to the known light (`sky_shape`), and the region's
background is fitted on top of it.
"""

from __future__ import annotations

import numpy as np

from ._group import pad_windows

__all__ = ["BACKGROUNDS", "n_background_params", "render_background", "sky_shape"]

BACKGROUNDS = {"constant": 1, "plane": 3}


def n_background_params(background: str) -> int:
    """Number of parameters of a background model (`"constant"`: 1, `"plane"`: 3)."""
    try:
        return BACKGROUNDS[background]
    except KeyError:
        raise ValueError(
            f"unknown background {background!r}: expected one of {', '.join(BACKGROUNDS)}"
        ) from None


def render_background(background: str, b, x, y):
    """Background image of one window.

    **Arguments:** `b` the `(n,)` parameters (`[offset]` or `[offset, slope_x, slope_y]`), `x` the
    `(1, W)` columns and `y` the `(H, 1)` rows. A plane is `offset + slope_x * x + slope_y * y`
    in window coordinates (pixel centres at integers, so `offset` is its value at pixel `(0, 0)`).

    **Returns:** an array that broadcasts to `(H, W)`.
    """
    if background == "constant":
        return b[0] + 0.0 * (x + y)
    return b[0] + b[1] * x + b[2] * y


def sky_shape(sky, windows, size: int, mask, tol: float):
    """`(B, size, size)` shape of a smooth background map on each window, about its mean there,
    where it varies by more than `tol` (its range over the window's valid pixels); zero on
    windows where it varies less, and on invalid pixels.

    A region's constant background cannot follow a gradient across its window: at 1 count per
    pixel (0.2 noise σ) over 32 pixels, `fit_image` found 65 % more sources than there were,
    with every flux biased. Added to the known light, the map's shape lets the constant fit the
    level on top of it. Where the map is flat within its own noise (its range across a 32-pixel
    window stayed under 0.75 noise σ on flat fields of up to 0.3 stars/FWHM²), the map's
    wiggles would only add noise, so those windows are left alone (`tol`: `fit_image` uses one
    noise σ).

    **Arguments:** `sky` `(H, W)` the map; `windows` `(B, 4)` `(row0, row1, col0, col1)`;
    `size` the padded side; `mask` `(B, size, size)` the windows' valid pixels (`pad_windows`).

    **Returns:** `(shape, level, varies)`: the `(B, size, size)` shapes (`(B, 1, 1)` zeros when
    the whole map varies by less than `tol`), the `(B,)` means of the map over each window's
    valid pixels (NaN then), and `(B,)` True where the shape is used.

    >>> import numpy as np
    >>> sky = np.add.outer(np.zeros(8), 2.0 * np.arange(8))  # 2 per column
    >>> window, valid = np.array([[0, 4, 0, 4]]), np.ones((1, 4, 4), bool)
    >>> shape, level, varies = sky_shape(sky, window, 4, valid, tol=1.0)
    >>> shape[0, 0].tolist(), level.tolist(), varies.tolist()
    ([-3.0, -1.0, 1.0, 3.0], [3.0], [True])
    """
    b = len(windows)
    if not np.ptp(sky) > tol:  # (flat everywhere: no window's range can exceed the image's)
        return np.zeros((b, 1, 1)), np.full(b, np.nan), np.zeros(b, bool)
    crops, _, _ = pad_windows(sky, windows, (size, size))
    count = np.maximum(mask.sum((1, 2)), 1)
    level = np.where(mask, crops, 0.0).sum((1, 2)) / count
    high = np.where(mask, crops, -np.inf).max((1, 2))
    low = np.where(mask, crops, np.inf).min((1, 2))
    varies = (high - low) > tol
    shape = np.where(mask & varies[:, None, None], crops - level[:, None, None], 0.0)
    return shape, level, varies
