"""The confirmation stage: does an MoE of the search beat dense, over seeds, beyond noise?

    select pairs -> list the runs they need -> train the missing ones -> paired statistics -> store

Pairs: for each of the top K MoEs of the MoE front (by accuracy), (a) its FLOPs twin, the same architecture
with E=0 (equal FLOPs at k=1), (b) the most accurate dense trial of no more FLOPs, (c) the most accurate dense
trial of no more latency, within a tie band measured on the study: the median over its trials of the relative
spread of one timing, (p90 - p10) / (2.563 median), the interdecile range as a normal sd (robust to the rare
slow calls that inflate `latency_cv`), so two latencies closer than a timing's noise count as equal. (b) is
left out where it is the twin. Every arm is retrained with the same n seeds at the search's top-rung budget.

Common random numbers: seed i of every arm is recipe seed i, so the same batches in the same order (the
trainer derives them from (data seed, step) only), and an MoE starts from its twin's initial weights of that
seed in every parameter they share by name and shape (all but experts and router): against its twin, a
pair differs at step 0 only in what makes it an MoE. The search's own top-rung run of a dense arm is that
arm's run of the recipe seed (the search keeps its per-image correctness; pausing at rungs changes no
weight), so it is not trained again; an MoE's is not reused, since it did not start from its twin.

Storage: a companion study `<study>-confirm` in the study's storage, one COMPLETE trial per (arm, seed,
steps) run (`nas.record.ConfirmRun`), the pairs and their `nas.stats.PairedResult`s as its user attributes.
A killed confirm resumes: runs already stored are skipped. Runs go through a process pool with `workers > 1`;
only this process writes to the storage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from nas import record as records
from nas import stats
from nas.objectives import objectives_for
from nas.record import ConfirmRecord, ConfirmRun, TrialRecord
from nas.study import StudyConfig
from nas.trial import per_image_correct
from search_spaces import ArchConfig, ConfigError, build_model

log = logging.getLogger("vmoe_nas.confirm")
COSTS = {"twin": "flops", "flops": "flops", "latency": "latency"}  # comparator -> the cost its arms are matched on


@dataclass(frozen=True)
class Pair:
    """One comparison: an MoE of the search and a dense comparator, matched on one cost."""

    moe: ArchConfig
    dense: ArchConfig
    comparator: str  # "twin" (same architecture, E=0), "flops" or "latency" (the best dense of no more cost)
    moe_trial: int
    dense_trial: int | None  # None: the twin was not a trial of the search
    moe_costs: dict  # {"flops": ..., "latency_ms": ...} as the search measured them (None: not measured)
    dense_costs: dict

    @property
    def cost(self) -> str:
        return COSTS[self.comparator]

    @property
    def name(self) -> str:
        return f"{self.moe.name} vs {self.dense.name} ({self.comparator})"

    def to_dict(self) -> dict:
        return {"moe_yaml": self.moe.to_yaml(), "dense_yaml": self.dense.to_yaml(), "comparator": self.comparator,
                "cost": self.cost, "moe_trial": self.moe_trial, "dense_trial": self.dense_trial,
                "moe_name": self.moe.name, "dense_name": self.dense.name, "moe_costs": self.moe_costs,
                "dense_costs": self.dense_costs}


def _costs(r: TrialRecord) -> dict:
    return {"flops": r.metrics.flops, "latency_ms": r.metrics.latency_ms}


INTERDECILE_SDS = 2 * 1.2816  # p90 - p10 of a normal distribution, in standard deviations


def latency_band(rs: list[TrialRecord]) -> float:
    """The latency tie band: the median over measured trials of a timing's robust relative spread (0: none)."""
    spreads = []
    for r in rs:
        t = (r.profile or {}).get("latency_ms") or {}
        if t.get("median") and t.get("p10") is not None and t.get("p90") is not None:
            spreads.append((t["p90"] - t["p10"]) / (INTERDECILE_SDS * t["median"]))
    return float(np.median(spreads)) if spreads else 0.0


def eligible(rs: list[TrialRecord]) -> list[TrialRecord]:
    """Trials that completed the top rung, feasible, not re-runs: the ones comparable with each other."""
    return [r for r in rs if r.status == "complete" and r.duplicate_of is None and r.metrics.accuracy is not None]


