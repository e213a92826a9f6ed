"""PSF wings: a Moffat field measured with Gaussians plus measured wings, and Gaussian fields left
alone."""

import math
import warnings

import numpy as np
import pytest

import crowdfit
from crowdfit._image import _wings_matter
from crowdfit._wings import Wings, measure_wings, render_wings

FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0)) * 2.0


def moffat(beta):
    """A Moffat PSF of FWHM 4.71 px (σ = 2's) as a `simulate_field` PSF function."""
    alpha = FWHM / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))

    def render(p, x, y):
        r2 = (x - p["x"]) ** 2 + (y - p["y"]) ** 2
        return p["flux"] * (beta - 1.0) / (math.pi * alpha**2) * (1.0 + r2 / alpha**2) ** -beta

    return render


@pytest.fixture(scope="module")
def moffat_field():
    """Bright stars (S/N ~ 700) of a Moffat PSF of β = 3, apart."""
    return crowdfit.simulate_field(
        (192, 192), 16, psf=moffat(3.0), flux=25130.0, min_separation=36.0, border=12.0,
        stamp_radius=60, seed=3,
    )  # fmt: skip


@pytest.fixture(scope="module")
def moffat_catalog(moffat_field):
    image, _ = moffat_field
    with pytest.warns(UserWarning, match="the PSF is not Gaussian"):
        return crowdfit.fit_image(image, sigma=2.0)


def test_profile_of_known_wings_is_measured():
    # Gaussians of σ = 2 with a ring of 8 % of their light at r = 6 (2 px wide): the residual
    # of the Gaussians alone holds the ring.
    rng = np.random.default_rng(0)
    x, y = 20.0 + 40.0 * np.arange(10) + rng.uniform(-0.5, 0.5, 10), np.full(10, 24.0)
    yy, xx = np.mgrid[:48, :420]
    r = np.hypot(xx[..., None] - x, yy[..., None] - y)
    ring = np.exp(-((r - 6.0) ** 2) / 8.0)
    ring = 0.08 * ring / (2.0 * math.pi * 6.0 * 2.0 * math.sqrt(2.0 * math.pi))
    flux = np.full(10, 1e4)
    residual = (flux * ring).sum(-1) + rng.normal(0.0, 1.0, yy.shape)
    w = measure_wings(residual, np.ones(yy.shape, bool), x, y, flux, np.full(10, 100.0), 2.0)
    assert w.n_stars == 10
    # (its part along the Gaussian is taken out: a little of the ring's light)
    assert 0.06 < w.light < 0.085
    assert np.interp(6.0, w.knots, w.values) == pytest.approx(0.08 / 189.0, rel=0.1)
    assert _wings_matter(w)
    # Rendered, they are the ring (where the Gaussian part is small).
    img = render_wings(w, x[:1], y[:1], flux[:1], yy.shape)
    far = (r[..., 0] > 5.0) & (r[..., 0] < 10.0)
    assert np.allclose(img[far], (flux[0] * ring[..., 0])[far], atol=0.3)  # (peak 4.2)


def test_noise_alone_gives_no_wings():
    rng = np.random.default_rng(1)
    x, y = 20.0 + 40.0 * np.arange(10), np.full(10, 24.0)
    residual = rng.normal(0.0, 5.0, (48, 420))
    w = measure_wings(residual, np.ones((48, 420), bool), x, y, np.full(10, 2513.0),
                      np.full(10, 70.0), 2.0)  # fmt: skip
    assert abs(w.light) < 0.06  # (10 stars of S/N 70: about 3 % from the noise)
    assert w.significance < 2 * w.knots.size
    assert not _wings_matter(w)
    # Too few bright, isolated stars: nothing to measure.
    assert measure_wings(residual, np.ones((48, 420), bool), x, y, np.full(10, 2513.0),
                         np.full(10, 10.0), 2.0) is None  # fmt: skip
    assert measure_wings(residual, np.ones((48, 420), bool), x[:9], y[:9], np.full(9, 2513.0),
                         np.full(9, 70.0), 2.0) is None  # fmt: skip


