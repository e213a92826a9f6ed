"""PSF shape: stars whose PSF is a Moffat, not a Gaussian, measured with Gaussians (+ wings).

Fields of `crowdfit.simulate_field` with a point-sampled circular Moffat PSF of FWHM 4.71 px
(a Gaussian's of σ = 2) and β = 2.5, 3 or 4.5 (seeing-limited stars: β ≈ 2.5-4.5), on 256²
images at 0.02, 0.05 and 0.1 stars per FWHM², every star of flux 2513 (S/N ~ 70 alone) on a
background of 5 with Gaussian noise 5; and one field of bright stars (flux 25130, S/N ~ 700)
at 0.02 stars/FWHM² on 384².

Methods: crowdfit's `fit_image` at its defaults, σ estimated (the PSF's wings measured, see
`crowdfit._wings`); the same with `psf_wings=False` (Gaussians alone); crowdsource given the
true PSF (its own `crowdsource.psf.MoffatPSF` of the true FWHM and β, normalised over a 19²
stamp as crowdsource does; background subtracted, weight 1/noise, as in `crowded_field.py`).
Scores: 1:1 matches within 1 px; flux errors against each star's total flux. crowdfit's time
is a warm call (the second on the field), crowdsource's its only call.

Run from the repository root (peers' venv: see `setup_peers.sh`):

    benchmarks/.venv-peers/bin/python benchmarks/psf_shape.py
    benchmarks/.venv-peers/bin/python benchmarks/psf_shape.py --betas 3 --seeds 0 --no-peer

Writes `benchmarks/results/psf_shape.md` (or `--out`).
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
FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0)) * 2.0
BACKGROUND = 5.0
NOISE = 5.0
FLUX = 2513.2741
# (density in stars/FWHM², side, flux)
FIELDS = [(0.02, 256, FLUX), (0.05, 256, FLUX), (0.1, 256, FLUX), (0.02, 384, 10 * FLUX)]


def moffat(beta: float):
    """A circular Moffat PSF of FWHM `FWHM` as a `simulate_field` PSF function."""
    alpha = FWHM / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))

    def render(p, x, y):
        r2 = (x - p["x"]) ** 2 + (y - p["y"]) ** 2
        return p["flux"] * (beta - 1.0) / (math.pi * alpha**2) * (1.0 + r2 / alpha**2) ** -beta

    return render


def field(beta, density, side, flux, seed):
    import crowdfit

    n = int(round(density * side**2 / FWHM**2))
    return crowdfit.simulate_field(
        (side, side), n, psf=moffat(beta), flux=flux, background=BACKGROUND, read_noise=NOISE,
        stamp_radius=60, seed=seed,
    )  # fmt: skip


def run_crowdfit(image, beta, **kwargs):
    import crowdfit

    crowdfit.fit_image(image, progress_bar=False, **kwargs)  # compile, first call
    t0 = time.perf_counter()
    cat = crowdfit.fit_image(image, progress_bar=False, **kwargs)
    wings = cat.meta["wings"]
    note = f"wings {100 * wings.light:.0f} % of the light" if wings is not None else "no wings"
    return {k: np.asarray(cat[k]) for k in ("x", "y", "flux")}, time.perf_counter() - t0, note


def run_crowdsource(image, beta):
    sys.path.insert(0, str(HERE))
    import _peers
    from crowdsource.psf import MoffatPSF

    class Moffat(MoffatPSF):  # (crowdsource's own call without a stamp size fails on it)
        def __call__(self, x, y, stampsz=None, deriv=False):
            return super().__call__(x, y, stampsz=stampsz or 59, deriv=deriv)

    r = _peers.crowdsource_fit(image, sigma=2.0, background=BACKGROUND, noise=NOISE,
                               psf=Moffat(FWHM, beta))  # fmt: skip
    return {k: r[k] for k in ("x", "y", "flux")}, r["time_s"], "true PSF"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--betas", type=float, nargs="+", default=[2.5, 3.0, 4.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--no-peer", action="store_true", help="skip crowdsource")
    ap.add_argument("--out", default=str(HERE / "results" / "psf_shape.md"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import crowdfit

    methods = {
        "crowdfit (wings measured)": lambda im, b: run_crowdfit(im, b),
        "crowdfit, psf_wings=False": lambda im, b: run_crowdfit(im, b, psf_wings=False),
    }
    if not args.no_peer:
        methods["crowdsource (true Moffat PSF)"] = run_crowdsource
    rows = []
    t_start = time.perf_counter()
    for beta in args.betas:
        for density, side, flux in FIELDS:
            for name, fn in methods.items():
                scores, notes = [], []
                for seed in args.seeds:
                    image, truth = field(beta, density, side, flux, seed)
                    found, seconds, note = fn(image, beta)
                    m = crowdfit.match(truth, found, radius=1.0)
                    scores.append((len(found["x"]), m.jaccard, m.recall, m.precision,
                                   m.flux_bias_median, m.flux_bias_mean, seconds))  # fmt: skip
                    notes.append(note)
                    print(f"β={beta} {density} {side} {flux:.0f} {name} seed {seed}: "
                          f"J {m.jaccard:.3f}, flux {100 * m.flux_bias_median:+.1f} %, "
                          f"{note}")  # fmt: skip
                found_n, j, r, p, bmed, bmean, t = np.mean(scores, axis=0)
                rows.append((beta, density, side, flux, len(truth["x"]), name, found_n, j, r, p,
                             bmed, bmean, t, "; ".join(notes)))  # fmt: skip
    lines = [
        "# psf_shape",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- versions: crowdfit {crowdfit.__version__}",
        f"- command: `benchmarks/psf_shape.py` (total {(time.perf_counter() - t_start) / 60:.1f}"
        " min)",
        f"- fields: Moffat PSF, FWHM {FWHM:.2f} px, background {BACKGROUND:g}, noise {NOISE:g};"
        f" seeds {args.seeds} (scores are their means; notes per seed); matches within 1 px;"
        " crowdfit σ estimated, warm; crowdsource one call.",
        "",
        "| β | density (/FWHM²) | side | flux | stars | method | found | Jaccard | recall |"
        " precision | median flux err | mean flux err | time (s) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for beta, density, side, flux, n, name, found_n, j, r, p, bmed, bmean, t, notes in rows:
        lines.append(
            f"| {beta:g} | {density:g} | {side} | {flux:.0f} | {n} | {name} | {found_n:.0f} "
            f"| {j:.3f} | {r:.3f} | {p:.3f} | {bmed * 100:+.1f} % | {bmean * 100:+.1f} % "
            f"| {t:.2f} | {notes} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
