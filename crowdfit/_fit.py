"""`fit_regions`: fit many small windows of overlapping sources at once, jointly within each window.

The host checks the inputs. Concrete ones (outside `jit`, `grad`, `vmap`; on a GPU, numpy
ones) are prepared in numpy and fitted `chunk_size` regions per call of one compiled program
per problem (`_run`); on CPU, the calls go out from one thread per core, so they run side by
side (see `_threads`), and Levenberg–Marquardt runs in stages (`_staged`): the regions still
running after each stage are gathered and continued. Traced ones, and jax arrays on a GPU, are
padded to a bucketed batch size and fitted in one call per piece.
Which regions' Gauss–Newton matrices are separable is decided here (`_separable_regions`); those
and the others are fitted by two programs.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._background import n_background_params
from ._disk_cache import compiled
from ._implicit import implicit_optimum
from ._linalg import exact_matmuls, masked_inverse
from ._noise import NOISE_NAMES, get_noise
from ._problem import RegionProblem, has_profile
from ._progress import progress
from ._psf import PSF_NAMES, get_psf
from ._solution import FitResult, Status
from ._solver import levenberg_marquardt, optax_minimise
from ._threads import cpu_map

__all__ = ["fit_regions"]

_TRACE_COUNT = [0]  # incremented each time a fit program is traced (tests use it)


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _default_sizes(work: int, n: int = 0) -> tuple[int, int]:
    """`(chunk_size, max_batch)` for the default backend, `work` = sources × pixels a region
    and a batch of `n` regions.

    On CPU a vmapped while_loop runs every region as long as the slowest one, so regions are
    vmapped in small chunks mapped one after another (smaller for bigger regions, which also
    bounds the padding of a small batch); single spots in small windows (`work <= 256`) cost
    so little per region that the per-call overhead dominates, and go 1024 at a time, in pieces
    of 16384 (staging gathers a piece's slow regions into full chunks). A GPU wants big
    batches at once, but every padded region steps as long as the slowest real one: the chunk
    is the largest 512 · 4^j not above the batch (at least 512), up to 65536 regions for small
    regions, 16384 for regions of up to 2048 and 4096 beyond. On an H100, a million 7×7 spots
    ran at 0.7 × 10^6 fits/s in chunks of 4096 and 1.5 × 10^6 in chunks of 65536, and a warm
    `fit_image` at 0.3 stars/FWHM² (batches of a few hundred regions) took 2.6 s in chunks of
    512 against 3.2 s in chunks of 4096 (staging there cost more: 2.9 s).
    """
    if not _on_cpu():
        cap = 65536 if work <= 256 else 16384 if work <= 2048 else 4096
        chunk = 512
        while chunk * 4 <= n:
            chunk *= 4
        return min(chunk, cap), 4 * cap  # (a bucket pads a piece to chunk · 4^j: at most 4×)
    if work <= 256:
        return 1024, 16384
    chunk = 64
    while chunk > 8 and chunk * work > 64 * 4096:
        chunk //= 2
    return chunk, 1024


def _host_prepared(given) -> bool:
    """Whether the inputs `given` are prepared on the host (numpy) and fitted chunk by chunk:
    concrete ones on CPU, and concrete numpy ones on any device (jax arrays already on a GPU
    stay there: a round trip through the host would cost more than the fit)."""
    leaves = jax.tree_util.tree_leaves(given)
    if not all(_is_concrete(a) for a in leaves):
        return False
    return _on_cpu() or not any(isinstance(a, jax.Array) for a in leaves)


def _bucket(n: int, chunk: int, max_batch: int) -> int:
    # Batch sizes chunk, 4 chunk, 16 chunk, ... up to max_batch: a batch of any size compiles
    # one of a few programs (three with the defaults), and a small one wastes little.
    b = chunk
    while b < n and b < max_batch:
        b *= 4
    return min(b, max_batch)


@functools.lru_cache(maxsize=256)
def _program(problem, solver, max_iter, tol, adjoint, chunk, known_scale):
    """The compiled batch fit for one problem; cached so equal settings share one program.

    The program takes, beyond the region data, `start` `(B, P)` internal parameters that
    replace the packed `init` where `resume` `(B,)` is True (a region continued from an earlier
    stage), and `budget`, the iteration limit as a traced scalar (so every stage of a staged
    fit shares one program). Unrolled fits use the static `max_iter` instead.

    `adjoint="none"` (concrete inputs fitted by Levenberg–Marquardt, which nothing can
    differentiate) builds a leaner program: the statistics reuse the solver's last loss and
    Gauss–Newton matrix and invert it once, where a differentiable fit evaluates them again at
    the optimum and inverts twice (gradient-safe). It compiles faster and does less per region.
    """

    def one(image, mask, weight, known, valid, held, p, start, resume, budget):
        dtype = image.dtype
        data = dict(
            image=image,
            mask=mask,
            weight=weight,
            known=known,
            valid=valid,
            held=held,
            fixed={n: p[n] for n in (*problem.names, "background") if n in problem.fixed},
        )
        if problem.separable:  # the weights' rectangle and value (see `RegionProblem`)
            data.update(rows=jnp.max(mask, 1), cols=jnp.max(mask, 0), scale=jnp.max(mask * weight))
        u0 = jnp.where(resume, start, problem.pack(p).astype(dtype))
        limit = max_iter if adjoint == "unroll" else budget
        if solver == "lm":
            run = functools.partial(levenberg_marquardt, problem, max_iter=limit, tol=tol)
        else:
            run = functools.partial(optax_minimise, problem, solver=solver, max_iter=limit, tol=tol)
        lean = adjoint == "none"
        if lean:
            u, status, iterations, (loss, fisher) = run(u0, data, equations=True)
        elif adjoint == "implicit":
            u, status, iterations = run(
                jax.lax.stop_gradient(u0), jax.lax.stop_gradient(data), unroll=False
            )
            u = implicit_optimum(problem)(u, u0, data, status == Status.CONVERGED)
        else:
            u, status, iterations = run(u0, data, unroll=True)

        active = problem.active(data, dtype)
        # A region whose solver gave up on NaN gets its statistics at a finite stand-in (then
        # reported as NaN): NaN there would reach the gradient of the data, even times zero.
        finite = jnp.all(jnp.isfinite(u))
        if lean:  # (the solver's loss is infinite when it never had a finite one)
            finite = finite & jnp.isfinite(loss)
        u_stat = jnp.where(finite, u, jnp.zeros_like(u))
        if not lean:
            loss, _, fisher = problem.normal_equations(u_stat, data)
        loss = jnp.where(finite, loss, jnp.nan)
        dof = jnp.maximum(jnp.sum(mask) - jnp.sum(active), 1.0)
        chi2_reduced = jnp.where(finite, problem.pearson(u_stat, data) / dof, jnp.nan)
        d = problem.natural_derivative(u_stat)
        # A singular region inverts the identity instead (in a differentiable program), and
        # padded or fixed entries (variance 0) skip the square root: their NaN or infinite
        # derivatives would spread through a sum over the batch even where multiplied by zero.
        # A source whose flux collapsed to zero (softplus underflow) has no information on any
        # of its parameters: it is left out of the inversion (its errors are NaN) instead of
        # making the whole region singular. Each parameter is compared with the same parameter
        # of the region's other sources: across parameters the information differs by units
        # (a bright source's position has 10^15 times its flux's), not by collapse.
        info = jnp.diagonal(jax.lax.stop_gradient(fisher))
        n_src = problem.n_sources * len(problem.free_names)
        src_info = jnp.where(active > 0, info, 0.0)[:n_src].reshape(problem.n_sources, -1)
        floor = jnp.finfo(dtype).eps ** 2 * jnp.max(src_info, axis=0, keepdims=True)
        collapsed = (src_info <= floor) & (floor > 0)  # (no information: singular)
        collapsed = jnp.concatenate([collapsed.reshape(-1), jnp.zeros(info.size - n_src, bool)])
        collapsed = collapsed & (active > 0)
        active_cov = jnp.where(collapsed, 0.0, active)
        if lean:
            inverse = masked_inverse(fisher, active_cov)
            invertible = jnp.all(jnp.isfinite(inverse))
        else:
            invertible = jnp.all(
                jnp.isfinite(masked_inverse(jax.lax.stop_gradient(fisher), active_cov))
            )
            eye = jnp.eye(fisher.shape[0], dtype=dtype)
            inverse = masked_inverse(jnp.where(invertible, fisher, eye), active_cov)
        cov = inverse * (d[:, None] * d[None, :])
        if not known_scale:
            cov = cov * jnp.where(finite, chi2_reduced, 1.0)
        singular = ~finite | ~invertible | ~jnp.all(jnp.isfinite(cov))
        cov = jnp.where(singular, jnp.nan, cov)
        status = jnp.where(singular & (status == Status.CONVERGED), Status.SINGULAR, status).astype(
            jnp.int32
        )
        var = jnp.diagonal(cov)
        positive = ~singular & (var > 0)
        sd = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
        sd = jnp.where(singular | collapsed, jnp.nan, sd)

        params = problem.unpack(u, data["fixed"])
        errors = _errors(problem, sd, valid & ~held)
        return dict(
            u=u,
            params=params,
            errors=errors,
            covariance=cov,
            status=status,
            iterations=iterations,
            loss=2 * loss,
            chi2_reduced=chi2_reduced,
        )

    @exact_matmuls
    def batch(images, mask, weight, known, valid, held, params, start, resume, budget):
        _TRACE_COUNT[0] += 1
        xs = (images, mask, weight, known, valid, held, params, start, resume)
        return jax.lax.map(lambda a: one(*a, budget), xs, batch_size=min(chunk, images.shape[0]))

    return jax.jit(batch)


def _program_name(problem, solver, max_iter, tol, adjoint, chunk, known_scale):
    """`_program`'s settings as a string that is the same in every process (the disk cache's
    name for it, see `_disk_cache`), or `None` for a program that has none: a PSF, noise model
    or solver of the user's own (functions, which no string identifies)."""
    psf, noise = problem.psf, problem.noise
    builtin_psf = psf.name in PSF_NAMES and get_psf(psf.name) is psf
    builtin_noise = noise.name in NOISE_NAMES and get_noise(noise.name) is noise
    if not (builtin_psf and builtin_noise and solver == "lm"):
        return None
    fields = (problem.psf.name, problem.names, tuple(sorted(problem.fixed)), problem.background,
              problem.noise.name, problem.n_sources, problem.shape, problem.separable)  # fmt: skip
    return repr(("fit", *fields, max_iter, tol, adjoint, chunk, known_scale))


