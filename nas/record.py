"""What a trial is: one typed record, and the Optuna trial attributes that store it, spelled in this module only.

A search trial stores everything a later command needs as Optuna user attributes, so the storage alone
rebuilds any model: the architecture (its YAML), its profile (`profilers.ProfileResult`), the training record
and each metric and the accuracy at each rung as attributes of their own.
`user_attrs(record)` and `read(frozen_trial)` are the only places that spell those attribute names (a running
trial's record is written through `nas.trial_store.write`, which owns the storage); the layout is versioned
(`record_version`), and `read` still understands studies written before it was.
`read_study` and `write_study` do the same for what a study stores about itself.

Whether a trial finished, failed or was stopped is Optuna's state; a record's `status` is derived from
that state, its constraints and whether it got an architecture, never stored beside it.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.objectives import Objective
from profilers import ProfileResult
from search_spaces import ArchConfig

# 1: before versioning (also stored `arch` as a dict and a `status`); 2: per-image correctness as two attributes,
# `val_correct_bits` and `n_val`; 3: it is one attribute, so a reader never sees half of it; 4: this layout, where
# the metrics are flat attributes and the rung accuracies Optuna's intermediate values (version 3 kept them in a
# `metrics` dict and a `rung_accuracy` list), which optuna-dashboard sorts by and plots as learning curves; 5: the
# profile without what its architecture gives again (`ProfileResult.to_dict(derived=False)`; 4 stored it all); 6: the
# rung accuracies one attribute again, `rung_accuracy` ([step, accuracy] pairs): as intermediate values, TPE read
# them as a single objective's and failed every multi-objective trial past its start-up trials
VERSION = 6
VERSION_ATTR = "record_version"
LEASE_ATTR = "lease_until"  # renewed by the running trial's worker (nas.trial_store.lease)
CONSTRAINED_ATTR = "constraints_set"  # the trial's constraints are stored (in Optuna's system attributes)


@dataclass
class Metrics:
    """The flat numbers of a trial: what Pareto analysis, reports and export read (None: not measured)."""

    accuracy: float | None = None  # validation top-1 after proxy training
    first_eval_accuracy: float | None = None
    router_accuracy: float | None = None  # super-class accuracy of a per-image router
    flops: int | None = None  # per image, batch 1
    params_total: int | None = None
    params_active: int | None = None  # per image: k of E experts
    size_bytes_fp32: int | None = None
    size_mb: float | None = None
    latency_ms: float | None = None  # on the study anchor's scale where there is one
    latency_ms_measured: float | None = None  # the trial's own timing (profiler.statistic: median or p5)
    latency_ms_predicted: float | None = None  # from the study's latency model (profiler.latency: predicted...)
    latency_ratio: float | None = None  # to the anchor, timed interleaved
    latency_cv: float | None = None
    latency_backend: str | None = None
    latency_device: str | None = None
    train_time_s: float | None = None
    images_per_s: float | None = None

    @classmethod
    def from_dict(cls, data: dict | None) -> Metrics:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

    def value(self, objective: Objective) -> float | None:
        return getattr(self, objective.metric)


METRIC_COLUMNS = [f.name for f in fields(Metrics)]
TEXT_METRICS = ("latency_backend", "latency_device")


@dataclass
class TrialRecord:
    """One search trial. `arch` is None until sampled (and for invalid samples)."""

    number: int | None = None
    state: TrialState = TrialState.RUNNING
    arch: ArchConfig | None = None
    profile: ProfileResult | None = None
    metrics: Metrics = field(default_factory=Metrics)
    train: dict | None = None  # nas.trainer.TrainResult.to_dict()
    reason: str | None = None  # why it failed, was stopped or is infeasible
    duplicate_of: int | None = None  # the trial whose result this one reuses
    rung: int | None = None  # training steps its accuracy was measured at: the highest rung it reached
    rung_accuracy: dict[int, float] = field(default_factory=dict)  # validation accuracy at each rung reached
    # (n_val,) bool at its last rung: which validation images it got right (the confirmation reuses a dense
    # trial's run as its seed 0, and pairs need per-image results)
    val_correct: np.ndarray | None = field(default=None, repr=False)
    seeds: list[int] = field(default_factory=list)  # training seeds behind its accuracy
    slot: int | None = None  # its place among the study's n_trials
    worker: str | None = None  # host:pid that ran it
    lease_until: float | None = None  # epoch seconds: its worker renews this while it runs (nas.liveness)
    started: float | None = None  # epoch seconds when a worker claimed it
    interrupted: bool = False  # stopped from outside (Ctrl-C, lost agent): its slot runs again on resume
    constraints: dict[str, float] = field(default_factory=dict)  # Optuna's: <= 0 is feasible
    values: list[float] | None = None
    params: dict[str, Any] = field(default_factory=dict)  # what the sampler chose
    # What scored its accuracy: "train" (proxy training from scratch) or "supernet" (inherited weights,
    # nas.supernet); None in records written before one-shot search, all of which trained.
    evaluator: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The whole record as plain JSON values (export's trial.json)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(state=self.state.name, status=self.status, arch=self.arch.to_dict() if self.arch else None,
                    metrics=asdict(self.metrics), record_version=VERSION,
                    profile=self.profile.to_dict() if self.profile else None,
                    val_correct=None if self.val_correct is None else pack_bits(self.val_correct))
        return data

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.constraints.values())

    @property
    def kind(self) -> str | None:
        return None if self.arch is None else "moe" if self.arch.is_moe else "dense"

    @property
    def name(self) -> str | None:
        return None if self.arch is None else self.arch.name

    @property
    def status(self) -> str:
        """complete, infeasible, early_stopped, invalid, failed, interrupted (its slot runs again), running or
        waiting."""
        if self.state == TrialState.COMPLETE:
            return "complete" if self.feasible else "infeasible"
        if self.state == TrialState.PRUNED:
            return "invalid" if self.arch is None else "early_stopped"
        if self.state == TrialState.FAIL and self.interrupted:
            return "interrupted"
        return {TrialState.FAIL: "failed", TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}[self.state]

    def objective_values(self, objectives: list[Objective]) -> list[float]:
        return [self.metrics.value(o) for o in objectives]


@dataclass
class StudyRecord:
    """What a study stores about itself, beside its trials."""

    objectives: list[str] | None = None  # the objective names, in the order of the study's directions
    config: dict | None = None  # the StudyConfig as run (`to_dict`, storage credentials removed)
    anchor: dict | None = None  # the latency anchor (`nas.latency.Anchor.to_attrs`)


STUDY_ATTRS = {"objectives": "objectives", "config": "study_config", "anchor": "latency_anchor"}  # field -> attr


def read_study(study: optuna.Study) -> StudyRecord:
    attrs = study.user_attrs
    return StudyRecord(**{name: attrs.get(attr) for name, attr in STUDY_ATTRS.items()})


def write_study(study: optuna.Study, record: StudyRecord) -> None:
    """Store the fields of `record` that are set and differ from what the study holds."""
    stored = study.user_attrs
    for name, attr in STUDY_ATTRS.items():
        value = getattr(record, name)
        if value is not None and stored.get(attr) != value:
            study.set_user_attr(attr, value)


# ---------------------------------------------------------------- the confirmation stage (nas.confirm)


@dataclass
class ConfirmRun:
    """One retraining of one arm with one seed: a COMPLETE trial of the companion study `<study>-confirm`."""

    arch: ArchConfig
    seed: int
    steps: int
    accuracy: float  # validation top-1
    correct: np.ndarray  # (n_val,) bool: which validation images it got right, for paired tests over images
    train_time_s: float | None = None

    @property
    def key(self) -> str:
        return run_key(self.arch, self.seed, self.steps)


def run_key(arch: ArchConfig, seed: int, steps: int) -> str:
    """What identifies a confirmation run: a resumed confirm skips the keys its study holds."""
    return f"{arch.config_hash()}-s{seed}-n{steps}"


def pack_bits(correct: np.ndarray) -> str:
    """Per-image booleans as text a storage holds: packed bits, base64 (6,000 images: 1,000 characters)."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode()


