"""The catalog `fit_image` returns: one row per source, columns as numpy arrays.

Also the model and residual images that a catalog describes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ._problem import has_profile
from ._psf import get_psf
from ._render import render_separable
from ._wings import render_wings

__all__ = ["Catalog", "model_image", "residual_image"]

COLUMNS = (
    "x", "y", "flux", "flux_err", "x_err", "y_err", "sigma_x", "sigma_y", "background",
    "amplitude", "snr", "group", "status", "iterations", "chi2_reduced",
)  # fmt: skip


@dataclasses.dataclass(frozen=True, eq=False)
class Catalog:
    """Sources measured on one image.

    `cat["x"]` is a column (a numpy array), `len(cat)` the number of sources, `cat[i]` row `i`
    as a dict, `cat.columns` the names. Columns: `x, y` (column and row, pixel centres at
    integers), `flux` (total counts) and their 1σ errors `flux_err, x_err, y_err` (from the joint
    fit of each crowded region, so they include the covariance with neighbours), the PSF widths
    `sigma_x, sigma_y` (and `angle`, radians, for `"rotated_gaussian"`), the `background` under
    the source (its region's fitted level, plus the smooth background map's shape where that is
    part of the model), the peak `amplitude`,
    `snr = flux / flux_err`, the crowded `group` the source was fitted in, and the fit's
    `status` (0 = converged), `iterations` and `chi2_reduced`.

    `meta` holds how the catalog was made: `psf`, `sigma`, `noise`, `shape` of the image,
    `background_image` (the smooth background under the sources), `rounds`, `n_regions` (in
    the last grouping), `region_fits` (regions fitted over all rounds), `sigma_first` (with σ
    estimated, the first estimate, when the image was measured again), `n_fill` (pixels of fill,
    areas of one exact value, masked) and `splits` (sources the likelihood-ratio test split
    into two), `wings` (the PSF's wings where `fit_image` measured them, else `None`: see
    `crowdfit._wings.Wings`; each `flux` then holds its source's Gaussian and wings).

    `chi2_reduced` is each region's χ² per degree of freedom in units of the image's noise
    (about 1 where the model explains the data).
    """

    data: dict
    meta: dict = dataclasses.field(default_factory=dict)

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return self.data[key]
            except KeyError:
                raise KeyError(f"no column {key!r}; columns are {list(self.data)}") from None
        if isinstance(key, (int, np.integer)):
            return {k: v[key].item() for k, v in self.data.items()}
        return Catalog({k: v[key] for k, v in self.data.items()}, self.meta)

    def __len__(self) -> int:
        return len(next(iter(self.data.values()))) if self.data else 0

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.data)

    def __repr__(self) -> str:
        return (
            f"Catalog({len(self)} sources, psf={self.meta.get('psf')!r}, "
            f"sigma={self.meta.get('sigma')}, columns={list(self.data)})"
        )

    def to_pandas(self):
        """The catalog as a `pandas.DataFrame` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_pandas needs pandas: pip install pandas") from None
        return pd.DataFrame(dict(self.data))

    def to_fits(self, path, *, overwrite: bool = False) -> None:
        """Write the catalog as a FITS binary table `CATALOG` (needs astropy: `pip install
        'crowdfit[fits]'`). Its header holds the PSF model and shape (`SIGMA1`, `SIGMA2`,
        `SIGMA3`: `meta["sigma"]`'s entries), the noise model and level, the counts of `meta`
        (`_FITS_KEYS`), and the image's WCS when there is one (from `sky_coordinates`). Read it
        with `astropy.table.Table.read(path)`."""
        try:
            from astropy.io import fits
        except ImportError:
            raise ImportError("to_fits needs astropy: pip install 'crowdfit[fits]'") from None
        cols = []
        for name, v in self.data.items():
            v = np.asarray(v)
            cols.append(fits.Column(name, "K" if v.dtype.kind in "iu" else "D", array=v))
        hdu = fits.BinTableHDU.from_columns(cols, name="CATALOG")
        hdu.header["ORIGIN"] = "crowdfit"
        for key, value in self.meta.items():
            if key == "sigma" and value is not None:
                for i, v in enumerate(np.atleast_1d(value)):
                    hdu.header[f"SIGMA{i + 1}"] = (float(v), "PSF shape (sigma_x, sigma_y, angle)")
            elif key in _FITS_KEYS and isinstance(value, (str, int, float, np.number)):
                keyword, comment = _FITS_KEYS[key]
                hdu.header[keyword] = (value.item() if hasattr(value, "item") else value, comment)
        if "wcs" in self.meta:  # (the image's WCS, from `sky_coordinates`)
            header = fits.Header.fromstring(self.meta["wcs"])
            hdu.header.extend(header.cards, unique=True)  # (no keyword of the table's)
        hdu.writeto(path, overwrite=overwrite)

    @classmethod
    def read_fits(cls, path) -> Catalog:
        """Read a catalog written by `to_fits`: its columns, and from its header the `meta`
        entries `to_fits` writes (`psf`, `sigma`, `noise`...; not the background image or the
        wings, so `model_image` draws its sources as Gaussians, as for `read_csv`)."""
        try:
            from astropy.io import fits
        except ImportError:
            raise ImportError("read_fits needs astropy: pip install 'crowdfit[fits]'") from None
        with fits.open(path) as hdul:
            if "CATALOG" not in hdul:
                raise ValueError(f"{path} holds no CATALOG table (written by Catalog.to_fits)")
            table, header = hdul["CATALOG"].data, hdul["CATALOG"].header
            data = {}
            for name in table.columns.names:
                col = np.asarray(table[name])
                data[name] = col.astype(col.dtype.newbyteorder("="))
        meta = {k: header[kw] for k, (kw, _) in _FITS_KEYS.items() if kw in header}
        sigma = [header[f"SIGMA{i}"] for i in (1, 2, 3) if f"SIGMA{i}" in header]
        if sigma:
            meta["sigma"] = float(sigma[0]) if len(sigma) == 1 else tuple(map(float, sigma))
        return cls(data, meta)

    def to_csv(self, path) -> None:
        """Write the catalog as CSV with a header row."""
        names = list(self.data)
        cols = [self.data[n] for n in names]
        with open(path, "w") as f:
            f.write(",".join(names) + "\n")
            for row in zip(*cols, strict=True):
                f.write(",".join(_fmt(v) for v in row) + "\n")

    @classmethod
    def read_csv(cls, path) -> Catalog:
        """Read a catalog written by `to_csv` (the columns only: no `meta`, so `model_image`
        draws its sources as the Gaussians its columns describe, without any PSF wings
        `fit_image` measured; pass `psf` for the integrated ones)."""
        with open(path) as f:
            names = f.readline().strip().split(",")
        table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        if table.size == 0:
            table = np.zeros((0, len(names)))
        data = {}
        for i, n in enumerate(names):
            col = table[:, i]
            data[n] = col.astype(int) if n in ("group", "status", "iterations") else col
        return cls(data)


# `meta` entries written to a FITS table's header by `to_fits`: keyword and comment.
_FITS_KEYS = {
    "psf": ("PSF", "PSF model"), "noise": ("NOISE", "noise model"),
    "noise_level": ("NOISELEV", "image noise (robust sigma)"),
    "rounds": ("ROUNDS", "residual search rounds run"),
    "n_regions": ("NREGIONS", "regions in the last grouping"),
    "region_fits": ("NFITS", "region fits over all rounds"),
    "splits": ("NSPLITS", "sources split into pairs"),
    "saturation": ("SATURATE", "saturation level used"),
    "n_saturated": ("NSATUR", "saturated pixels masked"), "n_fill": ("NFILL", "fill pixels masked"),
}  # fmt: skip


def _fmt(v) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return repr(float(v))


def empty_columns(psf=None) -> dict:
    """A catalog's columns with no rows (and an `angle` column for a `psf` that has one)."""
    ints = ("group", "status", "iterations")
    names = COLUMNS + (("angle",) if psf is not None and "angle" in get_psf(psf).params else ())
    return {c: np.zeros(0, int if c in ints else float) for c in names}


def model_image(catalog, shape, *, psf=None, background=None):
    """The image a catalog describes: its sources (and optionally a background).

    A catalog from `fit_image` whose PSF wings were measured (`meta["wings"]`) describes each
    source as its Gaussian plus those wings (see `crowdfit._wings`).

    **Arguments:**

    - `catalog`: a `Catalog` (or a dict with `x`, `y`, `flux`, `sigma_x`, `sigma_y` columns).
    - `shape`: `(H, W)` of the image.
    - `psf`: the PSF name; default the catalog's own (`meta["psf"]`; without one, as read
      from CSV, `"rotated_gaussian"` when it has an `angle` column, else
      `"elliptical_gaussian"`, which draws round sources where `sigma_x = sigma_y`).
    - `background`: `None` (sources only), a number, an `(H, W)` array, or `"catalog"` for the
      catalog's `meta["background_image"]`.

    **Returns:** an `(H, W)` float array.

    >>> import numpy as np, crowdfit
    >>> cat = {"x": np.array([10.0]), "y": np.array([9.0]), "flux": np.array([100.0]),
    ...        "sigma_x": np.array([1.5]), "sigma_y": np.array([1.5])}
    >>> round(float(crowdfit.model_image(cat, (20, 22), psf="gaussian").sum()), 1)
    100.0
    """
    from ._simulate import _render_field

    meta = getattr(catalog, "meta", {})
    have = getattr(catalog, "columns", catalog)
    # (a catalog without its meta, read from CSV, is drawn as its columns describe it)
    unknown = "rotated_gaussian" if "angle" in have else "elliptical_gaussian"
    psf = get_psf(psf or meta.get("psf") or unknown)
    h, w = int(shape[0]), int(shape[1])
    missing = [c for c in ("x", "y", "flux", "sigma_x", "sigma_y") if c not in have]
    if missing:
        raise ValueError(f"the catalog has no {missing} column(s): model_image needs x, y, flux, "
                         "sigma_x and sigma_y")  # fmt: skip
    x = np.asarray(catalog["x"], float)
    out = np.zeros((h, w))
    if x.size:
        sx = np.asarray(catalog["sigma_x"], float)
        sy = np.asarray(catalog["sigma_y"], float)
        if "sigma" in psf.params:
            shape_params = {"sigma": np.sqrt(sx * sy)}
        else:
            shape_params = {"sigma_x": sx, "sigma_y": sy}
            if "angle" in psf.params:
                shape_params["angle"] = np.asarray(
                    catalog["angle"] if "angle" in getattr(catalog, "columns", catalog) else
                    np.zeros_like(x), float)  # fmt: skip
        radius = int(math.ceil(5 * max(sx.max(), sy.max()) + 2))
        y = np.asarray(catalog["y"], float)
        flux = np.asarray(catalog["flux"], float)
        wings = meta.get("wings")
        if wings is not None:  # (each flux is its Gaussian's and its wings' light together)
            flux = flux / (1.0 + wings.light)
        if has_profile(psf):  # (as tiled matrix products: the same stamps, faster)
            s_x, s_y = psf.widths(shape_params)
            out = render_separable(psf.profile, x, y, flux, s_x, s_y, (h, w), radius)
        else:
            out = _render_field(psf, x, y, flux, shape_params, h, w, radius)
        if wings is not None:
            out = out + render_wings(wings, x, y, flux, (h, w))
    if isinstance(background, str):
        if background != "catalog":
            raise ValueError("background must be None, a number, an array or 'catalog'")
        background = meta.get("background_image")
    if background is not None:
        out = out + np.broadcast_to(np.asarray(background, float), (h, w))
    return out


def residual_image(image, catalog, *, psf=None):
    """`image` minus the catalog's sources and its smooth background (`(H, W)`)."""
    image = np.asarray(image, float)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    bg = getattr(catalog, "meta", {}).get("background_image")
    return image - model_image(catalog, image.shape, psf=psf, background=bg)
