"""Score a catalog against the truth: optimal one-to-one matching within a radius, and its metrics.

Detection (Jaccard, recall, precision), position RMSE, flux bias, and the SMLM Challenge efficiency.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["MatchResult", "match"]


@dataclasses.dataclass(frozen=True, eq=False)
class MatchResult:
    """The outcome of [`match`][]: which sources were paired, and how well the catalog did.

    Ratios that would be 0/0 (e.g. `recall` with no truth, `rmse` with no matches) are `nan`.

    **Fields:**

    - `n_truth`, `n_found`, `n_matched`: sizes of the two catalogs and of the matching.
    - `tp`, `fp`, `fn`: true positives (`= n_matched`), false positives (found, unmatched) and false
      negatives (true, unmatched).
    - `jaccard`: `tp / (tp + fp + fn)`; `recall`: `tp / n_truth`; `precision`: `tp / n_found`.
    - `rmse`: root mean square distance of the matched pairs, in pixels.
    - `flux_bias_mean`, `flux_bias_median`: mean and median of `(found - true) / true` over the
      matched pairs (`nan` when either catalog has no `flux`).
    - `flux_error_median_abs`: median of `|found - true| / true`.
    - `flux_rel_std`: standard deviation of `(found - true) / true`.
    - `efficiency`: the SMLM Challenge 2016 lateral efficiency in percent (see [`match`][]).
    - `truth_index`, `found_index`: `(n_matched,)` int arrays; pair `k` is truth
      `truth_index[k]` with found `found_index[k]`, sorted by `truth_index`.
    - `distance`: `(n_matched,)` distances of the matched pairs, in pixels.
    - `radius`, `pixel_size_nm`, `alpha`: the settings the result was computed with.
    """

    n_truth: int
    n_found: int
    n_matched: int
    tp: int
    fp: int
    fn: int
    jaccard: float
    recall: float
    precision: float
    rmse: float
    flux_bias_mean: float
    flux_bias_median: float
    flux_error_median_abs: float
    flux_rel_std: float
    efficiency: float
    truth_index: np.ndarray
    found_index: np.ndarray
    distance: np.ndarray
    radius: float
    pixel_size_nm: float
    alpha: float

    def summary(self) -> str:
        """A few readable lines: counts, detection scores, position and flux errors, efficiency."""
        rmse_nm = self.rmse * self.pixel_size_nm
        lines = [
            f"match within {self.radius:g} px: {self.n_matched} of {self.n_truth} true sources "
            f"matched, {self.n_found} found",
            f"  tp {self.tp}  fp {self.fp}  fn {self.fn}  jaccard {self.jaccard:.3f}  "
            f"recall {self.recall:.3f}  precision {self.precision:.3f}",
            f"  position rmse {self.rmse:.3f} px "
            f"({rmse_nm:.1f} nm at {self.pixel_size_nm:g} nm/px)",
        ]
        if not math.isnan(self.flux_bias_mean):
            lines.append(
                f"  flux bias mean {100 * self.flux_bias_mean:+.2f} %  "
                f"median {100 * self.flux_bias_median:+.2f} %  "
                f"median |error| {100 * self.flux_error_median_abs:.2f} %  "
                f"rel std {100 * self.flux_rel_std:.2f} %"
            )
        lines.append(f"  efficiency {self.efficiency:.1f} (SMLM 2016, alpha {self.alpha:g}/nm)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def match(
    truth,
    found,
    radius: float = 1.0,
    *,
    pixel_size_nm: float = 100.0,
    alpha: float = 1.0,
) -> MatchResult:
    """Pair found sources with true ones, one to one, and score the catalog.

    A pair may match when its distance is `<= radius`. Among the matchings with the most pairs, the
    one with the least total distance is taken (optimal, not greedy): the radius graph is split into
    connected components, a component with one source on either side takes its nearest partner, and
    every other component is solved exactly with the Hungarian algorithm.

    The efficiency is the SMLM Challenge 2016 metric (Sage et al. 2019, "Super-resolution fight
    club", Nat. Methods 16, 387, doi:10.1038/s41592-019-0364-4):

    `E = 100 - sqrt((100 - 100 * jaccard)^2 + alpha^2 * RMSE^2)`,

    with RMSE in nm (`rmse * pixel_size_nm`) and `alpha = 1 nm^-1`, the paper's value for the
    lateral (2D) efficiency (it uses `0.5 nm^-1` for the axial one). With no matched pair the RMSE
    term is 0. Efficiency is a percentage, 100 at best, and may be negative.

    **Arguments:**

    - `truth`, `found`: catalogs that give `obj["x"]` and `obj["y"]` (dicts of arrays, pandas data
      frames, structured arrays), or `(n, 2)` arrays of `(x, y)`; `obj["flux"]`, when both have it,
      adds the flux metrics. Either may be empty; non-finite positions never match.
    - `radius`: the largest distance of a match, in pixels.
    - `pixel_size_nm`: nm per pixel, for the efficiency.
    - `alpha`: the efficiency's weight of the RMSE, per nm.

    **Returns:** a [`MatchResult`][].

    >>> from crowdfit._match import match
    >>> truth = {"x": [0.0, 10.0], "y": [0.0, 0.0], "flux": [100.0, 100.0]}
    >>> found = {"x": [0.3, 25.0], "y": [0.4, 0.0], "flux": [110.0, 50.0]}
    >>> r = match(truth, found, radius=1.0)
    >>> r.tp, r.fp, r.fn, round(r.rmse, 3), round(r.flux_bias_mean, 3)
    (1, 1, 1, 0.5, 0.1)
    """
    radius = float(radius)
    if not radius >= 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    tx, ty, tflux = _columns(truth, "truth")
    fx, fy, fflux = _columns(found, "found")

    ti, fi, dist = _candidate_pairs(tx, ty, fx, fy, radius)
    ti, fi, dist = _optimal_matching(ti, fi, dist, tx.size, fx.size)
    order = np.argsort(ti, kind="stable")
    ti, fi, dist = ti[order], fi[order], dist[order]

    n_truth, n_found, tp = int(tx.size), int(fx.size), int(ti.size)
    fp, fn = n_found - tp, n_truth - tp
    rmse = float(np.sqrt(np.mean(dist**2))) if tp else math.nan
    jaccard = _ratio(tp, tp + fp + fn)

    bias = median = abs_median = rel_std = math.nan
    if tflux is not None and fflux is not None and tp:
        rel = (fflux[fi] - tflux[ti]) / tflux[ti]
        bias, median = float(np.mean(rel)), float(np.median(rel))
        abs_median, rel_std = float(np.median(np.abs(rel))), float(np.std(rel))

    if tp + fp + fn == 0:
        efficiency = math.nan
    else:
        rmse_term = alpha * rmse * pixel_size_nm if tp else 0.0
        efficiency = 100.0 - math.hypot(100.0 - 100.0 * jaccard, rmse_term)

    return MatchResult(
        n_truth=n_truth,
        n_found=n_found,
        n_matched=tp,
        tp=tp,
        fp=fp,
        fn=fn,
        jaccard=jaccard,
        recall=_ratio(tp, n_truth),
        precision=_ratio(tp, n_found),
        rmse=rmse,
        flux_bias_mean=bias,
        flux_bias_median=median,
        flux_error_median_abs=abs_median,
        flux_rel_std=rel_std,
        efficiency=efficiency,
        truth_index=ti,
        found_index=fi,
        distance=dist,
        radius=radius,
        pixel_size_nm=float(pixel_size_nm),
        alpha=float(alpha),
    )


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def _columns(catalog, name: str):
    try:
        x, y = catalog["x"], catalog["y"]
    except (KeyError, IndexError, TypeError, ValueError):
        try:
            array = np.asarray(catalog, dtype=float)
        except (TypeError, ValueError):  # (a dict without "y", say)
            array = np.zeros(0)
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(
                f"{name} must give {name}['x'] and {name}['y'], or be an (n, 2) array of (x, y)"
            ) from None
        return array[:, 0].copy(), array[:, 1].copy(), None
    x = np.asarray(x, dtype=float).reshape(-1)
    y = np.asarray(y, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{name} x and y have different lengths: {x.size} and {y.size}")
    try:
        flux = np.asarray(catalog["flux"], dtype=float).reshape(-1)
    except (KeyError, IndexError, TypeError, ValueError):
        flux = None
    if flux is not None and flux.shape != x.shape:
        raise ValueError(f"{name} flux has {flux.size} values for {x.size} sources")
    return x, y, flux


def _candidate_pairs(tx, ty, fx, fy, radius: float):
    """Every (truth, found) pair within `radius`, found through a grid of cells `>= radius` wide."""
    empty = np.zeros(0, dtype=np.int64)
    t_ok = np.flatnonzero(np.isfinite(tx) & np.isfinite(ty))
    f_ok = np.flatnonzero(np.isfinite(fx) & np.isfinite(fy))
    if t_ok.size == 0 or f_ok.size == 0:
        return empty, empty, np.zeros(0)

    all_x = np.concatenate([tx[t_ok], fx[f_ok]])
    all_y = np.concatenate([ty[t_ok], fy[f_ok]])
    x0, y0 = all_x.min(), all_y.min()
    span = max(all_x.max() - x0, all_y.max() - y0, 1.0)
    if not math.isfinite(radius) or radius >= span:
        ti = np.repeat(t_ok, f_ok.size)
        fi = np.tile(f_ok, t_ok.size)
    else:
        # Cells at least `radius` wide, so a partner is always in one of the 3×3 cells around;
        # never more than 2^20 cells a side, so the cell keys fit in an int64.
        cell = max(radius, span / 2**20)
        ncols = int(span // cell) + 3
        f_key = (np.floor((fx[f_ok] - x0) / cell).astype(np.int64) + 1) * ncols + (
            np.floor((fy[f_ok] - y0) / cell).astype(np.int64) + 1
        )
        order = np.argsort(f_key, kind="stable")
        f_sorted, f_key = f_ok[order], f_key[order]
        t_cx = np.floor((tx[t_ok] - x0) / cell).astype(np.int64) + 1
        t_cy = np.floor((ty[t_ok] - y0) / cell).astype(np.int64) + 1
        ti_parts, fi_parts = [], []
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                key = (t_cx + dx) * ncols + (t_cy + dy)
                start = np.searchsorted(f_key, key, side="left")
                stop = np.searchsorted(f_key, key, side="right")
                count = stop - start
                if not count.any():
                    continue
                ti_parts.append(np.repeat(t_ok, count))
                # Positions start[i] .. stop[i] - 1 for every truth i, in one vectorised step.
                first = np.repeat(start - np.cumsum(count) + count, count)
                fi_parts.append(f_sorted[first + np.arange(count.sum())])
        if not ti_parts:
            return empty, empty, np.zeros(0)
        ti, fi = np.concatenate(ti_parts), np.concatenate(fi_parts)
    dist = np.hypot(tx[ti] - fx[fi], ty[ti] - fy[fi])
    keep = dist <= radius
    return ti[keep].astype(np.int64), fi[keep].astype(np.int64), dist[keep]


def _components(ti, fi, n_truth: int):
    """Connected-component label of each edge of the bipartite radius graph."""
    u, v = ti, fi + n_truth
    nodes = np.unique(np.concatenate([u, v]))
    u, v = np.searchsorted(nodes, u), np.searchsorted(nodes, v)
    label = np.arange(nodes.size)
    while True:
        low = np.minimum(label[u], label[v])
        new = label.copy()
        np.minimum.at(new, u, low)
        np.minimum.at(new, v, low)
        # Labels always name a node of the same component, so following them twice is safe.
        new = new[new]
        if np.array_equal(new, label):
            return label[u]
        label = new


def _optimal_matching(ti, fi, dist, n_truth: int, n_found: int):
    if ti.size == 0:
        return ti, fi, dist
    comp = _components(ti, fi, n_truth)
    _, comp = np.unique(comp, return_inverse=True)
    n_comp = int(comp.max()) + 1
    t_nodes = np.zeros(n_comp, dtype=np.int64)
    f_nodes = np.zeros(n_comp, dtype=np.int64)
    np.add.at(t_nodes, np.unique(np.stack([comp, ti]), axis=1)[0], 1)
    np.add.at(f_nodes, np.unique(np.stack([comp, fi]), axis=1)[0], 1)

    # A component with one source on either side: its shortest edge is the optimum.
    simple = (t_nodes == 1) | (f_nodes == 1)
    on_simple = simple[comp]
    order = np.lexsort((dist[on_simple], comp[on_simple]))
    sc = comp[on_simple][order]
    first = np.ones(sc.size, dtype=bool)
    first[1:] = sc[1:] != sc[:-1]
    chosen = [np.flatnonzero(on_simple)[order][first]]

    hard = np.flatnonzero(~simple)
    if hard.size:
        edge_order = np.argsort(comp, kind="stable")
        bounds = np.searchsorted(comp[edge_order], np.arange(n_comp + 1))
        for c in hard:
            edges = edge_order[bounds[c] : bounds[c + 1]]
            chosen.append(_solve_component(edges, ti, fi, dist))
    pick = np.concatenate(chosen)
    return ti[pick], fi[pick], dist[pick]


def _solve_component(edges, ti, fi, dist):
    rows, r = np.unique(ti[edges], return_inverse=True)
    cols, c = np.unique(fi[edges], return_inverse=True)
    # A missing edge costs more than any set of real ones, so the assignment first maximises the
    # number of real pairs and then minimises their total distance.
    big = 1.0 + float(dist[edges].sum()) * 2.0
    cost = np.full((rows.size, cols.size), big)
    cost[r, c] = dist[edges]
    edge_at = np.full((rows.size, cols.size), -1, dtype=np.int64)
    edge_at[r, c] = edges
    transposed = rows.size > cols.size
    row_of, col_of = _hungarian(cost.T if transposed else cost)
    if transposed:
        row_of, col_of = col_of, row_of
    picked = edge_at[row_of, col_of]
    return picked[picked >= 0]


def _hungarian(cost: np.ndarray):
    """Minimum-cost assignment of every row of an `(n, m)` matrix, `n <= m`, to distinct columns.

    The shortest-augmenting-path Hungarian algorithm with potentials, O(n^2 m), one numpy vector
    operation per step.
    """
    n, m = cost.shape
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: the 1-based row holding column j, 0 if none
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        owner[0] = i
        j0 = 0
        min_v = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = owner[j0]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (reduced < min_v[1:])
            min_v[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, min_v[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[owner[used]] += delta
            v[used] -= delta
            min_v[~used] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    cols = np.flatnonzero(owner[1:]) + 1
    return owner[cols] - 1, cols - 1
