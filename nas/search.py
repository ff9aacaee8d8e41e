"""Search studies: a multi-objective Optuna study whose trials are Mobile V-MoE and dense ViTs.

Each trial: sample -> ArchConfig -> validate -> profile -> constraints -> proxy-train with early
stopping -> objectives. Everything a later command needs (the architecture YAML, the profile, the
training record, the metrics) is stored as trial user attributes, so storage alone rebuilds any model.

Studies of `n_trials` are exact, also with several workers: the study holds one queued trial per slot
and workers claim queued trials atomically; an interrupted trial frees its slot for the next run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from tqdm.auto import tqdm

from nas.study import OBJECTIVES, StudyConfig
from profilers.remote import AgentClient, ProfilerUnreachable
from search_spaces import ArchConfig
from search_spaces.mobile_vmoe import InvalidArchitecture

log = logging.getLogger("vmoe_nas.search")
# Heartbeats, multivariate TPE and fail_stale_trials are marked experimental; they are what we want.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
LIVE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# What a storage raises when its database is gone: Optuna wraps SQLAlchemy's errors, mostly.
STORAGE_ERRORS = (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)
STORAGE_EXIT_CODE = 3  # a worker process that lost its storage
PROFILER_EXIT_CODE = 4  # a worker process that lost its remote profiler agent
REUSABLE = ("complete", "infeasible", "early_stopped")  # results a trial of the same architecture reuses
ANCHOR_ATTR = "latency_anchor"  # study user attribute: the anchor architecture and its latency


class StorageError(RuntimeError):
    """The study storage cannot be opened or reached."""


# ---------------------------------------------------------------- storage, sampler, study


def default_storage_url(cfg: StudyConfig) -> str:
    """A SQLite file in results/<study>/, or a journal file when several local workers share it
    (SQLite locks under parallel writers). An existing one of either is reused, so a study resumes."""
    journal, sqlite = cfg.study_dir / "journal.log", cfg.study_dir / "study.db"
    if journal.exists() or (cfg.workers > 1 and not sqlite.exists()):
        return f"journal:{journal}"
    return f"sqlite:///{sqlite}"


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.split('@', 1)[1]}" if "@" in rest else url


def make_storage(url: str, *, heartbeat_interval: int = 10, max_retries: int = 1) -> optuna.storages.BaseStorage:
    """`journal:PATH` for a journal file, any SQLAlchemy URL otherwise (sqlite, postgresql, mysql).
    RDB storages get heartbeats: a trial whose worker dies is failed and re-queued `max_retries` times."""
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    shown = _redact(url)
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")  # psycopg 3, the postgres extra
    try:
        return RDBStorage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=3 * heartbeat_interval,
            heartbeat_stale_trial_callback=(
                RetryHeartbeatStaleTrialCallback(max_retry=max_retries) if max_retries else None
            ),
            engine_kwargs={"pool_pre_ping": True},
        )
    except Exception as error:  # SQLAlchemy's errors, a missing driver: all mean "cannot open it"
        reason = str(error).strip().splitlines()[0]
        raise StorageError(f"cannot open storage {shown}: {reason}") from None


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


def open_study(cfg: StudyConfig, *, worker_index: int = 0) -> optuna.Study:
    """Create the study, or load it to resume; a study of the same name with other objectives is refused."""
    storage = make_storage(
        cfg.storage or default_storage_url(cfg), heartbeat_interval=cfg.heartbeat_interval, max_retries=cfg.max_retries
    )
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
        raise StorageError(f"cannot open study {cfg.study_name!r}: {str(error).splitlines()[0]}") from None
    stored = study.user_attrs.get("objectives")
    if stored is None:
        study.set_user_attr("objectives", cfg.objectives)
        study.set_user_attr("study_config", cfg.to_dict())
    elif stored != cfg.objectives:
        raise StorageError(f"study {cfg.study_name!r} was created with objectives {stored}, not {cfg.objectives}")
    return study


@contextmanager
def study_lock(url: str, study_name: str):
    """Serialise changes to the trial queue across processes: a PostgreSQL advisory lock (so across
    machines too), or a lock file beside a SQLite or journal file."""
    if url.startswith("postgresql"):
        engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        finally:
            engine.dispose()
        return
    file_based = url.startswith(("journal:", "sqlite:///"))
    path = url.removeprefix("journal:").removeprefix("sqlite:///") if file_based else None
    if path is None:  # other databases: the queue is filled by whoever starts first; run one launcher
        yield
        return
    with open(f"{path}.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def fill_slots(study: optuna.Study, cfg: StudyConfig) -> int:
    """Queue one trial per free slot of `n_trials` (enqueued architectures first); returns how many.
    A slot is free when it has no trial yet, or only trials that were interrupted."""
    if cfg.n_trials is None:
        return 0
    taken = {
        t.user_attrs.get("slot")
        for t in study.get_trials(deepcopy=False)
        if t.state in LIVE_STATES or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))
    }
    enqueued = cfg.enqueued_params()
    free = [slot for slot in range(cfg.n_trials) if slot not in taken]
    for slot in free:
        params = enqueued[slot] if slot < len(enqueued) else {}
        study.enqueue_trial(params, user_attrs={"slot": slot}, skip_if_exists=False)
    return len(free)


def claim_trial(study: optuna.Study, storage: optuna.storages.BaseStorage) -> optuna.Trial | None:
    """Atomically take a queued trial (the storage lets one worker move it to RUNNING); None when none."""
    study_id = storage.get_study_id_from_name(study.study_name)
    for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, waiting.number)
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, trial_id)
        except UpdateFinishedTrialError:
            continue
    return None


def heartbeat_interval(storage: optuna.storages.BaseStorage) -> int | None:
    """Seconds between heartbeats, or None for storages without them (journal files)."""
    return getattr(storage, "get_heartbeat_interval", lambda: None)()


@contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial: optuna.Trial):
    """Record heartbeats while a trial runs, on storages that support them."""
    interval = heartbeat_interval(storage)
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat():
        while True:
            try:
                storage.record_heartbeat(trial._trial_id)
            except STORAGE_ERRORS as error:  # the trial itself will meet the lost storage and report it
                log.warning("trial %d: heartbeat failed: %s", trial.number, str(error).splitlines()[0])
                return
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial.number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class BudgetExceeded(Exception):
    """A trial ran past its time or memory budget."""


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def trial_budget(seconds: float | None, memory_mb: float | None):
    """Stop the code inside after `seconds`, or when this process's resident memory passes `memory_mb`:
    a timer and a watchdog thread signal the main thread, whose handler raises BudgetExceeded."""
    if not seconds and not memory_mb:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("trial budgets need the main thread (they use signals)")

    def over_time(signum, frame):
        raise BudgetExceeded(f"stopped: exceeded its time budget of {seconds:g} s")

    def over_memory(signum, frame):
        raise BudgetExceeded(
            f"stopped: exceeded its memory budget of {memory_mb:g} MB (resident {resident_mb():.0f} MB)"
        )

    stop = threading.Event()

    def watch_memory():
        while not stop.wait(0.1):
            if resident_mb() > memory_mb:
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    previous = signal.signal(signal.SIGALRM, over_time), signal.signal(signal.SIGUSR1, over_memory)
    if seconds:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    watchdog = threading.Thread(target=watch_memory, daemon=True) if memory_mb else None
    if watchdog:
        watchdog.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        stop.set()
        if watchdog:
            watchdog.join()
        signal.signal(signal.SIGALRM, previous[0])
        signal.signal(signal.SIGUSR1, previous[1])


# ---------------------------------------------------------------- one trial


def should_stop_early(accuracy: float, flops: float, peers: list[tuple[float, float]], rule) -> str | None:
    """The early-stopping rule (see `EarlyStopping`): `peers` are (flops, first-evaluation accuracy) of
    finished trials. Returns the reason to stop, or None to go on."""
    similar = [acc for peer_flops, acc in peers if max(peer_flops, flops) <= rule.flops_ratio * min(peer_flops, flops)]
    if len(similar) < rule.min_peers:
        return None
    bar = float(np.quantile(similar, rule.quantile))
    if accuracy >= bar:
        return None
    return (
        f"first-evaluation accuracy {accuracy:.4f} is below the {rule.quantile:g} quantile ({bar:.4f}) "
        f"of {len(similar)} finished trials within {rule.flops_ratio:g}x its FLOPs"
    )


class TrialEvaluator:
    """The objective: turns one Optuna trial into objective values, storing everything on the trial."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.recipe = cfg.recipe()
        if self.recipe.num_threads is None and cfg.workers > 1:  # share the cores instead of oversubscribing
            self.recipe = dataclasses.replace(self.recipe, num_threads=max(1, (os.cpu_count() or 1) // cfg.workers))
        self._dataset = None
        self._superclasses: dict[int, Any] = {}

    @property
    def dataset(self):
        if self._dataset is None:
            from nas.data import load_dataset

            spec = self.cfg.data
            self._dataset = load_dataset(
                spec.name, data_dir=spec.data_dir, val_fraction=spec.val_fraction, seed=spec.seed, limit=spec.limit
            )
        return self._dataset

    def __call__(self, trial: optuna.Trial) -> list[float]:
        arch = self.sample(trial)
        duplicate = self.find_duplicate(trial, arch)
        if duplicate is not None:
            return self.copy_result(trial, duplicate)
        metrics = self.profile(trial, arch)
        if self.apply_constraints(trial, metrics):
            metrics["accuracy"] = 0.0  # untrained: the worst accuracy, and the sampler sees it as infeasible
            return self.finish(trial, metrics, status="infeasible")
        if "accuracy" in self.cfg.objectives:
            metrics.update(self.train(trial, arch, metrics["flops"]))
        return self.finish(trial, metrics, status="complete")

    def sample(self, trial: optuna.Trial) -> ArchConfig:
        data = self.dataset
        try:
            arch = self.cfg.space.sample(
                trial, image_size=data.image_size, in_channels=data.in_channels, num_classes=data.num_classes
            )
            moe = arch.moe
            if moe and moe.routing == "per_image" and moe.router_loss_weight > 0 and moe.num_experts > data.num_classes:
                raise InvalidArchitecture(
                    f"moe.num_experts={moe.num_experts} super-classes cannot be formed from {data.num_classes} classes"
                )
        except InvalidArchitecture as error:
            trial.set_user_attr("status", "invalid")
            trial.set_user_attr("reason", str(error))
            raise optuna.TrialPruned(f"invalid architecture: {error}") from None
        trial.set_user_attr("arch", arch.to_dict())
        trial.set_user_attr("arch_yaml", arch.to_yaml())
        trial.set_user_attr("config_hash", arch.config_hash())
        trial.set_user_attr("name", arch.name)
        return arch

    def find_duplicate(self, trial: optuna.Trial, arch: ArchConfig) -> optuna.trial.FrozenTrial | None:
        """A finished trial of the same architecture. If an earlier trial is still running it, wait for
        it (only for earlier ones, so two workers never wait on each other)."""
        key = arch.config_hash()
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        while True:
            same = [t for t in trial.study.get_trials(deepcopy=False, states=states)
                    if t.number != trial.number and t.user_attrs.get("config_hash") == key]
            finished = [t for t in same if t.state != TrialState.RUNNING and t.user_attrs.get("status") in REUSABLE]
            if finished:
                return min(finished, key=lambda t: t.number)
            if not any(t.state == TrialState.RUNNING and t.number < trial.number for t in same):
                return None
            time.sleep(2)

    def copy_result(self, trial: optuna.Trial, original: optuna.trial.FrozenTrial) -> list[float]:
        log.info("trial %d: %s already evaluated in trial %d, reusing", trial.number, original.user_attrs["name"],
                 original.number)
        for key in ("metrics", "profile", "train", "reason"):
            if key in original.user_attrs:
                trial.set_user_attr(key, original.user_attrs[key])
        trial.set_user_attr("duplicate_of", original.number)
        for name, value in original.constraints.items():
            trial.set_constraint(name, value)
        status = original.user_attrs["status"]
        trial.set_user_attr("status", status)
        if original.state == TrialState.PRUNED:
            reason = original.user_attrs.get("reason")
            raise optuna.TrialPruned(f"same architecture as trial {original.number}: {reason}")
        return [original.user_attrs["metrics"][OBJECTIVES[name][1]] for name in self.cfg.objectives]

    def profile(self, trial: optuna.Trial, arch: ArchConfig) -> dict[str, Any]:
        """Profile the architecture (latency only when an objective or constraint needs it); stores the
        full profile on the trial and returns the flat metrics."""
        from profilers import device_label, profile

        measure = needs_latency(self.cfg)
        anchor = trial.study.user_attrs.get(ANCHOR_ATTR) if measure else None
        anchor_arch = ArchConfig.from_yaml(anchor["arch_yaml"]) if anchor else None
        result = profile(arch, measure=measure, anchor=anchor_arch, **self.cfg.profiler.options())
        trial.set_user_attr("profile", result)
        latency = result.get("latency_ms") or {}
        ratio = result["anchor"]["ratio"] if "anchor" in result else None
        metrics = {
            "flops": result["flops"],
            "params_total": result["params_total"],
            "params_active": result["params_active"],
            "size_bytes_fp32": result["size_bytes_fp32"],
            "size_mb": result["size_bytes_fp32"] / 1e6,
            # On the anchor's scale where there is one: its latency at the study's start times this trial's ratio.
            "latency_ms": ratio * anchor["latency_ms"] if ratio else latency.get("median"),
            "latency_ms_measured": latency.get("median"),
            "latency_ratio": ratio,
            "latency_cv": latency.get("cv"),
            "latency_backend": result.get("backend"),
            "latency_device": device_label(result["device"]) if latency else None,
        }
        trial.set_user_attr("metrics", metrics)
        return metrics

    def apply_constraints(self, trial: optuna.Trial, metrics: dict[str, Any]) -> bool:
        """Set every configured constraint on the trial (Optuna: <= 0 is feasible); True if one is broken."""
        broken = []
        for name, (metric, limit) in self.cfg.constraints.active().items():
            value = (metrics[metric] - limit) / limit
            trial.set_constraint(name, value)
            if value > 0:
                broken.append(f"{metric}={metrics[metric]:.4g} > {name}={limit:g}")
        if broken:
            trial.set_user_attr("reason", "infeasible: " + "; ".join(broken))
        return bool(broken)

    def superclasses(self, arch: ArchConfig):
        moe = arch.moe
        if not moe or moe.routing != "per_image" or moe.router_loss_weight == 0:
            return None
        return self.class_groups(moe.num_experts)

    def class_groups(self, groups: int, *, progress: bool = False) -> np.ndarray:
        """class -> super-class for `groups` experts: the data set's own, or discovered once per study
        (cached under results/<study>/superclasses/, where every worker finds it)."""
        if groups not in self._superclasses:
            from nas.superclasses import superclasses_for

            mapping = superclasses_for(self.dataset, groups, cache_dir=self.cfg.study_dir / "superclasses",
                                       progress=progress)
            log.info("super-classes for %d experts (%s): %s", groups, mapping.source, mapping.class_to_group.tolist())
            self._superclasses[groups] = np.asarray(mapping.class_to_group)
        return self._superclasses[groups]

    def train(self, trial: optuna.Trial, arch: ArchConfig, flops: float) -> dict[str, Any]:
        from nas.trainer import train

        first_eval: dict[str, Any] = {}

        def on_eval(step: int, epoch: float, accuracy: float) -> bool:
            if first_eval:
                return False
            first_eval["accuracy"] = accuracy
            if not self.cfg.early_stopping.enabled:
                return False
            first_eval["stop"] = should_stop_early(accuracy, flops, self.peers(trial), self.cfg.early_stopping)
            return first_eval["stop"] is not None

        result = train(arch, self.dataset, self.recipe, superclasses=self.superclasses(arch), on_eval=on_eval)
        record = result.to_dict()
        trial.set_user_attr("train", record)
        metrics = {
            "accuracy": result.val_accuracy,
            "first_eval_accuracy": first_eval.get("accuracy"),
            "router_accuracy": result.router_accuracy,
            "train_time_s": result.wall_time_s,
            "images_per_s": result.images_per_s,
        }
        if first_eval.get("stop"):
            trial.set_user_attr("metrics", {**trial.user_attrs["metrics"], **metrics})
            trial.set_user_attr("status", "early_stopped")
            trial.set_user_attr("reason", first_eval["stop"])
            raise optuna.TrialPruned(f"stopped early: {first_eval['stop']}")
        return metrics

    def peers(self, trial: optuna.Trial) -> list[tuple[float, float]]:
        peers = []
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            metrics = t.user_attrs.get("metrics") or {}
            if metrics.get("first_eval_accuracy") is not None and t.user_attrs.get("duplicate_of") is None:
                peers.append((metrics["flops"], metrics["first_eval_accuracy"]))
        return peers

    def finish(self, trial: optuna.Trial, metrics: dict[str, Any], *, status: str) -> list[float]:
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("status", status)
        return [metrics[OBJECTIVES[name][1]] for name in self.cfg.objectives]


def run_trial(study: optuna.Study, storage, trial: optuna.Trial, evaluator: TrialEvaluator) -> TrialState:
    """Run one claimed trial to its end state. A failing trial is recorded as failed with its reason."""
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    with heartbeat(storage, trial):
        try:
            with trial_budget(evaluator.cfg.trial_timeout, evaluator.cfg.trial_memory_mb):
                values = evaluator(trial)
        except optuna.TrialPruned as pruned:
            trial.set_user_attr("reason", trial.user_attrs.get("reason") or str(pruned))
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned: %s", trial.number, pruned)
            return TrialState.PRUNED
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("reason", "interrupted (Ctrl-C); its slot is run again when the study resumes")
            study.tell(trial, state=TrialState.FAIL)
            raise
        except STORAGE_ERRORS:
            raise  # the storage itself failed: nothing can be recorded; run_worker reports it
        except ProfilerUnreachable as error:  # the device is gone, not the architecture: stop, retry on resume
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("reason", f"{error}; its slot is run again when the study resumes")
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("reason", reason)
            study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, reason, exc_info=True)
            return TrialState.FAIL
    study.tell(trial, values)
    log.info("trial %d %s: %s -> %s", trial.number, trial.user_attrs.get("status"), trial.user_attrs.get("name"),
             dict(zip(evaluator.cfg.objectives, values)))
    return TrialState.COMPLETE


# ---------------------------------------------------------------- workers


def run_worker(cfg: StudyConfig, worker_index: int = 0, on_trial=None, evaluator: TrialEvaluator | None = None) -> int:
    """Claim and run queued trials until none is left or the timeout passes; returns trials run."""
    url = cfg.storage or default_storage_url(cfg)
    try:
        study = open_study(cfg, worker_index=worker_index)
        storage = study._storage  # the storage the study writes through (a cache around RDB storages)
        with study_lock(url, cfg.study_name):
            fill_slots(study, cfg)  # a no-op unless this worker starts or resumes the study
        return _work(cfg, study, storage, on_trial, evaluator or TrialEvaluator(cfg))
    except STORAGE_ERRORS as error:
        reason = str(error).strip().splitlines()[0]
        raise StorageError(
            f"storage {_redact(url)} became unreachable ({reason}); finished trials are kept there: "
            "run the same command again to resume"
        ) from None


def _work(cfg: StudyConfig, study: optuna.Study, storage, on_trial, evaluator: TrialEvaluator) -> int:
    deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
    beats = heartbeat_interval(storage) is not None
    count = 0
    while deadline is None or time.monotonic() < deadline:
        fail_stale_trials(study)  # a dead worker's trial fails here, and its retry is queued
        trial = claim_trial(study, storage)
        if trial is None:
            if cfg.n_trials is None:
                trial = study.ask()  # a timeout-only study makes trials as it goes
            elif beats and study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                time.sleep(cfg.heartbeat_interval)  # a running trial may belong to a dead worker: wait to retry it
                continue
            else:
                break
        run_trial(study, storage, trial, evaluator)
        count += 1
        if on_trial:
            on_trial(study)
    return count


def _worker_process(cfg_dict: dict, worker_index: int, log_path: str) -> None:
    setup_logging(Path(log_path), console=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        run_worker(StudyConfig.from_dict(cfg_dict), worker_index)
    except KeyboardInterrupt:
        pass
    except StorageError as error:
        log.error("worker %d: %s", worker_index, error)
        raise SystemExit(STORAGE_EXIT_CODE) from None
    except ProfilerUnreachable as error:
        log.error("worker %d: %s", worker_index, error)
        raise SystemExit(PROFILER_EXIT_CODE) from None


def setup_logging(path: Path, *, console: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s"))
    for name in ("vmoe_nas", "optuna"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in logger.handlers):
            logger.addHandler(handler)
    if not console:
        optuna.logging.disable_default_handler()  # the progress bar speaks for the study on the console


class Progress:
    """A progress bar over the study: trials finished, best value of each objective, elapsed time."""

    def __init__(self, cfg: StudyConfig, study: optuna.Study):
        self.cfg = cfg
        self.bar = tqdm(total=cfg.n_trials, desc=cfg.study_name, unit="trial", dynamic_ncols=True)
        self.update(study)

    def update(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False, states=FINISHED_STATES)
        done = sum(1 for t in trials if not t.user_attrs.get("interrupted"))
        self.bar.n = done
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("status") == "complete"]
        best = {}
        for i, name in enumerate(self.cfg.objectives):
            values = [t.values[i] for t in complete]
            if values:
                best[name] = f"{(max if OBJECTIVES[name][0] == 'maximize' else min)(values):.4g}"
        failed = sum(1 for t in trials if t.state == TrialState.FAIL)
        self.bar.set_postfix(best=best, failed=failed, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def needs_latency(cfg: StudyConfig) -> bool:
    return "latency" in cfg.objectives or cfg.constraints.max_latency_ms is not None


def measure_anchor(study: optuna.Study, evaluator: TrialEvaluator) -> None:
    """Measure the study's latency anchor, the space's smallest dense ViT, once when the study starts (alone,
    for 3x the usual time). Every trial is timed interleaved with it and its latency reported as this
    figure times their ratio: one scale for the whole study, across resumes, workers and hours."""
    from profilers import MIN_TIME_S, device_label, profile

    cfg = evaluator.cfg
    if not (cfg.profiler.anchor and cfg.profiler.backend != "remote" and needs_latency(cfg)):
        return  # a remote agent measures one model at a time on a device kept for it: no drift to cancel
    if ANCHOR_ATTR in study.user_attrs:
        return
    data = evaluator.dataset
    arch = cfg.space.smallest_dense(image_size=data.image_size, in_channels=data.in_channels,
                                    num_classes=data.num_classes)
    result = profile(arch, **cfg.profiler.options(), min_time_s=3 * MIN_TIME_S)
    if result["latency_ms"] is None:
        return  # this backend cannot measure here (Core ML off macOS): nothing to anchor
    study.set_user_attr(ANCHOR_ATTR, {"name": arch.name, "arch_yaml": arch.to_yaml(),
                                      "latency_ms": result["latency_ms"]["median"], "latency": result["latency_ms"],
                                      "device": device_label(result["device"])})
    log.info("latency anchor %s: %.4f ms", arch.name, result["latency_ms"]["median"])


def prepare_superclasses(evaluator: TrialEvaluator, *, progress: bool) -> None:
    """Find the class groupings the space's routers need before any trial: the discovery model trains once,
    in view, instead of inside some worker's first MoE trial."""
    data = evaluator.dataset
    for groups in evaluator.cfg.space.router_groups():
        if groups <= data.num_classes:  # more experts than classes: those trials are rejected as invalid
            class_to_group = evaluator.class_groups(groups, progress=progress)
            if progress:
                named = [[data.class_names[c] for c in np.flatnonzero(class_to_group == g)] for g in range(groups)]
                print(f"super-classes for {groups} experts: " + " | ".join(", ".join(n) for n in named),
                      file=sys.stderr)


def run_search(cfg: StudyConfig, *, progress: bool = True) -> optuna.Study:
    """Run (or resume) the study in `cfg` with `cfg.workers` processes; returns the study."""
    log_path = cfg.study_dir / "search.log"
    setup_logging(log_path, console=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = cfg.storage or default_storage_url(cfg)
    if cfg.profiler.backend == "remote":  # before any trial starts: an absent agent is one error, not N failures
        AgentClient(cfg.profiler.remote_url).device()
    study = open_study(cfg)
    evaluator = TrialEvaluator(cfg)
    with study_lock(url, cfg.study_name):
        queued = fill_slots(study, cfg)
        measure_anchor(study, evaluator)
    log.info("study %s: %d trials queued, %d workers, storage %s", cfg.study_name, queued, cfg.workers, _redact(url))
    prepare_superclasses(evaluator, progress=progress)
    bar = Progress(cfg, study) if progress else None
    try:
        if cfg.workers == 1:
            run_worker(cfg, 0, on_trial=bar.update if bar else None, evaluator=evaluator)
        else:
            _run_processes(cfg, study, bar, log_path)
    finally:
        if bar:
            bar.update(study)
            bar.close()
    return study


def _run_processes(cfg: StudyConfig, study: optuna.Study, bar: Progress | None, log_path: Path) -> None:
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    workers = [
        context.Process(target=_worker_process, args=(cfg.to_dict(), index, str(log_path)), name=f"worker-{index}")
        for index in range(cfg.workers)
    ]
    for worker in workers:
        worker.start()
    try:
        while any(worker.is_alive() for worker in workers):
            time.sleep(1.0)
            if bar:
                bar.update(study)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
    if any(worker.exitcode == STORAGE_EXIT_CODE for worker in workers):
        raise StorageError(f"a worker lost the storage {_redact(cfg.storage or default_storage_url(cfg))}; "
                           f"see {log_path}; finished trials are kept: run the same command again to resume")
    if any(worker.exitcode == PROFILER_EXIT_CODE for worker in workers):
        raise ProfilerUnreachable(f"the profiler agent at {cfg.profiler.remote_url} stopped answering; see {log_path}; "
                                  "finished trials are kept: run the same command again to resume")
