"""The usual recipe the seed question used: find peaks, fit each crop alone with `curve_fit`.

Kept as a baseline to compare crowdfit against (demo, notebooks, benchmarks). Needs scipy.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

__all__ = ["per_spot_fit"]


def _image(image) -> np.ndarray:
    a = np.asarray(image, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {a.shape}")
    return a


def _rotated_gaussian(xy, amplitude, x0, y0, sigma_x, sigma_y, angle, offset):
    # The seed's elliptical Gaussian: quadratic form with coefficients a, b, c from the two widths
    # and the rotation angle; point-sampled at pixel centres, plus a flat offset.
    x, y = xy
    cos2, sin2, sin2t = np.cos(angle) ** 2, np.sin(angle) ** 2, np.sin(2.0 * angle)
    inv_x, inv_y = 1.0 / (2.0 * sigma_x**2), 1.0 / (2.0 * sigma_y**2)
    a = cos2 * inv_x + sin2 * inv_y
    b = 0.5 * sin2t * (inv_y - inv_x)
    c = sin2 * inv_x + cos2 * inv_y
    dx, dy = x - x0, y - y0
    return offset + amplitude * np.exp(-(a * dx * dx + 2.0 * b * dx * dy + c * dy * dy))


def per_spot_fit(
    image,
    *,
    num_peaks: int | None = None,
    min_distance: int = 5,
    half_width: int = 6,
    maxfev: int = 200,
    min_sigma: float = 1.0,
) -> dict:
    """The StackOverflow seed answer's method: detect peaks, fit each crop alone with ``curve_fit``.

    Setup (following the accepted answer, with its bookkeeping bugs fixed):

    * Detection: ``skimage.feature.peak_local_max(image, num_peaks=num_peaks,
      min_distance=min_distance)`` on the raw image, no threshold: the answer relies on
      ``num_peaks`` ("detect a generous amount of spots") and on throwing bad fits away.
      ``num_peaks=None`` scales the answer's 300 candidates per 200x400 image to this image's area
      (one candidate per ~267 pixels, at least 20).
    * Crop: rows/columns ``peak ± half_width`` inclusive, clipped at the image border (the answer
      used ``[p - 6, p + 6)``, one pixel short on the far side, and assumed the peak sat at (6, 6)
      of the crop even when the border clipped it; here the peak's true place in the crop is used
      and the fit is mapped back by the crop's origin).
    * Model: 7-parameter rotated Gaussian (amplitude, x, y, sigma_x, sigma_y, angle, offset),
      point-sampled at pixel centres, no bounds.
    * Start: amplitude = crop max, (x, y) = the peak, sigma_x = sigma_y = 1, angle = 0,
      offset = |crop min|, as in the answer.
    * Fit: ``scipy.optimize.curve_fit(method="lm", maxfev=maxfev)`` with ``OptimizeWarning``
      turned into an error.
    * Rejected (as in the answer): fits that raise (``RuntimeError``/``ValueError``/
      ``OptimizeWarning``, e.g. maxfev reached or covariance not estimable) and fits with a width
      below ``min_sigma``. Also rejected (the answer had no such check but a careful user would):
      non-finite parameters and a centre outside the crop. Widths are compared as ``|sigma|``
      since the model is even in each sigma (the answer compared the signed, rounded values).
      The answer's ``np.round(popt)`` is not reproduced: it rounded positions to whole pixels.
    * Duplicates (two candidates converging on one spot) are kept, as in the answer.

    Returns ``dict(x, y, flux, amplitude, sigma_x, sigma_y, angle, offset, time_s,
    time_detect_s, n_candidates)`` for the kept fits; ``flux = 2 pi sigma_x sigma_y amplitude``
    (exact for a sampled Gaussian whose sigma is well above a pixel). ``time_s`` covers
    detection plus all fits.
    """
    import scipy.optimize as opt
    import skimage.feature

    img = _image(image)
    h, w = img.shape
    if num_peaks is None:
        num_peaks = max(20, int(round(300 * img.size / (200 * 400))))

    t0 = time.perf_counter()
    peaks = skimage.feature.peak_local_max(img, num_peaks=num_peaks, min_distance=min_distance)
    t_detect = time.perf_counter() - t0

    cols = ("x", "y", "flux", "amplitude", "sigma_x", "sigma_y", "angle", "offset")
    out = {k: [] for k in cols}
    for row, col in peaks:
        r0, r1 = max(row - half_width, 0), min(row + half_width + 1, h)
        c0, c1 = max(col - half_width, 0), min(col + half_width + 1, w)
        crop = img[r0:r1, c0:c1]
        yy, xx = np.mgrid[0 : crop.shape[0], 0 : crop.shape[1]].astype(np.float64)
        p0 = (crop.max(), col - c0, row - r0, 1.0, 1.0, 0.0, abs(crop.min()))
        with warnings.catch_warnings():
            warnings.simplefilter("error", opt.OptimizeWarning)
            try:
                popt, _ = opt.curve_fit(
                    lambda xy, *p: _rotated_gaussian(xy, *p).ravel(),
                    (xx, yy),
                    crop.ravel(),
                    p0=p0,
                    method="lm",
                    maxfev=maxfev,
                )
            except (RuntimeError, ValueError, opt.OptimizeWarning):
                continue
        amp, fx, fy, sx, sy, ang, off = popt
        sx, sy = abs(sx), abs(sy)
        if not np.all(np.isfinite(popt)) or sx < min_sigma or sy < min_sigma:
            continue
        if not (-0.5 <= fx <= crop.shape[1] - 0.5 and -0.5 <= fy <= crop.shape[0] - 0.5):
            continue
        vals = (fx + c0, fy + r0, 2.0 * np.pi * sx * sy * amp, amp, sx, sy, ang, off)
        for k, v in zip(cols, vals, strict=True):
            out[k].append(v)
    t_total = time.perf_counter() - t0
    res = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
    res.update(time_s=t_total, time_detect_s=t_detect, n_candidates=len(peaks))
    return res
