"""The confirmation stage: does an MoE of the search beat dense, over seeds, beyond noise?

    select pairs -> list the runs they need -> train the missing ones -> paired statistics -> store

Pairs (`nas.pairs`): each of the top K MoEs against its FLOPs twin and the best dense models of no more
FLOPs and no more latency, within a latency tie band measured on the study. Every arm is retrained with the
same n seeds at the search's top-rung budget.

Common random numbers: seed i of every arm is recipe seed i, so the same batches in the same order (the
trainer derives them from (data seed, step) only), and an MoE starts from its twin's initial weights of that
seed in every parameter they share by name and shape (all but experts and router): against its twin, a
pair differs at step 0 only in what makes it an MoE. The search's own top-rung run of a dense arm is that
arm's run of the recipe seed (the search keeps its per-image correctness; pausing at rungs changes no
weight), so it is not trained again; an MoE's is not reused, since it did not start from its twin.

Storage: a companion study `<study>-confirm` in the study's storage, one COMPLETE trial per (arm, seed,
steps) run (`nas.record.ConfirmRun`), the pairs and their `nas.stats.PairedResult`s as its user attributes.
A killed confirm resumes: runs already stored are skipped. Runs go through a process pool with `workers > 1`
(which dies with this process); only this process writes to the storage. Launchers sharing one storage (the
README's distributed recipe) claim runs as workers claim trials (`Claims`): each run is trained once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from nas import liveness, stats, trial_store
from nas import record as records
from nas.config import ConfigError
from nas.evaluation import per_image_correct
from nas.liveness import LEASE_INTERVALS
from nas.pairs import Pair, latency_band, latency_warning, select_pairs, timing_spread
from nas.processes import die_with_parent
from nas.record import ConfirmRecord, ConfirmRun, TrialRecord
from nas.study import StudyConfig
from search_spaces import ArchConfig, build_model

log = logging.getLogger("vmoe_nas.confirm")
CLAIM_ATTR = "claim"  # a companion trial's user attribute: the key of the run a launcher is training


# ---------------------------------------------------------------- runs


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...]
    steps: int
    margin: float
    band: float  # the latency tie band used: the measured one, capped at `band_limit`
    band_measured: float = 0.0
    band_limit: float = 0.1
    anchor_spread: float | None = None  # the study's latency anchor's timing spread (None: no anchor)

    def to_dict(self) -> dict:
        return {"seeds": list(self.seeds), "steps": self.steps, "margin": self.margin, "latency_band": self.band,
                "latency_band_measured": self.band_measured, "latency_band_limit": self.band_limit,
                "anchor_spread": self.anchor_spread}


def settings_for(cfg: StudyConfig, rs: list[TrialRecord], *, seeds: int | None = None, steps: int | None = None,
                 margin: float | None = None, first_seed: int | None = None, anchor: dict | None = None) -> Settings:
    """The confirm section of `cfg` with any given override; seeds start at `first_seed`, by default the
    search's recipe seed; `anchor`: the study's latency anchor (`Anchor.to_attrs`), whose spread is checked."""
    spec = cfg.confirm
    n = spec.seeds if seeds is None else seeds
    steps = steps or spec.steps or (cfg.rungs.steps[-1] if cfg.rungs else cfg.recipe().steps)
    if not steps:
        raise ConfigError("confirm.steps", "is needed when the evaluator's budget is not in steps")
    if n < 1:
        raise ConfigError("--seeds", f"must be >= 1, got {n}")
    first = cfg.recipe().seed if first_seed is None else first_seed
    measured, limit = latency_band(rs), spec.max_latency_band
    settings = Settings(tuple(range(first, first + n)), steps, spec.margin if margin is None else margin,
                        min(measured, limit), measured, limit, timing_spread((anchor or {}).get("latency")))
    if warning := latency_warning(settings.to_dict()):
        log.warning("%s", warning)
    return settings


def runs_needed(pairs: list[Pair], seeds) -> list[tuple[ArchConfig, int]]:
    """Every (arm, seed) the pairs need, once each, in the pairs' order."""
    arms = list({a.config_hash(): a for p in pairs for a in (p.moe, p.dense)}.values())
    return [(arch, seed) for seed in seeds for arch in arms]


