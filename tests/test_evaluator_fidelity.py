"""benchmarks/evaluator_fidelity.py's reference of several seeds: which seeds are averaged, a seed's measured sd,
and the noise ceiling of a seed-averaged reference (pure functions: no training)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from evaluator_fidelity import measured_seed_sd, noise_ceiling, seed_averaged  # noqa: E402


def store(accuracies: dict[str, list[float]]) -> dict:
    """A reference store: each architecture's first run (seed 3, the recipe's) and its other seeds 4, 5, ..."""
    return {"reference_recipe": {"seed": 3}, "archs": {
        name: {"reference": runs[0], "other_seeds": {str(4 + i): {"reference": a, "wall_time_s": 1.0}
                                                     for i, a in enumerate(runs[1:])}}
        for name, runs in accuracies.items()}}


def test_the_seeds_every_architecture_has_are_averaged_and_a_seed_named_twice_or_missing_is_refused():
    runs = store({"b": [0.80, 0.82, 0.90], "a": [0.70, 0.74], "c": [0.60, 0.60]})
    by_seed, seeds = seed_averaged(runs, None)
    assert seeds == [3, 4] and by_seed.tolist() == [[0.70, 0.74], [0.80, 0.82], [0.60, 0.60]]  # sorted by name
    assert seed_averaged(runs, [4])[0].tolist() == [[0.74], [0.82], [0.60]]
    for wrong in ([5], [3, 3], []):
        with pytest.raises(SystemExit, match="every architecture has seeds 3 4"):
            seed_averaged(runs, wrong)
    with pytest.raises(SystemExit, match="2 reference architectures finished: too few"):
        seed_averaged(store({"a": [0.7], "b": [0.8]}), None)


def test_a_seeds_sd_is_pooled_over_architectures():
    by_seed = np.array([[0.70, 0.704], [0.80, 0.796], [0.60, 0.606]])  # differences 0.004, 0.004, 0.006
    measured = measured_seed_sd(by_seed)
    assert measured["sd"] == pytest.approx(np.sqrt((0.004**2 + 0.004**2 + 0.006**2) / 2 / 3))
    assert measured["ci"][0] <= measured["sd"] <= measured["ci"][1]
    assert measured_seed_sd(by_seed[:, :1]) is None  # one seed: nothing to measure


def test_the_noise_ceiling_of_k_seeds_is_that_of_one_seed_with_a_sd_over_sqrt_k():
    reference = np.linspace(0.84, 0.88, 24)
    four = noise_ceiling(reference, 0.006, 4, draws=200)
    one = noise_ceiling(reference, 0.003, 1, draws=200)
    assert four["kendall_tau"] == one["kendall_tau"] and four["seeds"] == 4 and four["seed_sd"] == 0.006
    assert noise_ceiling(reference, 0.006, 1, draws=200)["kendall_tau"] < four["kendall_tau"] < 1
    with pytest.raises(SystemExit, match="over sqrt 1 .* below the reference's own sd"):
        noise_ceiling(reference, 0.02, 1, draws=1)  # the seeds' noise as large as the whole spread
