"""Study objectives: what a study can optimise, which trial metric holds it, and which way is better.

One definition used by the study config, the search, Pareto analysis, reports and export. Kept free of
heavy imports: the command line builds its choices from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    """A study objective: the metric a trial records for it, and which way is better."""

    name: str  # accuracy, flops, latency or params: what a study config lists
    metric: str  # the `Metrics` field holding it
    maximize: bool

    @property
    def direction(self) -> str:
        return "maximize" if self.maximize else "minimize"


OBJECTIVES = {o.name: o for o in (
    Objective("accuracy", "accuracy", maximize=True),
    Objective("flops", "flops", maximize=False),
    Objective("latency", "latency_ms", maximize=False),
    Objective("params", "params_active", maximize=False),
)}


def objectives_for(names: list[str]) -> list[Objective]:
    """The Objectives of `names`; distinct known names only."""
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"objectives must be distinct names among {', '.join(OBJECTIVES)}, got {names}")
    return [OBJECTIVES[n] for n in names]


__all__ = ["OBJECTIVES", "Objective", "objectives_for"]