def top_moes(rs: list[TrialRecord], k: int, objectives: list[str]) -> list[TrialRecord]:
    """The top `k` MoEs by the MoE fronts of the study's objectives: the front's, most accurate first, then
    (where the front holds fewer than `k`) the next front's, so a study whose best MoE dominates the others
    still confirms `k`."""
    from nas.pareto import non_dominated_rank

    objs = objectives_for(objectives)
    moes = [r for r in eligible(rs) if r.kind == "moe" and all(r.metrics.value(o) is not None for o in objs)]
    if not moes:
        return []
    values = np.array([[r.metrics.value(o) for o in objs] for r in moes], dtype=float)
    ranks = non_dominated_rank(values, [o.maximize for o in objs])
    order = sorted(range(len(moes)), key=lambda i: (ranks[i], -moes[i].metrics.accuracy, moes[i].number))
    return [moes[i] for i in order[:k]]


def best_dense(dense: list[TrialRecord], metric: str, limit: float | None) -> TrialRecord | None:
    """The most accurate dense trial whose `metric` is at most `limit` (ties: the cheaper, the earlier)."""
    if limit is None:
        return None
    fits = [r for r in dense if getattr(r.metrics, metric) is not None and getattr(r.metrics, metric) <= limit]
    return min(fits, key=lambda r: (-r.metrics.accuracy, getattr(r.metrics, metric), r.number), default=None)


def select_pairs(rs: list[TrialRecord], k: int, objectives: list[str], *, band: float | None = None) -> list[Pair]:
    """The pairs to confirm (see the module docstring); `band` defaults to `latency_band(rs)`."""
    band = latency_band(rs) if band is None else band
    dense = [r for r in eligible(rs) if r.kind == "dense"]
    by_hash = {r.arch.config_hash(): r for r in dense}
    pairs = []
    for m in top_moes(rs, k, objectives):
        twin = m.arch.dense()
        twin_trial = by_hash.get(twin.config_hash())
        twin_costs = _costs(twin_trial) if twin_trial else {"flops": _flops(twin), "latency_ms": None}
        pairs.append(Pair(m.arch, twin, "twin", m.number, twin_trial and twin_trial.number, _costs(m), twin_costs))
        latency = m.metrics.latency_ms
        for comparator, found in (("flops", best_dense(dense, "flops", m.metrics.flops)),
                                  ("latency", best_dense(dense, "latency_ms", latency and latency * (1 + band)))):
            if found is None or (comparator == "flops" and found.arch == twin):
                continue
            pairs.append(Pair(m.arch, found.arch, comparator, m.number, found.number, _costs(m), _costs(found)))
    return pairs


def _flops(arch: ArchConfig) -> int:
    from profilers import count_flops

    return count_flops(arch).total


# ---------------------------------------------------------------- runs


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...]
    steps: int
    margin: float
    band: float

    def to_dict(self) -> dict:
        return {"seeds": list(self.seeds), "steps": self.steps, "margin": self.margin, "latency_band": self.band}


def settings_for(cfg: StudyConfig, rs: list[TrialRecord], *, seeds: int | None = None, steps: int | None = None,
                 margin: float | None = None, first_seed: int | None = None) -> Settings:
    """The confirm section of `cfg` with any given override; seeds start at `first_seed`, by default the
    search's recipe seed."""
    spec = cfg.confirm
    n = spec.seeds if seeds is None else seeds
    steps = steps or spec.steps or (cfg.rungs.steps[-1] if cfg.rungs else cfg.recipe().steps)
    if not steps:
        raise ConfigError("confirm.steps", "is needed when the evaluator's budget is not in steps")
    if n < 1:
        raise ConfigError("--seeds", f"must be >= 1, got {n}")
    first = cfg.recipe().seed if first_seed is None else first_seed
    return Settings(tuple(range(first, first + n)), steps, spec.margin if margin is None else margin,
                    latency_band(rs))


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
    from nas.trial import routes_on_superclasses

    groups = ctx.superclasses.get(arch.moe.num_experts) if routes_on_superclasses(arch) else None
    result = trainer.train(arch, ctx.dataset, arm_recipe(ctx.recipe, seed, steps), superclasses=groups,
                           init_from=twin_init(arch, seed))
    correct = per_image_correct(result.model, ctx.dataset)
    return ConfirmRun(arch, seed, steps, float(correct.mean()), correct, result.wall_time_s)


