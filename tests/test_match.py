"""Tests of `match`: hand-made cases with known answers, edge cases, and scipy as an oracle."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from crowdfit._match import MatchResult, match


def _cat(points, flux=None):
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    cat = {"x": points[:, 0], "y": points[:, 1]}
    if flux is not None:
        cat["flux"] = np.asarray(flux, dtype=float)
    return cat


def _greedy(truth, found, radius):
    """Closest pair first: the matching `match` must beat."""
    t, f = np.asarray(truth, float), np.asarray(found, float)
    d = np.hypot(t[:, None, 0] - f[None, :, 0], t[:, None, 1] - f[None, :, 1])
    pairs = sorted(
        (d[i, j], i, j) for i in range(len(t)) for j in range(len(f)) if d[i, j] <= radius
    )
    used_t, used_f, total = set(), set(), 0.0
    for dist, i, j in pairs:
        if i not in used_t and j not in used_f:
            used_t.add(i)
            used_f.add(j)
            total += dist
    return len(used_t), total


def _oracle(truth, found, radius):
    """Most pairs within `radius`, then least total distance, from scipy on a dense matrix."""
    t, f = np.asarray(truth, float).reshape(-1, 2), np.asarray(found, float).reshape(-1, 2)
    if len(t) == 0 or len(f) == 0:
        return 0, 0.0
    d = np.hypot(t[:, None, 0] - f[None, :, 0], t[:, None, 1] - f[None, :, 1])
    within = d <= radius
    big = 1.0 + 2.0 * d[within].sum()
    rows, cols = linear_sum_assignment(np.where(within, d, big))
    ok = within[rows, cols]
    return int(ok.sum()), float(d[rows, cols][ok].sum())


def test_simple_counts_and_scores():
    truth = _cat([[0, 0], [10, 0], [20, 0], [30, 0]], flux=[100, 200, 100, 100])
    found = _cat([[0.3, 0.4], [10, 0.6], [50, 50]], flux=[110, 180, 1])
    r = match(truth, found, radius=1.0)
    assert (r.n_truth, r.n_found, r.n_matched) == (4, 3, 2)
    assert (r.tp, r.fp, r.fn) == (2, 1, 2)
    assert r.jaccard == pytest.approx(2 / 5)
    assert r.recall == pytest.approx(0.5)
    assert r.precision == pytest.approx(2 / 3)
    np.testing.assert_array_equal(r.truth_index, [0, 1])
    np.testing.assert_array_equal(r.found_index, [0, 1])
    np.testing.assert_allclose(r.distance, [0.5, 0.6])
    assert r.rmse == pytest.approx(math.sqrt((0.25 + 0.36) / 2))
    rel = np.array([0.1, -0.1])
    assert r.flux_bias_mean == pytest.approx(0.0, abs=1e-12)
    assert r.flux_bias_median == pytest.approx(0.0, abs=1e-12)
    assert r.flux_error_median_abs == pytest.approx(0.1)
    assert r.flux_rel_std == pytest.approx(np.std(rel))


def test_efficiency_formula():
    truth = _cat([[0, 0], [10, 0], [20, 0], [30, 0]])
    found = _cat([[0.3, 0.4], [10, 0.6], [50, 50]])
    r = match(truth, found, radius=1.0, pixel_size_nm=100.0)
    rmse_nm = 100.0 * r.rmse
    expected = 100 - math.sqrt((100 - 100 * r.jaccard) ** 2 + (1.0 * rmse_nm) ** 2)
    assert r.efficiency == pytest.approx(expected)
    r2 = match(truth, found, radius=1.0, pixel_size_nm=10.0, alpha=0.5)
    expected2 = 100 - math.sqrt((100 - 100 * r.jaccard) ** 2 + (0.5 * 10.0 * r.rmse) ** 2)
    assert r2.efficiency == pytest.approx(expected2)
    perfect = match(truth, truth)
    assert perfect.efficiency == pytest.approx(100.0)
    assert perfect.jaccard == 1.0 and perfect.rmse == 0.0


def test_greedy_fails_optimal_gets_more_matches():
    # Closest pair first takes (B, a) and leaves A and b alone; the optimum pairs both.
    truth = [[0.0, 0.0], [1.5, 0.0]]
    found = [[0.8, 0.0], [2.4, 0.0]]
    assert _greedy(truth, found, 1.0)[0] == 1
    r = match(_cat(truth), _cat(found), radius=1.0)
    assert r.tp == 2 and r.fp == 0 and r.fn == 0
    np.testing.assert_array_equal(r.found_index, [0, 1])
    np.testing.assert_allclose(r.distance, [0.8, 0.9])


def test_greedy_fails_optimal_gets_less_distance():
    truth = [[0.0, 0.0], [1.5, 1.0]]
    found = [[1.0, 0.0], [-0.5, 1.0]]
    greedy_count, greedy_total = _greedy(truth, found, 2.5)
    assert greedy_count == 2 and greedy_total == pytest.approx(3.0)
    r = match(_cat(truth), _cat(found), radius=2.5)
    assert r.tp == 2
    np.testing.assert_array_equal(r.found_index, [1, 0])
    assert r.distance.sum() == pytest.approx(2 * math.hypot(0.5, 1.0))


def test_ties():
    # One truth exactly between two found: one match, one false positive.
    r = match(_cat([[0, 0]]), _cat([[-0.5, 0], [0.5, 0]]), radius=1.0)
    assert (r.tp, r.fp, r.fn) == (1, 1, 0)
    assert r.distance[0] == pytest.approx(0.5)
    # Corners of a square, every pair within range: two matches either way, same total.
    truth = _cat([[0, 0], [1, 1]])
    found = _cat([[0, 1], [1, 0]])
    r = match(truth, found, radius=1.0)
    assert (r.tp, r.fp, r.fn) == (2, 0, 0)
    assert r.distance.sum() == pytest.approx(2.0)
    assert sorted(r.found_index.tolist()) == [0, 1]
    # Two truths on the same spot, one found: exactly one match.
    r = match(_cat([[3, 3], [3, 3]]), _cat([[3, 3]]), radius=0.5)
    assert (r.tp, r.fp, r.fn) == (1, 0, 1)


def test_distance_exactly_at_radius_matches():
    # A 3-4-5 triangle: the distance is exactly 5 in floating point.
    r = match(_cat([[0, 0]]), _cat([[3, 4]]), radius=5.0)
    assert r.tp == 1 and r.distance[0] == 5.0
    r = match(_cat([[0, 0]]), _cat([[3, 4]]), radius=np.nextafter(5.0, 0.0))
    assert r.tp == 0 and r.fp == 1 and r.fn == 1
    # Radius zero: only coincident points match.
    r = match(_cat([[1, 2], [3, 4]]), _cat([[1, 2], [3, 4.001]]), radius=0.0)
    assert r.tp == 1 and r.truth_index.tolist() == [0]


@pytest.mark.parametrize(
    "n_truth, n_found",
    [(0, 3), (3, 0), (0, 0)],
    ids=["empty truth", "empty found", "both empty"],
)
def test_empty_inputs(n_truth, n_found):
    truth = _cat(np.zeros((n_truth, 2)), flux=np.ones(n_truth))
    found = _cat(np.arange(2 * n_found).reshape(n_found, 2), flux=np.ones(n_found))
    r = match(truth, found)
    assert (r.n_truth, r.n_found, r.tp, r.fp, r.fn) == (n_truth, n_found, 0, n_found, n_truth)
    assert r.truth_index.shape == (0,) and r.found_index.shape == (0,)
    assert r.truth_index.dtype.kind == "i" and r.found_index.dtype.kind == "i"
    assert math.isnan(r.rmse) and math.isnan(r.flux_bias_mean)
    if n_truth + n_found:
        assert r.jaccard == 0.0 and r.efficiency == pytest.approx(0.0)
    else:
        assert math.isnan(r.jaccard) and math.isnan(r.efficiency)
    assert math.isnan(r.recall) == (n_truth == 0)
    assert math.isnan(r.precision) == (n_found == 0)
    assert "0 of" in str(r)


def test_nonfinite_positions_never_match():
    truth = _cat([[0, 0], [5, 5]])
    found = _cat([[np.nan, 0], [5, 5], [np.inf, np.inf]])
    r = match(truth, found, radius=1.0)
    assert (r.tp, r.fp, r.fn) == (1, 2, 1)
    assert r.found_index.tolist() == [1]


def test_input_forms_and_flux_optional():
    points = np.array([[0.0, 0.0], [4.0, 4.0]])
    structured = np.zeros(2, dtype=[("x", float), ("y", float), ("flux", float)])
    structured["x"], structured["y"], structured["flux"] = points[:, 0], points[:, 1], [1.0, 2.0]
    for truth in (points, structured, {"x": [0.0, 4.0], "y": [0.0, 4.0]}):
        r = match(truth, points + 0.1)
        assert r.tp == 2
        assert math.isnan(r.flux_bias_mean)  # found has no flux
    r = match(structured, {"x": [0.0], "y": [0.0], "flux": [1.5]})
    assert r.tp == 1 and r.flux_bias_mean == pytest.approx(0.5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="radius"):
        match(_cat([[0, 0]]), _cat([[0, 0]]), radius=-1.0)
    with pytest.raises(ValueError, match="different lengths"):
        match({"x": [0.0, 1.0], "y": [0.0]}, _cat([[0, 0]]))
    with pytest.raises(ValueError, match="flux"):
        match({"x": [0.0], "y": [0.0], "flux": [1.0, 2.0]}, _cat([[0, 0]]))
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        match(np.zeros((3, 3)), _cat([[0, 0]]))
    with pytest.raises(ValueError, match=r"truth\['y'\]"):  # (was a TypeError)
        match({"x": [0.0]}, _cat([[0, 0]]))


def test_result_is_frozen_and_readable():
    r = match(_cat([[0, 0]], flux=[100.0]), _cat([[0.1, 0]], flux=[105.0]))
    assert isinstance(r, MatchResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.tp = 3
    text = r.summary()
    assert text == str(r)
    assert "1 of 1" in text and "jaccard 1.000" in text and "+5.00 %" in text
    assert "efficiency" in text


def _brute_force(truth, found, radius):
    """Every matching of a tiny case: (most pairs, least total distance)."""
    t, f = np.asarray(truth, float), np.asarray(found, float)
    best = (0, 0.0)
    k = min(len(t), len(f))
    for rows in itertools.permutations(range(len(t)), k):
        for cols in itertools.combinations(range(len(f)), k):
            d = [math.dist(t[i], f[j]) for i, j in zip(rows, cols, strict=True)]
            kept = [x for x in d if x <= radius]
            score = (len(kept), -sum(kept))
            if score > (best[0], -best[1]):
                best = (len(kept), sum(kept))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_tiny_cases_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        nt, nf = rng.integers(0, 5, 2)
        truth = rng.integers(0, 4, (nt, 2)).astype(float)  # integers: many ties
        found = rng.integers(0, 4, (nf, 2)).astype(float)
        r = match(truth, found, radius=1.5)
        count, total = _brute_force(truth, found, 1.5)
        assert r.tp == count
        assert r.distance.sum() == pytest.approx(total)


@pytest.mark.parametrize("integer", [False, True], ids=["float", "integer"])
@pytest.mark.parametrize("seed", range(3))
def test_random_cases_against_scipy(seed, integer):
    rng = np.random.default_rng(100 + seed)
    for _ in range(60):
        nt, nf = rng.integers(0, 40, 2)
        side = rng.uniform(2.0, 15.0)
        truth = rng.uniform(0, side, (nt, 2))
        found = rng.uniform(0, side, (nf, 2))
        if integer:
            truth, found = np.round(truth), np.round(found)
        radius = rng.uniform(0.2, 3.0)
        r = match(truth, found, radius=radius)
        count, total = _oracle(truth, found, radius)
        assert r.tp == count
        assert r.distance.sum() == pytest.approx(total, abs=1e-9)
        # A valid matching: one to one, within the radius, distances as stated.
        assert len(set(r.truth_index.tolist())) == r.tp == len(set(r.found_index.tolist()))
        assert np.all(r.distance <= radius)
        d = np.hypot(*(truth[r.truth_index] - found[r.found_index]).T)
        np.testing.assert_allclose(r.distance, d)
        assert np.all(np.diff(r.truth_index) > 0)


def test_large_field_against_scipy():
    rng = np.random.default_rng(7)
    truth = rng.uniform(0, 40, (300, 2))
    found = np.concatenate([truth + rng.normal(0, 0.5, truth.shape), rng.uniform(0, 40, (100, 2))])
    for radius in (0.7, 2.0, 1e9):
        r = match(truth, found, radius=radius)
        count, total = _oracle(truth, found, radius)
        assert r.tp == count
        assert r.distance.sum() == pytest.approx(total, rel=1e-12)
