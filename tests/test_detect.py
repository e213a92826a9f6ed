"""Tests of host-side detection: noise, background, matched filter, peaks and the PSF width.

Fields are simulated like the seed question's: Gaussian spots of amplitude 100 on N(5, 5) noise.
"""

import math

import numpy as np
import pytest

from crowdfit._detect import (
    detect,
    estimate_background,
    estimate_noise,
    estimate_sigma,
    matched_filter,
)

AMPLITUDE, SIGMA, NOISE, OFFSET = 100.0, 2.0, 5.0, 5.0


def positions(shape, n, rng, min_separation=None):
    """`n` uniform positions (x, y) over the image, edges included, optionally kept apart."""
    height, width = shape
    xs, ys = [], []
    while len(xs) < n:
        x, y = rng.uniform(0, width - 1), rng.uniform(0, height - 1)
        if min_separation and xs:
            if np.min(np.hypot(np.array(xs) - x, np.array(ys) - y)) < min_separation:
                continue
        xs.append(x)
        ys.append(y)
    return np.array(xs), np.array(ys)


def render(shape, x, y, amplitude=AMPLITUDE, sigma=SIGMA):
    """Sum of `amplitude * exp(-r² / (2σ²))` spots, each out to 6σ."""
    image = np.zeros(shape)
    half = math.ceil(6 * sigma)
    amplitude = np.broadcast_to(amplitude, np.shape(x))
    for xi, yi, ai in zip(x, y, amplitude, strict=True):
        r0, c0 = max(0, int(yi) - half), max(0, int(xi) - half)
        r1, c1 = min(shape[0], int(yi) + half + 2), min(shape[1], int(xi) + half + 2)
        yy, xx = np.mgrid[r0:r1, c0:c1]
        image[r0:r1, c0:c1] += ai * np.exp(-((xx - xi) ** 2 + (yy - yi) ** 2) / (2 * sigma**2))
    return image


def field(shape, n, seed, min_separation=None, sigma=SIGMA):
    rng = np.random.default_rng(seed)
    x, y = positions(shape, n, rng, min_separation)
    image = render(shape, x, y, sigma=sigma) + rng.normal(OFFSET, NOISE, shape)
    return image, x, y


def match(x_true, y_true, x_found, y_found):
    """Distance from each true source to the nearest detection, and from each detection back."""
    d = np.hypot(x_true[:, None] - x_found[None, :], y_true[:, None] - y_found[None, :])
    return d.min(axis=1), d.min(axis=0)


# --- estimate_noise ------------------------------------------------------------------------------


def test_noise_pure_noise_and_gradient():
    rng = np.random.default_rng(0)
    image = rng.normal(OFFSET, NOISE, (256, 512))
    assert estimate_noise(image) == pytest.approx(NOISE, rel=0.05)
    yy, xx = np.mgrid[:256, :512]
    assert estimate_noise(image + 0.3 * xx - 0.2 * yy) == pytest.approx(NOISE, rel=0.05)


@pytest.mark.parametrize("shape, n", [((200, 400), 400), ((512, 512), 2000)])
def test_noise_crowded(shape, n):
    image, _, _ = field(shape, n, seed=1)
    assert estimate_noise(image) == pytest.approx(NOISE, rel=0.05)


def test_noise_ignores_masked_pixels():
    rng = np.random.default_rng(2)
    image = rng.normal(OFFSET, NOISE, (128, 128))
    mask = np.ones(image.shape, dtype=bool)
    mask[:, :64] = False
    image[:, :64] = rng.normal(0.0, 100.0, (128, 64))
    image[0, 70] = np.nan  # non-finite pixels are ignored as well
    assert estimate_noise(image, mask) == pytest.approx(NOISE, rel=0.05)


# --- estimate_background -------------------------------------------------------------------------


def test_noise_of_sparse_counts():
    # 0.05 photons per pixel: the filtered image is mostly exact zeros and its MAD is 0; the
    # estimate falls back on the RMS (without the largest 1 %), near sqrt(0.05) = 0.22.
    rng = np.random.default_rng(3)
    counts = rng.poisson(0.05, (256, 256)).astype(float)
    assert 0.15 < estimate_noise(counts) < 0.3


