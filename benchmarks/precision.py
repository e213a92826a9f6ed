"""Precision benchmark: how close crowdfit (and picasso's `gaussmle`) come to the Cramér–Rao bound.

Prints precision / sqrt(CRLB) for isolated spots over photons x background, and for pairs over
separation (joint bound), and writes a plot to `benchmarks/precision.png`.

Run from the repository root:

    .venv/bin/python benchmarks/precision.py            # 10^4 spots per setting
    .venv/bin/python benchmarks/precision.py --quick    # 2000 spots per setting

The spots are picasso's benchmark (ANCHORS.md): 7x7 windows, pixel-integrated Gaussian,
sigma = 1.3, Poisson counts, centres within ±0.5 px of the window centre. crowdfit fits x, y,
flux, sigma and background by Poisson maximum likelihood from a centroid start, as does picasso
(`method="sigma"`, its own start); both are compared with the CRLB of that same five-parameter
model at the truth. Pairs (16x16, 1000 photons each, background 10) are fitted jointly with sigma
known, from a start a fraction of a pixel off the truth at 80 % of the flux.

Precision is std(fit - truth) / sqrt(mean CRLB) over every region (converged or not, outliers
included); `robust` is the same with 1.4826 MAD in place of std; `pull` is the std of
(fit - truth) / reported error (crowdfit's errors; picasso's are its own CRLB at the fit).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

import crowdfit
from crowdfit._crlb import crlb

HERE = Path(__file__).resolve().parent
SIGMA = 1.3
PHOTONS = (100, 1000, 10000)
BACKGROUNDS = (1, 10, 100)
SEPARATIONS = (1.0, 1.5, 2.0, 3.0, 4.0)  # in units of sigma


def centroid_start(windows: np.ndarray, sigma: float = 1.5) -> dict:
    """Border-median background, background-subtracted sum and centroid of each `(H, W)` window."""
    border = np.concatenate(
        [windows[:, 0], windows[:, -1], windows[:, 1:-1, 0], windows[:, 1:-1, -1]], axis=1
    )
    bg = np.median(border, axis=1)
    signal = np.clip(windows - bg[:, None, None], 0.0, None)
    total = signal.sum(axis=(1, 2)) + 1e-9
    h, w = windows.shape[1:]
    x = (signal.sum(axis=1) * np.arange(w)).sum(1) / total
    y = (signal.sum(axis=2) * np.arange(h)).sum(1) / total
    flux = np.maximum((windows - bg[:, None, None]).sum(axis=(1, 2)), 1.0)
    return dict(
        x=x[:, None],
        y=y[:, None],
        flux=flux[:, None],
        sigma=np.full((len(windows), 1), sigma),
        background=bg,
    )


def precision(est, truth, bound) -> tuple[float, float]:
    """(std, robust std) of `est - truth` over the root-mean-square bound; NaN fits count as
    infinitely wrong for the robust one and are dropped from the plain one."""
    err = np.asarray(est, float).reshape(-1) - np.asarray(truth, float).reshape(-1)
    rms = np.sqrt(np.mean(np.asarray(bound, float).reshape(-1) ** 2))
    finite = np.isfinite(err)
    robust = np.where(finite, err, np.inf)
    mad = 1.4826 * np.median(np.abs(robust - np.median(robust)))
    return float(np.std(err[finite]) / rms), float(mad / rms)


def pull_width(est, truth, errors) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (np.asarray(est, float) - np.asarray(truth, float)) / np.asarray(errors, float)
    p = p.reshape(-1)
    return float(np.std(p[np.isfinite(p)]))


def load_picasso():
    sys.path.insert(0, str(HERE))
    try:
        from _peers import picasso_gaussmle
    except Exception as e:  # noqa: BLE001 - any failure means: no picasso column
        print(f"note: picasso column skipped ({type(e).__name__}: {e})")
        return None
    return picasso_gaussmle


def run_picasso(gaussmle, stacks: list[np.ndarray]):
    """Fit all settings in one picasso call (its start-up and numba compile cost ~10 s); when a
    call fails, split it in halves, down to the one setting that fails.

    Yields `(indices of the settings, result or None)`."""
    todo = [list(range(len(stacks)))]
    while todo:
        group = todo.pop()
        try:
            res = gaussmle(
                np.concatenate([stacks[i] for i in group]).astype(np.float32),
                eps=1e-3,
                max_it=100,
                method="sigma",
            )
        except Exception as e:  # noqa: BLE001 - a peer failing is a result, not a crash
            if len(group) > 1:
                todo += [group[: len(group) // 2], group[len(group) // 2 :]]
                continue
            last = str(e).strip().splitlines()[-1]
            print(f"note: picasso failed on setting {group[0]}: {last}")
            res = None
        yield group, res


def isolated(n: int, seed: int, use_picasso: bool) -> list[dict]:
    settings = [(p, b) for p in PHOTONS for b in BACKGROUNDS]
    sims = [
        crowdfit.simulate_spots(n, flux=float(p), background=float(b), seed=seed + i)
        for i, (p, b) in enumerate(settings)
    ]

    # One compile for every setting: same shapes; the first fit is the warm-up.
    warm = centroid_start(sims[0][0])
    jax.block_until_ready(
        crowdfit.fit_regions(sims[0][0], warm, psf="integrated_gaussian", noise="poisson").params
    )
    rows = []
    for (photons, bg), (windows, truth) in zip(settings, sims, strict=True):
        t0 = time.perf_counter()
        fit = crowdfit.fit_regions(
            windows, centroid_start(windows), psf="integrated_gaussian", noise="poisson"
        )
        jax.block_until_ready(fit.params)
        elapsed = time.perf_counter() - t0
        params = {k: truth[k][:, None] for k in ("x", "y", "flux", "sigma")}
        params["background"] = truth["background"]
        bound = crlb(params, psf="integrated_gaussian", shape=windows.shape[1:])
        row = dict(
            photons=photons,
            background=bg,
            crlb_x=float(np.mean(bound.errors["x"])),
            converged=float(np.mean(fit.converged)),
            fits_per_s=n / elapsed,
        )
        for k in ("x", "y", "flux"):
            est = np.asarray(fit.params[k])[:, 0]
            b = np.asarray(bound.errors[k])[:, 0]
            row[f"cf_{k}"], row[f"cf_{k}_robust"] = precision(est, truth[k], b)
            row[f"cf_{k}_pull"] = pull_width(est, truth[k], np.asarray(fit.errors[k])[:, 0])
            row[f"_bound_{k}"] = b
        rows.append(row)

    gaussmle = load_picasso() if use_picasso else None
    if gaussmle is not None:
        for group, res in run_picasso(gaussmle, [w for w, _ in sims]):
            for j, i in enumerate(group):
                row, truth, part = rows[i], sims[i][1], slice(j * n, (j + 1) * n)
                if res is None:
                    row["pi_failed"] = True
                    continue
                for k, pk in (("x", "x"), ("y", "y"), ("flux", "photons")):
                    est = res[pk][part]
                    row[f"pi_{k}"], row[f"pi_{k}_robust"] = precision(
                        est, truth[k], row[f"_bound_{k}"]
                    )
                    sd = np.sqrt(np.maximum(res["crlb_" + pk][part], 0.0))
                    row[f"pi_{k}_pull"] = pull_width(est, truth[k], sd)
                row["pi_fits_per_s"] = res["fits_per_s"]
    return rows


def pairs(n: int, seed: int) -> list[dict]:
    seps = np.repeat(np.asarray(SEPARATIONS) * SIGMA, n)
    m = seps.size
    windows, truth = crowdfit.simulate_pairs(m, seps, jitter=0.5, seed=seed)
    rng = np.random.default_rng(seed + 1)
    start = centroid_start(windows)
    start.update(
        x=truth["x"] + rng.uniform(-0.3, 0.3, (m, 2)),
        y=truth["y"] + rng.uniform(-0.3, 0.3, (m, 2)),
        flux=0.8 * truth["flux"],
        sigma=np.full((m, 2), SIGMA),
    )
    fit = crowdfit.fit_regions(
        windows, start, psf="integrated_gaussian", noise="poisson", fixed=("sigma",)
    )
    params = {k: truth[k] for k in ("x", "y", "flux", "sigma")}
    params["background"] = truth["background"][:, 0]
    kw = dict(psf="integrated_gaussian", shape=windows.shape[1:], fixed=("sigma",))
    joint = crlb(params, **kw)
    alone = crlb(params, valid=np.stack([np.ones(m, bool), np.zeros(m, bool)], 1), **kw)

    est = {k: np.asarray(fit.params[k]) for k in ("x", "y", "flux")}
    err = {k: np.asarray(fit.errors[k]) for k in ("x", "y", "flux")}
    d_keep = sum((est[k] - truth[k]) ** 2 for k in ("x", "y")).sum(1)
    d_swap = sum((est[k][:, ::-1] - truth[k]) ** 2 for k in ("x", "y")).sum(1)
    swap = d_swap < d_keep
    for d in (est, err):
        for k in d:
            d[k] = np.where(swap[:, None], d[k][:, ::-1], d[k])

    rows = []
    for s in SEPARATIONS:
        sel = seps == s * SIGMA
        row = dict(
            separation=s,
            converged=float(np.mean(np.asarray(fit.converged)[sel])),
            crowding=float(
                np.mean(np.asarray(joint.errors["flux"])[sel, 0])
                / np.mean(np.asarray(alone.errors["flux"])[sel, 0])
            ),
        )
        for k in ("x", "y", "flux"):
            b = np.asarray(joint.errors[k])[sel]
            row[f"cf_{k}"], row[f"cf_{k}_robust"] = precision(est[k][sel], truth[k][sel], b)
            row[f"cf_{k}_pull"] = pull_width(est[k][sel], truth[k][sel], err[k][sel])
        rows.append(row)
    return rows


def _fmt(v, spec=".3f"):
    return "   -  " if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def print_tables(iso: list[dict], pair: list[dict]) -> None:
    print("\nIsolated spots: precision / sqrt(CRLB) (robust in brackets), pull width")
    head = (
        f"{'N':>6} {'bg':>4} {'sqrtCRLB_x':>10} | {'crowdfit x':>15} {'y':>15} {'flux':>15} "
        f"{'pull x':>6} {'conv':>5} {'fits/s':>7} | {'picasso x':>15} {'y':>15} {'flux':>15} "
        f"{'pull x':>6} {'fits/s':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in iso:
        cf = " ".join(
            f"{_fmt(r[f'cf_{k}']):>6} ({_fmt(r[f'cf_{k}_robust'])})" for k in ("x", "y", "flux")
        )
        if r.get("pi_failed"):
            pi = "picasso raised an error on this setting"
        elif "pi_x" in r:
            pi = " ".join(
                f"{_fmt(r[f'pi_{k}']):>6} ({_fmt(r[f'pi_{k}_robust'])})" for k in ("x", "y", "flux")
            )
            pi += f" {_fmt(r['pi_x_pull']):>6} {r['pi_fits_per_s']:7.0f}"
        else:
            pi = "picasso not run"
        print(
            f"{r['photons']:>6} {r['background']:>4} {r['crlb_x']:10.4f} | {cf} "
            f"{_fmt(r['cf_x_pull']):>6} {100 * r['converged']:5.1f} {r['fits_per_s']:7.0f} | "
            f"{pi}"
        )

    print(
        "\nPairs (1000 + 1000 photons, background 10, sigma known): precision / sqrt(joint "
        "CRLB) (robust), pull width"
    )
    head = (
        f"{'sep/sigma':>9} {'CRLB flux joint/alone':>21} | {'x':>15} {'y':>15} {'flux':>15} "
        f"{'pull x':>6} {'pull flux':>9} {'conv':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in pair:
        cf = " ".join(
            f"{_fmt(r[f'cf_{k}']):>6} ({_fmt(r[f'cf_{k}_robust'])})" for k in ("x", "y", "flux")
        )
        print(
            f"{r['separation']:9.1f} {r['crowding']:21.2f} | {cf} {_fmt(r['cf_x_pull']):>6} "
            f"{_fmt(r['cf_flux_pull']):>9} {100 * r['converged']:5.1f}"
        )


def plot(iso: list[dict], pair: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4), constrained_layout=True)
    colours = dict(zip(BACKGROUNDS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for ax, k in zip(axes[:3], ("x", "y", "flux"), strict=True):
        for bg in BACKGROUNDS:
            rs = [r for r in iso if r["background"] == bg]
            n = [r["photons"] for r in rs]
            ax.plot(
                n, [r[f"cf_{k}"] for r in rs], "o-", color=colours[bg], label=f"crowdfit, bg {bg}"
            )
            if any(f"pi_{k}" in r for r in rs):
                ax.plot(
                    n,
                    [r.get(f"pi_{k}", np.nan) for r in rs],
                    "s--",
                    color=colours[bg],
                    label=f"picasso, bg {bg}",
                )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("photons")
        ax.set_ylabel(f"std({k}) / sqrt(CRLB)")
        ax.set_title(f"isolated spots: {k}")
    axes[0].legend(fontsize=7)
    ax = axes[3]
    seps = [r["separation"] for r in pair]
    for k, m in (("x", "o-"), ("y", "^-"), ("flux", "s-")):
        ax.plot(seps, [r[f"cf_{k}"] for r in pair], m, label=f"{k} / sqrt(joint CRLB)")
    ax.plot(seps, [r["crowding"] for r in pair], "k:", label="joint / isolated CRLB (flux)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("separation / sigma")
    ax.set_title("pairs, joint fit (crowdfit)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    print(f"\nplot written to {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2000 spots / 1000 pairs per setting")
    ap.add_argument("--n", type=int, default=None, help="spots per setting (default 10^4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-picasso", action="store_true", help="skip the picasso column")
    ap.add_argument("--plot", type=Path, default=HERE / "precision.png")
    args = ap.parse_args(argv)
    n = args.n or (2000 if args.quick else 10_000)
    n_pairs = n // 2 if args.quick else n

    print(
        f"crowdfit {crowdfit.__version__}, jax {jax.__version__} on {jax.default_backend()}; "
        f"{n} spots per setting, {n_pairs} pairs per separation"
    )
    iso = isolated(n, args.seed, not args.no_picasso)
    pair = pairs(n_pairs, args.seed + 100)
    print_tables(iso, pair)
    plot(iso, pair, args.plot)


if __name__ == "__main__":
    main()
