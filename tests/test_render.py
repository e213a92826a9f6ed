"""Tests of the tiled renderer of separable PSFs (`crowdfit._render`)."""

import math

import numpy as np
import pytest

import crowdfit
from crowdfit import _render
from crowdfit._psf import get_psf
from crowdfit._simulate import _render_field


@pytest.mark.parametrize(
    "name",
    ["gaussian", "integrated_gaussian", "elliptical_gaussian", "integrated_elliptical_gaussian"],
)
@pytest.mark.parametrize(
    "sigma, reach, tiles_per_batch", [(1.5, 5, 256), (1.5, 1.2, 3), (7.0, 5, 2), (9.0, 1.2, 2)]
)
def test_tiled_render_matches_the_stamps(monkeypatch, name, sigma, reach, tiles_per_batch):
    # Sources inside, on and beyond the edges (some whose stamps miss the image), several bands
    # of tiles, stamps wider than a tile (σ = 7: 2r + 1 = 77 > 64) and stamps cut at 1.2σ, whose
    # edges hold much of the light (a row or column lost at a tile's edge shows).
    monkeypatch.setattr(_render, "_TILES_PER_BATCH", tiles_per_batch)
    rng = np.random.default_rng(0)
    psf, (h, w), n = get_psf(name), (150, 230), 400
    x, y = rng.uniform(-60, w + 60, n), rng.uniform(-60, h + 60, n)
    flux = rng.uniform(10, 1000, n)
    sx, sy = sigma * rng.uniform(0.8, 1.2, n), sigma * rng.uniform(0.8, 1.2, n)
    radius = math.ceil(reach * max(sx.max(), sy.max()) + (2 if reach > 2 else 0))
    if "sigma" in psf.params:
        shape = {"sigma": np.sqrt(sx * sy)}
        sx = sy = shape["sigma"]
    else:
        shape = {"sigma_x": sx, "sigma_y": sy}
    stamps = _render_field(psf, x, y, flux, shape, h, w, radius)
    tiled = _render.render_separable(psf.profile, x, y, flux, sx, sy, (h, w), radius)
    # (the stamps are rendered in float32 unless float64 is on)
    np.testing.assert_allclose(tiled, stamps, rtol=1e-5, atol=1e-5 * stamps.max())
    assert _render.render_separable(psf.profile, x[:0], y[:0], flux[:0], 1.0, 1.0, (h, w),
                                    radius).shape == (h, w)  # fmt: skip


def test_model_image_of_a_profile_of_ones_own_is_tiled():
    # A separable PSF of one's own goes the tiled way too, its profile evaluated by JAX.
    import jax.numpy as jnp

    box = crowdfit.PSF(
        "box", ("x", "y", "flux", "sigma"),
        lambda p, x, y: p["flux"] * (jnp.abs(x - p["x"]) <= p["sigma"]) * (jnp.abs(y - p["y"]) <= p["sigma"]) / (2 * p["sigma"] + 1) ** 2,  # noqa: E501
        lambda d, s: (jnp.abs(d) <= s) / (2 * s + 1),
    )  # fmt: skip
    cat = {"x": np.array([5.0, 20.0]), "y": np.array([6.0, 3.0]), "flux": np.array([9.0, 18.0]),
           "sigma_x": np.ones(2), "sigma_y": np.ones(2)}  # fmt: skip
    image = crowdfit.model_image(cat, (12, 24), psf=box)
    expected = np.zeros((12, 24))
    expected[5:8, 4:7] = 1.0
    expected[2:5, 19:22] = 2.0
    np.testing.assert_allclose(image, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["gaussian", "integrated_elliptical_gaussian"])
def test_windows_drawn_in_numpy_match_the_psf_drawn_by_jax(name):
    # The built-in profiles are drawn in numpy; the same sources as a PSF without a profile
    # (so drawn by JAX from its `render`) give the same windows.
    psf = get_psf(name)
    rng = np.random.default_rng(3)
    b, k, size = 5, 3, 12
    params = {"x": rng.uniform(-2, 14, (b, k)), "y": rng.uniform(0, 11, (b, k)),
              "flux": rng.uniform(10, 500, (b, k))}  # fmt: skip
    if "sigma" in psf.params:
        params["sigma"] = 1.7
    else:
        params["sigma_x"], params["sigma_y"] = rng.uniform(1, 3, (b, k)), 2.2
    numpy_drawn = _render.render_windows(psf, params, size)
    as_jax = crowdfit.PSF(name + "_by_jax", psf.params, psf.render)
    jax_drawn = _render.render_windows(as_jax, params, size)
    assert numpy_drawn.shape == (b, size, size)
    np.testing.assert_allclose(numpy_drawn, jax_drawn, rtol=1e-4, atol=1e-4 * params["flux"].max())


def test_model_image_names_the_missing_columns():
    with pytest.raises(ValueError, match=r"no \['flux', 'sigma_x', 'sigma_y'\] column"):
        crowdfit.model_image({"x": [1.0], "y": [2.0]}, (16, 16))
