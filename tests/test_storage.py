"""Storage URLs, the study lock, loading a stored study, and studies written before the trial record."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import optuna
import pytest
from concurrent_open import open_at_once
from pareto_trials import study, trial

from nas import record as records
from nas import trial_store
from nas.pareto import analyze
from nas.storage import StorageError, existing_storage, load_study, make_storage, parse_storage, study_lock

FIXTURES = Path(__file__).parent / "fixtures"


def test_a_storage_url_is_parsed_once_and_shown_without_its_password():
    pg = parse_storage("postgresql://vmoe:secret@db.example:5432/nas")
    assert (pg.kind, pg.path, pg.lock_path("queue")) == ("postgresql", None, None)
    assert pg.sqlalchemy_url == "postgresql+psycopg://vmoe:secret@db.example:5432/nas"
    assert pg.redacted == "postgresql://***@db.example:5432/nas" and "secret" not in str(pg)
    journal = parse_storage("journal:/tmp/s/journal.log")
    assert (journal.kind, journal.path) == ("journal", Path("/tmp/s/journal.log"))
    # Not journal.log.lock: Optuna's journal lock uses (and deletes) that file.
    assert journal.lock_path("queue") == Path("/tmp/s/journal.log.queue-lock")
    assert parse_storage("sqlite:///x/study.db").path == Path("x/study.db")
    assert parse_storage("sqlite:///:memory:").path is None  # no file, so no lock file named ':memory:...'
    with pytest.raises(StorageError, match="not a storage URL"):
        parse_storage("results/study.db")


def test_the_study_lock_is_not_the_journal_lock_file(tmp_path):
    url = parse_storage(f"journal:{tmp_path / 'journal.log'}")
    with study_lock(url, "s"):
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(url.path)))
        optuna.create_study(study_name="s", storage=storage)  # takes Optuna's own lock: no wait, no clash
    assert url.lock_path("queue").exists()


def test_a_study_folder_storage_prefers_the_journal_and_names_the_folder_when_missing(tmp_path):
    with pytest.raises(StorageError, match=str(tmp_path / "results" / "nope")):
        load_study("nope", results_dir=tmp_path / "results")
    folder = tmp_path / "results" / "s"
    folder.mkdir(parents=True)
    (folder / "study.db").touch()
    assert existing_storage(folder).url == f"sqlite:///{folder / 'study.db'}"
    (folder / "journal.log").touch()
    assert existing_storage(folder).url == f"journal:{folder / 'journal.log'}"


def test_load_study_reads_a_stored_study_and_names_the_ones_there(tmp_path):
    url = f"sqlite:///{tmp_path / 'results' / 'hand' / 'study.db'}"
    (tmp_path / "results" / "hand").mkdir(parents=True)
    study([trial("dense", 0.8, 100, 1.0)], storage=url)
    loaded = load_study("hand", results_dir=tmp_path / "results")
    assert len(loaded.trials) == 1 and loaded.user_attrs["objectives"] == ["accuracy", "flops", "latency"]
    with pytest.raises(StorageError, match="it holds: hand"):
        load_study("other", storage=url)
    with pytest.raises(StorageError, match="no study storage at"):
        load_study("hand", storage=f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stored", ["v1-sqlite.db", "v1-journal.log"])
def test_a_study_written_before_the_trial_record_still_opens(tmp_path, stored):
    """Fixtures written by the search before records were versioned: a dense trial, a failed MoE, two
    infeasible trials and a duplicate (max_params constraint, objectives accuracy, flops, latency)."""
    shutil.copy(FIXTURES / stored, tmp_path / stored)
    url = f"sqlite:///{tmp_path / stored}" if stored.endswith(".db") else f"journal:{tmp_path / stored}"
    s = load_study(stored.split(".")[0], storage=url)
    got = records.read_all(s)
    assert [r.status for r in got] == ["complete", "failed", "infeasible", "complete", "infeasible"]
    assert [r.kind for r in got] == ["dense", "moe", "dense", "dense", "moe"]
    assert got[1].reason == "RuntimeError: forced failure" and got[3].duplicate_of == 0
    assert got[0].metrics.accuracy == s.trials[0].values[0] and got[0].rung == got[0].train["steps"] == 12
    assert got[0].arch.config_hash() == s.trials[0].user_attrs["config_hash"]
    assert records.read_study(s).anchor["name"] == "vit-2x16h2-p4-16-r2"
    analysis = analyze(s)
    assert analysis.trials["eligible"].tolist() == [True, False, False, False, False]
    assert [o.name for o in analysis.objectives] == ["accuracy", "flops", "latency"]


def test_per_image_correctness_is_one_attribute_a_reader_never_sees_half_of(tmp_path):
    """Workers read each other's running trials while the storage writes attributes one at a time: a trial
    read between two writes must still read (CI once saw `KeyError: 'n_val'` from a worker's reclaim)."""
    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    correct = np.array([True, False, True, True, False, False, True, False, True])
    running = s.ask()
    trial_store.write(running, records.TrialRecord(number=running.number, val_correct=correct))
    assert [k for k in running.user_attrs if "correct" in k or k == "n_val"] == ["val_correct"]
    (got,) = records.read_all(s)
    assert (got.val_correct == correct).all()

    bits = records.pack_bits(correct)  # version 2: two attributes; a worker may have written only the first
    half_written = s.ask()
    half_written.set_user_attr("val_correct_bits", bits)
    assert records.read_all(s)[1].val_correct is None
    half_written.set_user_attr("n_val", len(correct))
    assert (records.read_all(s)[1].val_correct == correct).all()


@pytest.mark.slow
def test_workers_opening_a_new_sqlite_file_at_once_all_open_it(tmp_path):
    """Optuna creates its tables and stamps its schema unguarded: without the schema lock, 6 processes at
    once on a new file fail with "table studies already exists" or "UNIQUE constraint failed"."""
    assert open_at_once(f"sqlite:///{tmp_path / 'study.db'}") == [""] * 6
    assert optuna.get_all_study_summaries(make_storage(f"sqlite:///{tmp_path / 'study.db'}")) == []


@pytest.fixture
def shared_folder():
    """A folder other users may enter (pytest's tmp_path is private to its user)."""
    folder = Path(tempfile.mkdtemp(prefix="vmoe-shared-"))
    folder.chmod(0o755)
    yield folder
    (folder / "s").chmod(0o755)  # the test made it read-only
    shutil.rmtree(folder)


@pytest.mark.slow
def test_a_reader_who_cannot_write_the_study_folder_still_loads_it(shared_folder):
    """Report, export and the dashboard only read: the schema lock must not need write access to the
    folder, nor to a lock file another user's search made (as root, the reader is `nobody`)."""
    folder = shared_folder
    url = f"sqlite:///{folder / 's' / 'study.db'}"
    optuna.create_study(study_name="s", storage=make_storage(url)).optimize(lambda t: 1.0, n_trials=2)
    assert (folder / "s" / "study.db.schema-lock").exists()
    (folder / "s").chmod(0o555)
    read = [sys.executable, "-c", f"from nas.storage import load_study; print(len(load_study('s', storage={url!r})"
            ".trials))"]
    as_reader = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []
    if as_reader and not shutil.which("setpriv") or subprocess.run(
            as_reader + [sys.executable, "-c", "import nas"], cwd=Path(__file__).parents[1]).returncode:
        pytest.skip("cannot run as user nobody here (no setpriv, or a checkout only root may read)")
    result = subprocess.run(as_reader + read, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "2", result.stderr
    (folder / "s" / "study.db.schema-lock").unlink()  # and where no search left one, none is made
    result = subprocess.run(as_reader + read, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "2", result.stderr
