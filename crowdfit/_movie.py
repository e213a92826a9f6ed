"""`fit_movie`: intensity traces of every spot of a `(T, H, W)` movie.

Spots are found once on a projection of the frames, then every frame is fitted with positions and
widths held, jointly within each crowded region, frames × regions batched into one fit per bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np

from ._catalog import Catalog
from ._detect import _row_median
from ._fit import fit_regions
from ._group import bucket_regions, group_sources, pad_windows
from ._image import _K_BUCKETS, _SHAPE_NAMES, _SIZE_BUCKETS, fit_image
from ._progress import progress
from ._psf import PSF, get_psf

__all__ = ["Traces", "fit_movie"]

# Frames per chunk: about this many pixels of the movie are read and cropped at once ...
_CHUNK_PIXELS = 1 << 22
# ... and at most this many frames, so that a progress bar moves on small movies too.
_MAX_CHUNK_FRAMES = 64
_TRACE_COLUMNS = ("flux", "flux_err", "background", "status", "x", "y")


@dataclasses.dataclass(frozen=True, eq=False)
class Traces:
    """Intensity traces: every spot of a catalog measured in every frame of a movie.

    **Fields:**

    - `flux`: `(N, T)` total counts of each of the `N` spots in each of the `T` frames.
    - `flux_err`: `(N, T)` 1σ errors of `flux` (from the joint fit of the spot's crowded region
      in that frame, so they include the covariance with its neighbours).
    - `background`: `(N, T)` the region's fitted background at the spot, per pixel (the camera
      `offset`, if one was given, subtracted).
    - `status`: `(N, T)` int fit status of the spot's region in that frame (0 = converged,
      see `Status`).
    - `x`, `y`: `(N, T)` positions (column, row); constant in time unless `drift=True`.
    - `catalog`: the `Catalog` of the spots (row `i` is spot `i`), measured on the projection.
    - `meta`: how the traces were made (`projection`, `drift`, `psf`, `noise`, `shape`).
    """

    flux: np.ndarray
    flux_err: np.ndarray
    background: np.ndarray
    status: np.ndarray
    x: np.ndarray
    y: np.ndarray
    catalog: Catalog
    meta: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return self.flux.shape[0]

    @property
    def n_frames(self) -> int:
        """`T`, the number of frames."""
        return self.flux.shape[1]

    def __repr__(self) -> str:
        return f"Traces({len(self)} spots x {self.n_frames} frames, drift={self.meta.get('drift')})"

    def _long(self) -> dict:
        n, t = self.flux.shape
        cols = {
            "spot": np.repeat(np.arange(n), t),
            "frame": np.tile(np.arange(t), n),
            "flux": self.flux.ravel(),
            "flux_err": self.flux_err.ravel(),
            "background": self.background.ravel(),
            "status": self.status.ravel(),
        }
        if self.meta.get("drift"):
            cols["x"], cols["y"] = self.x.ravel(), self.y.ravel()
        return cols

    def to_pandas(self):
        """The traces in long format, one row per spot and frame: a `pandas.DataFrame` with
        columns `spot, frame, flux, flux_err, background, status` (and `x, y` with drift)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_pandas needs pandas: pip install pandas") from None
        return pd.DataFrame(self._long())

    def to_csv(self, path) -> None:
        """Write the traces as CSV in long format (see `to_pandas`), with a header row."""
        cols = self._long()
        fmt = ["%d" if c in ("spot", "frame", "status") else "%.10g" for c in cols]
        table = np.column_stack([np.asarray(v, float) for v in cols.values()])
        np.savetxt(path, table, fmt=fmt, delimiter=",", header=",".join(cols), comments="")


