"""`crowdfit demo`: the seed question's field and an 8× denser one, against per-spot fits."""

from __future__ import annotations

import time

import numpy as np

from ._image import fit_image
from ._match import match
from ._simulate import simulate_field

__all__ = ["run_demo"]

# The seed question's field: 200×400 pixels, spots of amplitude 100 and σ = 2, noise N(5, 5).
SEED_SHAPE = (200, 400)
SEED_SPOTS = 50


def _row(name, method, truth, found, seconds):
    m = match(truth, found, radius=1.0)
    return (
        f"{name:<16} {method:<22} {m.n_matched:>4}/{m.n_truth:<4} {m.recall:>7.1%} "
        f"{m.jaccard:>7.3f} {m.flux_error_median_abs:>10.2%} {m.flux_bias_mean:>+9.2%} "
        f"{seconds:>8.2f}"
    )


def run_demo(*, quick: bool = False, out: str | None = "crowdfit_demo.png", seed: int = 4):
    """Simulate the seed's field and one 8× denser, fit both with crowdfit and with the per-spot
    `curve_fit` recipe, print recall and flux errors against the truth, and plot the fits.

    **Arguments:** `quick` halves the fields; `out` is the PNG written (when matplotlib is
    installed; `None` for none); `seed` the random seed.

    **Returns:** a dict of the catalogs, keyed by field name.
    """
    shape = (100, 200) if quick else SEED_SHAPE
    n = SEED_SPOTS // 4 if quick else SEED_SPOTS
    fields = {"seed (x1)": n, "dense (x8)": 8 * n}
    try:
        from ._baseline import per_spot_fit
    except ImportError:  # pragma: no cover - scipy is in the dev extra
        per_spot_fit = None

    header = (
        f"{'field':<16} {'method':<22} {'found':>9} {'recall':>7} {'jaccard':>7} "
        f"{'|dflux| med':>10} {'bias mean':>9} {'time s':>8}"
    )
    print(
        f"crowdfit demo: {shape[0]}x{shape[1]} px, spots of amplitude 100, sigma 2, noise N(5, 5)"
    )
    print("matched to the truth within 1 px; first crowdfit call includes compilation\n")
    print(header)
    print("-" * len(header))
    results = {}
    for name, count in fields.items():
        image, truth = simulate_field(shape, count, seed=seed)
        t = time.perf_counter()
        cat = fit_image(image)
        print(_row(name, "crowdfit.fit_image", truth, cat, time.perf_counter() - t), flush=True)
        spots = None
        if per_spot_fit is not None:
            t = time.perf_counter()
            spots = per_spot_fit(image)
            print(_row(name, "per-spot curve_fit", truth, spots, time.perf_counter() - t))
        results[name] = dict(image=image, truth=truth, crowdfit=cat, per_spot=spots)
    if per_spot_fit is None:
        print("\n(install scipy for the per-spot curve_fit comparison)")
    if out:
        _plot(results, out)
    return results


def _plot(results, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(install matplotlib for the plot: pip install 'crowdfit[plot]')")
        return
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 5 * len(results)))
    for ax, (name, r) in zip(np.atleast_1d(axes), results.items(), strict=True):
        ax.imshow(r["image"], origin="lower", cmap="gray")
        ax.scatter(r["truth"]["x"], r["truth"]["y"], s=6, c="cyan", label="truth")
        if r["per_spot"] is not None:
            ax.scatter(r["per_spot"]["x"], r["per_spot"]["y"], s=40, marker="x", c="yellow",
                       linewidths=0.8, label="per-spot curve_fit")  # fmt: skip
        ax.scatter(r["crowdfit"]["x"], r["crowdfit"]["y"], s=60, facecolors="none",
                   edgecolors="red", linewidths=0.8, label="crowdfit")  # fmt: skip
        ax.set_title(name)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"\nplot written to {out}")
