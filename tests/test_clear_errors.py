"""Clear errors (issue 22, items 13, 14, 18): a full disk, a damaged study file, a study where nothing
completed. Each is one line saying what happened, never a traceback or a NaN."""

import os

from optuna.trial import TrialState, create_trial
from pareto_trials import arch, study, trial

from nas.cli import main
from nas.record import TrialRecord, frozen_attrs


def test_pareto_of_a_study_file_with_garbage_inside_is_one_error(tmp_path, capsys):
    """Garbage bytes inside study.db: `vmoe-nas pareto` printed a StorageInternalError traceback."""
    folder = tmp_path / "results" / "hand"
    folder.mkdir(parents=True)
    path = folder / "study.db"
    study([trial("dense", 0.70, 100, 1.0), trial("moe", 0.78, 100, 1.2)] * 20, storage=f"sqlite:///{path}")
    with open(path, "r+b") as file:
        file.seek(path.stat().st_size // 2)
        file.write(os.urandom(4096))
    assert main(["pareto", "--study", "hand", "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {path} is damaged" in err and "malformed" in err


def failed(reason: str, with_arch: bool = True):
    record = TrialRecord(arch=arch("moe") if with_arch else None, reason=reason)
    return create_trial(state=TrialState.FAIL, user_attrs=frozen_attrs(record))


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