def search_runs(rs: list[TrialRecord], cfg: StudyConfig, settings: Settings) -> list[ConfirmRun]:
    """The search's own runs that are confirmation runs already: a dense trial trained to the top rung with the
    study's recipe is seed `recipe.seed` of its arm at those steps (pausing at rungs changes no weight, and a
    dense arm starts from its seed's weights as the search's did). An MoE's is not: its confirmation run
    starts from its twin's weights."""
    top = cfg.rungs.steps[-1] if cfg.rungs else None
    seed = cfg.recipe().seed
    return [ConfirmRun(r.arch, seed, settings.steps, r.metrics.accuracy, r.val_correct, r.metrics.train_time_s)
            for r in rs if r.status == "complete" and r.duplicate_of is None and r.kind == "dense"
            and r.val_correct is not None and r.rung == settings.steps == top and seed in settings.seeds]


def twin_init(arch: ArchConfig, seed: int) -> dict | None:
    """An MoE's initial weights where it shares them with its twin: the twin built with the same seed."""
    if not arch.is_moe:
        return None
    torch.manual_seed(seed)
    return build_model(arch.dense()).state_dict()


def arm_recipe(recipe, seed: int, steps: int):
    """The search's recipe for one confirmation run: `steps` steps, seed `seed` for weights and batches, one
    evaluation at the end."""
    return dataclasses.replace(recipe, seed=seed, data_seed=None, steps=steps, epochs=None, seconds=None,
                               eval_every=steps)


def train_arm(ctx, arch: ArchConfig, seed: int, steps: int) -> ConfirmRun:
    """One confirmation run of one arm (`ctx`: the study's `nas.trial.StudyContext`)."""
    from nas import trainer
    groups = ctx.groups_for(arch)
    result = trainer.train(arch, ctx.dataset, arm_recipe(ctx.recipe, seed, steps), superclasses=groups,
                           init_from=twin_init(arch, seed))
    correct = per_image_correct(result.model, ctx.dataset)
    return ConfirmRun(arch, seed, steps, float(correct.mean()), correct, result.wall_time_s)


_worker_ctx = None  # a pool worker's study context, built once per process


def _init_worker(cfg_dict: dict, workers: int, parent_pid: int) -> None:
    from nas.trial import build_context

    global _worker_ctx
    die_with_parent(parent_pid)  # a confirm killed with -9 must not leave its pool training, then blocked for ever
    cfg = dataclasses.replace(StudyConfig.from_dict(cfg_dict), workers=workers)  # shares the cores out
    _worker_ctx = build_context(cfg)


def _run_in_worker(arch_yaml: str, seed: int, steps: int) -> ConfirmRun:
    return train_arm(_worker_ctx, ArchConfig.from_yaml(arch_yaml), seed, steps)


# ---------------------------------------------------------------- the stage


def companion(study: optuna.Study) -> optuna.Study:
    """The confirm study of `study`, in the same storage, created on first use."""
    with trial_store.optuna_verbosity():  # not "created" / "using an existing study" each time
        return optuna.create_study(study_name=records.confirm_study_name(study.study_name),
                                   storage=trial_store.storage_of(study), direction="maximize", load_if_exists=True)


def stored_runs(confirm_study: optuna.Study) -> dict[str, ConfirmRun]:
    done = confirm_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return {run.key: run for run in map(records.read_confirm_run, done)}


def store_run(confirm_study: optuna.Study, run: ConfirmRun) -> None:
    confirm_study.add_trial(optuna.trial.create_trial(value=run.accuracy, user_attrs=records.confirm_run_attrs(run)))


def compare(pairs: list[Pair], runs: dict[str, ConfirmRun], settings: Settings) -> list[stats.PairedResult]:
    """Each pair's paired statistics over the seeds, Holm-adjusted over all pairs."""
    results = []
    for p in pairs:
        arms = [np.stack([runs[records.run_key(a, s, settings.steps)].correct for s in settings.seeds])
                for a in (p.moe, p.dense)]
        results.append(stats.paired(*arms, name=p.name, cost=p.cost, margin=settings.margin))
    return stats.holm_adjusted(results)


