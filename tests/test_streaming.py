"""Image folders and the ImageNet layout streamed from disk: the same batches and accuracies as in memory,
unreadable files skipped and counted, seeded subsets, clear errors, bounded file descriptors."""

import json
import logging
import os
import resource

import pytest
import torch
import yaml

from nas.batches import Batches
from nas.config import ConfigError
from nas.data import load_dataset
from nas.datasets import DataError, DataFormatError, DataNotFoundError
from nas.full_train import run_training
from nas.recipe import TrainRecipe
from nas.search import run_search
from nas.study import load_study_config
from nas.trainer import train
from search_spaces import ArchConfig

from image_folders import write_corrupt, write_jpegs

ARCH = ArchConfig(image_size=32, in_channels=3, patch_size=8, num_classes=4, depth=2, width=32, num_heads=2)
FIXED = dict(steps=12, batch_size=16, augment=False, num_threads=1, eval_every=6)  # deterministic transforms


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_jpegs(tmp_path_factory.mktemp("jpegs"))  # 4 classes x 25 JPEGs of 64-96 px


def load(folder, **options):
    return load_dataset(f"imagefolder:{folder}", image_size=32, workers=0, **options)


def test_streamed_and_in_memory_folders_give_the_same_batches_and_accuracies(folder):
    streamed, held = load(folder, stream=True), load(folder, stream=False)
    assert streamed.train.stream is not None and held.train.stream is None
    assert (len(streamed.train), len(streamed.val)) == (len(held.train), len(held.val)) == (90, 10)
    assert (streamed.in_channels, streamed.image_size, streamed.mean) == (3, 32, held.mean)
    a, b = (Batches(d, 16, seed=3, augment=False) for d in (streamed, held))
    for step in (0, 1, 7, 5):  # a jump back restarts the stream at that step
        assert all(torch.equal(x, y) for x, y in zip(a.at(step), b.at(step)))
    a.close()
    results = [train(ARCH, d, TrainRecipe(**FIXED)) for d in (streamed, held)]
    assert results[0].val_accuracy == results[1].val_accuracy
    assert results[0].loss_curve == results[1].loss_curve


def test_streamed_augmentation_depends_on_seed_and_step_only(folder):
    data = load(folder, stream=True)
    first, again = Batches(data, 8, seed=1, augment=True), Batches(data, 8, seed=1, augment=True)
    images = [first.at(step)[0] for step in range(3)]
    assert torch.equal(again.at(2)[0], images[2])  # a run resumed at step 2 sees the same augmented batch
    assert not torch.equal(images[0], Batches(data, 8, seed=2, augment=True).at(0)[0])
    first.close(), again.close()


@pytest.mark.slow
def test_worker_processes_decode_the_same_images(folder):
    in_process, workers = load(folder, stream=True), load_dataset(f"imagefolder:{folder}", image_size=32, workers=2,
                                                                  stream=True)
    for (x, y), (u, v) in zip(in_process.val.chunks(4), workers.val.chunks(4)):
        assert torch.equal(x, u) and torch.equal(y, v)


@pytest.mark.slow
def test_folder_searched_end_to_end_streaming_and_in_memory_reach_identical_accuracies(folder, tmp_path):
    accuracies = {}
    for how, options in {"streamed": {"max_memory_mb": 0.01}, "held": {"stream": False}}.items():
        cfg = load_study_config(
            "smoke", n_trials=2, results_dir=str(tmp_path / how), objectives=["accuracy", "flops"],
            data={"name": f"imagefolder:{folder}", "image_size": 32, "workers": 0, **options},
            evaluator={"steps": 8, "batch_size": 16, "eval_every": 4, "augment": False, "num_threads": 1},
            space={"name": "mobile_vmoe", "patch_sizes": [8], "depths": [2], "widths": [16], "head_width": 8,
                   "mlp_ratios": [2.0], "num_experts": [0, 2], "top_k": [1], "placements": ["last1"],
                   "routings": ["per_image"], "router_loss_weights": [0.3]},
            enqueue=[{"depth": 2, "width": 16, "patch_size": 8, "mlp_ratio": 2.0, "num_experts": 0},
                     {"depth": 2, "width": 16, "patch_size": 8, "mlp_ratio": 2.0, "num_experts": 2, "top_k": 1,
                      "moe_placement": "last1", "routing": "per_image", "router_loss_weight": 0.3}])
        study = run_search(cfg, progress=False)
        accuracies[how] = [t.value if t.values is None else t.values[0] for t in study.trials]
        assert "streaming" in (tmp_path / how / "smoke" / "search.log").read_text() or how == "held"
    assert len(accuracies["streamed"]) == 2 and None not in accuracies["streamed"]
    assert accuracies["streamed"] == accuracies["held"]


