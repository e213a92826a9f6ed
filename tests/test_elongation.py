"""Tests of the check for elongated spots (`crowdfit._elongation`)."""

import math

import numpy as np
import pytest

import crowdfit
from crowdfit._detect import detect, estimate_background, estimate_noise
from crowdfit._elongation import axis_ratio, elongation_message
from crowdfit._psf import ellipse_covariance, ellipse_from_covariance

ROUND = ("x", "y", "flux", "sigma")
ELLIPTICAL = ("x", "y", "flux", "sigma_x", "sigma_y")
ROTATED = ("x", "y", "flux", "sigma_x", "sigma_y", "angle")


def _field(sx, sy, amplitude=100.0, n=60, seed=2):
    return crowdfit.simulate_field(
        (192, 192), n, psf="elliptical_gaussian", sigma_x=sx, sigma_y=sy,
        flux=amplitude * 2 * math.pi * sx * sy, seed=seed,
    )  # fmt: skip


def _measure(image, sigma):
    noise = estimate_noise(image)
    bg = estimate_background(image, sigma=sigma)
    det = detect(image, sigma, background=bg, noise=noise)
    return axis_ratio(image, det["x"], det["y"], sigma, background=bg, noise=noise)


@pytest.mark.parametrize("sx, sy, angle", [(1.6, 2.6, 90.0), (2.2, 2.0, 0.0), (2.0, 2.0, None)])
def test_axis_ratio_and_angle(sx, sy, angle):
    image, _ = _field(sx, sy)
    ratio, measured, n, z = _measure(image, math.sqrt(sx * sy))
    assert n >= 10
    assert ratio == pytest.approx(max(sx, sy) / min(sx, sy), abs=0.03)
    if angle is None:  # round: no coherent elongation, and nothing to say
        assert z < 3 and elongation_message(ratio, measured, n, z, ROUND) is None
    else:
        assert z > 5 and abs(abs(measured) - angle) < 5
        assert "psf='elliptical_gaussian'" in elongation_message(ratio, measured, n, z, ROUND)
        assert elongation_message(ratio, measured, n, z, ELLIPTICAL) is None


def test_tilted_spots_call_for_a_rotated_model():
    for params in (ROUND, ELLIPTICAL):
        message = elongation_message(1.5, 40.0, 30, 20.0, params)
        assert "at 40° from x" in message and "psf='rotated_gaussian'" in message
    assert elongation_message(1.5, 40.0, 30, 20.0, ROTATED) is None
    # (a rotated PSF whose sigma was given without an angle is held at angle 0)
    held = elongation_message(1.5, 40.0, 30, 20.0, ROTATED, angle_held=True)
    assert "sigma=(sigma_x, sigma_y, angle)" in held
    assert elongation_message(1.5, 2.0, 30, 20.0, ROTATED, angle_held=True) is None


@pytest.mark.parametrize("sx, sy, angle", [(1.5, 2.5, 0.6), (2.5, 1.5, -1.2), (2.0, 2.0, 0.3)])
def test_ellipse_covariance_is_the_rotated_gaussians(sx, sy, angle):
    yy, xx = np.mgrid[:61, :61].astype(float)
    p = dict(x=30.0, y=30.0, flux=1.0, sigma_x=sx, sigma_y=sy, angle=angle)
    light = np.asarray(crowdfit.get_psf("rotated_gaussian")(p, xx, yy), float)
    dx, dy = xx - 30.0, yy - 30.0
    moments = [(light * v).sum() for v in (dx * dx, dy * dy, dx * dy)]
    c = ellipse_covariance(sx, sy, angle)
    np.testing.assert_allclose(moments, c, atol=1e-6)
    back = ellipse_from_covariance(*c)  # (canonical: the angle within ±45°, same spots)
    assert abs(float(back[2])) <= math.pi / 4 + 1e-12
    np.testing.assert_allclose(ellipse_covariance(*back), c, atol=1e-12)


