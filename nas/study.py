"""The study config: everything one search needs, from one validated YAML file.

Shipped presets (`nas/studies/*.yaml`) are picked by bare name (`smoke`, `fashion-quick`,
`positive-control`); command-line flags override fields. Every bad field gets one `ConfigError` naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

import profilers
from nas.config import MAX_SEED, ConfigError, check_fields, check_number, from_mapping, is_file, read_yaml
from nas.objectives import OBJECTIVES, Objective, objectives_for
from profilers._latency import check_statistic
from search_spaces import ArchConfig, load_arch
from search_spaces.mobile_vmoe import SPACES, MobileVMoESpace

STUDY_DIR = Path(__file__).parent / "studies"
log = logging.getLogger("vmoe_nas.study")

SAMPLERS = ("tpe", "nsga2", "gp", "random")
LATENCY_MODES = ("measured", "predicted", "predicted+verify")
AUTO = "auto"  # profiler.latency_model: the study fits its own (nas.latency.fit_auto_model)
BACKENDS = profilers.BACKENDS  # the backend registry: names, and the classes on demand
# Upper bounds: past them a number is a typo, and would fail deep inside a run (an overflow, a raw MemoryError).
MAX_COUNT = 2**63 - 1  # trials, steps, images: what storages and torch hold as int64
MAX_PROCESSES = 256  # worker or decoding processes on one machine
MAX_SECONDS = 10**9  # about 32 years; threading's waits overflow a little past 292
MAX_CONFIRM_SEEDS = 100  # seeds per arm: each one trains every arm again
MAX_CONFIRM_PAIRS = 100


def _section(cls: type, data: Any, where: str):
    """A study section's dataclass; an absent section takes the defaults."""
    return cls() if data is None else from_mapping(cls, data, where)


