"""Big images: crowdfit.fit_image's time and peak memory as the image grows, crowdsource beside it.

The crowded_field benchmark's fields (point-sampled Gaussians of σ = 2, amplitude 100,
background 5, Gaussian noise 5; `crowdfit.simulate_field`) at one density, on square images of
growing side. Each method runs in a fresh process per size, so the peak resident memory
(`ru_maxrss`) is that call's (plus the interpreter and the simulated image): crowdfit's first
call (compilation included) and a second, warm one; crowdsource's `fit_im` (one call, set up
as in `crowded_field.py`: known σ, background subtracted, weight 1/noise). Scores: Jaccard of
1:1 matches within 1 px. A time or memory that grows faster than the number of pixels is a
regression to find (a dense distance matrix took 10 GB on a 2048² field before it was removed).

Run from the repository root (peers' venv: see `setup_peers.sh`):

    benchmarks/.venv-peers/bin/python benchmarks/big_image.py                 # 512, 1024, 2048
    benchmarks/.venv-peers/bin/python benchmarks/big_image.py --sizes 4096 --density 0.05

Writes `benchmarks/results/big_image.md` (or `--out`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIGMA, BACKGROUND, NOISE = 2.0, 5.0, 5.0
FLUX = 100.0 * 2.0 * math.pi * SIGMA**2
FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0)) * SIGMA


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # (kB on Linux)


def worker(method: str, field: str, out: str) -> None:
    with np.load(field) as f:
        image = f["image"]
    if method == "crowdfit":
        import crowdfit

        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            cat = crowdfit.fit_image(image, sigma=SIGMA, progress_bar=False)
            times.append(time.perf_counter() - t0)
        x, y = cat["x"], cat["y"]
    else:
        sys.path.insert(0, str(HERE))
        import _peers

        r = _peers.crowdsource_fit(image, sigma=SIGMA, background=BACKGROUND, noise=NOISE)
        x, y, times = r["x"], r["y"], [r["time_s"]]
    np.savez(out, x=x, y=y, times=np.array(times), peak_mb=_peak_mb())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--density", type=float, default=0.1, help="stars per FWHM²")
    ap.add_argument("--methods", nargs="+", default=["crowdfit", "crowdsource"])
    ap.add_argument("--timeout", type=float, default=1800.0, help="per call (s)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "big_image.md")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return

    import crowdfit

    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="crowdfit-big-") as tmp:
        for size in args.sizes:
            n = int(round(args.density * size * size / FWHM**2))
            image, truth = crowdfit.simulate_field(
                (size, size), n, sigma=SIGMA, flux=FLUX, background=BACKGROUND,
                noise="gaussian", read_noise=NOISE, seed=size,
            )  # fmt: skip
            field = Path(tmp, f"field_{size}.npz")
            np.savez(field, image=image)
            for method in args.methods:
                out = Path(tmp, f"{method}_{size}.npz")
                cmd = [sys.executable, __file__, "--worker", method, str(field), str(out)]
                # An empty cache of compiled programs: a first call compiles them all.
                env = {**os.environ, "CROWDFIT_CACHE_DIR": str(Path(tmp, f"programs_{size}"))}
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True,
                                          timeout=args.timeout, env=env)  # fmt: skip
                    ok = proc.returncode == 0 and out.exists()
                    note = "" if ok else "failed: " + proc.stderr.strip().splitlines()[-1][-120:]
                except subprocess.TimeoutExpired:
                    ok, note = False, f"killed after {args.timeout:.0f} s"
                row = dict(size=size, n=n, method=method, note=note)
                if ok:
                    with np.load(out) as f:
                        m = crowdfit.match(truth, {"x": f["x"], "y": f["y"]}, radius=1.0)
                        row.update(times=f["times"].tolist(), peak_mb=float(f["peak_mb"]),
                                   jaccard=m.jaccard, found=int(f["x"].size))  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    md = report(args, rows, time.perf_counter() - t_start)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(f"written to {args.out}")


def report(args, rows, elapsed) -> str:
    lines = [
        "# big_image",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {os.cpu_count()}-core CPU, shared with other jobs (timings noisy)",
        f"- command: `{' '.join(sys.argv)}` (total {elapsed / 60:.1f} min)",
        f"- fields: square, {args.density:g} stars per FWHM², σ = {SIGMA:g}, amplitude 100, "
        f"background {BACKGROUND:g}, noise {NOISE:g} (`crowdfit.simulate_field`, seed = side)",
        "- time: crowdfit first call (compilation included) / warm (second call, same process); "
        "crowdsource: its `fit_im` call. Peak memory: the worker process's `ru_maxrss` (the "
        "simulated image and the interpreter included).",
        "",
        "| side (px) | stars | method | found | Jaccard | time (s) | s per 10⁶ px (warm) "
        "| peak memory (MB) | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "times" not in r:
            lines.append(f"| {r['size']} | {r['n']} | {r['method']} | – | – | – | – | – "
                         f"| {r['note']} |")  # fmt: skip
            continue
        t = r["times"]
        shown = f"{t[0]:.1f} / {t[1]:.1f}" if len(t) == 2 else f"{t[0]:.1f}"
        per = t[-1] / (r["size"] ** 2 / 1e6)
        lines.append(
            f"| {r['size']} | {r['n']} | {r['method']} | {r['found']} | {r['jaccard']:.3f} "
            f"| {shown} | {per:.1f} | {r['peak_mb']:.0f} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