def test_background_tracks_gradient_under_crowd():
    image, _, _ = field((200, 400), 200, seed=3)
    yy, xx = np.mgrid[:200, :400]
    gradient = 20.0 + 0.1 * xx + 0.05 * yy
    error = estimate_background(image + gradient, sigma=SIGMA) - gradient - OFFSET
    assert np.max(np.abs(error)) < NOISE
    assert np.sqrt(np.mean(error**2)) < 0.2 * NOISE


@pytest.mark.parametrize("slope", [0.7, 3.0])
def test_background_follows_a_gradient_steeper_than_the_noise(slope):
    # 1 and 4 noise σ per pixel: a 16-pixel box spreads its pixels over 16-64 σ, which the
    # boxes' clipping window cannot hold; a plane through the boxes' medians is taken out
    # first. Without it the map was 0.85 / 3.9 σ off in RMS.
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:128, :128]
    truth = 20.0 + slope * xx + 0.5 * slope * yy
    background = estimate_background(truth + rng.normal(0.0, 0.7, truth.shape), sigma=2.0)
    assert np.sqrt(np.mean((background - truth) ** 2)) < 0.15 * 0.7


def test_background_less_biased_than_median_in_crowd():
    image, _, _ = field((200, 400), 400, seed=4)
    bias = np.mean(estimate_background(image, sigma=SIGMA)) - OFFSET
    assert abs(bias) < 0.25 * NOISE
    assert abs(bias) < 0.5 * abs(np.median(image) - OFFSET)


def test_background_mesh_of_even_boxes_is_a_reshape():
    # Boxes that tile the image exactly are gathered by a reshape, the others by indexing;
    # both must give the same boxes (NaN kept).
    from crowdfit._detect import _Mesh

    rng = np.random.default_rng(0)
    values = rng.normal(size=(64, 96))
    values[3, 7] = np.nan
    even = _Mesh(values.shape, (16, 16))
    uneven = _Mesh(values.shape, (16, 16))
    uneven.even = False
    assert even.even
    np.testing.assert_array_equal(even.gather(values), uneven.gather(values))
    assert not _Mesh((70, 96), (16, 16)).even


def test_background_mask_and_box():
    rng = np.random.default_rng(5)
    image = rng.normal(OFFSET, NOISE, (96, 160))
    mask = np.ones(image.shape, dtype=bool)
    mask[20:60, 40:100] = False
    image[20:60, 40:100] = 1e4
    for box in (16, (12, 20), 200):
        background = estimate_background(image, mask, box=box)
        assert background.shape == image.shape
        assert np.max(np.abs(background - OFFSET)) < 0.5 * NOISE


# --- matched_filter ------------------------------------------------------------------------------


@pytest.mark.parametrize("x0, y0", [(20.0, 16.0), (0.0, 16.0), (39.0, 0.0)])
def test_matched_filter_is_flux_even_at_edges(x0, y0):
    image = render((32, 40), [x0], [y0])
    flux = matched_filter(image, SIGMA, background=0.0)
    assert flux[int(y0), int(x0)] == pytest.approx(AMPLITUDE * 2 * math.pi * SIGMA**2, rel=1e-6)


def test_matched_filter_normalised_convolution_with_mask():
    image = render((32, 32), [16.0], [16.0])
    mask = np.ones(image.shape, dtype=bool)
    mask[:, 17:] = False
    image[~mask] = 1e6  # masked pixels must not leak in
    flux = matched_filter(image, SIGMA, mask, background=0.0)
    assert flux[16, 16] == pytest.approx(AMPLITUDE * 2 * math.pi * SIGMA**2, rel=1e-6)


# --- detect --------------------------------------------------------------------------------------


