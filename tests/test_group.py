"""Tests of host-side grouping: bounded regions of overlapping sources, shape buckets, padding.

The invariants (each source a member of exactly one region, bounded windows) are checked everywhere.
"""

import math
import time

import numpy as np
import pytest

from crowdfit._group import (
    Region,
    bucket_regions,
    closest_neighbours,
    default_max_window,
    group_sources,
    pad_window,
    pad_windows,
)

K_BUCKETS = (1, 2, 4, 8, 16)
SIZE_BUCKETS = (8, 12, 16, 24, 32, 48, 64)


def check_regions(regions, x, y, shape, *, max_sources=8, max_window=32, max_total=None):
    """Every invariant `group_sources` promises."""
    max_total = 2 * max_sources if max_total is None else max_total
    height, width = shape
    count = np.zeros(x.size, dtype=int)
    for region in regions:
        assert isinstance(region, Region)
        row0, row1, col0, col1 = region.window
        assert 0 <= row0 < row1 <= height and 0 <= col0 < col1 <= width
        assert row1 - row0 <= max_window and col1 - col0 <= max_window
        assert region.shape == (row1 - row0, col1 - col0)
        assert region.origin == (row0, col0)
        members, neighbours = region.members, region.neighbours
        assert members.dtype.kind == "i" and neighbours.dtype.kind == "i"
        assert 1 <= members.size <= max_sources
        assert members.size + neighbours.size <= max_total
        assert np.intersect1d(members, neighbours).size == 0
        assert np.unique(region.sources).size == region.sources.size
        # Members lie in their window (positions are pulled into the image first).
        mx = np.clip(x[members], 0, width - 1)
        my = np.clip(y[members], 0, height - 1)
        assert np.all((mx >= col0 - 0.5) & (mx <= col1 - 0.5))
        assert np.all((my >= row0 - 0.5) & (my <= row1 - 0.5))
        np.add.at(count, members, 1)
    assert np.all(count == 1), "every source is a member of exactly one region"


def test_isolated_pair_is_one_region():
    x, y = np.array([20.0, 24.0]), np.array([30.0, 31.0])
    regions = group_sources(x, y, 2.0, (64, 64))
    assert len(regions) == 1
    assert regions[0].members.tolist() == [0, 1]
    assert regions[0].neighbours.size == 0
    # Window = bounding box ± ceil(3σ) = 6 px.
    assert regions[0].window == (24, 38, 14, 31)
    check_regions(regions, x, y, (64, 64))


def test_far_apart_sources_are_separate_regions():
    x, y = np.array([10.0, 50.0, 90.0]), np.array([10.0, 40.0, 20.0])
    regions = group_sources(x, y, 2.0, (64, 100))
    assert sorted(r.members.tolist() for r in regions) == [[0], [1], [2]]
    assert len({r.group for r in regions}) == 3
    assert all(r.neighbours.size == 0 for r in regions)
    check_regions(regions, x, y, (64, 100))


def test_default_radius_is_two_fwhm():
    fwhm = 2 * math.sqrt(2 * math.log(2)) * 2.0
    linked = group_sources([30.0, 30.0 + 1.9 * fwhm], [30.0, 30.0], 2.0, (64, 80))
    apart = group_sources([30.0, 30.0 + 2.1 * fwhm], [30.0, 30.0], 2.0, (64, 80))
    assert len(linked) == 1
    assert len(apart) == 2
    # Apart but within reach of each other's window: each rides along as a neighbour.
    assert [r.neighbours.tolist() for r in apart] == [[1], [0]]
    assert len(group_sources([30.0, 40.0], [30.0, 30.0], 2.0, (64, 80), radius=8.0)) == 2


def test_chain_is_one_group():
    # Links are transitive: a chain of sources 4 px apart is one cluster.
    x = 10.0 + 4.0 * np.arange(5)
    y = np.full(5, 20.0)
    regions = group_sources(x, y, 2.0, (40, 60))
    assert len(regions) == 1 and regions[0].members.tolist() == [0, 1, 2, 3, 4]


def test_border_sources_get_clipped_windows():
    x = np.array([0.0, 63.0, 0.2, 63.0, 31.5])
    y = np.array([0.0, 0.0, 47.0, 46.6, 0.0])
    regions = group_sources(x, y, 2.0, (48, 64))
    check_regions(regions, x, y, (48, 64))
    windows = {int(r.members[0]): r.window for r in regions}
    assert windows[0] == (0, 7, 0, 7)
    assert windows[3] == (40, 48, 57, 64)


