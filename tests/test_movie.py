"""fit_movie: calibrated traces of overlapping blinking spots, no leaks, memmaps, CLI, bad input."""

import math

import numpy as np
import pytest

import crowdfit
from crowdfit import _fit
from crowdfit._movie import fit_movie

SIGMA = 1.5
SHAPE = (64, 64)
N_FRAMES = 200
N_PAIRS = 4


def blinking(rng, n, t, on=2000.0, p_off=0.08, p_on=0.15, bleach=150.0):
    """`(n, t)` telegraph on/off intensities that bleach at an exponential time."""
    state = np.ones(n, bool)
    life = rng.exponential(bleach, n)
    out = np.zeros((n, t))
    for i in range(t):
        flip = rng.random(n)
        state = np.where(state, flip > p_off, flip < p_on)
        out[:, i] = on * state * (i < life)
    return out


def simulate_movie(seed=0, t=N_FRAMES, background=20.0, noise=5.0):
    """A smFRET-like movie: `N_PAIRS` pairs 1.5σ apart plus isolated spots, all blinking.

    Returns `(frames (T, H, W), xy (N, 2), flux (N, T))`; spots `2i` and `2i + 1` are pair `i`.
    Rendered with numpy (point-sampled Gaussians), independently of crowdfit.
    """
    rng = np.random.default_rng(seed)
    pairs = []
    for c in np.array([[12, 12], [12, 36], [12, 52], [36, 12]], float):
        a = rng.uniform(0, np.pi)
        d = 0.75 * SIGMA * np.array([np.cos(a), np.sin(a)])
        pairs += [c + d + rng.uniform(-0.5, 0.5, 2), c - d]
    singles = np.array([[36, 36], [52, 52], [52, 12], [52, 30], [36, 52], [24, 24], [24, 46]])
    xy = np.vstack([pairs, singles + rng.uniform(-0.5, 0.5, singles.shape)])
    flux = blinking(rng, len(xy), t)
    h, w = SHAPE
    yy, xx = np.mgrid[:h, :w]
    d2 = (xx[None] - xy[:, 0, None, None]) ** 2 + (yy[None] - xy[:, 1, None, None]) ** 2
    psf = np.exp(-d2 / (2 * SIGMA**2)) / (2 * np.pi * SIGMA**2)
    frames = background + np.einsum("nt,nhw->thw", flux, psf) + rng.normal(0, noise, (t, h, w))
    return frames, xy, flux


# Tilted elliptical spots: isolated (the regions' shapes of test_elongation's rotated fit,
# 32² windows: few programs to compile), each a different flux in each frame.
TILT = (1.6, 2.6, 0.6)  # sigma_x, sigma_y, angle (rad)
TILT_SHAPE = (128, 128)


def simulate_tilted_movie(n=30, t=3, seed=4):
    """`(frames (t, H, W), xy (n, 2), flux (n, t))`: static spots of the rotated PSF `TILT`,
    amplitude 60 to 140 on a background of 5 with noise 5 (crowdfit.simulate_field)."""
    rng = np.random.default_rng(seed)
    sx, sy, angle = TILT
    kw = dict(psf="rotated_gaussian", sigma_x=sx, sigma_y=sy, angle=angle)
    _, truth = crowdfit.simulate_field(
        TILT_SHAPE, n, min_separation=16, border=3, noise="none", seed=rng, **kw
    )
    xy = np.column_stack([truth["x"], truth["y"]])
    flux = 100 * 2 * math.pi * sx * sy * rng.uniform(0.6, 1.4, (n, t))
    frames = [
        crowdfit.simulate_field(TILT_SHAPE, n, positions=xy, flux=f, seed=rng, **kw)[0]
        for f in flux.T
    ]
    return np.stack(frames), xy, flux


def aperture_traces(frames, xy, r_aperture=2 * SIGMA, r_inner=3 * SIGMA, r_outer=5 * SIGMA):
    """The usual per-spot method: aperture sum minus the annulus median times the aperture area."""
    t, h, w = frames.shape
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((len(xy), t))
    for i, (x, y) in enumerate(xy):
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        ap = d2 <= r_aperture**2
        annulus = (d2 >= r_inner**2) & (d2 <= r_outer**2)
        out[i] = frames[:, ap].sum(1) - np.median(frames[:, annulus], axis=1) * ap.sum()
    return out


def nearest(catalog, xy):
    """Index of the catalog row nearest each true position, and the distances."""
    d2 = (catalog["x"][:, None] - xy[:, 0]) ** 2 + (catalog["y"][:, None] - xy[:, 1]) ** 2
    return d2.argmin(0), np.sqrt(d2.min(0))


