"""Search studies: a multi-objective Optuna study whose trials are Mobile V-MoE and dense ViTs.

`run_search(cfg)` opens (or resumes) the study, queues its trials, measures the latency anchor and builds the
`StudyContext` once; workers then claim queued trials and run each through the steps of `nas.trial`
(sample -> validate -> reuse -> profile -> constraints -> train), storing a `nas.record.TrialRecord`.

Studies of `n_trials` are exact, also with several workers: each trial holds a slot, queued lazily (a few
ahead of the workers), and workers claim queued trials atomically; an interrupted trial frees its slot.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import TrialState
from tqdm.auto import tqdm

from nas import liveness
from nas import record as records
from nas import trial as steps
from nas.budget import run_with_budget
from nas.config import ConfigError, first_line
from nas.latency import verify_front
from nas.processes import (
    die_with_parent,
    interrupted,
    interruption_name,
    raise_if_interrupted,
    treat_signals_as_interruptions,
)
from nas.record import TrialRecord
from nas.storage import (
    STORAGE_ERRORS,
    NoSpaceLeft,
    StorageError,
    StorageURL,
    default_storage,
    is_disk_full,
    make_storage,
    parse_storage,
    study_lock,
)
from nas.study import StudyConfig, config_changes
from profilers.remote import AgentClient, ProfilerUnreachable
from search_spaces.mobile_vmoe import InvalidArchitecture

log = logging.getLogger("vmoe_nas.search")
LIVE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
STORAGE_EXIT_CODE = 3  # a worker process that lost its storage
PROFILER_EXIT_CODE = 4  # a worker process that lost its remote profiler agent
DUPLICATE_POLL_S = 2.0  # how often a trial waiting on an earlier run of its architecture looks again


def storage_url(cfg: StudyConfig) -> StorageURL:
    """The study's storage: `cfg.storage`, or the default file under results/<study>/."""
    return parse_storage(cfg.storage) if cfg.storage else default_storage(cfg.study_dir, cfg.workers)


# ---------------------------------------------------------------- sampler, study, queue


