"""fit_regions: joint recovery of overlapping sources, calibrated errors, transforms, bad input."""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import render, tree_allclose

import crowdfit
from crowdfit import _fit

SHAPE = (16, 16)
SIGMA = 2.0


def _group(n_regions, n_sources, sep, rng, shape=SHAPE, sigma=SIGMA, flux=3000.0):
    """Sources on a ring of diameter `sep` about the window centre, random orientation."""
    h, w = shape
    angle = rng.uniform(0, 2 * np.pi, (n_regions, 1)) + 2 * np.pi * np.arange(n_sources) / max(
        n_sources, 1
    )
    r = sep / (2 * np.sin(np.pi / n_sources)) if n_sources > 1 else 0.0
    cx = (w - 1) / 2 + rng.uniform(-0.5, 0.5, (n_regions, 1))
    cy = (h - 1) / 2 + rng.uniform(-0.5, 0.5, (n_regions, 1))
    return {
        "x": cx + r * np.cos(angle),
        "y": cy + r * np.sin(angle),
        "flux": flux * rng.uniform(0.7, 1.3, (n_regions, n_sources)),
        "sigma": np.full((n_regions, n_sources), sigma),
    }


def _start(truth, rng, bg=0.0):
    n = truth["x"].shape[0]
    init = {k: v.copy() for k, v in truth.items()}
    init["x"] = truth["x"] + rng.normal(0, 0.3, truth["x"].shape)
    init["y"] = truth["y"] + rng.normal(0, 0.3, truth["y"].shape)
    init["flux"] = truth["flux"] * 0.8
    init["background"] = np.full(n, bg)
    return init


def _shape_params(psf, truth):
    """Adapt circular truth to the parameters of `psf`."""
    t = dict(truth)
    names = crowdfit.get_psf(psf).params
    if "sigma_x" in names:
        s = t.pop("sigma")
        t["sigma_x"], t["sigma_y"] = s * 1.1, s * 0.9
    if "angle" in names:
        t["angle"] = np.full_like(t["x"], 0.4)
    return t


def _pulls(res, truth, names, ok):
    return {
        n: ((np.asarray(res.params[n]) - truth[n]) / np.asarray(res.errors[n]))[ok] for n in names
    }


