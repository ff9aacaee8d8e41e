"""Opening a search study: its sampler, creating or resuming it, and refusing a resume whose config changes what
its trials mean (run settings such as n_trials or workers may change freely)."""

from __future__ import annotations

import dataclasses
import logging

import optuna

from nas import record as records
from nas.config import ConfigError, first_line
from nas.storage import StorageError, StorageURL, make_storage
from nas.study import StudyConfig

log = logging.getLogger("vmoe_nas.search")


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
    space, objectives, constraints, evaluator and its rungs, profiler) is refused, naming the fields, unless
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
    check_stored_trials(study, cfg)
    if study.metric_names is None:  # optuna-dashboard names objectives by these, not "Objective 0, 1, ..."
        study.set_metric_names([objective.metric for objective in cfg.study_objectives])
    return study


def check_stored_trials(study: optuna.Study, cfg: StudyConfig) -> None:
    """Refuse to resume a study whose stored trials (written by record version 5 or before) this version cannot
    go on from, saying what to do."""
    trials = study.get_trials(deepcopy=False)
    if cfg.sampler == "tpe" and len(cfg.directions) > 1 and any(t.intermediate_values for t in trials):
        raise ConfigError("sampler", f"study {cfg.study_name!r} keeps its rung accuracies as intermediate values "
                          "(record versions 4-5), which Optuna's TPE reads as a single objective's: every trial of "
                          "this multi-objective study would fail. Resume it with --sampler nsga2 (or random), or "
                          "start a new study (--study-name)")
    if cfg.evaluator_kind == "supernet" and any(t.user_attrs.get("evaluator") == "supernet"
                                                and t.user_attrs.get(records.VERSION_ATTR, 1) < 6 for t in trials):
        raise ConfigError("evaluator", f"study {cfg.study_name!r} was scored by a supernet whose blocks were "
                          "shared across patch sizes (record version 5 and before; it ranked architectures unlike "
                          "standalone training), and its trials would not compare with those of the supernet of a "
                          "trunk per patch size: start a new study (--study-name)")


# What may differ when a study resumes: how it runs, not what its trials mean. Everything else (data, space,
# objectives, constraints, evaluator and its rungs, profiler) changed mid-study would mix incomparable results.
RUN_SETTINGS = ("n_trials", "timeout", "workers", "storage", "results_dir", "heartbeat_interval", "max_retries",
                "trial_timeout", "trial_memory_mb", "sampler", "seed", "enqueue", "data.data_dir", "confirm")


def config_changes(stored: dict, current: StudyConfig) -> list[str]:
    """The fields (dotted) of `current` that differ from the stored config of a study, run settings aside."""
    try:
        before = _flat(_comparable(StudyConfig.from_dict(stored)))
    except ConfigError as error:  # written by another version, or by hand: compare what can be read
        log.debug("stored study config does not load (%s); comparing it as stored", error)
        before = _flat(stored)
    after = _flat(_comparable(current))
    return sorted(key for key in before.keys() | after.keys()
                  if before.get(key) != after.get(key) and not key.startswith(RUN_SETTINGS))


def _comparable(cfg: StudyConfig) -> dict:
    # The recipe with its defaults filled in, and the evaluator's kind and supernet options.
    supernet = dataclasses.asdict(cfg.supernet) if cfg.evaluator_kind == "supernet" else {}
    extra = {"kind": cfg.evaluator_kind, **supernet}
    return {**cfg.to_dict(), "evaluator": {**cfg.recipe().to_dict(), **extra}}


def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


__all__ = ["RUN_SETTINGS", "check_stored_trials", "config_changes", "make_sampler", "open_study"]
