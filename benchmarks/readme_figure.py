"""The README's figure: the seed question's scenario 8× denser, per-spot fits against crowdfit.

A 200×400 field of 400 spots (amplitude 100, σ = 2, noise N(5, 5); `crowdfit demo`'s dense
field) fitted by the per-spot `curve_fit` recipe and by `crowdfit.fit_image` (σ estimated).
Three panels: the image with both sets of fits and the truth over it (a zoom, where it is
crowded), crowdfit's residual in noise units (`crowdfit.plot_catalog`), and the flux errors
of the spots each method matched within 1 px. Writes `benchmarks/results/readme_figure.png`.

    python benchmarks/readme_figure.py        # needs matplotlib and scipy (the dev extras)
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import crowdfit  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "results", "readme_figure.png")


def _errors(truth, found):
    m = crowdfit.match(truth, found, radius=1.0)
    f = np.asarray(found["flux"])[m.found_index]
    return m, 100 * (f - truth["flux"][m.truth_index]) / truth["flux"][m.truth_index]


def _crowded_corner(truth, shape, size):
    """`(x0, y0)` of the `size` (w, h) window holding the most true spots."""
    w, h = size
    counts = np.zeros(shape)
    np.add.at(counts, (np.rint(truth["y"]).astype(int), np.rint(truth["x"]).astype(int)), 1)
    c = np.pad(counts.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    inside = c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]
    y0, x0 = np.unravel_index(np.argmax(inside), inside.shape)
    return int(x0), int(y0)


def main():
    image, truth = crowdfit.simulate_field((200, 400), 400, seed=4)
    cat = crowdfit.fit_image(image, progress_bar=False)
    spots = crowdfit.per_spot_fit(image)
    m_cf, e_cf = _errors(truth, cat)
    m_ps, e_ps = _errors(truth, spots)

    fig = plt.figure(figsize=(13, 4.3), constrained_layout=True)
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 0.8])
    axes = [fig.add_subplot(grid[0, i]) for i in range(3)]
    crowdfit.plot_catalog(image, cat, truth=truth, axes=axes[:2])
    axes[0].plot(spots["x"], spots["y"], "x", color="yellow", ms=8, mew=1.5, ls="none")
    x0, y0 = _crowded_corner(truth, image.shape, (120, 80))
    for ax in axes[:2]:  # the most crowded corner, where the difference shows
        ax.set_xlim(x0 - 0.5, x0 + 119.5)
        ax.set_ylim(y0 - 0.5, y0 + 79.5)
    axes[0].set_title("truth (+), crowdfit (red), per-spot curve_fit (yellow ×)", fontsize=10)
    bins = np.linspace(-60, 110, 69)  # (errors beyond the ends are counted in the end bins)
    axes[2].hist(np.clip(e_ps, bins[0], bins[-1]), bins, color="goldenrod", histtype="step",
                 lw=1.5, label=f"per-spot: {m_ps.n_matched}/400 found,\n"
                 f"mean {np.mean(e_ps):+.1f} %")  # fmt: skip
    axes[2].hist(np.clip(e_cf, bins[0], bins[-1]), bins, color="tab:red", histtype="step",
                 lw=1.5, label=f"crowdfit: {m_cf.n_matched}/400 found,\n"
                 f"mean {np.mean(e_cf):+.1f} %")  # fmt: skip
    axes[2].set_yscale("log")
    axes[2].set_xlabel("flux error of matched spots (%)")
    axes[2].set_ylabel("spots")
    axes[2].legend(fontsize=9)
    axes[2].set_title("flux errors (within 1 px of a true spot)", fontsize=10)
    fig.savefig(OUT, dpi=80)
    print(f"crowdfit {m_cf.n_matched}/400, mean {np.mean(e_cf):+.2f} %; per-spot "
          f"{m_ps.n_matched}/400, mean {np.mean(e_ps):+.2f} %; written to {OUT}")  # fmt: skip


if __name__ == "__main__":
    main()