def test_fit_image_measures_a_tilted_psf():
    # σ = 1.5 × 2.5 at 0.6 rad: a round or elliptical model splits every spot (a 256² field of
    # 300: 561 sources, Jaccard 0.16, fluxes -22 %); the rotated one is measured from the
    # isolated spots' moments and every source's fit (no search or split test, to compile less)
    image, truth = crowdfit.simulate_field(
        (128, 128), 50, psf="rotated_gaussian", sigma_x=1.5, sigma_y=2.5, angle=0.6,
        flux=100 * 2 * math.pi * 1.5 * 2.5, seed=3,
    )  # fmt: skip
    cat = crowdfit.fit_image(image, psf="rotated_gaussian", rounds=0, split=False)
    sx, sy, angle = cat.meta["sigma"]
    assert sx == pytest.approx(1.5, rel=0.02) and sy == pytest.approx(2.5, rel=0.02)
    assert angle == pytest.approx(0.6, abs=0.03)
    assert cat.columns[-1] == "angle" and np.allclose(cat["angle"], angle)
    m = crowdfit.match(truth, cat)
    assert m.n_matched >= 40 and m.fp <= 2  # (the 2: close pairs fitted as one, untested)
    assert abs(m.flux_bias_median) < 0.01


def test_fit_image_warns_when_a_round_psf_meets_elongated_spots():
    # (σ = 1.6 × 2.6 with psf="gaussian": 203 sources for 100 on a 256² field; see `_elongation`)
    image, _ = _field(1.6, 2.6, n=20)
    with pytest.warns(UserWarning, match=r"axis ratio 1\.6\d, long axis along y"):
        cat = crowdfit.fit_image(image, sigma=2.0, rounds=0)
    assert cat.meta["elongation"]["ratio"] == pytest.approx(1.625, abs=0.05)


def test_a_rotated_shape_is_summed_up_by_its_covariance():
    from crowdfit._cli import _width
    from crowdfit.dask import _median_sigma

    # (tiles of one tilted PSF near ±45°, where the canonical angle flips sign and swaps the
    # widths: their median is taken over the covariance, not over the angles)
    tiles = [(1.5, 2.5, 0.78), (2.5, 1.5, -0.78), (1.5, 2.5, 0.79)]
    sx, sy, angle = _median_sigma(tiles)
    np.testing.assert_allclose(
        ellipse_covariance(sx, sy, angle), ellipse_covariance(1.5, 2.5, 0.785), atol=0.02
    )
    assert _median_sigma([2.0, 2.2, 2.1]) == 2.1
    assert _width((1.5, 2.5, 0.6)) == "1.500, 2.500 at 0.600 rad" and _width(2.0) == "2.000"


def test_a_rotated_catalog_read_from_csv_draws_its_ellipses(tmp_path):
    cat = crowdfit.Catalog({
        "x": np.array([10.0, 20.3]), "y": np.array([12.0, 18.6]), "flux": np.array([100.0, 50.0]),
        "sigma_x": np.array([1.5, 1.5]), "sigma_y": np.array([2.5, 2.5]),
        "angle": np.array([0.6, 0.6]),
    })  # fmt: skip
    cat.to_csv(tmp_path / "cat.csv")
    back = crowdfit.Catalog.read_csv(tmp_path / "cat.csv")
    drawn = crowdfit.model_image(back, (32, 36))
    np.testing.assert_allclose(drawn, crowdfit.model_image(cat, (32, 36), psf="rotated_gaussian"))
    assert abs(drawn.sum() - 150.0) < 0.1
    # (without an angle: the widths as elliptical Gaussians, round where they are equal)
    flat = crowdfit.Catalog({k: v for k, v in cat.data.items() if k != "angle"})
    np.testing.assert_allclose(
        crowdfit.model_image(flat, (32, 36)),
        crowdfit.model_image(flat, (32, 36), psf="elliptical_gaussian"),
    )


def test_an_empty_rotated_catalog_has_its_angle_column():
    # (so that `fit_image_dask` can join an empty tile's catalog to the others')
    for psf in ("rotated_gaussian", "elliptical_gaussian"):
        with pytest.warns(UserWarning, match="blank frame"):
            cat = crowdfit.fit_image(np.full((16, 16), 3.0), psf=psf)
        assert len(cat) == 0 and ("angle" in cat.columns) == (psf == "rotated_gaussian")