@pytest.fixture(scope="module")
def movie():
    return simulate_movie()


@pytest.fixture(scope="module")
def traces(movie):
    frames, _, _ = movie
    return fit_movie(frames, sigma=SIGMA)


def test_traces_follow_truth_within_errors(movie, traces):
    frames, xy, flux = movie
    assert traces.flux.shape == traces.flux_err.shape == (len(xy), N_FRAMES)
    idx, dist = nearest(traces.catalog, xy)
    assert len(traces) == len(xy) and np.all(dist < 0.1)
    assert np.all(traces.status == 0)
    pull = (traces.flux[idx] - flux) / traces.flux_err[idx]
    pairs = pull[: 2 * N_PAIRS]
    assert 0.8 <= pairs.std() <= 1.2, pairs.std()
    assert abs(pairs.mean()) < 0.1
    # Dark frames scatter about zero: the flux is not forced positive.
    dark = flux == 0
    assert np.mean(traces.flux[idx][dark] < 0) > 0.3
    # Background and positions are per spot and frame.
    assert np.allclose(np.median(traces.background), 20.0, atol=0.5)
    assert np.array_equal(traces.x, np.repeat(traces.catalog["x"][:, None], N_FRAMES, 1))


def test_errors_calibrated_at_true_positions(movie, traces):
    # Held at the true positions, only photon noise remains: pulls are N(0, 1).
    frames, xy, flux = movie
    cat = {"x": xy[:, 0], "y": xy[:, 1], "flux": flux.mean(1)}
    res = fit_movie(frames, sigma=SIGMA, catalog=cat)
    pull = (res.flux - flux) / res.flux_err
    assert 0.9 <= pull.std() <= 1.1, pull.std()
    assert abs(pull.mean()) < 0.05
    assert isinstance(res.catalog, crowdfit.Catalog) and len(res.catalog) == len(xy)


def test_blinking_does_not_leak_into_neighbour(movie, traces):
    frames, xy, flux = movie
    idx, _ = nearest(traces.catalog, xy)
    joint = traces.flux[idx]
    naive = aperture_traces(frames, xy)
    pair = np.arange(2 * N_PAIRS)
    other = pair ^ 1  # the other spot of the pair

    def leak(measured):
        # Fraction of the neighbour's light that shows up in a spot's trace, per spot, and the
        # correlation of all residuals with the neighbours' intensities.
        res = measured[pair] - flux[pair]
        frac = [
            np.cov(r, flux[o])[0, 1] / np.var(flux[o], ddof=1)
            for r, o in zip(res, other, strict=True)
        ]
        corr = np.corrcoef(res.ravel(), flux[other].ravel())[0, 1]
        return np.array(frac), corr

    frac_naive, corr_naive = leak(naive)
    frac_joint, corr_joint = leak(joint)
    assert corr_naive > 0.8 and np.all(frac_naive > 0.3)
    assert abs(corr_joint) < 0.15 and np.all(np.abs(frac_joint) < 0.05)


def test_memmap_read_in_chunks(movie, traces, tmp_path):
    frames, _, _ = movie
    path = tmp_path / "movie.npy"
    np.save(path, frames)
    mm = crowdfit.read_image(path)
    assert isinstance(mm, np.memmap)

    class Recorder:
        """A memmap that records how many frames each read takes."""

        def __init__(self, a):
            self.a, self.shape, self.dtype, self.reads = a, a.shape, a.dtype, []

        def __getitem__(self, key):
            out = self.a[key]
            self.reads.append(out.shape[0])
            return out

    rec = Recorder(mm)
    res = fit_movie(rec, sigma=SIGMA)
    assert max(rec.reads) <= 64 < N_FRAMES
    for name in ("flux", "flux_err", "background", "status"):
        np.testing.assert_array_equal(getattr(res, name), getattr(traces, name))


def test_chunking_and_no_recompile(movie, traces):
    frames, _, _ = movie
    before = _fit._TRACE_COUNT[0]
    res = fit_movie(frames[:100], sigma=SIGMA, catalog=traces.catalog)
    assert _fit._TRACE_COUNT[0] == before  # 100 frames: chunks of 64, the last one padded
    np.testing.assert_allclose(res.flux, traces.flux[:, :100], rtol=1e-4, atol=1e-2)


def test_long_format(traces, tmp_path):
    df = traces.to_pandas()
    n, t = traces.flux.shape
    assert list(df.columns) == ["spot", "frame", "flux", "flux_err", "background", "status"]
    assert len(df) == n * t
    row = df[(df.spot == 3) & (df.frame == 17)].iloc[0]
    assert row.flux == traces.flux[3, 17] and row.status == traces.status[3, 17]
    path = tmp_path / "traces.csv"
    traces.to_csv(path)
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    with open(path) as f:
        assert f.readline().strip() == "spot,frame,flux,flux_err,background,status"
    np.testing.assert_allclose(table[:, 2], traces.flux.ravel(), rtol=1e-8)


