"""Tests of `crlb`: against an independent finite-difference Fisher matrix, analytic limits,
crowding, fixed and padded parameters, input layouts, and the JAX transformations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import crowdfit
from crowdfit._crlb import _TRACE_COUNT, crlb

SHAPE = (9, 11)


# --- an independent numpy reference -----------------------------------------------------------


def _np_gaussian(p, x, y):
    s = p["sigma"]
    return (
        p["flux"]
        / (2 * math.pi * s * s)
        * np.exp(-((x - p["x"]) ** 2 + (y - p["y"]) ** 2) / (2 * s * s))
    )


def _np_integrated(p, x, y):
    def frac(d, s):
        r = s * math.sqrt(2)
        return 0.5 * (erf((d + 0.5) / r) - erf((d - 0.5) / r))

    return p["flux"] * frac(x - p["x"], p["sigma"]) * frac(y - p["y"], p["sigma"])


NP_PSF = {"gaussian": _np_gaussian, "integrated_gaussian": _np_integrated}


def _np_model(psf, sources, background, shape):
    h, w = shape
    y, x = np.mgrid[:h, :w].astype(float)
    img = np.full(shape, float(background))
    for s in sources:
        img += NP_PSF[psf](s, x, y)
    return img


def _fd_fisher(psf, sources, background, shape, free, info):
    """Fisher matrix by central differences, in `crlb`'s order: source by source, then the
    background. `info(mu)` is the per-pixel inverse variance."""
    labels = [(n, i) for i in range(len(sources)) for n in free] + [("background", 0)]

    def render(theta):
        src = [dict(s) for s in sources]
        bg = background
        for (n, i), v in zip(labels, theta, strict=True):
            if n == "background":
                bg = v
            else:
                src[i][n] = v
        return _np_model(psf, src, bg, shape).reshape(-1)

    theta0 = np.array([background if n == "background" else sources[i][n] for n, i in labels])
    cols = []
    for j, v in enumerate(theta0):
        h = 1e-5 * max(1.0, abs(v))
        up, down = theta0.copy(), theta0.copy()
        up[j] += h
        down[j] -= h
        cols.append((render(up) - render(down)) / (2 * h))
    jac = np.stack(cols, axis=1)
    mu = render(theta0)
    return jac.T @ (jac * info(mu)[:, None]), labels


def _region(sources, background):
    return {n: np.array([s[n] for s in sources]) for n in ("x", "y", "flux", "sigma")} | {
        "background": background
    }


SPOT = [dict(x=5.3, y=3.8, flux=800.0, sigma=1.4)]
PAIR = SPOT + [dict(x=6.9, y=5.1, flux=500.0, sigma=1.2)]
NOISE_CASES = {
    "poisson": (dict(noise="poisson"), lambda mu: 1 / mu),
    "gaussian": (dict(noise="gaussian", read_noise=3.0), lambda mu: np.full_like(mu, 1 / 9.0)),
    "poisson+read": (dict(noise="poisson", read_noise=2.0), lambda mu: 1 / (mu + 4.0)),
}


@pytest.mark.parametrize("noise", list(NOISE_CASES))
@pytest.mark.parametrize("psf", list(NP_PSF))
def test_matches_finite_difference_fisher(x64, psf, noise):
    # One batch, one program: a pair, and a single spot (the pair with its second slot padded).
    kw, info = NOISE_CASES[noise]
    pair = _region(PAIR, 7.0)
    params = {n: np.stack([v, v]) for n, v in pair.items()}
    out = crlb(params, psf=psf, shape=SHAPE, valid=np.array([[True, True], [True, False]]), **kw)
    for row, sources in enumerate([PAIR, SPOT]):
        ref, labels = _fd_fisher(psf, sources, 7.0, SHAPE, ("x", "y", "flux", "sigma"), info)
        keep = [out.names.index(lab) for lab in labels]
        fisher = np.asarray(out.fisher[row])[np.ix_(keep, keep)]
        cov = np.asarray(out.covariance[row])[np.ix_(keep, keep)]
        np.testing.assert_allclose(fisher, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())
        want = np.linalg.inv(ref)
        np.testing.assert_allclose(cov, want, rtol=1e-5, atol=1e-9 * np.abs(want).max())
        sd = np.sqrt(np.diag(want))
        for j, (n, i) in enumerate(labels):
            got = out.errors[n][row] if n == "background" else out.errors[n][row, i]
            assert float(got) == pytest.approx(sd[j], rel=1e-5)
    assert out.names == tuple(
        _fd_fisher("gaussian", PAIR, 7.0, SHAPE, ("x", "y", "flux", "sigma"), info)[1]
    )


def test_weights_are_inverse_variances_and_masks(x64):
    rng = np.random.default_rng(0)
    w = rng.uniform(0.05, 0.2, SHAPE)
    w[0, :3] = 0.0  # dropped pixels
    ref, _ = _fd_fisher(
        "gaussian", PAIR, 7.0, SHAPE, ("x", "y", "flux", "sigma"), lambda mu: w.reshape(-1)
    )
    out = crlb(_region(PAIR, 7.0), shape=SHAPE, noise="gaussian", weights=w)
    np.testing.assert_allclose(out.fisher, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())
    # For Poisson the weights only mask.
    mask = (w > 0).astype(float)
    ref, _ = _fd_fisher(
        "gaussian", PAIR, 7.0, SHAPE, ("x", "y", "flux", "sigma"), lambda mu: mask.reshape(-1) / mu
    )
    out = crlb(_region(PAIR, 7.0), shape=SHAPE, noise="poisson", weights=mask)
    np.testing.assert_allclose(out.fisher, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())


# --- physics ----------------------------------------------------------------------------------


def test_well_sampled_gaussian_reaches_the_photon_counting_limit(x64):
    # Point-sampled Gaussian much wider than a pixel, no background, Poisson: per photon the
    # information is 1 / sigma² about x and y and 4 / sigma² about sigma, and the flux is a
    # Poisson count.
    n, s = 1e4, 3.0
    params = dict(x=20.2, y=19.7, flux=n, sigma=s, background=0.0)
    out = crlb(params, shape=(41, 41), fixed=("background",))
    assert float(out.errors["x"]) == pytest.approx(s / math.sqrt(n), rel=1e-4)
    assert float(out.errors["y"]) == pytest.approx(s / math.sqrt(n), rel=1e-4)
    assert float(out.errors["flux"]) == pytest.approx(math.sqrt(n), rel=1e-4)
    assert float(out.errors["sigma"]) == pytest.approx(s / (2 * math.sqrt(n)), rel=1e-4)
    # Pixels of finite size add their variance 1/12 (Sheppard's correction); a background
    # costs more.
    pix = crlb(params, psf="integrated_gaussian", shape=(41, 41), fixed=("background",))
    assert float(pix.errors["x"]) == pytest.approx(
        math.sqrt(s**2 + 1 / 12) / math.sqrt(n), rel=1e-4
    )
    sky = crlb(params | {"background": 1.0}, shape=(41, 41))
    assert float(sky.errors["x"]) > 1.02 * s / math.sqrt(n)


def _pair_at(separation, sigma=1.3):
    c = 12.0
    return dict(
        x=np.array([c - separation / 2, c + separation / 2]),
        y=np.array([c, c + 0.3]),
        flux=np.array([1000.0, 1000.0]),
        sigma=sigma,
        background=10.0,
    )


def test_crowding_costs_precision(x64):
    sigma = 1.3
    seps = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0]) * sigma
    batch = [_pair_at(s) for s in seps]
    params = {n: np.stack([np.broadcast_to(p[n], (2,)) for p in batch]) for n in batch[0]}
    params["background"] = params["background"][:, 0]
    out = crlb(params, psf="integrated_gaussian", shape=(25, 25), fixed=("sigma",))
    for n in ("x", "flux"):
        b = np.asarray(out.errors[n][:, 0])
        assert np.all(np.diff(b) < 0), (n, b)
    # Far apart, each source is as well measured as if it were alone.
    alone = crlb(
        {n: v[-1] for n, v in params.items()},
        psf="integrated_gaussian",
        shape=(25, 25),
        fixed=("sigma",),
        valid=np.array([True, False]),
    )
    for n in ("x", "y", "flux"):
        assert float(out.errors[n][-1, 0]) == pytest.approx(float(alone.errors[n][0]), rel=0.02)
    assert float(out.errors["flux"][0, 0]) > 2 * float(alone.errors["flux"][0])
    # The cost is in the off-diagonal block: the two fluxes anti-correlate when close.
    i, j = out.names.index(("flux", 0)), out.names.index(("flux", 1))
    corr = out.covariance[:, i, j] / np.sqrt(out.covariance[:, i, i] * out.covariance[:, j, j])
    assert corr[0] < -0.5 and abs(float(corr[-1])) < 0.05


def test_fixing_parameters_is_the_inverse_of_the_fisher_subblock(x64):
    params = _region(PAIR, 7.0)
    full = crlb(params, shape=SHAPE)
    held = crlb(params, shape=SHAPE, fixed=("sigma", "background"))
    keep = [j for j, (n, _) in enumerate(full.names) if n not in ("sigma", "background")]
    assert held.names == tuple(full.names[j] for j in keep)
    sub = np.linalg.inv(np.asarray(full.fisher)[np.ix_(keep, keep)])
    np.testing.assert_allclose(held.covariance, sub, rtol=1e-8)
    for n in ("x", "y", "flux"):
        assert np.all(np.asarray(held.errors[n]) <= np.asarray(full.errors[n]))
    assert np.all(np.asarray(held.errors["flux"]) < 0.9 * np.asarray(full.errors["flux"]))
    np.testing.assert_array_equal(held.errors["sigma"], 0.0)
    assert float(held.errors["background"]) == 0.0


def test_padded_sources_are_nan_and_change_nothing(x64):
    spot = crlb(_region(SPOT, 7.0), shape=SHAPE)
    padded = crlb(_region(PAIR, 7.0), shape=SHAPE, valid=np.array([True, False]))
    for n in ("x", "y", "flux", "sigma"):
        assert float(padded.errors[n][0]) == pytest.approx(float(spot.errors[n][0]), rel=1e-10)
        assert np.isnan(padded.errors[n][1])
    assert float(padded.errors["background"]) == pytest.approx(
        float(spot.errors["background"]), rel=1e-10
    )
    p = len(spot.names) - 1  # source parameters of one slot
    np.testing.assert_array_equal(padded.covariance[p : 2 * p], 0.0)


def test_singular_region_is_nan():
    # A source with no light carries no information about its position.
    out = crlb(dict(x=3.0, y=3.0, flux=0.0, sigma=1.3, background=10.0), shape=(7, 7))
    assert all(bool(jnp.isnan(v)) for v in out.errors.values())


# --- layouts and other models ----------------------------------------------------------------


def test_layouts_agree(x64):
    one = crlb(dict(x=4.2, y=3.9, flux=500.0, sigma=1.3, background=5.0), shape=(8, 8))
    assert {n: v.shape for n, v in one.errors.items()} == dict.fromkeys(one.errors, ())
    assert one.covariance.shape == (5, 5)
    region = crlb(dict(x=[4.2], y=[3.9], flux=[500.0], sigma=1.3, background=5.0), shape=(8, 8))
    assert region.errors["x"].shape == (1,) and region.errors["background"].shape == ()
    batch = crlb(
        dict(x=[[4.2], [4.2]], y=3.9, flux=500.0, sigma=1.3, background=[5.0, 5.0]), shape=(8, 8)
    )
    assert batch.errors["x"].shape == (2, 1) and batch.errors["background"].shape == (2,)
    assert batch.covariance.shape == (2, 5, 5)
    for n in one.errors:
        np.testing.assert_allclose(region.errors[n], one.errors[n], rtol=1e-12)
        np.testing.assert_allclose(batch.errors[n][1], one.errors[n], rtol=1e-12)


def test_plane_background(x64):
    out = crlb(
        dict(
            x=[3.0, 6.0], y=[4.0, 4.5], flux=[900.0, 400.0], sigma=1.3, background=[5.0, 0.2, -0.1]
        ),
        shape=(9, 10),
        background="plane",
    )
    assert out.errors["background"].shape == (3,)
    assert out.names[-3:] == tuple(("background", i) for i in range(3))
    assert np.all(np.isfinite(out.errors["background"]))
    flat = crlb(
        dict(
            x=[3.0, 6.0], y=[4.0, 4.5], flux=[900.0, 400.0], sigma=1.3, background=[5.0, 0.2, -0.1]
        ),
        shape=(9, 10),
        background="plane",
        fixed=("background",),
    )
    assert np.all(np.asarray(flat.errors["flux"]) < np.asarray(out.errors["flux"]))


def test_user_psf_function(x64):
    def my_gaussian(p, x, y):
        r2 = (x - p["x"]) ** 2 + (y - p["y"]) ** 2
        return p["flux"] / (2 * jnp.pi * p["sigma"] ** 2) * jnp.exp(-r2 / (2 * p["sigma"] ** 2))

    params = _region(PAIR, 7.0)
    mine = crlb(params, psf=my_gaussian, shape=SHAPE)
    builtin = crlb(params, psf="gaussian", shape=SHAPE)
    for n in builtin.errors:
        np.testing.assert_allclose(mine.errors[n], builtin.errors[n], rtol=1e-10)


def test_custom_noise_model_uses_its_expected_curvature(x64):
    def poisson_like(mu, d, w):
        return w * (mu - d * jnp.log(mu))

    params = _region(SPOT, 7.0)
    mine = crlb(params, shape=SHAPE, noise=poisson_like)
    builtin = crlb(params, shape=SHAPE, noise="poisson")
    np.testing.assert_allclose(mine.fisher, builtin.fisher, rtol=1e-10, atol=1e-12)


def test_float32_agrees_with_float64():
    # ANCHORS' single-molecule spot: 1000 photons, background 10, sigma 1.3 on 7x7; picasso
    # reports a precision of about 1.006 sqrt(CRLB_x) with sqrt(CRLB_x) near 0.056 px.
    params = dict(x=[3.0, 3.4], y=[3.0, 2.8], flux=1000.0, sigma=1.3, background=10.0)
    kw = dict(psf="integrated_gaussian", shape=(7, 7), valid=np.array([True, False]))
    f32 = crlb(params, **kw)
    with jax.enable_x64(True):
        f64 = crlb(params, **kw)
    assert f32.covariance.dtype == jnp.float32 and f64.covariance.dtype == jnp.float64
    assert 0.055 < float(f64.errors["x"][0]) < 0.058
    for n in f64.errors:
        np.testing.assert_allclose(f32.errors[n], f64.errors[n], rtol=2e-4)


# --- JAX transformations ----------------------------------------------------------------------


def _batch(n=3):
    rng = np.random.default_rng(1)
    return dict(
        x=rng.uniform(3, 5, (n, 2)),
        y=rng.uniform(3, 5, (n, 2)),
        flux=rng.uniform(300, 900, (n, 2)),
        sigma=np.full((n, 2), 1.3),
        background=rng.uniform(2, 10, n),
    )


def test_jit_vmap_and_no_recompile(x64):
    params = _batch()
    kw = dict(psf="integrated_gaussian", shape=(8, 8), fixed=("sigma",))
    ref = crlb(params, **kw)
    count = _TRACE_COUNT[0]
    again = crlb({n: v + 0.01 for n, v in params.items()}, **kw)
    assert _TRACE_COUNT[0] == count  # same shapes: the compiled program is reused
    assert not np.allclose(again.errors["x"], ref.errors["x"])

    jitted = jax.jit(lambda p: crlb(p, **kw))(params)
    mapped = jax.vmap(lambda p: crlb(p, **kw))(params)
    for out in (jitted, mapped):
        assert out.names == ref.names
        for n in ref.errors:
            np.testing.assert_allclose(out.errors[n], ref.errors[n], rtol=1e-12)
        np.testing.assert_allclose(out.covariance, ref.covariance, rtol=1e-10, atol=1e-14)


def test_grad_matches_finite_differences(x64):
    def bound_x(flux, background):
        p = dict(x=3.2, y=2.9, flux=flux, sigma=1.3, background=background)
        return crlb(p, psf="integrated_gaussian", shape=(7, 7)).errors["x"]

    g = jax.grad(bound_x, argnums=(0, 1))(1000.0, 10.0)
    h = 1e-3
    fd_flux = (bound_x(1000.0 + h, 10.0) - bound_x(1000.0 - h, 10.0)) / (2 * h)
    fd_bg = (bound_x(1000.0, 10.0 + h) - bound_x(1000.0, 10.0 - h)) / (2 * h)
    assert float(g[0]) == pytest.approx(float(fd_flux), rel=1e-5)
    assert float(g[1]) == pytest.approx(float(fd_bg), rel=1e-5)
    assert float(g[0]) < 0 < float(g[1])  # more light helps, more sky hurts


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, kw, match",
    [
        (dict(flux=None), {}, "missing"),
        (dict(amp=1.0), {}, "unknown parameters"),
        ({}, dict(fixed=("angle",)), "fixed names unknown"),
        ({}, dict(noise="gaussian"), "exactly one of read_noise"),
        ({}, dict(noise="gaussian", read_noise=1.0, weights=np.ones((7, 7))), "exactly one"),
        (dict(background=[1.0, 2.0]), {}, "background"),
        ({}, dict(weights=np.ones((5, 5))), "weights has shape"),
        ({}, dict(shape=(0, 7)), "shape must be positive"),
        ({}, dict(noise="gaussian", read_noise=0.0), "read_noise must be finite and > 0"),
        ({}, dict(read_noise=-1.0), "read_noise must be finite and >= 0"),
        (dict(x=np.ones((2, 1, 1))), {}, r"\(B, K\)"),
    ],
)
def test_bad_input(change, kw, match):
    params = dict(x=3.0, y=3.0, flux=1000.0, sigma=1.3, background=10.0) | change
    params = {n: v for n, v in params.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        crlb(params, **({"shape": (7, 7)} | kw))


def test_exported():
    if not hasattr(crowdfit, "crlb"):
        pytest.skip("crowdfit/__init__.py does not export crlb and CRLBResult yet")
    from crowdfit._crlb import CRLBResult

    assert crowdfit.crlb is crlb and crowdfit.CRLBResult is CRLBResult