@dataclass
class DataSpec:
    name: str = "fashion-mnist"  # a data set name understood by nas.data.load_dataset
    data_dir: str | None = None
    limit: int | None = None  # training images the proxy uses: the search needs a ranking, not a record
    val_fraction: float = 0.1
    seed: int = 0  # the train/val split, and the classes and images a subset draws
    # Image folders (imagefolder:PATH, imagenet:PATH; see nas.streaming.FolderOptions); None: the default.
    image_size: int | None = None
    stream: str | bool | None = None  # auto | true | false
    max_memory_mb: float | None = None
    workers: int | None = None
    classes: int | None = None
    per_class: int | None = None
    corrupt: str | None = None  # skip | error

    def validate(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("data.name", f"must name a data set, got {self.name!r}")
        check_number("data.limit", self.limit, minimum=1, maximum=MAX_COUNT, integer=True, optional=True)
        check_number("data.seed", self.seed, maximum=MAX_SEED, integer=True)
        if not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction < 1:
            raise ConfigError("data.val_fraction", f"must be in (0, 1), got {self.val_fraction!r}")
        from nas.streaming import FolderOptions

        FolderOptions(**self.folder_options())

    def folder_options(self) -> dict[str, Any]:
        """The image-folder options that are set, as `nas.data.load_dataset` takes them."""
        from nas.streaming import FOLDER_FIELDS

        return {name: getattr(self, name) for name in FOLDER_FIELDS if getattr(self, name) is not None}


@dataclass
class ProfilerSpec:
    backend: str = "onnxruntime"
    threads: int = 1  # one thread: the phone-class target, and stable numbers beside a training job
    batch: int = 1
    provider: str | None = None
    remote_url: str | None = None  # for backend: remote
    # Time each trial interleaved with the space's smallest dense ViT and report latency on that anchor's
    # scale: absolute times drift 5-25% between processes on a shared machine, ratios hold. Local backends.
    anchor: bool = True
    # Where a trial's latency comes from: `measured` (exported and timed), `predicted` (from the latency model
    # file `latency_model`, fitted with `vmoe-nas latency-model fit`), or `predicted+verify` (predicted, and
    # the trials on a Pareto front measured after the search: nas.latency). `latency_model: auto`: the study
    # fits its own before its first trial (results/<study>/latency_model/).
    latency: str = "measured"
    latency_model: str | None = None
    # What a latency is, of a timing's per-call times: `median`, or `p5` (5th percentile: the time of a call
    # nothing interrupted, which repeats on a loaded machine where the median drifts; a latency model fitted
    # on one predicts that one).
    statistic: str = "median"

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError("profiler.backend", f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        check_number("profiler.threads", self.threads, minimum=1, maximum=profilers.MAX_THREADS, integer=True)
        check_number("profiler.batch", self.batch, minimum=1, maximum=profilers.MAX_BATCH, integer=True)
        if self.backend == "remote" and not self.remote_url:
            raise ConfigError("profiler.remote_url", "the remote backend needs the agent's URL")
        if not isinstance(self.anchor, bool):
            raise ConfigError("profiler.anchor", f"must be true or false, got {self.anchor!r}")
        if self.latency not in LATENCY_MODES:
            raise ConfigError("profiler.latency", f"must be one of {', '.join(LATENCY_MODES)}, got {self.latency!r}")
        if self.latency != "measured" and not self.latency_model:
            raise ConfigError("profiler.latency_model", f"latency: {self.latency} needs a latency model file "
                              "(vmoe-nas latency-model fit --config STUDY --out PATH), or auto (the search fits it)")
        check_statistic("profiler.statistic", self.statistic)
        if self.latency_model is not None and not isinstance(self.latency_model, str):
            raise ConfigError("profiler.latency_model", f"must be a file path or auto, got {self.latency_model!r}")

    def options(self) -> dict[str, Any]:
        options = {"backend": self.backend, "threads": self.threads, "batch": self.batch, "statistic": self.statistic}
        if self.provider:
            options["provider"] = self.provider
        if self.remote_url:
            options["remote_url"] = self.remote_url
        return options


@dataclass
class Constraints:
    max_latency_ms: float | None = None
    max_flops: float | None = None
    max_params: float | None = None  # active parameters
    max_size_mb: float | None = None  # fp32 size of all parameters, MB = 1e6 bytes

    def validate(self) -> None:
        for f in fields(self):
            check_number(f"constraints.{f.name}", getattr(self, f.name), minimum=1e-12, optional=True)

    def active(self) -> dict[str, tuple[str, float]]:
        """constraint name -> (metric key, limit), for the limits that are set."""
        metric = {"max_latency_ms": "latency_ms", "max_flops": "flops", "max_params": "params_active",
                  "max_size_mb": "size_mb"}
        return {name: (metric[name], limit) for name, limit in dataclasses.asdict(self).items() if limit is not None}


@dataclass
class ConfirmSpec:
    """The confirmation stage after the search (`nas.confirm`): the top `pairs` MoEs of the MoE front, each
    retrained with `seeds` seeds beside its dense comparators; `vmoe-nas confirm` flags override these."""

    # On: a search ends with its verdict confirmed, unless the study says `confirm: {enabled: false}` (or the
    # command line `--no-confirm`); `vmoe-nas confirm` confirms any study whatever this says.
    enabled: bool = True
    seeds: int = 3  # the fewest that give a t-interval with a finite width worth reading
    pairs: int = 2  # MoEs from the top of the MoE front (by accuracy), each with up to 3 comparators
    steps: int | None = None  # training steps per run; None: the search's top rung (its full budget)
    margin: float = 0.0  # accuracy gain (fraction) the interval's lower bound must clear for `beats`
    # The latency tie band's cap (a fraction): a quiet machine's timings spread 1-5%; a measured band or anchor
    # spread beyond it is a loaded machine, warned about, and its latency verdicts marked unreliable.
    max_latency_band: float = 0.1

    def validate(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError("confirm.enabled", f"must be true or false, got {self.enabled!r}")
        check_number("confirm.seeds", self.seeds, minimum=1, maximum=MAX_CONFIRM_SEEDS, integer=True)
        check_number("confirm.pairs", self.pairs, minimum=1, maximum=MAX_CONFIRM_PAIRS, integer=True)
        check_number("confirm.steps", self.steps, minimum=1, maximum=MAX_COUNT, integer=True, optional=True)
        check_number("confirm.margin", self.margin, maximum=1)  # a fraction of the images
        check_number("confirm.max_latency_band", self.max_latency_band, minimum=0)


RUNG_FIELDS = ("min_steps", "max_steps", "reduction_factor")  # the evaluator's multi-fidelity schedule


@dataclass(frozen=True)
class Rungs:
    """Successive halving by training steps (asynchronous, per kind: see `nas.rung_policy.MOASHA`). A trial is
    evaluated at each rung and goes on to the next only if it is among the best 1/`reduction_factor` of the
    trials of its kind that reached the rung; the last rung is the full budget, and a trial's last
    evaluation never stops it. One rung (a single budget) stops no trial."""

    steps: tuple[int, ...]  # e.g. (150, 450, 1350): min_steps times powers of reduction_factor, then max_steps
    reduction_factor: int = 3

    @classmethod
    def of(cls, evaluator: dict) -> Rungs | None:
        """The rungs an evaluator describes; None for a budget in epochs or seconds (one evaluation)."""
        if not any(name in evaluator for name in RUNG_FIELDS):
            steps = evaluator.get("steps")
            return cls((steps,)) if isinstance(steps, int) and not isinstance(steps, bool) else None
        for name in ("steps", "epochs", "seconds"):
            if evaluator.get(name) is not None:
                raise ConfigError(f"evaluator.{name}", "give either a budget or min_steps/max_steps, not both")
        low, high = evaluator.get("min_steps"), evaluator.get("max_steps")
        factor = evaluator.get("reduction_factor", 3)
        check_number("evaluator.min_steps", low, minimum=1, maximum=MAX_COUNT, integer=True)
        check_number("evaluator.max_steps", high, minimum=1, maximum=MAX_COUNT, integer=True)
        check_number("evaluator.reduction_factor", factor, minimum=2, maximum=MAX_COUNT, integer=True)
        if high < low:
            raise ConfigError("evaluator.max_steps", f"must be >= min_steps ({low}), got {high}")
        steps = [low]
        while steps[-1] * factor < high:
            steps.append(steps[-1] * factor)
        return cls(tuple(steps + [high]) if steps[-1] != high else tuple(steps), factor)


@dataclass
class StudyConfig:
    study_name: str = "default"
    data: DataSpec = field(default_factory=DataSpec)
    space: MobileVMoESpace = field(default_factory=MobileVMoESpace)
    objectives: list[str] = field(default_factory=lambda: ["accuracy", "flops"])
    constraints: Constraints = field(default_factory=Constraints)
    sampler: str = "tpe"
    seed: int = 0
    n_trials: int | None = 20
    timeout: float | None = None  # seconds; the study stops starting trials after it
    # A nas.recipe.TrainRecipe as YAML, whose budget is `steps`, `epochs` or `seconds`, or multi-fidelity
    # rungs: `min_steps`, `max_steps` and `reduction_factor` (see `Rungs`).
    evaluator: dict = field(default_factory=lambda: {"epochs": 1})
    profiler: ProfilerSpec = field(default_factory=ProfilerSpec)
    storage: str | None = None  # default: a SQLite file (journal file with --workers > 1) in results/<study>/
    workers: int = 1
    devices: list = field(default_factory=list)  # cuda:N per worker process (round robin), pinned in each as `cuda`
    heartbeat_interval: int = 10  # seconds between lease renewals; a trial whose lease lapses is reclaimed
    max_retries: int = 1  # times a trial whose worker died is re-queued for another worker
    trial_timeout: float | None = None  # seconds a trial may run before it is stopped and recorded as failed
    trial_memory_mb: float | None = None  # resident memory of the worker a trial may reach, likewise
    results_dir: str = "results"
    enqueue: list = field(default_factory=list)  # preset names, YAML paths or param dicts, run first
    confirm: ConfirmSpec = field(default_factory=ConfirmSpec)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.study_name, str) or not self.study_name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError("study_name", f"must be letters, digits, '-' or '_', got {self.study_name!r}")
        self.data.validate()
        if not self.objectives or not isinstance(self.objectives, list):
            raise ConfigError("objectives", f"must list objectives among {', '.join(OBJECTIVES)}")
        for name in self.objectives:
            if not isinstance(name, str) or name not in OBJECTIVES:
                raise ConfigError("objectives", f"unknown objective {name!r} (use {', '.join(OBJECTIVES)})")
        if len(set(self.objectives)) != len(self.objectives):
            raise ConfigError("objectives", f"each objective once, got {self.objectives}")
        self.constraints.validate()
        if self.sampler not in SAMPLERS:
            raise ConfigError("sampler", f"must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        check_number("seed", self.seed, maximum=MAX_SEED, integer=True)
        check_number("n_trials", self.n_trials, minimum=1, maximum=MAX_COUNT, integer=True, optional=True)
        check_number("timeout", self.timeout, minimum=1e-9, maximum=MAX_SECONDS, optional=True)
        if self.n_trials is None and self.timeout is None:
            raise ConfigError("n_trials", "set n_trials, timeout or both, or the study never ends")
        self.profiler.validate()
        self.confirm.validate()
        check_number("workers", self.workers, minimum=1, maximum=MAX_PROCESSES, integer=True)
        self.check_devices()
        check_number("heartbeat_interval", self.heartbeat_interval, minimum=1, maximum=MAX_SECONDS, integer=True)
        check_number("max_retries", self.max_retries, maximum=1000, integer=True)
        check_number("trial_timeout", self.trial_timeout, minimum=1e-9, maximum=MAX_SECONDS, optional=True)
        check_number("trial_memory_mb", self.trial_memory_mb, minimum=1, maximum=2**40, optional=True)
        if not isinstance(self.evaluator, dict):
            raise ConfigError("evaluator", f"must be a mapping of training-recipe fields, got {self.evaluator!r}")
        self.check_supernet()
        self.recipe()  # validates the evaluator fields
        for name in ("storage", "results_dir"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value) and not (name == "storage" and value is None):
                raise ConfigError(name, f"must be a non-empty string, got {value!r}")
        if not isinstance(self.enqueue, list) or not all(isinstance(e, (str, dict)) for e in self.enqueue):
            raise ConfigError("enqueue", "must be a list of presets, YAML paths or parameter mappings")
        if self.n_trials is not None and len(self.enqueue) > self.n_trials:
            raise ConfigError("enqueue", f"{len(self.enqueue)} architectures to enqueue but n_trials={self.n_trials}")
        self.enqueued_params()  # every entry resolves to parameters of the space

    def check_devices(self) -> None:
        from nas.devices import parse_device

        if not isinstance(self.devices, list) or not all(isinstance(d, str) for d in self.devices):
            raise ConfigError("devices", f"must list devices such as cuda:0, cuda:1, got {self.devices!r}")
        for device in self.devices:
            if parse_device(device)[0] != "cuda":
                raise ConfigError("devices", f"pins worker processes to GPUs (cuda:N), got {device!r}")
        if self.devices and self.evaluator.get("device", "auto") not in ("auto", "cuda"):
            raise ConfigError("devices", f"each worker trains on its own GPU, seen there as cuda; drop "
                                         f"evaluator.device ({self.evaluator['device']}) or the devices")

    def check_supernet(self) -> None:
        """`evaluator.kind`: train (each trial trains its proxy) or supernet (each trial inherits its weights
        from the study's supernet, `nas.supernet`), whose options are checked here."""
        from nas.recipe import EVALUATOR_KINDS

        if self.evaluator_kind not in EVALUATOR_KINDS:
            raise ConfigError("evaluator.kind", f"must be one of {', '.join(EVALUATOR_KINDS)}, got "
                                                f"{self.evaluator_kind!r}")
        if self.evaluator_kind != "supernet":
            return
        self.supernet  # noqa: B018 (validates its fields)
        for name in RUNG_FIELDS:
            if name in self.evaluator:
                raise ConfigError(f"evaluator.{name}", "a supernet evaluator trains one supernet: it has no rungs")
        if self.confirm.enabled and self.confirm.steps is None:
            raise ConfigError("confirm.steps", "a supernet study confirms by training standalone: give its steps")

    @property
    def evaluator_kind(self) -> str:
        return self.evaluator.get("kind", "train")

    @property
    def supernet(self):
        """The supernet options of a `kind: supernet` evaluator (`nas.recipe.SupernetSpec`)."""
        from nas.recipe import SupernetSpec

        return SupernetSpec.of(self.evaluator)

    def recipe(self):
        """The proxy training of every trial (of the supernet, for `kind: supernet`); with rungs, its schedule
        spans the last rung. Parsed once per evaluator (one `confirm` asks for it several times); an evaluator
        replaced or changed in place is parsed again."""
        cached = getattr(self, "_parsed_recipe", None)
        if cached is None or cached[0] != self.evaluator:
            self._parsed_recipe = (copy.deepcopy(self.evaluator), self._parse_recipe())
        return self._parsed_recipe[1]

    def _parse_recipe(self):
        from nas.recipe import TrainRecipe  # the trainer pulls in torch data code; only needed here

        skip = RUNG_FIELDS + ("kind",)
        if self.evaluator_kind == "supernet":
            from nas.recipe import SUPERNET_FIELDS

            skip += SUPERNET_FIELDS
        recipe = {k: v for k, v in self.evaluator.items() if k not in skip}
        rungs = self.rungs
        if rungs is not None and "max_steps" in self.evaluator:
            recipe["steps"] = rungs.steps[-1]
        try:
            return TrainRecipe.from_dict(recipe)
        except ConfigError as error:
            raise ConfigError(f"evaluator.{error.field}", error.problem) from None

    @property
    def rungs(self) -> Rungs | None:
        return None if self.evaluator_kind == "supernet" else Rungs.of(self.evaluator)

    @property
    def study_objectives(self) -> list[Objective]:
        return objectives_for(self.objectives)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.study_objectives]

    @property
    def study_dir(self) -> Path:
        return Path(self.results_dir) / self.study_name

    def enqueued_params(self) -> list[dict]:
        """The trial parameters of each `enqueue` entry, in order."""
        params = []
        for entry in self.enqueue:
            if isinstance(entry, dict):
                self.space.check_params(entry, "enqueue")
                params.append(dict(entry))
                continue
            try:
                cfg: ArchConfig = load_arch(entry)
            except ConfigError as error:
                raise ConfigError("enqueue", f"{entry!r}: {error}") from None
            params.append(self.space.params_for(cfg))
        return params

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["space"] = {"name": "mobile_vmoe", **self.space.to_dict()}
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any) -> StudyConfig:
        if isinstance(data, dict) and "early_stopping" in data:  # the rule before rungs: stored studies still open
            data = {k: v for k, v in data.items() if k != "early_stopping"}
        data = dict(check_fields(cls, data, ""))
        data["data"] = _section(DataSpec, data.get("data"), "data")
        data["constraints"] = _section(Constraints, data.get("constraints"), "constraints")
        data["profiler"] = _section(ProfilerSpec, data.get("profiler"), "profiler")
        data["confirm"] = _section(ConfirmSpec, data.get("confirm"), "confirm")
        data["space"] = _space_from_dict(data.get("space"))
        data["enqueue"] = data.get("enqueue") or []
        return cls(**data)


def _space_from_dict(data: Any) -> MobileVMoESpace:
    if data is None:
        return MobileVMoESpace()
    if not isinstance(data, dict):
        raise ConfigError("space", f"must be a mapping, got {data!r}")
    data = dict(data)
    name = data.pop("name", "mobile_vmoe")
    if not isinstance(name, str) or name not in SPACES:
        raise ConfigError("space.name", f"unknown search space {name!r} (known: {', '.join(SPACES)})")
    return SPACES[name].from_dict(data)


def study_preset_names() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def load_study_config(path_or_preset: str | Path, **overrides: Any) -> StudyConfig:
    """A study config from a YAML file or a shipped preset name; `overrides` (non-None) replace fields,
    e.g. the command line's --n-trials or --storage."""
    path = Path(path_or_preset)
    if not is_file(path):
        path = STUDY_DIR / f"{path_or_preset}.yaml"
        if not is_file(path):
            raise ConfigError(
                "config", f"{path_or_preset!r} is neither a file nor a study preset ({', '.join(study_preset_names())})"
            )
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of study fields")
    data.update({key: value for key, value in overrides.items() if value is not None})
    # Flags that override one field of a section: --data, --data-dir, --backend, --remote-url, --statistic.
    for section, flags in (("data", {"data_name": "name", "data_dir": "data_dir"}),
                           ("profiler", {"backend": "backend", "remote_url": "remote_url", "statistic": "statistic"}),
                           ("evaluator", {"device": "device"})):
        section_overrides = {flags[k]: data.pop(k) for k in flags if k in data}
        if section_overrides:
            data[section] = {**(data.get(section) or {}), **section_overrides}
    try:
        return StudyConfig.from_dict(data)
    except ConfigError as error:
        raise ConfigError(error.field, f"{error.problem} (in {path})") from None
