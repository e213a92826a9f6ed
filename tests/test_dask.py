"""crowdfit.dask: tiles and chunks give fit_image's and fit_movie's results, also on a cluster."""

import numpy as np
import pytest
from test_movie import SIGMA, TILT, simulate_movie, simulate_tilted_movie

import crowdfit
from crowdfit._movie import fit_movie

da = pytest.importorskip("dask.array")
cdask = pytest.importorskip("crowdfit.dask")

TRACE_FIELDS = ("flux", "flux_err", "background", "status", "x", "y")


@pytest.fixture(scope="module")
def movie():
    return simulate_movie()


@pytest.fixture(scope="module")
def traces(movie):
    return fit_movie(movie[0], sigma=SIGMA)


def assert_same_traces(a, b):
    for name in TRACE_FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.catalog.columns == b.catalog.columns
    for c in a.catalog.columns:
        np.testing.assert_array_equal(a.catalog[c], b.catalog[c], err_msg=c)
    assert a.meta == b.meta


def test_fit_movie_dask_equals_fit_movie(movie, traces):
    frames = da.from_array(movie[0], chunks=(30, 32, 32))  # rechunked to whole frames inside
    assert_same_traces(cdask.fit_movie_dask(frames, sigma=SIGMA), traces)
    # The first frames' projection, and a catalog given: the same path as in memory.
    first = fit_movie(movie[0], sigma=SIGMA, projection=20)
    assert_same_traces(cdask.fit_movie_dask(frames, sigma=SIGMA, projection=20), first)
    given = cdask.fit_movie_dask(movie[0], catalog=traces.catalog)  # numpy in, wrapped lazily
    np.testing.assert_array_equal(given.flux, traces.flux)


def test_fit_image_dask_one_tile_equals_fit_image(movie):
    image = movie[0].mean(0)
    expected = crowdfit.fit_image(image, sigma=SIGMA)
    got = cdask.fit_image_dask(da.from_array(image, chunks=(32, 32)), tile=64, sigma=SIGMA)
    assert got.columns == expected.columns and len(got) == len(expected) > 10
    for c in expected.columns:
        np.testing.assert_array_equal(got[c], expected[c], err_msg=c)
    np.testing.assert_array_equal(got.meta["background_image"], expected.meta["background_image"])


def test_fit_image_dask_tiles_match_fit_image(movie):
    # Four tiles with seams through the field (pairs 4 px from a seam). Tiles of 32 with a halo
    # of 24 make the regions' shapes of the whole image's fit: no new programs to compile.
    image = movie[0].mean(0)
    expected = crowdfit.fit_image(image, sigma=SIGMA)
    got = cdask.fit_image_dask(image, tile=32, halo=24, sigma=SIGMA)
    assert got.meta["tiles"] == 4 and got.meta["shape"] == (64, 64)
    assert "background_image" not in got.meta
    # Every source once: no two reported sources at the same place.
    d2 = (got["x"][:, None] - got["x"]) ** 2 + (got["y"][:, None] - got["y"]) ** 2
    assert np.min(d2 + np.eye(len(got)) * 1e9) > 0.5**2
    d2 = (expected["x"][:, None] - got["x"]) ** 2 + (expected["y"][:, None] - got["y"]) ** 2
    j = d2.argmin(1)
    same = (np.sqrt(d2.min(1)) < 0.05) & (np.abs(got["flux"][j] / expected["flux"] - 1) < 0.005)
    assert same.mean() >= 0.98, same.mean()
    assert len(got) == len(expected) > 10
    near_seam = (np.abs(got["x"] - 31.5) < 8) | (np.abs(got["y"] - 31.5) < 8)
    assert near_seam.sum() >= 4


def test_fit_image_dask_reports_spikes_once(movie):
    # Tiles mask the spikes of their tile and halo; the caller warns once, for the cores.
    image = movie[0].mean(0).copy()
    sky = np.median(image)
    box = np.lib.stride_tricks.sliding_window_view(np.pad(image, 2, mode="edge"), (5, 5))
    dark = np.argwhere(box.max((2, 3)) < sky + 20)
    rng = np.random.default_rng(0)
    planted = {tuple(map(int, rc)) for rc in dark[rng.choice(len(dark), 3, replace=False)]}
    for rc in planted:
        image[rc] += 1000.0
    with pytest.warns(UserWarning) as record:
        got = cdask.fit_image_dask(image, tile=32, halo=24, sigma=SIGMA)
    messages = [str(w.message) for w in record]
    assert sum("sharper than the PSF" in m for m in messages) == 1
    assert "3 pixel(s) sharper than the PSF" in messages[0]
    assert {tuple(map(int, rc)) for rc in got.meta["spikes"]} == planted
    assert got.meta["saturation"] is None and got.meta["n_saturated"] == 0


