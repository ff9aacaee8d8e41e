"""Which trials go on at a rung: the multi-objective ASHA of Schmucker et al. (2021), apart from the rungs.

`Rungs` (nas.study) says where a trial is evaluated; `MOASHA.decide(record, reached)` says whether it goes on
(`Continue`) or stops (`Stop(reason)`), as Syne Tune keeps its MOASHA scheduler apart from the budgets. The
ranking is pluggable: any function ordering objective rows best first (`nas.pareto.preference_order`,
non-dominated sorting with ties broken by crowding distance, by default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from nas.fronts import non_dominated_rank, preference_order
from nas.objectives import Objective
from nas.record import TrialRecord
from nas.study import Rungs

Ranking = Callable[[np.ndarray, Sequence[bool]], Sequence[int]]  # (values, maximize) -> row indices, best first


@dataclass(frozen=True)
class Continue:
    """The trial trains on to its next rung (or, at its last rung, is finished)."""


@dataclass(frozen=True)
class Stop:
    """The trial stops here, for `reason`."""

    reason: str


@dataclass(frozen=True)
class MOASHA:
    """Asynchronous successive halving on several objectives: accuracy at the rung, and the study's costs."""

    rungs: Rungs
    objectives: list[Objective]
    rank: Ranking = preference_order

    def decide(self, record: TrialRecord, reached: list[TrialRecord]) -> Continue | Stop:
        """Whether `record`, evaluated at its rung (`record.rung`), goes on: it goes on when it is among the best
        max(1, n // reduction_factor) of the n trials of its kind (dense or MoE) that reached the rung, itself
        included, ranked by `rank` on (accuracy at the rung, the study's costs). While fewer than
        reduction_factor trials have reached the rung, it goes on when no other dominates it (single-objective
        ASHA's bootstrap, "the best so far", is this for one objective). Its last rung stops no trial.
        `reached`: every trial's record (other kinds and rungs are skipped)."""
        rung = record.rung
        if rung == self.rungs.steps[-1]:
            return Continue()
        costs = [o for o in self.objectives if o.metric != "accuracy"]
        pool = {r.number: r for r in reached if r.kind == record.kind and rung in r.rung_accuracy}
        pool[record.number] = record
        numbers = sorted(pool)
        values = np.array([[pool[n].rung_accuracy[rung], *(pool[n].metrics.value(o) for o in costs)]
                           for n in numbers], dtype=float)
        maximize = [True] + [False] * len(costs)
        order = [numbers[i] for i in self.rank(values, maximize)]
        position, keep = order.index(record.number), max(1, len(order) // self.rungs.reduction_factor)
        bootstrap = len(order) < self.rungs.reduction_factor
        if position < keep or bootstrap and non_dominated_rank(values, maximize)[numbers.index(record.number)] == 0:
            return Continue()
        return Stop(f"stopped at rung {rung} steps: ranked {position + 1} of {len(order)} {record.kind} trials there "
                    f"on accuracy{''.join(', ' + o.name for o in costs)}; the best {keep} go on")


__all__ = ["MOASHA", "Continue", "Ranking", "Stop"]
