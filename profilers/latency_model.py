"""A latency model for one (device, backend, threads, batch, precision): latency without exporting or timing.

    model = LatencyModel.load("lm.json")      # refuses a corrupted or hand-edited file
    model.check(backend="onnxruntime", device=..., threads=1, batch=1)   # refuses another key, by name
    model.predict(cfg)                       # milliseconds on the device it was fitted on (~20 us)
    model.predict_ratio(cfg)                 # the same as a multiple of its anchor's latency

Calibration (`profilers.latency_calibration`, `vmoe-nas latency-model fit`): architectures chosen from a study's space
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
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from nas.config import write_atomically
from profilers._errors import ProfileError
from profilers._result import Prediction, ProfileResult
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
    "mixed_layers",  # per-image layers with k > 1: the k axis's reshapes, gate product and sum (k = 1 skips them)
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
        layers if per_image and k > 1 else 0,
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
    latency_ms: float  # its latency (the model's statistic of the per-call times)
    anchor_ms: float  # the anchor's, timed with it
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
    """A fitted latency model; `key` says what it predicts for: backend, device, threads, batch, precision, and
    the statistic of the per-call times it predicts (median or p5: `profilers._latency.STATISTICS`)."""

    key: dict
    anchor: ArchConfig
    anchor_ms: float  # the anchor's latency over the calibration: predict_ratio x this = milliseconds
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
        """Milliseconds on the calibrated device; with `anchor_ms` (the anchor's latency measured now), on
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

    @property
    def statistic(self) -> str:
        return self.key.get("statistic", "median")  # a file fitted before the choice existed: medians

    def check(self, *, backend: str, device: str | None, threads: int, batch: int, precision: str = "fp32",
              statistic: str = "median") -> None:
        """Refuse to predict for a key this model was not fitted for, naming the field that differs (`device`
        None: not known here, e.g. a remote agent not asked)."""
        wanted = {"backend": backend, "device": device, "threads": threads, "batch": batch, "precision": precision,
                  "statistic": statistic}
        for name, value in wanted.items():
            fitted = self.statistic if name == "statistic" else self.key[name]
            if value is not None and fitted != value:
                raise ProfileError(f"latency model {self.name} is for {name} {fitted!r}, not {value!r}: "
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
        return write_atomically(path, json.dumps(self.to_json(), indent=1))

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


def add_prediction(result: ProfileResult, model: LatencyModel, statistic: str = "median") -> ProfileResult:
    """`result` with the model's prediction (beside the measured latency, or alone when nothing was measured):
    its file, stated bound and any out-of-range feature; refuses a model of another backend, device, threads,
    batch, precision or statistic."""
    from profilers._profile import device_label

    remote_unmeasured = result.backend == "remote" and result.latency is None  # the agent, not this machine: not asked
    # A profile records no precision option: the model is checked for the default, fp32.
    model.check(backend=result.backend, device=None if remote_unmeasured else device_label(result.device),
                threads=result.threads, batch=result.batch, statistic=statistic)
    start = time.perf_counter()
    predicted = model.predict(result.arch)
    elapsed = time.perf_counter() - start
    return replace(result, prediction=Prediction(predicted, model.path, model.bound_pct, elapsed,
                                                 model.out_of_range(features(result.arch, model.key["batch"]))))


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
