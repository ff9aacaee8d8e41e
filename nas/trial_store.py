"""A study's trials in Optuna's storage: queue, claim, lease, reclaim, requeue, and a running trial's record.

The one module that reaches into Optuna's storage internals (`Study._storage`, `Trial._trial_id`, the storage's
state transitions, the `failed_trial` system attribute), and here is why. Optuna's `BaseStorage` is documented
as not for library users, and as assuming that a RUNNING trial is modified by the one process that runs it.
Our studies break both on purpose:
- exact `n_trials` with several workers: trials are queued lazily, one per slot, and a worker claims one by
  moving it from WAITING to RUNNING in the storage, which lets exactly one worker win (`claim_trial`);
- a trial whose worker died (kill -9, the OOM killer, a lost machine) is failed by ANOTHER worker and its
  retry queued (`reclaim`; who counts as dead is `nas.liveness`'s rule); its worker, if it was only slow,
  meets `UpdateFinishedTrialError` and drops its result;
- the running trial's lease is renewed by a thread (`lease`);
- a budgeted trial runs in a child process that attaches to the trial by id (`attach`).
Everything else in vmoe-nas uses Optuna's public API, and calls this module for the rest.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from contextlib import contextmanager

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState, create_trial

from nas import liveness
from nas import record as records
from nas.config import first_line
from nas.record import TrialRecord
from nas.storage import StorageURL, default_storage, parse_storage, study_lock
from nas.study import StudyConfig

log = logging.getLogger("vmoe_nas.trial_store")
LIVE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
RETRY_ATTR = "failed_trial"  # Optuna's system attribute naming the trial a retry replaces


def storage_url(cfg: StudyConfig) -> StorageURL:
    """The study's storage: `cfg.storage`, or the default file under results/<study>/."""
    return parse_storage(cfg.storage) if cfg.storage else default_storage(cfg.study_dir, cfg.workers)


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's own storage (a cache around RDB storages), for a companion study in the same place."""
    return study._storage


def stored_trial(trial: optuna.Trial) -> FrozenTrial:
    """What the storage holds for a running trial now (written by another process, e.g. its budgeted child)."""
    return trial.study._storage.get_trial(trial._trial_id)


def trial_id(trial: optuna.Trial) -> int:
    return trial._trial_id


def attach(study: optuna.Study, trial_id: int) -> optuna.Trial:
    """The running trial `trial_id` of `study`, taken over by another process (a budgeted trial's child)."""
    study.get_trials(deepcopy=False)  # an RDB storage's cache learns the trial ids, which a Trial needs
    return optuna.Trial(study, trial_id)


