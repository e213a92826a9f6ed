"""Every CPU core busy: host-side maps over threads, for the compiled fits.

XLA runs the calls that one Python thread makes one after another, each on about one core, so a
loop of fit calls leaves the other cores idle. Calls from several threads run side by side
(2.1× on 2 cores for `fit_regions`' chunks). `cpu_map` is that loop on a pool of threads when
JAX runs on a CPU, and a plain `map` elsewhere (a GPU is filled by one call's batch).

Two pools, so that no thread waits on its own pool: `"chunks"` runs `fit_regions`' chunk calls,
`"buckets"` runs `fit_image`'s region shapes (each of which calls `fit_regions`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os

import jax

__all__ = ["cpu_map"]


def _workers() -> int:
    """Threads per pool: `CROWDFIT_CPU_THREADS` if set (1 turns the pools off), else one per
    core this process may use."""
    given = os.environ.get("CROWDFIT_CPU_THREADS")
    if given:
        try:
            n = int(given)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"CROWDFIT_CPU_THREADS must be a whole number >= 1, got {given!r}")
        return n
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return len(cores) if cores else os.cpu_count() or 1


WORKERS = _workers()


@functools.cache
def _pool(name: str) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix=f"crowdfit-{name}")


def cpu_map(fn, items, *, pool: str):
    """`map(fn, items)`, on the threads of `pool` (`"chunks"` or `"buckets"`) when JAX runs on
    a CPU with several cores; results in the order of `items`.

    Each call runs under the calling thread's `jax.enable_x64` and `jax.default_device`: used as
    context managers they hold for their own thread only, and a fit of float64 inputs must not
    turn float32 on the way.
    """
    items = list(items)
    if len(items) < 2 or WORKERS < 2 or jax.default_backend() != "cpu":
        return map(fn, items)
    x64, device = jax.config.jax_enable_x64, jax.config.jax_default_device

    def run(item):
        with jax.enable_x64(x64), jax.default_device(device):
            return fn(item)

    return _pool(pool).map(run, items)
