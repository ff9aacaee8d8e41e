"""nas.fronts.dominated_volume: the exact hypervolume, checked against volumes computed by hand."""

import numpy as np
import pytest

from nas.fronts import dominated_volume


def test_one_objective_is_the_length_to_the_reference():
    assert dominated_volume(np.array([[3.0], [1.0], [2.0]]), np.array([5.0])) == 4.0


def test_two_objectives_staircase():
    # boxes [1,4]x[3,4], [2,4]x[1,4], [3,4]x[2,4] (dominated by the second): 1*1 + 2*3 = 7
    loss = np.array([[1.0, 3.0], [2.0, 1.0], [3.0, 2.0]])
    assert dominated_volume(loss, np.array([4.0, 4.0])) == pytest.approx(7.0)


def test_duplicates_and_a_point_on_the_reference_add_nothing():
    loss = np.array([[1.0, 3.0], [1.0, 3.0], [4.0, 0.0], [2.0, 1.0]])
    assert dominated_volume(loss, np.array([4.0, 4.0])) == pytest.approx(7.0)


def test_three_objectives_by_inclusion_exclusion():
    # two boxes to (2, 2, 2): [0,2]x[1,2]x[0,2] (volume 4) and [1,2]x[0,2]x[1,2] (volume 2), overlapping in
    # [1,2]x[1,2]x[1,2] (volume 1): 4 + 2 - 1 = 5
    loss = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert dominated_volume(loss, np.array([2.0, 2.0, 2.0])) == pytest.approx(5.0)


def test_three_objectives_single_box_and_order_independence():
    rng = np.random.default_rng(0)
    loss = rng.uniform(0, 1, size=(30, 3))
    reference = np.array([1.0, 1.0, 1.0])
    shuffled = loss[rng.permutation(len(loss))]
    assert dominated_volume(loss, reference) == pytest.approx(dominated_volume(shuffled, reference))
    assert dominated_volume(np.array([[0.5, 0.25, 0.0]]), reference) == pytest.approx(0.5 * 0.75 * 1.0)


def test_three_objectives_against_a_grid_count():
    """A 3-D front on integer coordinates: the volume is the count of unit cells some row dominates."""
    loss = np.array([[0, 3, 2], [1, 1, 3], [2, 0, 1], [3, 2, 0], [1, 2, 1]], dtype=float)
    reference = np.array([4.0, 4.0, 4.0])
    cells = np.stack(np.meshgrid(*[np.arange(4) + 0.5] * 3, indexing="ij"), -1).reshape(-1, 3)
    covered = (cells[:, None, :] >= loss[None]).all(-1).any(1).sum()
    assert dominated_volume(loss, reference) == pytest.approx(float(covered))


def test_nothing_has_no_volume():
    assert dominated_volume(np.empty((0, 3)), np.ones(3)) == 0.0