def unpack_bits(bits: str, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(bits), dtype=np.uint8), count=count).astype(bool)


def confirm_run_attrs(run: ConfirmRun) -> dict[str, Any]:
    """The user attributes of a confirmation run's trial (`optuna.trial.create_trial`)."""
    bits = pack_bits(run.correct)
    return {VERSION_ATTR: VERSION, "run_key": run.key, "arch_yaml": run.arch.to_yaml(), "name": run.arch.name,
            "seed": run.seed, "steps": run.steps, "accuracy": run.accuracy, "n_images": len(run.correct),
            "correct_bits": bits, "train_time_s": run.train_time_s}


def read_confirm_run(frozen: FrozenTrial) -> ConfirmRun:
    attrs = frozen.user_attrs
    return ConfirmRun(ArchConfig.from_yaml(attrs["arch_yaml"]), attrs["seed"], attrs["steps"], attrs["accuracy"],
                      unpack_bits(attrs["correct_bits"], attrs["n_images"]), attrs.get("train_time_s"))


@dataclass
class ConfirmRecord:
    """What a companion confirm study stores about itself: its settings, the pairs (`nas.pairs.Pair.to_dict`)
    and each pair's `nas.stats.PairedResult.to_dict()`, Holm-adjusted over the pairs, in the same order."""

    settings: dict | None = None  # seeds, steps, margin, latency band
    pairs: list[dict] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)


def confirm_study_name(study_name: str) -> str:
    """The companion study that holds a study's confirmation, in the same storage."""
    return f"{study_name}-confirm"


CONFIRM_ATTRS = {"settings": "confirm_settings", "pairs": "confirm_pairs", "results": "confirm_results"}


