"""Peer methods that crowdfit's benchmarks compare against, as plain numpy-in / numpy-out functions.

Every function imports its peer library lazily, so this module imports with numpy alone. Run the
benchmarks with ``benchmarks/.venv-peers/bin/python`` (see ``benchmarks/README.md``); picasso lives
in its own virtualenv (``benchmarks/.venv-picasso``) and is driven through a subprocess.

Conventions shared by every function here, whatever the peer uses internally:

* ``x`` is the column and ``y`` the row coordinate, in pixels, with pixel *centres* at integers
  (pixel ``image[r, c]`` covers ``c - 0.5 <= x < c + 0.5``), the same as crowdfit.
* Each result is a dict of 1-D float64 numpy arrays (one entry per source kept) plus ``time_s``:
  the wall time of the peer's own detection and fitting, not of our conversion code.
* ``flux`` is the total flux of the source (the integral of its profile over the plane).

Functions: :func:`seed_curve_fit`, :func:`photutils_psf`, :func:`crowdsource_fit`,
:func:`picasso_gaussmle`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np

__all__ = ["seed_curve_fit", "photutils_psf", "crowdsource_fit", "picasso_gaussmle"]

HERE = Path(__file__).resolve().parent
PICASSO_PYTHON = HERE / ".venv-picasso" / "bin" / "python"
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _image(image) -> np.ndarray:
    a = np.asarray(image, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {a.shape}")
    return a


def _odd(n: float) -> int:
    n = int(math.ceil(n))
    return n if n % 2 == 1 else n + 1


# ---------------------------------------------------------------------------------------------
# 1. The seed answer: peak_local_max + one 7-parameter rotated Gaussian per crop with curve_fit
# ---------------------------------------------------------------------------------------------


from crowdfit._baseline import per_spot_fit as seed_curve_fit  # noqa: E402

# ---------------------------------------------------------------------------------------------
# 2. photutils PSFPhotometry / IterativePSFPhotometry
# ---------------------------------------------------------------------------------------------


def _noise_estimate(img: np.ndarray) -> float:
    from astropy.stats import sigma_clipped_stats

    return float(sigma_clipped_stats(img, sigma=3.0, maxiters=10)[2])


def photutils_psf(
    image,
    *,
    sigma: float,
    x0=None,
    y0=None,
    iterative: bool = False,
    background=None,
    error=None,
    fit_shape: int | None = None,
    pixel_integrated: bool = False,
    min_separation: float | None = None,
    threshold_nsigma: float = 5.0,
    aperture_radius: float | None = None,
    local_bkg_radii: tuple[float, float] | None = None,
    xy_bounds: float | None = None,
    maxiters: int = 3,
    mode: str = "all",
    fitter_maxiters: int = 100,
    progress_bar: bool = False,
    psf_model=None,
    finder_kwargs: dict | None = None,
) -> dict:
    """photutils PSF photometry with a fixed-width circular Gaussian, grouped joint fits.

    Setup (photutils 3.0 API, from its docstrings):

    * PSF model: ``CircularGaussianPSF(fwhm=2.3548 sigma)`` (point-sampled at pixel centres, like
      the seed's simulations) or, with ``pixel_integrated=True``, ``CircularGaussianSigmaPRF(sigma=
      sigma)`` (integrated over each pixel; successor of the old ``IntegratedGaussianPRF``). Width
      fixed; x_0, y_0, flux fitted. photutils' flux is the integral over the plane.
    * ``fit_shape``: odd box ``>= 3 sigma`` wide (7x7 for sigma = 2); photutils recommends a small
      box covering the high-S/N core. The fit box does not move during the fit.
    * Grouping: ``SourceGrouper(min_separation)``; default ``min_separation = fit_shape`` pixels
      (~3.5 sigma): stars whose fit boxes overlap are fitted together with the default
      ``TRFLSQFitter`` (``fitter_maxiters`` iterations).
    * Background: a known ``background`` (scalar or image) is subtracted beforehand and no local
      background is estimated; otherwise ``LocalBackground(inner, outer, MMMBackground())`` with
      radii ``local_bkg_radii`` (default 4 sigma and 7 sigma) is subtracted per source.
    * Errors: ``error`` (scalar or image of 1-sigma pixel noise) is passed to the fit as weights
      and gives ``flux_err``; if None, the noise is estimated by a sigma-clipped std of the
      (background-subtracted) image and used as a flat error image.
    * Starting positions: ``x0, y0`` (x = column) if given, else ``DAOStarFinder(threshold=
      threshold_nsigma * noise, fwhm)``. Initial fluxes from a circular aperture of radius
      ``aperture_radius`` (default: the FWHM).
    * ``iterative=True``: ``IterativePSFPhotometry`` with the same DAOStarFinder searching the
      residual, ``maxiters`` rounds, ``mode="all"`` by default (every source found so far refitted
      on the original image with the grouper: the better choice in crowded fields; ``"new"`` is
      photutils' default). ``x0, y0`` then seed only the first round.

    * Finder: ``DAOStarFinder(threshold, fwhm, min_separation=0)``, DAOFIND's own rule and
      photutils' default before 3.0, which made it ``2.5 fwhm``: that default keeps one peak in
      each disc of 2.5 FWHM, and ``PSFPhotometry`` found 82 % of the stars at 0.02 stars/FWHM²
      and 12 % at 0.3 with it, 97 % and 49 % without (``crowded_field.py``'s fields).
      ``finder_kwargs`` adds to or overrides its arguments (e.g. ``ratio`` and ``theta`` for
      an elliptical kernel).
    * ``psf_model``: another photutils PSF model to fit instead (e.g. ``GaussianPSF`` with its
      widths and angle fixed, for elongated spots); ``sigma`` then sizes the fit box, the
      finder's FWHM and the aperture.

    Returns ``dict(x, y, flux, flux_err, flags, qfit, group_id, time_s, n_invalid, n_warnings,
    warnings)``; rows whose fitted x/y/flux are not finite (invalid sources) are dropped and
    counted in ``n_invalid``. photutils' own convention already is x = column, pixel centres at
    integers. ``flags`` is photutils' bit field (e.g. 8: fit hit ``fitter_maxiters``).
    """
    from astropy.table import Table
    from photutils.background import LocalBackground, MMMBackground
    from photutils.detection import DAOStarFinder
    from photutils.psf import (
        CircularGaussianPSF,
        CircularGaussianSigmaPRF,
        IterativePSFPhotometry,
        PSFPhotometry,
        SourceGrouper,
    )

    img = _image(image)
    fwhm = FWHM_PER_SIGMA * sigma
    if fit_shape is None:
        fit_shape = _odd(3.0 * sigma)
    if min_separation is None:
        min_separation = float(fit_shape)
    if aperture_radius is None:
        aperture_radius = fwhm

    if background is not None:
        img = img - background
        local_bkg = None
    else:
        inner, outer = local_bkg_radii or (4.0 * sigma, 7.0 * sigma)
        local_bkg = LocalBackground(inner, outer, bkg_estimator=MMMBackground())

    if error is None:
        err_img = np.full(img.shape, _noise_estimate(img))
    else:
        err_img = np.broadcast_to(np.asarray(error, dtype=np.float64), img.shape).copy()
    noise = float(np.median(err_img))

    if psf_model is not None:
        pass
    elif pixel_integrated:
        psf_model = CircularGaussianSigmaPRF(sigma=sigma)
    else:
        psf_model = CircularGaussianPSF(fwhm=fwhm)
    finder = DAOStarFinder(
        **{"threshold": threshold_nsigma * noise, "fwhm": fwhm, "min_separation": 0.0,
           **(finder_kwargs or {})}
    )  # fmt: skip
    grouper = SourceGrouper(min_separation=min_separation)
    common = dict(
        grouper=grouper,
        fitter_maxiters=fitter_maxiters,
        xy_bounds=xy_bounds,
        aperture_radius=aperture_radius,
        local_bkg_estimator=local_bkg,
        progress_bar=progress_bar,
    )
    init = None
    if x0 is not None:
        init = Table({"x": np.asarray(x0, float), "y": np.asarray(y0, float)})

    if iterative:
        phot = IterativePSFPhotometry(
            psf_model, fit_shape, finder, maxiters=maxiters, mode=mode, **common
        )
    else:
        phot = PSFPhotometry(
            psf_model, fit_shape, finder=None if init is not None else finder, **common
        )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        tab = phot(img, error=err_img, init_params=init)
        t = time.perf_counter() - t0

    x = np.asarray(tab["x_fit"], dtype=np.float64)
    y = np.asarray(tab["y_fit"], dtype=np.float64)
    flux = np.asarray(tab["flux_fit"], dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)

    def col(name, dtype=np.float64):
        if name in tab.colnames:
            return np.asarray(tab[name], dtype=dtype)[ok]
        return np.full(int(ok.sum()), np.nan)

    msgs = sorted({f"{w.category.__name__}: {str(w.message)[:120]}" for w in caught})
    return dict(
        x=x[ok],
        y=y[ok],
        flux=flux[ok],
        flux_err=col("flux_err"),
        flags=col("flags"),
        qfit=col("qfit"),
        group_id=col("group_id"),
        time_s=t,
        n_invalid=int((~ok).sum()),
        n_warnings=len(caught),
        warnings=msgs,
    )


# ---------------------------------------------------------------------------------------------
# 3. crowdsource (crowdsourcephoto): whole-image sparse linear fit with iterative detection
# ---------------------------------------------------------------------------------------------


class _GaussianPSF:
    """A fixed circular Gaussian in crowdsource's PSF-callable interface.

    crowdsource calls ``psf(x, y, stampsz=None, deriv=False)`` with x = *row*, y = *column*
    (scalars or arrays) and expects unit-flux stamps of odd size centred on the pixel
    ``round(x), round(y)`` (plus, with ``deriv``, the derivatives with respect to the source's x
    and y). This mirrors ``crowdsource.psf.MoffatPSF``, which renders its profile analytically at
    the sub-pixel offset instead of spline-shifting a stamp as ``SimplePSF`` does. Normalised to
    unit integral over the plane, so crowdsource's flux is the total flux.
    """

    def __init__(self, sigma: float, pixel_integrated: bool = False, default_stampsz: int = 59):
        self.sigma = float(sigma)
        self.pixel_integrated = pixel_integrated
        self.default_stampsz = default_stampsz

    def _profile_1d(self, d):
        s = self.sigma
        if self.pixel_integrated:
            from scipy.special import erf

            r2 = math.sqrt(2.0) * s
            val = 0.5 * (erf((d + 0.5) / r2) - erf((d - 0.5) / r2))
            # derivative w.r.t. the source position (d = pixel - position)
            dval = -(np.exp(-0.5 * ((d + 0.5) / s) ** 2) - np.exp(-0.5 * ((d - 0.5) / s) ** 2))
            dval = dval / (math.sqrt(2.0 * math.pi) * s)
        else:
            val = np.exp(-0.5 * (d / s) ** 2) / (math.sqrt(2.0 * math.pi) * s)
            dval = d / s**2 * val
        return val, dval

    def __call__(self, x, y, stampsz=None, deriv=False):
        if stampsz is None:
            stampsz = self.default_stampsz
        scalar = np.ndim(x) == 0 and np.ndim(y) == 0
        xa, ya = np.broadcast_arrays(np.atleast_1d(x), np.atleast_1d(y))
        off = np.arange(stampsz, dtype=np.float64) - stampsz // 2
        dxs = off[None, :] - (xa - np.round(xa)).reshape(-1, 1)  # along axis 0 (rows)
        dys = off[None, :] - (ya - np.round(ya)).reshape(-1, 1)  # along axis 1 (columns)
        px, dpx = self._profile_1d(dxs)
        py, dpy = self._profile_1d(dys)
        psf = (px[:, :, None] * py[:, None, :]).astype("f4")
        if deriv:
            ddx = (dpx[:, :, None] * py[:, None, :]).astype("f4")
            ddy = (px[:, :, None] * dpy[:, None, :]).astype("f4")
            res = (psf, ddx, ddy)
            return tuple(r[0] for r in res) if scalar else res
        return psf[0] if scalar else psf


def crowdsource_fit(
    image,
    *,
    sigma: float,
    background=None,
    noise=None,
    pixel_integrated: bool = False,
    threshold: float = 5.0,
    psfderiv: bool = True,
    refit_psf: bool = False,
    nsky: int = 0,
    miniter: int = 4,
    maxiter: int = 10,
    ntile: int = 1,
    verbose: bool = False,
    psf=None,
) -> dict:
    """crowdsource's ``fit_im``: every star of the image in one sparse linear least-squares fit.

    Setup (crowdsourcephoto 0.5.9, ``crowdsource.crowdsource_base.fit_im``):

    * PSF: a fixed circular Gaussian of the given ``sigma``, rendered analytically at each star's
      sub-pixel offset (:class:`_GaussianPSF`, same interface as ``crowdsource.psf.MoffatPSF``),
      or ``psf``, a crowdsource PSF object (e.g. ``crowdsource.psf.MoffatPSF(fwhm, beta)``);
      point-sampled, or pixel-integrated with ``pixel_integrated=True``. ``refit_psf=False``
      keeps it fixed. ``psfderiv=True``: the PSF's x/y derivatives are fitted alongside each flux
      and give the position updates between rounds (crowdsource's default).
    * Weights: ``weight = 1 / noise`` per pixel. crowdsource's module docstring calls this an
      "inverse-variance image", but the code multiplies residuals by it and reports
      ``dflux = (sum P^2 w^2)^-1/2``: it is the inverse *standard deviation*. ``noise`` is a
      scalar or image; if None it is estimated by a sigma-clipped std.
    * Background: a known ``background`` is subtracted beforehand (crowdsource then still fits
      a residual sky with its own median-filter sky estimate, which cannot be turned off); if
      None, crowdsource's own sky estimate does everything. ``nsky`` > 0 (>= 3) adds an
      ``nsky x nsky`` spline sky to the linear fit.
    * Detection: crowdsource's own peak finding on the residual significance image each round,
      ``threshold`` sigma, ``miniter``..``maxiter`` rounds; the last round fixes positions and
      refits fluxes only (its forced-photometry pass). ``ntile > 1`` splits the image into
      ``ntile x ntile`` overlapping subregions per linear solve (crowdsource's way for big
      images).

    crowdsource indexes arrays as ``im[x, y]`` (x = row, y = column, pixel centres at integers);
    the result here is converted to x = column, y = row. Returns ``dict(x, y, flux, flux_err,
    dx_err, dy_err, qf, fracflux, rchi2, passno, sky, time_s)`` where ``flux_err`` is
    crowdsource's ``dflux`` (ignores covariance with neighbours).
    """
    import crowdsource.crowdsource_base as cs

    img = _image(image)
    if background is not None:
        img = img - background
    if noise is None:
        noise = _noise_estimate(img)
    isig = 1.0 / np.broadcast_to(np.asarray(noise, dtype=np.float64), img.shape)
    if psf is None:
        psf = _GaussianPSF(sigma, pixel_integrated=pixel_integrated)

    with warnings.catch_warnings():
        # crowdsource imports the deprecated scipy.ndimage.filters/interpolation namespaces
        warnings.simplefilter("ignore", DeprecationWarning)
        t0 = time.perf_counter()
        stars, _model, sky, _psf = cs.fit_im(
            img.astype("f4"),
            psf,
            weight=isig.astype("f4"),
            psfderiv=psfderiv,
            refit_psf=refit_psf,
            nskyx=nsky,
            nskyy=nsky,
            threshold=threshold,
            miniter=miniter,
            maxiter=maxiter,
            ntilex=ntile,
            ntiley=ntile,
            verbose=verbose,
        )
        t = time.perf_counter() - t0

    f8 = lambda name: np.asarray(stars[name], dtype=np.float64)  # noqa: E731
    return dict(
        x=f8("y"),  # crowdsource's y is the column
        y=f8("x"),  # crowdsource's x is the row
        flux=f8("flux"),
        flux_err=f8("dflux"),
        dx_err=f8("dy"),
        dy_err=f8("dx"),
        qf=f8("qf"),
        fracflux=f8("fracflux"),
        rchi2=f8("rchi2"),
        passno=f8("passno"),
        sky=f8("sky"),
        time_s=t,
    )


# ---------------------------------------------------------------------------------------------
# 4. picasso gaussmle (in its own virtualenv, through a subprocess)
# ---------------------------------------------------------------------------------------------

_PICASSO_RUNNER = textwrap.dedent(
    """
    import sys, time, threading, warnings
    from concurrent import futures
    import numpy as np
    warnings.simplefilter("ignore", DeprecationWarning)  # picasso.gaussmle is deprecated in 0.11
    from picasso import gaussmle as gm

    src, dst, eps, max_it, method, n_threads, n_warm = sys.argv[1:8]
    eps, max_it, n_threads, n_warm = float(eps), int(max_it), int(n_threads), int(n_warm)
    spots = np.ascontiguousarray(np.load(src), dtype=np.float32)

    def fit(s):
        if n_threads <= 0:  # the public, serial entry point
            return gm.gaussmle(s, eps, max_it, method=method)
        # gaussmle_async's own thread pool, with an explicit worker count (picasso picks
        # 0.75 x cores); the numba kernels release the GIL.
        n = len(s)
        th = np.zeros((n, 6), np.float32); cr = np.full((n, 6), np.inf, np.float32)
        ll = np.zeros(n, np.float32); it = np.zeros(n, np.int32)
        func = gm._mlefit_sigma if method == "sigma" else gm._mlefit_sigmaxy
        lock, cur = threading.Lock(), [0]
        with futures.ThreadPoolExecutor(n_threads) as ex:
            for _ in range(n_threads):
                ex.submit(gm._worker, func, s, th, cr, ll, it, eps, max_it, cur, lock)
        return th, cr, ll, it

    t0 = time.perf_counter(); fit(spots[:n_warm]); t_warm = time.perf_counter() - t0
    t0 = time.perf_counter(); th, cr, ll, it = fit(spots); t = time.perf_counter() - t0
    np.savez(dst, thetas=th, crlbs=cr, loglik=ll, iterations=it, time_s=t, warmup_s=t_warm)
    """
)


def picasso_gaussmle(
    spots,
    *,
    eps: float = 1e-3,
    max_it: int = 100,
    method: str = "sigma",
    n_threads: int = 0,
    n_warmup: int = 16,
    python: str | os.PathLike | None = None,
    timeout: float | None = 1800,
) -> dict:
    """picasso's single-emitter Poisson MLE (``picasso.gaussmle.gaussmle``) on a spot stack.

    Setup: picasso 0.11's ``gaussmle(spots, eps, max_it, method)`` (Smith et al. 2010 Newton
    iterations on a pixel-integrated Gaussian + flat background, numba-compiled; deprecated in
    0.11 in favour of ``picasso.fitting.gaussfit.fit_spots(mle=True)``, which evaluates the
    Gaussian at pixel centres instead). ``method="sigma"``: one width (x, y, photons, bg, sigma);
    ``"sigmaxy"``: separate widths. Convergence: both x and y move less than ``eps`` px in one
    iteration, or ``max_it`` iterations. Caveat: only x and y enter that test, and photons/bg
    steps are capped at 10 % of their value per iteration, so with ``eps=1e-3`` ("sigma" stops
    after ~3 iterations on 1000-photon spots) x/y are at the CRLB but photons come out ~3 % low,
    bg ~6 % high and sigma ~2 % low; ``eps=1e-5`` (~30 iterations, ~6x slower) or ``"sigmaxy"``
    removes that bias. Use a small ``eps`` when comparing photometry, the default for speed.

    ``spots`` (N, S, S) are photon counts (float32). They are written to a temporary ``.npy``
    and fitted by ``benchmarks/.venv-picasso/bin/python`` (or ``python``, or the env var
    ``CROWDFIT_PICASSO_PYTHON``). The first ``n_warmup`` spots are fitted once first so numba's
    compilation is not timed; ``time_s`` is the wall time of the one call fitting all N spots
    (file transfer and interpreter start excluded). ``n_threads=0`` uses the public serial
    ``gaussmle``; ``n_threads=k`` runs picasso's ``gaussmle_async`` worker loop on k threads
    (picasso itself would use ``int(0.75 * cpu_count)``, i.e. 1 on a 2-core machine).

    picasso's conventions (checked against the source and on simulated spots): ``theta[:, 0]``
    is the column (x) and ``theta[:, 1]`` the row (y) inside the box, pixel centres at integers
    0..S-1 (``spot[row, col]``), the same as here, so no conversion is needed. ``photons`` is the
    Gaussian's integral over the plane (not the counts inside the box), ``bg`` the background
    photons per pixel, ``sx``/``sy`` the width of the Gaussian before pixel integration, in px.
    ``crlb_*`` are picasso's Cramér-Rao *variances* (from the Fisher matrix at the fit);
    ``lpx = sqrt(crlb_x)``. Returns ``dict(x, y, photons, bg, sx, sy, crlb_x, crlb_y,
    crlb_photons, crlb_bg, iterations, loglik, time_s, fits_per_s, warmup_s)``.
    """
    arr = np.ascontiguousarray(np.asarray(spots, dtype=np.float32))
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"expected an (N, S, S) spot stack, got {arr.shape}")
    if method not in ("sigma", "sigmaxy"):
        raise ValueError("method must be 'sigma' or 'sigmaxy'")
    py = Path(python or os.environ.get("CROWDFIT_PICASSO_PYTHON", PICASSO_PYTHON))
    if not py.exists():
        raise FileNotFoundError(f"{py} not found: run `bash benchmarks/setup_peers.sh` first")

    with tempfile.TemporaryDirectory(prefix="crowdfit-picasso-") as tmp:
        src, dst = Path(tmp, "spots.npy"), Path(tmp, "fit.npz")
        np.save(src, arr)
        cmd = [
            str(py),
            "-c",
            _PICASSO_RUNNER,
            str(src),
            str(dst),
            repr(float(eps)),
            str(int(max_it)),
            method,
            str(int(n_threads)),
            str(min(int(n_warmup), len(arr))),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"picasso subprocess failed ({proc.returncode}):\n{proc.stderr}")
        with np.load(dst) as r:
            th, cr = r["thetas"].astype(np.float64), r["crlbs"].astype(np.float64)
            ll, it = r["loglik"].astype(np.float64), r["iterations"].astype(np.int64)
            t, t_warm = float(r["time_s"]), float(r["warmup_s"])
    return dict(
        x=th[:, 0],
        y=th[:, 1],
        photons=th[:, 2],
        bg=th[:, 3],
        sx=th[:, 4],
        sy=th[:, 5],
        crlb_x=cr[:, 0],
        crlb_y=cr[:, 1],
        crlb_photons=cr[:, 2],
        crlb_bg=cr[:, 3],
        iterations=it,
        loglik=ll,
        time_s=t,
        fits_per_s=len(arr) / t if t > 0 else float("inf"),
        warmup_s=t_warm,
    )


if __name__ == "__main__":  # pragma: no cover - tiny smoke test
    print(__doc__)
    print("python:", sys.executable)
