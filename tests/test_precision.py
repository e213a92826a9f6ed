"""Statistical tests of `fit_regions`: its scatter over noise draws reaches the Cramér–Rao bound,
and the errors it reports match that scatter (pulls of unit width)."""

import numpy as np
import pytest

import crowdfit
from crowdfit._crlb import crlb

pytestmark = pytest.mark.slow

SIGMA = 1.3


def _start(windows, sigma=1.5):
    """Starting values a user would have: border median, background-subtracted sum, centroid."""
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


def _ratio(fit, truth, bound):
    """Scatter of the fit over the bound: std(fit - truth) / sqrt(mean(CRLB))."""
    return np.std(fit - truth) / np.sqrt(np.mean(bound**2))


def _pulls(fit, truth, errors):
    return (fit - truth) / errors


def test_isolated_spots_reach_the_bound_with_calibrated_errors():
    # picasso's benchmark spot (ANCHORS): 7x7, 1000 photons, background 10, sigma 1.3, Poisson;
    # x, y, flux, sigma and background all free, started from a centroid.
    n, n_clean = 10_000, 64
    windows, truth = crowdfit.simulate_spots(n, seed=11)
    clean, clean_truth = crowdfit.simulate_spots(n_clean, noise="none", seed=12)
    images = np.concatenate([windows, clean])
    truth = {k: np.concatenate([truth[k], clean_truth[k]]) for k in truth}

    fit = crowdfit.fit_regions(images, _start(images), psf="integrated_gaussian", noise="poisson")
    ok = np.asarray(fit.converged)
    assert ok.mean() > 0.995

    params = {k: truth[k][:, None] for k in ("x", "y", "flux", "sigma")}
    params["background"] = truth["background"]
    bound = crlb(params, psf="integrated_gaussian", shape=(7, 7))

    # On noise-free data the fit sits on the truth, where its errors are the bound itself.
    for k in ("x", "y", "flux", "sigma", "background"):
        got = np.asarray(fit.errors[k][n:]).reshape(n_clean)
        want = np.asarray(bound.errors[k][n:]).reshape(n_clean)
        np.testing.assert_allclose(got, want, rtol=2e-3, err_msg=k)

    noisy = ok[:n]
    for k in ("x", "y", "flux", "sigma", "background"):
        est = np.asarray(fit.params[k][:n]).reshape(n)[noisy]
        err = np.asarray(fit.errors[k][:n]).reshape(n)[noisy]
        b = np.asarray(bound.errors[k][:n]).reshape(n)[noisy]
        t = truth[k][:n][noisy]
        ratio = _ratio(est, t, b)
        assert 0.95 < ratio < 1.05, (k, ratio)
        pulls = _pulls(est, t, err)
        assert 0.9 < np.std(pulls) < 1.1, (k, np.std(pulls))
        assert abs(np.mean(pulls)) < 0.1, (k, np.mean(pulls))


def test_gaussian_noise_of_unknown_level_errors_scaled_by_chi2():
    # Least squares on constant-variance noise: the Fisher matrix of unit weights is off by the
    # unknown variance, which the reduced chi² restores.
    n, read_noise = 4000, 4.0
    windows, truth = crowdfit.simulate_spots(n, noise="gaussian", read_noise=read_noise, seed=5)
    fit = crowdfit.fit_regions(
        windows, _start(windows), psf="integrated_gaussian", noise="gaussian"
    )
    ok = np.asarray(fit.converged)
    assert ok.mean() > 0.995
    assert np.median(fit.chi2_reduced) == pytest.approx(read_noise**2, rel=0.05)
    params = {k: truth[k][:, None] for k in ("x", "y", "flux", "sigma")}
    params["background"] = truth["background"]
    bound = crlb(
        params, psf="integrated_gaussian", shape=(7, 7), noise="gaussian", read_noise=read_noise
    )
    for k in ("x", "y", "flux"):
        est = np.asarray(fit.params[k]).reshape(n)[ok]
        err = np.asarray(fit.errors[k]).reshape(n)[ok]
        b = np.asarray(bound.errors[k]).reshape(n)[ok]
        ratio = _ratio(est, truth[k][ok], b)
        assert 0.93 < ratio < 1.07, (k, ratio)
        assert 0.9 < np.std(_pulls(est, truth[k][ok], err)) < 1.1, k


