"""The pairs a confirmation compares: each top MoE of the search against dense models of no more cost.

For each of the top K MoEs of the MoE front (by accuracy), (a) its FLOPs twin, the same architecture
with E=0 (equal FLOPs at k=1), (b) the most accurate dense trial of no more FLOPs, (c) the most accurate dense
trial of no more latency, within a tie band measured on the study: the median over its trials of the relative
spread of one timing, (p90 - p10) / (2.563 median), the interdecile range as a normal sd (robust to the rare
slow calls that inflate `latency_cv`), so two latencies closer than a timing's noise count as equal; a
predicted latency's spread is its model's stated bound (95% of its errors within it) as a normal sd. (b) is
left out where it is the twin. A (MoE, dense) pair is tested once: where (c) is the same dense model as (a) or
(b), that pair also answers the latency question (`also`), so Holm adjusts over distinct pairs only. The band is
capped at `confirm.max_latency_band`: a wider one (a loaded machine) is a warning and makes the latency
verdicts unreliable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from nas.fronts import non_dominated_rank
from nas.objectives import objectives_for
from nas.record import TrialRecord
from search_spaces import ArchConfig

COSTS = {"twin": "flops", "flops": "flops", "latency": "latency"}  # comparator -> the cost its arms are matched on


@dataclass(frozen=True)
class Pair:
    """One comparison: an MoE of the search and a dense comparator, matched on one cost."""

    moe: ArchConfig
    dense: ArchConfig
    comparator: str  # "twin" (same architecture, E=0), "flops" or "latency" (the best dense of no more cost)
    moe_trial: int
    dense_trial: int | None  # None: the twin was not a trial of the search
    moe_costs: dict  # {"flops": ..., "latency_ms": ...} as the search measured them (None: not measured)
    dense_costs: dict
    also: tuple[str, ...] = ()  # other comparators this same dense model is (one test answers them all)

    @property
    def cost(self) -> str:
        return COSTS[self.comparator]

    @property
    def name(self) -> str:
        return f"{self.moe.name} vs {self.dense.name} ({self.comparator})"

    def to_dict(self) -> dict:
        return {"moe_yaml": self.moe.to_yaml(), "dense_yaml": self.dense.to_yaml(), "comparator": self.comparator,
                "cost": self.cost, "moe_trial": self.moe_trial, "dense_trial": self.dense_trial,
                "moe_name": self.moe.name, "dense_name": self.dense.name, "moe_costs": self.moe_costs,
                "dense_costs": self.dense_costs, "also": list(self.also)}


def _costs(r: TrialRecord) -> dict:
    return {"flops": r.metrics.flops, "latency_ms": r.metrics.latency_ms}


INTERDECILE_SDS = 2 * 1.2816  # p90 - p10 of a normal distribution, in standard deviations
NORMAL_95 = 1.96  # 95% of a normal distribution lies within this many standard deviations of its mean


def timing_spread(latency: dict | None) -> float | None:
    """One timing's robust relative spread, (p90 - p10) / (2.563 median) (`LatencyStats.to_dict`); None: no
    percentiles."""
    t = latency or {}
    if t.get("median") and t.get("p10") is not None and t.get("p90") is not None:
        return (t["p90"] - t["p10"]) / (INTERDECILE_SDS * t["median"])
    return None


def latency_band(rs: list[TrialRecord]) -> float:
    """The latency tie band: the median over trials of their latency's relative spread, a measured timing's
    robust one or a prediction's bound as an sd (0: no trial has a latency)."""
    spreads = [s for r in rs if r.profile and (s := latency_spread(r.profile)) is not None]
    return float(np.median(spreads)) if spreads else 0.0


def latency_spread(profile) -> float | None:
    if profile.latency:
        return timing_spread(profile.latency.to_dict())
    if profile.prediction:  # without this, predicted latencies tied only when equal: a band of 0
        return profile.prediction.bound_pct / 100 / NORMAL_95
    return None