def test_fit_image_dask_rotated_psf_on_tilted_spots():
    # Four tiles of test_movie's tilted spots, fitted as test_elongation's rotated fit is
    # (rounds=0, split=False; 32² windows: few programs to compile). Each tile measures the
    # shape on its own spots; the catalog's is their median.
    frames, xy, flux = simulate_tilted_movie()
    image = frames[0]
    kw = dict(psf="rotated_gaussian", rounds=0, split=False)
    got = cdask.fit_image_dask(image, tile=64, halo=24, **kw)
    expected = crowdfit.fit_image(image, **kw)
    assert got.meta["tiles"] == 4 and got.meta["psf"] == "rotated_gaussian"
    sx, sy, angle = got.meta["sigma"]
    assert sx == pytest.approx(TILT[0], rel=0.03) and sy == pytest.approx(TILT[1], rel=0.03)
    assert angle == pytest.approx(TILT[2], abs=0.05)
    assert got.columns == expected.columns and got.columns[-1] == "angle"
    assert np.allclose(got["angle"], angle, atol=0.05)  # (each tile's own measure)
    m = crowdfit.match({"x": xy[:, 0], "y": xy[:, 1], "flux": flux[:, 0]}, got, 1.0)
    assert m.recall >= 0.95 and m.fp <= 1
    near_seam = (np.abs(got["x"] - 63.5) < 8) | (np.abs(got["y"] - 63.5) < 8)
    assert near_seam.sum() >= 4
    # The same sources as fit_image's, at the same places and fluxes.
    assert abs(len(got) - len(expected)) <= 2
    same = crowdfit.match(expected, got, 0.1)
    assert same.n_matched >= len(expected) - 2
    ratio = got["flux"][same.found_index] / expected["flux"][same.truth_index]
    assert np.median(np.abs(ratio - 1)) < 0.005
    # The shape given, as an array: every tile holds it (joining the tiles raised on an array).
    held = cdask.fit_image_dask(image, tile=64, halo=24, sigma=np.array(TILT), **kw)
    assert held.meta["sigma"] == TILT and np.allclose(held["angle"], TILT[2])
    assert crowdfit.match({"x": xy[:, 0], "y": xy[:, 1]}, held, 1.0).recall >= 0.95


def test_bad_input(movie):
    with pytest.raises(ValueError, match="2-D"):
        cdask.fit_image_dask(movie[0][:2])
    with pytest.raises(ValueError, match="tile"):
        cdask.fit_image_dask(movie[0][0], tile=0)
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        cdask.fit_movie_dask(da.from_array(movie[0][0]))
    with pytest.raises(ValueError, match="projection"):
        cdask.fit_movie_dask(movie[0], projection="median")


def test_missing_dask_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "dask", None)
    with pytest.raises(ImportError, match=r"crowdfit\[dask\]"):
        cdask.fit_image_dask(np.zeros((8, 8)))


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = distributed.Client(cluster)
    try:
        client.wait_for_workers(2, timeout=120)  # workers import JAX: slow on a busy machine
        yield client
    finally:
        client.close()
        cluster.close()


def test_distributed_cluster(movie, traces, client):
    # Two worker processes, one chunk of 64 frames each at a time, each compiling its own
    # programs: the same bits as in memory.
    frames = da.from_array(movie[0][:128], chunks=(64, 64, 64))
    got = cdask.fit_movie_dask(frames, catalog=traces.catalog)
    np.testing.assert_array_equal(got.flux, traces.flux[:, :128])
    np.testing.assert_array_equal(got.flux_err, traces.flux_err[:, :128])
    workers = client.run(lambda: __import__("jax").default_backend())
    assert len(workers) == 2


def test_fit_image_dask_warns_once_of_elongated_spots():
    image, _ = crowdfit.simulate_field(
        (128, 128), 24, psf="elliptical_gaussian", sigma_x=1.6, sigma_y=2.6, flux=2613.0, seed=2
    )
    with pytest.warns(UserWarning) as record:
        got = cdask.fit_image_dask(image, tile=64, halo=24, sigma=2.0, rounds=0)
    assert sum("the spots are elongated" in str(w.message) for w in record) == 1
    assert got.meta["elongation"]["ratio"] > 1.4