def test_unresolved_pairs_among_the_brightest_make_no_wings():
    # 600 isolated sources of equal stars: the 150 brightest are pairs 1.5σ apart fitted as one
    # (flux 2F), whose residual (the pair less one Gaussian at its centre) is a dark core in a
    # bright ring, like wings; the others leave noise. The 200 brightest, mostly pairs, made
    # wings of 15 % of the light on a 1024² field; spread over the ranking they are a minority.
    rng = np.random.default_rng(5)
    side, step, s = 30, 40, 2.0
    gx, gy = np.meshgrid(20.0 + step * np.arange(side), 20.0 + step * np.arange(20))
    x, y = gx.ravel() + rng.uniform(-0.5, 0.5, 600), gy.ravel() + rng.uniform(-0.5, 0.5, 600)
    pair = np.zeros(600, bool)
    pair[rng.choice(600, 150, replace=False)] = True
    flux = np.where(pair, 2 * 2513.0, 2513.0)
    shape = (20 * step, side * step)
    residual = rng.normal(0.0, 5.0, shape)
    yy, xx = np.mgrid[-12:13, -12:13]

    def gauss(dx, dy):
        return np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * s * s)) / (2 * np.pi * s * s)

    for i in np.flatnonzero(pair):
        cx, cy = int(round(x[i])), int(round(y[i]))
        fx, fy = x[i] - cx, y[i] - cy
        blend = 0.5 * (gauss(fx - 1.5, fy) + gauss(fx + 1.5, fy)) - gauss(fx, fy)
        residual[cy - 12 : cy + 13, cx - 12 : cx + 13] += flux[i] * blend
    snr = flux / 35.0
    w = measure_wings(residual, np.ones(shape, bool), x, y, flux, snr, s)
    assert w.n_stars == 200
    assert not _wings_matter(w), (w.light, w.significance)
    # The brightest 200 alone (150 pairs) do make "wings".
    top = np.argsort(-flux, kind="stable")[:200]
    pairs = measure_wings(residual, np.ones(shape, bool), x[top], y[top], flux[top], snr[top], s)
    assert _wings_matter(pairs), (pairs.light, pairs.significance)


def test_moffat_stars_are_measured_with_their_wings(moffat_field, moffat_catalog):
    _, truth = moffat_field
    cat = moffat_catalog
    w = cat.meta["wings"]
    assert isinstance(w, Wings) and 0.1 < w.light < 0.4
    m = crowdfit.match(truth, cat)
    # Gaussians alone (below) take the wings for a ring of false stars about each bright one,
    # and miss a fifth of the light.
    assert m.n_matched == len(truth["x"]) and len(cat) == len(truth["x"])
    assert abs(m.flux_bias_median) < 0.05
    # The catalog's model (Gaussians and wings) explains the image to about the noise.
    image, _ = moffat_field
    resid = crowdfit.residual_image(image, cat)
    near = np.zeros(image.shape, bool)
    for x, y in zip(truth["x"], truth["y"], strict=True):
        yy, xx = np.ogrid[: image.shape[0], : image.shape[1]]
        near |= np.hypot(xx - x, yy - y) < 10
    assert np.std(resid[near]) < 1.5 * 5.0
    assert np.median(cat["chi2_reduced"]) < 1.5


def test_gaussians_alone_fail_on_moffat_stars(moffat_field, moffat_catalog):
    image, truth = moffat_field
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no wings: no warning)
        cat = crowdfit.fit_image(image, sigma=2.0, psf_wings=False)
    assert cat.meta["wings"] is None
    m = crowdfit.match(truth, cat)
    assert len(cat) > 2 * len(truth["x"])
    assert m.flux_bias_median < -0.1
    assert np.median(cat["chi2_reduced"]) > np.median(moffat_catalog["chi2_reduced"])


def test_gaussian_field_has_no_wings():
    image, truth = crowdfit.simulate_field((192, 192), 16, flux=25130.0, min_separation=36.0,
                                           border=12.0, seed=3)  # fmt: skip
    cat = crowdfit.fit_image(image, sigma=2.0)
    assert cat.meta["wings"] is None
    assert len(cat) == 16
    # χ² per degree of freedom in units of the noise: about 1.
    assert np.median(cat["chi2_reduced"]) == pytest.approx(1.0, abs=0.1)


