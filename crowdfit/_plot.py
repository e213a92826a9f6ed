"""Quick looks: the image with its sources drawn over it beside the residual
(`plot_catalog`), and a movie's intensity traces (`plot_traces`)."""

from __future__ import annotations

import numpy as np

__all__ = ["plot_catalog", "plot_traces"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'crowdfit[plot]'") from None
    return plt


def _limits(a, percentiles):
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, percentiles)
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def plot_catalog(image, catalog, *, truth=None, residual=True, axes=None, percentiles=(1, 99.5)):
    """The image with an ellipse at each source of `catalog` (and the residual beside it).

    Each source is drawn as its PSF's 2σ ellipse (`sigma_x`, `sigma_y`, and `angle` where the
    catalog has one), in red; sources of `truth` as cyan crosses. The residual, `image` minus
    the catalog's model (`residual_image`), is shown in units of its robust noise (MAD) from
    −5 to 5, where a missed source, a wrong flux or a PSF that does not fit stands out.

    **Arguments:**

    - `image`: `(H, W)` the image fitted (masked pixels may be NaN).
    - `catalog`: a `Catalog` from `fit_image` (or columns `x`, `y`, `flux`, `sigma_x`,
      `sigma_y`).
    - `truth`: optional catalog of true positions (`x`, `y`), e.g. from `simulate_field`.
    - `residual`: add the residual panel (default).
    - `axes`: matplotlib axes to draw on (one, or two with `residual`); default a new figure.
    - `percentiles`: the image's grey scale, from the lower to the upper percentile.

    **Returns:** the matplotlib `Figure` (save it with `fig.savefig("fit.png")`).

    >>> import matplotlib; matplotlib.use("Agg")
    >>> import crowdfit
    >>> image, truth = crowdfit.simulate_field((64, 64), 10, seed=1)
    >>> cat = crowdfit.fit_image(image, sigma=2.0)
    >>> fig = crowdfit.plot_catalog(image, cat, truth=truth)
    >>> len(fig.axes)  # the image, the residual and its colour bar
    3
    """
    from matplotlib.collections import EllipseCollection

    from ._catalog import residual_image

    plt = _pyplot()
    image = np.asarray(image, float)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    x = np.asarray(catalog["x"], float)
    y = np.asarray(catalog["y"], float)
    cols = getattr(catalog, "columns", catalog)
    missing = [c for c in ("sigma_x", "sigma_y") if c not in cols]
    if missing:  # (the ellipses' sizes; `residual_image` needs them too)
        raise ValueError(f"the catalog has no {missing} column(s): plot_catalog draws each "
                         "source's PSF ellipse from sigma_x and sigma_y")  # fmt: skip
    sx = np.asarray(catalog["sigma_x"], float)
    sy = np.asarray(catalog["sigma_y"], float)
    n_panels = 2 if residual else 1
    if axes is None:
        h, w = image.shape
        width = 6.0 * n_panels
        fig, axes = plt.subplots(1, n_panels, figsize=(width, min(12.0, 6.0 * h / w) + 0.6),
                                 squeeze=False, constrained_layout=True)  # fmt: skip
        axes = axes[0]
    else:
        axes = list(np.atleast_1d(axes))
        if len(axes) != n_panels:
            raise ValueError(
                f"axes: expected {n_panels} axes (residual={residual}), got {len(axes)}"
            )
        fig = axes[0].figure
    angle = np.degrees(np.asarray(catalog["angle"], float)) if "angle" in cols else 0 * x

    def sources(ax):
        ax.add_collection(EllipseCollection(
            4 * sx, 4 * sy, angle, units="xy", offsets=np.column_stack([x, y]),
            offset_transform=ax.transData, facecolors="none", edgecolors="red", linewidths=0.8,
        ))  # fmt: skip
        if truth is not None:
            ax.plot(truth["x"], truth["y"], "+", color="cyan", ms=5, mew=0.8, ls="none")

    lo, hi = _limits(image, percentiles)
    ax = axes[0]
    # (masked, non-finite pixels: orange on the image, grey on the residual)
    grey = plt.get_cmap("gray").with_extremes(bad="tab:orange")
    ax.imshow(image, origin="lower", cmap=grey, vmin=lo, vmax=hi, interpolation="nearest")
    sources(ax)
    label = f"{x.size} sources" + ("" if truth is None else f" (red), {len(truth['x'])} true (+)")
    ax.set_title(label, fontsize=10)
    if residual:
        res = residual_image(image, catalog)
        finite = res[np.isfinite(res)]
        noise = 1.4826 * np.median(np.abs(finite - np.median(finite))) if finite.size else 1.0
        ax = axes[1]
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.5")
        im = ax.imshow(res / (noise if noise > 0 else 1.0), origin="lower", cmap=cmap,
                       vmin=-5, vmax=5, interpolation="nearest")  # fmt: skip
        sources(ax)
        ax.set_title("residual (data − model) / noise", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    for ax in axes:
        ax.set_xlim(-0.5, image.shape[1] - 0.5)
        ax.set_ylim(-0.5, image.shape[0] - 0.5)
    return fig


def plot_traces(traces, spots=None, *, max_spots: int = 12, ax=None, sharey: bool = False):
    """Intensity traces, one panel per spot: flux against frame with its 1σ band.

    Frames whose fit did not converge (`status` ≠ 0) are marked with an orange dot.

    **Arguments:**

    - `traces`: a `Traces` from `fit_movie`.
    - `spots`: indices of the spots to show; default the `max_spots` brightest (by median flux).
    - `max_spots`: how many spots at most by default.
    - `ax`: matplotlib axes, one per spot shown; default a new figure (a grid).
    - `sharey`: one flux scale for all panels.

    **Returns:** the matplotlib `Figure`.

    >>> import matplotlib; matplotlib.use("Agg")
    >>> import numpy as np, crowdfit
    >>> t = crowdfit.Traces(flux=np.ones((3, 5)), flux_err=np.full((3, 5), 0.1),
    ...     background=np.zeros((3, 5)), status=np.zeros((3, 5), int), x=np.zeros((3, 5)),
    ...     y=np.zeros((3, 5)), catalog=None)
    >>> len(crowdfit.plot_traces(t, spots=[0, 2]).axes)
    2
    """
    plt = _pyplot()
    n = len(traces)
    if spots is None:
        order = np.argsort(-np.nanmedian(traces.flux, axis=1), kind="stable") if n else []
        spots = np.asarray(order[:max_spots], int)
    spots = np.atleast_1d(np.asarray(spots))
    if spots.size == 0:
        raise ValueError("no spots to plot")
    if not np.issubdtype(spots.dtype, np.integer) or spots.min() < -n or spots.max() >= n:
        raise ValueError(f"spots must be indices of the {n} spots, got {spots.tolist()}")
    if ax is None:
        cols = min(3, spots.size)
        rows = -(-spots.size // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.4 * rows), squeeze=False,
                                 sharex=True, sharey=sharey, constrained_layout=True)  # fmt: skip
        axes = axes.ravel()
        for extra in axes[spots.size :]:
            extra.set_visible(False)
    else:
        axes = np.atleast_1d(ax).ravel()
        if axes.size != spots.size:
            raise ValueError(f"ax: expected {spots.size} axes (one per spot), got {axes.size}")
        fig = axes[0].figure
    frames = np.arange(traces.n_frames)
    for a, i in zip(axes, spots, strict=False):
        f, e = traces.flux[i], traces.flux_err[i]
        a.fill_between(frames, f - e, f + e, color="tab:blue", alpha=0.25, lw=0)
        a.plot(frames, f, color="tab:blue", lw=1)
        bad = traces.status[i] != 0
        if bad.any():
            a.plot(frames[bad], f[bad], "o", color="tab:orange", ms=3, ls="none")
        a.axhline(0.0, color="0.6", lw=0.6)
        title = f"spot {int(i)}"
        if traces.catalog is not None and len(traces.catalog) == n:
            title += f" (x {traces.catalog['x'][i]:.1f}, y {traces.catalog['y'][i]:.1f})"
        a.set_title(title, fontsize=9)
    for a in axes[: spots.size]:
        a.set_xlabel("frame")
        a.set_ylabel("flux")
    return fig
