"""A latency model for one (device, backend, threads, batch, precision): latency without exporting or timing.

    model = LatencyModel.load("lm.json")      # refuses a corrupted or hand-edited file
    model.check(backend="onnxruntime", device=..., threads=1, batch=1)   # refuses another key, by name
    model.predict(cfg)                       # milliseconds on the device it was fitted on (~20 us)
    model.predict_ratio(cfg)                 # the same as a multiple of its anchor's latency

Calibration (`fit_latency_model`, `vmoe-nas latency-model fit`): architectures chosen from a study's space
(every kind the space holds, spread over its extremes by farthest-point sampling) are each timed once,
interleaved with the space's smallest dense ViT (the anchor), so that a loaded machine shifts both alike; what
is fitted is their latency ratio to the anchor. The model is a non-negative linear regression of that ratio on
architecture features that add up, block by block, what each part of the exported graph costs: matmul work,
attention scores, element-wise traffic, and a per-operator overhead per block, per MoE layer and per expert of
a per-token layer (the loop its export unrolls). Non-negative, because no part of a model runs in negative
time; fitted on relative error, because the search compares models of very different sizes. Leave-one-out
errors on the calibration set are stored with it, beside those of a FLOPs-only fit, so the file says how
wrong it is and whether the features beat FLOPs. The anchor's own median at calibration turns ratios into
milliseconds; a study multiplies by its own anchor's median instead, as it does for measured latencies.

An architecture outside the calibrated range (a feature above the largest or below the smallest value
calibrated, or one the calibration never exercised) is predicted with an `OutOfRange` warning that names
the feature: extrapolating a linear cost model is usually close, and refusing would stop a search.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from profilers._errors import ProfileError
from search_spaces import ArchConfig

FORMAT = "vmoe-nas-latency-model"
VERSION = 1
FEATURES = (
    "constant",  # a session's call overhead, the head, the final norm
    "blocks",  # a block's ~20 operators, each with its dispatch overhead
    "patch_macs",  # the patch embedding convolution
    "token_elements",  # tokens x width per block: norms, residual adds, reshapes
    "linear_macs",  # qkv and projection matmuls
    "score_elements",  # heads x tokens^2 per block: softmax and its traffic
    "score_macs",  # tokens^2 x width per block: QK^T and AV
    "mlp_macs",  # dense MLPs
    "hidden_elements",  # tokens x hidden per MLP run: GELU
    "moe_layers",  # extra operators of an MoE layer (gather or the routing loop)
    "gathered_weights",  # per-image: the expert weights gathered per image (k x 2 x width x hidden)
    "expert_macs",  # the experts' matmuls, k per token
    "token_experts",  # per-token: one loop iteration per expert (NonZero, Gather, ScatterND...)
    "router_macs",  # routers: per-image once, per-token every MoE layer on every token
)
PRECISIONS = ("fp32", "fp16")


class OutOfRange(UserWarning):
    """An architecture with a feature outside the range the latency model was calibrated on."""


def features(cfg: ArchConfig, batch: int = 1) -> np.ndarray:
    """The architecture's cost features (FEATURES order) for one call at `batch`; pure arithmetic."""
    tokens, width, hidden, depth = cfg.num_tokens, cfg.width, cfg.mlp_hidden, cfg.depth
    moe = cfg.moe
    layers = len(cfg.moe_layers)
    k = moe.top_k if moe else 0
    per_token = bool(moe and moe.routing == "per_token")
    per_image = bool(moe) and not per_token
    mlp_runs = (depth - layers) + layers * k  # MLPs each token goes through
    values = (
        1.0,
        depth,
        batch * cfg.num_patches * width * cfg.in_channels * cfg.patch_size**2,
        batch * depth * tokens * width,
        batch * depth * tokens * 4 * width**2,
        batch * depth * cfg.num_heads * tokens**2,
        batch * depth * 2 * tokens**2 * width,
        batch * (depth - layers) * tokens * 2 * width * hidden,
        batch * mlp_runs * tokens * hidden,
        layers,
        batch * layers * k * 2 * width * hidden if per_image else 0,
        batch * layers * k * tokens * 2 * width * hidden,
        layers * moe.num_experts if per_token else 0,
        batch * (layers * tokens if per_token else 1 if per_image else 0) * width * (moe.num_experts if moe else 0),
    )
    return np.asarray(values, dtype=float)


