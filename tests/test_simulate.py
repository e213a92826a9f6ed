"""Tests of the simulators: flux bookkeeping, clipping, backgrounds, noise models and bad input."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crowdfit._psf import get_psf
from crowdfit._simulate import (
    lognormal_flux,
    powerlaw_flux,
    simulate_field,
    simulate_pairs,
    simulate_spots,
)

SEED_FLUX = 100.0 * 2.0 * math.pi * 4.0

PSF_CASES = [
    ("gaussian", {}),
    ("elliptical_gaussian", {"sigma_x": 1.5, "sigma_y": 2.5}),
    ("rotated_gaussian", {"sigma_x": 1.2, "sigma_y": 3.0, "angle": 0.7}),
    ("integrated_gaussian", {}),
    ("integrated_elliptical_gaussian", {"sigma_x": 2.5, "sigma_y": 1.1}),
]


def _full_render(psf, truth, shape, names):
    """Every source rendered on the whole image, one at a time: the slow, obvious reference."""
    render = jax.jit(get_psf(psf).render)
    height, width = shape
    cols = jnp.arange(width)[None, :] + 0.0
    rows = jnp.arange(height)[:, None] + 0.0
    image = np.zeros(shape)
    for i in range(truth["x"].size):
        params = {k: float(truth[k][i]) for k in ("x", "y", "flux", *names)}
        image += np.broadcast_to(np.asarray(render(params, cols, rows)), shape)
    return image


@pytest.mark.parametrize("psf, params", PSF_CASES, ids=[c[0] for c in PSF_CASES])
def test_flux_adds_up(psf, params):
    image, truth = simulate_field(
        (96, 128), 30, psf=psf, noise="none", background=7.0, border=20, seed=1, **params
    )
    assert image.shape == (96, 128)
    total = image.sum() - 7.0 * image.size
    assert total == pytest.approx(truth["flux"].sum(), rel=1e-3)
    for name, value in params.items():
        np.testing.assert_array_equal(truth[name], value)
    assert np.all((truth["x"] >= 20) & (truth["x"] <= 127 - 20))
    assert np.all((truth["y"] >= 20) & (truth["y"] <= 95 - 20))


@pytest.mark.parametrize("psf, params", PSF_CASES[:4], ids=[c[0] for c in PSF_CASES[:4]])
def test_border_sources_clipped_like_a_full_render(psf, params):
    # Sources inside, on the edge, across the corner, and wholly outside the image.
    positions = [[20.3, 15.7], [0.0, 0.0], [-3.2, 12.0], [49.6, 39.4], [25.0, -4.5], [-40.0, 80.0]]
    shape = (40, 50)
    image, truth = simulate_field(
        shape, 6, psf=psf, noise="none", background=0.0, positions=positions, **params
    )
    names = [k for k in truth if k not in ("x", "y", "flux", "amplitude", "background")]
    reference = _full_render(psf, truth, shape, names)
    np.testing.assert_allclose(image, reference, rtol=1e-4, atol=1e-4 * reference.max())
    assert image.sum() < truth["flux"].sum() - SEED_FLUX  # the outside source adds nothing


def test_seed_scenario():
    image, truth = simulate_field((200, 400), 50, integer_positions=True, seed=4)
    assert image.shape == (200, 400)
    assert set(truth) == {"x", "y", "flux", "amplitude", "background", "sigma"}
    assert all(v.shape == (50,) for v in truth.values())
    np.testing.assert_allclose(truth["amplitude"], 100.0, rtol=1e-5)
    np.testing.assert_allclose(truth["flux"], SEED_FLUX)
    np.testing.assert_array_equal(truth["sigma"], 2.0)
    np.testing.assert_array_equal(truth["background"], 5.0)
    for key, size in (("x", 400), ("y", 200)):
        assert np.all(truth[key] == np.round(truth[key]))
        assert truth[key].min() >= 0 and truth[key].max() <= size - 1
    # Same seed without noise: the same spots, so the difference is the N(0, 5^2) noise alone.
    expected, same = simulate_field((200, 400), 50, integer_positions=True, seed=4, noise="none")
    np.testing.assert_array_equal(same["x"], truth["x"])
    residual = image - expected
    assert residual.mean() == pytest.approx(0.0, abs=0.05)
    assert residual.std() == pytest.approx(5.0, rel=0.02)
    # Each spot's central pixel holds its amplitude (plus neighbours' light) over a background of 5.
    peaks = expected[truth["y"].astype(int), truth["x"].astype(int)]
    assert np.all(peaks >= 105.0 - 1e-3)


def test_reproducible_with_seed():
    kwargs = dict(flux="lognormal", noise="poisson", read_noise=2.0, min_separation=3.0)
    a_image, a_truth = simulate_field((64, 64), 40, seed=123, **kwargs)
    b_image, b_truth = simulate_field((64, 64), 40, seed=np.random.default_rng(123), **kwargs)
    c_image, c_truth = simulate_field((64, 64), 40, seed=124, **kwargs)
    np.testing.assert_array_equal(a_image, b_image)
    for key in a_truth:
        np.testing.assert_array_equal(a_truth[key], b_truth[key])
    assert not np.array_equal(a_image, c_image)
    assert not np.array_equal(a_truth["x"], c_truth["x"])


def test_tilted_background():
    b0, slope_x, slope_y = 10.0, 0.5, -0.25
    image, truth = simulate_field((30, 40), 0, noise="none", background=(b0, slope_x, slope_y))
    assert truth["x"].shape == (0,)
    for row, col in [(0, 0), (0, 39), (29, 0), (17, 23)]:
        assert image[row, col] == pytest.approx(b0 + slope_x * col + slope_y * row)
    _, truth = simulate_field((30, 40), 5, background=(b0, slope_x, slope_y), seed=0)
    np.testing.assert_allclose(
        truth["background"], b0 + slope_x * truth["x"] + slope_y * truth["y"]
    )


def test_background_image():
    sky = np.arange(12.0).reshape(3, 4)
    image, _ = simulate_field((3, 4), 0, noise="none", background=sky)
    np.testing.assert_array_equal(image, sky)
    with pytest.raises(ValueError, match="background"):
        simulate_field((3, 4), 0, background=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="tilted"):
        simulate_field((3, 4), 0, background=(1.0, 2.0))


def test_min_separation_honoured():
    _, truth = simulate_field((64, 64), 150, min_separation=4.0, seed=3)
    xy = np.stack([truth["x"], truth["y"]], axis=1)
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    d[np.diag_indices(len(xy))] = np.inf
    assert d.min() >= 4.0
    _, truth = simulate_field((64, 64), 100, min_separation=3.0, integer_positions=True, seed=3)
    xy = np.stack([truth["x"], truth["y"]], axis=1)
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    d[np.diag_indices(len(xy))] = np.inf
    assert d.min() >= 3.0 and np.all(xy == np.round(xy))


def test_min_separation_impossible():
    with pytest.raises(ValueError, match="cannot place 500 sources"):
        simulate_field((20, 20), 500, min_separation=2.0, seed=0)
    # Possible by packing, but random placement jams first.
    with pytest.raises(ValueError, match="could only place"):
        simulate_field((30, 30), 50, min_separation=5.0, seed=0)


def test_poisson_noise_mean_and_variance_with_gain_and_offset():
    gain, offset, read_noise, sky = 2.5, 100.0, 3.0, 20.0
    image, _ = simulate_field(
        (256, 256),
        0,
        background=sky,
        noise="poisson",
        gain=gain,
        offset=offset,
        read_noise=read_noise,
        seed=5,
    )
    assert image.mean() == pytest.approx(offset + gain * sky, rel=2e-3)
    assert image.var() == pytest.approx(gain**2 * sky + read_noise**2, rel=0.03)
    # Without read noise the image is offset + gain * integer counts.
    image, _ = simulate_field(
        (64, 64), 0, background=sky, noise="poisson", gain=gain, offset=offset, read_noise=0.0
    )
    counts = (image - offset) / gain
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)


def test_poisson_noise_follows_the_sources():
    kwargs = dict(background=2.0, border=10, seed=9)
    expected, truth = simulate_field((128, 128), 30, noise="none", **kwargs)
    image, same = simulate_field((128, 128), 30, noise="poisson", **kwargs)
    np.testing.assert_array_equal(same["x"], truth["x"])
    # Pure Poisson by default: integer counts, and residual / sqrt(expected) is about N(0, 1).
    assert np.all(image == np.round(image))
    z = (image - expected) / np.sqrt(expected)
    assert abs(z.mean()) < 0.03 and z.std() == pytest.approx(1.0, rel=0.03)


def test_gaussian_noise_and_none():
    image, _ = simulate_field((128, 128), 0, background=3.0, read_noise=2.0, offset=50.0, seed=1)
    assert image.mean() == pytest.approx(53.0, abs=0.05)
    assert image.std() == pytest.approx(2.0, rel=0.03)
    image, _ = simulate_field((8, 8), 0, background=3.0, noise="none", read_noise=2.0, gain=2.0)
    np.testing.assert_array_equal(image, 6.0)


def test_flux_forms():
    n = 2000
    _, t = simulate_field((64, 64), 3, flux=[1.0, 2.0, 3.0], seed=0)
    np.testing.assert_array_equal(t["flux"], [1.0, 2.0, 3.0])
    _, t = simulate_field((64, 64), 4, flux=lambda rng, k: np.full(k, 42.0), seed=0)
    np.testing.assert_array_equal(t["flux"], 42.0)
    _, t = simulate_field((64, 64), n, flux="lognormal", seed=0)
    assert np.median(t["flux"]) == pytest.approx(1000.0, rel=0.05)
    assert np.std(np.log(t["flux"])) == pytest.approx(0.5, rel=0.05)
    _, t = simulate_field((64, 64), n, flux="powerlaw", seed=0)
    assert t["flux"].min() >= 1000.0 and t["flux"].max() <= 1e6
    # dN/dF ∝ F^-2.5: the fraction below 2 f_min is 1 - 2^-1.5.
    assert np.mean(t["flux"] < 2000.0) == pytest.approx(1 - 2**-1.5, abs=0.03)
    draw = powerlaw_flux(10.0, 20.0, index=1.0)(np.random.default_rng(0), n)
    assert np.mean(draw < math.sqrt(200.0)) == pytest.approx(0.5, abs=0.03)
    assert lognormal_flux(5.0, 0.0)(np.random.default_rng(0), 3).tolist() == [5.0, 5.0, 5.0]


def test_user_psf_function_matches_builtin():
    def my_gaussian(p, x, y):
        s = p["sigma"]
        r2 = (x - p["x"]) ** 2 + (y - p["y"]) ** 2
        return p["flux"] / (2 * jnp.pi * s * s) * jnp.exp(-0.5 * r2 / s**2)

    kwargs = dict(noise="none", sigma=1.7, seed=11)
    image, truth = simulate_field((50, 60), 20, psf=my_gaussian, **kwargs)
    reference, ref_truth = simulate_field((50, 60), 20, psf="gaussian", **kwargs)
    np.testing.assert_allclose(image, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(truth["amplitude"], ref_truth["amplitude"], rtol=1e-5)


def test_per_source_shape_parameters_and_amplitude():
    sigma = np.linspace(1.0, 3.0, 10)
    _, truth = simulate_field((64, 64), 10, sigma=sigma, flux=1000.0, seed=0)
    np.testing.assert_array_equal(truth["sigma"], sigma)
    np.testing.assert_allclose(truth["amplitude"], 1000.0 / (2 * np.pi * sigma**2), rtol=1e-5)
    _, truth = simulate_field(
        (64, 64), 4, psf="rotated_gaussian", sigma_x=1.0, sigma_y=2.0, angle=0.3, flux=10.0
    )
    np.testing.assert_allclose(truth["amplitude"], 10.0 / (2 * np.pi * 2.0), rtol=1e-5)
    np.testing.assert_array_equal(truth["angle"], 0.3)


def test_ten_thousand_sources_fast():
    simulate_field((512, 512), 10_000, seed=0)  # compile
    start = time.perf_counter()
    image, truth = simulate_field((512, 512), 10_000, seed=1, noise="none", background=0.0)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    assert truth["x"].shape == (10_000,)
    # Light lost over the border is a small fraction for sigma = 2 in 512^2.
    assert 0.98 * truth["flux"].sum() < image.sum() < truth["flux"].sum()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sigma=-1.0), "sigma must be > 0"),
        (dict(sigma=0.0), "sigma must be > 0"),
        (dict(n_sources=-1), "n_sources must be >= 0"),
        (dict(n_sources=2.5), "n_sources must be an integer"),
        (dict(noise="salt"), "unknown noise 'salt'"),
        (dict(psf="moffat"), "unknown psf 'moffat'"),
        (dict(flux="uniform"), "unknown flux distribution"),
        (dict(flux=[1.0, 2.0]), r"flux must be a number or have shape \(5,\)"),
        (dict(flux=-3.0), "fluxes must be finite and >= 0"),
        (dict(psf="elliptical_gaussian", sigma_x=-2.0), "sigma_x must be > 0"),
        (dict(psf="gaussian", sigmax=2.0), "takes shape parameters"),
        (dict(read_noise=-1.0), "read_noise must be >= 0"),
        (dict(gain=0.0), "gain must be > 0"),
        (dict(shape=(0, 10)), "shape must be positive"),
        (dict(border=60.0), "leaves no room"),
        (dict(positions=np.zeros((4, 2))), r"positions must have shape"),
        (dict(noise="poisson", background=-1.0), "Poisson noise needs expected counts >= 0"),
        (dict(min_separation=-1.0), "min_separation must be > 0"),
    ],
)
def test_bad_inputs_raise(kwargs, message):
    args = {"shape": (100, 100), "n_sources": 5, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        simulate_field(**args)


def test_bad_sigma_raises_even_without_sources():
    with pytest.raises(ValueError, match="sigma must be > 0"):
        simulate_field((10, 10), 0, sigma=-2.0)


def test_spots():
    windows, truth = simulate_spots(2000, jitter=0.5, seed=0)
    assert windows.shape == (2000, 7, 7)
    assert set(truth) >= {"x", "y", "flux", "amplitude", "background", "sigma"}
    assert all(v.shape == (2000,) for v in truth.values())
    assert np.all(np.abs(truth["x"] - 3.0) <= 0.5) and np.all(np.abs(truth["y"] - 3.0) <= 0.5)
    assert truth["x"].std() == pytest.approx(1 / math.sqrt(12), rel=0.1)
    # Poisson counts: integers, and on average the expected image (background + most of the light).
    assert np.all(windows == np.round(windows))
    mean_total = windows.sum(axis=(1, 2)).mean()
    assert 49 * 10 + 0.9 * 1000 < mean_total < 49 * 10 + 1000
    # Noise-free, in a large window, each spot holds its flux.
    clean, truth = simulate_spots(
        5, shape=(31, 31), noise="none", background=0.0, flux=[1, 2, 3, 4, 5], seed=1
    )
    np.testing.assert_allclose(clean.sum(axis=(1, 2)), truth["flux"], rtol=1e-4)
    again, _ = simulate_spots(
        5, shape=(31, 31), noise="none", background=0.0, flux=[1, 2, 3, 4, 5], seed=1
    )
    np.testing.assert_array_equal(clean, again)


def test_spots_bad_inputs():
    with pytest.raises(ValueError, match="n must be >= 0"):
        simulate_spots(-1)
    with pytest.raises(ValueError, match="jitter"):
        simulate_spots(3, jitter=-0.1)
    with pytest.raises(ValueError, match="background"):
        simulate_spots(3, background=[1.0, 2.0])


def test_pairs():
    separation = np.array([0.5, 1.0, 2.0, 4.0])
    windows, truth = simulate_pairs(
        4, separation, noise="none", background=0.0, flux=[[100, 200]] * 4, seed=2
    )
    assert windows.shape == (4, 16, 16)
    assert all(v.shape == (4, 2) for v in truth.values())
    d = np.hypot(truth["x"][:, 1] - truth["x"][:, 0], truth["y"][:, 1] - truth["y"][:, 0])
    np.testing.assert_allclose(d, separation)
    np.testing.assert_allclose(truth["x"].mean(axis=1), 7.5)
    np.testing.assert_allclose(truth["y"].mean(axis=1), 7.5)
    np.testing.assert_allclose(windows.sum(axis=(1, 2)), 300.0, rtol=1e-4)
    # Each window is the sum of its two sources.
    one, _ = simulate_spots(
        1, shape=(16, 16), noise="none", background=0.0, flux=100.0, jitter=0.0, seed=0
    )
    _, t1 = simulate_pairs(1, 0.0, noise="none", background=0.0, flux=100.0, seed=0)
    w1, _ = simulate_pairs(1, 0.0, noise="none", background=0.0, flux=100.0, seed=0)
    np.testing.assert_allclose(w1[0], 2 * one[0], rtol=1e-5, atol=1e-6)
    assert t1["x"].shape == (1, 2)


def test_pairs_noise_and_jitter():
    windows, truth = simulate_pairs(500, 3.0, jitter=1.0, flux="lognormal", seed=4)
    assert np.all(windows == np.round(windows))  # Poisson by default
    mid_x = truth["x"].mean(axis=1)
    assert np.all(np.abs(mid_x - 7.5) <= 1.0) and mid_x.std() > 0.3
    assert truth["flux"].shape == (500, 2) and np.unique(truth["flux"]).size == 1000
    with pytest.raises(ValueError, match="separation"):
        simulate_pairs(2, -1.0)
    with pytest.raises(ValueError, match="separation"):
        simulate_pairs(2, [1.0, 2.0, 3.0])
    _, truth = simulate_pairs(2, 1.0, sigma=[1.0, 2.0], seed=0)
    np.testing.assert_array_equal(truth["sigma"], [[1.0, 1.0], [2.0, 2.0]])
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        simulate_pairs(2, 1.0, flux=[1.0, 2.0, 3.0])
