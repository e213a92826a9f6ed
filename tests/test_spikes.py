"""Single-pixel spikes (hot pixels, cosmic-ray hits): found where planted, never on stars."""

import numpy as np
import pytest

import crowdfit
from crowdfit._detect import estimate_noise
from crowdfit._spikes import find_spikes


@pytest.mark.parametrize("sigma", [0.8, 1.2, 2.0, 3.0])
@pytest.mark.parametrize("psf", ["gaussian", "integrated_gaussian"])
def test_no_spike_on_bright_stars_or_noise(psf, sigma):
    # Stars up to ~10^6 photons with Poisson noise: their peaks carry shot noise far above the
    # background's, yet none is taken for a spike. Planted spikes are all found.
    image, _ = crowdfit.simulate_field(
        (128, 128), 60, sigma=sigma, psf=psf, flux=crowdfit.lognormal_flux(20000.0, 1.5),
        background=50.0, noise="poisson", seed=2,
    )  # fmt: skip
    noise = estimate_noise(image)
    assert not find_spikes(image, sigma, noise, background=50.0).any()
    rng = np.random.default_rng(1)
    rows, cols = rng.integers(0, 128, 10), rng.integers(0, 128, 10)
    hot = image.copy()
    hot[rows, cols] = 50.0 + 30 * noise  # on the sky; on a star where one happens to lie
    found = find_spikes(hot, sigma, noise, background=50.0)
    pad = np.pad(image, 1, mode="edge")
    around = np.max([pad[rows + 1 + dy, cols + 1 + dx]
                     for dy, dx in ((0, 0), (0, 1), (1, 0), (0, -1), (-1, 0))], axis=0)  # fmt: skip
    on_sky = around < 50.0 + 3 * noise  # the pixel and its 4 neighbours: sky
    assert on_sky.sum() >= 5
    assert found[rows[on_sky], cols[on_sky]].all()
    assert found.sum() <= 10


def test_masks_edges_and_shapes():
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 1.0, (64, 48))
    assert not find_spikes(image, 2.0, 1.0).any()  # pure noise
    image[0, 0] = image[63, 47] = image[30, 20] = 50.0  # corners count their two neighbours
    assert find_spikes(image, 2.0, 1.0).sum() == 3
    mask = np.ones(image.shape, bool)
    mask[30, 20] = False  # a masked pixel is never a spike...
    assert not find_spikes(image, 2.0, 1.0, mask=mask)[30, 20]
    image[10, 10], image[10, 11] = 50.0, 45.0  # ...a pair of bright pixels is not one either,
    assert not find_spikes(image, 2.0, 1.0)[10, 10]
    mask = np.ones(image.shape, bool)
    mask[10, 11] = False  # unless the partner is masked (it does not count as a neighbour)
    assert find_spikes(image, 2.0, 1.0, mask=mask)[10, 10]
    isolated = np.zeros((5, 5))
    isolated[2, 2] = 50.0
    lonely = np.zeros((5, 5), bool)
    lonely[2, 2] = True
    assert not find_spikes(isolated, 2.0, 1.0, mask=lonely).any()  # no valid neighbour
    # An elliptical PSF: a steep drop along x is a spike only where the PSF is wide along x.
    step = np.zeros((9, 9))
    step[4, 4], step[4, 5] = 40.0, 10.0
    assert find_spikes(step, (3.0, 3.0), 1.0)[4, 4]
    assert not find_spikes(step, (0.5, 3.0), 1.0)[4, 4]


@pytest.mark.parametrize(
    "image, sigma, message", [(np.zeros(5), 2.0, "2-D"), (np.zeros((5, 5)), -1.0, "positive")]
)
def test_bad_input(image, sigma, message):
    with pytest.raises(ValueError, match=message):
        find_spikes(image, sigma, 1.0)
