"""Big images and long movies with dask: tiles of an image, chunks of a movie, fitted in parallel.

Runs on dask's default scheduler, or on a `dask.distributed` cluster when a client is active.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

from . import _image
from ._catalog import Catalog, empty_columns
from ._elongation import elongation_message
from ._fill import find_fill
from ._group import default_max_window
from ._image import (
    ALL_MASKED,
    _covariance,
    _widths,
    fill_message,
    fit_image,
    saturation_message,
    spike_message,
    wings_message,
)
from ._movie import (
    Traces,
    assemble,
    check_frames,
    check_options,
    chunk_frames_for,
    fit_block,
    plan_movie,
    projection_combine,
    projection_finish,
    projection_frames,
    projection_partial,
)
from ._psf import ellipse_from_covariance, get_psf

__all__ = ["fit_image_dask", "fit_movie_dask"]


def _dask():
    try:
        import dask
        import dask.array
    except ImportError:
        raise ImportError(
            'crowdfit.dask needs dask: pip install "crowdfit[dask]" (dask[array] and distributed)'
        ) from None
    return dask


def _client():
    """The active `dask.distributed` client, or None."""
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        return default_client()
    except ValueError:
        return None


def _as_dask(array, chunks):
    dask = _dask()
    if isinstance(array, dask.array.Array):
        return array
    if not (hasattr(array, "shape") and hasattr(array, "dtype") and hasattr(array, "__getitem__")):
        array = np.asarray(array)
    # Lazy for memmaps, zarr and h5py: a chunk is read only when a task needs it.
    return dask.array.from_array(array, chunks=chunks)


def _compute(tasks, progress_bar):
    dask = _dask()
    if progress_bar is None:
        progress_bar = sys.stderr.isatty()
    if not tasks:
        return []
    if _client() is None:
        # One task first: it compiles the fit programs once, instead of once per thread.
        first = dask.compute(tasks[0])[0]
        rest = tasks[1:]
    else:
        first, rest = None, tasks
    if progress_bar and _client() is None:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            done = dask.compute(*rest)
    else:
        done = dask.compute(*rest)
    return ([first] if first is not None else []) + list(done)


def _tile_sizes(tile) -> tuple[int, int]:
    t = np.asarray(tile).ravel()
    if t.size not in (1, 2) or not np.all(t >= 1) or not np.all(t == np.round(t)):
        raise ValueError(f"tile must be a positive number of pixels or (rows, cols), got {tile}")
    return int(t[0]), int(t[-1])


def _fit_tile(crop, mask, core, origin, shape, kwargs) -> dict:
    """Fit one tile plus its halo; keep the sources whose position lies in the tile's core."""
    img = np.asarray(crop, dtype=np.float64)
    good = np.isfinite(img)
    if mask is not None:
        good &= np.asarray(mask, bool)
    r0, r1, c0, c1 = core
    oy, ox = origin
    h, w = shape
    in_core = np.zeros(img.shape, bool)
    in_core[r0 - oy : r1 - oy, c0 - ox : c1 - ox] = True
    # Counted on the core only: halos overlap, cores do not.
    n_bad = int(np.count_nonzero(~np.isfinite(img) & in_core & (True if mask is None else mask)))
    none = dict(spikes=np.zeros((0, 2), int), saturation=None, n_saturated=0, n_fill=0)
    if not good.any():
        return dict(data=empty_columns(kwargs.get("psf")), meta={}, n_bad=n_bad, **none)
    # Non-finite pixels are masked here (and counted above), so that the warning is given once
    # by the caller, not by every task on its own thread or worker.
    _image._QUIET.on = True  # spikes and saturated pixels are reported once, by the caller
    try:
        if mask is None and np.isfinite(img).all():
            cat = fit_image(img, **kwargs)
        else:
            cat = fit_image(np.where(good, img, 0.0), mask=good, **kwargs)
    finally:
        _image._QUIET.on = False
    spikes = cat.meta["spikes"] + np.array([oy, ox])
    spikes = spikes[in_core[spikes[:, 0] - oy, spikes[:, 1] - ox]]
    level = cat.meta["saturation"]
    n_sat = 0 if level is None else int(np.count_nonzero(good & in_core & (img >= level)))
    x = cat["x"] + ox
    y = cat["y"] + oy
    # Pixel i spans [i - 0.5, i + 0.5); the image's outer tiles own everything beyond its edges.
    keep = np.ones(len(cat), bool)
    if c0 > 0:
        keep &= x >= c0 - 0.5
    if c1 < w:
        keep &= x < c1 - 0.5
    if r0 > 0:
        keep &= y >= r0 - 0.5
    if r1 < h:
        keep &= y < r1 - 0.5
    data = {k: v[keep] for k, v in cat.data.items()}
    data["x"], data["y"] = x[keep], y[keep]
    n_fill = int(np.count_nonzero(find_fill(img, good) & in_core)) if cat.meta["n_fill"] else 0
    return dict(data=data, meta=cat.meta, n_bad=n_bad, spikes=spikes, saturation=level,
                n_saturated=n_sat, n_fill=n_fill)  # fmt: skip