def test_unreadable_images_are_skipped_and_counted_or_an_error(tmp_path, caplog):
    root = write_jpegs(tmp_path / "f", per_class=10)
    bad = write_corrupt(root)
    caplog.set_level(logging.WARNING, logger="vmoe_nas.data")
    held = load(root, stream=False)
    assert len(held.train) + len(held.val) == 40  # 42 files, 2 unreadable
    streamed = load(root, stream=True)
    result = train(ARCH, streamed, TrainRecipe(**{**FIXED, "steps": 6, "batch_size": 8}))
    assert result.steps == 6
    for split in (streamed.train, streamed.val):  # read every file once: the run may not have met both
        assert sum(len(labels) for _, labels in split.chunks(16)) == len(split) - len(split.stream.unreadable)
    assert streamed.train.stream.unreadable | streamed.val.stream.unreadable == {str(path) for path in bad}
    assert "skipped unreadable image" in caplog.text and str(bad[0]) in caplog.text
    with pytest.raises(DataFormatError, match="cannot read .*(garbage|truncated)"):
        load(root, stream=False, corrupt="error")


def test_empty_or_mismatched_folders_are_one_clear_error(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="no .*files in the class folders"):
        load(tmp_path / "empty")
    root = tmp_path / "inet"
    write_jpegs(root / "train", classes=3, per_class=2)
    write_jpegs(root / "val", classes=2, per_class=2)
    with pytest.raises(DataFormatError, match=r"class folders of .*val differ .*1 missing \(class2\)"):
        load_dataset(f"imagenet:{root}")
    with pytest.raises(DataError, match="applies to imagefolder"):
        load_dataset("synthetic:size=8,train=50,test=10", stream=True)
    with pytest.raises(ConfigError, match="data.stream"):
        load(tmp_path / "inet" / "train", stream="sometimes")


def test_imagenet_layout_with_class_index_and_seeded_subsets(tmp_path):
    root = tmp_path / "imagenet"
    write_jpegs(root / "train", classes=6, per_class=8, sizes=(40, 48))
    write_jpegs(root / "val", classes=6, per_class=2, sizes=(40, 48), seed=1)
    index = {str(i): [f"class{c}", f"name {c}"] for i, c in enumerate([5, 4, 3, 2, 1, 0])}
    (root / "imagenet_class_index.json").write_text(json.dumps(index))
    full = load_dataset(f"imagenet:{root}", image_size=32, workers=0, stream=True)
    assert full.class_names == tuple(f"name {c}" for c in (5, 4, 3, 2, 1, 0))  # the index fixes the order
    assert (len(full.train) + len(full.val), len(full.test), full.flip_ok) == (48, 12, True)
    subset = [load_dataset(f"imagenet:{root}", image_size=32, workers=0, classes=3, per_class=5, seed=s)
              for s in (0, 0, 1)]
    assert subset[0].class_names == subset[1].class_names != subset[2].class_names
    assert (subset[0].num_classes, len(subset[0].train) + len(subset[0].val), len(subset[0].test)) == (3, 15, 6)
    labels = torch.cat([subset[0].train.labels, subset[0].val.labels, subset[0].test.labels])
    assert sorted(set(labels.tolist())) == [0, 1, 2]


def test_a_folder_of_many_files_opens_within_few_file_descriptors(tmp_path):
    root = write_jpegs(tmp_path / "many", classes=2, per_class=500, sizes=(8, 8), suffix=".png")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 40, hard))  # far fewer than the 1,000 files
    try:
        data = load_dataset(f"imagefolder:{root}")  # no options: held in memory
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(data.train) + len(data.val) == 1000 and data.train.stream is None
    assert (data.in_channels, data.image_size) == (3, 8)


@pytest.mark.slow
def test_full_training_streams_an_exported_folder_config(tmp_path):
    root = tmp_path / "data"
    write_jpegs(root / "train", per_class=8)
    write_jpegs(root / "test", per_class=2, seed=1)
    (tmp_path / "arch.yaml").write_text(ARCH.to_yaml())
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "arch": "arch.yaml", "output_dir": "run",
        "data": {"name": f"imagefolder:{root}", "image_size": 32, "stream": True, "workers": 0},
        "recipe": {"steps": 4, "batch_size": 8, "num_threads": 1, "device": "cpu"}}))
    metrics = run_training(tmp_path / "train.yaml", progress=False)
    assert metrics["steps"] == 4 and metrics["train_images"] == 29 and 0 <= metrics["test_accuracy"] <= 1
    assert (tmp_path / "run" / "model.onnx").is_file()
