"""The `crowdfit` command line: `crowdfit fit IMAGE`, `crowdfit traces MOVIE`, `crowdfit demo`."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _fit(args) -> int:
    from ._image import fit_image
    from ._io import read_image

    image = read_image(args.image, mmap=False)
    if image.ndim == 3 and image.shape[-1] not in (3, 4):
        print(
            f"{args.image} holds a stack of {image.shape[0]} frames; fitting the first "
            "(use `crowdfit traces` for movies)",
            file=sys.stderr,
        )
        image = image[0]
    cat = fit_image(
        image, psf=args.psf, sigma=args.sigma, background=args.background, noise=args.noise,
        threshold=args.threshold, offset=args.offset, split=not args.no_split,
        spikes=not args.keep_spikes, saturation=args.saturation, psf_error=args.psf_error,
        psf_wings=not args.no_wings, progress_bar=not args.quiet,
    )  # fmt: skip
    out = args.out or "catalog.csv"
    cat.to_csv(out)
    s = cat.meta.get("sigma")
    print(f"{len(cat)} sources (sigma {s}) written to {out}")
    return 0


def _projection(value: str):
    return value if value in ("mean", "max") else int(value)


def _traces(args) -> int:
    from ._io import read_image
    from ._movie import fit_movie

    frames = read_image(args.movie)
    traces = fit_movie(
        frames, psf=args.psf, sigma=args.sigma, background=args.background, noise=args.noise,
        projection=args.projection, drift=args.drift, threshold=args.threshold,
        offset=args.offset, spikes=not args.keep_spikes, progress_bar=not args.quiet,
    )  # fmt: skip
    traces.to_csv(args.out)
    s = traces.catalog.meta.get("sigma")
    print(f"{len(traces)} spots x {traces.n_frames} frames (sigma {s}) written to {args.out}")
    return 0


def _demo(args) -> int:
    from ._demo import run_demo

    run_demo(quick=args.quick, out=args.out, seed=args.seed)
    return 0


def main(argv=None) -> int:
    """Entry point of the `crowdfit` command."""
    parser = argparse.ArgumentParser(
        prog="crowdfit", description="Joint fitting of overlapping spots and stars."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="detect and fit every source of an image")
    fit.add_argument("image", help="TIFF, PNG or .npy image")
    fit.add_argument("--psf", default="gaussian")
    fit.add_argument("--sigma", type=float, default=None, help="PSF width (default: estimate)")
    fit.add_argument("--background", default="constant", choices=["constant", "plane"])
    fit.add_argument("--noise", default="gaussian", choices=["gaussian", "poisson"])
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
    fit.add_argument("--out", default=None, help="output CSV (default catalog.csv)")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=_fit)

    traces = sub.add_parser("traces", help="intensity trace of every spot of a (T, H, W) movie")
    traces.add_argument("movie", help="TIFF stack or .npy movie (memory-mapped)")
    traces.add_argument("--psf", default="gaussian")
    traces.add_argument("--sigma", type=float, default=None, help="PSF width (default: estimate)")
    traces.add_argument("--background", default="constant", choices=["constant", "plane"])
    traces.add_argument("--noise", default="gaussian", choices=["gaussian", "poisson"])
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
    except (ValueError, FileNotFoundError) as e:
        print(f"crowdfit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
