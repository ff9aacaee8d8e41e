"""One claimed trial, run to its end state: the steps of `nas.trial` fed one Optuna trial.

    sample + validate -> reuse an earlier run -> profile + constraints -> train rung by rung (or inherit)

A `TrialRunner` owns the trial's `TrialRecord` and stores it once per step (`nas.trial_store.write`); at each
rung it stores the record and asks the rung policy (`nas.rung_policy.MOASHA`) under the study lock.
`run_trial` holds the trial's lease, runs it within its time and memory budget, and records how it ended: a
failing trial is recorded failed with its reason and the study goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from nas import liveness, trial_store
from nas import record as records
from nas.budget import run_with_budget
from nas.config import first_line
from nas.evaluation import per_image_correct
from nas.latency import Anchor
from nas.processes import interrupted, interruption_name
from nas.record import TrialRecord
from nas.rung_policy import MOASHA, Stop
from nas.storage import STORAGE_ERRORS, StorageURL, is_disk_full, make_storage, study_lock
from nas.study import StudyConfig
from nas.study_log import study_logging
from nas.trial import (
    StudyContext,
    build_context,
    check_constraints,
    find_reusable,
    inherit,
    profile_arch,
    reuse,
    running_earlier,
    sample,
    train_to_rungs,
    trained_metrics,
    validate,
)
from profilers.remote import ProfilerUnreachable
from search_spaces.mobile_vmoe import InvalidArchitecture

log = logging.getLogger("vmoe_nas.search")
DUPLICATE_POLL_S = 2.0  # how often a trial waiting on an earlier run of its architecture looks again
T = TypeVar("T")


class TrialRunner:
    """The steps of one Optuna trial over the study context, and the record they fill in."""

    def __init__(self, ctx: StudyContext, trial: optuna.Trial, record: TrialRecord | None = None):
        self.ctx, self.trial = ctx, trial
        self.record = records.running(trial) if record is None else record
        self.policy = MOASHA(ctx.cfg.rungs, ctx.cfg.study_objectives) if ctx.cfg.rungs else None

    def store(self) -> None:
        trial_store.write(self.trial, self.record)

    def step(self, run: Callable[[], T]) -> T:
        """Run one step, then store the record once (also when the step ends the trial with TrialPruned)."""
        try:
            result = run()
        except optuna.TrialPruned:
            self.store()
            raise
        self.store()
        return result

    def run_steps(self) -> list[float]:
        """Every step, the record stored after each; returns the objective values. Raises TrialPruned for an
        invalid architecture or a trial stopped at a rung."""
        cfg = self.ctx.cfg
        self.record.evaluator = cfg.evaluator_kind
        self.step(self.sample)
        original = wait_for_reusable(self.trial.study, self.record, cfg)
        if original is not None:
            return self.step(lambda: self.reuse(original))
        if self.step(self.profile) and "accuracy" in cfg.objectives:
            self.step(self.inherit if self.record.evaluator == "supernet" else self.train)
        return self.record.objective_values(cfg.study_objectives)

    def sample(self) -> None:
        try:
            self.record.arch = sample(self.ctx, self.trial)
            validate(self.ctx, self.record.arch)
        except InvalidArchitecture as error:
            self.record.arch, self.record.reason = None, str(error)
            raise optuna.TrialPruned(f"invalid architecture: {error}") from None

    def reuse(self, original: TrialRecord) -> list[float]:
        log.info("trial %d: %s already evaluated in trial %d, reusing", self.record.number, self.record.name,
                 original.number)
        self.record = reuse(self.record, original)
        if original.state == TrialState.PRUNED:
            raise optuna.TrialPruned(f"same architecture as trial {original.number}: {original.reason}")
        return original.objective_values(self.ctx.cfg.study_objectives)

    def profile(self) -> bool:
        """Profile and check the constraints; whether the trial is feasible (an infeasible one is not trained)."""
        record = self.record
        record.profile, record.metrics = profile_arch(self.ctx, record.arch)
        record.constraints, broken = check_constraints(self.ctx.cfg.constraints, record.metrics)
        if broken:
            record.reason = "infeasible: " + "; ".join(broken)
            record.metrics.accuracy = 0.0  # untrained: the worst accuracy, and the sampler sees it as infeasible
        return not broken

    def inherit(self) -> None:
        record = self.record
        record.train, scored = inherit(self.ctx, record.arch)
        record.metrics = dataclasses.replace(record.metrics, accuracy=scored.accuracy,
                                             router_accuracy=scored.router_accuracy, train_time_s=scored.train_time_s)

    def train(self) -> None:
        _, stopped = train_to_rungs(self.ctx, self.record.arch, self.arrive)
        if stopped:
            self.record.reason = stopped
            raise optuna.TrialPruned(stopped)

    def arrive(self, rung: int, result) -> str | None:
        """Record the trial's result at a rung and decide whether it goes on (None) or stops (the reason).
        Arriving and deciding are one step under the study lock: each decision ranks exactly the trials that
        arrived before it, however many workers there are."""
        ctx, record = self.ctx, self.record
        record.train, record.rung, record.seeds = result.to_dict(), rung, [ctx.recipe.seed]
        record.rung_accuracy[rung] = result.val_accuracy
        record.metrics = trained_metrics(record.metrics, result)
        if self.policy is None:
            self.store()
            return None
        if rung == ctx.cfg.rungs.steps[-1]:  # per image, outside the lock: a confirmation reuses a top-rung run
            record.val_correct = per_image_correct(result.model, ctx.dataset)
        with study_lock(trial_store.storage_url(ctx.cfg), ctx.cfg.study_name):
            self.store()
            reached = records.read_all(self.trial.study, (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED))
            decision = self.policy.decide(record, reached)
        return decision.reason if isinstance(decision, Stop) else None


def wait_for_reusable(study: optuna.Study, record: TrialRecord, cfg: StudyConfig) -> TrialRecord | None:
    """A finished trial of the same architecture, waiting while an earlier trial is still running it (and
    its worker is alive: a dead worker's trial is reclaimed, and its retry is a later trial)."""
    while True:
        trial_store.reclaim(study, cfg)
        stored = records.read_all(study, (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        original = find_reusable(record.arch, record.number, stored)
        if original is not None or not running_earlier(record.arch, record.number, stored):
            return original
        time.sleep(DUPLICATE_POLL_S)


def run_trial(study: optuna.Study, trial: optuna.Trial, ctx: StudyContext, url: StorageURL) -> TrialState:
    """Run one claimed trial to its end state, holding a lease on it. A failing trial is recorded as failed
    with its reason. With a time or memory budget the trial runs in a child process killed past it."""
    runner = TrialRunner(ctx, trial)
    runner.record.worker = liveness.worker_id()
    runner.store()

    def fail(reason: str, *, interrupted: bool = False) -> None:
        runner.record.reason, runner.record.interrupted = reason, interrupted
        runner.store()
        study.tell(trial, state=TrialState.FAIL)

    def stop_interrupted() -> None:  # a library or a storage call turned the signal's KeyboardInterrupt into an error
        fail(f"interrupted ({interrupted()}); its slot is run again when the study resumes", interrupted=True)
        raise KeyboardInterrupt(interrupted()) from None

    cfg = ctx.cfg
    try:
        try:
            with trial_store.lease(trial, cfg.heartbeat_interval):  # stopped before the trial is told its end
                if cfg.trial_timeout or cfg.trial_memory_mb:
                    values = run_with_budget(run_steps_stored, (cfg.to_dict(), url.url, trial_store.trial_id(trial)),
                                             seconds=cfg.trial_timeout, memory_mb=cfg.trial_memory_mb)
                    runner.record = records.read(trial_store.stored_trial(trial))
                else:
                    values = runner.run_steps()
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned: %s", trial.number, pruned)
            return TrialState.PRUNED
        except KeyboardInterrupt as interruption:  # Ctrl-C, SIGTERM or SIGHUP (nas.processes)
            fail(f"interrupted ({interruption_name(interruption)}); its slot is run again when the study resumes",
                 interrupted=True)
            raise
        except STORAGE_ERRORS:
            if interrupted():
                stop_interrupted()
            raise  # the storage itself failed: nothing can be recorded; run_worker reports it
        except ProfilerUnreachable as error:  # the device is gone, not the architecture: stop, retry on resume
            fail(f"{error}; its slot is run again when the study resumes", interrupted=True)
            raise
        except UpdateFinishedTrialError:
            raise
        except Exception as error:
            if interrupted():
                stop_interrupted()
            if is_disk_full(error):  # the machine's disk, not the architecture: no retry used, the worker stops
                fail(f"no space left ({first_line(error)}); its slot is run again when the study resumes",
                     interrupted=True)
                raise
            reason = f"{type(error).__name__}: {error}"
            fail(reason)
            log.warning("trial %d failed: %s", trial.number, reason, exc_info=True)
            return TrialState.FAIL
        study.tell(trial, values)
    except UpdateFinishedTrialError:  # its lease lapsed and another worker reclaimed it: its retry runs instead
        log.warning("trial %d was reclaimed by another worker while it ran; dropping its result", trial.number)
        return TrialState.FAIL
    log.info("trial %d %s: %s -> %s", trial.number, "complete" if runner.record.feasible else "infeasible",
             runner.record.name, dict(zip(cfg.objectives, values)))
    return TrialState.COMPLETE


def run_steps_stored(cfg_dict: dict, url: str, trial_id: int) -> list[float]:
    """`TrialRunner.run_steps` of a running trial named by storage and id: what a budgeted trial's child
    process runs."""
    cfg = StudyConfig.from_dict(cfg_dict)
    with study_logging(cfg.study_dir / "search.log"):
        study = optuna.load_study(study_name=cfg.study_name, storage=make_storage(url))
        trial = trial_store.attach(study, trial_id)
        ctx = build_context(cfg, anchor=stored_anchor(study))
        return TrialRunner(ctx, trial).run_steps()


def stored_anchor(study: optuna.Study) -> Anchor | None:
    """The study's latency anchor, measured when it started (None where it has none)."""
    attrs = records.read_study(study).anchor
    return Anchor.from_attrs(attrs) if attrs else None


__all__ = ["TrialRunner", "run_steps_stored", "run_trial", "stored_anchor", "wait_for_reusable"]
