"""Reading images and movies from disk (TIFF, FITS, PNG and NumPy files), and the sky
coordinates of a catalog from a FITS world coordinate system."""

from __future__ import annotations

import os
import warnings

import numpy as np

__all__ = ["read_image", "read_header", "sky_coordinates"]

_FITS = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fits.fz", ".fz")


def _is_fits(path: str) -> bool:
    return path.lower().endswith(_FITS)


def _astropy_fits():
    try:
        from astropy.io import fits
    except ImportError:
        raise ImportError(
            "reading FITS files needs astropy: pip install 'crowdfit[fits]' (or astropy)"
        ) from None
    return fits


def _fits_hdu(hdul, hdu, path):
    """The HDU `hdu` (index or name) of an open FITS file, or the first with image data of at
    least 2 dimensions (a compressed or multi-extension file keeps its image in an extension)."""
    if hdu is not None:
        try:
            return hdul[hdu]
        except (KeyError, IndexError):
            names = [h.name or str(i) for i, h in enumerate(hdul)]
            raise ValueError(f"{path} has no HDU {hdu!r}; it holds {names}") from None
    for h in hdul:
        if h.is_image and h.header.get("NAXIS", 0) >= 2:
            return h
    raise ValueError(f"{path} holds no image (no HDU with 2 or more axes)")


def _read_fits(path, hdu, mmap):
    fits = _astropy_fits()
    try:
        hdul = fits.open(path, memmap=mmap)
    except OSError as e:
        raise ValueError(f"{path} is not a readable FITS file ({e})") from None
    with hdul:
        h = _fits_hdu(hdul, hdu, path)
        if not h.is_image:
            raise ValueError(f"HDU {hdu!r} of {path} is a table, not an image")
        data = h.data
        if data is None or data.ndim < 2:
            raise ValueError(f"HDU {hdu!r} of {path} holds no 2-D image")
        # (FITS stores big-endian numbers; numpy reads them, but JAX wants native order. A
        # memory-mapped array is left as stored: it is converted block by block when read.)
        if not mmap and not data.dtype.isnative:
            data = data.astype(data.dtype.newbyteorder("="))
        elif not mmap:
            data = np.array(data)
    return data


