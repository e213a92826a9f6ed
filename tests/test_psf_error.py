"""The PSF model's error: no false neighbours around bright stars whose PSF is not Gaussian."""

import math

import numpy as np
import pytest

import crowdfit
from crowdfit._image import _model_error


def test_model_error_is_the_neighbours_light_under_the_psf():
    cat = {"x": np.array([10.0, 13.0, 40.0]), "y": np.array([10.0, 10.0, 10.0]),
           "flux": np.array([1e6, 100.0, 5.0])}  # fmt: skip
    err = _model_error(cat, 2.0, 0.01)
    assert err[1] == pytest.approx(0.01 * 1e6 * math.exp(-9 / 16))
    assert err[0] == pytest.approx(0.01 * 100.0 * math.exp(-9 / 16))
    assert err[2] == 0.0  # nothing within reach
    assert not _model_error(cat, 2.0, 0.0).any()


def test_no_false_neighbours_around_bright_stars_with_a_halo():
    # Every star's true PSF has a 2 % halo of twice the width; the model is a Gaussian.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    faint = np.column_stack([rng.uniform(5, 91, 12), rng.uniform(5, 91, 12)])
    bright = np.array([[30.3, 40.6], [66.8, 62.2]])
    image = 5.0 + rng.normal(0.0, 5.0, (96, 96))
    for (x, y), f in zip(np.vstack([faint, bright]), [2513.0] * 12 + [1e6] * 2, strict=True):
        r2 = (xx - x) ** 2 + (yy - y) ** 2
        image += f * (0.98 * np.exp(-r2 / 8) / (8 * np.pi) + 0.02 * np.exp(-r2 / 32) / (32 * np.pi))

    def near_bright(cat):
        d = np.hypot(cat["x"][:, None] - bright[:, 0], cat["y"][:, None] - bright[:, 1]).min(1)
        return int(np.sum((d > 0.5) & (d < 10)))

    far = np.hypot(faint[:, None, 0] - bright[:, 0], faint[:, None, 1] - bright[:, 1]).min(1) > 12
    truth = {"x": faint[far, 0], "y": faint[far, 1], "flux": np.full(far.sum(), 2513.0)}
    cat = crowdfit.fit_image(image, sigma=2.0)
    assert near_bright(cat) <= int(np.sum(~far))  # at most the real faint stars there
    assert crowdfit.match(truth, cat).recall == 1.0
    exact = crowdfit.fit_image(image, sigma=2.0, psf_error=0.0)  # trusted exactly: junk
    assert near_bright(exact) >= near_bright(cat) + 5


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), (0.01, 0.02)])
def test_bad_psf_error(bad):
    with pytest.raises(ValueError, match="psf_error"):
        crowdfit.fit_image(np.zeros((16, 16)), sigma=2.0, psf_error=bad)
