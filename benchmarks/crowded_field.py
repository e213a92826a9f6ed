"""Crowded fields: crowdfit.fit_image against the seed's curve_fit loop, photutils and crowdsource.

Every method gets the same simulated fields (`crowdfit.simulate_field`, the seed's conditions:
point-sampled Gaussians of sigma = 2 and amplitude 100, i.e. flux = 100 * 2 pi sigma^2, on a
background of 5 with Gaussian noise of sigma 5), at densities up to 0.3 stars per FWHM^2
(FWHM = 2.3548 sigma). Each is set up as a careful user would (see `_peers.py`):

* **crowdfit** `fit_image(image, sigma=2.0)`: known sigma; it estimates the noise and the
  background itself and fits a constant background per region. *crowdfit fast* is the same
  call with `rounds=1, split=False` (one residual search, no likelihood-ratio tests): the
  speed end of its dial; *crowdfit small regions*, `max_sources=8, max_window=32` (the
  defaults until regions of 16 sources in 48 px windows replaced them). Both run in the same
  process after the default.
* **seed** `_peers.seed_curve_fit(image, num_peaks=max(default, 2 N))`: peak_local_max (a
  generous number of candidates, min_distance 5) + one 7-parameter rotated Gaussian per crop
  (the seed's own method fits its width and offset; it has no way to use the known sigma).
* **photutils** `_peers.photutils_psf(image, sigma=2, background=5, error=5)`: known sigma, known
  background subtracted (no local background), known noise as the error image; DAOStarFinder at
  5 sigma with `min_separation=0` (DAOFIND's rule; photutils 3.0's default, 2.5 FWHM, kept one
  star in each disc of 11.8 px: Jaccard 0.36 / 0.11 at 0.1 / 0.3 stars/FWHM² for
  `PSFPhotometry`, against 0.73 / 0.43); fitted positions held within `xy_bounds=σ` of their
  start (unbounded, `IterativePSFPhotometry` crashed at 0.3); `PSFPhotometry` and
  `IterativePSFPhotometry(mode="all", maxiters=3)`.
* **crowdsource** `_peers.crowdsource_fit(image, sigma=2, background=5, noise=5)`: known sigma,
  known background subtracted (crowdsource still fits its own residual sky), weight 1/5.

Scores (`crowdfit.match`, optimal 1:1 matching within 1 px): Jaccard, recall, precision, median
and mean relative flux error of the matched pairs, position RMSE; and wall time. crowdfit runs
first, all densities in one fresh process: its *cold* time is the first call at a density
(including the compilation of every program that density needs and earlier ones did not: at the
first density that is everything); *warm* is the second call on the same field. Peers run one
field per fresh process (their `time_s` covers only their own detection and fitting); a peer
whose time at one density exceeds `--limit` seconds is skipped at the higher densities, and a
call still running after `--timeout` seconds is killed.

Run from the repository root:

    benchmarks/.venv-peers/bin/python benchmarks/crowded_field.py --quick   # 256x256
    benchmarks/.venv-peers/bin/python benchmarks/crowded_field.py           # 512x512

Writes the Markdown tables to `benchmarks/results/crowded_field[_quick].md` (or `--out`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIGMA = 2.0
FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0)) * SIGMA
FLUX = 100.0 * 2.0 * math.pi * SIGMA**2
BACKGROUND = 5.0
NOISE = 5.0
# crowdfit's settings: the default, the fast end of its speed/accuracy dial, and the smaller
# regions that were the default before.
CROWDFIT_CONFIGS = {
    "crowdfit": {},
    "crowdfit_fast": dict(rounds=1, split=False),
    "crowdfit_small": dict(max_sources=8, max_window=32),
}
OURS = tuple(CROWDFIT_CONFIGS)
# The closest pair of two equal stars that a likelihood-ratio test at threshold 20 (crowdfit's)
# can split: to leading order in the separation d, the pair's residual quadrupole and its
# isotropic broadening each give χ² = f² d⁴ / (1024 π σ⁶ N²) (f the pair's flux, N the noise),
# so the statistic is about twice that. Closer pairs merge into one star with both fluxes.
D_MIN = (20.0 * 512.0 * math.pi * SIGMA**6 * NOISE**2 / (2.0 * FLUX) ** 2) ** 0.25
PEERS = ("seed", "photutils", "photutils_iter", "crowdsource")
LABELS = {
    "crowdfit": "crowdfit fit_image",
    "crowdfit_fast": "crowdfit fit_image, rounds=1, split=False",
    "crowdfit_small": "crowdfit fit_image, max_sources=8, max_window=32",
    "seed": "seed curve_fit loop",
    "photutils": "photutils PSFPhotometry",
    "photutils_iter": "photutils IterativePSFPhotometry",
    "crowdsource": "crowdsource",
}


# ------------------------------------------------------------------------------------------------
# workers (run in fresh processes)
# ------------------------------------------------------------------------------------------------


def _load_field(path):
    with np.load(path) as f:
        return f["image"], {k[6:]: f[k] for k in f.files if k.startswith("truth_")}


def worker_crowdfit(fields: list[str], out_dir: str, configs=("crowdfit",)) -> None:
    """All densities in this (fresh) process: for each of crowdfit's `configs`
    (`CROWDFIT_CONFIGS`), a first call, then a second on the same field."""
    t0 = time.perf_counter()
    import jax

    import crowdfit

    t_import = time.perf_counter() - t0
    for (i, path), name in ((f, c) for f in enumerate(fields) for c in configs):
        image, _ = _load_field(path)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            cat = crowdfit.fit_image(
                image, sigma=SIGMA, progress_bar=False, **CROWDFIT_CONFIGS[name]
            )  # fmt: skip
            times.append(time.perf_counter() - t0)
        cols = {c: np.asarray(cat[c], float) for c in ("x", "y", "flux", "status", "snr")}
        np.savez(
            Path(out_dir, f"{name}_{i}.npz"),
            **cols,
            cold_s=times[0],
            warm_s=times[1],
            import_s=t_import,
            n_regions=cat.meta.get("n_regions", -1),
            rounds=cat.meta.get("rounds", -1),
            versions=json.dumps(
                {
                    "jax": jax.__version__,
                    "crowdfit": crowdfit.__version__,
                    "backend": jax.default_backend(),
                    "device": jax.devices()[0].device_kind,
                }
            ),
        )
        print(f"    {name} field {i}: first {times[0]:.1f} s, second {times[1]:.1f} s")
        sys.stdout.flush()


def worker_peer(method: str, field: str, out: str) -> None:
    sys.path.insert(0, str(HERE))
    import _peers

    image, truth = _load_field(field)
    if method == "seed":
        # "detect a generous amount of spots": twice the true number (the wrapper's default
        # scales the seed's 300 per 200x400 to the area; min_distance=5 caps it anyway)
        default = max(20, int(round(300 * image.size / (200 * 400))))
        r = _peers.seed_curve_fit(image, num_peaks=max(default, 2 * len(truth["x"])))
    elif method in ("photutils", "photutils_iter"):
        # (positions bounded to 1 σ from their start: unbounded, IterativePSFPhotometry
        # crashed at 0.3 stars/FWHM² in astropy's overlap_slices)
        r = _peers.photutils_psf(
            image, sigma=SIGMA, background=BACKGROUND, error=NOISE,
            iterative=method == "photutils_iter", xy_bounds=SIGMA,
        )  # fmt: skip
    elif method == "crowdsource":
        r = _peers.crowdsource_fit(image, sigma=SIGMA, background=BACKGROUND, noise=NOISE)
    else:
        raise ValueError(method)
    extra = {}
    if "flags" in r:
        extra["n_flagged"] = int(np.count_nonzero(np.nan_to_num(r["flags"])))
    if "n_invalid" in r:
        extra["n_invalid"] = r["n_invalid"]
    if "group_id" in r and len(r["group_id"]):
        _, counts = np.unique(r["group_id"], return_counts=True)
        extra["largest_group"] = int(counts.max())
    np.savez(out, x=r["x"], y=r["y"], flux=r["flux"], time_s=r["time_s"], **extra)


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def n_for_density(density: float, size: int) -> int:
    return int(round(density * size * size / FWHM**2))


def _run(cmd, timeout):
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return None, time.perf_counter() - t0, (e.stdout or b"")
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        return False, time.perf_counter() - t0, "\n".join(tail)
    return True, time.perf_counter() - t0, proc.stdout


def score(truth: dict, found: dict) -> dict:
    import crowdfit

    m = crowdfit.match(truth, found, radius=1.0)
    rel = np.asarray(found["flux"], float)[m.found_index] / truth["flux"][m.truth_index] - 1
    merged = rel > 0.5
    return dict(
        n_merged=int(merged.sum()),
        flux_mean_clean=float(np.mean(rel[~merged])) if (~merged).any() else float("nan"),
        n_found=m.n_found,
        jaccard=m.jaccard,
        recall=m.recall,
        precision=m.precision,
        flux_med=m.flux_bias_median,
        flux_mean=m.flux_bias_mean,
        flux_mad=m.flux_error_median_abs,
        rmse=m.rmse,
        match=m,
    )


def nearest(ax, ay, bx, by, exclude_self=False):
    """Distance from each (ax, ay) to the nearest (bx, by)."""
    if len(bx) == 0:
        return np.full(len(ax), np.inf)
    d = np.hypot(ax[:, None] - bx[None, :], ay[:, None] - by[None, :])
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return d.min(1)


def _nearest_index(x, y):
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    np.fill_diagonal(d, np.inf)
    return d.argmin(1)


def miss_analysis(truth, found, m, others: dict) -> dict:
    """Why true stars were missed (false negatives) and what the false positives are.

    A missed star whose nearest found source (within 2 px) is matched to another true star had
    its light absorbed by that neighbour's fit ("absorbed"); one whose nearest found source is
    unmatched was found but misplaced by more than 1 px; otherwise nothing was found near it.
    """
    tx, ty = truth["x"], truth["y"]
    fx, fy = np.asarray(found["x"]), np.asarray(found["y"])
    ff = np.asarray(found["flux"])
    fn = np.setdiff1d(np.arange(tx.size), m.truth_index)
    fp = np.setdiff1d(np.arange(fx.size), m.found_index)
    nn_true = nearest(tx, ty, tx, ty, exclude_self=True)
    absorbed = misplaced = nothing = 0
    ratios = []
    truth_of = dict(zip(m.found_index.tolist(), m.truth_index.tolist(), strict=True))
    for i in fn:
        if fx.size == 0:
            nothing += 1
            continue
        d = np.hypot(fx - tx[i], fy - ty[i])
        j = int(np.argmin(d))
        if d[j] > 2.0:
            nothing += 1
        elif j in truth_of:
            absorbed += 1
            ratios.append(ff[j] / truth["flux"][truth_of[j]])
        else:
            misplaced += 1
    # Pairs closer than D_MIN (mutual nearest neighbours): if each merges into its brighter star,
    # that one is matched with both fluxes, which puts a floor under the mean flux error.
    nn_idx = _nearest_index(tx, ty)
    idx = np.arange(tx.size)
    close = (nn_true < D_MIN) & (nn_idx[nn_idx] == idx) & (idx < nn_idx)
    a, b = np.where(close)[0], nn_idx[close]
    fa, fb = truth["flux"][a], truth["flux"][b]
    excess = np.minimum(fa, fb) / np.maximum(fa, fb)
    out = dict(
        n_close_pairs=int(a.size),
        pair_floor=float(excess.sum() / max(tx.size - a.size, 1)),
        n_fn=int(fn.size),
        fn_absorbed=absorbed,
        fn_absorbed_flux_ratio=float(np.median(ratios)) if ratios else float("nan"),
        fn_misplaced=misplaced,
        fn_nothing=nothing,
        fn_nn_median=float(np.median(nn_true[fn])) if fn.size else float("nan"),
        all_nn_median=float(np.median(nn_true)),
        frac_nn_lt_sigma=float(np.mean(nn_true < SIGMA)),
        fn_nn_lt_sigma=int(np.sum(nn_true[fn] < SIGMA)),
        n_fp=int(fp.size),
        fp_near_true=int(np.sum(nearest(fx[fp], fy[fp], tx, ty) <= 2.0)),
    )
    for name, mo in others.items():  # how many of crowdfit's misses the peer matched
        out[f"fn_found_by_{name}"] = int(np.isin(fn, mo.truth_index).sum())
        peer_fn = np.setdiff1d(np.arange(tx.size), mo.truth_index)
        out[f"{name}_fn"] = int(peer_fn.size)
        out[f"{name}_fn_found_by_crowdfit"] = int(np.isin(peer_fn, m.truth_index).sum())
    return out


def fmt(v, spec, dash="–"):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return dash
    return format(v, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256x256 fields (default 512x512)")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--methods", nargs="+", default=[*OURS, *PEERS])
    ap.add_argument(
        "--limit",
        type=float,
        default=None,
        help="skip a peer at higher densities once it took longer than this (s)",
    )
    ap.add_argument("--timeout", type=float, default=None, help="kill a call after this (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)  # fmt: skip

    if args.worker:
        method, *rest = args.worker
        if method == "crowdfit":
            configs, rest = rest[0].split(","), rest[1:]
            worker_crowdfit(rest[:-1], rest[-1], configs)
        else:
            worker_peer(method, rest[0], rest[1])
        return

    size = args.size or (256 if args.quick else 512)
    limit = args.limit or (60.0 if args.quick else 300.0)
    timeout = args.timeout or (3 * limit)
    t_start = time.perf_counter()
    py = sys.executable
    me = str(Path(__file__).resolve())

    # On a GPU each process would otherwise take 75 % of its memory at start: the crowdfit
    # worker would then fail beside this driver (which simulates and scores with crowdfit).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import crowdfit

    tmp = tempfile.TemporaryDirectory(prefix="crowdfit-crowded-")
    # crowdfit's worker starts with an empty cache of compiled programs (`_disk_cache`), so its
    # first calls compile them (a later process on this machine would load them instead).
    os.environ["CROWDFIT_CACHE_DIR"] = str(Path(tmp.name, "programs"))
    fields, truths = [], []
    for i, dens in enumerate(args.densities):
        n = n_for_density(dens, size)
        image, truth = crowdfit.simulate_field(
            (size, size), n, sigma=SIGMA, flux=FLUX, background=BACKGROUND, noise="gaussian",
            read_noise=NOISE, seed=args.seed + i,
        )  # fmt: skip
        path = Path(tmp.name, f"field_{i}.npz")
        np.savez(path, image=image, **{f"truth_{k}": v for k, v in truth.items()})
        fields.append(str(path))
        truths.append(truth)
    print(f"{len(fields)} fields of {size}x{size}: n = {[len(t['x']) for t in truths]}", flush=True)

    results: dict = {m: [None] * len(fields) for m in args.methods}
    status: dict = {m: [""] * len(fields) for m in args.methods}
    versions = {}

    ours = [m for m in OURS if m in args.methods]
    if ours:
        print(f"{', '.join(ours)} (one fresh process, all densities)", flush=True)
        # crowdfit is ours: no per-density skip, but a generous overall limit
        ok, wall, info = _run([py, me, "--worker", "crowdfit", ",".join(ours), *fields, tmp.name],
                              timeout=max(timeout * len(fields), 1800))  # fmt: skip
        for m in ours:
            for i in range(len(fields)):
                p = Path(tmp.name, f"{m}_{i}.npz")
                if p.exists():
                    with np.load(p) as f:
                        results[m][i] = {k: f[k] for k in f.files}
                    versions = json.loads(str(results[m][i]["versions"]))
                else:
                    status[m][i] = "failed" if ok is False else f"timed out (> {wall:.0f} s)"
        if ok is False:
            print(f"  crowdfit worker failed: {info}", flush=True)

    for method in args.methods:
        if method in OURS:
            continue
        print(method, flush=True)
        skip_reason = None
        for i, path in enumerate(fields):
            if skip_reason:
                status[method][i] = skip_reason
                continue
            out = Path(tmp.name, f"{method}_{i}.npz")
            ok, wall, info = _run([py, me, "--worker", method, path, str(out)], timeout)
            if ok is None:
                status[method][i] = f"killed (> {timeout:.0f} s)"
                skip_reason = f"skipped (> {timeout:.0f} s at lower density)"
                print(f"  density {args.densities[i]}: killed after {wall:.0f} s", flush=True)
                continue
            if ok is False:
                status[method][i] = "failed"
                print(f"  density {args.densities[i]}: failed: {info}", flush=True)
                continue
            with np.load(out) as f:
                results[method][i] = {k: f[k] for k in f.files}
            t = float(results[method][i]["time_s"])
            print(f"  density {args.densities[i]}: {t:.1f} s", flush=True)
            if t > limit:
                skip_reason = f"skipped (> {limit:.0f} s at lower density)"

    # ---- scores ----
    rows = []
    analyses = []
    for i, dens in enumerate(args.densities):
        truth = truths[i]
        matches = {}
        for method in args.methods:
            r = results[method][i]
            row = dict(method=method, density=dens, n_true=len(truth["x"]), note=status[method][i])
            if r is not None:
                s = score(truth, r)
                matches[method] = s.pop("match")
                row.update(s)
                if method in OURS:
                    row["time_s"] = float(r["warm_s"])
                    row["cold_s"] = float(r["cold_s"])
                else:
                    row["time_s"] = float(r["time_s"])
                    extras = []
                    if "largest_group" in r:
                        extras.append(f"largest group {int(r['largest_group'])}")
                    if int(r.get("n_flagged", 0)):
                        extras.append(f"{int(r['n_flagged'])} flagged")
                    if int(r.get("n_invalid", 0)):
                        extras.append(f"{int(r['n_invalid'])} invalid")
                    row["note"] = ", ".join(extras)
            rows.append(row)
        if "crowdfit" in matches:
            others = {k: v for k, v in matches.items() if k not in OURS}
            a = miss_analysis(truth, results["crowdfit"][i], matches["crowdfit"], others)
            a["density"] = dens
            analyses.append(a)

    elapsed = time.perf_counter() - t_start
    md = report(args, size, limit, timeout, rows, analyses, versions, elapsed)
    print()
    print(md)
    name = "crowded_field" + ("_quick" if args.quick else "") + ".md"
    out = args.out or HERE / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    print(f"written to {out}")
    tmp.cleanup()


def _git_state() -> str:
    """`commit` of the working tree (with `+dirty` when crowdfit/ has uncommitted changes)."""
    import subprocess as sp

    root = Path(__file__).resolve().parent.parent
    try:
        head = sp.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = sp.run(
            ["git", "status", "--porcelain", "--", "crowdfit"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except Exception:  # noqa: BLE001 - no git: no commit
        return "n/a"
    return (head or "n/a") + ("+dirty" if dirty else "")


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "n/a"


def _machine(versions) -> str:
    """The CPU, and the accelerator crowdfit ran on if it was not the CPU (peers use the CPU)."""
    cpu = f"{os.cpu_count()}-core CPU"
    if versions.get("backend", "cpu") == "cpu":
        return cpu
    return f"{cpu}; crowdfit on {versions.get('device', '?')} (jax backend `{versions['backend']}`)"


def report(args, size, limit, timeout, rows, analyses, versions, elapsed) -> str:
    lines = [
        "# crowded_field",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {_machine(versions)}, shared with other jobs (timings noisy; compare within "
        "this run)",
        f"- versions: python {platform.python_version()}, crowdfit "
        f"{versions.get('crowdfit', _version('crowdfit'))} (git {_git_state()}), "
        f"jax {versions.get('jax', 'n/a')}, "
        f"photutils {_version('photutils')}, astropy {_version('astropy')}, crowdsourcephoto "
        f"{_version('crowdsourcephoto')}, scipy {_version('scipy')}, scikit-image "
        f"{_version('scikit-image')}, numpy {np.__version__}",
        f"- command: `{' '.join(sys.argv)}` (total {elapsed / 60:.1f} min)",
        f"- fields: {size}×{size}, `crowdfit.simulate_field`, point-sampled Gaussians σ = {SIGMA:g}"
        f" (FWHM {FWHM:.2f} px), flux {FLUX:.0f} (amplitude 100), background {BACKGROUND:g}, "
        f"Gaussian noise σ = {NOISE:g}; uniform random positions; one field per density "
        f"(seed {args.seed} + index).",
        "- information: every method knows σ = 2. photutils and crowdsource are also given the "
        "true background (5, subtracted beforehand; photutils fits no local background) and the "
        "true noise (5). crowdfit estimates noise and background itself (a constant background "
        "per region is fitted). The seed's method fits its own widths and offset.",
        "- scores: `crowdfit.match`, optimal 1:1 within 1 px. flux error = (found − true)/true of "
        "matched pairs. time: wall time of detection + fitting; crowdfit *warm* = second call on "
        "the same field in the same process, *first* = first call at that density in a fresh "
        "process that ran the lower densities before (so only the first density's is fully "
        f"cold). Peers: skipped at higher densities after a call > {limit:.0f} s, killed after "
        f"{timeout:.0f} s.",
        "",
        "| density (/FWHM²) | N | method | found | Jaccard | recall | precision | median flux err "
        "| mean flux err | matched with > +50 % flux (mean err without them) | pos. RMSE (px) "
        "| time (s) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "jaccard" not in r:
            lines.append(
                f"| {r['density']:g} | {r['n_true']} | {LABELS[r['method']]} | – | – | – | – | – "
                f"| – | – | – | – | {r['note'] or 'no result'} |"
            )
            continue
        t = f"{r['time_s']:.1f}"
        if r["method"] in OURS:
            t = f"{r['time_s']:.1f} warm / {r['cold_s']:.1f} first"
        lines.append(
            f"| {r['density']:g} | {r['n_true']} | {LABELS[r['method']]} | {r['n_found']} | "
            f"{r['jaccard']:.3f} | {r['recall']:.3f} | {r['precision']:.3f} | "
            f"{fmt(100 * r['flux_med'], '+.2f')} % | {fmt(100 * r['flux_mean'], '+.2f')} % | "
            f"{r['n_merged']} ({fmt(100 * r['flux_mean_clean'], '+.2f')} %) | "
            f"{fmt(r['rmse'], '.3f')} | {t} | {r['note']} |"
        )

    # ---- targets ----
    lines += ["", "## Targets", "",
              "| density | Jaccard ≥ crowdsource | flux bias within ±2 % (median / mean) "
              f"| floor under the mean: pairs < {D_MIN:.2f} px merged "
              "| ≥ 10× faster than the fastest peer (warm) |",
              "|---|---|---|---|---|"]  # fmt: skip
    floor = {a["density"]: a for a in analyses}
    by = {(r["density"], r["method"]): r for r in rows}
    dens_list = sorted({r["density"] for r in rows})
    for d in dens_list:
        cf = by.get((d, "crowdfit"))
        if cf is None or "jaccard" not in cf:
            lines.append(f"| {d:g} | – | – | – | – |")
            continue
        cs = by.get((d, "crowdsource"))
        if cs is not None and "jaccard" in cs:
            ok = cf["jaccard"] >= cs["jaccard"]
            j = f"{'yes' if ok else '**no**'} ({cf['jaccard']:.3f} vs {cs['jaccard']:.3f}"
            small = by.get((d, "crowdfit_small"))
            if small is not None and "jaccard" in small:
                j += f"; small regions {small['jaccard']:.3f}"
            j += ")"
        else:
            j = "– (no crowdsource result)"
        fb = abs(cf["flux_med"]) <= 0.02 and abs(cf["flux_mean"]) <= 0.02
        f = (f"{'yes' if fb else '**no**'} ({100 * cf['flux_med']:+.2f} % / "
             f"{100 * cf['flux_mean']:+.2f} %)")  # fmt: skip
        peers = [
            by[(d, m)] for m in PEERS
            if (d, m) in by and "time_s" in by[(d, m)] and m != "seed"
        ]  # fmt: skip
        peers_all = [by[(d, m)] for m in PEERS if (d, m) in by and "time_s" in by[(d, m)]]
        if peers:
            fastest = min(peers, key=lambda r: r["time_s"])
            ratio = fastest["time_s"] / cf["time_s"]
            s = (f"{'yes' if ratio >= 10 else '**no**'} ({ratio:.2f}× vs "
                 f"{LABELS[fastest['method']]} {fastest['time_s']:.1f} s")  # fmt: skip
            cs_t = [r for r in peers if r["method"] == "crowdsource"]
            if cs_t and fastest is not cs_t[0]:
                s += f"; {cs_t[0]['time_s'] / cf['time_s']:.2f}× vs crowdsource"
            seed = [r for r in peers_all if r["method"] == "seed"]
            if seed:
                s += f"; {seed[0]['time_s'] / cf['time_s']:.2f}× vs the seed loop"
            fast = by.get((d, "crowdfit_fast"))
            if fast is not None and "time_s" in fast:
                s += (f"; fast setting {fastest['time_s'] / fast['time_s']:.2f}×, Jaccard "
                      f"{fast['jaccard']:.3f}")  # fmt: skip
            s += ")"
        else:
            s = "– (no peer timing)"
        fl = floor.get(d)
        fl = f"+{100 * fl['pair_floor']:.2f} % ({fl['n_close_pairs']} pairs)" if fl else "–"
        lines.append(f"| {d:g} | {j} | {f} | {fl} | {s} |")
    lines += [
        "",
        "'Fastest peer' is the fastest of photutils (both) and crowdsource at that density that "
        "produced a result (a skipped peer does not count); the seed loop is shown apart (it "
        "finds a fraction of the stars). 'Floor': the mean flux error if every pair of true "
        f"stars closer than {D_MIN:.2f} px ({D_MIN / SIGMA:.2f} σ) merged into its brighter star "
        "and nothing else were wrong. Below that separation a pair's likelihood-ratio statistic "
        "(two stars against one, to leading order in the separation) is under 20 at this S/N, "
        "so no test at a threshold that keeps single stars single can split it.",
    ]

    # ---- crowdfit's misses ----
    if analyses:
        peers_in = [m for m in PEERS if any(f"{m}_fn" in a for a in analyses)]
        head = ("| density | crowdfit FN | absorbed by a neighbour's fit (its flux / its true "
                "flux, median) | found but > 1 px off | nothing within 2 px | FN with a true "
                "neighbour < σ (all stars: fraction) | median NN distance FN / all (px) "
                "| FP (of which ≤ 2 px from a true star) |")  # fmt: skip
        cols = "|---|---|---|---|---|---|---|---|"
        for m in peers_in:
            head += f" {LABELS[m]} FN | crowdfit FN matched by {m} / {m} FN matched by crowdfit |"
            cols += "---|---|"
        lines += ["", "## What crowdfit misses", "", head, cols]
        for a in analyses:
            s = (f"| {a['density']:g} | {a['n_fn']} | {a['fn_absorbed']} "
                 f"({fmt(a['fn_absorbed_flux_ratio'], '.2f')}×) | {a['fn_misplaced']} | "
                 f"{a['fn_nothing']} | {a['fn_nn_lt_sigma']} "
                 f"({a['frac_nn_lt_sigma']:.1%}) | {fmt(a['fn_nn_median'], '.2f')} / "
                 f"{a['all_nn_median']:.2f} | {a['n_fp']} ({a['fp_near_true']}) |")  # fmt: skip
            for m in peers_in:
                if f"{m}_fn" in a:
                    s += (f" {a[f'{m}_fn']} | {a[f'fn_found_by_{m}']} / "
                          f"{a[f'{m}_fn_found_by_crowdfit']} |")  # fmt: skip
                else:
                    s += " – | – |"
            lines.append(s)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        main()
    except Exception:  # pragma: no cover - keep the traceback visible from workers
        traceback.print_exc()
        sys.exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip slow interpreter teardown of jax/astropy in workers
