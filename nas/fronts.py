"""Pareto fronts of objective vectors: non-dominated rank, NSGA-II's crowding distance, the preference order
that both the rung policy and the confirmation's choice of MoEs rank by, the reference point and the normalised
hypervolume. Plain numpy on arrays (rows: trials, columns: objectives), knowing nothing of studies or records.
"""

from __future__ import annotations

import numpy as np

from nas.objectives import Objective

COST_REFERENCE_FACTOR = 1.1  # a cost's reference point: 10% above the costliest trial, so it still counts


def _losses(values: np.ndarray, maximize: list[bool]) -> np.ndarray:
    """Every objective as one to minimise."""
    return np.where(maximize, -1.0, 1.0) * np.asarray(values, dtype=float).reshape(len(values), len(maximize))


def non_dominated_rank(values: np.ndarray, maximize: list[bool]) -> np.ndarray:
    """Rank of each row (0: the Pareto front; k: the front once ranks < k are removed). A row dominates
    another when it is no worse in every objective and better in one, so identical rows share a rank."""
    loss = _losses(values, maximize)
    no_worse = (loss[:, None, :] <= loss[None, :, :]).all(-1)
    better = (loss[:, None, :] < loss[None, :, :]).any(-1)
    dominates = no_worse & better  # [i, j]: row i dominates row j
    rank = np.full(len(loss), -1)
    remaining = np.ones(len(loss), dtype=bool)
    level = 0
    while remaining.any():
        front = remaining & ~dominates[remaining].any(0)
        rank[front] = level
        remaining &= ~front
        level += 1
    return rank


def crowding_distance(values: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each row within its front: the sum over objectives of the gap between
    its neighbours, divided by the front's range; a front's extremes get infinity. Larger is lonelier."""
    values = np.asarray(values, dtype=float).reshape(len(ranks), -1)
    distance = np.zeros(len(values))
    for level in np.unique(ranks):
        members = np.flatnonzero(ranks == level)
        if len(members) < 3:
            distance[members] = np.inf
            continue
        for column in values[members].T:
            order = np.argsort(column, kind="stable")
            distance[members[order[[0, -1]]]] = np.inf
            span = column[order[-1]] - column[order[0]]
            if span > 0:
                distance[members[order[1:-1]]] += (column[order[2:]] - column[order[:-2]]) / span
    return distance


def preference_order(values: np.ndarray, maximize: list[bool]) -> np.ndarray:
    """Row indices best first: by non-dominated rank, then by crowding distance (lonelier first), then row."""
    ranks = non_dominated_rank(values, maximize)
    crowding = crowding_distance(_losses(values, maximize), ranks)
    return np.lexsort((np.arange(len(ranks)), -crowding, ranks))


def reference_point(values: np.ndarray, objectives: list[Objective]) -> np.ndarray:
    """Accuracy's reference is 0 (no accuracy); a cost's is 10% above the largest cost in `values`."""
    values = np.asarray(values, dtype=float).reshape(-1, len(objectives))
    reference = []
    for i, objective in enumerate(objectives):
        if objective.maximize:
            reference.append(0.0)
            continue
        worst = np.nanmax(values[:, i]) if np.isfinite(values[:, i]).any() else np.nan  # NaN: nothing to refer to
        reference.append(COST_REFERENCE_FACTOR * worst if not worst <= 0 else 1.0)  # all-zero costs: any scale
    return np.asarray(reference)


def hypervolume(values: np.ndarray, objectives: list[Objective], reference: np.ndarray) -> float:
    """The share of the box between the ideal point (accuracy 1, cost 0) and `reference` that the rows
    dominate: costs are divided by their reference, so the result lies in [0, 1] for any units."""
    values = np.asarray(values, dtype=float).reshape(-1, len(objectives))
    if not len(values):
        return 0.0
    maximize = [o.maximize for o in objectives]
    scale = np.where(maximize, 1.0, np.asarray(reference, dtype=float))
    loss = _losses(values / scale, maximize)
    ref = _losses(np.asarray(reference, dtype=float)[None] / scale, maximize)[0]
    inside = (loss <= ref).all(1)  # rows worse than the reference in some objective add nothing
    return dominated_volume(loss[inside], ref)


def dominated_volume(loss: np.ndarray, reference: np.ndarray) -> float:
    """Exact volume of the union of the boxes [row, reference] (every objective minimised, every row <= the
    reference): in one objective a length, in two a sweep over the sorted rows, in more slices along the last
    objective, each the volume of the rows below it in the others. Our studies have 2 or 3 objectives."""
    loss, reference = np.asarray(loss, dtype=float), np.asarray(reference, dtype=float)
    if not len(loss):
        return 0.0
    if loss.shape[1] == 1:
        return float(reference[0] - loss[:, 0].min())
    if loss.shape[1] == 2:
        order = np.lexsort((loss[:, 1], loss[:, 0]))
        x, lowest_y = loss[order, 0], np.minimum.accumulate(loss[order, 1])
        widths = np.diff(np.append(x, reference[0]))  # from each row's x to the next row's (the last: reference)
        return float((widths * (reference[1] - lowest_y)).sum())
    no_worse = np.logical_and.reduce([column[:, None] <= column[None] for column in loss.T])  # per column: fast
    better = np.logical_or.reduce([column[:, None] < column[None] for column in loss.T])
    dominated = (no_worse & better).any(0)
    loss = loss[~dominated]  # dominated rows add nothing; dropping them first keeps the slices small
    loss = loss[np.argsort(loss[:, -1], kind="stable")]
    tops = np.append(loss[1:, -1], reference[-1])
    return float(sum((top - loss[i, -1]) * dominated_volume(loss[: i + 1, :-1], reference[:-1])
                     for i, top in enumerate(tops) if top > loss[i, -1]))


__all__ = ["COST_REFERENCE_FACTOR", "crowding_distance", "dominated_volume", "hypervolume", "non_dominated_rank",
           "preference_order", "reference_point"]