def test_cli_traces(movie, traces, tmp_path, capsys):
    tifffile = pytest.importorskip("tifffile")
    from crowdfit._cli import main

    frames, _, _ = movie
    tif = tmp_path / "movie.tif"
    tifffile.imwrite(tif, frames.astype(np.float32))
    out = tmp_path / "traces.csv"
    assert main(["traces", str(tif), "--out", str(out), "--sigma", str(SIGMA), "--quiet"]) == 0
    assert f"{len(traces)} spots" in capsys.readouterr().out
    table = np.loadtxt(out, delimiter=",", skiprows=1)
    assert table.shape == (len(traces) * N_FRAMES, 6)
    flux = table[:, 2].reshape(len(traces), N_FRAMES)
    # float32 pixels: the same spots, the same traces to well within their errors.
    assert np.all(np.abs(flux - traces.flux) < 0.05 * traces.flux_err)
    assert main(["traces", str(tmp_path / "missing.tif")]) == 2


def test_non_finite_pixels_masked(movie, traces):
    frames, _, _ = movie
    bad = frames.copy()
    bad[:, 5, 5] = np.nan  # dead in every frame, far from any spot
    bad[10, 12, 12] = np.inf  # one hot pixel on a spot
    with pytest.warns(UserWarning, match="201 non-finite"):
        res = fit_movie(bad, sigma=SIGMA)
    assert np.all(np.isfinite(res.flux))
    ok = np.ones(N_FRAMES, bool)
    ok[10] = False
    # The projection lost one pixel of one frame: the same spots, positions a hair apart.
    idx, dist = nearest(res.catalog, np.column_stack([traces.catalog["x"], traces.catalog["y"]]))
    assert len(res) == len(traces) and np.all(dist < 0.05)
    assert np.all(np.abs(res.flux[idx] - traces.flux)[:, ok] < 0.25 * traces.flux_err[:, ok])


def test_hot_pixel_masked_in_every_frame(movie, traces):
    frames, xy, _ = movie
    hot = frames.copy()
    row, col = int(round(xy[8, 1])), int(round(xy[8, 0]))  # an isolated spot's peak pixel
    hot[:, row, col] += 500.0  # a hot pixel: in every frame
    with pytest.warns(UserWarning, match=r"1 pixel\(s\) sharper than the PSF"):
        res = fit_movie(hot, sigma=SIGMA)
    assert [tuple(map(int, rc)) for rc in res.catalog.meta["spikes"]] == [(row, col)]
    idx, dist = nearest(res.catalog, np.column_stack([traces.catalog["x"], traces.catalog["y"]]))
    assert len(res) == len(traces) and np.all(dist < 0.1)
    # Kept, the pixel would add ~1000 (~30 flux errors) to every frame's flux. Masked, the
    # spot's trace loses one pixel's information: frame-to-frame noise, no bias.
    pull = (res.flux[idx] - traces.flux) / traces.flux_err
    assert np.all(np.abs(pull) < 1.5)
    assert np.all(np.abs(pull.mean(1)) < 0.1)


def test_bad_input(movie, traces):
    frames, _, _ = movie
    with pytest.raises(ValueError, match=r"\(T, H, W\).*fit_image"):
        fit_movie(frames[0])
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        fit_movie(frames[None])
    with pytest.raises(ValueError, match="numbers"):
        fit_movie(np.full((2, 4, 4), "a"))
    with pytest.raises(ValueError, match="empty"):
        fit_movie(frames[:0])
    with pytest.raises(ValueError, match="projection"):
        fit_movie(frames, projection="median")
    with pytest.raises(ValueError, match="projection"):
        fit_movie(frames, projection=0)
    with pytest.raises(ValueError, match="mask"):
        fit_movie(frames, mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="noise"):
        fit_movie(frames, noise="cauchy")
    with pytest.raises(ValueError, match="sigma"):
        fit_movie(frames, catalog={"x": [10.0], "y": [10.0]})
    with pytest.raises(ValueError, match="chunk_frames"):
        fit_movie(frames, catalog=traces.catalog, chunk_frames=0)
    empty = fit_movie(frames[:3], catalog={"x": [], "y": []}, sigma=SIGMA)
    assert empty.flux.shape == (0, 3) and len(empty.to_pandas()) == 0


