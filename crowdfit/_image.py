"""`fit_image`: whole-image crowded-field photometry.

Detect → group overlapping sources into bounded regions → fit each region jointly (one batch per
bucketed shape) → look for hidden neighbours in the residual → prune → refit → catalog.
"""

from __future__ import annotations

import math
import threading
import warnings

import jax
import numpy as np
import scipy.ndimage

from ._background import sky_shape
from ._catalog import COLUMNS, Catalog, empty_columns, model_image
from ._detect import (
    DEFAULT_THRESHOLD,
    detect,
    estimate_background,
    estimate_noise,
    estimate_sigma,
)
from ._elongation import axis_ratio, elongation_message
from ._fill import find_fill
from ._fit import _default_sizes, fit_regions
from ._group import _pairs_within, _round_up, closest_neighbours, group_sources, pad_windows
from ._progress import progress
from ._psf import amplitude, ellipse_covariance, ellipse_from_covariance, get_psf
from ._render import render_windows
from ._saturation import clear_rims, saturation_level, seed_holes
from ._solution import Status
from ._spikes import find_spikes
from ._split import FIT_TOL, PAIR_THRESHOLD, find_splits, nested_test
from ._threads import cpu_map
from ._wings import _FWHM, cores_of, measure_wings, measure_wings_jointly, render_wings

__all__ = ["fit_image"]

_SHAPE_NAMES = ("sigma", "sigma_x", "sigma_y", "angle")
# Measured PSF wings are used when they hold at least this fraction of the Gaussians' light and
# their significance (`_wings.Wings.significance`) is this many times its number of knots.
_WINGS_LIGHT = 0.02
_WINGS_SIGNIFICANCE = 5.0
# Measured again with their last measurement subtracted, up to this many times, until their
# light moves by less than `_WINGS_SETTLED`.
_WINGS_AGAIN = 4
_WINGS_SETTLED = 0.005
# Fits allowed after wings found late, on a crowd's finished catalog (`_joint_wings`): the refit
# of every region with them, and the refits after pruning; and how many times at most they are
# measured again there, each time on a background estimated with them.
_WINGS_LATE_FITS = 3
_WINGS_LATE_AGAIN = 8
# `_joint_wings` estimates the background under them on the pixels at least 1 FWHM from every
# source (where the model misses the PSF's core), unless fewer than this fraction of them are.
_WINGS_FREE = 1.0 / 3.0
# Wings found by the first look on a catalog of this many sources per FWHM² are measured again
# all sources at once too (`_joint_wings`): Moffat fields of 0.1 stars/FWHM², their fluxes
# -0.6 and +0.3 % (β = 2.5, 3) against -9 and -7 % by each star's rings (`_measured_wings`);
# at 0.05, -5 and -4 % against -3 and -1 %. Only such a crowd gets the late look when the
# first look found none.
_WINGS_CROWD = 0.07
# Region shapes: members rounded up to one of `_K_BUCKETS`, the window side to one of
# `_SIZE_BUCKETS` (past the largest, a multiple of it). Each shape used compiles one program
# (about 2 s on a CPU). 48 serves `max_window` up to 48: padded to 64, such windows took 1.8×
# the defaults' time on dense fields; at 48, 1.2×. Steps of 16 up to 128 serve the default
# `max_window` of wide PSFs (`default_max_window`, a multiple of 16) without padding.
_K_BUCKETS = (2, 4, 8, 16)
_SIZE_BUCKETS = (16, 32, 48, 64, 80, 96, 112, 128)
# A bucket of fewer regions than this is fitted in a bigger one (`_fill_padding`).
_FEW_REGIONS = 16
# A source within this many PSF widths of an added, removed or split one is refitted.
_REACH = 5.0
# And one within `_SHIFT_REACH` widths of a source whose light moved in the last fit by more
# than `_SHIFT_CHI2` (in noise units, `_light_change`): its region held that source's old light
# as known light. Without this, the regions of a crowd were fitted once against their
# neighbours' stale fits and left there (block coordinate descent stopped after one sweep): on
# 512² fields refitting every region of the finished catalog moved 47 of 2322 sources by more
# than 0.5 px. With it, on six fields at 0.1 / 0.2 / 0.3 stars/FWHM² the Jaccard index went
# from 0.973 / 0.946 / 0.889 to 0.977 / 0.958 / 0.902 and the false sources from 12 / 41 / 105
# to 8 / 19 / 63 per field, for +5 to +20 % of the time. (Reach 5 widths, as for changes: the
# same catalogs, more refits; more loop passes than `rounds` + 5: no better.)
_SHIFT_CHI2 = 16.0
_SHIFT_REACH = 3.0
# The residual's smooth background is estimated again (and the residual searched everywhere)
# only when the model changed over more than this fraction of the image since it was: by more
# than `_CHANGE_TOL` of the noise, within the matched filter's reach. Otherwise the residual is
# searched only where the model changed since the last search.
_BACKGROUND_STALE = 0.25
_CHANGE_TOL = 0.01
# Iteration limit of the fits that another residual search follows (and of the first fit, which
# the second continues: 5 % faster, the same catalogs on average). Regions that have not
# converged by then (sources swapping light with a newly found neighbour crawl on for 100+
# iterations) are refitted in the next pass, from where they stopped and with fresh damping,
# instead of ground on (the loop does not end while such regions remain): on twenty 256²
# fields (0.1–0.3 stars/FWHM²) the Jaccard index went from 0.932 to 0.944 and the time down
# 9 % (another twenty: 0.932 to 0.937, 8 %).
_SEARCH_MAX_ITER = 20
# With σ estimated, the PSF's width is measured again on the finished catalog; when that moved
# it by more than this fraction, the image is measured again with the new width.
_WIDTH_TOL = 0.005
_MAX_ITER = 50  # every other fit's (`fit_regions`' default)
# Where the smooth background map changes across a region's window by more than this many
# noise σ, its shape there is known light and the region's background the level on top
# (`_background.sky_shape`).
_SKY_RANGE = 1.0
# Gaussian-noise fits see the image in units where its noise is this (`_fit_unit`): the level of
# the benchmark fields (the seed question's N(5, 5)) on which the solver's damping was tuned. In
# units of the noise itself (1), the Jaccard index on twenty 512² fields moved by -0.0012 ±
# 0.0004 (measured with the damping floor before `_FLUX_FLOOR`).
_FIT_NOISE = 5.0
# Set by `crowdfit.dask`'s tile tasks: the caller reports masked spikes and saturated pixels
# once for the whole image, not every tile on its own thread.
_QUIET = threading.local()


def spike_message(n: int) -> str:
    return (
        f"{n} pixel(s) sharper than the PSF (hot pixels or columns, cosmic-ray hits) are masked "
        "and ignored (meta['spikes']; spikes=False keeps them)"
    )


def fill_message(n: int) -> str:
    return (
        f"{n} pixel(s) in flat areas of one exact value (a mosaic's or a rotation's fill) are "
        "masked and ignored (meta['n_fill'])"
    )


def saturation_message(n: int, level: float) -> str:
    return (
        f"{n} saturated pixel(s) (>= {level:g}) are masked; stars with masked cores are fitted "
        "on their wings (meta['saturation']; saturation=np.inf keeps the pixels)"
    )


def wings_message(light: float) -> str:
    return (
        f"the PSF is not Gaussian: its wings hold {100 * light:.0f} % more light than the "
        "Gaussian fits; they were measured and are part of every source's light and flux "
        "(meta['wings']; psf_wings=False fits Gaussians alone)"
    )


ALL_MASKED = "every pixel is masked: no sources can be measured"


def _warn(message: str) -> None:
    if not getattr(_QUIET, "on", False):
        warnings.warn(message, stacklevel=4)  # the caller of fit_image


def _check_image(image, mask):
    img = np.asarray(image)
    if img.ndim != 2:
        hint = " (for a (T, H, W) movie use crowdfit.fit_movie)" if img.ndim == 3 else ""
        raise ValueError(f"expected a 2-D image of shape (H, W), got shape {img.shape}{hint}")
    if not (np.issubdtype(img.dtype, np.floating) or np.issubdtype(img.dtype, np.integer)):
        raise ValueError(f"image must hold numbers, got dtype {img.dtype}")
    img = img.astype(np.float64)
    good = np.isfinite(img)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != img.shape:
            raise ValueError(f"mask has shape {mask.shape}, the image {img.shape}")
        good_user = mask
    else:
        good_user = np.ones(img.shape, bool)
    bad = int(np.count_nonzero(~good & good_user))
    if bad:
        warnings.warn(
            f"{bad} non-finite pixel(s) (NaN or inf) are masked and ignored", stacklevel=3
        )
    return img, good & good_user


def _widths(sigma):
    """`(sigma_x, sigma_y)` of a shared PSF shape: one number, `(sigma_x, sigma_y)` or
    `(sigma_x, sigma_y, angle)` (`"rotated_gaussian"`)."""
    if np.ndim(sigma) == 0:
        return float(sigma), float(sigma)
    return float(sigma[0]), float(sigma[1])


def _mean_width(sigma):
    """The geometric mean of a shared PSF shape's widths (see `_widths`)."""
    return math.sqrt(math.prod(_widths(sigma)))


def _covariance(sigma):
    """`(c_xx, c_yy, c_xy)` of a shared PSF shape (see `_widths`; no angle is angle 0)."""
    angle = float(sigma[2]) if np.size(sigma) == 3 else 0.0
    return ellipse_covariance(*_widths(sigma), angle)


