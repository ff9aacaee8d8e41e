"""Inputs without bounds (issue 22, items 9-12): a huge n_trials, numbers past what any machine holds,
images whose pixels or files are hostile. Each is bounded, or refused with one error naming the field or file."""

import logging
import os
import re
import shutil
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState
from test_faults import study_yaml

from nas import record as records
from nas.cli import main
from nas.config import ConfigError
from nas.data import load_dataset
from nas.datasets import DataError, DataFormatError
from nas.opening import open_study
from nas.search import run_worker
from nas.study import load_study_config
from nas.trial_store import fill_slots, storage_url
from profilers import profile
from search_spaces import ArchConfig

from image_folders import write_jpegs, write_png_bomb


def test_a_huge_n_trials_queues_lazily(tmp_path):
    """--n-trials 100000000 queued 557 trials in 75 s and held 4.5 GB before any trial ran."""
    cfg = load_study_config(study_yaml(tmp_path, "huge", n_trials=10**8), workers=2,
                            storage=f"journal:{tmp_path / 'huge.log'}")
    study = open_study(cfg, storage_url(cfg))
    assert fill_slots(study, cfg) == 2
    assert fill_slots(study, cfg) == 0  # two wait already: nothing more until a worker claims one
    assert len(study.get_trials(deepcopy=False)) == 2


def test_resuming_with_a_smaller_n_trials_runs_no_trial_queued_beyond_it(tmp_path):
    cfg = load_study_config(study_yaml(tmp_path, "shrink", n_trials=3, steps=2), workers=3,
                            storage=f"journal:{tmp_path / 'shrink.log'}")
    study = open_study(cfg, storage_url(cfg))
    fill_slots(study, cfg)  # slots 0, 1, 2 wait; then the study is resumed with --n-trials 1
    smaller = load_study_config(study_yaml(tmp_path, "shrink", n_trials=1, steps=2),
                                storage=f"journal:{tmp_path / 'shrink.log'}")
    assert run_worker(smaller, study=open_study(smaller, storage_url(smaller))) == 1
    ran = [r.slot for r in records.read_all(study) if r.state != TrialState.WAITING]
    assert ran == [0]


# --- item 10: numbers past what any machine holds are refused up front, naming the field ------------------

STUDY = {"study_name": "bounds", "data": {"name": "synthetic", "limit": 600}, "n_trials": 2,
         "space": {"patch_sizes": [4], "depths": [2], "widths": [16], "head_width": 8, "mlp_ratios": [2.0],
                   "num_experts": [0]},
         "evaluator": {"steps": 5, "batch_size": 32}}
NUMERIC_FIELDS = [
    "seed", "n_trials", "timeout", "workers", "heartbeat_interval", "max_retries", "trial_timeout", "trial_memory_mb",
    "data.limit", "data.val_fraction", "data.seed", "data.image_size", "data.max_memory_mb", "data.workers",
    "data.classes", "data.per_class", "profiler.threads", "profiler.batch", "confirm.seeds", "confirm.pairs",
    "confirm.steps", "confirm.margin", "constraints.max_flops", "evaluator.steps", "evaluator.batch_size",
    "evaluator.lr", "evaluator.seed", "evaluator.data_seed", "evaluator.num_threads", "evaluator.eval_every",
    "evaluator.weight_decay", "evaluator.mixup",
]


def study_with(tmp_path, dotted: str, value) -> str:
    """The study YAML with one field set; `value` is written as YAML text (an integer of any length)."""
    data = {key: dict(section) if isinstance(section, dict) else section for key, section in STUDY.items()}
    section, _, name = dotted.rpartition(".")
    (data.setdefault(section, {}) if section else data)[name or dotted] = "VALUE"
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data).replace("VALUE", value if isinstance(value, str) else repr(value)))
    return str(path)


def refused(argv: list[str], capsys) -> str:
    with mock.patch("nas.search.run_search", side_effect=AssertionError("accepted")), \
            mock.patch("profilers.profile", side_effect=AssertionError("accepted")):
        status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and ": error: " in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("dotted, value", [
    ("evaluator.seed", 2**64), ("seed", 2**64), ("data.seed", 2**64), ("profiler.batch", 10**9),
    ("data.workers", 100_000), ("workers", 100_000), ("confirm.seeds", 10**9), ("evaluator.batch_size", 10**9),
])
def test_numbers_past_their_bound_are_refused_naming_the_field(tmp_path, capsys, dotted, value):
    err = refused(["search", "--config", study_with(tmp_path, dotted, value)], capsys)
    assert f"error: {dotted}: must be " in err


