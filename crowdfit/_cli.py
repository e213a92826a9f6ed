"""The `crowdfit` command line: `crowdfit fit IMAGE`, `crowdfit traces MOVIE`, `crowdfit demo`."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

__all__ = ["main"]


_TABLES = (".fits", ".fit", ".fts")


def _check_out(path: str, fits: bool = False) -> None:
    """Before a long fit: the output is a CSV file (or, with `fits`, a FITS table) in a folder
    that exists."""
    ext = os.path.splitext(path)[1].lower()
    if fits and ext in _TABLES:
        try:
            import astropy  # noqa: F401
        except ImportError:
            raise ImportError(f"--out {path}: FITS tables need astropy: pip install "
                              "'crowdfit[fits]'") from None  # fmt: skip
    elif ext not in (".csv", ".txt"):
        also = " or a .fits table" if fits else ""
        raise ValueError(f"--out {path}: the output is written as CSV; name a .csv file{also}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out {path}: no such folder: {folder}")


def _mask(path, shape):
    """The `--mask` file's pixels, True (nonzero) where a pixel counts, or None."""
    if path is None:
        return None
    from ._io import read_image

    mask = np.asarray(read_image(path, mmap=False)) != 0
    if mask.shape != tuple(shape):
        raise ValueError(f"--mask {path} has shape {mask.shape}, the image {tuple(shape)}")
    return mask


def _width(sigma) -> str:
    if sigma is None:
        return "none"
    s = [float(v) for v in np.atleast_1d(sigma)]
    angle = f" at {s.pop():.3f} rad" if len(s) == 3 else ""
    return ", ".join(f"{v:.3f}" for v in s) + angle


def _sigma(value: str):
    """`--sigma`: one number, or comma-separated widths (and an angle), as `fit_image` takes
    them (it checks how many)."""
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a number or comma-separated numbers (e.g. 2 or 1.6,2.6)"
        ) from None
    return numbers[0] if len(numbers) == 1 else numbers


_PSF = dict(
    default="gaussian", metavar="PSF",
    choices=["gaussian", "integrated_gaussian", "elliptical_gaussian",
             "integrated_elliptical_gaussian", "rotated_gaussian"],
    help="PSF model: gaussian (default), integrated_gaussian (pixel-integrated), "
    "elliptical_gaussian (widths along x and y), integrated_elliptical_gaussian, "
    "rotated_gaussian (tilted ellipse: widths and angle)",
)  # fmt: skip
_BACKGROUND = dict(
    default="constant", choices=["constant", "plane"],
    help="each region's background on top of the smooth map (default constant)",
)  # fmt: skip
_NOISE = dict(
    default="gaussian", choices=["gaussian", "poisson"],
    help="noise model: gaussian (default) or poisson (counts: subtract the camera --offset)",
)  # fmt: skip
_SIGMA = dict(
    type=_sigma, default=None,
    help="PSF width: one number, sigma_x,sigma_y, or (--psf rotated_gaussian) "
    "sigma_x,sigma_y,angle with the angle in radians (default: estimate)",
)  # fmt: skip


def _fit(args) -> int:
    from ._image import fit_image
    from ._io import read_header, read_image, sky_coordinates

    out = args.out or "catalog.csv"
    _check_out(out, fits=True)
    if args.plot:
        _check_plot(args.plot)
    image = read_image(args.image, mmap=False, hdu=args.hdu)
    header = read_header(args.image, hdu=args.hdu)
    saturation = args.saturation
    if saturation is None and header is not None and _positive(header.get("SATURATE")):
        saturation = float(header["SATURATE"])
        print(f"saturation {saturation:g} (the header's SATURATE)", file=sys.stderr)
    if image.ndim == 3 and image.shape[-1] not in (3, 4):
        print(
            f"{args.image} holds a stack of {image.shape[0]} frames; fitting the first "
            "(use `crowdfit traces` for movies)",
            file=sys.stderr,
        )
        image = image[0]
    cat = fit_image(
        image, psf=args.psf, sigma=args.sigma, background=args.background, noise=args.noise,
        mask=_mask(args.mask, image.shape), threshold=args.threshold, offset=args.offset,
        min_snr=args.min_snr, rounds=args.rounds, split=not args.no_split,
        spikes=not args.keep_spikes, saturation=saturation, psf_error=args.psf_error,
        psf_wings=not args.no_wings, progress_bar=not args.quiet,
    )  # fmt: skip
    sky = ""
    if header is not None and _celestial(header):
        cat, sky = sky_coordinates(cat, header), " with ra, dec from the header's WCS"
    if os.path.splitext(out)[1].lower() in _TABLES:
        cat.to_fits(out, overwrite=True)
    else:
        cat.to_csv(out)
    print(f"{len(cat)} sources (sigma {_width(cat.meta.get('sigma'))}) written to {out}{sky}")
    if args.plot:
        _save_plot(image, cat, args.plot)
    return 0


def _save_plot(image, cat, path) -> None:
    """`--plot`: the image with its sources beside the residual (`plot_catalog`), saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._plot import plot_catalog

    fig = plot_catalog(image, cat)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot of the image and the residual written to {path}")


def _check_plot(path) -> None:
    """Before a long fit: matplotlib is there, and the plot's folder exists."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'crowdfit[plot]'") from None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--plot {path}: no such folder: {folder}")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < np.inf


