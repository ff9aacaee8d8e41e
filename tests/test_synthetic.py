"""`synthetic:mode=specialised`: super-classes by a coarse pattern, classes within one by a cue of its own kind."""

import re

import numpy as np
import pytest

from nas.data import load_dataset
from nas.datasets import DataError
from nas.synthetic import CUE_KINDS, make_synthetic


@pytest.fixture(scope="module")
def raw():
    return make_synthetic(size=16, classes=16, groups=4, train=4000, test=10, seed=1, mode="specialised")


def test_specialised_is_deterministic_per_seed_and_balanced(raw):
    again = make_synthetic(size=16, classes=16, groups=4, train=4000, test=10, seed=1, mode="specialised")
    np.testing.assert_array_equal(raw.x, again.x)
    np.testing.assert_array_equal(raw.x_test, again.x_test)
    other = make_synthetic(size=16, classes=16, groups=4, train=4000, test=10, seed=2, mode="specialised")
    assert not np.array_equal(raw.x, other.x)
    assert np.bincount(raw.superclasses).tolist() == [4, 4, 4, 4]
    for c, name in enumerate(raw.class_names):  # the name says the group and its cue kind
        assert name.startswith(f"g{raw.superclasses[c]}-{CUE_KINDS[raw.superclasses[c]]}")


def test_specialised_plants_one_cue_kind_per_super_class(raw):
    x, y = raw.x[:, 0].astype(float), raw.y
    group = raw.superclasses[y]
    group_means = np.stack([x[group == g].mean(0) for g in range(4)])
    nearest = ((x[:, None] - group_means[None]) ** 2).sum((2, 3)).argmin(1)
    assert (nearest == group).mean() > 0.95  # the super-class is easy to see: a router's job
    residual = x - group_means[group]  # what tells the classes of a group apart
    power = np.abs(np.fft.fft2(residual)) ** 2
    power[:, 0, 0] = 0
    ky, kx = np.meshgrid(np.fft.fftfreq(16) * 16, np.fft.fftfreq(16) * 16, indexing="ij")

    def per_class(g, statistic):  # in the order of the classes' setting (their index within the group)
        return [statistic(y == c) for c in np.flatnonzero(raw.superclasses == g)]

    cycles = per_class(0, lambda m: (power[m] * np.hypot(ky, kx)).sum() / power[m].sum())
    assert np.all(np.diff(cycles) > 0.2), cycles  # frequency rises with the class
    doubled = per_class(1, lambda m: np.angle((power[m] * np.exp(2j * np.arctan2(ky, kx))).sum()))
    angles = np.degrees(np.mod(np.array(doubled) / 2, np.pi))
    planted = np.arange(4) * 45.0
    assert np.abs((angles - planted + 90) % 180 - 90).max() < 5, angles  # orientation: 0, 45, 90, 135 degrees
    peaks = per_class(2, lambda m: np.unravel_index(residual[m].mean(0).argmax(), (16, 16)))
    assert len(set(peaks)) == 4  # a blob at a place of its own
    area = per_class(3, lambda m: (residual[m].mean(0) > residual[m].mean(0).max() / 2).sum())
    assert np.all(np.diff(area) > 0), area  # blob size rises with the class


def test_specialised_by_name_and_its_errors():
    data = load_dataset("synthetic:mode=specialised,classes=8,groups=3,train=100,test=10")
    assert (data.num_classes, sorted(set(data.superclasses.tolist()))) == (8, [0, 1, 2])
    with pytest.raises(DataError, match=re.escape("bad option 'mode=special'; expected key=integer")) as error:
        load_dataset("synthetic:mode=special")
    assert "mode=hierarchy|specialised" in str(error.value)
    with pytest.raises(DataError, match=re.escape("4 cue kinds (frequency, orientation, position, size), one per "
                                                  "group, so groups must be <= 4, got 5")):
        load_dataset("synthetic:mode=specialised,groups=5,classes=10")


def _level(x: np.ndarray) -> np.ndarray:
    """The grey level in [0, 1) that `mode=lookup` paints over an image's top-left quarter."""
    half = x.shape[-1] // 2
    return ((x[:, 0, :half, :half].astype(float).mean((1, 2)) - 128) / 100 + 1) / 2


def _consistency(cells: np.ndarray, y: np.ndarray) -> float:
    """The share of images whose class is the most common class of their cell."""
    majority = {c: np.bincount(y[cells == c]).argmax() for c in np.unique(cells)}
    return float(np.mean([majority[c] == label for c, label in zip(cells, y)]))


def test_lookup_labels_are_a_table_of_the_level_with_boundaries_of_each_super_class():
    raw = make_synthetic(size=8, classes=16, groups=4, train=4000, test=10, seed=1, mode="lookup", bins=8)
    again = make_synthetic(size=8, classes=16, groups=4, train=4000, test=10, seed=1, mode="lookup", bins=8)
    np.testing.assert_array_equal(raw.x, again.x)
    assert raw.superclasses.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    group, level = raw.superclasses[raw.y], _level(raw.x)
    assert abs(level.min()) < 0.01 and abs(level.max() - 1) < 0.01
    shifted = group * 100 + np.floor(8 * level + group / 4).astype(int)  # each super-class's own bins
    assert _consistency(shifted, raw.y) > 0.97  # the class is the table's entry, up to pixel noise
    for g in (1, 2, 3):  # on another super-class's boundaries a table's cells mix classes
        mine = group == g
        assert _consistency(np.floor(8 * level[mine]).astype(int), raw.y[mine]) < 0.9
    assert raw.class_names[5] == "g1-lookup1"


def test_lookup_by_name_and_its_errors():
    data = load_dataset("synthetic:mode=lookup,size=8,classes=8,groups=2,bins=5,train=200,test=10")
    assert (data.num_classes, data.image_size, sorted(set(data.superclasses.tolist()))) == (8, 8, [0, 1])
    with pytest.raises(DataError, match="bins >= 1"):
        load_dataset("synthetic:mode=lookup,bins=0")
    with pytest.raises(DataError, match="bins is an option of mode=lookup, not of mode=hierarchy"):
        load_dataset("synthetic:bins=5")
    with pytest.raises(DataError, match=r"'mode=lookup,bins=100000000000' does not fit in memory \(Unable to allocate"):
        load_dataset("synthetic:mode=lookup,bins=100000000000")  # a 3 TiB table, refused before any is written
    with pytest.raises(DataError, match=r"'size=10000000' needs 5.22e\+09 GiB to generate \(8 bytes a pixel\)"):
        load_dataset("synthetic:size=10000000")  # torch's RuntimeError without the check