_worker_ctx = None  # a pool worker's study context, built once per process


def _init_worker(cfg_dict: dict, workers: int) -> None:
    from nas.trial import build_context

    global _worker_ctx
    cfg = dataclasses.replace(StudyConfig.from_dict(cfg_dict), workers=workers)  # shares the cores out
    _worker_ctx = build_context(cfg)


def _run_in_worker(arch_yaml: str, seed: int, steps: int) -> ConfirmRun:
    return train_arm(_worker_ctx, ArchConfig.from_yaml(arch_yaml), seed, steps)


# ---------------------------------------------------------------- the stage


def companion(study: optuna.Study) -> optuna.Study:
    """The confirm study of `study`, in the same storage, created on first use."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "created" / "using an existing study" each time
    try:
        return optuna.create_study(study_name=records.confirm_study_name(study.study_name), storage=study._storage,
                                   direction="maximize", load_if_exists=True)
    finally:
        optuna.logging.set_verbosity(verbosity)


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
    return stats.study(results)


def run_missing(study: optuna.Study, cfg: StudyConfig, pairs: list[Pair], settings: Settings, *, workers: int = 1,
                progress: bool = False) -> dict[str, ConfirmRun]:
    """Every run `pairs` need with `settings`, by key: those the companion study holds, and the missing ones,
    trained (in a pool of `workers` processes when > 1) and stored one by one as they finish."""
    from tqdm.auto import tqdm

    from nas.trial import build_context

    target = companion(study)
    runs = stored_runs(target)
    needed = runs_needed(pairs, settings.seeds)
    wanted = {records.run_key(a, s, settings.steps) for a, s in needed}
    for run in search_runs(records.read_all(study), cfg, settings):  # seed 0 of dense arms, trained already
        if run.key in wanted and run.key not in runs:
            store_run(target, run)
            runs[run.key] = run
    missing = [(a, s) for a, s in needed if records.run_key(a, s, settings.steps) not in runs]
    log.info("confirm %s: %d pairs, %d runs (%d stored)", study.study_name, len(pairs), len(missing) + len(runs),
             len(runs))

    def keep(run: ConfirmRun) -> None:
        store_run(target, run)
        runs[run.key] = run
        bar.update(1)

    bar = tqdm(total=len(missing), desc=f"{study.study_name} confirm", unit="run", disable=not progress)
    if missing and workers <= 1:
        ctx = build_context(cfg)
        for arch, seed in missing:
            keep(train_arm(ctx, arch, seed, settings.steps))
    elif missing:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                 initargs=(cfg.to_dict(), workers)) as pool:
            futures = [pool.submit(_run_in_worker, a.to_yaml(), s, settings.steps) for a, s in missing]
            for future in as_completed(futures):
                keep(future.result())
    bar.close()
    return runs


def confirm(study: optuna.Study, cfg: StudyConfig, *, seeds: int | None = None, pairs: int | None = None,
            steps: int | None = None, margin: float | None = None, workers: int = 1,
            progress: bool = False) -> ConfirmRecord:
    """Confirm the top MoEs of `study` (run with `cfg`) against dense; stores and returns the record."""
    rs = records.read_all(study)
    chosen = select_pairs(rs, cfg.confirm.pairs if pairs is None else pairs, cfg.objectives)
    settings = settings_for(cfg, rs, seeds=seeds, steps=steps, margin=margin)
    runs = run_missing(study, cfg, chosen, settings, workers=workers, progress=progress)
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


def arm_interval(accuracies: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t-interval; NaN for one seed) of one arm's accuracies over seeds."""
    mean, low, high = stats.t_interval(np.asarray(accuracies))
    return mean, (high - low) / 2 if math.isfinite(high) else math.nan


__all__ = ["COSTS", "INTERDECILE_SDS", "Pair", "Settings", "arm_interval", "arm_recipe", "best_dense", "companion",
           "compare", "confirm", "eligible", "latency_band", "run_missing", "runs_needed",
           "select_pairs", "settings_for", "stored_runs", "top_moes", "train_arm", "twin_init"]