def read_confirm(study: optuna.Study) -> ConfirmRecord:
    attrs = study.user_attrs
    return ConfirmRecord(attrs.get(CONFIRM_ATTRS["settings"]), list(attrs.get(CONFIRM_ATTRS["pairs"], [])),
                         list(attrs.get(CONFIRM_ATTRS["results"], [])))


def write_confirm(study: optuna.Study, record: ConfirmRecord) -> None:
    for name, attr in CONFIRM_ATTRS.items():
        study.set_user_attr(attr, getattr(record, name))


def enqueue_attrs(slot: int) -> dict[str, Any]:
    """The user attributes a queued trial starts with."""
    return {VERSION_ATTR: VERSION, "slot": slot}


def user_attrs(record: TrialRecord) -> dict[str, Any]:
    """The user attributes that store `record` (`nas.trial_store.write`; `optuna.trial.create_trial` in tests
    and copies of studies)."""
    attrs: dict[str, Any] = {}
    if record.arch is not None:
        # The YAML is the architecture; name and hash are kept beside it for the dashboard and for lookups.
        attrs.update(arch_yaml=record.arch.to_yaml(), name=record.arch.name, config_hash=record.arch.config_hash())
    if record.profile is not None:
        attrs["profile"] = record.profile.to_dict(derived=False)
    if record.arch is not None:
        attrs.update((name, value) for name, value in asdict(record.metrics).items() if value is not None)
    for key in ("train", "reason", "duplicate_of", "rung", "slot", "worker", LEASE_ATTR, "evaluator"):
        if getattr(record, key) is not None:
            attrs[key] = getattr(record, key)
    if record.seeds:
        attrs["seeds"] = list(record.seeds)
    if record.rung_accuracy:
        attrs["rung_accuracy"] = [[step, accuracy] for step, accuracy in sorted(record.rung_accuracy.items())]
    if record.val_correct is not None:
        # One attribute: a storage writes attributes one at a time, and workers read each other's running trials.
        attrs["val_correct"] = {"n": len(record.val_correct), "bits": pack_bits(record.val_correct)}
    if record.interrupted:
        attrs["interrupted"] = True
    attrs[VERSION_ATTR] = VERSION  # written last: a trial rewritten from an older version reads as it until then
    return attrs


def read(frozen: FrozenTrial) -> TrialRecord:
    """The record of a stored trial, of any record version."""
    attrs = frozen.user_attrs
    version = attrs.get(VERSION_ATTR, 1)
    if version > VERSION:
        raise ValueError(f"trial {frozen.number} was written by a newer vmoe-nas (record version {version})")
    arch = ArchConfig.from_yaml(attrs["arch_yaml"]) if "arch_yaml" in attrs else None
    return TrialRecord(
        number=frozen.number, state=frozen.state, arch=arch,
        profile=ProfileResult.from_dict(attrs["profile"], arch) if "profile" in attrs else None,
        metrics=Metrics.from_dict(attrs if version >= 4 else attrs.get("metrics")), train=attrs.get("train"),
        reason=attrs.get("reason"), duplicate_of=attrs.get("duplicate_of"),
        rung=attrs.get("rung", (attrs.get("train") or {}).get("steps")), seeds=list(attrs.get("seeds", [])),
        rung_accuracy=(dict(frozen.intermediate_values) if version in (4, 5)
                       else {int(s): a for s, a in attrs.get("rung_accuracy", [])}),
        slot=attrs.get("slot"), worker=attrs.get("worker"),
        interrupted=bool(attrs.get("interrupted")), constraints=dict(frozen.constraints),
        values=list(frozen.values) if frozen.values is not None else None, params=dict(frozen.params),
        lease_until=attrs.get(LEASE_ATTR), evaluator=attrs.get("evaluator"),
        val_correct=_val_correct(attrs),
        started=frozen.datetime_start.timestamp() if frozen.datetime_start else None,
    )


def _val_correct(attrs: dict[str, Any]) -> np.ndarray | None:
    if "val_correct" in attrs:
        return unpack_bits(attrs["val_correct"]["bits"], attrs["val_correct"]["n"])
    if "val_correct_bits" in attrs and "n_val" in attrs:  # version 2
        return unpack_bits(attrs["val_correct_bits"], attrs["n_val"])
    return None


def running(trial: optuna.Trial) -> TrialRecord:
    """The record of a trial a worker has just claimed: its number and its slot in the queue."""
    return TrialRecord(number=trial.number, state=TrialState.RUNNING, slot=trial.user_attrs.get("slot"))


def read_all(study: optuna.Study, states: tuple[TrialState, ...] | None = None) -> list[TrialRecord]:
    return [read(t) for t in study.get_trials(deepcopy=False, states=states)]


__all__ = ["METRIC_COLUMNS", "TEXT_METRICS", "ConfirmRecord", "ConfirmRun", "Metrics", "StudyRecord", "TrialRecord",
           "confirm_run_attrs", "confirm_study_name", "enqueue_attrs", "read", "read_all", "read_confirm",
           "read_confirm_run", "read_study", "run_key", "running", "user_attrs", "write_confirm", "write_study"]
