"""The rung policy (multi-objective ASHA) on hand-made records: its verdicts, and its pluggable ranking."""

from optuna.trial import TrialState

from nas.fronts import preference_order
from nas.objectives import objectives_for
from nas.record import Metrics, TrialRecord
from nas.rung_policy import MOASHA, Continue, Stop
from nas.study import Rungs
from search_spaces import ArchConfig

ARCH = ArchConfig(image_size=16, in_channels=1, patch_size=4, num_classes=12, depth=2, width=16, num_heads=2)
RUNGS = Rungs((10, 30), reduction_factor=3)
OBJECTIVES = objectives_for(["accuracy", "flops"])


def at_rung(number: int, accuracy: float, rung: int = 10) -> TrialRecord:
    return TrialRecord(number=number, state=TrialState.RUNNING, arch=ARCH, rung=rung,
                       rung_accuracy={rung: accuracy}, metrics=Metrics(flops=1000))


def test_the_best_third_of_a_rung_goes_on_and_the_rest_stop_with_their_rank():
    reached = [at_rung(0, 0.9), at_rung(1, 0.5), at_rung(2, 0.7)]
    policy = MOASHA(RUNGS, OBJECTIVES)
    assert policy.decide(reached[0], reached) == Continue()
    assert policy.decide(reached[1], reached) == Stop("stopped at rung 10 steps: ranked 3 of 3 dense trials there "
                                                      "on accuracy, flops; the best 1 go on")
    assert isinstance(policy.decide(reached[2], reached), Stop)


def test_the_last_rung_stops_no_trial():
    reached = [at_rung(0, 0.9, 30), at_rung(1, 0.5, 30), at_rung(2, 0.7, 30)]
    assert MOASHA(RUNGS, OBJECTIVES).decide(reached[1], reached) == Continue()


def test_the_ranking_is_pluggable():
    """A ranking that puts the least accurate first: the policy follows it, not its default."""
    reached = [at_rung(0, 0.9), at_rung(1, 0.5), at_rung(2, 0.7)]
    worst_first = MOASHA(RUNGS, OBJECTIVES, rank=lambda values, maximize: preference_order(values, maximize)[::-1])
    assert worst_first.decide(reached[1], reached) == Continue()
    assert worst_first.decide(reached[0], reached) == Stop("stopped at rung 10 steps: ranked 3 of 3 dense trials "
                                                           "there on accuracy, flops; the best 1 go on")