def test_big_cluster_is_split_with_neighbours():
    # 30 sources on a 5 px grid: all linked, too many for one region.
    gx, gy = np.meshgrid(np.arange(6) * 5.0 + 10, np.arange(5) * 5.0 + 10)
    x, y = gx.ravel(), gy.ravel()
    regions = group_sources(x, y, 2.0, (64, 64))
    check_regions(regions, x, y, (64, 64))
    assert len(regions) > 1
    assert len({r.group for r in regions}) == 1
    assert all(r.neighbours.size > 0 for r in regions)
    # A neighbour is within `margin` of its window.
    for r in regions:
        row0, row1, col0, col1 = r.window
        n = r.neighbours
        assert np.all((x[n] >= col0 - 6) & (x[n] <= col1 - 1 + 6))
        assert np.all((y[n] >= row0 - 6) & (y[n] <= row1 - 1 + 6))


def test_wide_cluster_is_split_by_window_size():
    # A line of 6 sources 4 px apart: few enough members, but 20 + 2·6 + 1 > 24 px wide.
    x, y = 10.0 + 4.0 * np.arange(6), np.full(6, 20.0)
    regions = group_sources(x, y, 2.0, (40, 60), max_window=24)
    assert len(regions) == 2
    check_regions(regions, x, y, (40, 60), max_window=24)


def distance_to_window(window, x, y):
    row0, row1, col0, col1 = window
    dx = np.maximum(np.maximum(col0 - x, 0), x - (col1 - 1))
    dy = np.maximum(np.maximum(row0 - y, 0), y - (row1 - 1))
    return np.hypot(dx, dy)


def test_neighbour_cap_keeps_nearest_or_brightest():
    # One source ringed by 12 others beyond its linking radius, but within reach of its window.
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False) + 0.1
    dist = np.where(np.arange(12) % 2 == 0, 10.0, 12.0)
    x = np.concatenate([[40.0], 40.0 + dist * np.cos(angles)])
    y = np.concatenate([[40.0], 40.0 + dist * np.sin(angles)])
    kw = dict(radius=9.0, max_sources=1, max_total=5)
    regions = group_sources(x, y, 2.0, (80, 80), **kw)
    check_regions(regions, x, y, (80, 80), max_sources=1, max_total=5)
    region = regions[0]
    assert region.members.tolist() == [0]
    d = distance_to_window(region.window, x[1:], y[1:])
    assert np.all(d <= 6.0)  # all 12 reach the window; only the 4 nearest fit
    assert region.neighbours.tolist() == sorted((np.argsort(d, kind="stable")[:4] + 1).tolist())
    farthest = np.argsort(d, kind="stable")[-2:] + 1
    flux = np.ones(13)
    flux[farthest] = 100.0  # far but bright: they put the most light on the window
    bright = group_sources(x, y, 2.0, (80, 80), flux=flux, **kw)[0]
    assert set(farthest.tolist()) <= set(bright.neighbours.tolist())


@pytest.mark.parametrize("n, sigma", [(2000, 2.0), (6000, 3.0)])
def test_dense_field_is_bounded_and_fast(n, sigma):
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 511, n), rng.uniform(0, 511, n)
    start = time.perf_counter()
    regions = group_sources(x, y, sigma, (512, 512))
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    check_regions(regions, x, y, (512, 512), max_window=default_max_window(sigma))
    buckets = bucket_regions(regions)
    assert len(buckets) <= len(K_BUCKETS) * len(SIZE_BUCKETS) ** 2
    if n == 6000:
        # 0.8 sources per FWHM²: the field percolates into one giant cluster, split into tiles.
        sizes = np.bincount([r.group for r in regions])
        assert sizes.max() > 100


def test_duplicate_positions_are_split():
    x, y = np.full(20, 30.0), np.full(20, 30.0)
    regions = group_sources(x, y, 2.0, (64, 64), max_sources=8)
    check_regions(regions, x, y, (64, 64))
    assert sorted(r.members.size for r in regions) == [5, 5, 5, 5]


def test_lone_source_with_huge_margin_gets_max_window():
    regions = group_sources([50.0], [50.0], 2.0, (100, 100), margin=40, max_window=32)
    assert regions[0].window == (34, 66, 34, 66)


def test_default_window_bound_scales_with_sigma():
    # A row of sources 3 sigma apart at sigma = 5: 32 px would cut it into 1-2-source regions.
    x = 20.0 + 15.0 * np.arange(12)
    y = np.full(12, 60.0)
    assert [default_max_window(s) for s in (0.5, 2.0, 3.0, 3.01, 3.5, 5.0)] == [
        48, 48, 48, 64, 64, 80
    ]  # fmt: skip
    regions = group_sources(x, y, 5.0, (120, 220))
    check_regions(regions, x, y, (120, 220), max_window=80)
    assert max(max(r.shape) for r in regions) > 48
    narrow = group_sources(x, y, 5.0, (120, 220), max_window=48)
    assert len(narrow) > len(regions)


