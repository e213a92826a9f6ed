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


def test_sparse_counts_spot_peaks_are_not_spikes_but_hot_pixels_are():
    # 0.05 photons per pixel, spots of 300 photons (peak ~21): a peak whose neighbours fall
    # short by chance is no spike once its own shot noise counts.
    image, truth = crowdfit.simulate_field(
        (128, 128), 40, sigma=1.5, noise="poisson", background=0.05, flux=300.0, seed=2
    )
    image[100, 7] += 200.0  # a hot pixel
    noise = estimate_noise(image)
    assert np.argwhere(find_spikes(image, 1.5, noise, background=0.05, shot=True)).tolist() == [
        [100, 7]
    ]
    assert find_spikes(image, 1.5, noise, background=0.05).sum() > 1  # (Gaussian noise alone)


def test_masks_edges_lines_and_shapes():
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 1.0, (64, 48))
    assert not find_spikes(image, 2.0, 1.0).any()  # pure noise
    # A corner has one neighbour along each axis: a star may be centred past it.
    image[0, 0] = image[0, 20] = image[30, 20] = 50.0
    assert {tuple(map(int, rc)) for rc in np.argwhere(find_spikes(image, 2.0, 1.0))} == {
        (0, 20), (30, 20),  # an edge pixel is judged along the edge
    }  # fmt: skip
    mask = np.ones(image.shape, bool)
    mask[30, 20] = False  # a masked pixel is never a spike
    assert not find_spikes(image, 2.0, 1.0, mask=mask)[30, 20]
    # A track one pixel wide (a cosmic ray, a hot column) is sharper than the PSF across it.
    image[10, 10:14] = 45.0
    image[:, 40] += 30.0
    found = find_spikes(image, 2.0, 1.0)
    assert found[10, 10:14].all() and found[:, 40].all()
    image[20:22, 30:32] = 60.0  # a 2×2 blob is not
    assert not find_spikes(image, 2.0, 1.0)[20:22, 30:32].any()
    # Sharp only along x: a spike only where the PSF is wide along x.
    step = np.zeros((9, 9))
    step[3:6, 4] = 38.0
    step[4, 3:6] = 10.0, 40.0, 10.0
    assert find_spikes(step, (3.0, 3.0), 1.0)[4, 4]
    assert not find_spikes(step, (0.5, 3.0), 1.0)[4, 4]


@pytest.mark.parametrize(
    "image, sigma, message", [(np.zeros(5), 2.0, "2-D"), (np.zeros((5, 5)), -1.0, "positive")]
)
def test_bad_input(image, sigma, message):
    with pytest.raises(ValueError, match=message):
        find_spikes(image, sigma, 1.0)
