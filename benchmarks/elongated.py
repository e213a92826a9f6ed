"""Elongated spots: crowdfit's round, elliptical and rotated PSF models on tilted ellipses.

Astigmatic microscopes (3-D SMLM), telescope tracking errors and optics off axis make spots
elongated, and often not along the pixel axes. Fields of `crowdfit.simulate_field`: 256²
images of point-sampled rotated Gaussians of σ = 1.6 × 2.6 px (axis ratio 1.63) at angles
0, 0.6 and -1.0 rad, amplitude 100 (flux 2614) on a background of 5 with Gaussian noise 5 (S/N
about 70 a spot), at 0.05 and 0.1 spots per FWHM² (FWHM² = 2.355² σ_x σ_y).

Methods: crowdfit's `fit_image` with `psf="gaussian"` (the default), `"elliptical_gaussian"`
and `"rotated_gaussian"`, each estimating the PSF's shape itself (a user who does not know
the tilt); and photutils' `IterativePSFPhotometry` (three rounds, mode "all") with its
`GaussianPSF` held at the true widths and angle, its star finder's kernel elongated and
tilted like the spots, and given the true background and noise (a user who knows the PSF
exactly; set up as in `crowded_field.py` otherwise). Scores: 1:1
matches within 1 px (`crowdfit.match`); crowdfit's time is a warm call (the second on the
field), photutils' its only call; all in this one process, on this machine's CPU.

Run from the repository root (peers' venv: see `setup_peers.sh`):

    benchmarks/.venv-peers/bin/python benchmarks/elongated.py
    benchmarks/.venv-peers/bin/python benchmarks/elongated.py --angles 0.6 --seeds 1 --no-peer

Writes `benchmarks/results/elongated.md` (or `--out`).
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
SIGMA_X, SIGMA_Y = 1.6, 2.6  # (sigma_y the long axis)
AMPLITUDE, BACKGROUND, NOISE, SIZE = 100.0, 5.0, 5.0, 256


def field(density: float, angle: float, seed: int):
    import crowdfit

    fwhm2 = FWHM_PER_SIGMA**2 * SIGMA_X * SIGMA_Y
    n = int(round(density * SIZE**2 / fwhm2))
    return crowdfit.simulate_field(
        (SIZE, SIZE), n, psf="rotated_gaussian", sigma_x=SIGMA_X, sigma_y=SIGMA_Y, angle=angle,
        flux=AMPLITUDE * 2 * math.pi * SIGMA_X * SIGMA_Y, background=BACKGROUND,
        read_noise=NOISE, seed=seed,
    )  # fmt: skip


def run_crowdfit(image, psf):
    import crowdfit

    crowdfit.fit_image(image, psf=psf, progress_bar=False)  # compile, first call
    t0 = time.perf_counter()
    cat = crowdfit.fit_image(image, psf=psf, progress_bar=False)
    seconds = time.perf_counter() - t0
    found = {k: np.asarray(cat[k]) for k in ("x", "y", "flux")}
    return found, seconds, cat.meta["sigma"]


def photutils_model(angle: float):
    """photutils' `GaussianPSF` for the field's spots, its widths and angle fixed; checked
    against crowdfit's `rotated_gaussian` pixel by pixel (the two angle conventions differ)."""
    from photutils.psf import GaussianPSF

    import crowdfit

    model = GaussianPSF(
        x_fwhm=FWHM_PER_SIGMA * SIGMA_X, y_fwhm=FWHM_PER_SIGMA * SIGMA_Y,
        theta=-math.degrees(angle),
    )  # fmt: skip
    for name in ("x_fwhm", "y_fwhm", "theta"):
        getattr(model, name).fixed = True
    yy, xx = np.mgrid[:25, :25].astype(float)
    p = dict(x=12.3, y=11.8, flux=1.0, sigma_x=SIGMA_X, sigma_y=SIGMA_Y, angle=angle)
    ours = np.asarray(crowdfit.get_psf("rotated_gaussian")(p, xx, yy), float)
    theirs = model.copy()
    theirs.x_0, theirs.y_0, theirs.flux = 12.3, 11.8, 1.0
    if not np.allclose(theirs(xx, yy), ours, atol=1e-6):
        raise RuntimeError("photutils' GaussianPSF does not draw the simulated spots")
    return model