def test_detect_seed_field():
    # The seed's field: 50 σ = 2 spots of amplitude 100 on N(5, 5) noise in 200 × 400 px, edges
    # included; kept 8 px apart so that each is a separate peak.
    image, x, y = field((200, 400), 50, seed=6, min_separation=8.0)
    found = detect(image, SIGMA)
    to_found, to_true = match(x, y, found["x"], found["y"])
    assert np.all(to_found < 1.0)
    assert np.sum(to_true > 1.5) <= 2
    assert np.sqrt(np.mean(to_found**2)) < 0.2
    flux = AMPLITUDE * 2 * math.pi * SIGMA**2
    nearest = np.argmin(np.hypot(x[:, None] - found["x"], y[:, None] - found["y"]), axis=1)
    interior = (x > 8) & (x < 391) & (y > 8) & (y < 191)
    ratio = found["flux_guess"][nearest[interior]] / flux
    assert np.median(ratio) == pytest.approx(1.0, abs=0.03)
    assert np.all(np.abs(ratio - 1.0) < 0.1)
    assert np.all(np.diff(found["snr"]) <= 0)


def test_detect_snr_is_in_filtered_noise_units():
    rng = np.random.default_rng(7)
    image = render((128, 128), [61.7], [60.2]) + rng.normal(OFFSET, NOISE, (128, 128))
    found = detect(image, SIGMA)
    assert abs(found["x"][0] - 61.7) < 0.5 and abs(found["y"][0] - 60.2) < 0.5
    # S/N of a matched filter on white noise: flux / (noise · 2√π σ) = A √π σ / noise (70.9),
    # give or take 1 for the noise on the peak and 2 % for the noise estimate.
    expected = AMPLITUDE * math.sqrt(math.pi) * SIGMA / NOISE
    assert found["snr"][0] == pytest.approx(expected, rel=0.12)
    assert detect(image, SIGMA, threshold=1.1 * expected)["x"].size == 0


def test_detect_few_false_positives_on_noise():
    rng = np.random.default_rng(8)
    image = rng.normal(OFFSET, NOISE, (512, 512))
    assert detect(image, SIGMA)["x"].size <= 2
    assert detect(image, SIGMA, threshold=3.0)["x"].size > 5


def test_detect_never_in_masked_area():
    image, x, y = field((128, 192), 40, seed=9, min_separation=8.0)
    mask = np.ones(image.shape, dtype=bool)
    mask[30:90, 50:120] = False
    image[40:50, 60:70] = np.nan
    image[70:80, 100:110] = 1e5
    found = detect(image, SIGMA, mask=mask)
    rows, cols = np.round(found["y"]).astype(int), np.round(found["x"]).astype(int)
    assert np.all(mask[rows, cols])
    # Sources with all their core pixels valid are still found.
    clear = np.array(
        [
            mask[max(0, round(r) - 4) : round(r) + 5, max(0, round(c) - 4) : round(c) + 5].all()
            for r, c in zip(y, x, strict=True)
        ]
    )
    assert 0 < clear.sum() < x.size
    to_found, _ = match(x[clear], y[clear], found["x"], found["y"])
    assert np.all(to_found < 1.0)


def test_detect_border_spots():
    shape = (60, 80)
    x = np.array([0.0, 79.0, 0.0, 79.0, 40.0, 0.3, 40.0, 78.6])
    y = np.array([0.0, 0.0, 59.0, 59.0, 0.0, 30.0, 59.0, 30.4])
    rng = np.random.default_rng(10)
    image = render(shape, x, y) + rng.normal(OFFSET, NOISE, shape)
    found = detect(image, SIGMA)
    to_found, to_true = match(x, y, found["x"], found["y"])
    assert np.all(to_found < 1.0)
    assert np.all(to_true < 1.5)
    assert detect(image, SIGMA, exclude_border=3)["x"].size == 0


def test_detect_border_spots_broad_psf():
    # Where the edge cuts the kernels, positions and fluxes still come out right.
    shape, sigma = (80, 120), 4.0
    x = np.array([0.0, 40.3, 119.0, 80.0, 60.0])
    y = np.array([40.0, 0.4, 20.0, 79.0, 40.0])
    rng = np.random.default_rng(15)
    image = render(shape, x, y, sigma=sigma) + rng.normal(OFFSET, NOISE, shape)
    found = detect(image, sigma)
    to_found, to_true = match(x, y, found["x"], found["y"])
    assert np.all(to_found < 1.0) and found["x"].size == x.size
    nearest = np.argmin(np.hypot(x[:, None] - found["x"], y[:, None] - found["y"]), axis=1)
    flux = AMPLITUDE * 2 * math.pi * sigma**2
    np.testing.assert_allclose(found["flux_guess"][nearest] / flux, 1.0, atol=0.1)