def _errors(problem, sd, valid):
    nf = len(problem.free_names)
    k = problem.n_sources
    src = sd[: k * nf].reshape(k, nf)
    out = {}
    for n in problem.names:
        if n in problem.fixed:
            out[n] = jnp.zeros((k,), sd.dtype)
        else:
            out[n] = jnp.where(valid, src[:, problem.free_names.index(n)], 0.0)
    nb = problem.n_background
    out["background"] = sd[k * nf :] if problem.background_free else jnp.zeros((nb,), sd.dtype)
    return out


# Cumulative iteration budgets after which a staged fit sets its finished regions aside.
_STAGES = (8, 20)


def _run(fn, piece, budget, start=None, *, n_params, chunk, max_batch, name=None):
    """Fit one piece with the program `fn`, `budget` iterations at most.

    `start` `(n, P)`: internal parameters to continue from instead of the piece's `init`.
    A host (numpy) piece is fitted `chunk` regions per call (the last call padded), so a
    problem compiles one program whatever the number of regions (kept on disk under `name`,
    see `_disk_cache`); a traced piece is padded to its bucket (`_bucket`) and fitted in one
    call.
    """
    host = isinstance(piece[0], np.ndarray)
    xp = np if host else jnp
    n = piece[0].shape[0]
    dtype = piece[0].dtype
    resume = xp.full(n, start is not None)
    start = xp.zeros((n, n_params), dtype) if start is None else xp.asarray(start, dtype)
    args = (*piece, start, resume)
    size = -(-n // chunk) * chunk if host else _bucket(n, chunk, max_batch)
    if size > n:
        # Padding regions: no pixels, no sources; they converge at once and are dropped.
        args = jax.tree_util.tree_map(functools.partial(_pad, size=size, xp=xp), args)
    budget = np.int32(budget)
    if not host:
        return jax.tree_util.tree_map(lambda a: a[:n], fn(*args, budget))
    starts = range(0, size, chunk)
    cut = lambda s: (*jax.tree_util.tree_map(lambda a: a[s : s + chunk], args), budget)
    exe = compiled(fn, name, cut(0))
    call = lambda s: exe(*cut(s))
    if _on_cpu():  # side by side, one thread per core (see `_threads`)
        outs = list(cpu_map(lambda s: jax.device_get(call(s)), starts, pool="chunks"))
    else:  # every call is dispatched before any result is fetched: the device never waits
        outs = jax.device_get([call(s) for s in starts])
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a)[:n], *outs)


