"""benchmarks/evaluator_fidelity.py's reference of several seeds: which seeds are averaged, a seed's measured sd,
and the noise ceiling of a seed-averaged reference (pure functions: no training)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import evaluator_fidelity  # noqa: E402
from evaluator_fidelity import earlier_scores, measured_seed_sd, merged, noise_ceiling, seed_averaged  # noqa: E402


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


def table(archs: str, scores: dict[str, float], images: int = 1200) -> dict:
    """A stored table of supernet scores ({evaluator: score of every arch}), as `score` writes it."""
    return {"archs": {n: {**scores, "reference": 0.8} for n in archs},
            "evaluators": {"proxy_100": {"training_images": 9}, **{e: {"training_images": images} for e in scores}},
            "supernets": {e.removeprefix("supernet_").split("_val")[0]: {} for e in scores}}


def test_scoring_a_variant_again_keeps_its_other_step_counts_and_drops_its_own(tmp_path, capsys):
    runs, stored = store({n: [0.8] for n in "abc"}), tmp_path / "evaluator_fidelity_x.json"
    stored.write_text(json.dumps(table("abc", {"supernet_300_x": 0.5, "supernet_150_x": 0.4,
                                               "supernet_150_x_val500": 0.3})))
    earlier = earlier_scores(stored, runs)
    assert earlier[0]["supernet_150_x_val500"] == ({n: 0.3 for n in "abc"}, 1200) and set(earlier[1]) == {"300_x",
                                                                                                         "150_x"}
    new = {"supernet_600_x": ({n: 0.9 for n in "abc"}, 4800)}
    assert list(merged(earlier, new, {"600_x": {}})[0]) == ["supernet_150_x", "supernet_150_x_val500",
                                                            "supernet_300_x", "supernet_600_x"]  # by steps
    again = {"supernet_150_x": ({n: 0.7 for n in "abc"}, 1200)}
    evaluators, supernets = merged(earlier, again, {"150_x": {"new": 1}})
    assert evaluators == {"supernet_150_x": again["supernet_150_x"], "supernet_300_x": earlier[0]["supernet_300_x"]}
    assert supernets["150_x"] == {"new": 1}  # its val500 row went with it: that score was of the old supernet
    for broken, why in (("{", "unreadable"), ("[]", "unreadable"), ("{}", "older"),
                        (json.dumps(table("ab", {"supernet_150_x": 0.4})), "scored no c")):
        stored.write_text(broken)
        assert earlier_scores(stored, runs) == ({}, {}) and why in capsys.readouterr().out
    assert earlier_scores(tmp_path / "none.json", runs) == ({}, {})


def test_a_signal_stops_the_benchmark_with_one_line_not_a_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(evaluator_fidelity, "run_rescore", interrupted)
    monkeypatch.setattr(sys, "argv", ["evaluator_fidelity.py", "rescore"])
    with pytest.raises(BaseException) as stopped:  # without the handler a KeyboardInterrupt would end pytest
        evaluator_fidelity.main()
    assert stopped.type is SystemExit and stopped.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "evaluator_fidelity.py rescore: stopped by SIGTERM; what finished is stored, and the same command resumes "
        "from the checkpoints"]