def check_frames(frames):
    """The movie as an array-like with `shape`, `dtype` and slicing; raises on bad input."""
    if not (
        hasattr(frames, "shape") and hasattr(frames, "dtype") and hasattr(frames, "__getitem__")
    ):
        frames = np.asarray(frames)
    shape = tuple(int(s) for s in frames.shape)
    if len(shape) != 3:
        hint = " (for one image use crowdfit.fit_image)" if len(shape) == 2 else ""
        raise ValueError(f"expected a movie of shape (T, H, W), got shape {shape}{hint}")
    if min(shape) == 0:
        raise ValueError(f"the movie is empty: shape {shape}")
    kind = np.dtype(frames.dtype).kind
    if kind not in "fiu":
        raise ValueError(f"frames must hold numbers, got dtype {frames.dtype}")
    return frames, shape


def chunk_frames_for(shape, chunk_frames: int | None) -> int:
    """Frames fitted together: `chunk_frames`, or a default that keeps chunks to a few MB."""
    t, h, w = shape
    if chunk_frames is None:
        chunk_frames = min(_MAX_CHUNK_FRAMES, max(1, _CHUNK_PIXELS // (h * w)))
    if int(chunk_frames) < 1:
        raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
    return min(int(chunk_frames), t)


def projection_frames(projection, n_frames: int) -> int:
    """How many leading frames the projection uses."""
    if isinstance(projection, str):
        if projection not in ("mean", "max"):
            raise ValueError(
                f"projection must be 'mean', 'max' or a number of frames, got {projection!r}"
            )
        return n_frames
    if isinstance(projection, bool) or not isinstance(projection, (int, np.integer)):
        raise ValueError(
            f"projection must be 'mean', 'max' or a number of frames, got {projection!r}"
        )
    if projection < 1:
        raise ValueError(f"projection must use at least one frame, got {projection}")
    return min(int(projection), n_frames)


def projection_partial(block, kind: str, mask) -> dict:
    """One chunk's share of the projection: a sum (or max) of its finite pixels and their count."""
    a = np.asarray(block, dtype=np.float64)
    good = np.isfinite(a)
    if mask is not None:
        good &= mask
    if kind == "max":
        value = np.where(good, a, -np.inf).max(axis=0)
    else:
        value = np.where(good, a, 0.0).sum(axis=0)
    return {"value": value, "count": good.sum(axis=0)}


def projection_combine(acc: dict | None, part: dict, kind: str) -> dict:
    """Fold one chunk's share into the running projection (in frame order, so every engine that
    folds the same chunks gets the same bits)."""
    if acc is None:
        return part
    op = np.maximum if kind == "max" else np.add
    return {"value": op(acc["value"], part["value"]), "count": acc["count"] + part["count"]}


def projection_finish(acc: dict, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """`(image, good)`: the projection (0 where no frame had a finite pixel), where it is valid."""
    good = acc["count"] > 0
    if kind == "max":
        image = np.where(good, acc["value"], 0.0)
    else:
        image = np.where(good, acc["value"] / np.maximum(acc["count"], 1), 0.0)
    return image, good


def find_spots(
    image,
    good,
    *,
    psf,
    sigma,
    background,
    offset,
    threshold,
    min_snr,
    max_sources,
    max_window,
    progress_bar,
    spikes=True,
) -> Catalog:
    """Find and measure the spots of a movie's projection with `fit_image`.

    Where `fit_image` measures the PSF's wings on the projection (`crowdfit._wings`), they keep
    its catalog free of false spots in them, but the frames are fitted with Gaussians alone:
    a warning says that the traces miss that light.
    """
    # Gaussian noise: a mean of Poisson frames is not Poisson; only positions and widths are used.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the PSF is not Gaussian")
        catalog = fit_image(
            image, psf=psf, sigma=sigma, background=background, noise="gaussian", mask=good,
            threshold=threshold, offset=offset, min_snr=min_snr, max_sources=max_sources,
            max_window=max_window, spikes=spikes, progress_bar=progress_bar,
        )  # fmt: skip
    wings = catalog.meta.get("wings")
    if wings is not None:
        warnings.warn(
            f"the PSF is not Gaussian: its wings hold {100 * wings.light:.0f} % more light than "
            "the Gaussians; the projection's spots were found with them (meta['wings']), but "
            "the frames are fitted with Gaussians alone, so the traces miss that light",
            stacklevel=4,
        )
    return catalog


def _shape_columns(psf, catalog, n: int, sigma) -> dict:
    """Per-spot PSF shape parameters `(N,)` from the catalog's widths and angle (or `sigma`:
    one width, `(sigma_x, sigma_y)` or `(sigma_x, sigma_y, angle)`)."""
    cols = catalog.columns if isinstance(catalog, Catalog) else tuple(catalog)
    s = None if sigma is None else np.asarray(sigma, float).ravel()
    if "sigma_x" in cols and "sigma_y" in cols:
        sx = np.asarray(catalog["sigma_x"], float)
        sy = np.asarray(catalog["sigma_y"], float)
    elif s is not None:
        # (not `s[-1]`: that is a rotated PSF's angle)
        sx, sy = np.full(n, s[0]), np.full(n, s[min(1, s.size - 1)])
    else:
        raise ValueError("catalog has no sigma_x, sigma_y columns: pass sigma")
    if "angle" in cols:
        angle = np.asarray(catalog["angle"], float)
    else:  # (a rotated PSF's angle given in `sigma`, else 0)
        angle = np.full(n, s[2] if s is not None and s.size == 3 else 0.0)
    out = {}
    for name in psf.params:
        if name == "sigma":
            out[name] = np.sqrt(sx * sy)
        elif name == "sigma_x":
            out[name] = sx
        elif name == "sigma_y":
            out[name] = sy
        elif name == "angle":
            out[name] = angle
    return out, sx, sy


def as_catalog(catalog) -> Catalog:
    """A user's catalog (a `Catalog` or a dict of columns) as a `Catalog`."""
    if isinstance(catalog, Catalog):
        return catalog
    if not hasattr(catalog, "keys") or "x" not in catalog or "y" not in catalog:
        raise ValueError("catalog must be a Catalog or a dict with at least 'x' and 'y' columns")
    return Catalog({k: np.atleast_1d(np.asarray(v)) for k, v in catalog.items()})


def make_plan(catalog, shape, *, psf, sigma, max_sources, max_window) -> dict:
    """Regions, buckets and per-bucket starting values for fitting every frame of a movie."""
    psf = get_psf(psf)
    if psf.params is None or not set(psf.params) <= {"x", "y", "flux", *_SHAPE_NAMES}:
        raise ValueError(f"fit_movie supports the built-in Gaussian PSFs, not {psf.name!r}")
    x = np.asarray(catalog["x"], float).ravel()
    y = np.asarray(catalog["y"], float).ravel()
    n = x.size
    if y.size != n:
        raise ValueError(f"catalog x and y differ in size: {n} and {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("catalog positions must be finite")
    cols = catalog.columns if isinstance(catalog, Catalog) else tuple(catalog)
    flux = np.asarray(catalog["flux"], float) if "flux" in cols else np.ones(n)
    flux = np.where(np.isfinite(flux) & (flux > 0), flux, 1.0)
    shape_params, sx, sy = _shape_columns(psf, catalog, n, sigma)
    plan = dict(n=n, x=x, y=y, flux=flux, shape=tuple(shape), buckets=[])
    if n == 0:
        return plan
    h, w = shape
    width = float(np.median(np.maximum(sx, sy)))
    regions = group_sources(
        x, y, width, (h, w), max_sources=max_sources, max_window=max_window, flux=flux
    )
    merged: dict = {}
    for (k, bh, bw), idx in bucket_regions(
        regions, k_buckets=_K_BUCKETS, size_buckets=_SIZE_BUCKETS
    ).items():
        merged.setdefault((k, max(bh, bw)), []).extend(idx)
    for (k, size), idx in sorted(merged.items()):
        regs = [regions[i] for i in idx]
        b = len(regs)
        windows = np.array([r.window for r in regs], dtype=np.intp)
        origins = windows[:, [0, 2]]
        init = {name: np.zeros((b, k)) for name in psf.params}
        valid = np.zeros((b, k), bool)
        held = np.zeros((b, k), bool)
        source = np.zeros((b, k), np.intp)
        for j, r in enumerate(regs):
            s = r.sources
            valid[j, : s.size] = True
            held[j, r.members.size : s.size] = True
            source[j, : s.size] = s
        slots = np.nonzero(valid)
        src = source[slots]
        init["x"][slots] = x[src] - origins[slots[0], 1]
        init["y"][slots] = y[src] - origins[slots[0], 0]
        init["flux"][slots] = flux[src]
        for name, v in shape_params.items():
            init[name][slots] = v[src]
            init[name][~valid] = np.median(v)
        init["x"][~valid] = init["y"][~valid] = size / 2  # padded slots: inside the window
        init["flux"][~valid] = 1.0
        member = valid & ~held
        mem, nb = np.nonzero(member), np.nonzero(held)
        plan["buckets"].append(
            dict(
                size=size,
                windows=windows,
                origins=origins,
                init=init,
                valid=valid,
                held=held,
                member=(source[mem], mem[0], mem[1]),
                neighbour=(source[nb], nb[0], nb[1]),
            )
        )
    return plan


@functools.lru_cache(maxsize=64)
def signed_flux_psf(psf: PSF) -> PSF:
    """`psf` with its `flux` renamed `signed_flux`, a parameter without bounds.

    `fit_regions` keeps `flux` positive; a trace needs the unconstrained linear estimate, whose
    errors stay Gaussian when a spot is dark (its flux then scatters about zero). Cached, so
    that every chunk (and every dask task) fits with the same PSF object and compiled program.
    """
    render = psf.render

    def signed(p, x, y):
        q = {("flux" if n == "signed_flux" else n): v for n, v in p.items()}
        return render(q, x, y)

    params = tuple("signed_flux" if n == "flux" else n for n in psf.params)
    return PSF(f"{psf.name}_signed_flux", params, signed)


def _fit_bucket(stacked, good, n_frames, height, bucket, settings, prior):
    """Fit one bucket's regions in `n_frames` stacked frames; `(Tc, B, K)` parameters out."""
    size, windows = bucket["size"], bucket["windows"]
    b, k = bucket["valid"].shape
    # Frames are stacked on top of each other into one tall image: a window never crosses a frame
    # edge (windows are clipped to the frame), so one crop call serves every frame.
    shift = np.arange(n_frames)[:, None, None] * np.array([height, height, 0, 0])
    crops, masks, _ = pad_windows(
        stacked, (windows[None] + shift).reshape(-1, 4), (size, size), mask=good
    )
    init = {name: np.tile(v, (n_frames, 1)) for name, v in bucket["init"].items()}
    init["signed_flux"] = init.pop("flux")
    if prior is not None:
        # Neighbours are held at what their own region measured in the same frame.
        src, reg, slot = bucket["neighbour"]
        origins = bucket["origins"]
        for name in ("flux", "x", "y"):
            if name not in prior:
                continue
            value = prior[name][src].T  # (Tc, n_neighbours)
            if name == "x":
                value = value - origins[reg, 1]
            elif name == "y":
                value = value - origins[reg, 0]
            view = init["signed_flux" if name == "flux" else name].reshape(n_frames, b, k)
            view[:, reg, slot] = np.where(np.isfinite(value), value, view[:, reg, slot])
    bg0 = _row_median(np.where(masks, crops, np.nan).reshape(crops.shape[0], -1))
    bg0 = np.where(np.isfinite(bg0), bg0, 0.0)
    init["background"] = (
        bg0
        if settings["background"] == "constant"
        else np.column_stack([bg0, np.zeros((bg0.size, 2))])
    )
    res = fit_regions(
        crops,
        init,
        psf=signed_flux_psf(get_psf(settings["psf"])),
        background=settings["background"],
        noise=settings["noise"],
        mask=masks,
        valid=np.tile(bucket["valid"], (n_frames, 1)),
        held=np.tile(bucket["held"], (n_frames, 1)),
        fixed=settings["fixed"],
        max_iter=settings["max_iter"],
        progress_bar=False,
    )
    p = {
        name: np.asarray(v).reshape(n_frames, b, *np.shape(v)[1:]) for name, v in res.params.items()
    }
    p["flux"] = p.pop("signed_flux")
    return (
        p,
        np.asarray(res.errors["signed_flux"]).reshape(n_frames, b, k),
        np.asarray(res.status).reshape(n_frames, b),
    )


def fit_block(block, plan: dict, settings: dict) -> dict:
    """Fit every spot of `plan` in one chunk of frames `(Tc, H, W)`; `(N, Tc)` columns out.

    Two passes: the second holds each region's neighbours at what their own regions measured in
    the first (a blinking neighbour is not held at its average brightness). Only buckets with
    neighbours are refitted.
    """
    a = np.asarray(block)
    if a.dtype.kind != "f":
        a = a.astype(np.float64)
    t_real, height, width = a.shape
    t_pad = settings["chunk_frames"]
    if t_real < t_pad:
        # The last chunk repeats its last frame, so that every chunk compiles the same programs.
        a = np.concatenate([a, np.repeat(a[-1:], t_pad - t_real, axis=0)])
    good = np.isfinite(a)
    if settings["mask"] is not None:
        good &= settings["mask"]
    # Non-finite pixels the user's mask did not already exclude, in the real frames only.
    bad = ~np.isfinite(a[:t_real])
    n_bad = int(np.count_nonzero(bad if settings["mask"] is None else bad & settings["mask"]))
    a = a - settings["offset"]
    stacked = a.reshape(t_pad * height, width)
    good = good.reshape(t_pad * height, width)
    n = plan["n"]
    out = {c: np.full((n, t_pad), np.nan) for c in _TRACE_COLUMNS}
    out["status"] = np.zeros((n, t_pad), np.int64)
    out["x"][:] = plan["x"][:, None]
    out["y"][:] = plan["y"][:, None]
    buckets = plan["buckets"]
    has_nb = [bk["neighbour"][0].size > 0 for bk in buckets]
    prior = None
    for second in (False, True):
        if second:
            if not any(has_nb):
                break
            prior = {"flux": out["flux"].copy()}
            if settings["drift"]:
                prior["x"], prior["y"] = out["x"].copy(), out["y"].copy()
        for bucket, nb in zip(buckets, has_nb, strict=True):
            if second and not nb:
                continue
            p, flux_err, status = _fit_bucket(stacked, good, t_pad, height, bucket, settings, prior)
            src, reg, slot = bucket["member"]
            origins = bucket["origins"]
            out["flux"][src] = p["flux"][:, reg, slot].T
            out["flux_err"][src] = flux_err[:, reg, slot].T
            out["status"][src] = status[:, reg].T
            xw, yw = p["x"][:, reg, slot], p["y"][:, reg, slot]
            if settings["drift"]:
                out["x"][src] = (xw + origins[reg, 1]).T
                out["y"][src] = (yw + origins[reg, 0]).T
            bg = p["background"]
            if bg.ndim == 2:
                out["background"][src] = bg[:, reg].T
            else:
                b0, bx, by = (bg[:, reg, i] for i in range(3))
                out["background"][src] = (b0 + bx * xw + by * yw).T
    out = {c: v[:, :t_real] for c, v in out.items()}
    out["n_bad"] = n_bad
    return out


def plan_movie(
    catalog, project, shape, *, psf, sigma, background, noise, drift, offset, mask, threshold,
    min_snr, max_sources, max_window, max_iter, chunk_frames, progress_bar, spikes=True,
):  # fmt: skip
    """The spots to measure, their plan and the fit settings: shared by `fit_movie` and
    `crowdfit.dask.fit_movie_dask`.

    Without a `catalog`, the spots are found on `project() -> (image, good)`, the movie's
    projection (computed only then). **Returns:** `(catalog, plan, settings)`.
    """
    if catalog is None:
        image, good = project()
        catalog = find_spots(
            image, good, psf=psf, sigma=sigma, background=background, offset=offset,
            threshold=threshold, min_snr=min_snr, max_sources=max_sources,
            max_window=max_window, progress_bar=progress_bar, spikes=spikes,
        )  # fmt: skip
        hot = catalog.meta.get("spikes", np.zeros((0, 2), int))
        if len(hot):  # hot pixels of the projection: masked in every frame as well
            mask = np.ones(shape[-2:], bool) if mask is None else np.array(mask, bool)
            mask[hot[:, 0], hot[:, 1]] = False
    catalog = as_catalog(catalog)
    plan = make_plan(
        catalog, shape, psf=psf, sigma=sigma, max_sources=max_sources, max_window=max_window
    )
    settings = fit_settings(
        psf=psf, background=background, noise=noise, drift=drift, offset=offset, mask=mask,
        max_iter=max_iter, chunk_frames=chunk_frames,
    )  # fmt: skip
    return catalog, plan, settings


def fit_settings(*, psf, background, noise, drift, offset, mask, max_iter, chunk_frames) -> dict:
    """The per-frame fit's settings, as plain values (they travel to dask workers)."""
    names = get_psf(psf).params
    shape_names = tuple(n for n in names if n in _SHAPE_NAMES)
    fixed = shape_names if drift else ("x", "y", *shape_names)
    return dict(
        psf=psf,
        background=background,
        noise=noise,
        drift=bool(drift),
        fixed=fixed,
        offset=float(offset),
        mask=mask,
        max_iter=int(max_iter),
        chunk_frames=int(chunk_frames),
    )


def check_options(*, psf, background, noise, mask, shape, max_iter):
    """Validate `fit_movie`'s options; returns the mask as `(H, W)` booleans or None."""
    get_psf(psf)
    if background not in ("constant", "plane"):
        raise ValueError(f"unknown background {background!r}: expected 'constant' or 'plane'")
    if noise not in ("gaussian", "poisson"):
        raise ValueError(f"unknown noise {noise!r}: expected 'gaussian' or 'poisson'")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != tuple(shape[1:]):
            raise ValueError(f"mask has shape {mask.shape}, the frames {tuple(shape[1:])}")
    return mask


def assemble(parts, plan, catalog, meta, *, stacklevel: int = 3) -> Traces:
    """Concatenate the chunks' `(N, Tc)` columns in frame order into `Traces`."""
    cols = {c: np.concatenate([p[c] for p in parts], axis=1) for c in _TRACE_COLUMNS}
    n_bad = sum(p["n_bad"] for p in parts)
    if n_bad:
        warnings.warn(
            f"{n_bad} non-finite pixel(s) (NaN or inf) are masked and ignored",
            stacklevel=stacklevel,
        )
    return Traces(**cols, catalog=catalog, meta=meta)


def fit_movie(
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
    """Measure the intensity trace of every spot of a movie, fitting crowded spots jointly.

    The spots are found and measured once, with `fit_image`, on a projection of the frames (their
    mean, their maximum, or the mean of the first few). Then every frame is fitted with each
    spot's position and width held at the projection's values and its flux free, plus one free
    background per region: overlapping spots are fitted jointly in the same regions as
    `fit_image` makes, so one spot's blinking does not leak into its neighbour's trace. With
    positions held the fluxes are linear parameters, and the fit converges in a few steps.
    Neighbours just outside a region are held at what their own region measured in the same
    frame (a second pass). All regions of all frames of a chunk go to the device as one batch
    per bucket; frames are read chunk by chunk, so a memory-mapped movie is never loaded whole.

    **Arguments:**

    - `frames`: `(T, H, W)` pixel values: a numpy array, a memmap (`read_image`), or anything
      array-like that slices (zarr, h5py; for dask see `crowdfit.dask.fit_movie_dask`).
      Non-finite pixels are masked (with one warning).
    - `psf`, `sigma`, `background`, `threshold`, `min_snr`, `max_sources`, `max_window`,
      `spikes`: as for `fit_image` (used on the projection, and `psf`, `background` for every
      frame). Single-pixel spikes of the projection (hot pixels) are masked in every frame too;
      a cosmic-ray hit in one frame is not found (the projection dilutes it).
    - `noise`: `"gaussian"` or `"poisson"` (counts; subtract a camera `offset`) for the per-frame
      fits; the projection is always fitted by least squares.
    - `projection`: `"mean"`, `"max"`, or a number `n`: the mean of the first `n` frames (before
      the spots bleach).
    - `drift`: fit each spot's position in every frame too (live-cell data); positions of frames
      where a spot is dark are meaningless then.
    - `catalog`: measure these spots instead of finding them (a `Catalog`, or a dict with `x`, `y`
      and optionally `flux`, `sigma_x`, `sigma_y`, `angle`; `sigma` is needed without widths,
      and a rotated PSF's angle is `sigma`'s third entry without an `angle` column, else 0).
    - `mask`: `(H, W)` True where a pixel counts in every frame.
    - `offset`: camera offset subtracted from every frame.
    - `max_iter`: iteration limit of each fit.
    - `chunk_frames`: frames read and fitted together (default: a few MB of pixels, at most 64).
    - `progress_bar`: show progress over chunks of frames (default: on a terminal).

    **Returns:** `Traces` with `(N, T)` `flux`, `flux_err`, `background`, `status`, `x`, `y`, and
    the projection's `catalog`.

    >>> import numpy as np, crowdfit
    >>> image, truth = crowdfit.simulate_field((48, 48), 5, min_separation=8, border=6, seed=2)
    >>> on = np.array([1.0, 0.0, 1.0, 1.0])  # all spots blink off in frame 1
    >>> frames = 5 + (image - 5)[None] * on[:, None, None]
    >>> traces = crowdfit.fit_movie(frames, sigma=2.0)
    >>> traces.flux.shape, bool(np.all(traces.flux[:, 1] < 0.2 * traces.flux[:, 0]))
    ((5, 4), True)
    """
    frames, shape = check_frames(frames)
    t, h, w = shape
    mask = check_options(
        psf=psf, background=background, noise=noise, mask=mask, shape=shape, max_iter=max_iter
    )
    tc = chunk_frames_for(shape, chunk_frames)
    starts = range(0, t, tc)

    def project():
        kind = "max" if projection == "max" else "mean"
        n_proj = projection_frames(projection, t)
        acc = None
        for s in range(0, n_proj, tc):
            part = projection_partial(frames[s : min(s + tc, n_proj)], kind, mask)
            acc = projection_combine(acc, part, kind)
        return projection_finish(acc, kind)

    catalog, plan, settings = plan_movie(
        catalog, project, (h, w), psf=psf, sigma=sigma, background=background, noise=noise,
        drift=drift, offset=offset, mask=mask, threshold=threshold, min_snr=min_snr,
        max_sources=max_sources, max_window=max_window, max_iter=max_iter, chunk_frames=tc,
        progress_bar=progress_bar, spikes=spikes,
    )  # fmt: skip
    parts = [
        fit_block(frames[s : s + tc], plan, settings)
        for s in progress(starts, total=len(starts), desc="fitting frames", enabled=progress_bar)
    ]
    meta = dict(
        projection=projection,
        drift=bool(drift),
        psf=get_psf(psf).name,
        noise=noise,
        shape=shape,
        chunk_frames=tc,
    )
    return assemble(parts, plan, catalog, meta)