def _staged(run, piece, max_iter):
    """Fit one piece in stages of growing iteration budget, compacting unfinished regions.

    Regions in a vmapped chunk all step until the slowest is done, and a few slow regions (a
    flat valley, a source sliding onto its neighbour) would make every chunk run `max_iter`
    steps. So the whole piece gets `_STAGES[0]` iterations; the regions still running are
    gathered into fewer chunks and continued from where they stopped (the damping restarts),
    and so on up to `max_iter`. A region that converges early is unaffected.
    """
    cuts = [c for c in _STAGES if c < max_iter] + [max_iter]
    piece = jax.device_get(piece)
    out = run(piece, cuts[0])
    for done, cut in itertools.pairwise(cuts):
        going = np.flatnonzero(
            (out["status"] == Status.MAX_ITERATIONS) & (out["iterations"] >= done)
        )
        if going.size == 0:
            break
        sub = jax.tree_util.tree_map(lambda a, i=going: a[i], piece)
        more = run(sub, cut - done, out["u"][going])
        more["iterations"] = more["iterations"] + out["iterations"][going]
        out = jax.tree_util.tree_map(functools.partial(_put, index=going), out, more)
    return out


def _interleave(parts, index, n):
    """Outputs of region groups (`parts`, fitted at `index` of `n` regions), in order."""

    def merge(*leaves):
        if not isinstance(leaves[0], np.ndarray):
            out = jnp.zeros((n, *leaves[0].shape[1:]), leaves[0].dtype)
            for leaf, i in zip(leaves, index, strict=True):
                out = out.at[i].set(leaf)
            return out
        out = np.empty((n, *leaves[0].shape[1:]), leaves[0].dtype)
        for leaf, i in zip(leaves, index, strict=True):
            out[i] = leaf
        return out

    return jax.tree_util.tree_map(merge, *parts)