def _match_pairs(fit_x, fit_y, x, y):
    """Order each fitted pair like the truth (the two slots may swap)."""
    keep = (
        (fit_x[:, 0] - x[:, 0]) ** 2
        + (fit_y[:, 0] - y[:, 0]) ** 2
        + (fit_x[:, 1] - x[:, 1]) ** 2
        + (fit_y[:, 1] - y[:, 1]) ** 2
    )
    swap = (
        (fit_x[:, 1] - x[:, 0]) ** 2
        + (fit_y[:, 1] - y[:, 0]) ** 2
        + (fit_x[:, 0] - x[:, 1]) ** 2
        + (fit_y[:, 0] - y[:, 1]) ** 2
    )
    return swap < keep


def test_pairs_reach_the_joint_bound():
    # Two sources of 1000 photons at 1-3 sigma on a background of 10, sigma known; started a
    # fraction of a pixel off, at 80 % of their flux, from the border median background.
    seps = np.array([1.0, 1.5, 2.0, 3.0]) * SIGMA
    per = 750
    separation = np.repeat(seps, per)
    n = separation.size
    windows, truth = crowdfit.simulate_pairs(n, separation, jitter=0.5, seed=3)
    rng = np.random.default_rng(4)
    init = _start(windows)
    init.update(
        x=truth["x"] + rng.uniform(-0.3, 0.3, (n, 2)),
        y=truth["y"] + rng.uniform(-0.3, 0.3, (n, 2)),
        flux=0.8 * truth["flux"],
        sigma=np.full((n, 2), SIGMA),
    )
    fit = crowdfit.fit_regions(
        windows, init, psf="integrated_gaussian", noise="poisson", fixed=("sigma",)
    )
    ok = np.asarray(fit.converged)
    assert ok.mean() > 0.99

    params = {k: truth[k] for k in ("x", "y", "flux", "sigma")}
    params["background"] = truth["background"][:, 0]
    bound = crlb(params, psf="integrated_gaussian", shape=windows.shape[1:], fixed=("sigma",))

    est = {k: np.asarray(fit.params[k]) for k in ("x", "y", "flux")}
    err = {k: np.asarray(fit.errors[k]) for k in ("x", "y", "flux")}
    swap = _match_pairs(est["x"], est["y"], truth["x"], truth["y"])
    for d in (est, err):
        for k in d:
            d[k] = np.where(swap[:, None], d[k][:, ::-1], d[k])
    assert swap.mean() < 0.02

    for s in seps:
        sel = (separation == s) & ok
        for k in ("x", "y", "flux"):
            b = np.asarray(bound.errors[k])[sel].reshape(-1)
            ratio = _ratio(est[k][sel].reshape(-1), truth[k][sel].reshape(-1), b)
            pulls = np.std(_pulls(est[k][sel], truth[k][sel], err[k][sel]))
            # At 1 sigma (below the FWHM) about 1 % of draws put one source on both and the
            # other on a noise bump, and that is the likelihood's own optimum, not a solver
            # failure: the flux scatter stays within the bound but positions scatter ~1.3x
            # and the errors at such fits are too small. From 2 sigma on, the fit is efficient
            # and its errors are calibrated.
            if k == "flux" or s >= 1.5 * SIGMA:
                assert ratio < 1.2, (s, k, ratio)
            if s >= 2 * SIGMA:
                assert 0.9 < pulls < 1.1, (s, k, pulls)
                assert 0.93 < ratio < 1.07, (s, k, ratio)
    # Crowding costs precision, and the bound says how much: at 1 sigma the flux scatter is
    # several times that of sources 3 sigma apart.
    near = np.asarray(bound.errors["flux"])[separation == seps[0]].mean()
    far = np.asarray(bound.errors["flux"])[separation == seps[-1]].mean()
    assert near > 2 * far
