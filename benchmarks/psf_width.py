"""PSF width: the same crowd at every pixel scale, crowdfit's default against a fixed window.

Fields of `crowdfit.simulate_field`: point-sampled Gaussians of width σ on a square image of
128σ a side, at 0.1 stars per FWHM² (295 stars whatever σ), each star at S/N 71 alone (the
crowded_field benchmark's: flux 2513 · σ/2 on a background of 5 with Gaussian noise 5). In
units of the PSF the fields are the same; only the pixel scale changes. So every score should
be the same at every σ, up to sampling at the narrow end.

Methods, each given σ: crowdfit's `fit_image` at its defaults (windows of `max(32, 16⌈σ⌉)`
pixels a side, `crowdfit._group.default_max_window`); the same with `max_window=32`, the fixed
bound before the default scaled with σ; and crowdsource (set up as in `crowded_field.py`:
known σ, background subtracted, weight 1/noise), the strongest peer in crowds. Scores: 1:1
matches within σ/2 (1 px at σ = 2). crowdfit's time is a warm call (the second on the field),
crowdsource's its only call; all in this one process.

Run from the repository root (peers' venv: see `setup_peers.sh`):

    benchmarks/.venv-peers/bin/python benchmarks/psf_width.py
    benchmarks/.venv-peers/bin/python benchmarks/psf_width.py --sigmas 2 5 --seeds 3

Writes `benchmarks/results/psf_width.md` (or `--out`).
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
DENSITY = 0.1
BACKGROUND = 5.0
NOISE = 5.0


def field(sigma: float, seed: int):
    import crowdfit

    size = int(round(128 * sigma))
    n = int(round(DENSITY * size**2 / (FWHM_PER_SIGMA * sigma) ** 2))
    return crowdfit.simulate_field(
        (size, size), n, sigma=sigma, flux=2513.2741 * sigma / 2.0, background=BACKGROUND,
        read_noise=NOISE, seed=seed,
    )  # fmt: skip


def run_crowdfit(image, sigma, **kwargs):
    import crowdfit

    crowdfit.fit_image(image, sigma=sigma, progress_bar=False, **kwargs)  # compile, first call
    t0 = time.perf_counter()
    cat = crowdfit.fit_image(image, sigma=sigma, progress_bar=False, **kwargs)
    return {k: np.asarray(cat[k]) for k in ("x", "y", "flux")}, time.perf_counter() - t0


def run_crowdsource(image, sigma):
    sys.path.insert(0, str(HERE))
    import _peers

    r = _peers.crowdsource_fit(image, sigma=sigma, background=BACKGROUND, noise=NOISE)
    return {k: r[k] for k in ("x", "y", "flux")}, r["time_s"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--no-peer", action="store_true", help="skip crowdsource")
    ap.add_argument("--out", default=str(HERE / "results" / "psf_width.md"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import crowdfit
    from crowdfit._group import default_max_window

    methods = {
        "crowdfit (default window)": lambda im, s: run_crowdfit(im, s),
        "crowdfit, max_window=32": lambda im, s: run_crowdfit(im, s, max_window=32),
    }
    if not args.no_peer:
        methods["crowdsource"] = run_crowdsource
    rows = []
    t_start = time.perf_counter()
    for sigma in args.sigmas:
        for name, fn in methods.items():
            scores = []
            for seed in args.seeds:
                image, truth = field(sigma, seed)
                found, seconds = fn(image, sigma)
                m = crowdfit.match(truth, found, radius=0.5 * sigma)
                scores.append((m.jaccard, m.recall, m.precision, m.flux_bias_mean, seconds))
                print(f"σ={sigma} {name} seed {seed}: J {m.jaccard:.3f}, {seconds:.2f} s")
            j, r, p, b, t = np.mean(scores, axis=0)
            window = default_max_window(sigma) if name.endswith("(default window)") else None
            rows.append((sigma, image.shape[0], len(truth["x"]), name, window, j, r, p, b, t))
    lines = [
        "# psf_width",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- command: `benchmarks/psf_width.py` (total {(time.perf_counter() - t_start) / 60:.1f}"
        " min)",
        f"- fields: {DENSITY} stars/FWHM², side 128σ, S/N 71 per star, seeds {args.seeds}"
        " (scores are their means); matches within σ/2; crowdfit warm, crowdsource one call.",
        "",
        "| σ (px) | side | stars | method | window bound (px) | Jaccard | recall | precision"
        " | mean flux err | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sigma, side, n, name, window, j, r, p, b, t in rows:
        bound = {"crowdsource": "–", "crowdfit, max_window=32": "32"}.get(name, str(window))
        lines.append(
            f"| {sigma:g} | {side} | {n} | {name} | {bound} | {j:.3f} | {r:.3f} | {p:.3f} "
            f"| {b * 100:+.2f} % | {t:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