def test_an_integer_of_5000_digits_is_one_error(tmp_path, capsys):
    err = refused(["search", "--config", study_with(tmp_path, "seed", "9" * 5000)], capsys)
    assert "not valid YAML" in err and "digits" in err and len(err) < 1500


@pytest.mark.parametrize("argv, flag", [
    (["profile", "fmnist-vit-4x32", "--batch", "1000000000"], "--batch"),
    (["profile", "fmnist-vit-4x32", "--threads", "100000"], "--threads"),
    (["confirm", "--study", "none", "--seeds", "1000000000"], "--seeds"),
    (["confirm", "--study", "none", "--workers", "100000"], "--workers"),
])
def test_cli_counts_past_their_bound_are_refused(argv, flag, capsys):
    assert f"error: {flag}: must be <= " in refused(argv, capsys)


def test_profiling_a_billion_images_is_refused_before_allocating():
    with pytest.raises(ConfigError, match="batch: must be <= 256"):
        profile(ArchConfig(image_size=16, in_channels=1, patch_size=4, num_classes=2, depth=1, width=8, num_heads=1),
                batch=10**9, measure=False)


def test_a_space_of_thousands_of_choices_is_refused_at_once(tmp_path, capsys):
    """2,000 widths x 2,000 heads took 42 s to be refused, trying every pair."""
    heads = [10**6 + i for i in range(2000)]  # none divides any width: nothing builds
    space = {**STUDY["space"], "widths": list(range(2001, 4001)), "head_width": None, "num_heads": heads}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "space": space}))
    assert "error: space.widths: lists 2,000 choices, more than MAX_CHOICES=100" in refused(
        ["search", "--config", str(path)], capsys)


huge = st.one_of(st.integers(-3, 2**70), st.sampled_from(
    [2**31, 2**32, 2**63, 2**64, 10**30, 1e300, float("inf"), float("nan"), -1e-9, 0.5, 1e9, "9" * 5000]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dotted=st.sampled_from(NUMERIC_FIELDS), value=huge)
def test_any_number_in_any_numeric_study_field_is_bounded_or_refused_naming_it(tmp_path_factory, dotted, value):
    """Each numeric field of the study YAML: refused with a ConfigError naming it, or accepted within what the
    machinery downstream takes (seeds that torch and numpy accept, counts that fit int64)."""
    folder = tmp_path_factory.mktemp("numbers")
    try:
        cfg = load_study_config(study_with(folder, dotted, value))
    except ConfigError as error:
        expected = "config" if isinstance(value, str) else dotted
        assert error.field == expected and "\n" not in str(error), str(error)
        return
    flat = {**{f"data.{k}": v for k, v in vars(cfg.data).items()}, **vars(cfg),
            **{f"evaluator.{k}": v for k, v in cfg.recipe().to_dict().items()},
            **{f"profiler.{k}": v for k, v in vars(cfg.profiler).items()},
            **{f"confirm.{k}": v for k, v in vars(cfg.confirm).items()}}
    for name in ("seed", "data.seed", "evaluator.seed"):
        torch.manual_seed(flat[name] + 10**6)  # seeds are offset per run and step: no overflow
        np.random.seed(flat[name])
    accepted = flat.get(dotted, getattr(cfg.constraints, dotted.rpartition(".")[2], None))
    assert accepted is None or not isinstance(accepted, int) or abs(accepted) < 2**63
    for name in ("workers", "data.workers", "profiler.threads", "profiler.batch", "confirm.seeds"):
        assert flat[name] is None or flat[name] <= 256


# --- items 11, 12: hostile image files are one DataError naming the file, in both readers ----------------


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    return write_png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


def folder_with(tmp_path, name: str, make) -> tuple[Path, Path]:
    """A tiny image folder (2 classes x 4 PNGs) with one more entry `name` in class0, made by make(path)."""
    root = write_jpegs(tmp_path / "f", classes=2, per_class=4, sizes=(16, 16), suffix=".png")
    path = root / "class0" / name
    make(path)
    return root, path


READERS = {"in memory": {"stream": False}, "streamed": {"stream": True, "workers": 0}}


@pytest.mark.parametrize("reader", READERS)
def test_a_decompression_bomb_is_refused_by_both_readers(tmp_path, bomb, reader):
    """Item 11: a 389 KB 20000 x 20000 PNG took the streamed reader from 539 MB to 2.6 GB."""
    root, path = folder_with(tmp_path, "bomb.png", lambda p: shutil.copy(bomb, p))
    with pytest.raises(DataFormatError, match=f"cannot read {re.escape(str(path))} .*pixels"):
        load_dataset(f"imagefolder:{root}", corrupt="error", **READERS[reader])


@pytest.mark.parametrize("reader", READERS)
def test_both_readers_cap_pixels_at_max_image_pixels(tmp_path, reader, monkeypatch):
    """The cap is one number for both readers (here lowered below a 64 x 64 image)."""
    monkeypatch.setattr("nas.image_files.MAX_IMAGE_PIXELS", 32 * 32)
    root, path = folder_with(tmp_path, "large.png", lambda p: write_png_bomb(p, side=64))
    with pytest.raises(DataFormatError, match="64 x 64 pixels, more than MAX_IMAGE_PIXELS=1,024"):
        load_dataset(f"imagefolder:{root}", corrupt="error", **READERS[reader])


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name, make, problem", [
    ("0.png", lambda p: p.write_bytes(b""), "cannot identify image file"),  # first of its folder: read for its size
    ("loop.png", lambda p: os.symlink(p.name, p), "Too many levels of symbolic links"),
])
def test_empty_images_and_link_loops_are_one_data_error_naming_the_file(tmp_path, reader, name, make, problem):
    root, path = folder_with(tmp_path, name, make)
    with pytest.raises(DataError, match=f"cannot read {re.escape(str(path))}.*{problem}"):
        load_dataset(f"imagefolder:{root}", corrupt="error", **READERS[reader])
    with pytest.raises(DataError, match=f"cannot read {re.escape(str(path))}.*{problem}"):
        load_dataset(f"imagefolder:{root}")  # no options: the default reader, chosen from the first image


