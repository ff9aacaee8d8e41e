"""Full-length training of an exported configuration: `vmoe-nas train DIR/train.yaml`.

Reads exactly what `vmoe-nas export` wrote (train.yaml, arch.yaml, superclasses.json), trains with the
search's trainer on the full data set, checkpointing at every evaluation, every `checkpoint_every_s` and on
SIGINT/SIGTERM/SIGHUP so an interrupted run resumes where it stopped (one run per folder: it is locked),
and ends with the test-set accuracy in `metrics.json`, the trained weights in
`model.pt` and, from them, every format the export wrote (`model.onnx`, Core ML, ...) with `input.json`.
`metrics.json` is written last: it marks a finished run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from nas.config import ConfigError, first_line, read_yaml, write_atomically
from nas.data import load_dataset
from nas.deploy import ModelInfo
from nas.devices import resolve_device
from nas.export import versions
from nas.formats import FORMATS, formats_in
from nas.recipe import TrainRecipe
from nas.streaming import FOLDER_FIELDS
from nas.superclasses import SuperclassMap
from nas.trainer import CHECKPOINT_NAME, train
from search_spaces import ArchConfig

DATA_FIELDS = ("name", "data_dir", "val_fraction", "seed", "limit", *FOLDER_FIELDS)  # load_dataset's arguments
RUN_FILES = (CHECKPOINT_NAME, "metrics.json", "model.pt", "input.json", *(p for f in FORMATS for p in f.paths))
LOCK_NAME = ".train-lock"  # held by the one `vmoe-nas train` writing the folder


@dataclass(frozen=True)
class TrainConfig:
    path: Path  # the train.yaml; relative paths in it are relative to its folder
    arch: ArchConfig
    data: dict
    recipe: TrainRecipe
    superclasses: SuperclassMap | None
    output_dir: Path
    source: dict
    init: Path | None = None  # initial weights (a one-shot trial's inherited.pt), else the recipe seed's


def load_train_config(path) -> TrainConfig:
    """Read and check train.yaml and the files it names; every problem is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("train.yaml", f"no training config at {path} (vmoe-nas export writes one)")
    data = read_yaml(path, "train.yaml")
    if not isinstance(data, dict):
        raise ConfigError("train.yaml", f"{path} must hold a mapping with arch, data, recipe and output_dir")
    missing = [k for k in ("arch", "data", "recipe", "output_dir") if k not in data]
    if missing:
        raise ConfigError(missing[0], f"missing from {path}")
    folder = path.parent
    arch = ArchConfig.load(folder / str(data["arch"]))  # its ConfigError names the file
    spec = data["data"]
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError("data", f"in {path}: must be a mapping with a data set name, got {spec!r}")
    unknown = sorted(set(spec) - set(DATA_FIELDS))
    if unknown:
        raise ConfigError(f"data.{unknown[0]}", f"in {path}: unknown field (known: {', '.join(DATA_FIELDS)})")
    try:
        recipe = TrainRecipe.from_dict(data["recipe"])
    except ConfigError as error:
        raise ConfigError(f"recipe.{error.field}", f"{error.problem} (in {path})") from None
    superclasses = SuperclassMap.load(folder / data["superclasses"]) if data.get("superclasses") else None
    if superclasses is not None and (not arch.is_moe or superclasses.num_groups != arch.moe.num_experts):
        raise ConfigError("superclasses", f"in {path}: {superclasses.num_groups} groups do not match the "
                                          f"architecture's {arch.moe.num_experts if arch.is_moe else 0} experts")
    init = folder / str(data["init"]) if data.get("init") else None
    if init is not None and not init.is_file():
        raise ConfigError("init", f"in {path}: no weights file at {init}")
    return TrainConfig(path, arch, spec, recipe, superclasses, folder / str(data["output_dir"]),
                       data.get("source") or {}, init)


def _write_json(path: Path, data: dict) -> None:
    write_atomically(path, json.dumps(data, indent=1))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _print_accuracy(step: int, epoch: float, accuracy: float) -> None:
    from tqdm import tqdm

    tqdm.write(f"epoch {epoch:.3g} (step {step}): val accuracy {accuracy:.4f}")


def _write_format(fmt, model, out: Path, info: ModelInfo) -> str:
    """Write one format of the trained model; a failure is its note: the trained weights are in model.pt."""
    try:
        return fmt.write(model, out, info)
    except Exception as error:
        for path in fmt.paths:
            _remove(out / path)
        return f"not written: {first_line(error, typed=True)}"


def run_training(path, *, force: bool = False, progress: bool = True, device: str | None = None) -> dict:
    """Train the configuration of train.yaml at `path` in full; resume its run if one was interrupted.
    A finished run (its metrics.json exists) is kept; `force` starts over; `device` replaces the recipe's.
    Returns the metrics written."""
    config = load_train_config(path)
    if device is not None:
        config = dataclasses.replace(config, recipe=dataclasses.replace(config.recipe, device=device))
    resolve_device(config.recipe.device)  # before any file is touched
    out = config.output_dir
    if (out / "metrics.json").is_file() and not force:
        raise ConfigError("output_dir", f"{out} holds a finished run ({out / 'metrics.json'}); "
                                        "pass --force to train again from scratch")
    with run_lock(out):
        if force:
            for name in RUN_FILES:
                _remove(out / name)
        return _train_and_save(config, progress)


@contextmanager
def run_lock(out: Path):
    """Hold the run folder `out` alone: a second `vmoe-nas train` on it is one clear error, not a crash
    between two writers of one checkpoint. Released when the process ends, however it ends."""
    out.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError("output_dir", f"{out} is in use by another vmoe-nas train; wait for it to end, or "
                                            "give this one another output_dir") from None
        yield
    finally:
        os.close(descriptor)


def _train_and_save(config: TrainConfig, progress: bool) -> dict:
    out = config.output_dir
    dataset = load_dataset(**config.data)
    groups = config.superclasses.class_to_group if config.superclasses is not None else None
    init = torch.load(config.init, weights_only=True, map_location="cpu")["model"] if config.init else None
    result = train(config.arch, dataset, config.recipe, superclasses=groups, checkpoint_dir=out, progress=progress,
                   evaluate_test=len(dataset.test) > 0, label=f"train {config.arch.name}",
                   on_eval=_print_accuracy if progress else None, init_from=init)
    model = result.model.eval()
    torch.save({"arch": config.arch.to_dict(), "model": model.state_dict()}, out / "model.pt")
    info = ModelInfo.of(config.arch, dataset)  # the full data set's normalisation, which the model trained on
    (out / "input.json").write_text(json.dumps(info.to_dict(), indent=1))
    exports = {f.name: _write_format(f, model, out, info) for f in formats_in(config.path.parent)}
    metrics = {
        "name": config.arch.name, "config_hash": config.arch.config_hash(), "train_yaml": str(config.path),
        "source": config.source, "dataset": dataset.name, "train_images": len(dataset.train),
        "normalisation": {"mean": list(dataset.mean), "std": list(dataset.std)},  # what model.onnx expects
        "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy, "steps": result.steps,
        "epochs": result.epochs, "recipe": config.recipe.to_dict(), "exports": exports,
        "result": result.to_dict(), "versions": versions(),
    }
    _write_json(out / "metrics.json", metrics)
    return metrics


__all__ = ["RUN_FILES", "TrainConfig", "load_train_config", "run_training"]