def fit_image_dask(
    array,
    *,
    tile: int | tuple[int, int] = 1024,
    halo: int | None = None,
    mask=None,
    progress_bar: bool | None = None,
    **fit_image_kwargs,
) -> Catalog:
    """`fit_image` on a big image, tile by tile, in parallel with dask.

    The image is cut into tiles of `tile` pixels; each tile is fitted with `fit_image` on the
    tile plus a `halo` of pixels around it, so that a source near a tile's edge is fitted with its
    neighbours across the edge; a source is reported once, by the tile whose core holds its
    position. Results equal `fit_image`'s except for sources near the seams, whose crowded
    groups may be cut differently (pass `sigma`, so that every tile uses the same width).

    **Arguments:**

    - `array`: an `(H, W)` dask array, numpy array or memmap (read lazily, tile by tile).
    - `tile`: tile side in pixels, one number or `(rows, cols)`.
    - `halo`: pixels of context around each tile (default: `max_window`, whose default with
      `sigma` given is `default_max_window(sigma)`, 48 up to σ = 3; without `sigma`, 48: pass
      `sigma` for PSFs wider than 3 px). A region's window and its neighbours fit in it.
    - `mask`: `(H, W)` True where a pixel counts (a numpy array).
    - `progress_bar`: show progress (dask's local scheduler only).
    - `fit_image_kwargs`: passed to `fit_image` (`sigma`, `psf`, `background`, `noise`, ...).

    **Returns:** a `Catalog` in image coordinates, tile by tile. With one tile it is exactly
    `fit_image`'s; with several, `meta` holds `tiles`, `tile`, `halo` but no `background_image`.
    `meta["spikes"]`, `"saturation"`, `"n_saturated"` and `"n_fill"` are the whole image's
    (each pixel counted by the tile whose core holds it), with one warning each.

    >>> import crowdfit, crowdfit.dask
    >>> image, truth = crowdfit.simulate_field((64, 64), 10, seed=1)
    >>> cat = crowdfit.dask.fit_image_dask(image, tile=64, sigma=2.0)
    >>> len(cat), crowdfit.match(truth, cat).recall
    (10, 1.0)
    """
    dask = _dask()
    shape = tuple(int(s) for s in np.shape(array))
    if len(shape) != 2:
        hint = " (for a movie use fit_movie_dask)" if len(shape) == 3 else ""
        raise ValueError(f"expected a 2-D image of shape (H, W), got shape {shape}{hint}")
    if "image" in fit_image_kwargs:
        raise TypeError("fit_image_dask takes the image as its first argument")
    h, w = shape
    th, tw = _tile_sizes(tile)
    if halo is None:
        sigma = fit_image_kwargs.get("sigma")
        halo = fit_image_kwargs.get("max_window")
        if halo is None:
            halo = default_max_window(0.0 if sigma is None else max(_widths(sigma)))
    halo = int(halo)
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != shape:
            raise ValueError(f"mask has shape {mask.shape}, the image {shape}")
    array = _as_dask(array, (th, tw))
    # Tasks run on threads or workers: one progress bar (dask's) at most, not one per tile.
    kwargs = {**fit_image_kwargs, "progress_bar": False}
    tasks, cores = [], []
    for r0 in range(0, h, th):
        for c0 in range(0, w, tw):
            r1, c1 = min(r0 + th, h), min(c0 + tw, w)
            y0, y1 = max(r0 - halo, 0), min(r1 + halo, h)
            x0, x1 = max(c0 - halo, 0), min(c1 + halo, w)
            m = None if mask is None else mask[y0:y1, x0:x1]
            fn = dask.delayed(_fit_tile, pure=True)
            tasks.append(fn(array[y0:y1, x0:x1], m, (r0, r1, c0, c1), (y0, x0), shape, kwargs))
            cores.append((r0, r1, c0, c1))
    parts = _compute(tasks, progress_bar)
    n_bad = sum(p["n_bad"] for p in parts)
    if n_bad:
        warnings.warn(
            f"{n_bad} non-finite pixel(s) (NaN or inf) are masked and ignored", stacklevel=2
        )
    spikes = np.concatenate([p["spikes"] for p in parts])
    if len(spikes):
        warnings.warn(spike_message(len(spikes)), stacklevel=2)
    levels = [p["saturation"] for p in parts if p["saturation"] is not None]
    masked = dict(spikes=spikes, saturation=max(levels) if levels else None,
                  n_saturated=sum(p["n_saturated"] for p in parts),
                  n_fill=sum(p["n_fill"] for p in parts))  # fmt: skip
    if masked["n_saturated"]:
        warnings.warn(saturation_message(masked["n_saturated"], masked["saturation"]), stacklevel=2)
    if masked["n_fill"]:
        warnings.warn(fill_message(masked["n_fill"]), stacklevel=2)
    # Each tile measures the PSF's wings on its own, and its fluxes hold its own; the catalog's
    # `meta["wings"]` (for `model_image`) is the one measured on the most stars.
    wings = [p["meta"]["wings"] for p in parts if p["meta"] and p["meta"].get("wings")]
    masked["wings"] = max(wings, key=lambda w: w.n_stars) if wings else None
    if wings:
        warnings.warn(wings_message(masked["wings"].light), stacklevel=2)
    # (and the spots' shape, as measured on the most spots)
    shapes = [p["meta"]["elongation"] for p in parts if p["meta"].get("elongation") is not None]
    masked["elongation"] = max(shapes, key=lambda e: e["n"]) if shapes else None
    if shapes:
        psf_params = get_psf(fit_image_kwargs.get("psf", "gaussian")).params
        given = fit_image_kwargs.get("sigma")
        held = given is not None and np.size(given) < 3  # (a rotated PSF's angle then 0)
        message = elongation_message(**masked["elongation"], psf_params=psf_params,
                                     angle_held=held)  # fmt: skip
        if message:
            warnings.warn(message, stacklevel=2)
    if len(parts) == 1:
        p = parts[0]
        if not p["meta"]:
            warnings.warn(ALL_MASKED, stacklevel=2)
        return Catalog(p["data"], {**(p["meta"] or _empty_meta(fit_image_kwargs, shape)), **masked})
    data, groups = [], 0
    for p in parts:
        d = dict(p["data"])
        d["group"] = d["group"] + groups
        if len(d["group"]):
            groups = int(d["group"].max()) + 1
        data.append(d)
    columns = {c: np.concatenate([d[c] for d in data]) for c in data[0]}
    metas = [p["meta"] for p in parts if p["meta"]]
    meta = _empty_meta(fit_image_kwargs, shape)
    if metas:
        sigmas = [m["sigma"] for m in metas if m.get("sigma") is not None]
        # (a given sigma as every tile's fit_image has it: an array made `or` raise)
        given = fit_image_kwargs.get("sigma") is not None
        meta.update(
            psf=metas[0]["psf"],
            noise=metas[0]["noise"],
            sigma=metas[0]["sigma"] if given else _median_sigma(sigmas),
            rounds=max(m["rounds"] for m in metas),
            n_regions=sum(m["n_regions"] for m in metas),
        )
    else:
        warnings.warn(ALL_MASKED, stacklevel=2)
    meta.update(tiles=len(parts), tile=(th, tw), halo=halo, **masked)
    return Catalog(columns, meta)