def test_detect_max_sources_and_background_argument():
    image, _, _ = field((100, 100), 10, seed=11, min_separation=10.0)
    everything = detect(image, SIGMA, background=OFFSET, noise=NOISE)
    top = detect(image, SIGMA, background=OFFSET, noise=NOISE, max_sources=3)
    assert top["x"].size == 3
    np.testing.assert_allclose(top["snr"], everything["snr"][:3])
    assert detect(np.full((20, 20), np.nan), SIGMA)["x"].size == 0


@pytest.mark.parametrize("exclude_border", [False, 3])
def test_detect_in_area_finds_the_whole_image_peaks_there(exclude_border):
    # The filters then run tile by tile (64 px, with margins); masks, edges and the climb of
    # edge peaks must come out as in one whole-image search.
    image, _, _ = field((150, 230), 220, seed=13)
    mask = np.ones(image.shape, bool)
    mask[60:70, 90:140] = False
    area = np.zeros(image.shape, bool)
    area[0:30, 100:180] = True  # the top edge
    area[50:90, 200:230] = True  # the right edge
    area[55:75, 80:150] = True  # around the masked band
    kw = dict(mask=mask, background=OFFSET, noise=NOISE, exclude_border=exclude_border)
    whole = detect(image, SIGMA, **kw)
    r = np.clip(np.rint(whole["y"]).astype(int), 0, 149)
    c = np.clip(np.rint(whole["x"]).astype(int), 0, 229)
    inside = area[r, c]
    assert inside.sum() >= 15
    found = detect(image, SIGMA, area=area, **kw)
    for k in whole:
        np.testing.assert_allclose(found[k], whole[k][inside], rtol=1e-12, atol=1e-9)
    assert detect(image, SIGMA, area=np.zeros(image.shape, bool), **kw)["x"].size == 0
    with pytest.raises(ValueError, match="area shape"):
        detect(image, SIGMA, area=area[:, :10], **kw)


def test_local_maxima_are_those_of_peak_local_max():
    import skimage.feature

    from crowdfit._detect import _local_maxima

    rng = np.random.default_rng(5)
    values = rng.normal(size=(60, 80))
    values[10, 20] = values[10, 21] = 9.0  # a two-pixel plateau
    values[0, 0] = 8.0  # a corner
    values[30:40, 50:60] = -np.inf  # masked
    values = np.round(values, 1)  # more ties
    for threshold in (-1.0, 0.5, 2.0):
        np.testing.assert_array_equal(
            _local_maxima(values, threshold),
            skimage.feature.peak_local_max(values, threshold_abs=threshold, min_distance=1,
                                           exclude_border=False, num_peaks=np.inf),
        )  # fmt: skip
    assert _local_maxima(np.full((5, 5), 3.0), 1.0).shape == (0, 2)


def test_detect_resolves_close_pair():
    # 5 px apart (2.5σ): one blurred peak in the matched filter, two in the sharper map.
    rng = np.random.default_rng(12)
    image = render((40, 40), [17.5, 22.5], [20.0, 20.0]) + rng.normal(OFFSET, NOISE, (40, 40))
    assert detect(image, SIGMA)["x"].size == 2
    assert detect(image, SIGMA, sharpen=1.0)["x"].size == 1


# --- estimate_sigma ------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma, guess", [(2.0, 2.0), (2.0, 1.0), (3.0, 2.0), (1.3, 2.0)])
def test_estimate_sigma_seed_field(sigma, guess):
    image, _, _ = field((200, 400), 50, seed=13, sigma=sigma)
    found = detect(image, guess)
    assert estimate_sigma(image, found["x"], found["y"]) == pytest.approx(sigma, rel=0.05)


def test_estimate_sigma_in_a_crowd():
    # 400 spots in 200 × 400 px: the brightest detections are blends, the isolated ones are not.
    image, _, _ = field((200, 400), 400, seed=14)
    found = detect(image, SIGMA)
    assert estimate_sigma(image, found["x"], found["y"]) == pytest.approx(SIGMA, rel=0.05)
    assert estimate_sigma(
        image, found["x"], found["y"], half_width=6, background=OFFSET
    ) == pytest.approx(SIGMA, rel=0.05)
