"""Calibrating a latency model: which architectures of a space to time, timing them interleaved with the
space's anchor (resumably), and the fit
(`profilers.latency_model`) of what was measured.

    model = fit_latency_model(space, image_size=28, in_channels=1, num_classes=10, measurer=Measurer())
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nas.processes import raise_if_interrupted
from profilers._errors import ProfileError
from profilers.latency_model import CalibrationPoint, LatencyModel, features, fit
from search_spaces import ArchConfig
from search_spaces.mobile_vmoe import PARAMS, InvalidArchitecture

# ---------------------------------------------------------------- the calibration set


def space_architectures(space, *, image_size: int, in_channels: int, num_classes: int) -> list[ArchConfig]:
    """Every distinct buildable architecture of a space (its choices' product; a few thousand at most)."""

    names = [name for name in PARAMS if name != "num_heads" or space.num_heads]
    choices = [getattr(space, PARAMS[name]) or (None,) for name in names]
    found: dict[str, ArchConfig] = {}
    for values in itertools.product(*choices):
        try:
            cfg = space.sample(_Fixed(dict(zip(names, values))), image_size=image_size, in_channels=in_channels,
                               num_classes=num_classes)
        except InvalidArchitecture:
            continue
        found.setdefault(cfg.config_hash(), cfg)
    return list(found.values())


class _Fixed:
    """A trial whose every choice is given (Optuna's FixedTrial, without its bookkeeping)."""

    def __init__(self, params: dict):
        self.params = params

    def suggest_categorical(self, name, choices):
        return self.params[name]


def kind(cfg: ArchConfig) -> str:
    """dense, or the MoE's routing and k: the strata a calibration set covers."""
    return "dense" if not cfg.moe else f"{cfg.moe.routing}-k{cfg.moe.top_k}"


def calibration_set(candidates: list[ArchConfig], size: int, *, batch: int = 1) -> list[ArchConfig]:
    """`size` architectures spread over `candidates`: each kind in proportion (at least 3 of each), and within
    a kind, farthest-point sampling in log-feature space from the most expensive one, so that the extremes
    (the range predictions are trusted in) come first."""
    strata: dict[str, list[ArchConfig]] = {}
    for cfg in candidates:
        strata.setdefault(kind(cfg), []).append(cfg)
    chosen = []
    for members in strata.values():
        share = min(len(members), max(3, round(size * len(members) / len(candidates))))
        chosen += farthest_points(members, share, batch)
    return chosen


def farthest_points(members: list[ArchConfig], count: int, batch: int) -> list[ArchConfig]:
    x = np.log1p(np.stack([features(cfg, batch) for cfg in members]))
    spread = x.max(0) - x.min(0)
    x = (x - x.min(0)) / np.where(spread > 0, spread, 1)
    picked = [int(np.argmax(x.sum(1)))]
    distance = np.linalg.norm(x - x[picked[0]], axis=1)
    while len(picked) < count:
        picked.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(x - x[picked[-1]], axis=1))
    return [members[i] for i in picked]


# ---------------------------------------------------------------- measuring


@dataclass
class Measurer:
    """Times architectures on one backend, each interleaved with the anchor where the backend can (a local
    one); a remote agent times one model at a time, and the anchor, measured alone first, is the scale."""

    backend: str = "onnxruntime"
    threads: int = 1
    batch: int = 1
    provider: str | None = None
    options: dict = field(default_factory=dict)  # the protocol (warmup, min_runs, min_time_s) and backend options
    statistic: str = "median"  # of the per-call times: what the model predicts

    def __post_init__(self):
        from profilers._backends import get_backend

        self.runner = get_backend(self.backend, **self.options)
        self._anchor_alone: dict[str, float] = {}

    @property
    def precision(self) -> str:
        return self.options.get("precision", "fp32")

    def measure(self, cfg: ArchConfig, anchor: ArchConfig) -> tuple[CalibrationPoint, dict]:
        """`cfg`'s point and the device that measured it."""
        from profilers._profile import device_info
        from search_spaces import build_model

        remote = self.backend == "remote"
        run = self.runner.run(build_model(cfg), batch=self.batch, threads=self.threads, provider=self.provider,
                              cache=True, anchor=None if remote else build_model(anchor))
        if run.latency is None:
            raise ProfileError(f"the {self.backend} backend cannot measure here: {run.note}")
        anchor_ms = run.anchor.value(self.statistic) if run.anchor else self.anchor_alone(anchor)
        return (CalibrationPoint(cfg, run.latency.value(self.statistic), anchor_ms, run.latency.cv),
                run.device or device_info())

    def anchor_alone(self, anchor: ArchConfig) -> float:
        key = anchor.config_hash()
        if key not in self._anchor_alone:
            from search_spaces import build_model

            run = self.runner.run(build_model(anchor), batch=self.batch, threads=self.threads, provider=self.provider,
                                  cache=True)
            self._anchor_alone[key] = run.latency.value(self.statistic)
        return self._anchor_alone[key]


def calibrate(archs: list[ArchConfig], anchor: ArchConfig, measurer: Measurer, *, resume: str | Path | None = None,
              progress: Callable[[Iterable], Iterable] | None = None) -> tuple[list[CalibrationPoint], dict]:
    """Measure every calibration architecture once; with `resume` (a JSON-lines file), points measured by an
    earlier, interrupted calibration with the same key are read from it and each new one appended to it."""
    done, device = _resumed(resume, measurer)
    points = []
    for cfg in (progress or iter)(archs):
        raise_if_interrupted()  # a signal swallowed in the last measurement (see nas.processes)
        point = done.get(cfg.config_hash())
        if point is None:
            point, device = measurer.measure(cfg, anchor)
            if resume:
                with open(resume, "a") as log:
                    log.write(json.dumps({"key": _measurer_key(measurer), "point": point.to_json(),
                                          "device": device}) + "\n")
        points.append(point)
    return points, device


def _measurer_key(measurer: Measurer) -> dict:
    return {"backend": measurer.backend, "threads": measurer.threads, "batch": measurer.batch,
            "provider": measurer.provider, "precision": measurer.precision, "statistic": measurer.statistic}


def _resumed(path: str | Path | None, measurer: Measurer) -> tuple[dict[str, CalibrationPoint], dict]:
    done, device = {}, {}
    if not path or not Path(path).exists():
        return done, device
    for line in Path(path).read_text().splitlines():
        try:
            entry = json.loads(line)
            if entry["key"] != _measurer_key(measurer):
                continue
            point = CalibrationPoint.from_json(entry["point"])
        except (ValueError, KeyError, TypeError):
            continue  # the line a killed calibration was writing
        done[point.arch.config_hash()] = point
        device = entry.get("device") or device
    return done, device


def fit_latency_model(space, *, image_size: int, in_channels: int, num_classes: int, measurer: Measurer,
                      size: int = 40, resume: str | Path | None = None, progress=None) -> LatencyModel:
    """Choose a calibration set from `space`, measure it (resumably) and fit the model."""
    from profilers._profile import device_label

    data = {"image_size": image_size, "in_channels": in_channels, "num_classes": num_classes}
    anchor = space.smallest_dense(**data)
    archs = calibration_set(space_architectures(space, **data), size, batch=measurer.batch)
    start = time.perf_counter()
    points, device = calibrate(archs, anchor, measurer, resume=resume, progress=progress)
    key = {**_measurer_key(measurer), "device": device_label(device)}
    return fit(points, key=key, anchor=anchor, device=device, calibration_s=time.perf_counter() - start)
