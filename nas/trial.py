"""One search trial as a pipeline of named steps over a study context built once.

    sample -> validate -> find reusable result -> profile -> check constraints -> train rung by rung -> record

Each step takes the `StudyContext` and plain values (an `ArchConfig`, `Metrics`, `TrialRecord`s) and is
callable in a test without Optuna; `nas.runner.TrialRunner` feeds them one Optuna trial and stores its record
after each step; which trials go on at a rung is `nas.rung_policy`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nas import trainer
from nas.config import json_digest
from nas.data import load_dataset
from nas.datasets import Dataset
from nas.latency import Anchor, fit_auto_model, load_for_study, needs_latency
from nas.recipe import TrainRecipe
from nas.record import Metrics, TrialRecord
from nas.study import Constraints, StudyConfig
from nas.superclasses import superclasses_for
from nas.supernet import score, trained_supernet
from nas.trainer import TrainResult
from profilers import Prediction, ProfileResult
from profilers.latency_model import LatencyModel
from search_spaces import ArchConfig
from search_spaces.mobile_vmoe import InvalidArchitecture

log = logging.getLogger("vmoe_nas.trial")
REUSABLE = ("complete", "infeasible", "early_stopped")  # results a trial of the same architecture reuses


@dataclass
class StudyContext:
    """What every trial of a study shares, built once per process."""

    cfg: StudyConfig
    dataset: Dataset
    recipe: TrainRecipe  # the proxy training of every trial
    superclasses: dict[int, np.ndarray]  # experts -> class-to-group map of the per-image routers
    anchor: Anchor | None = None
    latency_model: LatencyModel | None = None  # `profiler.latency_model`, checked

    def groups_for(self, arch: ArchConfig) -> np.ndarray | None:
        """The class grouping `arch`'s router learns (its super-class targets), or None where it learns none."""
        return self.superclasses.get(arch.moe.num_experts) if arch.routes_on_superclasses else None


