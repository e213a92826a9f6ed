"""Saturated stars and masked star cores: fitted on their wings, no false rim sources."""

import warnings

import numpy as np
import pytest

import crowdfit
from crowdfit._saturation import saturation_level

SHAPE = (64, 64)
BRIGHT = dict(x=30.3, y=15.6, flux=2e6)  # peak 8e4, σ = 2


@pytest.fixture(scope="module")
def field():
    """A 64×64 field of 6 ordinary stars plus one bright star, before any clipping."""
    image, truth = crowdfit.simulate_field(SHAPE, 6, seed=5, border=6, min_separation=12,
                                           positions=None)  # fmt: skip
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    r2 = (xx - BRIGHT["x"]) ** 2 + (yy - BRIGHT["y"]) ** 2
    image = image + BRIGHT["flux"] * np.exp(-r2 / 8.0) / (8.0 * np.pi)
    assert np.hypot(truth["x"] - BRIGHT["x"], truth["y"] - BRIGHT["y"]).min() > 12
    return image, truth


def _bright(cat):
    i = int(np.argmin(np.hypot(cat["x"] - BRIGHT["x"], cat["y"] - BRIGHT["y"])))
    near = np.hypot(cat["x"] - BRIGHT["x"], cat["y"] - BRIGHT["y"]) < 10
    return i, int(near.sum())


def test_clipped_star_is_fitted_on_its_wings(field):
    image, truth = field
    clipped = np.minimum(image, 20000.0)
    with pytest.warns(UserWarning, match="saturated pixel"):
        cat = crowdfit.fit_image(clipped, sigma=2.0)
    assert cat.meta["saturation"] == 20000.0
    assert cat.meta["n_saturated"] == int(np.sum(clipped >= 20000.0))
    i, n_near = _bright(cat)
    assert n_near == 1  # one source: no false neighbours on the plateau's rim
    assert cat["flux"][i] == pytest.approx(BRIGHT["flux"], rel=0.01)
    assert abs(cat["x"][i] - BRIGHT["x"]) < 0.05 and abs(cat["y"][i] - BRIGHT["y"]) < 0.05
    assert np.isfinite(cat["flux_err"][i]) and cat["status"][i] == 0
    m = crowdfit.match(truth, cat)
    assert m.recall == 1.0 and m.n_found == len(truth["x"]) + 1
    # Kept, the plateau drags the flux far down.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = crowdfit.fit_image(clipped, sigma=2.0, saturation=np.inf)
    assert kept.meta["saturation"] is None
    assert kept["flux"][_bright(kept)[0]] < 0.5 * BRIGHT["flux"]
    # With a camera offset: the level is in the image's own units.
    with pytest.warns(UserWarning, match=r"\(>= 20100\)"):
        shifted = crowdfit.fit_image(clipped + 100.0, sigma=2.0, offset=100.0)
    assert shifted.meta["saturation"] == 20100.0
    np.testing.assert_allclose(shifted["flux"], cat["flux"], rtol=1e-4)
    # A level of the user's below the clip: more pixels masked, the same star.
    with pytest.warns(UserWarning, match="saturated pixel"):
        low = crowdfit.fit_image(clipped, sigma=2.0, saturation=15000.0)
    assert low.meta["n_saturated"] > cat.meta["n_saturated"]
    assert low["flux"][_bright(low)[0]] == pytest.approx(BRIGHT["flux"], rel=0.01)


def test_user_masked_core_and_integer_image(field):
    image, _ = field
    mask = image < 20000.0  # the user masks the core of an unclipped star
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cat = crowdfit.fit_image(image, sigma=2.0, mask=mask)
    i, n_near = _bright(cat)
    assert n_near == 1 and cat["flux"][i] == pytest.approx(BRIGHT["flux"], rel=0.01)
    # A 16-bit camera frame: clipped at 65535.
    frame = np.clip(np.round(image * 2.0), 0, 65535).astype(np.uint16)
    with pytest.warns(UserWarning, match="saturated pixel"):
        cat = crowdfit.fit_image(frame, sigma=2.0)
    assert cat.meta["saturation"] == 65535.0
    i, n_near = _bright(cat)
    assert n_near == 1 and cat["flux"][i] == pytest.approx(2 * BRIGHT["flux"], rel=0.01)


def test_saturation_level():
    rng = np.random.default_rng(0)
    good = np.ones((32, 32), bool)
    counts = rng.poisson(3.0, (32, 32)).astype(float)  # low counts repeat their maximum
    assert saturation_level(counts, good, 1.7) is None
    image = rng.normal(100.0, 5.0, (32, 32))
    assert saturation_level(image, good, 5.0) is None  # no plateau
    image[10, 10:12] = image[20, 20] = 1000.0  # a 2-pixel plateau (and a third pixel) at the max
    assert saturation_level(image, good, 5.0) == 1000.0
    image[10, 11] = 900.0  # two separate pixels at the max are no plateau
    assert saturation_level(image, good, 5.0) is None
    # Integer counts: two tied pixels are chance, unless at a converter's limit; four are not.
    counts = np.round(rng.normal(100.0, 5.0, (32, 32)))
    counts[10, 10:12] = 1000.0
    assert saturation_level(counts, good, 5.0) is None
    assert saturation_level(counts - 100.0, good, 5.0, offset=100.0) is None
    counts[10, 10:12] = 4095.0
    assert saturation_level(counts - 100.0, good, 5.0, offset=100.0) == 3995.0
    counts[10:12, 10:12] = 1000.0
    assert saturation_level(counts, good, 5.0) == 1000.0
    # A saturated cosmic-ray hit (dark rim) is masked but is no star.
    image = rng.normal(100.0, 5.0, (48, 48))
    image[20, 20:22] = 4000.0
    with pytest.warns(UserWarning, match="2 saturated pixel"):
        cat = crowdfit.fit_image(image, sigma=2.0)
    assert len(cat) == 0


def test_bad_saturation():
    with pytest.raises(ValueError, match="saturation"):
        crowdfit.fit_image(np.zeros((16, 16)), sigma=2.0, saturation=-1.0)
