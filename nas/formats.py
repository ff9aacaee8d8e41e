"""The deployable formats of an export: ONNX (checked against torch), Core ML and ExecuTorch (optional).

Each `Format` names the paths it writes in a folder and its writer, which returns the model card's line on what
it wrote; a missing optional converter or a model that does not lower is a note, a file that computes something
else than torch is an `ExportError`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nas.config import ConfigError, first_line
from nas.deploy import ModelInfo, coreml_routing

ONNX_TOLERANCE = 1e-4  # max |logit difference| between ONNX Runtime and torch


class ExportError(ConfigError):
    """A trial cannot be picked or exported; the field names the option or file at fault."""


def onnx_max_difference(model: torch.nn.Module, path: Path, *, batch: int = 3, seed: int = 0) -> float:
    """Largest |logit difference| between ONNX Runtime running `path` and torch running `model`, on a
    random batch (of another size than the export's example: the batch dimension must be dynamic)."""
    import onnxruntime as ort  # only export and training need it, not every CLI command

    cfg = model.cfg
    images = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size,
                         generator=torch.Generator().manual_seed(seed))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        torch_logits = model.eval()(images).numpy()
    return float(np.abs(onnx_logits - torch_logits).max())


def export_checked_onnx(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> float:
    """Export `model` (checked by onnx.checker in profilers.export_onnx) and compare it with torch."""
    from profilers import export_onnx

    export_onnx(model, path, metadata=metadata)
    difference = onnx_max_difference(model, path)
    if difference > ONNX_TOLERANCE:
        raise ExportError(path.name, f"ONNX Runtime and torch differ by {difference:.2e} > {ONNX_TOLERANCE:g}")
    return difference


def write_onnx(model: torch.nn.Module, folder: Path, info: ModelInfo) -> str:
    difference = export_checked_onnx(model, folder / "model.onnx", info.metadata())
    return (f"`model.onnx`, input and routing facts in its metadata_props; ONNX Runtime matches torch to "
            f"{difference:.1e} (tolerance {ONNX_TOLERANCE:g})")


def write_coreml(model: torch.nn.Module, folder: Path, info: ModelInfo) -> str:
    """Core ML programs of `model` via profilers.export_coreml, with `info` in each, and for a per-image MoE
    `coreml/routing.json`. Core ML is optional: a missing coremltools or a failed conversion is a note."""
    try:
        from profilers import coreml_form, export_coreml

        # coremltools prints import warnings and progress bars: a CLI's output is not the place
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_image = coreml_form(model.cfg) == "per_image:trunk+tails"
            result = export_coreml(model, folder / "coreml" if per_image else folder, precision="fp16",
                                   metadata=info.metadata(), description=info.description())
    except ImportError as error:
        return f"not written: coremltools is not installed ({error}); `pip install 'vmoe-nas[coreml]'`"
    except Exception as error:  # coremltools raises anything from its converters; the ONNX model stands
        for partial in (folder / "coreml", folder / "model.mlpackage"):
            shutil.rmtree(partial, ignore_errors=True)
        return f"not written: the Core ML conversion failed ({first_line(error, typed=True)})"
    names = ", ".join(str(p.relative_to(folder)) for p in result.programs.values())
    how = "one program"
    if per_image:
        routing = coreml_routing(model.cfg, batch=1)
        (folder / "coreml" / "routing.json").write_text(json.dumps(routing, indent=1))
        how = ("one image per call: an app runs the trunk, then the tail of the experts the router picked, "
               "as `coreml/routing.json` says")
    return (f"form {result.form}, fp16 ML programs: {names}, input and routing facts in each one's metadata; "
            f"{how}. Converted here, not run: Core ML runs on Apple devices only.")


@dataclass(frozen=True)
class Format:
    """A deployable format: the paths it writes in a folder (how `vmoe-nas train` tells which formats an export
    wrote) and its writer, which returns the model card's line on what it wrote."""

    name: str
    paths: tuple[str, ...]
    write: Callable[[torch.nn.Module, Path, ModelInfo], str]


def formats_in(folder: Path) -> list[Format]:
    """The formats an export wrote in `folder` (ONNX, which every export writes, always)."""
    return [f for f in FORMATS if f.name == "ONNX" or any((folder / p).exists() for p in f.paths)]


def write_formats(model: torch.nn.Module, folder: Path, info: ModelInfo, formats) -> dict[str, str]:
    """Write `model` in each of `formats` and `input.json` into `folder`; returns format name -> its line."""
    (folder / "input.json").write_text(json.dumps(info.to_dict(), indent=1))
    return {f.name: f.write(model, folder, info) for f in formats}


def export_executorch_checked(model: torch.nn.Module, path: Path) -> str:
    """Write `model.pte` (profilers._executorch) and check it against torch on inputs that reach every
    expert; returns the model card's line on it. ExecuTorch is optional and a model may not lower: a note,
    not an error. A program that computes something else is an error, as for ONNX."""
    import importlib.util

    if importlib.util.find_spec("executorch") is None:
        return "not written: executorch is not installed; `pip install 'vmoe-nas[executorch]'`"
    from profilers._executorch import PTE_TOLERANCE, LoweringError, write_checked_pte

    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            delegation, difference, reached = write_checked_pte(model, path)
    except LoweringError as error:
        path.unlink(missing_ok=True)
        return f"not written: {error}"
    if difference > PTE_TOLERANCE:
        raise ExportError(path.name, f"executorch.runtime and torch differ by {difference:.2e} > {PTE_TOLERANCE:g}")
    return (f"`{path.name}`, lowered to XNNPACK for batch 1: {delegation.summary()}. executorch.runtime matches "
            f"torch to {difference:.1e} on {reached} (tolerance {PTE_TOLERANCE:g}).")


def write_executorch(model: torch.nn.Module, folder: Path, info: ModelInfo) -> str:
    return export_executorch_checked(model, folder / "model.pte")


FORMATS = (Format("ONNX", ("model.onnx",), write_onnx), Format("Core ML", ("model.mlpackage", "coreml"), write_coreml),
           Format("ExecuTorch", ("model.pte",), write_executorch))


__all__ = ["FORMATS", "ONNX_TOLERANCE", "ExportError", "Format", "export_checked_onnx", "export_executorch_checked",
           "formats_in", "onnx_max_difference", "write_coreml", "write_executorch", "write_formats",
           "write_onnx"]