def test_wings_that_no_longer_matter_are_dropped():
    # Wings that were taken on (a first look passed) and then measure below the gate are
    # dropped, not kept as a sliver of light (on big Gaussian fields that cost 7× the time).
    from crowdfit._image import _measured_wings
    from crowdfit._psf import get_psf

    image, _ = crowdfit.simulate_field((192, 192), 16, flux=25130.0, min_separation=36.0,
                                       border=12.0, seed=3)  # fmt: skip
    cat = crowdfit.fit_image(image, sigma=2.0, psf_wings=False)
    cols = {c: np.asarray(cat[c]) for c in cat.columns}
    bg = np.asarray(cat.meta["background_image"])
    knots = np.arange(1.0, 19.0)
    values = np.where(knots < 9, 2e-4, 0.0)
    light = float(render_wings(Wings(knots, values, 19.0, 0.0, np.zeros(18), 1), np.zeros(1),
                               np.zeros(1), np.ones(1), None).sum())  # fmt: skip
    known = Wings(knots, values, 19.0, light, np.full(18, 1e-5), 16)
    assert _wings_matter(known)
    good = np.ones(image.shape, bool)
    assert _measured_wings(image, good, cols, bg, get_psf("gaussian"), 2.0, known) is None


def test_dask_tiles_measure_the_wings_and_warn_once(moffat_field):
    da = pytest.importorskip("dask.array")
    from crowdfit.dask import fit_image_dask

    image, truth = moffat_field
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cat = fit_image_dask(da.from_array(image), tile=(192, 96), sigma=2.0)
    said = [w for w in caught if "the PSF is not Gaussian" in str(w.message)]
    assert len(said) == 1
    assert cat.meta["tiles"] == 2 and cat.meta["wings"] is not None
    m = crowdfit.match(truth, cat)
    assert len(cat) == len(truth["x"]) == m.n_matched
    assert abs(m.flux_bias_median) < 0.05


def test_cli_measures_the_wings_unless_told_not_to(moffat_field, tmp_path, capsys):
    from crowdfit._cli import main as cli_main

    image, truth = moffat_field
    path = tmp_path / "moffat.npy"
    np.save(path, image)
    out = tmp_path / "cat.csv"
    with pytest.warns(UserWarning, match="the PSF is not Gaussian"):
        assert cli_main(["fit", str(path), "--sigma", "2", "--out", str(out), "--quiet"]) == 0
    assert f"{len(truth['x'])} sources" in capsys.readouterr().out
    assert cli_main(["fit", str(path), "--sigma", "2", "--no-wings", "--out", str(out),
                     "--quiet"]) == 0  # fmt: skip
    assert len(crowdfit.Catalog.read_csv(out)) > 2 * len(truth["x"])


def test_movie_warns_that_its_traces_miss_the_wings(moffat_field):
    image, truth = moffat_field
    rng = np.random.default_rng(0)
    movie = image[None] + rng.normal(0.0, 5.0, (3, *image.shape))
    with pytest.warns(UserWarning, match="the traces miss that light") as said:
        traces = crowdfit.fit_movie(movie, sigma=2.0, progress_bar=False)
    assert not any("fits Gaussians alone)" in str(w.message) for w in said)  # (not fit_image's)
    assert traces.catalog.meta["wings"] is not None
    assert len(traces.catalog) == len(truth["x"])


def test_many_sources_are_drawn_by_fft_like_stamp_by_stamp(monkeypatch):
    from crowdfit import _wings

    knots = np.arange(19) + 0.5
    wings = Wings(knots, 1e-3 * np.exp(-knots / 4), 19.0, 0.1, np.zeros(19), 10)
    rng = np.random.default_rng(0)
    n = 600  # (their stamps cover the image: by FFT), some just outside the image
    x, y, flux = rng.uniform(-5, 100, n), rng.uniform(-5, 80, n), rng.uniform(1e3, 5e3, n)
    fft = render_wings(wings, x, y, flux, (76, 96))
    monkeypatch.setattr(_wings, "_FFT_COVER", np.inf)
    stamps = render_wings(wings, x, y, flux, (76, 96))
    assert fft.sum() == pytest.approx(stamps.sum(), rel=2e-3)
    assert np.sqrt(np.mean((fft - stamps) ** 2)) < 0.01 * stamps.mean()
    assert np.abs(fft - stamps).max() < 0.05 * stamps.max()


def test_wings_of_a_crowd_are_measured_all_sources_at_once():
    # 0.15 stars/FWHM²: few stars are isolated and each one's outer rings hold its neighbours'
    # wings; the wings are measured on the finished catalog's residual, all sources at once.
    n = int(round(0.15 * 128**2 / FWHM**2))
    image, truth = crowdfit.simulate_field((128, 128), n, psf=moffat(3.0), flux=2513.0,
                                           background=5.0, read_noise=5.0, stamp_radius=60,
                                           seed=2)  # fmt: skip
    with pytest.warns(UserWarning, match="the PSF is not Gaussian"):
        cat = crowdfit.fit_image(image, progress_bar=False)
    assert 0.1 < cat.meta["wings"].light < 0.35
    m = crowdfit.match(truth, cat, radius=1.0)  # (Gaussians alone: -20.6 %, Jaccard 0.854)
    assert abs(m.flux_bias_median) < 0.05 and m.jaccard > 0.95


