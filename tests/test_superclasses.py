"""Super-classes: clustering recovers planted blocks, discovery finds a planted hierarchy, files round-trip."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from nas import superclasses
from nas.cli import main
from nas.data import load_dataset
from nas.recipe import TrainRecipe
from nas.superclasses import SuperclassError, SuperclassMap, cluster_confusion, superclasses_for
from nas.trainer import train

from archs import tiny

SMALL = "synthetic:size=8,classes=8,groups=4,train=4000,test=100"


def block_confusion(class_to_group, seed=0, within=30, across=2, correct=200):
    """A confusion matrix with planted blocks: classes of one group are often confused, others rarely."""
    rng = np.random.default_rng(seed)
    same = class_to_group[:, None] == class_to_group[None]
    confusion = rng.poisson(np.where(same, within, across)).astype(float)
    np.fill_diagonal(confusion, correct)
    return confusion


def canonical(mapping):
    """Groups as a set of frozensets: the partition, whatever the group numbers."""
    return {frozenset(np.flatnonzero(mapping == g)) for g in np.unique(mapping)}


@pytest.mark.parametrize("seed", range(4))
def test_clustering_recovers_planted_blocks_exactly(seed):
    rng = np.random.default_rng(seed)
    planted = rng.permutation(np.repeat(np.arange(5), [2, 3, 4, 1, 2]))  # uneven groups, shuffled classes
    found = cluster_confusion(block_confusion(planted, seed), groups=5, seed=seed)
    assert canonical(found) == canonical(planted)
    assert found[0] == 0 and list(np.unique(found)) == list(range(5))  # numbered by smallest class


def test_clustering_ignores_class_frequency():
    planted = np.array([0, 0, 1, 1, 2, 2])
    confusion = block_confusion(planted)
    confusion[4:] *= 50  # two very frequent classes: rates, not counts, decide
    assert canonical(cluster_confusion(confusion, 3)) == canonical(planted)


def test_clustering_edge_cases_and_errors():
    confusion = block_confusion(np.array([0, 0, 1]))
    assert cluster_confusion(confusion, 1).tolist() == [0, 0, 0]
    assert cluster_confusion(confusion, 3).tolist() == [0, 1, 2]
    with pytest.raises(SuperclassError, match="groups"):
        cluster_confusion(confusion, 4)
    with pytest.raises(SuperclassError, match="square"):
        cluster_confusion(np.ones((2, 3)), 2)


def test_map_save_load_round_trip_and_json_format(tmp_path):
    found = SuperclassMap(np.array([1, 0, 1, 2]), 3, np.eye(4, dtype=int), "confusion:x")
    path = found.save(tmp_path / "m.json")
    data = json.loads(path.read_text())
    assert data["groups"] == [[1], [0, 2], [3]] and data["class_to_group"] == [1, 0, 1, 2]
    assert data["confusion"][0] == [1, 0, 0, 0] and data["source"] == "confusion:x"
    assert SuperclassMap.load(path).to_dict() == found.to_dict()


def test_save_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    """A worker reading the cache sees the old mapping or the new one, never a half-written file."""
    path = tmp_path / "m.json"
    old = SuperclassMap(np.array([0, 1]), 2).save(path).read_text()
    new = SuperclassMap(np.array([1, 0]), 2, np.eye(2, dtype=int), "confusion:x")

    def crash(src, dst):  # the process dies between writing and renaming
        assert path.read_text() == old and json.loads(open(src).read()) == new.to_dict()
        raise OSError("killed")

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(OSError, match="killed"):
        new.save(path)
    assert path.read_text() == old and [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary left
    monkeypatch.undo()
    assert SuperclassMap.load(new.save(path)).to_dict() == new.to_dict()


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not a valid super-class mapping"),
        ('{"groups": [[0], [1]]}', "class_to_group"),
        ('{"groups": [[0], [1]], "class_to_group": [0, 5]}', r"in \[0, 2\)"),
        ('{"groups": [[1], [0]], "class_to_group": [0, 1]}', "disagrees"),
    ],
)
def test_corrupt_files_give_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SuperclassError, match=message) as error:
        SuperclassMap.load(path)
    assert str(path) in str(error.value)
    with pytest.raises(SuperclassError, match="no super-class file"):
        SuperclassMap.load(tmp_path / "missing.json")


def test_dataset_superclasses_are_used_when_the_group_count_matches():
    data = load_dataset(SMALL)
    found = superclasses_for(data, 4)
    assert found.source == "dataset" and found.class_to_group.tolist() == data.superclasses.tolist()


@pytest.mark.slow
def test_discovery_recovers_the_planted_hierarchy_and_caches(tmp_path):
    data = load_dataset(SMALL)
    planted = data.superclasses
    hidden = dataclasses.replace(data, superclasses=None)
    recipe = TrainRecipe(steps=300, batch_size=64, lr=3e-3, eval_every=10**6, num_threads=1)
    arch = tiny(num_classes=8, width=32)
    found = superclasses_for(hidden, 4, cache_dir=tmp_path, recipe=recipe, arch=arch)
    assert canonical(found.class_to_group) == canonical(planted)
    assert found.source.startswith("confusion:") and found.confusion.sum() == len(data.val)
    cached = tmp_path / f"{SMALL.replace(':', '_')}-g4-s0.json"
    assert SuperclassMap.load(cached).to_dict() == found.to_dict()
    assert superclasses_for(hidden, 4, cache_dir=tmp_path, recipe=recipe, arch=arch).to_dict() == found.to_dict()
    # Another group count reuses the cached confusion of the same discovery model: no second training.
    two = superclasses_for(hidden, 2, cache_dir=tmp_path, recipe=recipe, arch=arch)
    assert two.confusion.tolist() == found.confusion.tolist() and two.num_groups == 2


def test_discovery_labels_its_progress_bar(capsys, monkeypatch):
    monkeypatch.setattr(superclasses, "cluster_confusion", lambda confusion, groups, seed: np.arange(8) % groups)
    hidden = dataclasses.replace(load_dataset(SMALL), superclasses=None)
    recipe = TrainRecipe(steps=4, batch_size=16, eval_every=4, num_threads=1)
    superclasses_for(hidden, 4, recipe=recipe, arch=tiny(num_classes=8, width=16), progress=True)
    bar = capsys.readouterr().err
    assert "super-class discovery (4 groups): 100%" in bar and "val_accuracy=" in bar


def test_cli_writes_the_mapping(tmp_path, capsys):
    out = tmp_path / "groups.json"
    assert main(["superclasses", "--data", SMALL, "--groups", "4", "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["source"] == "dataset"
    assert "group 0:" in capsys.readouterr().out
    assert main(["superclasses", "--data", "npz:/nonexistent.npz", "--groups", "2"]) == 2
    assert "no file at /nonexistent.npz" in capsys.readouterr().err


def test_discovery_is_budgeted_in_steps_and_honours_num_threads(tmp_path, monkeypatch):
    """Issue 22, item 20: a 300 s cap stopped discovery after 89 of 842 steps on a loaded machine, and the
    groups it cached depended on the load; it also ignored the study's num_threads."""
    data = dataclasses.replace(load_dataset(SMALL), superclasses=None)
    recipes = []
    real_train = superclasses.train
    monkeypatch.setattr(superclasses, "train", lambda arch, dataset, recipe, **kw: (
        recipes.append(recipe), real_train(arch, dataset, recipe, **kw))[1])
    superclasses_for(data, 2, cache_dir=tmp_path, arch=tiny(num_classes=8), num_threads=1)
    (recipe,) = recipes
    assert recipe.seconds is None and recipe.steps == 2000 and recipe.epochs == 2 and recipe.num_threads == 1
    assert (tmp_path / f"{SMALL.replace(':', '_')}-g2-s0.json").is_file()


def test_discovery_cut_by_a_time_budget_says_so_and_is_not_cached(tmp_path, caplog):
    data = dataclasses.replace(load_dataset(SMALL), superclasses=None)
    recipe = TrainRecipe(steps=10**6, seconds=0.5, batch_size=64, eval_every=10**6, num_threads=1)
    found = superclasses_for(data, 2, cache_dir=tmp_path, recipe=recipe, arch=tiny(num_classes=8))
    assert found.num_groups == 2 and not list(tmp_path.iterdir())
    assert "SUPER-CLASS DISCOVERY WAS CUT BY ITS TIME BUDGET (seconds=0.5)" in caplog.text


def test_a_recipe_without_threads_honours_omp_num_threads(monkeypatch):
    calls = []
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    train(tiny(num_classes=8), load_dataset(SMALL), TrainRecipe(steps=1, batch_size=8, eval_every=10**6))
    assert calls[0] == 1
