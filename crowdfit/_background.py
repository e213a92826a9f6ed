"""Region backgrounds: one per region, shared by all of its sources.

`"constant"` is one offset; `"plane"` is an offset plus slopes in x and y about the window centre.
"""

from __future__ import annotations

__all__ = ["BACKGROUNDS", "n_background_params", "render_background"]

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