def make_sampler(cfg: StudyConfig, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler, reseeded per worker so workers do not sample the same architectures."""
    seed = cfg.seed + 1000 * worker_index
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, (cfg.n_trials or 40) // 3)))
    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(cfg: StudyConfig, url: StorageURL, *, worker_index: int = 0,
               allow_changes: bool = False) -> optuna.Study:
    """Create the study, or load it to resume. Resuming with a config that changes what trials mean (data,
    space, objectives, constraints, evaluator, early stopping, profiler) is refused, naming the fields, unless
    `allow_changes`; then the study keeps the new config. Run settings (n_trials, workers, timeouts, ...) may
    change freely."""
    storage = make_storage(url)
    try:
        study = optuna.create_study(
            study_name=cfg.study_name,
            storage=storage,
            directions=cfg.directions,
            sampler=make_sampler(cfg, worker_index),
            load_if_exists=True,
        )
    except Exception as error:  # e.g. the database went away between connect and create
        if isinstance(error, ValueError) and "direction" in str(error):
            raise StorageError(f"study {cfg.study_name!r} exists with other objectives: {error}") from None
        raise StorageError(f"cannot open study {cfg.study_name!r}: {first_line(error)}") from None
    stored = records.read_study(study)
    # The config as run, minus the storage URL's credentials: a study never holds its own password.
    config = {**cfg.to_dict(), "storage": url.redacted if cfg.storage else None}
    if stored.objectives is None:
        records.write_study(study, records.StudyRecord(objectives=cfg.objectives, config=config))
    elif stored.objectives != cfg.objectives:
        raise StorageError(f"study {cfg.study_name!r} was created with objectives {stored.objectives}, "
                           f"not {cfg.objectives}")
    elif stored.config is not None:
        changed = config_changes(stored.config, cfg)
        if changed and not allow_changes:
            raise ConfigError("config", f"study {cfg.study_name!r} was run with other settings of "
                              f"{', '.join(changed)}: its finished trials would not compare with new ones. Start a "
                              "new study (--study-name), or pass --allow-changes to resume with the new settings")
        if changed:
            log.warning("study %s resumes with changed %s", cfg.study_name, ", ".join(changed))
            records.write_study(study, records.StudyRecord(config=config))
    if study.metric_names is None:  # optuna-dashboard names objectives by these, not "Objective 0, 1, ..."
        study.set_metric_names([objective.metric for objective in cfg.study_objectives])
    return study


def fill_slots(study: optuna.Study, cfg: StudyConfig) -> int:
    """Queue trials for free slots of `n_trials` (enqueued architectures first); returns how many. Lazily: at
    most `cfg.workers` trials wait at a time (workers top the queue up as they claim), so a study of 10**8
    trials stores a handful, not 10**8. A slot is free when it has no trial yet, or only interrupted ones."""
    if cfg.n_trials is None:
        return 0
    stored = records.read_all(study)
    taken = {r.slot for r in stored if r.state in LIVE_STATES or (r.state == TrialState.FAIL and not r.interrupted)}
    waiting = sum(r.state == TrialState.WAITING and _in_study(r.slot, cfg) for r in stored)
    free = (slot for slot in range(cfg.n_trials) if slot not in taken)
    enqueued = cfg.enqueued_params()
    queued = 0
    for slot in itertools.islice(free, max(0, cfg.workers - waiting)):
        params = enqueued[slot] if slot < len(enqueued) else {}
        study.enqueue_trial(params, user_attrs=records.enqueue_attrs(slot), skip_if_exists=False)
        queued += 1
    return queued


def _in_study(slot: int | None, cfg: StudyConfig) -> bool:
    """Whether a trial queued for `slot` runs: not one queued by an earlier run with a larger n_trials."""
    return cfg.n_trials is None or slot is None or slot < cfg.n_trials


def claim_trial(study: optuna.Study, cfg: StudyConfig) -> optuna.Trial | None:
    """Atomically take a queued trial of this run's slots (the storage lets one worker move it to RUNNING);
    None when none."""
    storage = study._storage
    study_id = storage.get_study_id_from_name(study.study_name)
    for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if not _in_study(waiting.user_attrs.get("slot"), cfg):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, waiting.number)
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, trial_id)
        except UpdateFinishedTrialError:
            continue
    return None


# ---------------------------------------------------------------- one trial


def evaluate(ctx: steps.StudyContext, trial: optuna.Trial, record: TrialRecord) -> list[float]:
    """The steps of `nas.trial` for one Optuna trial, storing the record as it grows; returns the
    objective values. Raises TrialPruned for an invalid architecture or a trial stopped early."""
    objectives = ctx.cfg.study_objectives
    record.evaluator = ctx.cfg.evaluator_kind
    try:
        record.arch = steps.sample(ctx, trial)
        steps.validate(ctx, record.arch)
    except InvalidArchitecture as error:
        record.arch, record.reason = None, str(error)
        records.write(trial, record)
        raise optuna.TrialPruned(f"invalid architecture: {error}") from None
    records.write(trial, record)

    original = wait_for_reusable(trial.study, record, ctx.cfg)
    if original is not None:
        log.info("trial %d: %s already evaluated in trial %d, reusing", record.number, record.name, original.number)
        records.write(trial, steps.reuse(record, original))
        if original.state == TrialState.PRUNED:
            raise optuna.TrialPruned(f"same architecture as trial {original.number}: {original.reason}")
        return original.objective_values(objectives)

    record.profile, record.metrics = steps.profile_arch(ctx, record.arch)
    record.constraints, broken = steps.check_constraints(ctx.cfg.constraints, record.metrics)
    if broken:
        record.reason = "infeasible: " + "; ".join(broken)
        record.metrics.accuracy = 0.0  # untrained: the worst accuracy, and the sampler sees it as infeasible
        records.write(trial, record)
        return record.objective_values(objectives)
    records.write(trial, record)

    if "accuracy" in ctx.cfg.objectives and record.evaluator == "supernet":
        record.train, scored = steps.inherit(ctx, record.arch)
        record.metrics = dataclasses.replace(record.metrics, accuracy=scored.accuracy,
                                             router_accuracy=scored.router_accuracy, train_time_s=scored.train_time_s)
    elif "accuracy" in ctx.cfg.objectives:
        _, stopped = steps.train_to_rungs(ctx, record.arch,
                                          lambda rung, result: arrive(ctx, trial, record, rung, result))
        if stopped:
            record.reason = stopped
            records.write(trial, record)
            raise optuna.TrialPruned(stopped)
    records.write(trial, record)
    return record.objective_values(objectives)


def arrive(ctx: steps.StudyContext, trial: optuna.Trial, record: TrialRecord, rung: int, result) -> str | None:
    """Record a trial's result at a rung and decide whether it goes on (None) or stops (the reason). Arriving
    and deciding are one step under the study lock: each decision ranks exactly the trials that arrived
    before it, however many workers there are."""
    record.train, record.rung, record.seeds = result.to_dict(), rung, [ctx.recipe.seed]
    record.rung_accuracy[rung] = result.val_accuracy
    record.metrics = steps.trained_metrics(record.metrics, result)
    if ctx.cfg.rungs is None:
        records.write(trial, record)
        return None
    if rung == ctx.cfg.rungs.steps[-1]:  # per image, outside the lock: a confirmation reuses a top-rung run
        record.val_correct = steps.per_image_correct(result.model, ctx.dataset)
    with study_lock(storage_url(ctx.cfg), ctx.cfg.study_name):
        records.write(trial, record)
        reached = records.read_all(trial.study, (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED))
        return steps.promotion(record, reached, rung, ctx.cfg.rungs, ctx.cfg.study_objectives)


def wait_for_reusable(study: optuna.Study, record: TrialRecord, cfg: StudyConfig) -> TrialRecord | None:
    """A finished trial of the same architecture, waiting while an earlier trial is still running it (and
    its worker is alive: a dead worker's trial is reclaimed, and its retry is a later trial)."""
    while True:
        reclaim(study, cfg)
        stored = records.read_all(study, (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        original = steps.find_reusable(record.arch, record.number, stored)
        if original is not None or not steps.running_earlier(record.arch, record.number, stored):
            return original
        time.sleep(DUPLICATE_POLL_S)


def run_trial(study: optuna.Study, trial: optuna.Trial, ctx: steps.StudyContext, url: StorageURL) -> TrialState:
    """Run one claimed trial to its end state, holding a lease on it. A failing trial is recorded as failed
    with its reason. With a time or memory budget the trial runs in a child process killed past it."""
    record = records.running(trial)
    record.worker = liveness.worker_id()
    records.write(trial, record)

    def fail(reason: str, *, interrupted: bool = False) -> None:
        record.reason, record.interrupted = reason, interrupted
        records.write(trial, record)
        study.tell(trial, state=TrialState.FAIL)

    cfg = ctx.cfg
    try:
        try:
            with liveness.lease(trial, cfg.heartbeat_interval):  # stopped before the trial is told its end
                if cfg.trial_timeout or cfg.trial_memory_mb:
                    values = run_with_budget(evaluate_stored, (cfg.to_dict(), url.url, trial._trial_id),
                                             seconds=cfg.trial_timeout, memory_mb=cfg.trial_memory_mb)
                    record = records.read(study._storage.get_trial(trial._trial_id))
                else:
                    values = evaluate(ctx, trial, record)
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned: %s", trial.number, pruned)
            return TrialState.PRUNED
        except KeyboardInterrupt as interruption:  # Ctrl-C, SIGTERM or SIGHUP (nas.processes)
            fail(f"interrupted ({interruption_name(interruption)}); its slot is run again when the study resumes",
                 interrupted=True)
            raise
        except STORAGE_ERRORS:
            raise  # the storage itself failed: nothing can be recorded; run_worker reports it
        except ProfilerUnreachable as error:  # the device is gone, not the architecture: stop, retry on resume
            fail(f"{error}; its slot is run again when the study resumes", interrupted=True)
            raise
        except UpdateFinishedTrialError:
            raise
        except Exception as error:
            if interrupted():  # a library turned the signal's KeyboardInterrupt into its own error
                fail(f"interrupted ({interrupted()}); its slot is run again when the study resumes", interrupted=True)
                raise KeyboardInterrupt(interrupted()) from None
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
    log.info("trial %d %s: %s -> %s", trial.number, "complete" if record.feasible else "infeasible", record.name,
             dict(zip(cfg.objectives, values)))
    return TrialState.COMPLETE


def evaluate_stored(cfg_dict: dict, url: str, trial_id: int) -> list[float]:
    """`evaluate` of a running trial named by storage and id: what a budgeted trial's child process runs."""
    cfg = StudyConfig.from_dict(cfg_dict)
    with study_logging(cfg.study_dir / "search.log"):
        study = optuna.load_study(study_name=cfg.study_name, storage=make_storage(url))
        study.get_trials(deepcopy=False)  # an RDB storage's cache learns the trial ids, which a Trial needs
        trial = optuna.Trial(study, trial_id)
        ctx = steps.build_context(cfg, anchor=stored_anchor(study))
        return evaluate(ctx, trial, records.running(trial))


# ---------------------------------------------------------------- workers


def run_worker(cfg: StudyConfig, worker_index: int = 0, *, study: optuna.Study | None = None,
               ctx: steps.StudyContext | None = None, on_trial=None) -> int:
    """Claim and run queued trials until none is left or the timeout passes; returns trials run. Joins the
    study (opened and queued by `run_search`); `study` and `ctx` are reused when the caller has them."""
    url = storage_url(cfg)
    try:
        study = study or open_study(cfg, url, worker_index=worker_index)
        ctx = ctx or steps.build_context(cfg, anchor=stored_anchor(study))
        return _work(cfg, study, ctx, url, on_trial)
    except (*STORAGE_ERRORS, OSError) as error:
        if is_disk_full(error):
            raise NoSpaceLeft(url.path.parent if url.path else url.redacted,
                              "the study storage cannot be written; finished trials are kept: free some space and "
                              "run the same command again to resume") from None
        if not isinstance(error, STORAGE_ERRORS):
            raise
        reason = first_line(error)
        raise StorageError(
            f"storage {url.redacted} became unreachable ({reason}); finished trials are kept there: "
            "run the same command again to resume"
        ) from None


def reclaim(study: optuna.Study, cfg: StudyConfig) -> list[int]:
    """Reclaim the trials of dead workers (see nas.liveness). Under the study lock, as filling slots is: a
    reclaimed trial's slot is free between failing it and queueing its retry, and a launcher filling slots
    in that moment would queue a second trial for it."""
    grace_s = 3 * cfg.heartbeat_interval
    now = time.time()
    if not any(liveness.is_dead(r, now=now, grace_s=grace_s) for r in records.read_all(study, (TrialState.RUNNING,))):
        return []  # the common case, without taking the lock
    with study_lock(storage_url(cfg), cfg.study_name):
        return liveness.reclaim_dead_trials(study, max_retries=cfg.max_retries, grace_s=grace_s)


def requeue_free_slots(study: optuna.Study, cfg: StudyConfig) -> bool:
    """Before the last worker leaves: queue the slots left free (a worker killed between failing a dead
    worker's trial and queueing its retry; a trial interrupted in another worker). Whether any trial waits."""
    with study_lock(storage_url(cfg), cfg.study_name):
        fill_slots(study, cfg)
        return any(_in_study(t.user_attrs.get("slot"), cfg)
                   for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _work(cfg: StudyConfig, study: optuna.Study, ctx: steps.StudyContext, url: StorageURL, on_trial) -> int:
    deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
    count = 0
    while deadline is None or time.monotonic() < deadline:
        raise_if_interrupted()  # a signal whose KeyboardInterrupt was swallowed: stop before the next trial
        reclaim(study, cfg)  # a dead worker's trial fails here, and its retry is queued
        trial = claim_trial(study, cfg)
        if trial is not None and cfg.n_trials is not None:
            requeue_free_slots(study, cfg)  # the queue is lazy: top it up for the workers coming next
        if trial is None:
            if cfg.n_trials is None:
                trial = study.ask()  # a timeout-only study makes trials as it goes
            elif study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                time.sleep(min(1.0, cfg.heartbeat_interval))  # its worker may die: stay to run the retry
                continue
            elif requeue_free_slots(study, cfg):
                continue
            else:
                break
        run_trial(study, trial, ctx, url)
        count += 1
        if on_trial:
            on_trial(study)
    raise_if_interrupted()
    return count


@contextmanager
def worker_env(index: int, devices: list[str]):
    """The environment worker `index` starts in: pinned to one of `devices` (round robin) through
    CUDA_VISIBLE_DEVICES, so that its `cuda` is that GPU; unchanged without devices."""
    if not devices:
        yield
        return
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[index % len(devices)].partition(":")[2] or "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


def _worker_process(cfg_dict: dict, worker_index: int, log_path: str, launcher_pid: int) -> None:
    die_with_parent(launcher_pid)  # a launcher killed with -9 takes its workers along
    treat_signals_as_interruptions(once=True)
    cfg = StudyConfig.from_dict(cfg_dict)
    with study_logging(Path(log_path)):
        try:
            run_worker(cfg, worker_index)
        except KeyboardInterrupt:
            pass
        except StorageError as error:
            log.error("worker %d: %s", worker_index, error)
            raise SystemExit(STORAGE_EXIT_CODE) from None
        except ProfilerUnreachable as error:
            log.error("worker %d: %s", worker_index, error)
            raise SystemExit(PROFILER_EXIT_CODE) from None


@contextmanager
def study_logging(path: Path):
    """For the duration of a study run: the log file gets vmoe-nas's and Optuna's records, the console
    only the progress bar and warnings, and Optuna's experimental-feature warnings (heartbeats,
    multivariate TPE, fail_stale_trials: what we want) are silenced. All undone on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in ("vmoe_nas", "optuna")]
    levels = [logger.level for logger in loggers]
    verbosity = optuna.logging.get_verbosity()
    for logger in loggers:
        logger.addHandler(handler)
    logging.getLogger("vmoe_nas").setLevel(logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()  # the progress bar speaks for the study on the console
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
        handler.close()
        optuna.logging.enable_default_handler()
        optuna.logging.set_verbosity(verbosity)


class Progress:
    """A progress bar over the study: trials finished, best value of each objective, elapsed time."""

    def __init__(self, cfg: StudyConfig, study: optuna.Study):
        self.cfg = cfg
        self.bar = tqdm(total=cfg.n_trials, desc=cfg.study_name, unit="trial", dynamic_ncols=True)
        self.update(study)

    def update(self, study: optuna.Study) -> None:
        finished = records.read_all(study, FINISHED_STATES)
        self.bar.n = sum(1 for r in finished if not r.interrupted)
        complete = [r for r in finished if r.status == "complete"]
        best = {}
        for objective in self.cfg.study_objectives:
            values = [r.metrics.value(objective) for r in complete]
            if values:
                best[objective.name] = f"{(max if objective.maximize else min)(values):.4g}"
        failed = sum(1 for r in finished if r.status == "failed")
        self.bar.set_postfix(best=best, failed=failed, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def stored_anchor(study: optuna.Study) -> steps.Anchor | None:
    attrs = records.read_study(study).anchor
    return steps.Anchor.from_attrs(attrs) if attrs else None


def print_superclasses(ctx: steps.StudyContext) -> None:
    names = ctx.dataset.class_names
    for groups, class_to_group in ctx.superclasses.items():
        named = [[names[c] for c in np.flatnonzero(class_to_group == g)] for g in range(groups)]
        print(f"super-classes for {groups} experts: " + " | ".join(", ".join(n) for n in named), file=sys.stderr)


def run_search(cfg: StudyConfig, *, progress: bool = True, allow_changes: bool = False) -> optuna.Study:
    """Run (or resume) the study in `cfg` with `cfg.workers` processes; returns the study. `allow_changes`:
    see `open_study`."""
    from nas.devices import resolve_device

    for device in cfg.devices or [cfg.recipe().device]:  # absent: one error before anything is stored
        resolve_device(device)
    log_path = cfg.study_dir / "search.log"
    url = storage_url(cfg)
    if url.kind == "sqlite" and cfg.workers > 1:
        raise StorageError(f"{url.redacted} is a SQLite file, which takes one writer at a time: run it with "
                           "--workers 1, or give several workers a journal or PostgreSQL storage (--storage)")
    with study_logging(log_path):
        if cfg.profiler.backend == "remote":  # before any trial starts: an absent agent is one error, not N failures
            AgentClient(cfg.profiler.remote_url).device()
        study = open_study(cfg, url, allow_changes=allow_changes)
        # Super-classes are found before any trial (in view, not inside some worker's first MoE trial).
        ctx = steps.build_context(cfg, progress=progress)
        if cfg.evaluator_kind == "supernet":  # trained (or resumed) before any trial, in view like the super-classes
            from nas.supernet import trained_supernet

            trained_supernet(ctx, progress=progress)
        with study_lock(url, cfg.study_name):
            queued = fill_slots(study, cfg)
            if stored_anchor(study) is None:
                anchor = steps.measure_anchor(cfg, ctx.dataset)
                if anchor is not None:
                    records.write_study(study, records.StudyRecord(anchor=anchor.to_attrs()))
                    log.info("latency anchor %s: %.4f ms", anchor.arch.name, anchor.latency_ms)
        ctx.anchor = stored_anchor(study)
        log.info("study %s: %d trials queued, %d workers, storage %s", cfg.study_name, queued, cfg.workers,
                 url.redacted)
        if progress:
            print_superclasses(ctx)
        bar = Progress(cfg, study) if progress else None
        try:
            if cfg.workers == 1:
                run_worker(cfg, study=study, ctx=ctx, on_trial=bar.update if bar else None)
            else:
                _run_processes(cfg, study, bar, log_path, url)
        finally:
            if bar:
                bar.update(study)
                bar.close()
        verify_front(study, cfg, ctx.latency_model)  # profiler.latency: predicted+verify
    return study


def _run_processes(cfg: StudyConfig, study: optuna.Study, bar: Progress | None, log_path: Path,
                   url: StorageURL) -> None:
    """`cfg.workers` processes on the study. A worker that dies (killed, out of memory) has its trial
    reclaimed and is replaced while queued or running trials remain, up to `workers * (max_retries + 1)`
    replacements."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools

    def start(index: int):
        process = context.Process(target=_worker_process, args=(cfg.to_dict(), index, str(log_path), os.getpid()),
                                  name=f"worker-{index}")
        with worker_env(index, cfg.devices):  # a replacement keeps its predecessor's device
            process.start()
        return process

    workers = {index: start(index) for index in range(cfg.workers)}
    replacements = cfg.workers * (cfg.max_retries + 1)
    exit_codes = []
    try:
        while workers:
            time.sleep(1.0)
            for index, worker in list(workers.items()):
                if worker.is_alive():
                    continue
                exit_codes.append(worker.exitcode)
                del workers[index]
                if worker.exitcode not in (0, STORAGE_EXIT_CODE, PROFILER_EXIT_CODE):
                    log.warning("worker %d died (exit code %s); its trial is reclaimed", index, worker.exitcode)
                    reclaim(study, cfg)  # it may have died mid-reclaim, with a slot failed and no retry queued:
                    unfinished = (requeue_free_slots(study, cfg)
                                  or study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                    if unfinished and replacements:
                        replacements -= 1
                        workers[index] = start(index)
            if bar:
                bar.update(study)
    except KeyboardInterrupt as interruption:  # Ctrl-C reaches the workers too; `docker stop`'s SIGTERM does not
        if interruption_name(interruption) != "Ctrl-C":
            for worker in workers.values():
                worker.terminate()  # SIGTERM: an interruption there too
        raise
    finally:
        for worker in workers.values():
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
    if STORAGE_EXIT_CODE in exit_codes:
        raise StorageError(f"a worker lost the storage {url.redacted}; see {log_path}; finished trials are kept: "
                           "run the same command again to resume")
    if PROFILER_EXIT_CODE in exit_codes:
        raise ProfilerUnreachable(f"the profiler agent at {cfg.profiler.remote_url} stopped answering; see {log_path}; "
                                  "finished trials are kept: run the same command again to resume")