def test_a_link_loop_under_imagenet_is_one_data_error(tmp_path):
    root = tmp_path / "imagenet"
    write_jpegs(root / "train", classes=2, per_class=2, sizes=(16, 16))
    write_jpegs(root / "val", classes=2, per_class=1, sizes=(16, 16))
    os.symlink("loop", root / "train" / "loop")
    with pytest.raises(DataError, match=f"cannot read {root / 'train' / 'loop'}.*symbolic links"):
        load_dataset(f"imagenet:{root}", workers=0)


@pytest.mark.parametrize("reader", READERS)
def test_a_fifo_named_like_an_image_is_skipped_and_counted(tmp_path, reader, caplog):
    """Opening a FIFO blocks until a writer comes: the in-memory reader hung on one named .png."""
    root, path = folder_with(tmp_path, "fifo.png", os.mkfifo)
    loaded = []
    reading = threading.Thread(target=lambda: loaded.append(load_dataset(f"imagefolder:{root}", **READERS[reader])),
                               daemon=True)
    caplog.set_level(logging.WARNING, logger="vmoe_nas.data")
    reading.start()
    reading.join(60)
    if reading.is_alive():
        with open(path, "wb"):  # a writer: the blocked read returns
            pass
        reading.join(60)
        pytest.fail("the reader blocked on the FIFO")
    assert len(loaded[0].train) + len(loaded[0].val) == 8
    assert f"skipped 1 entries of {root / 'class0'} named like images that are not regular files" in caplog.text


def test_an_imagenet_index_listing_a_synset_twice_is_refused(tmp_path):
    root = tmp_path / "imagenet"
    write_jpegs(root / "train", classes=2, per_class=2, sizes=(16, 16))
    write_jpegs(root / "val", classes=2, per_class=1, sizes=(16, 16))
    (root / "LOC_synset_mapping.txt").write_text("class0 tench\nclass1 goldfish\nclass0 tench again\n")
    with pytest.raises(DataFormatError, match="lists class0 more than once"):
        load_dataset(f"imagenet:{root}", workers=0)
