"""Where training runs: device names parsed and resolved to one present here, the autocast dtype of a
precision on a device, and the cores and threads this process may use.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from nas.config import ConfigError


def parse_device(name: Any) -> tuple[str, int | None]:
    """(kind, index) of a device name, checked for form only: auto, cpu, cuda, cuda:N or mps."""
    kind, _, index = name.partition(":") if isinstance(name, str) else ("", "", "")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and not (kind == "cuda" and index.isdigit())):
        raise ConfigError("device", f"must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return kind, int(index) if index else None


def available_devices() -> list[str]:
    """The devices this process can train on, e.g. ['cuda:0 (NVIDIA H200)', 'cpu']."""
    found = [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return found + (["mps"] if torch.backends.mps.is_available() else []) + ["cpu"]


def resolve_device(name: str) -> torch.device:
    """The device `name` asks for, checked to be present (one ConfigError naming it and what was found);
    auto: CUDA, then MPS, then the CPU."""
    kind, index = parse_device(name)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    present = {"cpu": True, "mps": torch.backends.mps.is_available(),
               "cuda": torch.cuda.is_available() and (index or 0) < torch.cuda.device_count()}
    if not present[kind]:
        build = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'}"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        build += "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible!r}"
        raise ConfigError("device", f"{name} is not available here; found {', '.join(available_devices())} "
                                    f"({build})")
    return torch.device(kind if index is None else f"{kind}:{index}")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device`; None runs in fp32."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def default_threads() -> int:
    """Threads of a recipe that sets none: OMP_NUM_THREADS where the user set it (a positive integer), else
    the cores this process may use."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else available_cores()


def available_cores() -> int:
    """Cores this process may run on: its affinity mask where the OS has one (Linux), else all (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


__all__ = ["autocast_dtype", "available_cores", "available_devices", "default_threads", "parse_device",
           "resolve_device"]