def _axis_widths(sigma):
    """`(s_x, s_y)`: the widths of a shared PSF shape's profiles through its centre along x and
    along y (its widths, unless rotated; see `_widths`)."""
    c_xx, c_yy, c_xy = _covariance(sigma)
    det = c_xx * c_yy - c_xy * c_xy
    return math.sqrt(det / c_yy), math.sqrt(det / c_xx)


def _shape_change(new, old):
    """How far the shared PSF shape moved, as a fraction of its width: the largest change of
    its covariance over twice the mean variance (for widths alone, their relative change)."""
    a, b = np.array(_covariance(new)), np.array(_covariance(old))
    return float(np.max(np.abs(a - b)) / (b[0] + b[1]))


def _shape_values(psf, sigma):
    """The PSF's shape parameters for a shared shape `sigma` (see `_widths`)."""
    sx, sy = _widths(sigma)
    out = {}
    for n in psf.params:
        if n == "sigma":
            out[n] = math.sqrt(sx * sy)
        elif n == "sigma_x":
            out[n] = sx
        elif n == "sigma_y":
            out[n] = sy
        elif n == "angle":
            out[n] = float(sigma[2]) if np.size(sigma) == 3 else 0.0
    return out


def _neighbour_light(regs, origins, src, psf, shape_vals, size):
    """`(B, S, S)` light of each region's neighbours on its window, from their current fits."""
    kn = max(1, max(r.neighbours.size for r in regs))
    b = len(regs)
    p = {n: np.zeros((b, kn)) for n in ("x", "y", "flux")}
    for j, r in enumerate(regs):
        s = r.neighbours
        p["x"][j, : s.size] = src["x"][s] - origins[j, 1]
        p["y"][j, : s.size] = src["y"][s] - origins[j, 0]
        p["flux"][j, : s.size] = np.maximum(src["flux"][s], 0.0)
    return render_windows(psf, {**p, **shape_vals}, size)


def _window_means(cum, windows):
    """`(B,)` mean of an `(H, W)` image over each window `(row0, row1, col0, col1)`, clipped to
    it; `cum` `(H + 1, W + 1)` is the image's summed-area table (zero first row and column)."""
    h, w = cum.shape[0] - 1, cum.shape[1] - 1
    r0, c0 = np.clip(windows[:, 0], 0, h), np.clip(windows[:, 2], 0, w)
    r1 = np.maximum(np.clip(windows[:, 1], 0, h), r0 + 1)
    c1 = np.maximum(np.clip(windows[:, 3], 0, w), c0 + 1)
    r0, c0 = np.minimum(r0, h - 1), np.minimum(c0, w - 1)
    total = cum[r1, c1] - cum[r0, c1] - cum[r1, c0] + cum[r0, c0]
    return total / ((r1 - r0) * (c1 - c0))


def _fill_padding(buckets: dict) -> dict:
    """`{(k, size): region indices}` with the regions of small buckets moved into a bigger
    bucket (at least as many members and pixels a side). `fit_regions` pads each call's chunk
    of regions to full, so where the last chunk has room for a whole smaller bucket, that
    bucket's call is saved (in late passes of a few dozen regions, most of the calls). A bucket
    of fewer than `_FEW_REGIONS` regions moves even without room, at the cost of a chunk more:
    its shape would compile a program of its own (4-5 s on a CPU, at a first call) for a
    handful of regions (the 400-spot demo field compiled 13 programs, 4 of them for 1-8)."""
    keys = sorted(buckets, key=lambda q: (q[0] * q[1] ** 2, q))
    out = {q: list(buckets[q]) for q in keys}

    def room(q):
        chunk = _default_sizes(q[0] * q[1] ** 2, len(out[q]))[0]
        return -len(out[q]) % chunk

    for a in keys:
        hosts = [b for b in keys if b != a and b in out and b[0] >= a[0] and b[1] >= a[1]]
        fits = [b for b in hosts if room(b) >= len(out[a])]
        if fits:
            out[fits[0]].extend(out.pop(a))
        elif hosts and len(out[a]) < _FEW_REGIONS:
            out[hosts[0]].extend(out.pop(a))
    return out


