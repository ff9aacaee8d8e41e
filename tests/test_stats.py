import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from nas.stats import holm, holm_adjusted, mcnemar_midp, mutual_information, paired, purity, t_interval, verdict


def arms(moe_acc, dense_acc, n_images=1000, seed=0):
    """Per-image correctness (n_seeds, n_images) with the given per-seed accuracies, independent errors."""
    rng = np.random.default_rng(seed)
    rows = []
    for acc in (moe_acc, dense_acc):
        rows.append(np.stack([rng.permutation(np.arange(n_images) < round(a * n_images)) for a in acc]))
    return rows


def test_t_interval_is_scipys():
    diffs = np.array([0.012, -0.004, 0.021, 0.007])
    mean, low, high = t_interval(diffs, 0.95)
    expected = scipy_stats.t.interval(0.95, 3, loc=diffs.mean(), scale=scipy_stats.sem(diffs))
    assert mean == pytest.approx(diffs.mean())
    assert (low, high) == pytest.approx(expected, rel=1e-12)
    # by hand: mean +- t_{0.975, 3} * sd / sqrt(n)
    half = 3.182446305284263 * diffs.std(ddof=1) / 2
    assert (low, high) == pytest.approx((diffs.mean() - half, diffs.mean() + half), rel=1e-9)


def test_t_interval_edge_cases():
    assert t_interval([0.02]) == (0.02, -math.inf, math.inf)  # one seed: nothing known about the spread
    assert t_interval([0.01, 0.01, 0.01]) == (0.01, 0.01, 0.01)  # no spread: the interval is the point
    with pytest.raises(ValueError, match="non-empty"):
        t_interval([])


@pytest.mark.parametrize("b, c", [(3, 12), (12, 3), (0, 7), (40, 55), (1, 0)])
def test_mcnemar_midp_is_the_exact_binomial_test_less_half_the_observed_point_twice(b, c):
    exact = scipy_stats.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_midp(b, c) == pytest.approx(exact - scipy_stats.binom.pmf(min(b, c), b + c, 0.5), rel=1e-12)
    assert mcnemar_midp(b, c) < exact


def test_mcnemar_without_discordant_pairs_or_with_a_balance_is_one():
    assert mcnemar_midp(0, 0) == 1.0
    assert mcnemar_midp(9, 9) == pytest.approx(1.0)


def test_holm_against_a_hand_computed_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(holm([0.02]), [0.02])  # a family of one is not adjusted


def test_verdicts():
    assert verdict(0.004, 0.03, 0.001) == "beats"
    assert verdict(0.004, 0.03, 0.001, margin=0.005) == "ties"  # inside the margin
    assert verdict(-0.03, -0.01, 0.001, margin=0.005) == "loses"
    assert verdict(0.004, 0.03, 0.2) == "ties"  # the image-level test does not reject
    assert verdict(-math.inf, math.inf, 0.0) == "ties"


def test_paired_beats_with_its_interval_and_counts():
    moe, dense = arms([0.90, 0.91, 0.92], [0.85, 0.85, 0.86])
    result = paired(moe, dense, name="twin", margin=0.01)
    gains = moe.mean(1) - dense.mean(1)
    assert result.gains == pytest.approx(tuple(gains))
    assert (result.gain_mean, result.ci_low, result.ci_high) == pytest.approx(t_interval(gains))
    assert result.moe_only == int((moe & ~dense).sum()) and result.dense_only == int((~moe & dense).sum())
    assert result.p_value == pytest.approx(mcnemar_midp(result.moe_only, result.dense_only))
    assert (result.n_seeds, result.n_images, result.verdict) == (3, 1000, "beats")
    assert paired(dense, moe).verdict == "loses"


def test_one_seed_or_no_difference_ties():
    moe, dense = arms([0.95], [0.80])
    one = paired(moe, dense)
    assert (one.ci_low, one.ci_high, one.verdict) == (-math.inf, math.inf, "ties")
    assert math.isnan(one.gain_sd)
    assert json.loads(json.dumps(one.to_dict()))["ci_low"] is None  # JSON has no infinities
    same = paired(moe.repeat(3, 0), moe.repeat(3, 0))
    assert (same.gain_mean, same.ci_low, same.ci_high, same.p_value, same.verdict) == (0, 0, 0, 1.0, "ties")


def test_study_applies_holm_across_pairs():
    strong = paired(*arms([0.90, 0.91, 0.92], [0.85, 0.85, 0.86]), name="strong")
    dense = np.arange(1000) < 850
    extra = [(np.arange(1000) >= 850) & (np.arange(1000) < 850 + k) for k in (2, 2, 3)]  # MoE also gets these
    weak = paired(np.stack([dense | e for e in extra]), np.stack([dense] * 3), name="weak")  # b = 7, c = 0
    alone = [strong.verdict, weak.verdict]
    adjusted = holm_adjusted([strong, weak, *(paired(*arms([0.85] * 3, [0.85] * 3, seed=s)) for s in range(8))])
    assert [r.p_holm for r in adjusted] == pytest.approx(holm([r.p_value for r in adjusted]).tolist())
    assert alone == ["beats", "beats"]
    assert weak.p_value < 0.05 < adjusted[1].p_holm  # a weak win does not survive ten comparisons
    assert [adjusted[0].verdict, adjusted[1].verdict] == ["beats", "ties"]


def test_paired_rejects_mismatched_arms():
    with pytest.raises(ValueError, match="twin: .* got \\(3, 10\\) and \\(2, 10\\)"):
        paired(np.ones((3, 10)), np.ones((2, 10)), name="twin")


def test_routing_measures():
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3] * 10)
    assert mutual_information(groups, groups) == pytest.approx(2.0)  # 4 equally likely groups
    assert mutual_information(groups, (groups + 1) % 4) == pytest.approx(2.0)  # expert numbers are arbitrary
    assert mutual_information(np.zeros_like(groups), groups) == pytest.approx(0.0)
    assert purity(groups, groups) == 1.0 and purity(np.zeros_like(groups), groups) == 0.25
    assert purity(groups // 2, groups) == 0.5  # two groups per expert
