"""Fits per second of `crowdfit.fit_regions` under Gpufit's own benchmark, and for joint regions.

Sized for a GPU (`--n` 10^7 there, 10^5 on a CPU); one process, warm runs timed apart from compiles.

1. **Gpufit's benchmark** (Przybylski et al. 2017; its `figure6_GpuFit_CpuFit_speed` test):
   5x5-pixel windows of one point-sampled circular Gaussian, amplitude 500, width 1, baseline 10,
   centre uniform within ±0.5 px of the window's centre, Gaussian noise of 500 / 10 (SNR 10);
   x, y, flux, sigma and background free (5 parameters), least squares, at most 10 iterations,
   `tol=1e-4` (crowdfit's tolerance is relative to one pixel's expected loss, not Gpufit's
   relative change of chi-square), starts: every parameter off by up to ±10 % (positions by up to
   ±0.1 px). Gpufit published 2.7-4.0 x 10^6 fits/s on its GPUs. Timed twice: `fit_regions` as a
   user calls it (with its host-side checks of the input), and inside `jax.jit` (device only, on
   one piece of `--max-batch` fits).
2. **Joint regions**: 16x16 windows of 4 overlapping Gaussians (sigma 2 held, 1.5 sigma apart on a
   ring, flux 2500, background 5, noise 5); x, y, flux of each source and the background free,
   at most 10 iterations: sources/s.

Data are simulated on the device with `jax.random`. "compile" is the first call minus the best
warm call; "warm" is the best of `--repeats` calls, each waited for with `block_until_ready`.

    PYTHONPATH=. python benchmarks/gpu_fits.py            # GPU: 10^7 fits, ~1 min on an H100
    PYTHONPATH=. python benchmarks/gpu_fits.py --n 20000  # a CPU check
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import crowdfit

GPUFIT = dict(size=5, amplitude=500.0, sigma=1.0, background=10.0, snr=10.0, shift=0.5, off=0.1)
JOINT = dict(size=16, k=4, sigma=2.0, flux=2500.0, background=5.0, noise=5.0, sep=1.5)


@functools.partial(jax.jit, static_argnums=(1,))
def simulate_gpufit(key, n):
    """`(n, 5, 5)` images, the truth and the starts of Gpufit's benchmark, on the device."""
    c = GPUFIT
    k1, k2, k3 = jax.random.split(key, 3)
    centre = (c["size"] - 1) / 2
    xy = centre + jax.random.uniform(k1, (2, n), minval=-c["shift"], maxval=c["shift"])
    flux = c["amplitude"] * 2 * math.pi * c["sigma"] ** 2
    grid = jnp.arange(c["size"], dtype=jnp.float32)
    gx = jnp.exp(-((grid[None, :] - xy[0][:, None]) ** 2) / (2 * c["sigma"] ** 2))
    gy = jnp.exp(-((grid[None, :] - xy[1][:, None]) ** 2) / (2 * c["sigma"] ** 2))
    model = c["background"] + c["amplitude"] * gy[:, :, None] * gx[:, None, :]
    noise = jax.random.normal(k2, model.shape) * (c["amplitude"] / c["snr"])
    images = (model + noise).astype(jnp.float32)
    u = jax.random.uniform(k3, (5, n), minval=-c["off"], maxval=c["off"])
    init = {
        "x": (xy[0] + u[0] * c["sigma"])[:, None],
        "y": (xy[1] + u[1] * c["sigma"])[:, None],
        "flux": (flux * (1 + u[2]))[:, None],
        "sigma": (c["sigma"] * (1 + u[3]))[:, None],
        "background": c["background"] * (1 + u[4]),
    }
    return images, {"x": xy[0], "y": xy[1]}, init


@functools.partial(jax.jit, static_argnums=(1,))
def simulate_joint(key, n):
    """`(n, 16, 16)` images of 4 overlapping sources each, the truth and the starts."""
    c = JOINT
    k1, k2, k3, k4 = jax.random.split(key, 4)
    kk = c["k"]
    angle = jax.random.uniform(k1, (n, 1), maxval=2 * math.pi) + 2 * math.pi * jnp.arange(kk) / kk
    radius = c["sep"] * c["sigma"] / (2 * math.sin(math.pi / kk))
    centre = (c["size"] - 1) / 2 + jax.random.uniform(k2, (n, 2), minval=-0.5, maxval=0.5)
    x = centre[:, :1] + radius * jnp.cos(angle)
    y = centre[:, 1:] + radius * jnp.sin(angle)
    grid = jnp.arange(c["size"], dtype=jnp.float32)
    s2 = 2 * c["sigma"] ** 2
    gx = jnp.exp(-((grid - x[..., None]) ** 2) / s2)  # (n, k, W)
    gy = jnp.exp(-((grid - y[..., None]) ** 2) / s2)  # (n, k, H)
    amp = c["flux"] / (math.pi * s2)
    model = c["background"] + amp * jnp.einsum("nkh,nkw->nhw", gy, gx)
    images = (model + c["noise"] * jax.random.normal(k3, model.shape)).astype(jnp.float32)
    jitter = 0.3 * jax.random.normal(k4, (2, n, kk))
    init = {
        "x": x + jitter[0],
        "y": y + jitter[1],
        "flux": jnp.full((n, kk), 0.8 * c["flux"]),
        "sigma": jnp.full((n, kk), c["sigma"]),
        "background": jnp.zeros((n,)),
    }
    return images, {"x": x, "y": y}, init


