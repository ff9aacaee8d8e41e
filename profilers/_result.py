"""What `profile` returns: one architecture's costs as typed fields, and their JSON form.

`ProfileResult.to_dict()` is what `vmoe-nas profile --json` prints and an export's trial.json holds;
`to_dict(derived=False)` leaves out what the architecture and the counts give again (a trial record
stores that: its architecture is stored beside it). `from_dict` reads either form back.
"""

from __future__ import annotations

from dataclasses import dataclass

from profilers._latency import LatencyStats
from search_spaces import ArchConfig

# The keys `to_dict` computes from the other fields: a stored profile may leave them out.
DERIVED = ("name", "config_hash", "arch", "size_bytes_fp32", "size_bytes_fp16", "size_bytes_fp32_active",
           "size_bytes_fp16_active", "latency_unit", "latency_ms_per_image")


@dataclass(frozen=True)
class AnchorTiming:
    """The anchor model's latency, timed interleaved with the profiled model, and the profiled model's ratio."""

    name: str
    config_hash: str
    latency: LatencyStats
    ratio: float  # the profiled model's `statistic` over the anchor's: what holds across processes and hours
    statistic: str = "median"

    def to_dict(self) -> dict:
        # The statistic only where it is not the median: a profile stored before the choice existed reads and
        # writes back unchanged.
        statistic = {"statistic": self.statistic} if self.statistic != "median" else {}
        return {"name": self.name, "config_hash": self.config_hash, "latency_ms": self.latency.to_dict(),
                "ratio": self.ratio, **statistic}

    @classmethod
    def from_dict(cls, data: dict) -> AnchorTiming:
        return cls(data["name"], data["config_hash"], LatencyStats.from_dict(data["latency_ms"]), data["ratio"],
                   data.get("statistic", "median"))


@dataclass(frozen=True)
class Prediction:
    """A latency from a latency model (`profilers.latency_model`), beside a measured one or instead of it."""

    ms: float
    path: str | None  # the model's file (None: a model fitted in this process)
    bound_pct: float  # 95% of the model's leave-one-out errors were within it
    prediction_s: float | None = None  # how long predicting took (the command line reports it)
    out_of_range: list[str] | None = None  # features outside the calibration's ranges

    def model_dict(self) -> dict:
        """The `latency_model` entry of the JSON form."""
        extra = {"prediction_s": self.prediction_s, "out_of_range": self.out_of_range}
        return {"path": self.path, "bound_pct": self.bound_pct, **{k: v for k, v in extra.items() if v is not None}}

    @classmethod
    def from_dict(cls, ms: float, model: dict) -> Prediction:
        return cls(ms, model["path"], model["bound_pct"], model.get("prediction_s"), model.get("out_of_range"))


@dataclass(frozen=True)
class ProfileResult:
    """Parameters, FLOPs and (when measured) latency of one architecture on one backend and machine."""

    arch: ArchConfig
    params_total: int
    params_active: int  # per image: k of E experts
    flops: int  # active FLOPs per image (1 multiply-add = 1 FLOP)
    flops_by_module: dict[str, int]
    uncounted_ops: list[str]  # traced ops with no FLOP handle: `flops` misses them
    backend: str
    provider: str | None
    threads: int
    batch: int
    export_form: str | None  # the form the backend measures (how its MoE layers compute)
    device: dict  # `device_info()` of the machine that measured (a remote agent's, with its remote_url)
    latency: LatencyStats | None = None  # per call: one batch of `batch` images; None: not measured
    latency_note: str | None = None  # why there is no latency, or what to know about it
    artifact: str | None = None  # the exported file or folder that was (or would be) measured
    anchor: AnchorTiming | None = None
    warnings: list[str] | None = None  # what makes the latency doubtful; None: nothing was measured
    prediction: Prediction | None = None

    @property
    def name(self) -> str:
        return self.arch.name

    @property
    def config_hash(self) -> str:
        return self.arch.config_hash()

    def size_bytes(self) -> dict[str, int]:
        """fp32 and fp16 weight sizes, all and active per image, by their JSON keys."""
        return {"size_bytes_fp32": 4 * self.params_total, "size_bytes_fp16": 2 * self.params_total,
                "size_bytes_fp32_active": 4 * self.params_active, "size_bytes_fp16_active": 2 * self.params_active}

    def latency_ms_per_image(self) -> dict[str, float] | None:
        if self.latency is None:
            return None
        return {k: getattr(self.latency, k) / self.batch for k in ("median", "p10", "p90")}

    def to_dict(self, *, derived: bool = True) -> dict:
        """The JSON form, keys in the order `vmoe-nas profile --json` has always printed them; without the
        `DERIVED` keys when `derived` is false."""
        latency = {**(self.latency.to_dict() if self.latency else {}),
                   **({"predicted": self.prediction.ms} if self.prediction else {})}
        data = {
            "name": self.name, "config_hash": self.config_hash, "arch": self.arch.to_dict(),
            "params_total": self.params_total, "params_active": self.params_active,
            "flops": self.flops, "flops_by_module": self.flops_by_module, "uncounted_ops": self.uncounted_ops,
            **self.size_bytes(),
            "latency_ms": latency or None, "latency_note": self.latency_note,
            "backend": self.backend, "provider": self.provider, "threads": self.threads, "batch": self.batch,
            "export_form": self.export_form, "artifact": self.artifact, "device": self.device,
        }
        if self.anchor:
            data["anchor"] = self.anchor.to_dict()
        if self.latency:  # every latency figure is per call: one batch of `batch` images
            data["latency_unit"] = f"ms per call, one batch of {self.batch} image{'s' * (self.batch > 1)}"
            data["latency_ms_per_image"] = self.latency_ms_per_image()
        if self.warnings is not None:
            data["warnings"] = self.warnings
        if self.prediction:
            data["latency_model"] = self.prediction.model_dict()
        return data if derived else {key: value for key, value in data.items() if key not in DERIVED}

    @classmethod
    def from_dict(cls, data: dict, arch: ArchConfig | None = None) -> ProfileResult:
        """A result from its JSON form, with or without the derived keys (`arch`: the architecture, where the
        data leaves it out)."""
        latency = dict(data.get("latency_ms") or {})
        predicted = latency.pop("predicted", None)
        return cls(
            arch=arch or ArchConfig.from_dict(data["arch"]),
            params_total=data["params_total"], params_active=data["params_active"], flops=data["flops"],
            flops_by_module=data["flops_by_module"], uncounted_ops=data["uncounted_ops"],
            backend=data["backend"], provider=data["provider"], threads=data["threads"], batch=data["batch"],
            export_form=data["export_form"], device=data["device"],
            latency=LatencyStats.from_dict(latency) if latency else None, latency_note=data.get("latency_note"),
            artifact=data.get("artifact"), anchor=AnchorTiming.from_dict(data["anchor"]) if "anchor" in data else None,
            warnings=data.get("warnings"),
            prediction=Prediction.from_dict(predicted, data["latency_model"]) if predicted is not None else None,
        )