def test_empty_and_invalid():
    assert group_sources([], [], 2.0, (10, 10)) == []
    with pytest.raises(ValueError):
        group_sources([1.0], [1.0], 2.0, (10, 10), max_sources=8, max_total=4)
    with pytest.raises(ValueError):
        group_sources([1.0, np.nan], [1.0, 2.0], 2.0, (10, 10))


def test_sources_just_outside_the_image():
    x, y = np.array([-0.4, 30.0, 64.3]), np.array([10.0, -0.2, 40.0])
    regions = group_sources(x, y, 2.0, (48, 64))
    check_regions(regions, x, y, (48, 64))


def test_bucket_regions_covers_every_region_once():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 255, 500), rng.uniform(0, 255, 500)
    regions = group_sources(x, y, 2.0, (256, 256))
    buckets = bucket_regions(regions)
    indices = sorted(i for members in buckets.values() for i in members)
    assert indices == list(range(len(regions)))
    for (k, h, w), members in buckets.items():
        assert k in K_BUCKETS and h in SIZE_BUCKETS and w in SIZE_BUCKETS
        for i in members:
            r = regions[i]
            assert r.members.size + r.neighbours.size <= k
            assert r.shape[0] <= h and r.shape[1] <= w


def test_bucket_regions_past_the_largest_bucket():
    region = Region((0, 70, 0, 20), np.arange(3), np.arange(3, 20), 0)
    assert bucket_regions([region]) == {(32, 128, 24): [0]}
    assert bucket_regions([region], k_buckets=(4, 32), size_buckets=(100,)) == {(32, 100, 100): [0]}


@pytest.mark.parametrize(
    "window, valid",
    [
        ((0, 5, 0, 5), 25),  # top-left corner
        ((45, 50, 55, 60), 25),  # bottom-right corner
        ((-3, 5, -2, 6), 30),  # reaching past the top-left corner
        ((46, 54, 57, 63), 12),  # reaching past the bottom-right corner
    ],
)
def test_pad_window_at_corners(window, valid):
    image = np.arange(50 * 60, dtype=np.float32).reshape(50, 60)
    crop, mask, origin = pad_window(image, window, (8, 8))
    assert crop.shape == mask.shape == (8, 8) and crop.dtype == np.float32
    assert origin == (window[0], window[2])
    assert int(mask.sum()) == valid
    # Image coordinates = window coordinates + origin, wherever the mask is True.
    rows, cols = np.nonzero(mask)
    np.testing.assert_array_equal(crop[rows, cols], image[rows + origin[0], cols + origin[1]])
    assert np.all(crop[~mask] == 0)


def test_pad_window_mask_and_errors():
    image = np.ones((10, 10))
    image[2, 2] = np.nan
    user_mask = np.ones((10, 10), dtype=bool)
    user_mask[3, 3] = False
    crop, mask, _ = pad_window(image, (0, 6, 0, 6), (8, 12), mask=user_mask)
    assert not mask[2, 2] and not mask[3, 3] and crop[2, 2] == 0
    assert int(mask.sum()) == 34
    with pytest.raises(ValueError):
        pad_window(image, (0, 9, 0, 4), (8, 8))


def test_pad_windows_matches_pad_window():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(40, 50))
    x, y = rng.uniform(0, 49, 60), rng.uniform(0, 39, 60)
    regions = group_sources(x, y, 1.5, image.shape)
    for (_, h, w), members in bucket_regions(regions).items():
        windows = [regions[i].window for i in members]
        crops, masks, origins = pad_windows(image, windows, (h, w))
        assert crops.shape == masks.shape == (len(members), h, w)
        for b, i in enumerate(members):
            crop, mask, origin = pad_window(image, regions[i].window, (h, w))
            np.testing.assert_array_equal(crops[b], crop)
            np.testing.assert_array_equal(masks[b], mask)
            assert tuple(origins[b]) == origin


def test_closest_neighbours_match_brute_force():
    rng = np.random.default_rng(3)
    x, y = rng.uniform(0, 40, 300), rng.uniform(0, 40, 300)
    usable = rng.random(300) > 0.2
    idx = np.flatnonzero(rng.random(300) > 0.5)
    nb, near, d2 = closest_neighbours(x, y, idx, 3.0, 3, usable=usable)
    for c, i in enumerate(idx):
        d = np.hypot(x - x[i], y - y[i])
        d[i] = np.inf
        d[~usable] = np.inf
        want = [j for j in np.argsort(d, kind="stable")[:3] if d[j] < 3.0] if usable[i] else []
        assert nb[c, near[c]].tolist() == want
        assert np.all(nb[c, ~near[c]] == i) and np.all(np.isinf(d2[c, ~near[c]]))
        np.testing.assert_allclose(np.sqrt(d2[c, near[c]]), d[want])