def fit_ratio(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the squared relative error of x @ coef against y."""
    from scipy.optimize import nnls

    scale = np.abs(x).max(0)
    scale[scale == 0] = 1.0  # a feature the calibration never exercised: its coefficient stays 0
    coef, _ = nnls((x / scale) / y[:, None], np.ones(len(y)), maxiter=50 * x.shape[1])
    return coef / scale


def error_figures(predicted: np.ndarray, measured: np.ndarray) -> dict:
    """How far `predicted` is from `measured`, in percent of measured, and whether it orders them alike."""
    from scipy.stats import kendalltau

    error = 100 * (np.asarray(predicted) - measured) / measured
    tau = kendalltau(predicted, measured).statistic if len(measured) > 1 else float("nan")
    return {"count": len(error), "mape": float(np.abs(error).mean()), "within_5": float(np.mean(np.abs(error) <= 5)),
            "within_10": float(np.mean(np.abs(error) <= 10)), "p95_abs": float(np.percentile(np.abs(error), 95)),
            "max_abs": float(np.abs(error).max()), "kendall_tau": float(tau)}


def leave_one_out(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each calibration point predicted by a fit on all the others."""
    keep = np.ones(len(y), dtype=bool)
    out = np.empty(len(y))
    for i in range(len(y)):
        keep[i] = False
        out[i] = x[i] @ fit_ratio(x[keep], y[keep])
        keep[i] = True
    return out


@dataclass(frozen=True)
class CalibrationPoint:
    """One calibration architecture, timed interleaved with the anchor."""

    arch: ArchConfig
    latency_ms: float  # its median
    anchor_ms: float  # the anchor's median, timed with it
    cv: float | None = None

    @property
    def ratio(self) -> float:
        return self.latency_ms / self.anchor_ms

    def to_json(self) -> dict:
        return {"arch": self.arch.to_dict(), "latency_ms": self.latency_ms, "anchor_ms": self.anchor_ms, "cv": self.cv}

    @classmethod
    def from_json(cls, data: dict) -> CalibrationPoint:
        return cls(ArchConfig.from_dict(data["arch"]), float(data["latency_ms"]), float(data["anchor_ms"]),
                   data.get("cv"))


@dataclass
class LatencyModel:
    """A fitted latency model; `key` says what it predicts for: backend, device, threads, batch, precision."""

    key: dict
    anchor: ArchConfig
    anchor_ms: float  # the anchor's median over the calibration: predict_ratio x this = milliseconds
    coefficients: np.ndarray
    ranges: dict[str, tuple[float, float]]  # each feature's calibrated [min, max]
    calibration: list[CalibrationPoint]
    errors: dict  # leave-one-out figures of this model ("features") and of a FLOPs-only fit ("flops")
    device: dict = field(default_factory=dict)  # the full device description the key's label comes from
    calibration_s: float | None = None
    path: str | None = None  # the file it was loaded from: what messages name

    # ------------------------------------------------------------ prediction

    @property
    def bound_pct(self) -> float:
        """The stated bound: 95% of leave-one-out predictions were within this many percent."""
        return self.errors["features"]["p95_abs"]

    def predict_ratio(self, cfg: ArchConfig) -> float:
        """Latency of `cfg` as a multiple of the anchor's, timed interleaved; warns (`OutOfRange`) outside the
        calibrated range."""
        x = features(cfg, self.key["batch"])
        outside = self.out_of_range(x)
        if outside:
            warnings.warn(f"{cfg.name} is outside the range latency model {self.name} was calibrated on "
                          f"({'; '.join(outside)}): the prediction extrapolates", OutOfRange, stacklevel=2)
        return float(x @ self.coefficients)

    def predict(self, cfg: ArchConfig, *, anchor_ms: float | None = None) -> float:
        """Milliseconds on the calibrated device; with `anchor_ms` (the anchor's median measured now), on
        that scale instead, as a study reports measured latencies."""
        return self.predict_ratio(cfg) * (anchor_ms if anchor_ms is not None else self.anchor_ms)

    def out_of_range(self, x: np.ndarray) -> list[str]:
        outside = []
        for name, value in zip(FEATURES, x):
            low, high = self.ranges[name]
            if value > high * (1 + 1e-9) or value < low * (1 - 1e-9):
                outside.append(f"{name}={value:.4g} not in [{low:.4g}, {high:.4g}]")
        return outside

    # ------------------------------------------------------------ identity

    @property
    def name(self) -> str:
        return self.path or f"{self.key['backend']}@{self.key['device']}"

    def check(self, *, backend: str, device: str | None, threads: int, batch: int, precision: str = "fp32") -> None:
        """Refuse to predict for a key this model was not fitted for, naming the field that differs (`device`
        None: not known here, e.g. a remote agent not asked)."""
        wanted = {"backend": backend, "device": device, "threads": threads, "batch": batch, "precision": precision}
        for name, value in wanted.items():
            if value is not None and self.key[name] != value:
                raise ProfileError(f"latency model {self.name} is for {name} {self.key[name]!r}, not {value!r}: "
                                   "fit one for it with `vmoe-nas latency-model fit`")

    # ------------------------------------------------------------ the file

    def to_json(self) -> dict:
        body = {
            "format": FORMAT, "version": VERSION, "key": self.key, "device": self.device,
            "anchor": {"arch": self.anchor.to_dict(), "latency_ms": self.anchor_ms},
            "features": list(FEATURES), "coefficients": [float(c) for c in self.coefficients],
            "ranges": {name: list(pair) for name, pair in self.ranges.items()},
            "errors": self.errors, "calibration_s": self.calibration_s,
            "calibration": [point.to_json() for point in self.calibration],
        }
        return {**body, "checksum": checksum(body)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)  # a reader never sees half a file
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        """The model in `path`; one ProfileError for a missing, corrupted or hand-edited file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as error:
            raise ProfileError(f"latency model {path}: cannot read it ({error.strerror})") from None
        except (ValueError, UnicodeDecodeError) as error:
            raise ProfileError(f"latency model {path}: not a latency model file (not JSON: {error})") from None
        try:
            return cls.from_json(data, str(path))
        except ProfileError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ProfileError(f"latency model {path}: malformed ({type(error).__name__}: {error})") from None

    @classmethod
    def from_json(cls, data: dict, where: str = "<json>") -> LatencyModel:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"latency model {where}: not a latency model file (no format {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ProfileError(f"latency model {where}: version {data.get('version')!r}, this vmoe-nas reads "
                               f"version {VERSION}: fit it again")
        body = {name: value for name, value in data.items() if name != "checksum"}
        if data.get("checksum") != checksum(body):
            raise ProfileError(f"latency model {where}: corrupted or edited by hand (its checksum does not match): "
                               "fit it again")
        if data["features"] != list(FEATURES):
            raise ProfileError(f"latency model {where}: fitted on other features: fit it again")
        return cls(
            key=data["key"], anchor=ArchConfig.from_dict(data["anchor"]["arch"]),
            anchor_ms=float(data["anchor"]["latency_ms"]), coefficients=np.asarray(data["coefficients"], dtype=float),
            ranges={name: (float(low), float(high)) for name, (low, high) in data["ranges"].items()},
            calibration=[CalibrationPoint.from_json(point) for point in data["calibration"]], errors=data["errors"],
            device=data.get("device") or {}, calibration_s=data.get("calibration_s"), path=where,
        )


def add_prediction(result: dict, model: LatencyModel) -> dict:
    """`profile`'s result with `latency_ms.predicted` (beside the measured median, or alone when nothing was
    measured) and `latency_model` (its file, stated bound and any out-of-range feature); refuses a model of
    another backend, device, threads, batch or precision."""
    from profilers._profile import device_label

    measured = result["latency_ms"] is not None
    remote_unmeasured = result["backend"] == "remote" and not measured  # the agent, not this machine: not asked
    model.check(backend=result["backend"], device=None if remote_unmeasured else device_label(result["device"]),
                threads=result["threads"], batch=result["batch"], precision=result.get("precision") or "fp32")
    cfg = ArchConfig.from_dict(result["arch"])
    start = time.perf_counter()
    predicted = model.predict(cfg)
    elapsed = time.perf_counter() - start
    result["latency_ms"] = {**(result["latency_ms"] or {}), "predicted": predicted}
    result["latency_model"] = {"path": model.path, "bound_pct": model.bound_pct, "prediction_s": elapsed,
                               "out_of_range": model.out_of_range(features(cfg, model.key["batch"]))}
    return result


def checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fit(points: list[CalibrationPoint], *, key: dict, anchor: ArchConfig, device: dict | None = None,
        calibration_s: float | None = None) -> LatencyModel:
    """Fit the model on calibration points (their ratios to the anchor), with its leave-one-out errors and
    those of a FLOPs-only fit (a constant plus FLOPs per image: the proxy the model must beat)."""
    from profilers._flops import analytic_flops

    x = np.stack([features(p.arch, key["batch"]) for p in points])
    y = np.array([p.ratio for p in points])
    flops = np.stack([np.ones(len(y)), [analytic_flops(p.arch) for p in points]], axis=1).astype(float)
    errors = {"features": error_figures(leave_one_out(x, y), y), "flops": error_figures(leave_one_out(flops, y), y)}
    ranges = {name: (float(x[:, i].min()), float(x[:, i].max())) for i, name in enumerate(FEATURES)}
    anchor_ms = float(np.median([p.anchor_ms for p in points]))
    return LatencyModel(key, anchor, anchor_ms, fit_ratio(x, y), ranges, list(points), errors, device or {},
                        calibration_s)


# ---------------------------------------------------------------- the calibration set


def space_architectures(space, *, image_size: int, in_channels: int, num_classes: int) -> list[ArchConfig]:
    """Every distinct buildable architecture of a space (its choices' product; a few thousand at most)."""
    import itertools

    from search_spaces.mobile_vmoe import PARAMS, InvalidArchitecture

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
        anchor_ms = run.anchor.median if run.anchor else self.anchor_alone(anchor)
        return CalibrationPoint(cfg, run.latency.median, anchor_ms, run.latency.cv), run.device or device_info()

    def anchor_alone(self, anchor: ArchConfig) -> float:
        key = anchor.config_hash()
        if key not in self._anchor_alone:
            from search_spaces import build_model

            run = self.runner.run(build_model(anchor), batch=self.batch, threads=self.threads, provider=self.provider,
                                  cache=True)
            self._anchor_alone[key] = run.latency.median
        return self._anchor_alone[key]


def calibrate(archs: list[ArchConfig], anchor: ArchConfig, measurer: Measurer, *, resume: str | Path | None = None,
              progress: Callable[[Iterable], Iterable] | None = None,
              ahead: Callable[[list[ArchConfig]], AbstractContextManager] | None = None,
              ) -> tuple[list[CalibrationPoint], dict]:
    """Measure every calibration architecture once; with `resume` (a JSON-lines file), points measured by an
    earlier, interrupted calibration with the same key are read from it and each new one appended to it.
    `ahead` (e.g. `onnx_exports_ahead`) prepares the architectures still to measure while earlier ones are
    timed; it yields a function that waits until one is ready."""
    done, device = _resumed(resume, measurer)
    todo = [cfg for cfg in archs if cfg.config_hash() not in done]
    points = []
    with (ahead([anchor, *todo]) if ahead and todo else nullcontext(lambda cfg: None)) as ready:
        for cfg in (progress or iter)(archs):
            point = done.get(cfg.config_hash())
            if point is None:
                ready(cfg)
                point, device = _measured(measurer, cfg, anchor, resume)
            points.append(point)
    return points, device


def _measured(measurer: Measurer, cfg: ArchConfig, anchor: ArchConfig,
              resume: str | Path | None) -> tuple[CalibrationPoint, dict]:
    point, device = measurer.measure(cfg, anchor)
    if resume:
        with open(resume, "a") as log:
            log.write(json.dumps({"key": _measurer_key(measurer), "point": point.to_json(), "device": device}) + "\n")
    return point, device


@contextmanager
def onnx_exports_ahead(archs: list[ArchConfig]) -> Iterator[Callable[[ArchConfig], BaseException | None]]:
    """Export `archs` to ONNX Runtime's export cache, in order, in one worker process, while this one times
    those already exported: the export (3-5 s for a 28 px model) is most of a calibration's time, and with a
    second core it overlaps the timing instead of preceding it. The timed core shares the machine with the
    export, as it would with any other job: the interleaved anchor is what keeps the ratios fair. A failed
    export is left to the measurement, which exports again and reports it."""
    from profilers._export import cached_onnx  # torch.onnx: only a calibration that exports pays for it

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread)
    futures = {cfg.config_hash(): pool.submit(cached_onnx, cfg) for cfg in archs}
    try:
        yield lambda cfg: futures[cfg.config_hash()].exception() if cfg.config_hash() in futures else None
    finally:
        pool.shutdown(cancel_futures=True)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def exports_ahead_for(measurer: Measurer) -> Callable[[list[ArchConfig]], AbstractContextManager] | None:
    """`onnx_exports_ahead` where it helps: ONNX Runtime on this machine (fp32, the cached export), 2+ cores."""
    if measurer.backend == "onnxruntime" and measurer.precision == "fp32" and (os.cpu_count() or 1) > 1:
        return onnx_exports_ahead
    return None


def _measurer_key(measurer: Measurer) -> dict:
    return {"backend": measurer.backend, "threads": measurer.threads, "batch": measurer.batch,
            "provider": measurer.provider, "precision": measurer.precision}


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
    points, device = calibrate(archs, anchor, measurer, resume=resume, progress=progress,
                               ahead=exports_ahead_for(measurer))
    key = {**_measurer_key(measurer), "device": device_label(device)}
    return fit(points, key=key, anchor=anchor, device=device, calibration_s=time.perf_counter() - start)
