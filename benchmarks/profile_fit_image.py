"""Where a warm `crowdfit.fit_image` call spends its time: host work against fits.

Simulates the crowded_field benchmark's field at one density (σ = 2, amplitude 100, background
5, noise 5), calls `fit_image` twice (compile, then warm), then profiles a third call with
cProfile and prints the crowdfit functions with the most cumulative time, and the functions
with the most time of their own. Time spent waiting for compiled fits shows up in
`_fit._run` / `fit_regions` (on a GPU, in the array transfer that ends each call).

Run from the repository root (any backend JAX picks; `JAX_PLATFORMS=cpu` for the CPU):

    python benchmarks/profile_fit_image.py --density 0.3 --size 512
    python benchmarks/profile_fit_image.py --chunk 256   # fit_regions' chunks capped at 256

`--chunk` caps `fit_regions`' default chunk (an experiment for GPUs: less padding to step
through each fit's iterations, more calls; on an H100 at 0.3 stars/FWHM² chunks of 512 gave a
warm 2.6 s against 3.2 s with 4096, and 512 is now the default for such batches).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import time

import jax

import crowdfit

SIGMA = 2.0
FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0)) * SIGMA


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--density", type=float, default=0.3, help="stars per FWHM²")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=None, help="cap on the default chunk_size")
    args = ap.parse_args(argv)
    if args.chunk:
        from crowdfit import _fit

        default = _fit._default_sizes
        _fit._default_sizes = lambda work, n=0: (min(default(work, n)[0], args.chunk),
                                                 default(work, n)[1])  # fmt: skip
        print(f"default chunk_size capped at {args.chunk}")

    n = int(round(args.density * args.size**2 / FWHM**2))
    image, _ = crowdfit.simulate_field(
        (args.size, args.size), n, sigma=SIGMA, flux=100 * 2 * math.pi * SIGMA**2,
        background=5.0, noise="gaussian", read_noise=5.0, seed=args.seed,
    )  # fmt: skip
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    for label in ("first", "warm"):
        t0 = time.perf_counter()
        cat = crowdfit.fit_image(image, sigma=SIGMA, progress_bar=False)
        print(f"{label}: {time.perf_counter() - t0:.2f} s, {len(cat)} sources ({n} true)")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    crowdfit.fit_image(image, sigma=SIGMA, progress_bar=False)
    prof.disable()
    print(f"profiled: {time.perf_counter() - t0:.2f} s (with the profiler's overhead)")
    for sort, restrict in (("cumulative", "crowdfit"), ("tottime", "")):
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        if restrict:  # crowdfit's own functions, by cumulative time
            stats.sort_stats(sort).print_stats(restrict, args.top)
        else:
            stats.strip_dirs().sort_stats(sort).print_stats(args.top)
        text = buf.getvalue()
        print(text[text.find("   ncalls") :])


if __name__ == "__main__":
    main()