def _fit_all(
    img,
    good,
    src,
    psf,
    shape_vals,
    *,
    background,
    noise,
    max_sources,
    max_window,
    free_shape,
    progress_bar,
    previous=None,
    max_iter=_MAX_ITER,
    sky_tol=np.inf,
    unit=1.0,
):
    """Fit every source jointly with its neighbours; returns per-source results (members).

    With a `previous` catalog, `src["prev"]` `(N,)` (each source's row there, -1 if new) and
    `src["dirty"]` `(N,)`, only regions with a dirty member are refitted; the others keep their
    previous results. `max_iter`: the fits' iteration limit. `sky_tol`: where the smooth map
    `src["background_map"]` varies across a window by more than this, its shape there is known
    light (`_background.sky_shape`); so is `src["wings"]` `(H, W)` (optional: the sources'
    PSF wings, `_wings`). `unit`: the fits see the image divided by it (see
    `_fit_unit`); the columns are in the image's units.

    **Returns:** `(columns, n_regions, n_fitted, refitted)`: the per-source columns, the number
    of regions and of regions fitted in this call, and `refitted` `(N,)`, True for the sources
    whose region was fitted.
    """
    h, w = img.shape
    sigma = max(v for k, v in shape_vals.items() if k != "angle")
    regions = group_sources(
        src["x"], src["y"], sigma, (h, w), max_sources=max_sources, max_window=max_window,
        flux=src["flux"],
    )  # fmt: skip
    n = src["x"].size
    columns = COLUMNS + (("angle",) if "angle" in psf.params else ())
    out = {c: np.full(n, np.nan) for c in columns}
    for c in ("group", "status", "iterations"):
        out[c] = np.zeros(n, int)
    redo = range(len(regions))
    refitted = np.ones(n, bool)
    if previous is not None:
        redo = [i for i, r in enumerate(regions) if src["dirty"][r.members].any()]
        same = np.ones(n, bool)
        for i in redo:
            same[regions[i].members] = False
        refitted = ~same
        for c in columns:
            out[c][same] = previous[c][src["prev"][same]]
        for r in regions:
            out["group"][r.members] = r.group
    # Regions are bucketed by their members only (neighbours are known light, not parameters),
    # with square windows: fewer distinct shapes, so fewer programs to compile.
    merged: dict = {}
    for i in redo:
        r = regions[i]
        k = _round_up(r.members.size, _K_BUCKETS)
        merged.setdefault((k, _round_up(max(r.shape), _SIZE_BUCKETS)), []).append(i)
    merged = _fill_padding(merged)
    fixed = () if free_shape else tuple(_shape_values(psf, sigma))
    cum = np.pad(src["background_map"].cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    nb = 1 if background == "constant" else 3
    items = sorted(merged.items())

    def fit_bucket(item):
        (k, size), idx = item
        regs = [regions[i] for i in idx]
        windows = np.array([r.window for r in regs])
        crops, masks, origins = pad_windows(img, windows, (size, size), mask=good)
        crops = crops / unit
        b = len(regs)
        # Every member as (its region's row, its slot, its source index).
        sizes = np.array([r.members.size for r in regs])
        flat = np.concatenate([r.members for r in regs])
        row = np.repeat(np.arange(b), sizes)
        slot = np.arange(flat.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        init = {n_: np.zeros((b, k)) for n_ in psf.params}
        valid = np.zeros((b, k), bool)
        valid[row, slot] = True
        init["x"][row, slot] = src["x"][flat] - origins[row, 1]
        init["y"][row, slot] = src["y"][flat] - origins[row, 0]
        init["flux"][row, slot] = np.maximum(src["flux"][flat] / unit, 1e-3)
        # Neighbours are measured by their own region; here their light is known.
        known = _neighbour_light(regs, origins, src, psf, shape_vals, size)
        tilt, level, varies = sky_shape(src["background_map"], windows, size, masks, sky_tol)
        known = known + tilt
        if src.get("wings") is not None:
            # (all of them, however faint: held under the noise like the map's shape, the
            # backgrounds took them up, 1.3 counts too high at noise 5, and the fluxes 2 % low)
            known = known + pad_windows(src["wings"], windows, (size, size))[0]
        known = known / unit
        bg0 = np.where(varies, level, _window_means(cum, windows))
        for name, v in shape_vals.items():
            init[name][:] = v
        for name in ("x", "y"):  # padded slots: anywhere inside the window
            init[name][~valid] = size / 2
        init["flux"][~valid] = 1.0
        init["background"] = bg0 / unit
        if nb == 3:
            init["background"] = np.column_stack([bg0 / unit, np.zeros((b, 2))])
        res = fit_regions(
            crops, init, psf=psf, background=background, noise=noise, mask=masks,
            valid=valid, known=known, fixed=fixed, tol=FIT_TOL, max_iter=max_iter,
        )  # fmt: skip
        return regs, origins, flat, row, slot, bg0, varies, jax.device_get(res)

    # Buckets are prepared and fitted side by side on a CPU: one bucket's host work and the
    # last, thin stages of its fit leave cores free for another's.
    fitted = cpu_map(fit_bucket, items, pool="buckets")
    bg_map = src["background_map"]
    for regs, origins, flat, row, slot, bg0, varies, res in progress(
        fitted, total=len(items), desc="fitting", enabled=progress_bar
    ):
        p, e = res.params, res.errors
        px, py = p["x"][row, slot], p["y"][row, slot]
        out["x"][flat] = px + origins[row, 1]
        out["y"][flat] = py + origins[row, 0]
        out["flux"][flat] = p["flux"][row, slot] * unit
        for name, u in (("flux", unit), ("x", 1.0), ("y", 1.0)):
            out[f"{name}_err"][flat] = e[name][row, slot] * u
        out["sigma_x"][flat] = p.get("sigma_x", p.get("sigma"))[row, slot]
        out["sigma_y"][flat] = p.get("sigma_y", p.get("sigma"))[row, slot]
        if "angle" in p:
            out["angle"][flat] = p["angle"][row, slot]
        bgp = p["background"][row] * unit
        out["background"][flat] = bgp if nb == 1 else bgp[:, 0] + bgp[:, 1] * px + bgp[:, 2] * py
        # (plus, where the map's shape was known light, that shape under the source)
        pr = np.clip(np.rint(np.nan_to_num(out["y"][flat])), 0, h - 1).astype(int)
        pc = np.clip(np.rint(np.nan_to_num(out["x"][flat])), 0, w - 1).astype(int)
        out["background"][flat] += np.where(varies[row], bg_map[pr, pc] - bg0[row], 0.0)
        out["group"][flat] = np.array([r.group for r in regs])[row]
        out["status"][flat] = res.status[row]
        out["iterations"][flat] = res.iterations[row]
        # (in units of the noise: the fits see Gaussian noise of σ `_FIT_NOISE`)
        out["chi2_reduced"][flat] = res.chi2_reduced[row] / (
            _FIT_NOISE**2 if noise == "gaussian" else 1.0)  # fmt: skip
    out["amplitude"] = np.asarray(
        amplitude({"flux": out["flux"], "sigma_x": out["sigma_x"], "sigma_y": out["sigma_y"]},
                  psf)
    )  # fmt: skip
    with np.errstate(divide="ignore", invalid="ignore"):
        out["snr"] = out["flux"] / out["flux_err"]
    return out, len(regions), len(redo), refitted


def _fit_unit(noise, noise_level):
    """The unit of the image that the region fits see: for Gaussian noise, the one in which the
    noise is `_FIT_NOISE` (the fits are then the same whatever units the image is in); 1 for
    Poisson counts, whose scale is their own.

    The fits' small absolute constants (the least starting flux, the damping's least scale)
    then mean the same on every image. Before the damping floor was made unit-free (see
    `_solver.levenberg_marquardt._FLUX_FLOOR`), the same field with values 10² to 10⁶ times
    larger came out with median fluxes 5–43 % low. With that fixed, in units 10⁻³ as large
    fluxes differed by up to 1.8 % without these units, 1.2 % with them (about 0.1σ).
    """
    if noise != "gaussian" or not (np.isfinite(noise_level) and noise_level > 0):
        return 1.0
    return float(noise_level) / _FIT_NOISE


def _refined_width(img, good, cat, bg_map, psf, shape_vals, sigma, fit_kw):
    """The PSF's width measured again on a catalog (free widths, sources above S/N 20; see
    `_measured_width`), or `None` when it moved by no more than `_WIDTH_TOL` from `sigma`.

    (Only sources above S/N 20 measure it: a catalog's faint ones, its hidden neighbours and
    noise peaks among them, pulled it 1-2 % low in faint fields.)"""
    ok = np.isfinite(cat["x"]) & np.isfinite(cat["y"]) & np.isfinite(cat["flux"])
    src = dict(x=cat["x"][ok], y=cat["y"][ok], flux=cat["flux"][ok], background_map=bg_map)
    widths, *_ = _fit_all(img, good, src, psf, shape_vals, free_shape=True, **fit_kw)
    refined = _measured_width(widths, psf, faint=False)
    if refined is None or _shape_change(refined, sigma) <= _WIDTH_TOL:
        return None
    return refined


def _width_sources(cat, snr=(20.0, 10.0, -np.inf), enough=30):
    """`(N,)` the converged sources whose fitted widths measure the PSF's: those above the first
    S/N of `snr` that `enough` sources pass; when none does, the first that half of the
    converged sources pass (the last, if none).

    In a field of faint stars the few above S/N 20 are mostly blends, wider than the PSF: at S/N
    17 and 28 a star (256² fields of 150), 0–10 of them gave σ = 2.10–2.29 for a true 2, and
    fluxes 11 % high; above S/N 10 (40–130 sources) the core median is 1.99–2.00. At S/N 10 a
    star (with its width free, 6–7) the few above S/N 10 are blends again: 5 of 139 gave
    σ = 1.66 for a true 1.5, and fluxes 15 % high; all 139 give 1.50.
    """
    converged = cat["status"] == 0
    tiers = [converged & (cat["snr"] > s) for s in snr]
    for ok in tiers:
        if ok.sum() >= enough:
            return ok
    half = [ok for ok in tiers if 2 * ok.sum() >= converged.sum()]
    return half[0] if half else tiers[-1]


def _measured_width(cat, psf, faint=True):
    """The PSF's width from a fit of every source's own width (`_width_sources`, the core
    median of their widths): one number, `(sigma_x, sigma_y)` for an elliptical PSF, or
    `(sigma_x, sigma_y, angle)` for a rotated one (from its covariance's parts); `None`
    with fewer than 3 sources to measure it (`faint=False`: fewer than 30 above S/N 20, which
    are then the only ones used)."""
    ok = _width_sources(cat) if faint else _width_sources(cat, snr=(20.0,))
    if ok.sum() < 3 or not faint and ok.sum() < 30:
        return None
    if "angle" in psf.params:  # (the core median of each part of the spots' covariance)
        parts = ellipse_covariance(cat["sigma_x"][ok], cat["sigma_y"][ok], cat["angle"][ok])
        return tuple(float(v) for v in ellipse_from_covariance(*map(_core_median, parts)))
    sx, sy = _core_median(cat["sigma_x"][ok]), _core_median(cat["sigma_y"][ok])
    return (sx, sy) if "sigma_x" in psf.params else math.sqrt(sx * sy)


def _core_median(v, k=2.0):
    """Median of the core of `v`: the values within `k` robust standard deviations (1.4826 MAD)
    of it, iterated to a fixed point.

    Unresolved blends fit wider than the PSF and make an upper tail of fitted widths: at 0.3
    stars/FWHM² (σ = 2) about half of them, which moved the plain median to 2.09; the core's
    median is 2.00.
    """
    m = float(np.median(v))
    for _ in range(20):
        mad = 1.4826 * float(np.median(np.abs(v - m)))
        core = v[np.abs(v - m) <= k * mad]
        new = float(np.median(core)) if core.size else m
        if new == m:
            break
        m = new
    return m


def _isolated_flux_error(cat, noise, noise_level):
    """`(N,)` the flux error each source would have alone (a lower bound in a crowd)."""
    area = 4 * math.pi * cat["sigma_x"] * cat["sigma_y"]
    if noise == "poisson":
        return np.sqrt(np.maximum(cat["flux"], 0) + area * np.maximum(cat["background"], 0))
    return noise_level * np.sqrt(area)


def _model_error(cat, width, psf_error):
    """`(N,)` the flux error each source inherits from its neighbours' PSF error: `psf_error`
    times the least-squares flux of their light under its PSF, `Σ_j f_j exp(-d_ij² / 4σ²)`
    (Gaussians of width σ). A PSF off by a fraction of itself leaves that much light to be
    taken for a faint neighbour; next to a star of 10⁶ photons it dwarfs the photon noise."""
    out = np.zeros(cat["x"].size)
    ok = np.isfinite(cat["x"]) & np.isfinite(cat["y"]) & np.isfinite(cat["flux"])
    if psf_error <= 0 or ok.sum() < 2:
        return out
    idx = np.where(ok)[0]
    x, y, f = cat["x"][idx], cat["y"][idx], np.maximum(cat["flux"][idx], 0.0)
    a, b = _pairs_within(x, y, 4.0 * width)
    w = np.exp(-((x[a] - x[b]) ** 2 + (y[a] - y[b]) ** 2) / (4.0 * width * width))
    light = np.bincount(a, w * f[b], idx.size) + np.bincount(b, w * f[a], idx.size)
    out[idx] = psf_error * light
    return out


def _prune(cat, sigma, min_snr, shape, protect, floor_err):
    """Which sources to keep: significant ones, not merged into a brighter neighbour.

    Only the least significant source of a close group goes in one round: when a fit splits
    one blend over three sources, all three look insignificant until one is removed. `protect`
    `(N,)` marks weak sources whose pair with a neighbour passed the likelihood-ratio test.
    A source whose error is unknown (a singular fit) is judged by `floor_err`, the error it
    would have alone: below `min_snr` even then, it is not significant.
    """
    x, y = cat["x"], cat["y"]
    snr = np.where(np.isfinite(cat["snr"]), cat["snr"], cat["flux"] / floor_err)
    keep = np.isfinite(x) & np.isfinite(cat["flux"]) & (cat["flux"] > 0)
    # A source that drifted off the image is not measured by it.
    h, w = shape
    keep &= (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
    weak = np.where(keep & np.isfinite(snr) & (snr < min_snr) & ~protect)[0]
    if weak.size:
        a, b = _pairs_within(x[weak], y[weak], 2.5 * sigma)
        near = [[] for _ in weak]
        for i, j in zip(a, b, strict=True):
            near[i].append(j)
            near[j].append(i)
        protected = np.zeros(weak.size, bool)
        for i in np.argsort(snr[weak]):
            if not protected[i]:
                keep[weak[i]] = False
                protected[near[i]] = True
    # Two sources within half a sigma are one source the fit split; keep the brighter.
    idx = np.where(keep)[0]
    if idx.size > 1:
        a, b = _pairs_within(x[idx], y[idx], 0.5 * sigma)
        rank = np.empty(idx.size, int)
        rank[np.argsort(-cat["flux"][idx], kind="stable")] = np.arange(idx.size)
        involved = np.unique(np.concatenate([a, b]))
        # Brightest first: a source goes if a brighter one that stays is that close.
        for i in involved[np.argsort(rank[involved])]:
            partners = np.concatenate([b[a == i], a[b == i]])
            if np.any(keep[idx[partners[rank[partners] < rank[i]]]]):
                keep[idx[i]] = False
    return keep


def _warranted(img, good, cat, width, min_snr, shape, only=None, sky=None, wings=None, **test_kw):
    """`(N,)` True for weak sources in a close group that the likelihood-ratio test upholds.

    `only` `(N,)`: test just these sources (the others get False). `wings`: the PSF's measured
    wings (`_wings.Wings`), part of every source's light, or `None`.

    A source with `flux / flux_err < min_snr` within 2 PSF widths of others is judged by a
    likelihood-ratio test (`nested_test`) instead: it and its (up to 3) closest neighbours
    against those neighbours alone, all refitted. In a pair closer than a PSF width the fluxes
    are strongly anti-correlated, so each part looks weak even when the pair is beyond doubt.
    """
    n = cat["x"].size
    out = np.zeros(n, bool)
    ok = np.isfinite(cat["x"]) & np.isfinite(cat["flux"]) & (cat["flux"] > 0)
    weak = ok & np.isfinite(cat["snr"]) & (cat["snr"] < min_snr)
    weak = np.where(weak if only is None else weak & only)[0]
    if weak.size == 0 or ok.sum() < 2:
        return out
    # Each weak source's (up to 3) closest usable neighbours within 2 widths, nearest first;
    # closer than half a width the merge rule of `_prune` decides.
    nb, near, d2 = closest_neighbours(cat["x"], cat["y"], weak, 2 * width, 3, usable=ok)
    tested = near[:, 0] & (d2[:, 0] >= (0.5 * width) ** 2)
    i, nb, near = weak[tested], nb[tested], near[tested]
    if i.size == 0:
        return out
    members = np.column_stack([i, nb])  # (C, 4): the weak source, then its neighbours
    valid = np.column_stack([np.ones(i.size, bool), near])
    p = {k: np.where(valid, cat[k][members], 0.0) for k in ("x", "y", "flux")}
    larger = dict(p, valid=valid)
    smaller = {k: np.column_stack([v[:, 1:], v[:, :1]]) for k, v in larger.items()}
    smaller["valid"][:, -1] = False
    model = _light({k: v[ok] for k, v in cat.items()}, shape, test_kw["psf"], wings)
    gain, _, _ = nested_test(
        img, good, model, p, smaller, larger, np.nan_to_num(cat["background"][i]), sky=sky,
        **test_kw,
    )  # fmt: skip
    out[i[gain > PAIR_THRESHOLD]] = True
    return out


def _light(cat, shape, psf, wings):
    """`(H, W)` the light of a catalog's sources: their Gaussians, plus their measured wings."""
    model = model_image(cat, shape, psf=psf)
    if wings is not None:
        model += render_wings(wings, cat["x"], cat["y"], cat["flux"], shape)
    return model


def _measured_wings(img, good, cat, bg_map, psf, width, wings):
    """The PSF's wings (`_wings.Wings`) measured on the residual of the catalog `cat` (whose
    wings, if known, are `wings`) on the smooth background `bg_map`; `None` when there are
    none that matter (`_wings_matter`), known before or not."""
    ok = np.isfinite(cat["x"]) & np.isfinite(cat["flux"])
    cat = {c: v[ok] for c, v in cat.items()}

    def measure(previous, robust=True):
        residual = img - _light(cat, img.shape, psf, previous) - bg_map
        return measure_wings(residual, good, cat["x"], cat["y"], cat["flux"], cat["snr"], width,
                             previous=previous, robust=robust)  # fmt: skip

    if wings is None:  # (a first look, by ring means: 17 ms at 0.02 stars/FWHM² on 512², not 40)
        found = measure(None, robust=False)
        if found is None or not _wings_matter(found):
            return None
    found = measure(wings)
    if found is None:
        return wings
    # Each star's sky comes from its outer rings, where its neighbours' wings are until they
    # are known: measured again with them subtracted, until it settles (Moffat β = 3 at 0.1
    # stars/FWHM²: 0.06 of the light, then 0.10, 0.12). Only once found: the first look is
    # judged as it is (measured again, on a Gaussian crowd whose first width was 12 % wide it
    # grew from 0.07 to 0.24 of the light).
    for _ in range(_WINGS_AGAIN):
        again = measure(found)
        if again is None:
            break
        settled = abs(again.light - found.light) < _WINGS_SETTLED
        found = again
        if settled:
            break
    if not _wings_matter(found):
        # (gone: the first look's ring means passed and the ring medians, settled, do not. On
        # 1024² Gaussian fields at 0.1 stars/FWHM² the first look, over 200 stars, passed, and
        # measured again after the following fits the wings came out at 0.3-0.7 % of the
        # light; kept, they took a warm call from 3 to 22 s and warned of "0 %" wings.)
        return None
    return found


def _joint_wings(img, good, cat, bg_map, psf, width, wings, again=_WINGS_AGAIN):
    """The PSF's wings in a crowd: measured on the catalog `cat`'s residual, all sources at once
    (`_wings.measure_wings_jointly`), with the smooth background estimated again with them in
    the model (on the pixels at least 1 FWHM from every source, about its first estimate
    smoothed: `_smoothed`), `again` times at most, until they settle. `wings`: those known
    (measured again from them), or `None` (a first look on `bg_map`, the background of the
    Gaussians alone). `(wings, background)`, or `None` when there are none that matter
    (`_wings_matter`).

    (Each background fitted without the wings takes up their diffuse light, and each
    measurement on it is biased low: on Moffat crowds of β = 3 at 0.1-0.2 stars/FWHM² the first
    look measured 0.10-0.11 of the light, then 0.17, 0.20, 0.22, 0.23. Measured again by each
    star's rings, `_measured_wings`, they settled at 0.19 at 0.1 but at 0.2 drifted down to
    nothing, as each star's sky holds its neighbours' wings and false neighbours. The model
    misses the PSF's core, and a background estimated there too took up that light: on a 512²
    Moffat field of β = 3 at 0.1 stars/FWHM² it stood 0.16 counts high and the wings settled at
    0.205 of the light against 0.213 measured on the true background; away from the cores, 0.04
    counts and 0.213.)

    Gaussian fields (σ = 2, 0.02-0.3 stars/FWHM², two 256² fields each, their finished
    catalogs) measured -0.01 to +0.01 of the light at significance 7-55 (19 knots); Moffat
    crowds of 0.1-0.2 stars/FWHM² 0.06 (β = 4.5) to 0.14 (β = 2.5) at 400-1270.
    """
    ok = np.isfinite(cat["x"]) & np.isfinite(cat["flux"])
    cat = {c: v[ok] for c, v in cat.items()}
    gaussians = _light(cat, img.shape, psf, None)
    free = good & ~cores_of(cat["x"], cat["y"], img.shape, width)
    if free.sum() < _WINGS_FREE * good.sum():
        free = good

    def measure(bg):
        return measure_wings_jointly(img - gaussians - bg, good, cat["x"], cat["y"],
                                     cat["flux"], width)  # fmt: skip

    found = wings
    if found is None:
        found = measure(bg_map)
        if found is None or not _wings_matter(found):
            return None
    ref = None
    for _ in range(again):
        light = gaussians + render_wings(found, cat["x"], cat["y"], cat["flux"], img.shape)
        if ref is None:  # (the background's shape, once: see `_smoothed`)
            first = estimate_background(img - light, free, sigma=width)
            ref = _smoothed(first, max(16, math.ceil(8.0 * width)))  # (`estimate_background`'s box)
        bg_map = ref + estimate_background(img - light - ref, free, sigma=width)
        measured = measure(bg_map)
        if measured is None:
            return None
        settled = abs(measured.light - found.light) < _WINGS_SETTLED
        found = measured
        if settled:
            break
    return (found, bg_map) if _wings_matter(found) else None


def _smoothed(image, scale):
    """`(H, W)` `image` smoothed by a Gaussian of σ `scale` pixels about its best plane, which
    it keeps (no gradient is rounded off at the edges).

    `_joint_wings` estimates the background about its first estimate smoothed so: the 3×3
    median over `estimate_background`'s mesh of boxes keeps a box that holds a source's misfit
    light out of the map, but not where the background curves by more than a box's noise from
    box to box (the median of a slope is its middle box). Under a Gaussian hump of 200 counts
    and width 100 px on 512², Moffat stars (β = 3, 0.1 stars/FWHM²) had their wings settle at
    0.175 of the light against 0.216 measured on the true background, their fluxes -4.2 %.
    """
    h, w = image.shape
    y, x = np.arange(h) - 0.5 * (h - 1), np.arange(w) - 0.5 * (w - 1)
    slope_y = np.dot(y, image.mean(1)) / max(np.dot(y, y), 1.0)
    slope_x = np.dot(x, image.mean(0)) / max(np.dot(x, x), 1.0)
    plane = image.mean() + slope_y * y[:, None] + slope_x * x[None, :]
    return plane + scipy.ndimage.gaussian_filter(image - plane, scale, mode="nearest")


def _crowding(cat, good, width) -> float:
    """Sources of `cat` per FWHM² of the unmasked image (`width`: the PSF's σ)."""
    return np.isfinite(cat["flux"]).sum() * (_FWHM * width) ** 2 / max(int(good.sum()), 1)


def _wings_matter(wings):
    """Whether measured wings (`_wings.Wings`) are the PSF's: they add light, at least
    `_WINGS_LIGHT` of the Gaussians', and are far beyond their errors.

    First looks (ring means) on Gaussian fields (σ = 2, 0.02-0.3 stars/FWHM², S/N 70 and 700,
    σ given or not) measured -0.29 to +0.02 of the light (negative in crowds, where neighbours
    not yet found lift each star's outer rings), the positive ones at significance 3-14 (19
    rings); a faint field (S/N 17), whose few stars above S/N 20 were blends, +0.18 at 62.
    Moffat PSFs of β = 2.5-4.5 at 0.02-0.05 stars/FWHM²: 0.05-0.20 at 270-540.
    """
    enough = _WINGS_SIGNIFICANCE * wings.knots.size
    return wings.light > _WINGS_LIGHT and wings.significance > enough


def _with_wings(cat, wings):
    """The catalog's fluxes (and errors, peaks) with its sources' measured wings: each source's
    light is its Gaussian's times `1 + wings.light`."""
    total = 1.0 + wings.light
    return dict(cat, flux=cat["flux"] * total, flux_err=cat["flux_err"] * total,
                amplitude=cat["amplitude"] + cat["flux"] * wings.values[0])  # fmt: skip


def _light_change(src, cat, width, noise_level):
    """`(N,)` how far each source's light moved between its start `src` and its fit `cat`: the
    squared norm of the difference of the two Gaussians over the noise (to first order; 0 on
    an image without noise, where no scale says what a change is)."""
    if not (np.isfinite(noise_level) and noise_level > 0):
        return np.zeros(cat["x"].size)
    f = 0.5 * (np.abs(src["flux"]) + np.abs(cat["flux"]))
    d2 = (cat["x"] - src["x"]) ** 2 + (cat["y"] - src["y"]) ** 2
    norm = (cat["flux"] - src["flux"]) ** 2 + f**2 * d2 / (2 * width**2)
    return np.nan_to_num(norm / (4 * math.pi * width**2 * noise_level**2), nan=np.inf)


def _changed_area(model, reference, tol, reach):
    """`(H, W)` True within `reach` pixels (a square) of where `model` and `reference` differ
    by more than `tol`; `None` when there is no `reference` (everything changed)."""
    if reference is None:
        return None
    a = (np.abs(model - reference) > tol).astype(np.uint8)
    a = scipy.ndimage.maximum_filter1d(a, 2 * reach + 1, axis=0, mode="constant")
    return scipy.ndimage.maximum_filter1d(a, 2 * reach + 1, axis=1, mode="constant").view(bool)


def _residual_peaks(img, good, cat, model, bg_map, width, stars, psf_error, noise_level, det_kw,
                    area=None):  # fmt: skip
    """Hidden neighbours: significant peaks left in the residual of the catalog `cat` (whose
    light is `model`, on the smooth background `bg_map`), not within a PSF width of one of its
    sources. `area` `(H, W)`: search only there (where the residual changed since the last
    search; elsewhere that search's peaks are still the answer).

    **Returns:** `(new, near_new)`: the new detections, and `(N,)` True for the catalog's
    sources within 2 widths of a new one.
    """
    shape = img.shape
    new = detect(img - model - bg_map, width, background=np.zeros(shape), area=area, **det_kw)
    new = clear_rims(new, stars, 1.0)  # the rim itself (the fit there is poorest)
    if psf_error > 0 and new["x"].size:  # the residual's noise includes the PSF error
        r = np.clip(np.rint(new["y"]).astype(int), 0, shape[0] - 1)
        c = np.clip(np.rint(new["x"]).astype(int), 0, shape[1] - 1)
        lifted = np.hypot(noise_level, psf_error * model[r, c]) / noise_level
        threshold = det_kw["threshold"]
        level = DEFAULT_THRESHOLD if threshold is None else threshold
        new = {k: v[new["snr"] / lifted >= level] for k, v in new.items()}
    near_new = np.zeros(cat["x"].size, bool)
    if new["x"].size and cat["x"].size:  # (close pairs only: no dense new × catalog matrix)
        n_new = new["x"].size
        a, b = _pairs_within(np.concatenate([new["x"], cat["x"]]),
                             np.concatenate([new["y"], cat["y"]]), 2 * width)  # fmt: skip
        a, b = np.minimum(a, b), np.maximum(a, b)  # (a pair's order is arbitrary)
        cross = (a < n_new) & (b >= n_new)
        i, j = a[cross], b[cross] - n_new
        d2 = (new["x"][i] - cat["x"][j]) ** 2 + (new["y"][i] - cat["y"][j]) ** 2
        apart = np.ones(n_new, bool)
        apart[i[d2 <= width**2]] = False
        new = {k: v[apart] for k, v in new.items()}
        near_new[j[apart[i]]] = True
    return new, near_new


def _ellipse_start(width, ratio, angle):
    """`(sigma_x, sigma_y, angle)` of a rotated Gaussian of mean width `width` whose long axis
    is `ratio` times its short one, at `angle` degrees from x (`_elongation.axis_ratio`)."""
    long_, short = width * math.sqrt(ratio), width / math.sqrt(ratio)
    # (its `sigma_x` axis points along (cos a, -sin a): on the long axis for a = -angle)
    parts = ellipse_covariance(long_, short, -math.radians(angle))
    return tuple(float(v) for v in ellipse_from_covariance(*parts))


def _first_detections(
    img, good, *, psf, sigma, threshold, spikes, saturation, offset, meta, noise
):  # fmt: skip
    """Noise, background and detections for the first fit, with the image's bad pixels masked:
    fill (areas of one exact value, `_fill.find_fill`), saturated pixels (at or above
    `saturation`, in the units of the image before `offset` was subtracted from `img`; `None`:
    found) and pixels sharper than the PSF; each masked hole in a star is seeded at its centre.
    Warns when the spots are elongated and the `psf` round (`_elongation`). Updates `meta`.

    **Returns:** `(good, noise_level, background_map, detections, sigma, free_shape,
    saturated_stars)`, or `None` when every valid pixel holds one value, or `sigma` is to be
    estimated and nothing was detected.
    """
    fill = find_fill(img, good)
    if fill.any():
        meta["n_fill"] = int(fill.sum())
        _warn(fill_message(meta["n_fill"]))
        good = good & ~fill
    values = img[good]
    if values.min() == values.max():  # (no noise to measure, nothing to find)
        _warn(f"every valid pixel holds {values[0]:g}: a blank frame, no sources")
        return None
    noise_level = estimate_noise(img, good)
    if saturation is None:
        level = saturation_level(img, good, noise_level, offset)
    else:
        level = float(saturation) - offset
    saturated = np.zeros(img.shape, bool)
    if level is not None and np.isfinite(level):
        saturated = good & (img >= level)
    if saturated.any():
        meta.update(saturation=level + offset, n_saturated=int(saturated.sum()))
    good = good & ~saturated
    guess = _mean_width(sigma) if sigma is not None else 2.0
    bg_map = estimate_background(img, good, sigma=guess)
    det_kw = dict(mask=good, threshold=threshold, noise=noise_level)
    det = detect(img, guess, background=bg_map, **det_kw)
    free_shape = False
    if sigma is None:
        stars = seed_holes(img, good, bg_map, noise_level, guess)
        bright = clear_rims(det, stars, 2 * guess)  # a hole's rim is no star to measure
        if bright["x"].size == 0 and stars["x"].size == 0:
            return None
        if bright["x"].size:
            guess = estimate_sigma(img, bright["x"], bright["y"], background=bg_map, mask=good)
        free_shape = True  # the first fit measures every width; their median is the PSF's
        sigma = guess
    found = None
    if spikes:
        found = find_spikes(img, _axis_widths(sigma), noise_level, mask=good, background=bg_map,
                            shot=noise == "poisson")  # fmt: skip
    if found is not None and found.any():
        meta["spikes"] = np.argwhere(found)
        _warn(spike_message(len(meta["spikes"])))
        good = good & ~found
        det_kw["mask"] = good
    if free_shape or found is not None and found.any():
        bg_map = estimate_background(img, good, sigma=guess)
        det = detect(img, guess, background=bg_map, **det_kw)
    width = _mean_width(sigma)
    stars = seed_holes(img, good, bg_map, noise_level, width)
    spots = axis_ratio(img, det["x"], det["y"], width, background=bg_map, noise=noise_level,
                       mask=good)  # fmt: skip
    if spots[2]:  # (else it stays None: no spot could be measured)
        meta["elongation"] = dict(zip(("ratio", "angle", "n", "z"), spots, strict=True))
    if free_shape and "angle" in psf.params and spots[2] and np.isfinite(spots[0]):
        # The first fit starts from the isolated spots' ellipse: a rotated Gaussian's angle
        # moves nothing while its two widths are equal, so from a round start only the noise
        # turns each fit (on 284 spots tilted by 45°, with no start, that still gave the shape
        # within 0.01 px and Jaccard 0.986; this start does not rely on it).
        sigma = _ellipse_start(width, spots[0], spots[1])
    held = "angle" in psf.params and not free_shape and np.size(sigma) < 3
    message = elongation_message(*spots, psf.params, angle_held=held)
    if message:
        _warn(message)
    if saturated.any():
        _warn(saturation_message(int(saturated.sum()), level + offset))
    if stars["x"].size:
        # Peak finding answers a hole's rim several times (the masked core blinds the
        # narrow kernel); real neighbours there come back from the residual.
        det = clear_rims(det, stars, 2 * _mean_width(sigma))
        extra = {k: stars[k] if k in stars else np.full(stars["x"].size, np.inf) for k in det}
        det = {k: np.concatenate([det[k], extra[k]]) for k in det}
    return good, noise_level, bg_map, det, sigma, free_shape, stars


def fit_image(
    image,
    *,
    psf="gaussian",
    sigma=None,
    background: str = "constant",
    noise: str = "gaussian",
    mask=None,
    threshold: float | None = None,
    offset: float = 0.0,
    min_snr: float = 5.0,
    rounds: int = 3,
    max_sources: int = 16,
    max_window: int | None = None,
    split: bool = True,
    spikes: bool = True,
    saturation: float | None = None,
    psf_error: float = 0.01,
    psf_wings: bool = True,
    progress_bar: bool | None = None,
) -> Catalog:
    """Find and measure every spot or star of an image, fitting crowded ones jointly.

    Sources are detected on the PSF-matched-filtered image (threshold in units of the filtered
    image's noise, from a robust MAD estimate), grouped where their light overlaps into regions
    of at most `max_sources` sources and `max_window` pixels a side (the light of neighbours
    just outside a region is known light there, from their own region's fit), and all regions
    are fitted in batches, each a sum of Gaussians plus one shared background; the field is
    fitted twice before anything is judged, so that every neighbour's light comes from its own
    fit. Then, for up to `rounds` rounds, the residual image is searched for hidden neighbours
    (after the first search, only where the model changed since the last one); with `split`,
    sources whose residual shows the quadrupole of an unresolved pair are tested as two
    sources against one (a likelihood-ratio test, see `crowdfit._split`); sources that are not
    significant (`flux / flux_err < min_snr`; for a weak source within 2 PSF widths of others,
    the likelihood-ratio test of it against those neighbours alone) or that merged into a
    brighter one (closer than half a width) are dropped; and the regions near any change are
    refitted, as are those that held a neighbour's light that its own fit then moved (a fit
    that another fit or search follows stops after 20 iterations; a region it leaves
    unconverged goes on in the next pass). Pairs down to about 0.7 σ apart are resolved at
    S/N ~ 70 each.

    **Arguments:**

    - `image`: `(H, W)` pixel values. Non-finite pixels are masked (with a warning).
    - `psf`: `"gaussian"`, `"integrated_gaussian"`, `"elliptical_gaussian"`,
      `"integrated_elliptical_gaussian"` or `"rotated_gaussian"`. A round PSF takes each
      elongated spot for an unresolved pair (σ = 1.6 × 2.6 at S/N 70: 203 sources for 100; even
      2.0 × 2.1 at S/N 700: 134), and an elliptical one holds its axes along x and y, so the
      isolated spots' shape is measured first (`crowdfit._elongation`; `meta["elongation"]`: a
      dict of the axis ratio, angle, spots measured and coherence `z`), and a warning says
      when it is coherently elongated beyond what the PSF model holds. `"rotated_gaussian"`
      fits an ellipse at any angle (the catalog gains an `angle` column): on 256² fields of
      284 spots of σ = 1.6 × 2.6 tilted by 0.6 rad (0.1 spots/FWHM², `benchmarks/elongated.py`)
      it found 282 (Jaccard 0.988, median flux error −0.1 %, shape estimated), where
      `"gaussian"` and `"elliptical_gaussian"` returned 534 and 528 (0.16). Its fits take
      automatic derivatives over each whole window: 3.7–4.5× the time of
      `"elliptical_gaussian"` on the same spots along the axes, on a CPU.
    - `sigma`: the PSF width in pixels, one number or `(sigma_x, sigma_y)` (for
      `"rotated_gaussian"` also `(sigma_x, sigma_y, angle)`, `angle` in radians as
      `get_psf("rotated_gaussian")` takes it; a pair is angle 0), shared by all sources and
      held fixed. `None` (default) estimates it from the data: from isolated bright
      detections, then refined by fitting every source's width once and taking the median of
      the core of those widths (blends fit wider; see `_core_median`; for a rotated PSF, of
      each part of their covariance, the first fit starting from the isolated spots'
      ellipse). In a crowd the first
      fit still holds hidden neighbours and pairs as one source each, so the width is measured
      again (sources above S/N 20) once the first residual search has found them, and when
      that moves it by more than 0.5 % every region is refitted with the new width
      (`meta["sigma_first"]`: the first estimate; with `rounds=0`, on the finished catalog,
      and the image measured again). On 512² fields at 0.2 / 0.3 stars/FWHM² that took σ from
      1.98 / 2.01-2.06 to 1.995 / 1.990 (true 2) and the median flux error from -1.7 / +2.5 %
      to about -0.5 / -1 %, for about 1.5× the time of a call with σ given (measured again
      from scratch at the end, as before, it took 2.2-3.3×, for the same Jaccard index within
      ±0.004): pass `sigma` when you know it.
    - `background`: `"constant"` or `"plane"`, per region, on top of a smooth background map
      of the whole image. The map gives each region its starting level; where it changes by
      more than the noise across a region's window (a gradient steeper than about 1/30 of the
      noise per pixel), its shape there is part of the model and the region fits the level on
      top (`crowdfit._background.sky_shape`). Gradients of 0.5–2 counts per pixel at noise 5
      then give the Jaccard index of a flat field (0.955–0.962 against 0.960 on 256² fields
      up to 0.3 stars/FWHM²; a constant alone gave 0.93 / 0.61 / 0.26).
    - `noise`: `"gaussian"` or `"poisson"` (counts; subtract a camera `offset`).
    - `mask`: `(H, W)` True where a pixel counts.
    - `threshold`: detection threshold in σ of the filtered image (default 5).
    - `min_snr`: least `flux / flux_err` for a source to be kept.
    - `rounds`: rounds of residual search and refit after the first fit. Very dense fields gain
      from more: at 0.3 stars/FWHM², 6 rounds raised the Jaccard index by 0.007–0.011 for about
      30 % more time.
    - `max_sources`, `max_window`: bounds on a region (members, pixels a side). `max_window`
      `None` (default) scales with the PSF: 48 up to σ = 3, then 16σ rounded up to a multiple
      of 16 (`crowdfit._group.default_max_window`; with σ estimated, from the estimate). Bigger
      regions hold fewer neighbours as known light at their edges and resolve crowds better.
      The defaults were 8 sources and 32 pixels (at σ = 2) until the compiled programs were
      kept on disk (their bigger region shapes compile more programs); on three 512² fields
      each, run in turn, 16 and 48 raised the Jaccard index from 0.905 / 0.905 / 0.893 to
      0.934 / 0.929 / 0.931 at 0.3 stars/FWHM² and from 0.954 / 0.949 / 0.951 to
      0.954 / 0.963 / 0.958 at 0.2, halved the false sources at 0.3, and brought the median
      flux error from −0.5 % to −0.1 % there, for 0–18 % more warm time. `max_sources=8,
      max_window=32` is a little faster on dense fields.
    - `split`: test sources for unresolved pairs and close pairs by likelihood ratio (default);
      `False` judges every source by `flux / flux_err` alone (faster; close pairs merge).
      `rounds=1, split=False` is the fast end of the dial: on the crowded-field benchmark
      (512², 0.02–0.3 stars/FWHM²) 1.4–1.8× faster, Jaccard 0.996–0.806 against the default's
      1.000–0.933 (`benchmarks/crowded_field.py`).
    - `spikes`: mask the pixels sharper than any PSF of the image's width can make (hot pixels,
      hot columns, cosmic-ray hits), with a warning that counts them (default; see
      `crowdfit._spikes.find_spikes`). Unmasked, each bright one becomes a false source or adds
      its counts to a star. Their `(row, col)` positions are in `meta["spikes"]`.
    - `saturation`: the pixel value at which the detector saturates. Pixels at or above it are
      masked, with a warning, and each saturated star is seeded at its plateau's centre and
      fitted on its unsaturated wings (see `crowdfit._saturation`). `None` (default) takes the
      image's maximum when at least two connected pixels hold exactly that value (a clipped
      plateau; four for integer counts below a converter's limit) far above the background;
      `np.inf` turns this off. `meta["saturation"]` holds
      the level used (or `None`), `meta["n_saturated"]` the number of pixels masked.
    - `psf_error`: the PSF model's error as a fraction of each source's light (DAOPHOT's
      "profile error"; default 1 %). No real PSF is exactly Gaussian, and next to a bright
      star the mismatch is far above the photon noise and would be taken for faint neighbours.
      It enters the significance of residual peaks and split candidates, and the error each
      source inherits from its neighbours (`_model_error`) when sources are judged; the
      reported `flux_err` and `snr` are the fit's own. `0` trusts the PSF exactly (simulations).
    - `psf_wings`: measure the light the Gaussians miss (default). Stars' PSFs are rarely
      Gaussian: a Moffat one holds 10-30 % of its light in wings that a Gaussian fit leaves in
      the residual, where each bright star's wings are taken for a ring of false neighbours,
      and out of its flux. After the second fit, the residual about bright, isolated stars
      gives one radial profile per unit flux (`crowdfit._wings.measure_wings`). When it adds
      at least 2 % of the light, far beyond its errors, it is part of every source's light
      from then on (known light in every fit and test, measured again after each fit), each
      `flux` includes it, `meta["wings"]` holds it, `model_image` draws it, σ (if estimated)
      is not measured again, and a warning says so. On Moffat fields of β = 3
      (`benchmarks/psf_shape.py`): 133 stars of S/N 700 at 0.02 stars/FWHM² came out as 133
      sources (895 without), fluxes -1.8 % (-20 %); at S/N 70 and 0.02-0.05 stars/FWHM²,
      Jaccard 0.99 (0.95-0.98), fluxes -0.0 to -1.4 % (-20 %). The light beyond 3 FWHM, where
      each star's sky is taken, is not counted (-1 to -4 % for β = 2.5). In crowds few stars
      are isolated and their outer rings hold their neighbours' wings: there the wings are
      measured on the residual of the finished catalog (or, found by the first look on a
      catalog of 0.07 sources/FWHM² or more, of each fit), all sources at once, on the pixels
      at least 1 FWHM from every source (`crowdfit._wings.measure_wings_jointly`, with the
      smooth background estimated again with them; see `_joint_wings`), and then every
      region is refitted with them. Moffat fields of 0.1 stars/FWHM² (256², β = 2.5 / 3 /
      4.5, two each): median fluxes -0.4 to +2.9 % (-17 / -13 / -8.5 % before any joint
      measurement: the wings too weak, or on one field of each pair not found), Jaccard
      0.97-0.99; at 0.2, -2.4 to +0.4 % (-19 %, none found; measured before the joint look
      left out the image's edge), Jaccard 0.94-0.96 (0.82); on 1024², -2.1 to -0.3 %. No
      Gaussian field tried (0.02-0.3 stars/FWHM², S/N 70 and 700) found any; on them the late
      look costs one joint measurement (0.2 s on 512² at 0.1-0.3 stars/FWHM², 4-10 % of a
      call; skipped below 0.07 sources/FWHM²).
    - `progress_bar`: show progress (default: on a terminal).

    **Returns:** a `Catalog`, one row per source, ordered by `y`, then `x`.

    >>> import crowdfit
    >>> image, truth = crowdfit.simulate_field((64, 64), 10, seed=1)
    >>> cat = crowdfit.fit_image(image, sigma=2.0)
    >>> len(cat), crowdfit.match(truth, cat).recall
    (10, 1.0)
    """
    psf = get_psf(psf)
    if psf.params is None or not set(psf.params) <= {"x", "y", "flux", *_SHAPE_NAMES}:
        raise ValueError(
            f"fit_image supports the built-in Gaussian PSFs, not {psf.name!r}; "
            "use fit_regions for a PSF of your own"
        )
    if sigma is not None:
        s = np.asarray(sigma, float).ravel()
        rotated = "angle" in psf.params
        if (s.size not in ((1, 2, 3) if rotated else (1, 2)) or not np.all(np.isfinite(s))
                or np.any(s[:2] <= 0)):  # fmt: skip
            raise ValueError(
                "sigma must be a positive number or (sigma_x, sigma_y)"
                + (", or (sigma_x, sigma_y, angle)" if rotated else "")
                + f", got {sigma}"
            )
        sigma = float(s[0]) if s.size == 1 else tuple(float(v) for v in s)  # ([2.0] is 2.0)
    if threshold is not None and not (np.ndim(threshold) == 0 and 0 < threshold < np.inf):
        raise ValueError(f"threshold must be a positive number (of noise σ), got {threshold}")
    if not (np.ndim(min_snr) == 0 and min_snr >= 0):
        raise ValueError(f"min_snr must be a number >= 0, got {min_snr}")
    if not (np.ndim(offset) == 0 and np.isfinite(offset)):
        raise ValueError(f"offset must be a finite number, got {offset}")
    if background not in ("constant", "plane"):
        raise ValueError(f"unknown background {background!r}: expected 'constant' or 'plane'")
    if noise not in ("gaussian", "poisson"):
        raise ValueError(f"unknown noise {noise!r}: expected 'gaussian' or 'poisson'")
    if not (np.ndim(psf_error) == 0 and 0 <= float(psf_error) < 1):
        raise ValueError(f"psf_error must be a fraction in [0, 1), got {psf_error}")
    psf_error = float(psf_error)
    if saturation is not None and not (np.ndim(saturation) == 0 and float(saturation) > 0):
        raise ValueError(f"saturation must be a positive number (np.inf: none), got {saturation}")
    if rounds < 0 or max_sources < 1 or (max_window is not None and max_window < 8):
        raise ValueError("rounds must be >= 0, max_sources >= 1 and max_window >= 8 (or None)")
    img, good = _check_image(image, mask)
    img = img - offset
    shape = img.shape
    meta = dict(psf=psf.name, noise=noise, shape=shape, rounds=0, n_regions=0, splits=0,
                region_fits=0, spikes=np.zeros((0, 2), int), saturation=None,
                n_saturated=0, n_fill=0, elongation=None)  # fmt: skip
    if not good.any():
        warnings.warn(ALL_MASKED, stacklevel=2)
        return Catalog(empty_columns(psf), {**meta, "sigma": sigma})

    first = _first_detections(
        img, good, psf=psf, sigma=sigma, threshold=threshold, spikes=spikes, saturation=saturation,
        offset=offset, meta=meta, noise=noise,
    )  # fmt: skip
    if first is None:  # nothing detected to estimate the PSF width from, or nothing left
        return Catalog(empty_columns(psf), {**meta, "sigma": sigma})
    good, noise_level, bg_map, det, sigma, free_shape, stars = first
    estimated = free_shape
    det_kw = dict(mask=good, threshold=threshold, noise=noise_level)
    shape_vals = _shape_values(psf, sigma)
    width = max(v for k, v in shape_vals.items() if k != "angle")

    src = dict(x=det["x"], y=det["y"], flux=det["flux_guess"], background_map=bg_map)
    sky_tol = _SKY_RANGE * noise_level
    unit = _fit_unit(noise, noise_level)
    fit_kw = dict(background=background, noise=noise, max_sources=max_sources,
                  max_window=max_window, progress_bar=progress_bar, sky_tol=sky_tol,
                  unit=unit)  # fmt: skip
    cat, n_regions, keep, fits, last_protect = None, 0, None, 0, None
    wings, wings_changed = None, False
    # The models on whose residual `bg_map` was estimated and the last search ran (None: none
    # yet), and where a residual changes with its model (see `_BACKGROUND_STALE`).
    bg_model = search_model = None
    changed = lambda model, ref: _changed_area(
        model, ref, _CHANGE_TOL * noise_level, math.ceil(4 * width) + 1
    )
    refined_once = False
    # (the wings measured on the finished catalog, all sources at once: see `_joint_wings`)
    late_look, jointly = psf_wings, False
    # (two first fits, `rounds` searches, refits after pruning, one after a new width)
    budget = rounds + 5
    while budget > 0:
        budget -= 1
        if src["x"].size == 0:
            cat, keep = empty_columns(psf), None
            break
        # The first fit's neighbour light comes from detection guesses: the second refits all.
        # (and once the PSF's wings are found: every region is refitted with them)
        previous = cat if ("prev" in src and fits >= 2 and not wings_changed) else None
        wings_changed = False
        fits += 1
        # Capped: the first fit, which the second continues (unless it measures the PSF's
        # width: that takes converged fits), and those another residual search follows.
        capped = (fits == 1 and not free_shape) or (fits >= 3 and meta["rounds"] < rounds)
        cat, n_regions, n_fitted, refitted = _fit_all(
            img, good, src, psf, shape_vals, free_shape=free_shape, previous=previous,
            max_iter=_SEARCH_MAX_ITER if capped else _MAX_ITER, **fit_kw,
        )  # fmt: skip
        cut_short = capped and bool(np.any(cat["status"] == Status.MAX_ITERATIONS))
        meta["region_fits"] += n_fitted
        if free_shape:
            measured = _measured_width(cat, psf)
            if measured is not None:
                sigma = measured
                shape_vals = _shape_values(psf, sigma)
                width = max(v for k, v in shape_vals.items() if k != "angle")
            free_shape = False
        if fits < 2:
            # Refit with the shared width, and with every neighbour's light from its fit rather
            # than its detection guess, before judging anything. (Adding the first fit's
            # residual peaks to this refit was tried: Jaccard ±0.02 field to field, +0.0003 on
            # average over 34 fields, for one more residual search.)
            src = dict(src, x=cat["x"], y=cat["y"], flux=cat["flux"])
            continue
        if psf_wings and (fits == 2 or wings is not None):
            # The light the Gaussians miss, measured on the second fit's residual (before any
            # of it is taken for neighbours) and, once it matters, on every fit's.
            if jointly:
                found = _joint_wings(img, good, cat, bg_map, psf, width, wings)
                found, bg_map = (None, bg_map) if found is None else found
                src["background_map"] = bg_map
            else:
                found = _measured_wings(img, good, cat, bg_map, psf, width, wings)
            # (found, or found before and gone: every region is refitted)
            wings_changed = (wings is None) != (found is None)
            wings = found
            if wings is not None and not jointly:
                # (found by the first look, in a crowd: measured again all sources at once)
                jointly = _crowding(cat, good, width) >= _WINGS_CROWD
        if estimated and not refined_once and meta["rounds"] >= 1 and wings is None:
            # The first width came from the detections' fits, where a crowd's hidden neighbours
            # and unresolved pairs were one source each; once the first residual search has
            # found them, it is measured again, and if it moved every region is refitted with
            # it (at 0.3 stars/FWHM² the first estimate is 3 % wide: the image measured again
            # from scratch at the end, as before, took 3.3× the time of a call with σ given).
            refined_once = True
            refined = _refined_width(img, good, cat, bg_map, psf, shape_vals, sigma, fit_kw)
            if refined is not None:
                meta["sigma_first"], sigma = sigma, refined
                shape_vals = _shape_values(psf, sigma)
                width = max(v for k, v in shape_vals.items() if k != "angle")
                src = dict(x=cat["x"], y=cat["y"], flux=cat["flux"], background_map=bg_map)
                continue
        test_kw = dict(psf=psf, shape_vals=shape_vals, background_model=background, noise=noise,
                       sky_tol=sky_tol, unit=unit)  # fmt: skip
        # Judged with the error a source inherits from its neighbours' PSF error, too.
        model_err = _model_error(cat, width, psf_error)
        judged = dict(cat, snr=cat["flux"] / np.hypot(cat["flux_err"], model_err))
        # A source whose region was not refitted keeps last round's verdicts: nothing within
        # reach of its test window changed (see `_REACH`).
        protect = np.zeros(cat["x"].size, bool)
        if split:
            protect = _warranted(img, good, judged, width, min_snr, shape, only=refitted,
                                 sky=src["background_map"], wings=wings, **test_kw)  # fmt: skip
            if previous is not None:
                old = ~refitted
                protect[old] = last_protect[src["prev"][old]]
        last_protect = protect
        # A weak source is not upheld by the likelihood ratio where its flux is within the
        # reach of its neighbours' PSF error: there the ratio measures the PSF's mismatch.
        protect = protect & (cat["flux"] >= min_snr * model_err)
        floor_err = _isolated_flux_error(cat, noise, noise_level)
        keep = _prune(judged, width, min_snr, shape, protect, np.hypot(floor_err, model_err))
        kept = {c: v[keep] for c, v in cat.items()}
        new = {"x": np.zeros(0), "y": np.zeros(0), "flux_guess": np.zeros(0)}
        parents, kids = np.zeros(0, int), {k: np.zeros(0) for k in ("x", "y", "flux")}
        if meta["rounds"] < rounds:
            model = _light(kept, shape, psf, wings)
            stale = changed(model, bg_model)
            if stale is None or stale.mean() > _BACKGROUND_STALE:
                bg_map = estimate_background(img - model, good, sigma=width)
                bg_model, area = model, None
            else:
                area = changed(model, search_model)
            search_model = model
            new, near_new = _residual_peaks(
                img, good, kept, model, bg_map, width, stars, psf_error, noise_level, det_kw,
                area=area,
            )  # fmt: skip
            if split and kept["x"].size:
                # Unresolved pairs: one source the residual says is two (see `_split`); not
                # next to a new residual peak, which explains its residual better.
                parents, kids = find_splits(
                    img, good, kept, model, bg_map, noise_level=noise_level,
                    exclude=near_new | ~refitted[keep], psf_error=psf_error, **test_kw,
                )  # fmt: skip
            meta["rounds"] += 1
        # Sources whose light moved since the fit their neighbours saw: those neighbours'
        # regions are refitted (see `_SHIFT_CHI2`).
        shifted = refitted & (_light_change(src, cat, width, noise_level) > _SHIFT_CHI2) & keep
        finished = (new["x"].size == 0 and parents.size == 0 and keep.all() and not cut_short
                    and not shifted.any())  # fmt: skip
        late_look = late_look and wings is None
        found = None
        if late_look and (finished or budget == 0):
            # A crowd, whose first look found no wings (few stars isolated): the finished
            # catalog's residual, all sources at once (`_joint_wings`). In sparser fields the
            # first look sees isolated stars, and this one is skipped (0.2 s on 512²).
            late_look = False
            if _crowding(kept, good, width) >= _WINGS_CROWD:
                found = _joint_wings(img, good, kept, bg_map, psf, width, None, _WINGS_LATE_AGAIN)
        if found is not None:
            (wings, bg_map), wings_changed, jointly = found, True, True
            budget += _WINGS_LATE_FITS
        elif finished:
            break
        stay = np.ones(kept["x"].size, bool)
        stay[parents] = False
        meta["splits"] += parents.size
        n_new = kids["x"].size + new["x"].size
        src = dict(
            x=np.concatenate([kept["x"][stay], kids["x"].ravel(), new["x"]]),
            y=np.concatenate([kept["y"][stay], kids["y"].ravel(), new["y"]]),
            flux=np.concatenate(
                # (a residual peak's guess floored at one fit unit, not one count: on an image
                # in units 10⁻⁵ as large, as `img_as_float` makes of 16-bit counts, that
                # started new sources 40 times too bright and lost 9 of 60 stars)
                [kept["flux"][stay], kids["flux"].ravel(), np.maximum(new["flux_guess"], unit)]
            ),
            background_map=bg_map,
            prev=np.concatenate([np.where(keep)[0][stay], np.full(n_new, -1)]),
        )
        if wings is not None:
            src["wings"] = render_wings(wings, src["x"], src["y"], src["flux"], shape)
        # Only regions near a change are refitted: added, removed or split sources.
        changed_x = np.concatenate([cat["x"][~keep], kept["x"][~stay], new["x"]])
        changed_y = np.concatenate([cat["y"][~keep], kept["y"][~stay], new["y"]])
        src["dirty"] = src["prev"] < 0
        # (and the regions that stopped at their iteration limit: continued, see
        # `_SEARCH_MAX_ITER`)
        stopped = kept["status"][stay] == Status.MAX_ITERATIONS
        src["dirty"] |= np.concatenate([stopped, np.zeros(n_new, bool)])
        if changed_x.size:
            a, b = _pairs_within(
                np.concatenate([src["x"], changed_x]), np.concatenate([src["y"], changed_y]),
                _REACH * width,
            )  # fmt: skip
            n_src = src["x"].size
            src["dirty"][a[(a < n_src) & (b >= n_src)]] = True
            src["dirty"][b[(b < n_src) & (a >= n_src)]] = True
        moved = shifted[keep][stay]
        if moved.any():  # (the sources near one whose light moved: see `_SHIFT_REACH`)
            m = moved.size  # (the first `m` of `src` are the kept sources, in order)
            a, b = _pairs_within(src["x"][:m], src["y"][:m], _SHIFT_REACH * width)
            src["dirty"][a[moved[b]]] = True
            src["dirty"][b[moved[a]]] = True
    if keep is not None:  # the last fit, judged; rows in reading order (by y, then x)
        cat = {c: v[keep] for c, v in cat.items()}
        order = np.lexsort((cat["x"], cat["y"]))
        cat = {c: v[order] for c, v in cat.items()}
    model = _light(cat, shape, psf, wings)
    stale = changed(model, bg_model)
    if stale is None or stale.mean() > _BACKGROUND_STALE:  # (else the last estimate stands)
        bg_map = estimate_background(img - model, good, sigma=width)
    # (Not where the PSF's wings were found: they take up what a Gaussian of another width
    # would, and measured again the image lost them at 0.1 stars/FWHM², Moffat β = 3.)
    if estimated and not refined_once and wings is None and cat["x"].size >= 3:
        # (With no residual search, `rounds=0`:) measured again on the finished catalog, and
        # the image measured again if it moved.
        refined = _refined_width(img, good, cat, bg_map, psf, shape_vals, sigma, fit_kw)
        if refined is not None:
            with warnings.catch_warnings():  # (the image's warnings were given once)
                warnings.simplefilter("ignore")
                again = fit_image(
                    image, psf=psf, sigma=refined, background=background, noise=noise,
                    mask=mask, threshold=threshold, offset=offset, min_snr=min_snr,
                    rounds=rounds, max_sources=max_sources, max_window=max_window,
                    split=split, spikes=spikes, saturation=saturation, psf_error=psf_error,
                    psf_wings=psf_wings, progress_bar=progress_bar,
                )  # fmt: skip
            again.meta.update(sigma_first=sigma, region_fits=again.meta["region_fits"]
                              + meta["region_fits"])  # fmt: skip
            if again.meta["wings"] is not None and not getattr(_QUIET, "on", False):
                warnings.warn(wings_message(again.meta["wings"].light), stacklevel=2)
            return again
    if wings is not None:
        cat = _with_wings(cat, wings)
        if not getattr(_QUIET, "on", False):
            warnings.warn(wings_message(wings.light), stacklevel=2)
    meta.update(
        sigma=sigma, n_regions=n_regions, noise_level=noise_level, background_image=bg_map + offset,
        wings=wings,
    )  # fmt: skip
    return Catalog(cat, meta)
