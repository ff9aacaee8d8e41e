"""Clear errors (issue 22, items 13, 14, 18): a full disk, a damaged study file, a study where nothing
completed. Each is one line saying what happened, never a traceback or a NaN."""

import errno
import re
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy
from optuna.trial import TrialState, create_trial
from pareto_trials import arch, study, trial
from test_faults import study_yaml

import nas.runner
from nas import record as records
from nas import search
from nas.cli import main
from nas.record import TrialRecord, user_attrs
from nas.storage import NoSpaceLeft, load_study
from nas.study import load_study_config
from nas.trial_store import RETRY_ATTR


def test_pareto_of_a_study_file_with_garbage_inside_is_one_error(tmp_path, capsys):
    """Garbage bytes inside study.db: `vmoe-nas pareto` printed a StorageInternalError traceback."""
    folder = tmp_path / "results" / "hand"
    folder.mkdir(parents=True)
    path = folder / "study.db"
    study([trial("dense", 0.70, 100, 1.0), trial("moe", 0.78, 100, 1.2)] * 20, storage=f"sqlite:///{path}")
    with open(path, "r+b") as file:
        file.seek(path.stat().st_size // 2)
        file.write(bytes(range(256)) * 16)  # what SQLite then says varies with the bytes hit
    assert main(["pareto", "--study", "hand", "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {path} is damaged" in err and "restore it from a copy" in err


def failed(reason: str, with_arch: bool = True):
    record = TrialRecord(arch=arch("moe") if with_arch else None, reason=reason)
    return create_trial(state=TrialState.FAIL, user_attrs=user_attrs(record))


def test_pareto_of_a_study_where_no_trial_completed_says_how_many_failed_and_why(tmp_path, capsys):
    """It printed hypervolume nan, and report.md said "Trials: none" while trials.csv listed failed trials."""
    folder = tmp_path / "results" / "hand"
    folder.mkdir(parents=True)
    s = study([], storage=f"sqlite:///{folder / 'study.db'}")
    for t in (failed("out of memory"), failed("out of memory"), failed("data: cannot read x.png", with_arch=False)):
        s.add_trial(t)
    assert main(["pareto", "--study", "hand", "--results-dir", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "no trial completed with every objective, so there is no front: 3 failed (2 x out of memory; " \
           "1 x data: cannot read x.png)" in out
    assert "nan" not in out
    report = (folder / "report.md").read_text()
    assert "Trials: 2 failed, 1 failed before sampling" in report and "3 failed (2 x out of memory" in report


def test_a_full_disk_while_writing_the_report_names_the_folder_and_leaves_no_partial_file(tmp_path, capsys,
                                                                                        monkeypatch):
    """The report writer raised a raw OSError and left a 266 KB .partial file."""
    folder = tmp_path / "results" / "hand"
    folder.mkdir(parents=True)
    study([trial("dense", 0.70, 100, 1.0), trial("moe", 0.78, 100, 1.2)], storage=f"sqlite:///{folder / 'study.db'}")
    real_write = Path.write_text

    def fills_the_disk(path, text, *args, **kwargs):
        if path.name.endswith(".partial") and "report.html" in path.name:
            real_write(path, text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fills_the_disk)
    assert main(["pareto", "--study", "hand", "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: no space left on {folder}: report.html was not written" in err
    assert not [p for p in folder.iterdir() if p.name.endswith(".partial")]


def test_a_full_disk_under_the_study_storage_says_no_space_left(tmp_path, monkeypatch):
    """SQLite's "database or disk is full" was reported as "storage became unreachable (invalid data in the
    commit)"."""
    cfg = load_study_config(study_yaml(tmp_path, "full", n_trials=1, steps=2))

    def disk_full(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("INSERT ...", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(search, "_work", disk_full)
    with pytest.raises(NoSpaceLeft, match=f"no space left on {re.escape(str(cfg.study_dir))}: the study storage"):
        search.run_worker(cfg)


def test_a_full_disk_during_a_trial_stops_the_worker_and_uses_no_retry(tmp_path, monkeypatch):
    """A trial that filled the disk was failed for good (an architecture's failure), or reclaimed later as a dead
    worker's, using a retry: the disk is the machine's problem, so the slot runs again when the study resumes."""
    cfg = load_study_config(study_yaml(tmp_path, "fills", n_trials=1, steps=2))

    def fills_the_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoint.pt"))

    monkeypatch.setattr(nas.runner, "train_to_rungs", fills_the_disk)
    with pytest.raises(NoSpaceLeft, match="no space left on"):
        search.run_search(cfg, progress=False)
    first = records.read_all(load_study("fills", results_dir=tmp_path / "results"))
    assert [(r.interrupted, r.reason.startswith("no space left")) for r in first] == [(True, True)]
    monkeypatch.undo()
    trials = search.run_search(cfg, progress=False).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert RETRY_ATTR not in trials[1].system_attrs  # a new run of the slot, not a retry of a failed architecture