class Claims:
    """Confirmation runs claimed like trials, so that launchers sharing one storage train each key once: a
    claim is a RUNNING trial of the companion study naming its key, its worker and a lease (renewed every
    `interval` s, as `nas.trial_store.lease` does for trials); a claimed run's result is stored in its own trial. Claims
    are taken under `lock` (the study lock across launchers); a dead worker's claim is failed and taken anew."""

    def __init__(self, target: optuna.Study, lock, interval: float):
        self.target, self.lock, self.interval = target, lock, interval
        self.held: dict[int, optuna.Trial] = {}
        self.guard = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew, daemon=True, name="confirm-leases")
        self.thread.start()

    def _renew(self) -> None:
        while not self.stop.wait(self.interval):
            with self.guard:
                for trial in self.held.values():
                    try:
                        trial_store.renew_lease(trial, liveness.lease_until(self.interval))
                    except Exception as error:  # noqa: BLE001 - any storage failure: try again next interval
                        log.warning("confirm run %d: lease renewal failed: %s", trial.number, error)

    def take(self, wanted: dict[str, tuple[ArchConfig, int]]) -> tuple[optuna.Trial, ArchConfig, int] | None:
        """Claim the first run of `wanted` (key -> arm, seed) that no launcher has stored or holds; None when
        there is none to claim now."""
        with self.lock():
            busy = set()
            for frozen in self.target.get_trials(deepcopy=False):
                key = frozen.user_attrs.get("run_key", frozen.user_attrs.get(CLAIM_ATTR))
                if frozen.state == TrialState.COMPLETE:
                    busy.add(key)
                elif frozen.state == TrialState.RUNNING and not self._reclaim_if_dead(frozen):
                    busy.add(key)
            key = next((k for k in wanted if k not in busy), None)
            if key is None:
                return None
            trial = self.target.ask()
            for name, value in ((CLAIM_ATTR, key), ("worker", liveness.worker_id()),
                                (records.LEASE_ATTR, liveness.lease_until(self.interval))):
                trial.set_user_attr(name, value)
        with self.guard:
            self.held[trial.number] = trial
        return (trial, *wanted[key])

    def _reclaim_if_dead(self, frozen) -> bool:
        claim = TrialRecord(number=frozen.number, state=frozen.state, worker=frozen.user_attrs.get("worker"),
                            lease_until=frozen.user_attrs.get(records.LEASE_ATTR),
                            started=frozen.datetime_start.timestamp() if frozen.datetime_start else None)
        if not liveness.is_dead(claim, now=time.time(), grace_s=LEASE_INTERVALS * self.interval):
            return False
        log.warning("confirm run %d: its worker %s died; the run is claimed again", frozen.number, claim.worker)
        self.target.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
        return True

    def finish(self, trial: optuna.Trial, run: ConfirmRun | None) -> None:
        """Store `run` in its claim's trial; None: give the claim up (failed, so another launcher takes it)."""
        with self.guard:  # no renewal of a trial being finished
            del self.held[trial.number]
        if run is None:
            self.target.tell(trial, state=TrialState.FAIL)
            return
        for name, value in records.confirm_run_attrs(run).items():
            trial.set_user_attr(name, value)
        self.target.tell(trial, run.accuracy)

    def close(self) -> None:
        for trial in list(self.held.values()):
            self.finish(trial, None)
        self.stop.set()
        self.thread.join()


def run_missing(study: optuna.Study, cfg: StudyConfig, pairs: list[Pair], settings: Settings, *, workers: int = 1,
                progress: bool = False, storage=None) -> dict[str, ConfirmRun]:
    """Every run `pairs` need with `settings`, by key: those the companion study holds, and the missing ones,
    trained (in a pool of `workers` processes when > 1) and stored one by one as they finish. Launchers that
    share the study's `storage` (a `nas.storage.StorageURL`) share the work: each run is trained once."""
    from tqdm.auto import tqdm

    from nas.storage import study_lock

    target = companion(study)
    lock = (lambda: study_lock(storage, target.study_name)) if storage is not None else contextlib.nullcontext
    needed = runs_needed(pairs, settings.seeds)
    wanted = {records.run_key(a, s, settings.steps): (a, s) for a, s in needed}
    with lock():
        runs = stored_runs(target)
        for run in search_runs(records.read_all(study), cfg, settings):  # seed 0 of dense arms, trained already
            if run.key in wanted and run.key not in runs:
                store_run(target, run)
                runs[run.key] = run
    log.info("confirm %s: %d pairs, %d runs (%d stored)", study.study_name, len(pairs), len(wanted),
             len(set(runs) & set(wanted)))
    bar = tqdm(total=len(set(wanted) - set(runs)), desc=f"{study.study_name} confirm", unit="run",
               disable=not progress)
    claims = Claims(target, lock, cfg.heartbeat_interval)
    try:
        if workers <= 1:
            _train_claimed_here(cfg, claims, wanted, runs, bar, settings.steps)
        else:
            _train_claimed_in_pool(cfg, claims, wanted, runs, bar, settings.steps, workers)
    finally:
        claims.close()
        bar.close()
    return {key: run for key, run in stored_runs(target).items() if key in wanted}