@pytest.mark.parametrize("density", [0.1, 0.3])
def test_gaussian_crowd_has_no_wings(density):
    n = int(round(density * 128**2 / FWHM**2))
    image, _ = crowdfit.simulate_field((128, 128), n, sigma=2.0, flux=2513.0, background=5.0,
                                       read_noise=5.0, seed=4)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no wings: no warning)
        cat = crowdfit.fit_image(image, progress_bar=False)
    assert cat.meta["wings"] is None
    alone = crowdfit.fit_image(image, psf_wings=False, progress_bar=False)
    assert np.array_equal(np.asarray(cat["flux"]), np.asarray(alone["flux"]))


def test_joint_measurement_of_noise_gives_no_wings():
    from crowdfit._wings import measure_wings_jointly

    rng = np.random.default_rng(2)
    # (168²: 128² used, less the edge's reach; 80 sources on 128²)
    x, y = rng.uniform(0, 168, 138), rng.uniform(0, 168, 138)
    residual = rng.normal(0.0, 5.0, (168, 168))
    w = measure_wings_jointly(residual, np.ones((168, 168), bool), x, y, np.full(138, 2513.0), 2.0)
    assert abs(w.light) < 0.02 and not _wings_matter(w)
    assert measure_wings_jointly(residual, np.ones((168, 168), bool), x[:9], y[:9],
                                 np.full(9, 2513.0), 2.0) is None  # fmt: skip


def test_wings_of_a_crowd_on_a_curved_background():
    # A Gaussian hump of 200 counts, 75 px wide, under a crowd: `_joint_wings` estimates the
    # background under the wings away from the sources' cores and about its own smoothed shape.
    # (Estimated as for the Gaussians, the wings settled at 0.185 of the light, fluxes -3.4 %.)
    side = 384
    yy, xx = np.mgrid[:side, :side]
    hump = 200.0 * np.exp(-((xx - 191.5) ** 2 + (yy - 191.5) ** 2) / (2 * 75.0**2))
    n = int(round(0.1 * side**2 / FWHM**2))
    image, truth = crowdfit.simulate_field((side, side), n, psf=moffat(3.0), flux=2513.2741,
                                           background=5.0 + hump, read_noise=5.0,
                                           stamp_radius=60, seed=2)  # fmt: skip
    with pytest.warns(UserWarning, match="the PSF is not Gaussian"):
        cat = crowdfit.fit_image(image, progress_bar=False)
    assert 0.2 < cat.meta["wings"].light < 0.25
    m = crowdfit.match(truth, cat, radius=1.0)
    assert abs(m.flux_bias_median) < 0.02 and m.jaccard > 0.95


def test_joint_wings_leave_out_the_image_edge():
    # A 128² crop of a wider crowd, its catalog the sources inside: within reach of the edge lie
    # the wings of sources beyond it, which made the profile hold 0.111 of the light, not 0.130
    # (`fit_image_dask`'s tiles of 256² on a 1024² Moffat field: fluxes -3.2 %).
    from crowdfit._wings import _less_gaussian, measure_wings_jointly

    knots = np.arange(19) + 0.5
    values = np.where(knots > 4.0, 4e-3 * np.exp(-knots / 3.0), 0.0)
    true = _less_gaussian(Wings(knots, values, 19.0, 0.0, np.zeros(19), 0), 2.0)
    rng = np.random.default_rng(0)
    x, y, flux = rng.uniform(-32, 160, 250), rng.uniform(-32, 160, 250), np.full(250, 25130.0)
    residual = render_wings(true, x, y, flux, (128, 128)) + rng.normal(0.0, 5.0, (128, 128))
    inside = (x > -0.5) & (x < 127.5) & (y > -0.5) & (y < 127.5)
    w = measure_wings_jointly(residual, np.ones((128, 128), bool), x[inside], y[inside],
                              flux[inside], 2.0)  # fmt: skip
    assert w.light == pytest.approx(true.light, abs=0.005)
