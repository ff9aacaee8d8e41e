"""Search studies: a multi-objective Optuna study whose trials are Mobile V-MoE and dense ViTs.

`run_search(cfg)` opens (or resumes) the study, queues its trials, measures the latency anchor and builds the
`StudyContext` once; workers then claim queued trials (`nas.trial_store`) and run each to its end state
(`nas.runner`: sample -> validate -> reuse -> profile -> constraints -> train), storing a `nas.record.TrialRecord`.
This module keeps the study loop: workers (threads or processes), their supervision and the progress bar.

Studies of `n_trials` are exact, also with several workers: each trial holds a slot, queued lazily (a few
ahead of the workers), and workers claim queued trials atomically; an interrupted trial frees its slot.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from nas import record as records
from nas.config import first_line
from nas.devices import resolve_device
from nas.latency import verify_front
from nas.opening import open_study
from nas.processes import die_with_parent, interruption_name, raise_if_interrupted, treat_signals_as_interruptions
from nas.runner import run_trial, stored_anchor
from nas.storage import STORAGE_ERRORS, NoSpaceLeft, StorageError, StorageURL, is_disk_full, study_lock
from nas.study import StudyConfig
from nas.study_log import study_logging
from nas.supernet import trained_supernet
from nas.trial import StudyContext, build_context, measure_anchor
from nas.trial_store import claim_trial, fill_slots, reclaim, requeue_free_slots, storage_url
from profilers.remote import AgentClient, ProfilerUnreachable

log = logging.getLogger("vmoe_nas.search")
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
STORAGE_EXIT_CODE = 3  # a worker process that lost its storage
PROFILER_EXIT_CODE = 4  # a worker process that lost its remote profiler agent


# ---------------------------------------------------------------- workers


def run_worker(cfg: StudyConfig, worker_index: int = 0, *, study: optuna.Study | None = None,
               ctx: StudyContext | None = None, on_trial=None) -> int:
    """Claim and run queued trials until none is left or the timeout passes; returns trials run. Joins the
    study (opened and queued by `run_search`); `study` and `ctx` are reused when the caller has them."""
    url = storage_url(cfg)
    try:
        study = study or open_study(cfg, url, worker_index=worker_index)
        ctx = ctx or build_context(cfg, anchor=stored_anchor(study))
        return _work(cfg, study, ctx, url, on_trial)
    except (*STORAGE_ERRORS, OSError) as error:
        raise_if_interrupted()  # a signal inside a storage call (claiming, queueing): an interruption, no lost storage
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


def _work(cfg: StudyConfig, study: optuna.Study, ctx: StudyContext, url: StorageURL, on_trial) -> int:
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


def print_superclasses(ctx: StudyContext) -> None:
    names = ctx.dataset.class_names
    for groups, class_to_group in ctx.superclasses.items():
        named = [[names[c] for c in np.flatnonzero(class_to_group == g)] for g in range(groups)]
        print(f"super-classes for {groups} experts: " + " | ".join(", ".join(n) for n in named), file=sys.stderr)


def run_search(cfg: StudyConfig, *, progress: bool = True, allow_changes: bool = False) -> optuna.Study:
    """Run (or resume) the study in `cfg` with `cfg.workers` processes; returns the study. `allow_changes`:
    see `open_study`."""
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
        ctx = build_context(cfg, progress=progress)
        if cfg.evaluator_kind == "supernet":  # trained (or resumed) before any trial, in view like the super-classes
            trained_supernet(ctx, progress=progress)
        with study_lock(url, cfg.study_name):
            queued = fill_slots(study, cfg)
            stored = stored_anchor(study)
            # A study resumed with another profiler.statistic (--allow-changes) needs its anchor in that statistic
            if stored is None or stored.statistic != cfg.profiler.statistic:
                anchor = measure_anchor(cfg, ctx.dataset)
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
            raise_if_interrupted()  # a signal swallowed in a storage call below: the workers are stopped all the same
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
