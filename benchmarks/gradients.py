"""What a gradient through `fit_regions` costs: implicit differentiation against unrolling.

Times a warm fit, and a warm `jax.grad` of the summed fitted fluxes with respect to the images, for
a batch of small windows of overlapping pairs, with `adjoint="implicit"` and `adjoint="unroll"`;
and how long each takes to compile. Run: `python benchmarks/gradients.py [--n 1000] [--x64]`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import crowdfit


def _timed(fn, repeats: int) -> tuple[float, float]:
    """`(first, warm)` seconds: the first call (trace, compile and run) and the best of `repeats`
    later ones."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        warm.append(time.perf_counter() - start)
    return first, min(warm)


def run(n: int, size: int, max_iter: int, repeats: int, adjoints: tuple[str, ...]) -> list[dict]:
    """Benchmark each adjoint on `n` windows of `size`² pixels holding a pair of sources.

    **Returns:** one dict per adjoint with the fit's and the gradient's first-call and warm times
    (seconds), and the status counts of the fit.
    """
    images, truth = crowdfit.simulate_pairs(
        n, 3.0, shape=(size, size), sigma=1.5, flux=3000.0, background=10.0, jitter=1.0, seed=0
    )
    rng = np.random.default_rng(1)
    init = {
        "x": truth["x"] + rng.uniform(-0.5, 0.5, truth["x"].shape),
        "y": truth["y"] + rng.uniform(-0.5, 0.5, truth["y"].shape),
        "flux": np.full((n, 2), 2000.0),
        "sigma": np.full((n, 2), 1.3),
        "background": np.full(n, 8.0),
    }
    images = jnp.asarray(images, jnp.asarray(0.0).dtype)
    rows = []
    for adjoint in adjoints:
        kw = dict(psf="integrated_gaussian", noise="poisson", max_iter=max_iter, adjoint=adjoint)
        fit = lambda im, kw=kw: crowdfit.fit_regions(im, init, **kw)
        total_flux = lambda im, fit=fit: jnp.sum(fit(im).params["flux"])
        grad = jax.jit(jax.grad(total_flux))
        fit_first, fit_warm = _timed(lambda fit=fit: fit(images).params, repeats)
        grad_first, grad_warm = _timed(lambda grad=grad: grad(images), repeats)
        g = np.asarray(grad(images))
        status = np.bincount(np.asarray(fit(images).status), minlength=4)
        rows.append(
            dict(
                adjoint=adjoint,
                fit_compile=fit_first - fit_warm,
                fit_warm=fit_warm,
                grad_compile=grad_first - grad_warm,
                grad_warm=grad_warm,
                finite=bool(np.all(np.isfinite(g))),
                converged=int(status[0]),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of windows")
    parser.add_argument("--size", type=int, default=16, help="window side in pixels")
    parser.add_argument("--max-iter", type=int, default=50, help="iteration limit (unroll: steps)")
    parser.add_argument("--repeats", type=int, default=5, help="warm calls to time")
    parser.add_argument("--x64", action="store_true", help="float64 instead of float32")
    parser.add_argument("--adjoint", nargs="+", default=["implicit", "unroll"])
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", args.x64)

    rows = run(args.n, args.size, args.max_iter, args.repeats, tuple(args.adjoint))
    dtype = "float64" if args.x64 else "float32"
    print(
        f"{args.n} windows of {args.size}x{args.size}, 2 sources each, {dtype}, "
        f"max_iter={args.max_iter}, {jax.default_backend()} ({jax.device_count()} device)"
    )
    head = (
        f"{'adjoint':<9} {'fit compile':>12} {'fit warm':>10} {'grad compile':>13} "
        f"{'grad warm':>10} {'grad/fit':>9} {'converged':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['adjoint']:<9} {r['fit_compile']:>11.2f}s {r['fit_warm']:>9.3f}s "
            f"{r['grad_compile']:>12.2f}s {r['grad_warm']:>9.3f}s "
            f"{r['grad_warm'] / r['fit_warm']:>8.2f}x {r['converged']:>10d}"
            + ("" if r["finite"] else "  (non-finite gradient!)")
        )
    if len(rows) == 2:
        implicit, unroll = rows
        print(
            f"implicit gradient vs unrolled: {unroll['grad_warm'] / implicit['grad_warm']:.1f}x "
            f"faster warm, {unroll['grad_compile'] / implicit['grad_compile']:.1f}x faster to "
            "compile"
        )


if __name__ == "__main__":
    main()