def test_drift_follows_moving_spots():
    # Six isolated spots drift 3 px across the movie; held positions lose flux, free ones not.
    # (Six isolated spots, 64 frames: the held fit reuses a program compiled for the movie above.)
    rng = np.random.default_rng(5)
    t, (h, w) = 64, SHAPE
    x0 = np.array([12.0, 32.0, 52.0, 12.0, 32.0, 52.0]) + rng.uniform(-0.5, 0.5, 6)
    y0 = np.array([16.0, 16.0, 16.0, 44.0, 44.0, 44.0]) + rng.uniform(-0.5, 0.5, 6)
    drift = np.linspace(-1.5, 1.5, t)
    flux = np.full((6, t), 3000.0)
    yy, xx = np.mgrid[:h, :w]
    xs = x0[:, None] + drift[None]
    dx2 = (xx[None, None] - xs[..., None, None]) ** 2
    d2 = dx2 + (yy[None, None] - y0[:, None, None, None]) ** 2
    psf = np.exp(-d2 / (2 * SIGMA**2)) / (2 * np.pi * SIGMA**2)
    frames = 10 + np.einsum("nt,nthw->thw", flux, psf) + rng.normal(0, 3.0, (t, h, w))
    cat = {"x": x0, "y": y0, "flux": flux.mean(1)}
    moving = fit_movie(frames, sigma=SIGMA, catalog=cat, drift=True)
    held = fit_movie(frames, sigma=SIGMA, catalog=cat)
    assert np.all(moving.status == 0)
    assert np.max(np.abs(moving.x - xs)) < 0.1 and np.max(np.abs(moving.y - y0[:, None])) < 0.1
    assert np.all(np.abs(moving.flux - flux) < 5 * moving.flux_err)
    ends = np.r_[0, t - 1]
    assert np.all(held.flux[:, ends] < 0.85 * 3000)  # 1.5 px off its held place: light lost
    assert list(moving.to_pandas().columns)[-2:] == ["x", "y"]


@pytest.fixture(scope="module")
def tilted():
    return simulate_tilted_movie()


def flux_errors(traces, xy, flux):
    """Recall within 1 px of the true spots, and the matched spots' relative flux errors."""
    truth = {"x": xy[:, 0], "y": xy[:, 1], "flux": flux[:, 0]}
    m = crowdfit.match(truth, traces.catalog, 1.0)
    return m.recall, traces.flux[m.found_index] / flux[m.truth_index] - 1


def test_rotated_psf_measured_on_tilted_spots(tilted):
    # The projection's fit measures the tilted shape; every frame is fitted with it held.
    frames, xy, flux = tilted
    traces = fit_movie(frames, psf="rotated_gaussian")
    assert traces.meta["psf"] == "rotated_gaussian" and traces.flux.shape == (len(xy), 3)
    sx, sy, angle = traces.catalog.meta["sigma"]
    assert sx == pytest.approx(TILT[0], rel=0.03) and sy == pytest.approx(TILT[1], rel=0.03)
    assert angle == pytest.approx(TILT[2], abs=0.05)
    # (the traces carry no shape columns; their catalog does, each spot's the shared shape)
    assert traces.catalog.columns[-1] == "angle" and np.allclose(traces.catalog["angle"], angle)
    recall, err = flux_errors(traces, xy, flux)
    assert recall >= 0.95 and len(traces) <= len(xy) + 1
    assert np.all(traces.status == 0)
    assert np.all(np.abs(np.median(err, 0)) < 0.02) and np.median(np.abs(err)) < 0.05


def test_rotated_psf_with_its_shape_given(tilted):
    frames, xy, flux = tilted
    traces = fit_movie(frames, psf="rotated_gaussian", sigma=TILT)
    assert traces.catalog.meta["sigma"] == TILT and np.allclose(traces.catalog["angle"], TILT[2])
    recall, err = flux_errors(traces, xy, flux)
    assert recall >= 0.95 and np.all(np.abs(np.median(err, 0)) < 0.02)
    # Spots given without widths: the whole shape from `sigma` (fit_movie once took sigma_y from
    # the angle and held the angle at 0: fluxes 70 % low).
    spots = {"x": xy[:, 0], "y": xy[:, 1]}
    given = fit_movie(frames, psf="rotated_gaussian", sigma=TILT, catalog=spots)
    err = given.flux / flux - 1
    assert np.all(np.abs(np.median(err, 0)) < 0.02) and np.median(np.abs(err)) < 0.05
    # (held at angle 0, as `sigma=(sigma_x, sigma_y)` holds it, they are 4 % low: the angle counts)
    flat = fit_movie(frames, psf="rotated_gaussian", sigma=TILT[:2], catalog=spots)
    assert np.median(flat.flux / flux - 1) < -0.03
