"""Tests of the check for elongated spots (`crowdfit._elongation`)."""

import math

import pytest

import crowdfit
from crowdfit._detect import detect, estimate_background, estimate_noise
from crowdfit._elongation import axis_ratio, elongation_message

ROUND = ("x", "y", "flux", "sigma")
ELLIPTICAL = ("x", "y", "flux", "sigma_x", "sigma_y")


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


def test_tilted_spots_are_beyond_an_elliptical_model():
    message = elongation_message(1.5, 40.0, 30, 20.0, ELLIPTICAL)
    assert "at 40° from x" in message and "rotate the image" in message


def test_fit_image_warns_when_a_round_psf_meets_elongated_spots():
    # (σ = 1.6 × 2.6 with psf="gaussian": 203 sources for 100 on a 256² field; see `_elongation`)
    image, _ = _field(1.6, 2.6, n=20)
    with pytest.warns(UserWarning, match=r"axis ratio 1\.6\d, long axis along y"):
        cat = crowdfit.fit_image(image, sigma=2.0, rounds=0)
    assert cat.meta["elongation"]["ratio"] == pytest.approx(1.625, abs=0.05)