def _celestial(header) -> bool:
    """Whether a FITS header holds a celestial WCS (astropy's notes on it are not shown)."""
    import warnings

    from astropy.wcs import WCS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return WCS(header).has_celestial
        except Exception:  # (a malformed WCS: the catalog keeps pixel positions only)
            return False


def _hdu(value: str):
    return int(value) if value.lstrip("-").isdigit() else value


def _projection(value: str):
    return value if value in ("mean", "max") else int(value)


def _traces(args) -> int:
    from ._io import read_image
    from ._movie import fit_movie

    _check_out(args.out)
    frames = read_image(args.movie, hdu=args.hdu)
    traces = fit_movie(
        frames, psf=args.psf, sigma=args.sigma, background=args.background,
        noise=args.noise, projection=args.projection, drift=args.drift,
        mask=_mask(args.mask, np.shape(frames)[1:]), threshold=args.threshold,
        offset=args.offset, min_snr=args.min_snr, spikes=not args.keep_spikes,
        progress_bar=not args.quiet,
    )  # fmt: skip
    traces.to_csv(args.out)
    s = _width(traces.catalog.meta.get("sigma"))
    print(f"{len(traces)} spots x {traces.n_frames} frames (sigma {s}) written to {args.out}")
    return 0


def _demo(args) -> int:
    from ._demo import run_demo

    run_demo(quick=args.quick, out=args.out, seed=args.seed)
    return 0


def _common(parser) -> None:
    """Options `fit` and `traces` share besides the PSF's, noise's and background's."""
    parser.add_argument(
        "--mask", default=None,
        help="image file of the same shape: nonzero where a pixel counts (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--min-snr", type=float, default=5.0, help="least flux / flux_err kept (default 5)"
    )
    parser.add_argument(
        "--hdu", type=_hdu, default=None,
        help="FITS files: the HDU's index or EXTNAME (default: the first holding an image)",
    )  # fmt: skip


def main(argv=None) -> int:
    """Entry point of the `crowdfit` command."""
    parser = argparse.ArgumentParser(
        prog="crowdfit", description="Joint fitting of overlapping spots and stars."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="detect and fit every source of an image")
    fit.add_argument(
        "image",
        help="TIFF, FITS, PNG or .npy image (FITS: a celestial WCS adds ra, dec to the catalog, "
        "and SATURATE is the saturation level unless given)",
    )
    fit.add_argument("--psf", **_PSF)
    fit.add_argument("--sigma", **_SIGMA)
    fit.add_argument("--background", **_BACKGROUND)
    fit.add_argument("--noise", **_NOISE)
    fit.add_argument("--threshold", type=float, default=None, help="detection threshold (σ)")
    fit.add_argument("--offset", type=float, default=0.0, help="camera offset to subtract")
    fit.add_argument(
        "--no-split", action="store_true", help="no likelihood-ratio test for close pairs"
    )
    fit.add_argument(
        "--keep-spikes", action="store_true",
        help="do not mask pixels sharper than the PSF (hot pixels or columns, cosmic rays)",
    )  # fmt: skip
    fit.add_argument(
        "--saturation", type=float, default=None,
        help="saturation level: pixels at or above it are masked (default: found; inf: none)",
    )  # fmt: skip
    fit.add_argument(
        "--psf-error", type=float, default=0.01,
        help="the PSF model's fractional error (default 0.01; 0: exact, for simulations)",
    )  # fmt: skip
    fit.add_argument(
        "--no-wings", action="store_true",
        help="fit Gaussians alone (default: measure the PSF's wings where the image shows them)",
    )  # fmt: skip
    _common(fit)
    fit.add_argument(
        "--rounds", type=int, default=3, help="rounds of residual search and refit (default 3)"
    )
    fit.add_argument(
        "--out", default=None, help="output CSV, or FITS table (.fits) (default catalog.csv)"
    )
    fit.add_argument(
        "--plot", default=None, help="PNG (or PDF, SVG) of the image with its sources and residual"
    )
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=_fit)

    traces = sub.add_parser("traces", help="intensity trace of every spot of a (T, H, W) movie")
    traces.add_argument("movie", help="TIFF stack, FITS cube or .npy movie (memory-mapped)")
    traces.add_argument("--psf", **_PSF)
    traces.add_argument("--sigma", **_SIGMA)
    traces.add_argument("--background", **_BACKGROUND)
    traces.add_argument("--noise", **_NOISE)
    traces.add_argument(
        "--projection", type=_projection, default="mean",
        help="find spots on the 'mean' or 'max' of the frames, or the mean of the first N",
    )  # fmt: skip
    traces.add_argument("--drift", action="store_true", help="fit positions in every frame")
    traces.add_argument("--threshold", type=float, default=None, help="detection threshold (σ)")
    traces.add_argument("--offset", type=float, default=0.0, help="camera offset to subtract")
    traces.add_argument(
        "--keep-spikes", action="store_true", help="do not mask hot pixels of the projection"
    )
    _common(traces)
    traces.add_argument("--out", default="traces.csv", help="output CSV (long format)")
    traces.add_argument("--quiet", action="store_true", help="no progress bar")
    traces.set_defaults(func=_traces)

    demo = sub.add_parser("demo", help="the seed question's field and an 8x denser one")
    demo.add_argument("--quick", action="store_true", help="smaller fields")
    demo.add_argument("--out", default="crowdfit_demo.png", help="PNG of the fits")
    demo.add_argument("--seed", type=int, default=4)
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"crowdfit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