PSFS = list(crowdfit.PSF_NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("noise", ["gaussian", "poisson"])
@pytest.mark.parametrize("psf", PSFS)
def test_pairs_recovered_within_errors(psf, noise):
    # A stable seed: Python's str hash changes from one process to the next.
    rng = np.random.default_rng(zlib.crc32(f"{psf}-{noise}".encode()))
    n = 512
    truth = _shape_params(psf, _group(n, 2, 1.5 * SIGMA, rng))
    bg = 10.0
    mu = render(psf, {**truth, "background": np.full(n, bg)}, SHAPE)
    if noise == "poisson":
        img = rng.poisson(mu).astype(np.float32)
    else:
        img = (mu + rng.normal(0, 5.0, mu.shape)).astype(np.float32)
    shape_names = [k for k in truth if k.startswith("sigma") or k == "angle"]
    res = crowdfit.fit_regions(
        img, _start(truth, rng, bg=5.0), psf=psf, noise=noise, fixed=shape_names
    )
    ok = np.asarray(res.status) == 0
    assert ok.mean() > 0.97
    for name, pull in _pulls(res, truth, ["x", "y", "flux"], ok).items():
        # The two pulls of a pair are correlated, so the median of ~1000 pulls scatters by
        # about 0.05 from seed to seed (measured: up to 0.12 over 6 seeds); 0.2 is ~4 of those.
        assert abs(np.median(pull)) < 0.2, name
        assert 0.85 < np.std(pull) < 1.15, (name, np.std(pull))
    bg_err = np.asarray(res.errors["background"])[ok]
    bg_pull = (np.asarray(res.params["background"]) - bg)[ok] / bg_err
    assert 0.85 < np.std(bg_pull) < 1.15


@pytest.mark.slow
@pytest.mark.parametrize("noise", ["gaussian", "poisson"])
def test_triples_recovered_within_errors(noise):
    rng = np.random.default_rng(3)
    n = 512
    truth = _group(n, 3, 1.5 * SIGMA, rng)
    mu = render("gaussian", {**truth, "background": np.full(n, 10.0)}, SHAPE)
    img = rng.poisson(mu) if noise == "poisson" else mu + rng.normal(0, 5.0, mu.shape)
    res = crowdfit.fit_regions(
        img.astype(np.float32), _start(truth, rng, 5.0), noise=noise, fixed=("sigma",)
    )
    ok = np.asarray(res.status) == 0
    assert ok.mean() > 0.95
    for name, pull in _pulls(res, truth, ["x", "y", "flux"], ok).items():
        assert 0.85 < np.std(pull) < 1.15, (name, np.std(pull))


def test_free_sigma_single_source():
    rng = np.random.default_rng(4)
    n = 256
    truth = _group(n, 1, 0.0, rng)
    mu = render("gaussian", {**truth, "background": np.full(n, 10.0)}, SHAPE)
    img = (mu + rng.normal(0, 5.0, mu.shape)).astype(np.float32)
    init = _start(truth, rng, 5.0)
    init["sigma"] = np.full_like(init["sigma"], 1.5)
    res = crowdfit.fit_regions(img, init)
    ok = np.asarray(res.status) == 0
    assert ok.all()
    for name, pull in _pulls(res, truth, ["x", "y", "flux", "sigma"], ok).items():
        assert 0.85 < np.std(pull) < 1.15, (name, np.std(pull))
    # chi2_reduced estimates the noise variance for Gaussian noise of unknown level.
    assert np.median(res.chi2_reduced) == pytest.approx(25.0, rel=0.05)


def test_model_conventions():
    # x is the column, y the row, pixel centres at integers; flux is the total count.
    p = {"x": np.array([[5.0]]), "y": np.array([[3.0]]), "flux": np.array([[1000.0]])}
    for psf in PSFS:
        q = _shape_params(psf, {**p, "sigma": np.array([[1.2]])})
        img = render(psf, {**q, "background": np.zeros(1)}, (12, 14))[0]
        assert np.unravel_index(np.argmax(img), img.shape) == (3, 5), psf
        assert img.sum() == pytest.approx(1000.0, rel=2e-3), psf
    amp = crowdfit.amplitude({"flux": 2 * math.pi * 4.0 * 100, "sigma": 2.0})
    assert float(amp) == pytest.approx(100.0)


def test_rotated_gaussian_is_the_seed_model():
    # The seed's formula, written out independently, with amplitude = flux / (2 pi sx sy).
    sx, sy, t, amp, x0, y0 = 3.0, 1.5, 0.7, 50.0, 6.2, 5.1
    y, x = np.mgrid[:12, :13].astype(float)
    a = np.cos(t) ** 2 / (2 * sx**2) + np.sin(t) ** 2 / (2 * sy**2)
    b = -np.sin(2 * t) / (4 * sx**2) + np.sin(2 * t) / (4 * sy**2)
    c = np.sin(t) ** 2 / (2 * sx**2) + np.cos(t) ** 2 / (2 * sy**2)
    seed = amp * np.exp(-(a * (x - x0) ** 2 + 2 * b * (x - x0) * (y - y0) + c * (y - y0) ** 2))
    p = {
        "x": x0,
        "y": y0,
        "flux": amp * 2 * np.pi * sx * sy,
        "sigma_x": sx,
        "sigma_y": sy,
        "angle": t,
    }
    ours = crowdfit.get_psf("rotated_gaussian")(p, x[:1], y[:, :1])
    np.testing.assert_allclose(ours, seed, rtol=1e-5, atol=1e-6)


def test_rotated_gaussian_matches_curve_fit(x64):
    scipy_opt = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(5)
    n, shape = 200, (15, 15)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)

    def seed_model(xy, amp, x0, y0, sx, sy, t, off):
        x, y = xy
        a = np.cos(t) ** 2 / (2 * sx**2) + np.sin(t) ** 2 / (2 * sy**2)
        b = -np.sin(2 * t) / (4 * sx**2) + np.sin(2 * t) / (4 * sy**2)
        c = np.sin(t) ** 2 / (2 * sx**2) + np.cos(t) ** 2 / (2 * sy**2)
        g = amp * np.exp(-(a * (x - x0) ** 2 + 2 * b * (x - x0) * (y - y0) + c * (y - y0) ** 2))
        return (g + off).ravel()

    truth = np.column_stack(
        [
            rng.uniform(80, 120, n),
            7 + rng.uniform(-1, 1, n),
            7 + rng.uniform(-1, 1, n),
            rng.uniform(2.4, 2.8, n),
            rng.uniform(1.4, 1.7, n),
            rng.uniform(0.2, 0.6, n),
            np.full(n, 5.0),
        ]
    )
    imgs = np.stack([seed_model((xx, yy), *p).reshape(shape) for p in truth])
    imgs = imgs + rng.normal(0, 5.0, imgs.shape)
    start = truth * np.array([0.9, 1, 1, 0.9, 1.1, 1, 0.5]) + np.array([0, 0.3, -0.3, 0, 0, 0.1, 0])

    ref = np.array(
        [
            scipy_opt.curve_fit(
                seed_model,
                (xx, yy),
                im.ravel(),
                p0=p0,
                method="lm",
                xtol=1e-14,
                ftol=1e-14,
                maxfev=20000,
            )[0]
            for im, p0 in zip(imgs, start, strict=True)
        ]
    )
    init = {
        "x": start[:, 1:2],
        "y": start[:, 2:3],
        "sigma_x": start[:, 3:4],
        "sigma_y": start[:, 4:5],
        "angle": start[:, 5:6],
        "flux": start[:, 0:1] * 2 * np.pi * start[:, 3:4] * start[:, 4:5],
        "background": start[:, 6],
    }
    res = crowdfit.fit_regions(imgs, init, psf="rotated_gaussian", tol=1e-14, max_iter=200)
    assert res.params["x"].dtype == jnp.float64
    assert np.all(np.asarray(res.status) == 0)
    p = res.params
    ours = np.column_stack(
        [
            np.asarray(
                crowdfit.amplitude(
                    {k: v[:, 0] for k, v in p.items() if k != "background"}, "rotated_gaussian"
                )
            ),
            p["x"][:, 0],
            p["y"][:, 0],
            p["sigma_x"][:, 0],
            p["sigma_y"][:, 0],
            p["angle"][:, 0],
            p["background"],
        ]
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)