def _put(a, b, index):
    a = np.array(a)
    a[index] = b
    return a


def _pad(a, size, xp=jnp):
    return xp.concatenate([a, xp.zeros((size - a.shape[0], *a.shape[1:]), a.dtype)])


def _separable_regions(psf, noise_model, mask, weights):
    """`(B,)` True for the regions whose Gauss–Newton matrix is separable (see `RegionProblem`),
    or `None` when none can be (the PSF has no profile, the noise is not Gaussian, or the mask
    and weights are traced: this is checked on the host)."""
    if not has_profile(psf) or noise_model is not get_noise("gaussian"):
        return None
    if not (_is_concrete(mask) and _is_concrete(weights)):
        return None
    # Checked where the arrays are (jax arrays on a GPU stay there); only `(B,)` comes back.
    xp = np if isinstance(mask, np.ndarray) else jnp
    m = mask.astype(bool)
    rect = m.any(2)[:, :, None] & m.any(1)[:, None, :]
    lo = xp.where(m, weights, xp.inf).min(axis=(1, 2))
    hi = xp.where(m, weights, -xp.inf).max(axis=(1, 2))
    return np.asarray(xp.all(m == rect, axis=(1, 2)) & ((lo == hi) | (lo == xp.inf)))


def _check_values(params, valid):
    """Host-prepared starting values, in the real sources' slots: a width must be positive (else
    `ValueError`); a region that starts from a non-finite value ends as `Status.NOT_FINITE`,
    without spoiling its batch, and a warning counts such regions (traced values, under `jit`,
    cannot be checked or warned about)."""
    bad = np.zeros(valid.shape[0], bool)
    for n, a in params.items():
        if n == "background":
            bad |= ~np.all(np.isfinite(a), axis=1)
            continue
        bad |= ~np.all(np.isfinite(a) | ~valid, axis=1)
        if n in ("sigma", "sigma_x", "sigma_y") and np.any(valid & ~(a > 0) & np.isfinite(a)):
            raise ValueError(f"init[{n!r}] must be > 0, got {a[valid & np.isfinite(a)].min():g}")
    if bad.any():
        warnings.warn(
            f"{bad.sum()} region(s) start from non-finite values (NaN or inf in init): they are "
            "not fitted, and end with status NOT_FINITE",
            stacklevel=3,
        )


