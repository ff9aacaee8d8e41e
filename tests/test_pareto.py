"""Non-dominated sorting, fronts, hypervolumes and the beats-dense table on hand-made trials with known answers."""

import math

import numpy as np
import optuna
import pandas as pd
import pytest
from pareto_trials import study, trial

from nas.fronts import crowding_distance, hypervolume, non_dominated_rank, preference_order, reference_point
from nas.objectives import objectives_for
from nas.pareto import (
    analyze,
    beats_dense,
    trials_frame,
)

ACC_FLOPS = objectives_for(["accuracy", "flops"])


def test_rank_puts_ties_on_one_front_and_peels_fronts_in_order():
    values = np.array([[0.9, 200], [0.8, 100], [0.7, 150], [0.9, 200], [0.6, 300]])
    assert non_dominated_rank(values, [True, False]).tolist() == [0, 0, 1, 0, 2]


def test_rank_with_one_objective_is_the_order_of_its_values():
    assert non_dominated_rank(np.array([[0.5], [0.9], [0.9], [0.1]]), [True]).tolist() == [1, 0, 0, 2]
    assert non_dominated_rank(np.array([[3.0], [1.0], [2.0]]), [False]).tolist() == [2, 0, 1]


def test_rank_of_nothing_is_empty():
    assert non_dominated_rank(np.empty((0, 2)), [True, False]).tolist() == []


def test_reference_point_is_zero_accuracy_and_ten_percent_above_the_largest_cost():
    ref = reference_point(np.array([[0.5, 50], [0.8, 100]]), ACC_FLOPS)
    assert ref.tolist() == pytest.approx([0.0, 110.0])


def test_hypervolume_2d_known_answer_and_dominated_points_add_nothing():
    # Costs over 110: boxes 0.5 x (1 - 50/110) and, beyond it, (0.8 - 0.5) x (1 - 100/110): 33/110 = 0.3.
    ref = np.array([0.0, 110.0])
    assert hypervolume(np.array([[0.5, 50], [0.8, 100]]), ACC_FLOPS, ref) == pytest.approx(0.3)
    assert hypervolume(np.array([[0.5, 50], [0.8, 100], [0.4, 100], [0.5, 50]]), ACC_FLOPS, ref) == pytest.approx(0.3)


def test_hypervolume_3d_is_inclusion_exclusion_of_two_boxes():
    objectives = objectives_for(["accuracy", "flops", "latency"])
    values = np.array([[0.5, 10, 2.0], [0.8, 20, 1.0]])
    ref = reference_point(values, objectives)
    assert ref.tolist() == pytest.approx([0.0, 22.0, 2.2])
    box1 = 0.5 * (1 - 10 / 22) * (1 - 2 / 2.2)
    box2 = 0.8 * (1 - 20 / 22) * (1 - 1 / 2.2)
    both = 0.5 * (1 - 20 / 22) * (1 - 2 / 2.2)
    assert hypervolume(values, objectives, ref) == pytest.approx(box1 + box2 - both)


def test_hypervolume_single_objective_degenerate_cases():
    assert hypervolume(np.array([[0.5], [0.9]]), objectives_for(["accuracy"]), np.array([0.0])) == pytest.approx(0.9)
    flops = objectives_for(["flops"])
    assert hypervolume(np.array([[50.0], [80.0]]), flops, np.array([100.0])) == pytest.approx(0.5)
    assert hypervolume(np.empty((0, 1)), flops, np.array([100.0])) == 0.0


def test_analysis_leaves_out_infeasible_duplicate_early_stopped_and_invalid_trials():
    s = study([
        trial("dense", 0.8, 100, 1.0),
        trial("moe", 0.85, 100, 1.2),
        trial("dense", 0.0, 500, 9.0, constraint=0.5),
        trial("moe", 0.85, 100, 1.2, duplicate_of=1),
    ])
    s.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED,
                                          user_attrs=trial("moe", 0.99, 1, 0.1)["user_attrs"]))  # early-stopped
    s.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))  # an invalid sample
    a = analyze(s)
    assert a.trials["trial"].tolist() == [0, 1, 2, 3, 4]  # the invalid sample has no architecture: no row
    assert a.trials["eligible"].tolist() == [True, True, False, False, False]
    assert a.ranked["trial"].tolist() == [0, 1]
    assert set(a.front()["trial"]) == {0, 1}  # the MoE is more accurate, the dense one faster: both on the front
    assert a.reference == pytest.approx({"accuracy": 0.0, "flops": 110.0, "latency": 1.32})  # infeasible costs ignored


def test_ties_share_the_front_and_fronts_split_by_kind():
    s = study([trial("dense", 0.8, 100), trial("dense", 0.8, 100), trial("dense", 0.7, 150), trial("moe", 0.9, 300),
               trial("moe", 0.85, 400)], objectives=("accuracy", "flops"))
    a = analyze(s)
    assert a.front()["trial"].tolist() == [3, 0, 1]  # by accuracy, best first; the two ties both on it
    assert set(a.front("dense")["trial"]) == {0, 1}
    assert set(a.front("moe")["trial"]) == {3}
    assert a.trials.set_index("trial")["rank"].to_dict() == {0: 0, 1: 0, 2: 1, 3: 0, 4: 1}
    # Reference flops 440: dense front covers 0.8 x (1 - 100/440); the MoE adds 0.1 x (1 - 300/440).
    assert a.hypervolume["dense"] == pytest.approx(0.8 * 340 / 440)
    assert a.hypervolume["moe"] == pytest.approx(0.9 * 140 / 440)
    assert a.hypervolume["overall"] == pytest.approx(0.8 * 340 / 440 + 0.1 * 140 / 440)


