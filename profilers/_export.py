"""ONNX export of any model, and the on-disk cache of exported artifacts.

An artifact's key is its config hash plus `code_version()`: the exporters' versions and a hash of the
code that decides what an export writes, so an upgrade or a model change never reuses a stale file."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnx
import torch

from search_spaces import ArchConfig, VisionMoE, build_model

CACHE_ENV = "VMOE_NAS_CACHE"
DEFAULT_CACHE = Path("results/cache")
# What an export depends on besides the config: the exporters, and the code of the model and its forms.
EXPORTERS = ("coremltools", "executorch")  # with torch and onnx, whose versions are read off the modules
EXPORT_CODE = ("search_spaces/model.py", "profilers/_export.py", "profilers/_coreml.py", "profilers/_executorch.py")
ROOT = Path(__file__).resolve().parents[1]


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


OPSET = 20  # what the torch.export-based exporter wrote before this one: same operators, same ONNX Runtime kernels


class _ImagesOnly(torch.nn.Module):
    """`model(images)`, with images as the one argument: the TorchScript exporter passes every parameter's
    default positionally, which `VisionMoE.forward`'s keyword-only `with_aux` refuses (a TypeError)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def export_onnx(model_or_cfg: ArchConfig | VisionMoE, path: str | Path, *, batch: int = 1,
                metadata: dict[str, str] | None = None) -> Path:
    """Export to one ONNX file (input `images`, output `logits`, dynamic batch) and check it.

    The TorchScript exporter (`dynamo=False`) exports a 28 px model in ~0.2 s, where torch.export, its
    decompositions and onnxscript's optimizer (`dynamo=True`) took ~10 s on two busy cores: most of a cold
    `vmoe-nas profile` (benchmarks/cold_profile.py). The model reads no shape at run time but the batch (see
    `Attention`), so ONNX Runtime runs the traced graph about as fast as the optimised torch.export one.
    `batch` is the example batch traced (at least 2, so that no size-1 dimension is taken for a constant);
    the batch dimension stays dynamic. `metadata` goes into the file's metadata_props."""
    model = as_model(model_or_cfg)
    path = Path(path)
    with eval_mode(model), torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            _ImagesOnly(model), (example_images(model.cfg, max(batch, 2)),), path,
            input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET, dynamo=False,
        )
    if metadata:
        exported = onnx.load(str(path))
        onnx.helper.set_model_props(exported, metadata)
        onnx.save(exported, str(path))
    onnx.checker.check_model(str(path))
    return path


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The TorchScript exporter warns that it is deprecated, and its tracer that a per-image MoE's k becomes a
    constant (as it should: k is the architecture's): noise that buries a search's progress."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def code_version() -> str:
    """A short hash of what an export depends on besides the config (see EXPORTERS, EXPORT_CODE)."""
    digest = hashlib.sha256(f"torch {torch.__version__} onnx {onnx.__version__}".encode())
    for name in EXPORTERS:
        digest.update(f" {name} {package_version(name)}".encode())
    for source in EXPORT_CODE:
        digest.update((ROOT / source).read_bytes())
    return digest.hexdigest()[:10]


def cache_key(cfg: ArchConfig, *variant: str) -> str:
    """The file name an artifact of `cfg` (and of `variant`, e.g. a precision) is cached under."""
    return "-".join((cfg.config_hash(), *variant, code_version()))


def build_once(path: Path, build: Callable[[Path], object], verify: Callable[[Path], object] | None = None) -> Path:
    """The artifact at `path`, built by `build(path)` unless it exists and `verify(path)` raises nothing
    (a file truncated by a full disk or a killed worker is rebuilt, not trusted). It is built under a
    unique temporary name and renamed, so concurrent search workers never read a half-written file."""
    if path.exists():
        try:
            if verify:
                verify(path)
            return path
        except Exception:  # whatever the check raised, the artifact is unusable: build it again
            _remove(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")  # keeps the suffix for writers
    try:
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # a directory artifact another worker finished first: keep theirs
            if not path.exists():
                raise
    finally:  # what is left: a failed build's leftovers, or the directory that lost the race
        _remove(tmp)
    return path


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def onnx_cache_path(cfg: ArchConfig) -> Path:
    return cache_dir() / "onnx" / f"{cache_key(cfg)}.onnx"


def cached_onnx(cfg: ArchConfig) -> Path:
    """The ONNX export of a freshly built `cfg` (latency does not depend on the weights' values)."""
    return build_once(onnx_cache_path(cfg), lambda path: export_onnx(cfg, path),
                      verify=lambda path: onnx.checker.check_model(str(path)))