def run_photutils(image, angle):
    sys.path.insert(0, str(HERE))
    import _peers

    odd = lambda v: int(math.ceil(v)) | 1  # noqa: E731
    # DAOStarFinder's kernel elongated like the spots: its long axis counterclockwise from x
    # (rows up), where the rotated Gaussian's sigma_y axis points along (sin a, cos a); a round
    # kernel found 72 of 142 spots tilted by 0.6 rad, this one 137. (Positions held within
    # σ_x of their start, as in `crowded_field.py`: unbounded, a field of 284 spots crashed.)
    long_axis = math.degrees(math.atan2(math.cos(angle), math.sin(angle)))
    finder = dict(fwhm=FWHM_PER_SIGMA * SIGMA_Y, ratio=SIGMA_X / SIGMA_Y, theta=long_axis)
    r = _peers.photutils_psf(
        image, sigma=math.sqrt(SIGMA_X * SIGMA_Y), iterative=True, background=BACKGROUND,
        error=NOISE, fit_shape=odd(3 * SIGMA_Y), psf_model=photutils_model(angle),
        finder_kwargs=finder, xy_bounds=SIGMA_X,
    )  # fmt: skip
    return {k: r[k] for k in ("x", "y", "flux")}, r["time_s"], None


def _shape(sigma) -> str:
    if sigma is None:
        return "given (true)"
    s = [float(v) for v in np.atleast_1d(sigma)]
    text = " × ".join(f"{v:.2f}" for v in s[:2])
    return text + (f" at {s[2]:+.2f} rad" if len(s) == 3 else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--angles", type=float, nargs="+", default=[0.0, 0.6, -1.0])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-peer", action="store_true", help="skip photutils")
    ap.add_argument("--out", default=str(HERE / "results" / "elongated.md"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import crowdfit

    methods = {f"crowdfit psf={p!r}": (lambda im, a, p=p: run_crowdfit(im, p))
               for p in ("gaussian", "elliptical_gaussian", "rotated_gaussian")}  # fmt: skip
    if not args.no_peer:
        methods["photutils iterative, true GaussianPSF"] = run_photutils
    rows, failed = [], []
    t_start = time.perf_counter()
    for density in args.densities:
        for angle in args.angles:
            for name, fn in methods.items():
                scores, shapes = [], []
                for seed in args.seeds:
                    image, truth = field(density, angle, seed)
                    try:
                        found, seconds, shape = fn(image, angle)
                    except Exception as e:  # noqa: BLE001 - a peer's crash is a result too
                        print(f"{density} {angle:+.1f} {name} seed {seed}: failed: {e!r}")
                        failed.append(f"{name} at {density:g} spots/FWHM², {angle:+.1f} rad, "
                                      f"seed {seed}: {type(e).__name__}: {e}")  # fmt: skip
                        continue
                    m = crowdfit.match(truth, found, radius=1.0)
                    scores.append((len(found["x"]), m.jaccard, m.flux_bias_median,
                                   m.flux_bias_mean, seconds))  # fmt: skip
                    shapes.append(shape)
                    print(f"{density} {angle:+.1f} {name} seed {seed}: {len(found['x'])} found"
                          f" of {len(truth['x'])}, J {m.jaccard:.3f}, {seconds:.2f} s")  # fmt: skip
                if not scores:
                    continue
                n, j, med, mean, t = np.mean(scores, axis=0)
                rows.append((density, angle, len(truth["x"]), name, n, j, med, mean, t,
                             _shape(shapes[0])))  # fmt: skip
    lines = [
        "# elongated",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- command: `benchmarks/elongated.py` (total {(time.perf_counter() - t_start) / 60:.1f}"
        " min)",
        f"- fields: {SIZE}², rotated Gaussians σ = {SIGMA_X} × {SIGMA_Y} px, amplitude"
        f" {AMPLITUDE:g}, background {BACKGROUND:g}, noise {NOISE:g}; seeds {args.seeds}"
        " (scores are their means; the shape column is the first seed's); matches within 1 px;"
        " crowdfit warm, estimating the PSF's shape; photutils given it, one call.",
        "",
        "| spots / FWHM² | angle (rad) | spots | method | found | Jaccard | median flux err"
        " | mean flux err | time (s) | PSF shape (σ_x × σ_y) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for density, angle, n_true, name, n, j, med, mean, t, shape in rows:
        lines.append(
            f"| {density:g} | {angle:+.1f} | {n_true} | {name} | {n:.0f} | {j:.3f} "
            f"| {med * 100:+.2f} % | {mean * 100:+.2f} % | {t:.2f} | {shape} |"
        )
    if failed:
        lines += ["", "Failed (left out of the means above):", ""] + [f"- {f}" for f in failed]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