def _missing(claims: Claims, wanted: dict, runs: dict) -> dict:
    """The wanted runs not stored yet (by any launcher: `runs` is refreshed from the storage)."""
    runs.update(stored_runs(claims.target))
    return {key: arm for key, arm in wanted.items() if key not in runs}


def _wait_for_others(claims: Claims, wanted: dict, runs: dict) -> bool:
    """Nothing left to claim: whether runs other launchers hold are still missing (after a pause)."""
    if not _missing(claims, wanted, runs):
        return False
    time.sleep(min(1.0, claims.interval))
    return True


def _train_claimed_here(cfg: StudyConfig, claims: Claims, wanted: dict, runs: dict, bar, steps: int) -> None:
    from nas.trial import build_context

    ctx = None
    while True:
        claimed = claims.take(_missing(claims, wanted, runs))
        if claimed is None:
            if _wait_for_others(claims, wanted, runs):
                continue
            return
        trial, arch, seed = claimed
        ctx = ctx or build_context(cfg)
        run = None
        try:
            run = train_arm(ctx, arch, seed, steps)
        finally:
            claims.finish(trial, run)
        runs[run.key] = run
        bar.update(1)


def _train_claimed_in_pool(cfg: StudyConfig, claims: Claims, wanted: dict, runs: dict, bar, steps: int,
                           workers: int) -> None:
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(cfg.to_dict(), workers, os.getpid())) as pool:
        try:
            _feed_pool(pool, claims, wanted, runs, bar, steps, workers)
        except KeyboardInterrupt:  # SIGTERM reaches this launcher alone, and the pool's exit waits for its arms
            for worker in multiprocessing.active_children():
                worker.terminate()
            raise


def _feed_pool(pool: ProcessPoolExecutor, claims: Claims, wanted: dict, runs: dict, bar, steps: int,
               workers: int) -> None:
    running = {}
    while True:
        while len(running) < workers:
            claimed = claims.take(_missing(claims, wanted, runs))  # its own claims are taken too
            if claimed is None:
                break
            trial, arch, seed = claimed
            running[pool.submit(_run_in_worker, arch.to_yaml(), seed, steps)] = trial
        if not running:
            if _wait_for_others(claims, wanted, runs):
                continue
            return
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            trial = running.pop(future)
            run = future.result()  # a failed run raises here; close() gives the other claims up
            claims.finish(trial, run)
            runs[run.key] = run
            bar.update(1)


def confirm(study: optuna.Study, cfg: StudyConfig, *, seeds: int | None = None, pairs: int | None = None,
            steps: int | None = None, margin: float | None = None, workers: int = 1,
            progress: bool = False, storage=None) -> ConfirmRecord:
    """Confirm the top MoEs of `study` (run with `cfg`) against dense; stores and returns the record.
    `storage`: the study's `nas.storage.StorageURL`, whose study lock launchers sharing it claim runs under."""
    rs = records.read_all(study)
    settings = settings_for(cfg, rs, seeds=seeds, steps=steps, margin=margin, anchor=records.read_study(study).anchor)
    chosen = select_pairs(rs, cfg.confirm.pairs if pairs is None else pairs, cfg.objectives, band=settings.band)
    runs = run_missing(study, cfg, chosen, settings, workers=workers, progress=progress, storage=storage)
    results = compare(chosen, runs, settings)
    record = ConfirmRecord(settings.to_dict(), [_with_accuracies(p, runs, settings) for p in chosen],
                           [r.to_dict() for r in results])
    records.write_confirm(companion(study), record)
    from nas.latency import verify_front

    verify_front(study, cfg)  # profiler.latency: predicted+verify measures every confirmed arm
    return record


def _with_accuracies(pair: Pair, runs: dict[str, ConfirmRun], settings: Settings) -> dict:
    """The pair's dict with each arm's accuracy per seed, for the report's intervals."""
    accuracy = {role: [runs[records.run_key(a, s, settings.steps)].accuracy for s in settings.seeds]
                for role, a in (("moe", pair.moe), ("dense", pair.dense))}
    return {**pair.to_dict(), "moe_accuracies": accuracy["moe"], "dense_accuracies": accuracy["dense"]}


__all__ = ["Settings", "arm_recipe", "companion", "compare", "confirm", "run_missing", "runs_needed", "settings_for",
           "stored_runs", "train_arm", "twin_init"]