def test_all_dense_study_has_no_moe_front_and_nothing_beats_dense():
    a = analyze(study([trial("dense", 0.8, 100, 1.0), trial("dense", 0.9, 200, 2.0)]))
    assert a.front("moe").empty and math.isnan(a.hypervolume["moe"])
    assert len(a.front("dense")) == 2 and a.hypervolume["dense"] == a.hypervolume["overall"] > 0
    assert a.comparisons.empty and a.beats_dense.empty


def test_all_moe_study_has_comparisons_without_baselines():
    a = analyze(study([trial("moe", 0.8, 100, 1.0), trial("moe", 0.7, 200, 2.0)]))
    assert a.front("dense").empty and a.front()["trial"].tolist() == [0]
    assert a.comparisons["trial"].tolist() == [0, 1]
    assert a.comparisons["gain_flops"].isna().all() and not a.comparisons["beats_dense"].any()


def test_trials_missing_an_objective_are_left_out_with_a_note():
    s = study([trial("dense", 0.8, 100, None), trial("moe", 0.9, 100, 1.0)], objectives=("accuracy", "flops"))
    assert analyze(s).ranked["trial"].tolist() == [0, 1] and not analyze(s).notes
    with_latency = analyze(s, objectives=["accuracy", "flops", "latency"])
    assert with_latency.ranked["trial"].tolist() == [1]
    assert any("latency_ms" in note for note in with_latency.notes)


BEATS = [
    trial("dense", 0.70, 100, 1.0),  # 0
    trial("dense", 0.80, 200, 2.0),  # 1
    trial("dense", 0.75, 150, 3.0),  # 2
    trial("moe", 0.78, 160, 1.5),  # 3: +0.03 over 2 at equal FLOPs, +0.08 over 0 at equal latency
    trial("moe", 0.79, 90, 0.5),  # 4: cheaper than every dense model: nothing to compare with
    trial("moe", 0.60, 250, 5.0),  # 5: -0.20 against 1 at both
    trial("moe", 0.85, 200, 2.0),  # 6: +0.05 over 1: equal cost counts as "no larger"
]


def test_beats_dense_finds_the_best_dense_of_no_larger_cost():
    table = analyze(study(BEATS)).comparisons.set_index("trial")
    assert table.loc[3, "dense_flops_trial"] == 2 and table.loc[3, "gain_flops"] == pytest.approx(0.03)
    assert table.loc[3, "dense_latency_trial"] == 0 and table.loc[3, "gain_latency"] == pytest.approx(0.08)
    assert table.loc[6, "dense_flops_trial"] == 1 and table.loc[6, "gain_flops"] == pytest.approx(0.05)
    assert table.loc[5, "gain_flops"] == pytest.approx(-0.2) and not table.loc[5, "beats_dense"]
    assert math.isnan(table.loc[4, "gain_flops"]) and pd.isna(table.loc[4, "dense_flops_trial"])
    assert not table.loc[4, "beats_dense"]


def test_beats_dense_is_ranked_by_gain_and_respects_the_margin():
    a = analyze(study(BEATS))
    assert a.comparisons["trial"].tolist() == [6, 3, 5, 4]  # by gain at equal FLOPs, no baseline last
    assert a.beats_dense["trial"].tolist() == [6, 3]
    frame = trials_frame(study(BEATS))
    assert beats_dense(frame, margin=0.04)["beats_flops"].tolist() == [True, False, False, False]
    assert beats_dense(frame, margin=0.04)["beats_dense"].tolist() == [True, True, False, False]  # 3: latency +0.08
    assert not beats_dense(frame, margin=0.1)["beats_dense"].any()


def test_beats_dense_breaks_accuracy_ties_by_the_cheaper_dense_model():
    s = study([trial("dense", 0.8, 200, 2.0), trial("dense", 0.8, 120, 2.0), trial("moe", 0.85, 200, 2.0)])
    row = analyze(s).comparisons.iloc[0]
    assert row["dense_flops_trial"] == 1 and row["dense_latency_trial"] == 0  # latency tie: the earlier trial


def test_beats_dense_ignores_infeasible_and_duplicate_dense_trials():
    s = study([trial("dense", 0.9, 100, 1.0, constraint=0.1),
               trial("dense", 0.95, 100, 1.0, duplicate_of=0), trial("moe", 0.8, 100, 1.0)])
    assert analyze(s).comparisons["gain_flops"].isna().all()


def test_crowding_distance_and_preference_order_by_hand():
    # accuracy up, FLOPs down: rows 0-3 are the front, row 4 is dominated by row 2
    values = np.array([[0.9, 10], [0.8, 5], [0.85, 7], [0.7, 4], [0.6, 8]])
    ranks = non_dominated_rank(values, [True, False])
    assert ranks.tolist() == [0, 0, 0, 0, 1]
    # row 1: accuracy neighbours 0.85 and 0.7 over a 0.2 range, FLOPs neighbours 7 and 4 over 6: 0.75 + 0.5
    assert crowding_distance(values, ranks) == pytest.approx([np.inf, 1.25, 0.5 + 5 / 6, np.inf, np.inf])
    assert preference_order(values, [True, False]).tolist() == [0, 3, 2, 1, 4]  # extremes, lonelier, dominated