@contextmanager
def optuna_verbosity(level: int = optuna.logging.WARNING):
    """Optuna's log level set to `level` while the block runs, then restored."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(level)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


# ---------------------------------------------------------------- writing a running trial's record


def write(trial: optuna.Trial, record: TrialRecord) -> None:
    """Store `record` on a running trial: the user attributes that changed and, the first time it has them, its
    constraints (Optuna keeps a trial's constraints as first set)."""
    stored = trial.user_attrs
    for key, value in records.user_attrs(record).items():
        if stored.get(key) != value:
            trial.set_user_attr(key, value)
    if record.constraints and not stored.get(records.CONSTRAINED_ATTR):
        for name, value in record.constraints.items():
            trial.set_constraint(name, value)
        trial.set_user_attr(records.CONSTRAINED_ATTR, True)


def write_stored(storage: optuna.storages.BaseStorage, trial_id: int, record: TrialRecord) -> None:
    """Like `write`, for a trial another worker runs (by storage and trial id): its changed user attributes."""
    stored = storage.get_trial(trial_id).user_attrs
    for key, value in records.user_attrs(record).items():
        if stored.get(key) != value:
            storage.set_trial_user_attr(trial_id, key, value)


def renew_lease(trial: optuna.Trial, until: float) -> None:
    trial.set_user_attr(records.LEASE_ATTR, until)


@contextmanager
def lease(trial: optuna.Trial, interval: float):
    """Hold a lease on `trial` while the block runs: renewed every `interval` seconds by a thread that keeps
    trying through storage errors (the trial itself meets a lost storage and reports it)."""
    renew_lease(trial, liveness.lease_until(interval))
    stop = threading.Event()

    def renew():
        while not stop.wait(interval):
            try:
                renew_lease(trial, liveness.lease_until(interval))
            except Exception as error:  # noqa: BLE001 - any storage failure: try again next interval
                log.warning("trial %d: lease renewal failed: %s", trial.number, first_line(error))

    thread = threading.Thread(target=renew, daemon=True, name=f"lease-{trial.number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------- the queue: slots, claims, reclaims


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


def reclaim(study: optuna.Study, cfg: StudyConfig) -> list[int]:
    """Reclaim the trials of dead workers (see nas.liveness). Under the study lock, as filling slots is: a
    reclaimed trial's slot is free between failing it and queueing its retry, and a launcher filling slots
    in that moment would queue a second trial for it."""
    grace_s = 3 * cfg.heartbeat_interval
    now = time.time()
    if not any(liveness.is_dead(r, now=now, grace_s=grace_s) for r in records.read_all(study, (TrialState.RUNNING,))):
        return []  # the common case, without taking the lock
    with study_lock(storage_url(cfg), cfg.study_name):
        return reclaim_dead_trials(study, max_retries=cfg.max_retries, grace_s=grace_s)


def requeue_free_slots(study: optuna.Study, cfg: StudyConfig) -> bool:
    """Before the last worker leaves: queue the slots left free (a worker killed between failing a dead
    worker's trial and queueing its retry; a trial interrupted in another worker). Whether any trial waits."""
    with study_lock(storage_url(cfg), cfg.study_name):
        fill_slots(study, cfg)
        return any(_in_study(t.user_attrs.get("slot"), cfg)
                   for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def reclaim_dead_trials(study: optuna.Study, *, max_retries: int, grace_s: float) -> list[int]:
    """Fail every running trial whose worker is gone and queue its retry; returns the trials reclaimed."""
    storage = study._storage  # the study's own storage (a cache around RDB storages): one view of the states
    study_id = storage.get_study_id_from_name(study.study_name)
    reclaimed = []
    now = time.time()
    running = records.read_all(study, (TrialState.RUNNING,))
    for dead in (r for r in running if liveness.is_dead(r, now=now, grace_s=grace_s)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, dead.number)
        retries = retry_count(study, dead.number)
        final = retries >= max_retries
        reason = (f"its worker {dead.worker or '(unknown)'} died or stopped renewing its lease; "
                  + ("retries exhausted" if final else "retried in a new trial of the same slot"))
        dead.reason, dead.interrupted = reason, not final  # interrupted: its retry holds the slot
        try:
            write_stored(storage, trial_id, dead)
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue  # another worker reclaimed it, or it just finished
        reclaimed.append(dead.number)
        log.warning("trial %d: %s", dead.number, reason)
        if not final:
            frozen = study._storage.get_trial(trial_id)
            study.add_trial(create_trial(
                state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
                user_attrs=records.enqueue_attrs(dead.slot), system_attrs={RETRY_ATTR: dead.number},
            ))
    return reclaimed


def retry_count(study: optuna.Study, number: int) -> int:
    """How many times the trial `number` is itself a retry (the chain of `failed_trial` back to the first)."""
    trials = study.get_trials(deepcopy=False)
    count, current = 0, trials[number]
    while RETRY_ATTR in current.system_attrs:
        count += 1
        current = trials[current.system_attrs[RETRY_ATTR]]
    return count


__all__ = ["LIVE_STATES", "RETRY_ATTR", "attach", "claim_trial", "fill_slots", "lease", "optuna_verbosity", "reclaim",
           "reclaim_dead_trials", "renew_lease", "requeue_free_slots", "retry_count", "storage_of", "storage_url",
           "stored_trial", "trial_id", "write", "write_stored"]
