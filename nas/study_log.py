"""Where a study run's logging goes: the log file gets vmoe-nas's and Optuna's records, the console only the
progress bar and warnings (in the launcher, its workers, and a budgeted trial's child process alike)."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning

from nas.trial_store import optuna_verbosity


@contextmanager
def study_logging(path: Path):
    """For the duration of a study run: the log file gets vmoe-nas's and Optuna's records, the console
    only the progress bar and warnings, and Optuna's experimental-feature warnings (multivariate and
    grouped TPE, metric names: what we want) are silenced. All undone on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in ("vmoe_nas", "optuna")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
    logging.getLogger("vmoe_nas").setLevel(logging.INFO)
    with optuna_verbosity(optuna.logging.WARNING):
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


__all__ = ["study_logging"]