def timed(fn, repeats):
    """`(first, best warm)` wall times of `fn()` and its last result, each call waited for."""
    times, out = [], None
    for _ in range(1 + repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times[0], min(times[1:]), out


def report(name, n, per_fit, first, warm, res, truth):
    status = np.asarray(res.status)
    dx = np.asarray(res.params["x"]).reshape(status.shape[0], -1) - np.asarray(truth["x"]).reshape(
        status.shape[0], -1
    )
    row = dict(
        benchmark=name,
        fits=n,
        sources=n * per_fit,
        warm_s=warm,
        compile_s=max(first - warm, 0.0),
        fits_per_s=n / warm,
        sources_per_s=n * per_fit / warm,
        converged=float(np.mean(status == 0)),
        std_x=float(np.std(dx[status == 0])),
    )
    print(
        f"{name:<34} {n:>10,d} fits  warm {warm:8.3f} s  compile {row['compile_s']:6.1f} s  "
        f"{row['fits_per_s']:12,.0f} fits/s  {row['sources_per_s']:12,.0f} sources/s  "
        f"converged {row['converged']:.3f}  std(x) {row['std_x']:.4f} px",
        flush=True,
    )
    return row


def main(argv=None) -> int:
    gpu = jax.default_backend() != "cpu"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, default=1e7 if gpu else 1e5, help="5x5 fits (Gpufit)")
    ap.add_argument(
        "--regions", type=float, default=2**19 if gpu else 2**12, help="16x16 joint regions"
    )
    ap.add_argument("--max-batch", type=int, default=2**21 if gpu else None,
                    help="fit_regions' max_batch (and chunk_size on a GPU)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=2, help="warm calls (best is reported)")
    ap.add_argument("--no-jit", action="store_true", help="skip the jax.jit-wrapped timing")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    n, n_regions = int(args.n), int(args.regions)
    # A GPU takes a whole piece at once; on a CPU fit_regions' own defaults are the fast ones.
    size_kw = {} if args.max_batch is None else dict(max_batch=args.max_batch)
    if gpu and args.max_batch is not None:
        size_kw["chunk_size"] = args.max_batch
    print(f"jax {jax.__version__}, crowdfit {crowdfit.__version__}, devices {jax.devices()}")
    print(f"settings: {size_kw or 'fit_regions defaults'}, repeats {args.repeats}", flush=True)
    rows = []
    key = jax.random.PRNGKey(0)

    images, truth, init = jax.block_until_ready(simulate_gpufit(key, n))
    kw = dict(psf="gaussian", max_iter=10, tol=1e-4, progress_bar=False, **size_kw)
    first, warm, res = timed(lambda: crowdfit.fit_regions(images, init, **kw), args.repeats)
    rows.append(report("gpufit 5x5, fit_regions", n, 1, first, warm, res, truth))
    if not args.no_jit:
        # One piece (`max_batch` fits): inside jit every piece would be compiled into one program.
        m = min(n, args.max_batch or 4096)
        piece = jax.tree_util.tree_map(lambda a: a[:m], (images, init, truth))
        jitted = jax.jit(lambda im, p: crowdfit.fit_regions(im, p, **{**kw, "max_batch": m}))
        first, warm, res = timed(lambda: jitted(*piece[:2]), args.repeats)
        rows.append(report("gpufit 5x5, jit(fit_regions)", m, 1, first, warm, res, piece[2]))
    del images, init, res

    images, truth, init = jax.block_until_ready(simulate_joint(jax.random.PRNGKey(1), n_regions))
    kw = dict(psf="gaussian", fixed=("sigma",), max_iter=10, progress_bar=False, **size_kw)
    first, warm, res = timed(lambda: crowdfit.fit_regions(images, init, **kw), args.repeats)
    rows.append(report("16x16 regions of 4, fit_regions", n_regions, 4, first, warm, res, truth))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(jax.devices()[0]), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