def read_image(path, *, mmap: bool = True, hdu=None) -> np.ndarray:
    """Read an image or a stack from `.npy`, `.tif`/`.tiff` (tifffile, memory-mapped where the
    file allows), FITS (`.fits`, `.fit`, `.fts`, also gzipped or tile-compressed `.fz`; needs
    astropy: `pip install 'crowdfit[fits]'`) or any format scikit-image reads (PNG, JPEG...).

    **Arguments:**

    - `path`: the file.
    - `mmap`: memory-map the file where its format allows (NumPy, uncompressed TIFF and FITS
      files: a FITS image without scaling keywords stays big-endian as stored, which numpy
      reads); `False` reads it into memory (FITS in native byte order).
    - `hdu`: FITS only: the HDU's index or name (`EXTNAME`); `None` (default) takes the first
      HDU with an image of 2 or more axes. FITS scaling (`BZERO`, `BSCALE`) is applied.

    **Returns:** the array as stored: `(H, W)` for an image, `(T, H, W)` for a stack. Colour
    images `(H, W, 3|4)` are converted to grey (luminance, scaled to 0-1), with a warning.

    >>> import numpy as np, tempfile, os
    >>> import crowdfit
    >>> path = os.path.join(tempfile.mkdtemp(), "frame.npy")
    >>> np.save(path, np.ones((4, 5)))
    >>> crowdfit.read_image(path).shape
    (4, 5)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if _is_fits(path):
        return _read_fits(path, hdu, mmap)
    if hdu is not None:
        raise ValueError(f"hdu is for FITS files; {path} is not one (.fits, .fit, .fts)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            return np.load(path, mmap_mode="r" if mmap else None)
        except (ValueError, OSError) as e:  # (not a NumPy array file: numpy speaks of pickles)
            raise ValueError(f"{path} is not a NumPy .npy array file ({e})") from None
    if ext in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:
            tifffile = None
        if tifffile is not None:
            if mmap:
                try:
                    return tifffile.memmap(path, mode="r")
                except (ValueError, OSError):
                    pass  # compressed or tiled files cannot be memory-mapped
            return tifffile.imread(path)
    import skimage.io

    img = skimage.io.imread(path)
    if img.ndim == 3 and img.shape[-1] in (3, 4) and ext not in (".tif", ".tiff"):
        import skimage.color

        warnings.warn(
            f"{path} is a colour image: converted to grey (luminance, scaled to 0-1); fluxes "
            "are in those units",
            stacklevel=2,
        )
        img = skimage.color.rgb2gray(img[..., :3])
    return img


def read_header(path, *, hdu=None):
    """The FITS header of the HDU `read_image(path, hdu=hdu)` reads (an
    `astropy.io.fits.Header`), or `None` for a file that is not FITS.

    It holds what a pipeline needs beyond the pixels: the world coordinate system (see
    `sky_coordinates`), and often the saturation level (`SATURATE`) and gain (`GAIN`).
    """
    path = os.fspath(path)
    if not _is_fits(path):
        return None
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    fits = _astropy_fits()
    try:
        with fits.open(path) as hdul:
            return _fits_hdu(hdul, hdu, path).header.copy()
    except OSError as e:
        raise ValueError(f"{path} is not a readable FITS file ({e})") from None


def sky_coordinates(catalog, wcs):
    """The catalog with its sources' sky coordinates added: columns `ra`, `dec` (degrees) and
    `ra_err`, `dec_err` (arcseconds, from `x_err`, `y_err` through the local pixel scale; `ra_err`
    on the sky, i.e. times cos(dec)).

    **Arguments:**

    - `catalog`: a `Catalog` (positions `x`, `y` in pixels, centres at integers, as FITS WCS
      takes them in astropy's 0-based convention).
    - `wcs`: an `astropy.wcs.WCS` or a FITS header holding one (see `read_header`), with
      celestial axes. For a cube's WCS, its first two (celestial) axes are used.

    **Returns:** a new `Catalog` (the same `meta`, plus `meta["wcs"]`: the WCS's header as a
    string).

    >>> import numpy as np
    >>> from astropy.wcs import WCS
    >>> import crowdfit
    >>> w = WCS(naxis=2)
    >>> w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> w.wcs.crval, w.wcs.crpix, w.wcs.cdelt = [150.0, 2.0], [1.0, 1.0], [-1e-4, 1e-4]
    >>> cat = crowdfit.Catalog({"x": np.array([0.0]), "y": np.array([10.0]),
    ...                         "x_err": np.array([0.1]), "y_err": np.array([0.1])})
    >>> out = crowdfit.sky_coordinates(cat, w)
    >>> round(float(out["dec"][0]), 4), round(float(out["dec_err"][0]), 3)
    (2.001, 0.036)
    """
    from ._catalog import Catalog

    try:
        from astropy.wcs import WCS
    except ImportError:
        raise ImportError("sky coordinates need astropy: pip install 'crowdfit[fits]'") from None
    if not isinstance(wcs, WCS):
        with warnings.catch_warnings():  # (astropy's notes on keywords it fixes: not ours)
            warnings.simplefilter("ignore")
            wcs = WCS(wcs)
    if not wcs.has_celestial:
        raise ValueError("the WCS has no celestial (RA/Dec) axes")
    wcs = wcs.celestial
    x = np.asarray(catalog["x"], float)
    y = np.asarray(catalog["y"], float)
    ra, dec = (np.asarray(v, float) for v in wcs.pixel_to_world_values(x, y))
    data = {**catalog.data, "ra": ra, "dec": dec}
    cols = catalog.columns
    if "x_err" in cols and "y_err" in cols:
        # The local Jacobian d(ra cos dec, dec)/d(x, y) by central differences (1 px).
        ra_px, dec_px = wcs.pixel_to_world_values(x + 0.5, y)
        ra_mx, dec_mx = wcs.pixel_to_world_values(x - 0.5, y)
        ra_py, dec_py = wcs.pixel_to_world_values(x, y + 0.5)
        ra_my, dec_my = wcs.pixel_to_world_values(x, y - 0.5)
        cosd = np.cos(np.radians(dec))
        wrap = lambda d: (np.asarray(d) + 180.0) % 360.0 - 180.0
        a_x, a_y = wrap(ra_px - ra_mx) * cosd, wrap(ra_py - ra_my) * cosd
        d_x, d_y = np.asarray(dec_px) - dec_mx, np.asarray(dec_py) - dec_my
        ex, ey = np.asarray(catalog["x_err"], float), np.asarray(catalog["y_err"], float)
        data["ra_err"] = 3600.0 * np.hypot(a_x * ex, a_y * ey)
        data["dec_err"] = 3600.0 * np.hypot(d_x * ex, d_y * ey)
    return Catalog(data, {**catalog.meta, "wcs": wcs.to_header_string()})