def _median_sigma(sigmas):
    """The tiles' shared PSF shape: the median of their widths (of their covariances' parts,
    for a rotated PSF's `(sigma_x, sigma_y, angle)`)."""
    if not sigmas:
        return None
    if np.size(sigmas[0]) == 3:
        parts = np.median(np.array([_covariance(v) for v in sigmas]), 0)
        return tuple(float(v) for v in ellipse_from_covariance(*parts))
    s = np.median(np.array([np.broadcast_to(np.asarray(v, float), (2,)) for v in sigmas]), 0)
    return float(s[0]) if np.ndim(sigmas[0]) == 0 else (float(s[0]), float(s[1]))


def _empty_meta(kwargs, shape) -> dict:
    return dict(
        psf=get_psf(kwargs.get("psf", "gaussian")).name,
        noise=kwargs.get("noise", "gaussian"),
        shape=shape,
        rounds=0,
        n_regions=0,
        sigma=kwargs.get("sigma"),
    )


def fit_movie_dask(
    frames,
    *,
    psf="gaussian",
    sigma=None,
    background: str = "constant",
    noise: str = "gaussian",
    projection: str | int = "mean",
    drift: bool = False,
    catalog=None,
    mask=None,
    offset: float = 0.0,
    threshold: float | None = None,
    min_snr: float = 5.0,
    max_sources: int = 16,
    max_window: int | None = None,
    max_iter: int = 50,
    chunk_frames: int | None = None,
    spikes: bool = True,
    progress_bar: bool | None = None,
) -> Traces:
    """`fit_movie` on a `(T, H, W)` dask array, chunks of frames fitted in parallel.

    The projection is summed chunk by chunk (in parallel, folded in frame order), the spots are
    found on it once, here, and every chunk of `chunk_frames` frames is then fitted by one task.
    The arguments and the result are `fit_movie`'s, and so are the numbers: the same chunks are
    folded and fitted in the same order, so the traces equal `fit_movie`'s bit for bit.

    **Arguments:** as for `fit_movie`; `frames` is a `(T, H, W)` dask array (or a numpy array or
    memmap, wrapped lazily). It is rechunked to `chunk_frames` whole frames per chunk.

    **Returns:** `Traces` with `(N, T)` `flux`, `flux_err`, `background`, `status`, `x`, `y`.

    >>> import numpy as np, dask.array as da, crowdfit, crowdfit.dask
    >>> image, truth = crowdfit.simulate_field((48, 48), 5, min_separation=8, border=6, seed=2)
    >>> frames = da.from_array(np.stack([image] * 4), chunks=(2, 48, 48))
    >>> crowdfit.dask.fit_movie_dask(frames, sigma=2.0, chunk_frames=2).flux.shape
    (5, 4)
    """
    dask = _dask()
    frames, shape = check_frames(frames)
    t, h, w = shape
    mask = check_options(
        psf=psf, background=background, noise=noise, mask=mask, shape=shape, max_iter=max_iter
    )
    tc = chunk_frames_for(shape, chunk_frames)
    frames = _as_dask(frames, (tc, h, w)).rechunk((tc, h, w))
    blocks = list(frames.to_delayed().ravel())

    def project():
        kind = "max" if projection == "max" else "mean"
        n_proj = projection_frames(projection, t)
        acc = None
        for i, s in enumerate(range(0, n_proj, tc)):
            block = blocks[i] if s + tc <= n_proj else frames[s:n_proj]
            part = dask.delayed(projection_partial, pure=True)(block, kind, mask)
            acc = dask.delayed(projection_combine, pure=True)(acc, part, kind)
        return projection_finish(acc.compute(), kind)

    catalog, plan, settings = plan_movie(
        catalog, project, (h, w), psf=psf, sigma=sigma, background=background, noise=noise,
        drift=drift, offset=offset, mask=mask, threshold=threshold, min_snr=min_snr,
        max_sources=max_sources, max_window=max_window, max_iter=max_iter, chunk_frames=tc,
        progress_bar=progress_bar, spikes=spikes,
    )  # fmt: skip
    # One key each for the plan and the settings, shared by every task.
    plan_d = dask.delayed(plan, pure=True)
    settings_d = dask.delayed(settings, pure=True)
    tasks = [dask.delayed(fit_block, pure=True)(b, plan_d, settings_d) for b in blocks]
    parts = _compute(tasks, progress_bar)
    meta = dict(
        projection=projection,
        drift=bool(drift),
        psf=get_psf(psf).name,
        noise=noise,
        shape=shape,
        chunk_frames=tc,
    )
    return assemble(parts, plan, catalog, meta)
