"""ONNX export of any model, and the on-disk cache of exported artifacts keyed by config hash."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch

from search_spaces import ArchConfig, VisionMoE, build_model

CACHE_ENV = "VMOE_NAS_CACHE"
DEFAULT_CACHE = Path("results/cache")


class ProfileError(ValueError):
    """A backend, provider or option this installation cannot honour; the message says what it can."""


def as_model(model_or_cfg: ArchConfig | VisionMoE) -> VisionMoE:
    return build_model(model_or_cfg) if isinstance(model_or_cfg, ArchConfig) else model_or_cfg


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Export and measure in eval mode, then give the caller's model back as it was."""
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


def example_images(cfg: ArchConfig, batch: int) -> torch.Tensor:
    return torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)


def export_onnx(model_or_cfg: ArchConfig | VisionMoE, path: str | Path, *, batch: int = 1) -> Path:
    """Export to one ONNX file (input `images`, output `logits`, dynamic batch) and check it.

    `batch` is the example batch traced; the batch dimension stays dynamic. A batch-1 example is traced
    at 2 because torch.export specialises size-1 dimensions, which would pin the batch to 1."""
    model = as_model(model_or_cfg)
    path = Path(path)
    with eval_mode(model), torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            model, (example_images(model.cfg, max(batch, 2)),), path,
            input_names=["images"], output_names=["logits"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            dynamo=True, external_data=False, verbose=False,
        )
    onnx.checker.check_model(str(path))
    return path


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Every export warns that torchvision's ops are missing and that a pytree class is deprecated: noise
    that buries a search's progress (our models use neither)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def build_once(path: Path, build: Callable[[Path], object]) -> Path:
    """The artifact at `path`, built by `build(path)` only if missing. It is built under a temporary
    name and renamed, so concurrent search workers never read a half-written file."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # keeps the suffix: some writers need it
    try:
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # a directory artifact another worker finished first: keep theirs
            if not path.exists():
                raise
    finally:  # what is left: a failed build's leftovers, or the directory that lost the race
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return path


def cached_onnx(cfg: ArchConfig) -> Path:
    """The ONNX export of a freshly built `cfg` (latency does not depend on the weights' values)."""
    return build_once(cache_dir() / "onnx" / f"{cfg.config_hash()}.onnx", lambda path: export_onnx(cfg, path))