def _small_problem(rng, n=8, k=2):
    truth = _group(n, k, 2.0 * SIGMA, rng)
    mu = render("gaussian", {**truth, "background": np.full(n, 10.0)}, SHAPE)
    img = (mu + rng.normal(0, 3.0, mu.shape)).astype(np.float32)
    return img, _start(truth, rng, 8.0), truth


def test_padded_source_changes_nothing():
    rng = np.random.default_rng(6)
    img, init, _ = _small_problem(rng)
    base = crowdfit.fit_regions(img, init, fixed=("sigma",))
    padded_init = {
        k: (np.concatenate([v, np.full((v.shape[0], 1), 7.0)], axis=1) if v.ndim == 2 else v)
        for k, v in init.items()
    }
    valid = np.ones((img.shape[0], 3), bool)
    valid[:, 2] = False
    res = crowdfit.fit_regions(img, padded_init, valid=valid, fixed=("sigma",))
    # float32: the two batches' sums run in different orders, so the fits stop at points that
    # differ by ~1e-5 (1e-3 of an error bar); a padded source of flux 7 that leaked into the
    # model would move the fluxes by ~2e-3.
    for n in ("x", "y", "flux"):
        np.testing.assert_allclose(res.params[n][:, :2], base.params[n], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(res.errors[n][:, :2], base.errors[n], rtol=1e-4)
        assert np.all(np.asarray(res.errors[n][:, 2]) == 0)
    np.testing.assert_allclose(res.params["background"], base.params["background"], rtol=1e-5)
    np.testing.assert_array_equal(res.status, base.status)


def test_masked_pixel_changes_nothing():
    rng = np.random.default_rng(7)
    img, init, _ = _small_problem(rng)
    mask = np.ones(img.shape, bool)
    mask[:, 0, :3] = False
    base = crowdfit.fit_regions(img, init, mask=mask, fixed=("sigma",))
    spoiled = img.copy()
    spoiled[:, 0, :3] = np.nan  # a masked pixel may hold anything
    res = crowdfit.fit_regions(spoiled, init, mask=mask, fixed=("sigma",))
    assert tree_allclose(res.params, base.params, rtol=1e-6)
    spoiled[:, 0, :3] = 1e6
    res = crowdfit.fit_regions(spoiled, init, mask=mask, fixed=("sigma",))
    assert tree_allclose(res.params, base.params, rtol=1e-6)


def test_failed_region_does_not_spoil_batch():
    rng = np.random.default_rng(8)
    img, init, _ = _small_problem(rng)
    init = {k: v.copy() for k, v in init.items()}
    init["flux"][0] = np.inf  # region 0 cannot even start
    with pytest.warns(UserWarning, match="1 region"):
        res = crowdfit.fit_regions(img, init, fixed=("sigma",))
    status = np.asarray(res.status)
    assert status[0] == crowdfit.Status.NOT_FINITE
    assert np.all(status[1:] == crowdfit.Status.CONVERGED)
    assert np.all(np.isfinite(np.asarray(res.params["x"][1:])))


def test_jit_vmap_grad_and_no_recompile():
    rng = np.random.default_rng(9)
    img, init, _ = _small_problem(rng)
    kw = dict(fixed=("sigma",))
    eager = crowdfit.fit_regions(img, init, **kw)

    jitted = jax.jit(lambda im: crowdfit.fit_regions(im, init, **kw).params)(img)
    assert tree_allclose(jitted, eager.params, rtol=1e-4, atol=1e-3)

    # vmap over a leading axis of two batches.
    stacked = jnp.stack([img, img[::-1]])
    init2 = {k: jnp.stack([v, v[::-1]]) for k, v in init.items()}
    vm = jax.vmap(lambda im, i: crowdfit.fit_regions(im, i, **kw).params["flux"])(stacked, init2)
    np.testing.assert_allclose(vm[0], eager.params["flux"], rtol=1e-4)
    np.testing.assert_allclose(vm[1], eager.params["flux"][::-1], rtol=1e-4)

    # A finite gradient of a fitted value with respect to the image.
    g = jax.grad(lambda im: crowdfit.fit_regions(im, init, **kw).params["flux"][0, 0])(img)
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0
    assert np.all(np.asarray(g[1:]) == 0)  # other regions do not affect region 0

    before = _fit._TRACE_COUNT[0]
    crowdfit.fit_regions(img + 1.0, init, **kw)
    crowdfit.fit_regions(img[:5], {k: v[:5] for k, v in init.items()}, **kw)  # same bucket
    assert _fit._TRACE_COUNT[0] == before


def _dot_precisions(jaxpr):
    """The `precision` of every dot_general in `jaxpr` and the jaxprs nested in it."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn.params["precision"])
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out.extend(_dot_precisions(inner))
    return out


@pytest.mark.parametrize("noise", ["gaussian", "poisson"])
def test_matrix_products_at_full_precision(noise):
    # On GPUs XLA's default float32 product is TF32, too coarse for the normal equations.
    rng = np.random.default_rng(9)
    img, init, _ = _small_problem(rng)
    img = jnp.asarray(np.maximum(img, 1.0))

    def flux(im):
        return crowdfit.fit_regions(im, init, fixed=("sigma",), noise=noise).params["flux"][0, 0]

    for fn in (flux, jax.grad(flux)):
        precisions = _dot_precisions(jax.make_jaxpr(fn)(img).jaxpr)
        assert len(precisions) > 3
        highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
        assert all(p == highest for p in precisions), set(precisions)


def test_float64(x64):
    rng = np.random.default_rng(10)
    img, init, truth = _small_problem(rng)
    res = crowdfit.fit_regions(img.astype(np.float64), init, fixed=("sigma",), tol=1e-12)
    assert res.params["flux"].dtype == jnp.float64
    assert res.covariance.dtype == jnp.float64
    assert np.all(np.asarray(res.status) == 0)


@pytest.mark.parametrize("noise", ["gaussian", "poisson"])
def test_concrete_fit_statistics_match_differentiable_program(x64, noise):
    # A concrete fit runs a lean program (the solver's last normal equations, one inversion);
    # a traced one evaluates them again at the optimum, gradient-safe. Same numbers, padded
    # slots (NaN-free zeros) and an unscaled noise model (Poisson: χ²-scaled covariance) too.
    rng = np.random.default_rng(11)
    img, init, _ = _small_problem(rng, n=6)
    img = np.maximum(img, 1.0).astype(np.float64)
    init = {k: (np.concatenate([v, np.full((v.shape[0], 1), 7.0)], axis=1) if v.ndim == 2 else v)
            for k, v in init.items()}  # fmt: skip
    valid = np.ones((6, 3), bool)
    valid[:, 2] = False
    kw = dict(fixed=("sigma",), noise=noise, valid=valid, tol=1e-12)
    lean = crowdfit.fit_regions(img, init, **kw)
    full = jax.jit(lambda im: crowdfit.fit_regions(im, init, **kw))(img)
    assert np.all(np.asarray(lean.status) == 0)
    np.testing.assert_array_equal(lean.status, full.status)
    for a, b in ((lean.covariance, full.covariance), (lean.loss, full.loss),
                 (lean.chi2_reduced, full.chi2_reduced)):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
    for name in ("x", "y", "flux", "background"):
        np.testing.assert_allclose(lean.errors[name], full.errors[name], rtol=1e-6, atol=1e-12)
    assert np.all(np.asarray(lean.errors["flux"])[:, 2] == 0.0)


def test_chunks_on_several_threads_keep_float64(x64):
    # On CPU the chunks run on worker threads; `jax.enable_x64` as a context manager holds for
    # its own thread only, so without carrying it over they would fit in float32.
    rng = np.random.default_rng(10)
    img, init, _ = _small_problem(rng)
    one = crowdfit.fit_regions(img.astype(np.float64), init, fixed=("sigma",), tol=1e-12)
    res = crowdfit.fit_regions(
        img.astype(np.float64), init, fixed=("sigma",), tol=1e-12, chunk_size=2
    )
    assert res.params["flux"].dtype == jnp.float64
    # (chunks of another size round differently, 1e-9 apart; float32 fits are 3e-5 apart)
    np.testing.assert_allclose(res.params["flux"], one.params["flux"], rtol=1e-7)


def test_cpu_threads_setting(monkeypatch):
    from crowdfit._threads import _workers

    monkeypatch.setenv("CROWDFIT_CPU_THREADS", "3")
    assert _workers() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv("CROWDFIT_CPU_THREADS", bad)
        with pytest.raises(ValueError, match="CROWDFIT_CPU_THREADS"):
            _workers()
    monkeypatch.delenv("CROWDFIT_CPU_THREADS")
    assert _workers() >= 1


def test_plane_background_and_custom_psf():
    rng = np.random.default_rng(11)
    n = 8
    truth = _group(n, 1, 0.0, rng)
    y, x = np.mgrid[:16, :16]
    plane = 10.0 + 0.5 * x - 0.3 * y
    img = render("gaussian", {**truth, "background": np.zeros(n)}, SHAPE) + plane
    img = img + rng.normal(0, 1.0, img.shape)

    def my_psf(p, x, y):  # a user's own model: a circular Gaussian written from scratch
        r2 = (x - p["x"]) ** 2 + (y - p["y"]) ** 2
        return p["flux"] / (2 * jnp.pi * p["width"] ** 2) * jnp.exp(-r2 / (2 * p["width"] ** 2))

    init = _start(truth, rng)
    init["width"] = init.pop("sigma")
    init["background"] = np.zeros((n, 3))
    res = crowdfit.fit_regions(img, init, psf=my_psf, background="plane", fixed=("width",))
    assert np.all(np.asarray(res.status) == 0)
    np.testing.assert_allclose(res.params["background"].mean(0), [10.0, 0.5, -0.3], atol=0.05)
    np.testing.assert_allclose(res.params["x"], truth["x"], atol=0.1)


@pytest.mark.parametrize(
    "solver, atol, rtol", [(optax.lbfgs(), 0.005, 1e-3), (optax.adam(0.2), 0.05, 0.03)]
)
def test_optax_solvers_agree_with_lm(solver, atol, rtol):
    rng = np.random.default_rng(12)
    img, init, _ = _small_problem(rng)
    lm = crowdfit.fit_regions(img, init, fixed=("sigma",))
    res = crowdfit.fit_regions(img, init, fixed=("sigma",), solver=solver, max_iter=2000, tol=1e-9)
    np.testing.assert_allclose(res.params["x"], lm.params["x"], atol=atol)
    np.testing.assert_allclose(res.params["flux"], lm.params["flux"], rtol=rtol)
    # The errors come from the Fisher information at the optimum, whatever the solver.
    np.testing.assert_allclose(res.errors["x"], lm.errors["x"], rtol=0.1)


def test_bad_input_errors():
    rng = np.random.default_rng(13)
    img, init, _ = _small_problem(rng)
    bad = img.copy()
    bad[0, 0, 0] = np.nan
    bad[1, 2, 2] = np.inf
    with pytest.raises(ValueError, match="2 non-finite"):
        crowdfit.fit_regions(bad, init)
    with pytest.raises(ValueError, match=r"shape \(B, H, W\)"):
        crowdfit.fit_regions(img[0], init)
    with pytest.raises(ValueError, match="missing.*flux"):
        crowdfit.fit_regions(img, {k: v for k, v in init.items() if k != "flux"})
    with pytest.raises(ValueError, match="unknown parameters"):
        crowdfit.fit_regions(img, {**init, "sigmaa": init["sigma"]})
    with pytest.raises(ValueError, match="does not broadcast"):
        crowdfit.fit_regions(img, {**init, "x": init["x"][:3]})
    with pytest.raises(ValueError, match="mask must have"):
        crowdfit.fit_regions(img, init, mask=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="valid must have"):
        crowdfit.fit_regions(img, init, valid=np.ones((8, 5), bool))
    with pytest.raises(ValueError, match="unknown psf"):
        crowdfit.fit_regions(img, init, psf="moffat")
    with pytest.raises(ValueError, match="unknown background"):
        crowdfit.fit_regions(img, init, background="quadratic")
    with pytest.raises(ValueError, match="fixed names unknown"):
        crowdfit.fit_regions(img, init, fixed=("sgima",))
    with pytest.raises(ValueError, match="needs \\(B, 3\\)"):
        crowdfit.fit_regions(img, init, background="plane")
    with pytest.raises(ValueError, match="nothing to fit"):
        crowdfit.fit_regions(img, init, fixed=("x", "y", "flux", "sigma", "background"))
    nan_x = init["x"].copy()
    nan_x[0, 0] = np.nan
    valid = np.ones(nan_x.shape, bool)
    valid[0, 0] = False  # (a padding slot may hold anything: no warning, which would fail here)
    crowdfit.fit_regions(img, {**init, "x": nan_x}, valid=valid, max_iter=1)
    with pytest.raises(ValueError, match=r"init\['sigma'\] must be > 0"):
        crowdfit.fit_regions(img, {**init, "sigma": -init["sigma"]})
    with pytest.raises(ValueError, match="tol must be"):
        crowdfit.fit_regions(img, init, tol=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be"):
        crowdfit.fit_regions(img, init, chunk_size=0)
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        crowdfit.fit_regions(img, init, weights=-np.ones(img.shape))


def test_only_the_background_free():
    # Every source parameter held (forced photometry of the sky): the fit is linear in the
    # background, whose optimum is the mean of the data minus the sources' light.
    rng = np.random.default_rng(14)
    img, init, truth = _small_problem(rng)
    res = crowdfit.fit_regions(img, truth | {"background": init["background"]},
                               fixed=("x", "y", "flux", "sigma"))  # fmt: skip
    sources = render("gaussian", {**truth, "background": np.zeros(img.shape[0])}, SHAPE)
    want = (img - sources).mean(axis=(1, 2))
    np.testing.assert_allclose(res.params["background"], want, rtol=1e-4)
    assert np.all(np.asarray(res.status) == 0)


def test_collapsed_source_does_not_make_the_region_singular():
    # A slot with no light under it collapses to zero flux: it carries no information on any
    # of its parameters. Its errors are NaN; the real source keeps its Fisher errors.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    g = np.exp(-((xx - 8.2) ** 2 + (yy - 7.6) ** 2) / 8.0) / (8.0 * np.pi)
    img = 5.0 + 2000.0 * g + rng.normal(0.0, 1.0, (16, 16))
    init = {
        "x": np.array([[8.0, 3.0]]),
        "y": np.array([[8.0, 3.0]]),
        "flux": np.array([[1500.0, 1e-3]]),
        "sigma": np.full((1, 2), 2.0),
        "background": np.array([5.0]),
    }
    res = crowdfit.fit_regions(img[None], init, fixed=("sigma",))
    assert int(res.status[0]) == crowdfit.Status.CONVERGED
    assert float(res.params["flux"][0, 1]) < 0.01
    for name in ("x", "y", "flux"):
        assert np.isnan(res.errors[name][0, 1])
        assert np.isfinite(res.errors[name][0, 0])
    # The real source's flux error: about the isolated-source bound, noise * sqrt(4 pi sigma^2).
    assert float(res.errors["flux"][0, 0]) == pytest.approx(np.sqrt(16 * np.pi), rel=0.2)


@pytest.mark.parametrize("flux", [2e3, 2e6, 2e8])
def test_bright_source_keeps_its_errors_in_float32(flux):
    # A bright source's position information exceeds its flux information by up to 10^19
    # here: compared across parameters, the flux looked collapsed and its error came out NaN.
    yy, xx = np.mgrid[:16, :16]
    g = np.exp(-((xx - 8.2) ** 2 + (yy - 7.6) ** 2) / 8.0) / (8.0 * np.pi)
    img = (5.0 + flux * g)[None]
    init = {"x": np.array([[8.0]]), "y": np.array([[8.0]]), "flux": np.array([[flux]]),
            "sigma": np.array([[2.0]]), "background": np.array([5.0])}  # fmt: skip
    res = crowdfit.fit_regions(img.astype(np.float32), init, fixed=("sigma",), weights=1 / 25)
    assert int(res.status[0]) == crowdfit.Status.CONVERGED
    # Known weights: the flux error is about the isolated-source bound, 5 * sqrt(4 pi sigma^2).
    for name in ("x", "y", "flux"):
        assert np.isfinite(res.errors[name][0, 0]), name
    assert float(res.errors["flux"][0, 0]) == pytest.approx(5 * np.sqrt(16 * np.pi), rel=0.2)
    assert float(res.errors["x"][0, 0]) < 1.0


def test_staged_fit_matches_one_stage():
    # Concrete inputs run in stages (8, 20, max_iter iterations; see `_fit._staged`) and
    # continue the regions still running; under jit the whole batch runs in one go. Both must
    # reach the same optima, well within the statistical errors.
    rng = np.random.default_rng(12)
    n = 96
    truth = _group(n, 2, 1.0 * SIGMA, rng)
    mu = render("gaussian", {**truth, "background": np.full(n, 10.0)}, SHAPE)
    img = (mu + rng.normal(0, 5.0, mu.shape)).astype(np.float32)
    init = _start(truth, rng, bg=5.0)
    init["x"] = truth["x"] + rng.normal(0, 1.5, truth["x"].shape)
    init["flux"] = truth["flux"] * 0.3
    staged = crowdfit.fit_regions(img, init, fixed=("sigma",))
    whole = jax.jit(lambda im: crowdfit.fit_regions(im, init, fixed=("sigma",)))(img)
    it = np.asarray(staged.iterations)
    assert (it > _fit._STAGES[0]).sum() >= 5, "no region reached a second stage"
    ok = np.asarray(staged.converged) & np.asarray(whole.converged)
    assert ok.mean() > 0.9
    # A continued region goes on from where it stopped (only its damping restarts).
    late = ok & (it > _fit._STAGES[0])
    extra = it[late] - np.asarray(whole.iterations)[late]
    assert np.median(extra) <= 2, np.sort(extra)
    for name in ("x", "y", "flux"):
        a, b = np.asarray(staged.params[name])[ok], np.asarray(whole.params[name])[ok]
        err = np.asarray(staged.errors[name])[ok]
        fin = np.isfinite(err)  # not a source whose flux collapsed (NaN errors)
        assert fin.mean() > 0.8
        assert np.quantile(np.abs(a - b)[fin] / err[fin], 0.95) < 0.05, name


@pytest.mark.parametrize(
    "noise,widths", [("gaussian", "fixed"), ("gaussian", "free"), ("poisson", "fixed")]
)
@pytest.mark.parametrize("background", ["constant", "plane"])
@pytest.mark.parametrize("psf", ["gaussian", "integrated_elliptical_gaussian"])
def test_profile_normal_equations_match_autodiff(x64, psf, background, widths, noise):
    # A PSF with a 1-D `profile` has Jacobian columns that are outer products (two for a free
    # shared width), spelled out without automatic differentiation; with Gaussian noise and a
    # rectangular mask the Gauss–Newton matrix is a product of two small Gram matrices
    # (`RegionProblem._profile_equations`). Both must equal the autodiff assembly.
    import dataclasses

    from crowdfit._problem import RegionProblem

    p_ = crowdfit.get_psf(psf)
    k, shape = 3, (12, 10)
    rng = np.random.default_rng(3)
    shapes = [n for n in p_.params if n.startswith("sigma")]
    fixed = frozenset(shapes if widths == "fixed" else ())
    nm = crowdfit.get_noise(noise)
    reference = RegionProblem(
        dataclasses.replace(p_, profile=None), p_.params, fixed, background, nm, k, shape
    )
    fast = RegionProblem(p_, p_.params, fixed, background, nm, k, shape, noise == "gaussian")
    params = {"x": rng.uniform(2, 8, k), "y": rng.uniform(2, 10, k),
              "flux": rng.uniform(50, 500, k),
              "background": rng.uniform(1, 3, reference.n_background)}  # fmt: skip
    for n in shapes:
        params[n] = rng.uniform(1.2, 2.5, k)
    held = {n: jnp.asarray(params[n]) for n in fixed}
    mask = np.zeros(shape)
    mask[1:9, 2:] = 1.0
    if noise == "poisson":
        mask[4, 5] = 0.0  # a masked pixel inside: not separable, the full assembly runs
    data = dict(
        image=jnp.asarray(rng.poisson(5.0, shape).astype(float)), mask=jnp.asarray(mask),
        weight=jnp.full(shape, 0.3), known=jnp.asarray(rng.uniform(0, 1, shape)),
        valid=jnp.array([True, True, False]), held=jnp.zeros(k, bool), fixed=held,
        rows=jnp.asarray(mask.max(1)), cols=jnp.asarray(mask.max(0)), scale=0.3,
    )  # fmt: skip
    u = reference.pack({n: jnp.asarray(v) for n, v in params.items()})
    want = jax.jit(reference.normal_equations)(u, data)
    got = jax.jit(fast.normal_equations)(u, data)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(a))))


def test_separable_only_where_exact():
    gauss, noise = crowdfit.get_psf("gaussian"), crowdfit.get_noise("gaussian")
    mask = np.ones((3, 8, 8), bool)
    mask[0, :, 6:] = False  # a window cut by the image edge: still a rectangle
    mask[2, 3, 3] = False  # a masked pixel inside the window
    weights = np.ones((3, 8, 8))
    assert _fit._separable_regions(gauss, noise, mask, weights).tolist() == [True, True, False]
    assert _fit._separable_regions(gauss, crowdfit.get_noise("poisson"), mask, weights) is None
    rotated = crowdfit.get_psf("rotated_gaussian")
    assert _fit._separable_regions(rotated, noise, mask, weights) is None
    uneven = weights.copy()
    uneven[1, 0, 0] = 2.0
    assert _fit._separable_regions(gauss, noise, mask, uneven).tolist() == [True, False, False]


def test_mixed_batch_keeps_region_order():
    # Regions with a masked pixel inside are fitted by the general program, the others by the
    # separable one; the results come back in the input order, as if fitted apart.
    rng = np.random.default_rng(8)
    img, init, _ = _small_problem(rng)
    mask = np.ones(img.shape, bool)
    holed = np.arange(img.shape[0]) % 3 == 1
    mask[holed, 7, 8] = False
    both = crowdfit.fit_regions(img, init, fixed=("sigma",), mask=mask)
    for sel in (holed, ~holed):
        part = {k: v[sel] for k, v in init.items()}
        alone = crowdfit.fit_regions(img[sel], part, fixed=("sigma",), mask=mask[sel])
        for n in ("x", "flux"):
            np.testing.assert_array_equal(np.asarray(both.params[n])[sel], alone.params[n])
        np.testing.assert_array_equal(np.asarray(both.status)[sel], alone.status)


def test_device_path_matches_host_path(monkeypatch):
    # On a GPU, jax arrays stay on the device and each piece is fitted in one call, without
    # stages; exercised here on CPU. A mixed batch (separable regions and regions with a masked
    # pixel inside) must give the host path's results, in input order.
    rng = np.random.default_rng(9)
    img, init, _ = _small_problem(rng)
    mask = np.ones(img.shape, bool)
    mask[::3, 7, 8] = False
    kw = dict(fixed=("sigma",), mask=mask, chunk_size=4, max_batch=8)
    host = crowdfit.fit_regions(img, init, **kw)
    monkeypatch.setattr(_fit, "_host_prepared", lambda given: False)
    device = crowdfit.fit_regions(jnp.asarray(img), init, **kw)
    assert isinstance(device.params["x"], jax.Array)
    np.testing.assert_array_equal(device.status, host.status)
    for n in ("x", "y", "flux"):
        err = np.asarray(host.errors[n])
        diff = np.abs(np.asarray(device.params[n]) - np.asarray(host.params[n])) / err
        assert np.max(diff) < 0.05, n


def test_numpy_inputs_off_the_cpu(monkeypatch):
    # Off the CPU, numpy inputs are prepared on the host and fitted chunk by chunk (GPU-sized
    # chunks) without stages.
    rng = np.random.default_rng(9)
    img, init, _ = _small_problem(rng)
    kw = dict(fixed=("sigma",))
    cpu = crowdfit.fit_regions(img, init, **kw)
    calls = []
    monkeypatch.setattr(_fit, "_on_cpu", lambda: False)
    # GPU chunks: the largest 512 · 4^j not above the batch, capped by the region's work.
    sizes = [_fit._default_sizes(w, n) for w, n in ((49, 10), (49, 5000), (49, 10**6),
                                                    (2048, 10**6), (8192, 10**6))]  # fmt: skip
    assert sizes == [(512, 2**18), (2048, 2**18), (65536, 2**18), (16384, 2**16),
                     (4096, 2**14)]  # fmt: skip
    real = _fit._run

    def spy(fn, piece, *a, **k):
        calls.append((piece[0].shape[0], k["chunk"]))
        return real(fn, piece, *a, **k)

    monkeypatch.setattr(_fit, "_run", spy)
    other = crowdfit.fit_regions(img, init, **kw)
    assert calls == [(img.shape[0], 512)]  # the GPU default: one call
    np.testing.assert_array_equal(other.status, cpu.status)
    for n in ("x", "y", "flux"):
        diff = np.abs(np.asarray(other.params[n]) - np.asarray(cpu.params[n]))
        assert np.max(diff / np.asarray(cpu.errors[n])) < 0.05, n


def test_profile_psf_with_other_parameters_takes_the_generic_path():
    # A `profile` describes only x, y, flux and the widths; a PSF that also has another
    # parameter must be fitted through its own `render` (automatic differentiation).
    from crowdfit._psf import PSF, _gauss_profile

    def render(p, x, y):
        return p["scale"] * crowdfit.get_psf("gaussian")(p, x, y)

    psf = PSF("scaled", ("x", "y", "flux", "sigma", "scale"), render, _gauss_profile)
    rng = np.random.default_rng(10)
    img, init, truth = _small_problem(rng)
    init = {**init, "scale": 0.5}
    res = crowdfit.fit_regions(img * 0.5 + 5.0, init, psf=psf, fixed=("sigma", "scale"))
    assert np.all(np.asarray(res.status) == 0)
    np.testing.assert_allclose(res.params["flux"], truth["flux"], rtol=0.1)