def latency_warning(settings: dict) -> str | None:
    """Why the latency verdicts of a confirmation (its `Settings.to_dict`) cannot be trusted, or None: the
    measured tie band or the anchor's own spread beyond the limit, timings too noisy to tell latencies apart."""
    limit = settings.get("latency_band_limit")
    if limit is None:  # stored before the limit existed
        return None
    measured, anchor = settings.get("latency_band_measured") or 0.0, settings.get("anchor_spread")
    problems = []
    if measured > limit:
        problems.append(f"the latency tie band measured {measured:.0%}")
    if anchor is not None and anchor > limit:
        problems.append(f"the latency anchor's spread is {anchor:.0%}")
    if not problems:
        return None
    return (f"latency verdicts are unreliable: {' and '.join(problems)}, beyond the limit of {limit:.0%} "
            f"(confirm.max_latency_band; the band was capped at {settings['latency_band']:.1%}): timings this "
            "noisy come from a loaded machine (a predicted band, from a latency model this loose); measure again on "
            "a quiet one, or raise the limit in the study config")


def comparable(rs: list[TrialRecord]) -> list[TrialRecord]:
    """Trials that completed the top rung, feasible, not re-runs: the ones comparable with each other."""
    return [r for r in rs if r.status == "complete" and r.duplicate_of is None and r.metrics.accuracy is not None]


def top_moes(rs: list[TrialRecord], k: int, objectives: list[str]) -> list[TrialRecord]:
    """The top `k` MoEs by the MoE fronts of the study's objectives: the front's, most accurate first, then
    (where the front holds fewer than `k`) the next front's, so a study whose best MoE dominates the others
    still confirms `k`."""
    objs = objectives_for(objectives)
    moes = [r for r in comparable(rs) if r.kind == "moe" and all(r.metrics.value(o) is not None for o in objs)]
    if not moes:
        return []
    values = np.array([[r.metrics.value(o) for o in objs] for r in moes], dtype=float)
    ranks = non_dominated_rank(values, [o.maximize for o in objs])
    order = sorted(range(len(moes)), key=lambda i: (ranks[i], -moes[i].metrics.accuracy, moes[i].number))
    return [moes[i] for i in order[:k]]


def best_dense(dense: list[TrialRecord], metric: str, limit: float | None) -> TrialRecord | None:
    """The most accurate dense trial whose `metric` is at most `limit` (ties: the cheaper, the earlier)."""
    if limit is None:
        return None
    fits = [r for r in dense if getattr(r.metrics, metric) is not None and getattr(r.metrics, metric) <= limit]
    return min(fits, key=lambda r: (-r.metrics.accuracy, getattr(r.metrics, metric), r.number), default=None)


def select_pairs(rs: list[TrialRecord], k: int, objectives: list[str], *, band: float | None = None) -> list[Pair]:
    """The pairs to confirm (see the module docstring); `band` defaults to `latency_band(rs)`."""
    band = latency_band(rs) if band is None else band
    dense = [r for r in comparable(rs) if r.kind == "dense"]
    by_hash = {r.arch.config_hash(): r for r in dense}
    pairs = []
    for m in top_moes(rs, k, objectives):
        twin = m.arch.dense()
        twin_trial = by_hash.get(twin.config_hash())
        twin_costs = _costs(twin_trial) if twin_trial else {"flops": _flops(twin), "latency_ms": None}
        pairs.append(Pair(m.arch, twin, "twin", m.number, twin_trial and twin_trial.number, _costs(m), twin_costs))
        latency = m.metrics.latency_ms
        for comparator, found in (("flops", best_dense(dense, "flops", m.metrics.flops)),
                                  ("latency", best_dense(dense, "latency_ms", latency and latency * (1 + band)))):
            if found is None:
                continue
            same = next((i for i, p in enumerate(pairs) if p.moe_trial == m.number and p.dense == found.arch), None)
            if same is None:
                pairs.append(Pair(m.arch, found.arch, comparator, m.number, found.number, _costs(m), _costs(found)))
            elif COSTS[comparator] != pairs[same].cost:  # the same test answers the other cost too
                pairs[same] = dataclasses.replace(pairs[same], also=(*pairs[same].also, comparator))
    return pairs


def _flops(arch: ArchConfig) -> int:
    from profilers import count_flops

    return count_flops(arch).total


__all__ = ["COSTS", "INTERDECILE_SDS", "Pair", "best_dense", "comparable", "latency_band", "latency_warning",
           "select_pairs", "timing_spread", "top_moes"]