def build_context(cfg: StudyConfig, *, anchor: Anchor | None = None, progress: bool = False) -> StudyContext:
    """Load the data set and find the class groupings the space's routers need (discovered once per study
    and cached under results/<study>/superclasses/, where every worker finds them)."""
    spec = cfg.data
    dataset = load_dataset(spec.name, data_dir=spec.data_dir, val_fraction=spec.val_fraction, seed=spec.seed,
                           limit=spec.limit, **spec.folder_options())
    recipe = cfg.recipe()
    if recipe.num_threads is None and cfg.workers > 1:  # share the cores instead of oversubscribing them
        recipe = dataclasses.replace(recipe, num_threads=max(1, (os.cpu_count() or 1) // cfg.workers))
    groups = [g for g in cfg.space.router_groups() if g <= dataset.num_classes]  # more: rejected as invalid
    superclasses = {g: class_groups(dataset, g, cfg.study_dir / "superclasses", progress=progress,
                                    device=recipe.device, num_threads=recipe.num_threads) for g in groups}
    fit_auto_model(cfg, progress=progress)  # latency_model: auto; the search's launcher fits it before any trial
    return StudyContext(cfg, dataset, recipe, superclasses, anchor, load_for_study(cfg))


def class_groups(dataset, groups: int, cache_dir: Path, *, progress: bool = False, device: str | None = None,
                 num_threads: int | None = None) -> np.ndarray:
    """class -> super-class for `groups` experts: the data set's own, or discovered from confusion (on `device`,
    with the evaluator's `num_threads`)."""
    mapping = superclasses_for(dataset, groups, cache_dir=cache_dir, progress=progress, device=device,
                               num_threads=num_threads)
    log.info("super-classes for %d experts (%s): %s", groups, mapping.source, mapping.class_to_group.tolist())
    return np.asarray(mapping.class_to_group)


def measure_anchor(cfg: StudyConfig, dataset) -> Anchor | None:
    """Measure the space's smallest dense ViT alone, for 3x the usual time; None where the study needs no
    anchor (latency not used, `profiler.anchor: false`, a remote agent measuring one model at a time on a
    device kept for it) or the backend cannot measure here (Core ML off macOS)."""
    from profilers import MIN_TIME_S, device_label, profile  # not at import: profile loads ONNX and fvcore

    if not (cfg.profiler.anchor and cfg.profiler.backend != "remote" and needs_latency(cfg)):
        return None
    arch = cfg.space.smallest_dense(image_size=dataset.image_size, in_channels=dataset.in_channels,
                                    num_classes=dataset.num_classes)
    result = profile(arch, **cfg.profiler.options(), min_time_s=3 * MIN_TIME_S)
    if result.latency is None:
        return None
    from nas.pairs import timing_spread

    latency = result.latency.to_dict()
    spread, limit = timing_spread(latency), cfg.confirm.max_latency_band
    if spread is not None and spread > limit:
        log.warning("latency anchor %s: its timings spread %.0f%%, beyond the limit of %.0f%% "
                    "(confirm.max_latency_band): a loaded machine; latency verdicts will be unreliable",
                    arch.name, 100 * spread, 100 * limit)
    statistic = cfg.profiler.statistic
    return Anchor(arch, result.latency.value(statistic), latency, device_label(result.device), statistic)


# ---------------------------------------------------------------- the steps


def sample(ctx: StudyContext, trial) -> ArchConfig:
    """An architecture from the space; `trial` is anything with Optuna's `suggest_categorical` (an
    `optuna.Trial`, or an `optuna.trial.FixedTrial` in a test). Raises InvalidArchitecture."""
    data = ctx.dataset
    return ctx.cfg.space.sample(trial, image_size=data.image_size, in_channels=data.in_channels,
                                num_classes=data.num_classes)


def validate(ctx: StudyContext, arch: ArchConfig) -> None:
    """What the space cannot know: the data set must have enough classes for a super-class router."""
    moe = arch.moe
    if moe and arch.routes_on_superclasses and moe.num_experts > ctx.dataset.num_classes:
        raise InvalidArchitecture(
            f"moe.num_experts={moe.num_experts} super-classes cannot be formed from {ctx.dataset.num_classes} classes"
        )


def find_reusable(arch: ArchConfig, number: int, records: list[TrialRecord]) -> TrialRecord | None:
    """The earliest finished trial of the same architecture whose result a new trial can reuse."""
    key = arch.config_hash()
    same = [r for r in records if r.number != number and r.arch is not None and r.status in REUSABLE
            and r.arch.config_hash() == key]
    return min(same, key=lambda r: r.number, default=None)


def running_earlier(arch: ArchConfig, number: int, records: list[TrialRecord]) -> bool:
    """An earlier trial is still running the same architecture: wait for it rather than train it twice
    (only for earlier ones, so two workers never wait on each other)."""
    key = arch.config_hash()
    return any(r.status == "running" and r.number < number and r.arch is not None and r.arch.config_hash() == key
               for r in records)


def reuse(record: TrialRecord, original: TrialRecord) -> TrialRecord:
    """`record` carrying `original`'s result (a trial of the same architecture)."""
    return dataclasses.replace(
        record, profile=original.profile, metrics=dataclasses.replace(original.metrics), train=original.train,
        reason=original.reason, rung=original.rung, seeds=list(original.seeds),
        val_correct=original.val_correct,
        constraints=dict(original.constraints), duplicate_of=original.number,
    )


def profile_arch(ctx: StudyContext, arch: ArchConfig) -> tuple[ProfileResult, Metrics]:
    """The full profile (latency only when an objective or a constraint needs it) and the flat metrics;
    latency on the anchor's scale where the study has one."""
    from profilers import device_label, profile  # not at import: profile loads ONNX and fvcore

    wanted = needs_latency(ctx.cfg)
    predict = wanted and ctx.cfg.profiler.latency != "measured"
    anchor = ctx.anchor if wanted else None
    result = profile(arch, measure=wanted and not predict, anchor=anchor.arch if anchor else None,
                     **ctx.cfg.profiler.options())
    size = result.size_bytes()["size_bytes_fp32"]
    costs = Metrics(flops=result.flops, params_total=result.params_total, params_active=result.params_active,
                    size_bytes_fp32=size, size_mb=size / 1e6)
    if predict:
        return predicted_metrics(ctx, arch, result, costs)
    latency = result.latency
    timed, cv = (latency.value(ctx.cfg.profiler.statistic), latency.cv) if latency else (None, None)
    ratio = result.anchor.ratio if result.anchor else None
    metrics = dataclasses.replace(
        costs,
        # On the anchor's scale where there is one: its latency at the study's start times this trial's ratio.
        latency_ms=ratio * anchor.latency_ms if ratio else timed,
        latency_ms_measured=timed, latency_ratio=ratio, latency_cv=cv,
        latency_backend=result.backend, latency_device=device_label(result.device) if latency else None,
    )
    if ctx.latency_model is not None and wanted:  # a model given beside measured latency: both, side by side
        from nas.latency import predicted_latency

        scale = anchor.latency_ms if anchor else None
        metrics.latency_ms_predicted = predicted_latency(ctx.latency_model, arch, scale)[0]
    return result, metrics


def predicted_metrics(ctx: StudyContext, arch: ArchConfig, result: ProfileResult,
                      costs: Metrics) -> tuple[ProfileResult, Metrics]:
    """An unmeasured profile and its `costs` with latency from the study's latency model (on its anchor's scale)."""
    from nas.latency import predicted_latency

    model = ctx.latency_model
    predicted, _ = predicted_latency(model, arch, ctx.anchor.latency_ms if ctx.anchor else None)
    result = dataclasses.replace(result, prediction=Prediction(predicted, model.path, model.bound_pct))
    return result, dataclasses.replace(costs, latency_ms=predicted, latency_ms_predicted=predicted,
                                       latency_backend=result.backend, latency_device=model.key["device"])


def check_constraints(constraints: Constraints, metrics: Metrics) -> tuple[dict[str, float], list[str]]:
    """Every configured constraint as Optuna takes it (<= 0 is feasible), and the broken ones, described."""
    values, broken = {}, []
    for name, (metric, limit) in constraints.active().items():
        measured = getattr(metrics, metric)
        values[name] = (measured - limit) / limit
        if values[name] > 0:
            broken.append(f"{metric}={measured:.4g} > {name}={limit:g}")
    return values, broken


def train_to_rungs(ctx: StudyContext, arch: ArchConfig, decide: Callable[[int, TrainResult], str | None]):
    """Proxy-train `arch` rung by rung, each continuing the last from its checkpoint (so a trial stopped
    or interrupted at a rung costs only the steps it ran, and a retry resumes). `decide(rung, result)`
    after each rung returns the reason to stop, or None. Returns the last TrainResult and the reason it
    stopped (None if it ran to the end)."""
    groups = ctx.groups_for(arch)
    rungs = ctx.cfg.rungs.steps if ctx.cfg.rungs else (None,)
    # Keyed by architecture and recipe: a retry of the trial, or a resumed study, finds its run here.
    recipe_key = json_digest(ctx.recipe.to_dict(), 8)
    checkpoints = ctx.cfg.study_dir / "checkpoints" / f"{arch.config_hash()}-{recipe_key}" if rungs[0] else None
    for rung in rungs:
        final = rung == rungs[-1]
        run = functools.partial(trainer.train, arch, ctx.dataset, ctx.recipe, superclasses=groups,
                                checkpoint_dir=checkpoints, stop_at_step=None if final else rung)
        try:
            result = run()
        except trainer.CheckpointError as error:  # torn or foreign: kept, it would fail every later trial too
            log.warning("%s: %s; discarded, the run starts over", arch.name, error)
            shutil.rmtree(checkpoints, ignore_errors=True)
            result = run()
        reason = decide(rung if rung is not None else result.steps, result)
        if reason or final:
            if checkpoints is not None:
                shutil.rmtree(checkpoints, ignore_errors=True)  # the trial is over: nothing to resume
            return result, reason
    raise AssertionError("unreachable: the last rung returns")


def inherit(ctx: StudyContext, arch: ArchConfig) -> tuple[dict, Metrics]:
    """Score `arch` with the weights it inherits from the study's supernet (`kind: supernet`; trained on first
    use, then loaded): (the score's record, the metrics' accuracy fields)."""
    tick = time.perf_counter()
    scored = score(ctx, trained_supernet(ctx), arch)
    scored["wall_time_s"] = round(time.perf_counter() - tick, 3)
    return scored, Metrics(accuracy=scored["accuracy"], router_accuracy=scored["router_accuracy"],
                           train_time_s=scored["wall_time_s"])


def trained_metrics(metrics: Metrics, result) -> Metrics:
    first = result.evals[0][1] if result.evals else result.val_accuracy
    return dataclasses.replace(metrics, accuracy=result.val_accuracy, first_eval_accuracy=first,
                               router_accuracy=result.router_accuracy, train_time_s=result.wall_time_s,
                               images_per_s=result.images_per_s)


__all__ = ["StudyContext", "build_context", "check_constraints", "find_reusable", "inherit", "measure_anchor",
           "predicted_metrics", "profile_arch", "reuse",
           "running_earlier", "sample", "train_to_rungs", "trained_metrics", "validate"]
