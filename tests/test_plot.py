"""`plot_catalog`: the sources drawn where the catalog puts them, and the residual shown."""

import numpy as np
import pytest

import crowdfit

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import EllipseCollection  # noqa: E402


@pytest.fixture(scope="module")
def fitted():
    image, truth = crowdfit.simulate_field((64, 64), 10, seed=1)  # (fit_image's doctest field)
    return image, truth, crowdfit.fit_image(image, sigma=2.0)


def _ellipses(ax):
    (coll,) = [c for c in ax.collections if isinstance(c, EllipseCollection)]
    return coll


def test_sources_and_residual_are_drawn(fitted):
    image, truth, cat = fitted
    fig = crowdfit.plot_catalog(image, cat, truth=truth)
    img_ax, res_ax, _ = fig.axes
    coll = _ellipses(img_ax)
    np.testing.assert_allclose(coll.get_offsets(), np.column_stack([cat["x"], cat["y"]]))
    np.testing.assert_allclose(coll._widths, 2 * cat["sigma_x"])  # (half-widths: 2σ radius)
    assert f"{len(cat)} sources" in img_ax.get_title() and "10 true" in img_ax.get_title()
    (line,) = img_ax.get_lines()  # the true sources' crosses
    np.testing.assert_allclose(line.get_xdata(), truth["x"])
    shown = res_ax.get_images()[0].get_array()
    res = crowdfit.residual_image(image, cat)
    assert np.corrcoef(np.ravel(shown), res.ravel())[0, 1] > 0.999  # (scaled by the noise)
    assert 0.7 < np.std(shown) < 1.5  # in units of the noise: the model explains the data
    plt.close(fig)


def test_options_and_bad_input(fitted):
    image, _, cat = fitted
    fig = crowdfit.plot_catalog(image, cat, residual=False)
    assert len(fig.axes) == 1
    plt.close(fig)
    tilted = crowdfit.Catalog({**cat.data, "angle": np.full(len(cat), 0.5)}, cat.meta)
    fig, axes = plt.subplots(1, 2)
    assert crowdfit.plot_catalog(image, tilted, axes=axes) is fig
    np.testing.assert_allclose(_ellipses(axes[0])._angles, 0.5)  # (radians, as drawn)
    plt.close(fig)
    with pytest.raises(ValueError, match="expected 2 axes"):
        crowdfit.plot_catalog(image, cat, axes=axes[0])
    with pytest.raises(ValueError, match="expected a 2-D image"):
        crowdfit.plot_catalog(image[0], cat)
    with pytest.raises(ValueError, match=r"no \['sigma_x', 'sigma_y'\] column"):
        crowdfit.plot_catalog(image, {"x": cat["x"], "y": cat["y"]}, residual=False)


def test_traces_are_drawn_brightest_first():
    rng = np.random.default_rng(0)
    flux = np.array([1.0, 5.0, 3.0])[:, None] * 100 + rng.normal(0, 5, (3, 20))
    status = np.zeros((3, 20), int)
    status[1, 4] = 1  # one frame of spot 1 did not converge
    cat = crowdfit.Catalog({"x": np.array([1.0, 2.0, 3.0]), "y": np.array([4.0, 5.0, 6.0])})
    zeros = np.zeros((3, 20))
    t = crowdfit.Traces(flux=flux, flux_err=zeros + 5.0, background=zeros, status=status,
                        x=zeros, y=zeros, catalog=cat)  # fmt: skip
    fig = crowdfit.plot_traces(t, max_spots=2)
    first, second = [a for a in fig.axes if a.get_visible()]
    assert first.get_title() == "spot 1 (x 2.0, y 5.0)" and second.get_title().startswith("spot 2")
    np.testing.assert_allclose(first.get_lines()[0].get_ydata(), flux[1])
    (marked,) = [ln for ln in first.get_lines() if ln.get_marker() == "o"]
    np.testing.assert_allclose(marked.get_xdata(), [4])  # the unconverged frame
    plt.close(fig)
    with pytest.raises(ValueError, match="spots must be indices of the 3 spots"):
        crowdfit.plot_traces(t, spots=[3])
    with pytest.raises(ValueError, match="expected 2 axes"):
        crowdfit.plot_traces(t, spots=[0, 1], ax=plt.subplots(1, 3)[1])
    plt.close("all")