def _source_mask(a, default, b, k, name, xp):
    if a is None:
        return xp.full((b, k), default, bool)
    a = xp.asarray(a)
    if a.shape != (b, k):
        raise ValueError(f"{name} must have shape (B, K) = {(b, k)}, got {a.shape}")
    return a.astype(bool)


def _as_float(a, dtype, name, xp):
    a = xp.asarray(a)
    if not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)):
        raise ValueError(f"{name} must hold numbers, got dtype {a.dtype}")
    return a.astype(dtype)


def fit_regions(
    images,
    init: dict,
    *,
    psf="gaussian",
    background: str = "constant",
    noise="gaussian",
    mask=None,
    valid=None,
    held=None,
    fixed: Sequence[str] = (),
    weights=None,
    known=None,
    offset=0.0,
    solver="lm",
    max_iter: int = 50,
    tol: float = 1e-5,
    adjoint: str = "implicit",
    chunk_size: int | None = None,
    max_batch: int | None = None,
    progress_bar: bool | None = None,
) -> FitResult:
    """Fit `B` windows, each a sum of up to `K` sources plus one shared background, jointly.

    **Arguments:**

    - `images`: `(B, H, W)` pixel values (counts).
    - `init`: starting values: a `(B, K)` array (or anything that broadcasts to it) for each
      source parameter of the PSF (`x`, `y`, `flux`, `sigma`, ... in window pixel coordinates,
      `x` the column, `y` the row, pixel centres at integers), and `"background"`: `(B,)` for
      `"constant"`, `(B, 3)` (offset at pixel `(0, 0)`, slope in x, slope in y) for `"plane"`.
    - `psf`: `"gaussian"`, `"elliptical_gaussian"`, `"rotated_gaussian"`,
      `"integrated_gaussian"`, `"integrated_elliptical_gaussian"`, a `PSF`, or a JAX function
      `(params, x, y) -> image` (its parameter names are the keys of `init`).
    - `background`: `"constant"` or `"plane"`.
    - `noise`: `"gaussian"` (least squares), `"poisson"` (maximum likelihood on counts), or a
      function `loss(model, data, weight) -> per-pixel loss` (a `NoiseModel` for full control).
    - `mask`: `(B, H, W)` True where a pixel counts. Masked pixels may hold anything.
    - `valid`: `(B, K)` True for real sources; False slots are padding and change nothing.
    - `held`: `(B, K)` True for sources held at their `init` values: they stay in the model (e.g.
      neighbours fitted elsewhere, or forced photometry) but the fit does not move them.
    - `fixed`: names held at their `init` values (e.g. `("sigma",)` or `("background",)`).
    - `weights`: `(B, H, W)` per-pixel weights (inverse variances for Gaussian noise). When given,
      the Gaussian noise level is known and errors are not rescaled by the reduced χ².
    - `known`: `(B, H, W)` light already accounted for (e.g. neighbours measured elsewhere),
      added to the model; unlike subtracting it from `images`, the Poisson variance includes it.
    - `offset`: camera offset subtracted from `images` before fitting (e.g. for Poisson counts).
    - `solver`: `"lm"` (Levenberg–Marquardt) or any optax optimizer (`optax.lbfgs()`, ...).
    - `max_iter`, `tol`: iteration limit, and convergence tolerance as a fraction of one pixel's
      expected contribution to the loss (see `levenberg_marquardt`). On CPU, outside `jit`,
      `grad` and `vmap`, Levenberg–Marquardt runs in stages (8, 20, then `max_iter`
      iterations), each on the regions still running, so a few slow regions do not hold up a
      whole batch; a region continued into a later stage restarts its damping.
    - `adjoint`: how `jax.grad`, `jax.jvp` and friends see the fit. `"implicit"` (default): the
      exact derivative of the optimum by the implicit function theorem (one small solve with the
      loss's full Hessian per region), with respect to `images`, `weights`, `offset` and every
      `fixed` parameter. The optimum does not depend on the free parameters' starting values
      (their gradient is zero), and a region that did not converge gets a zero gradient, never
      NaN. `"unroll"`: differentiate through exactly `max_iter` solver steps; it agrees where
      every fit converges within them, at many times the time, memory and compile time.
    - `chunk_size`: regions vmapped together (default on CPU 64, fewer for big regions and 1024
      for single sources in windows of up to 16×16; on GPU the largest 512 · 4^j not above
      the batch, up to 65536 for small regions; see `_default_sizes`). On CPU, concrete
      inputs' chunks run side by side, one per core.
    - `max_batch`: largest piece fitted at once (default on CPU 1024, 16384 for single sources
      in windows of up to 16×16; on GPU 4 times the largest chunk); bigger inputs are fitted
      piece by piece.
      Concrete inputs (on a GPU: numpy ones) go through `chunk_size` regions per call, so
      every batch size shares one compiled program; the others (under `jit`; jax arrays on a
      GPU) are padded to `chunk_size` times a power of 4, so they compile one of a few.
    - `progress_bar`: show progress over pieces (default: when there are several, on a terminal).

    **Returns:** a `FitResult` with `params`, `errors`, `covariance`, `status`, `iterations`,
    `loss` and `chi2_reduced`. A failed region gets a non-zero `status` and never raises.

    >>> import jax.numpy as jnp, crowdfit
    >>> y, x = jnp.mgrid[:9, :9]
    >>> img = 5.0 + 100 * jnp.exp(-((x - 4.3) ** 2 + (y - 3.8) ** 2) / 2)
    >>> init = {"x": [[4.0]], "y": [[4.0]], "flux": [[500.0]], "sigma": [[1.5]],
    ...         "background": [0.0]}
    >>> res = crowdfit.fit_regions(img[None], init)
    >>> round(float(res.params["x"][0, 0]), 2), int(res.status[0])
    (4.3, 0)
    """
    psf = get_psf(psf)
    noise_model = get_noise(noise)
    nb = n_background_params(background)
    if adjoint not in ("implicit", "unroll"):
        raise ValueError(f"adjoint must be 'implicit' or 'unroll', got {adjoint!r}")
    if isinstance(solver, str) and solver != "lm":
        raise ValueError(f"solver must be 'lm' or an optax optimizer, got {solver!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    for name, v in (("chunk_size", chunk_size), ("max_batch", max_batch)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be at least 1 (or None), got {v}")

    # Concrete inputs are prepared on the host (numpy; see `_host_prepared`): jax would compile
    # small programs for every new batch size. Traced ones (under jit, grad or vmap) and jax
    # arrays on a GPU stay jax arrays.
    host = _host_prepared((images, init, mask, valid, held, weights, known, offset))
    xp = np if host else jnp
    images = xp.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must have shape (B, H, W), got shape {images.shape}")
    floating = jnp.issubdtype(images.dtype, jnp.floating)
    dtype = jax.dtypes.canonicalize_dtype(images.dtype if floating else np.float64)
    images = _as_float(images, dtype, "images", xp)
    b, h, w = images.shape
    if b == 0:
        raise ValueError("images is empty: B = 0 regions")

    if not isinstance(init, dict):
        raise ValueError("init must be a dict of starting values keyed by parameter name")
    names = psf.params if psf.params is not None else tuple(n for n in init if n != "background")
    missing = [n for n in (*names, "background") if n not in init]
    if missing:
        raise ValueError(
            f"init is missing {missing} (psf {psf.name!r} needs {list(names)} and 'background')"
        )
    extra = [n for n in init if n not in (*names, "background")]
    if extra:
        raise ValueError(f"init has unknown parameters {extra} for psf {psf.name!r}")
    unknown_fixed = [n for n in fixed if n not in (*names, "background")]
    if unknown_fixed:
        raise ValueError(f"fixed names unknown parameters {unknown_fixed}")
    if set(fixed) >= {*names, "background"}:
        raise ValueError("every parameter is fixed: there is nothing to fit")
    if "x" in init:
        k = np.shape(init["x"])[-1] if np.ndim(init["x"]) == 2 else 1
    else:
        k = max(np.shape(init[n])[-1] if np.ndim(init[n]) == 2 else 1 for n in names)
    params = {}
    for n in names:
        a = _as_float(init[n], dtype, f"init[{n!r}]", xp)
        try:
            params[n] = xp.broadcast_to(a, (b, k))
        except ValueError:
            raise ValueError(
                f"init[{n!r}] has shape {a.shape}, which does not broadcast to (B, K) = {(b, k)}"
            ) from None
    bg = _as_float(init["background"], dtype, "init['background']", xp)
    if nb == 1 and bg.ndim == 1:
        bg = bg[:, None]
    try:
        bg = xp.broadcast_to(bg, (b, nb))
    except ValueError:
        want = "(B,)" if nb == 1 else "(B, 3)"
        raise ValueError(
            f"init['background'] has shape {bg.shape}; background {background!r} needs {want}"
        ) from None
    params["background"] = bg

    valid = _source_mask(valid, True, b, k, "valid", xp)
    held = _source_mask(held, False, b, k, "held", xp)
    if host:
        _check_values(params, valid)

    if mask is None:
        if _is_concrete(images):
            bad = int(np.size(images) - np.count_nonzero(np.isfinite(np.asarray(images))))
            if bad:
                raise ValueError(
                    f"images hold {bad} non-finite pixel(s) (NaN or inf); pass a mask that "
                    "excludes them (fit_image masks them for you)"
                )
        mask = xp.ones(images.shape, bool)
    else:
        mask = xp.asarray(mask)
        if mask.shape != images.shape:
            raise ValueError(f"mask must have the images' shape {images.shape}, got {mask.shape}")
        mask = mask.astype(bool)
        if _is_concrete(images) and _is_concrete(mask):
            bad = int(np.count_nonzero(np.asarray(mask) & ~np.isfinite(np.asarray(images))))
            if bad:
                raise ValueError(f"{bad} non-finite pixel(s) are not masked out")
    images = xp.where(mask, images - xp.asarray(offset, dtype), 0.0).astype(dtype)

    known_scale = noise_model.known_scale or weights is not None
    if weights is None:
        weights = xp.ones(images.shape, dtype)
    else:
        weights = _as_float(weights, dtype, "weights", xp)
        try:
            weights = xp.broadcast_to(weights, images.shape)
        except ValueError:
            raise ValueError(
                f"weights has shape {weights.shape}, expected the images' {images.shape}"
            ) from None
        weights = xp.where(mask, weights, 0.0).astype(dtype)
        w_host = np.asarray(weights) if _is_concrete(weights) else None
        if w_host is not None and not np.all(np.isfinite(w_host) & (w_host >= 0)):
            raise ValueError("weights must be finite and >= 0 where the mask counts a pixel")

    default_chunk, default_max = _default_sizes(k * h * w, b)
    max_batch = int(max_batch or max(default_max, chunk_size or 0))
    chunk = min(int(chunk_size or default_chunk), max_batch)
    # Unrolled fits compile their length; the others take the budget at run time.
    static_iter = int(max_iter) if adjoint == "unroll" else 0

    mask_f = mask.astype(dtype)
    if known is None:
        known = xp.zeros(images.shape, dtype)
    else:
        known = _as_float(known, dtype, "known", xp)
        if known.shape != images.shape:
            raise ValueError(f"known must have the images' shape {images.shape}, got {known.shape}")
        known = xp.where(mask, known, 0.0).astype(dtype)
    inputs = (images, mask_f, weights, known, valid, held, params)
    # Concrete inputs fitted by Levenberg–Marquardt run in stages (see `_staged`); traced ones
    # (under jit, grad or vmap) and the other solvers run in one go.
    staged = host and solver == "lm" and adjoint == "implicit" and _on_cpu()
    # Nothing differentiates a concrete fit: its program need not be differentiable.
    program_adjoint = "none" if host and solver == "lm" and adjoint == "implicit" else adjoint
    # Regions whose Gauss–Newton matrix is separable (most, when any) are fitted by their own
    # program, the others (masked pixels inside a window, uneven weights) by the general one.
    fast = _separable_regions(psf, noise_model, mask, weights)
    if fast is None or fast.all() or not fast.any():
        groups = [(None, fast is not None and bool(fast.all()))]
    else:
        groups = [(np.flatnonzero(fast), True), (np.flatnonzero(~fast), False)]
    parts = []
    for sel, separable in groups:
        problem = RegionProblem(
            psf, tuple(names), frozenset(fixed), background, noise_model, k, (h, w), separable
        )
        fn = _program(problem, solver, static_iter, float(tol), program_adjoint, int(chunk),
                      known_scale)  # fmt: skip
        name = _program_name(problem, solver, static_iter, float(tol), program_adjoint,
                             int(chunk), known_scale)  # fmt: skip
        run = functools.partial(
            _run, fn, n_params=problem.size, chunk=chunk, max_batch=max_batch, name=name
        )
        group = inputs if sel is None else jax.tree_util.tree_map(lambda a, i=sel: a[i], inputs)
        n_group = group[0].shape[0]
        pieces = []
        starts = range(0, n_group, max_batch)
        for s in progress(starts, total=len(starts), desc="fitting regions", enabled=progress_bar):
            piece = jax.tree_util.tree_map(lambda a, s=s: a[s : s + max_batch], group)
            if staged:
                pieces.append(_staged(run, piece, int(max_iter)))
            else:
                pieces.append(run(piece, max_iter))
        parts.append(
            pieces[0]
            if len(pieces) == 1
            else jax.tree_util.tree_map(lambda *a: xp.concatenate(a), *pieces)
        )
    out = parts[0] if len(parts) == 1 else _interleave(parts, [g[0] for g in groups], b)
    out.pop("u")
    if nb == 1:
        out["params"]["background"] = out["params"]["background"][:, 0]
        out["errors"]["background"] = out["errors"]["background"][:, 0]
    if host:  # device arrays, as from a traced call (the values are already jax's dtypes)
        out = jax.device_put(out)
    params_out = out["params"]
    return FitResult(
        params=params_out,
        errors=out["errors"],
        covariance=out["covariance"],
        status=out["status"],
        iterations=out["iterations"],
        loss=out["loss"],
        chi2_reduced=out["chi2_reduced"],
        names=problem.labels(),
    )
