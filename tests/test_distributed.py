"""Several workers on one PostgreSQL study (a real server: `.ci/postgres.sh` starts one on loopback and CI
exports its URL as VMOE_NAS_POSTGRES_URL), with a worker killed mid-trial and the database lost."""

import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

import optuna
import pytest
import sqlalchemy
import yaml
from concurrent_open import open_at_once
from optuna.trial import TrialState

import nas.trainer
from nas import record as records
from nas.cli import main
from nas.storage import make_storage

POSTGRES = os.environ.get("VMOE_NAS_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not POSTGRES, reason="set VMOE_NAS_POSTGRES_URL (.ci/postgres.sh prints one)")


def study_file(tmp_path, name, n_trials, steps):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "study_name": name,
        "data": {"name": "synthetic", "limit": 600},
        "space": {"patch_sizes": [4], "depths": [2, 3], "widths": [16, 24], "head_width": 8, "mlp_ratios": [2.0],
                  "num_experts": [0, 4], "top_k": [1], "placements": ["last1"]},
        "objectives": ["accuracy", "flops"],
        "n_trials": n_trials,
        "evaluator": {"steps": steps, "batch_size": 32, "eval_every": steps, "num_threads": 1},
        "heartbeat_interval": 1,
        "max_retries": 1,
        "results_dir": str(tmp_path / "results"),
        "confirm": {"enabled": False},
    }))
    return str(path)


def worker(config, url):
    return subprocess.Popen([sys.executable, "-m", "nas.cli", "search", "--config", config, "--storage", url,
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def load(name, url=POSTGRES):
    return optuna.load_study(study_name=name, storage=make_storage(url))


@pytest.mark.slow
def test_three_workers_finish_exactly_n_trials_when_one_is_killed(tmp_path):
    name, n_trials = f"dist-{uuid.uuid4().hex[:8]}", 6
    config = study_file(tmp_path, name, n_trials, steps=150)
    workers = [worker(config, POSTGRES) for _ in range(3)]
    victim = workers[0]

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # kill the first worker in the middle of a trial of its own
        running = [t for t in map(records.read, _trials(name)) if t.state == TrialState.RUNNING
                   and (t.worker or "").endswith(f":{victim.pid}") and t.arch is not None]
        if running:
            break
        time.sleep(0.2)
    assert running, "the first worker never ran a trial"
    victim.send_signal(signal.SIGKILL)
    killed_trial = running[0].number
    workers[0] = worker(config, POSTGRES)  # the killed worker restarts and joins the study again

    for process in workers:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
    trials = _trials(name)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials
    assert sorted(records.read(t).slot for t in complete) == list(range(n_trials))  # none lost, none doubled
    assert len({t.number for t in trials}) == len(trials)
    killed = next(t for t in trials if t.number == killed_trial)
    assert killed.state == TrialState.FAIL  # reclaimed by another worker (its pid is gone), then retried
    assert any(t.system_attrs.get("failed_trial") == killed_trial for t in complete)
    trained = [r.arch.config_hash() for r in map(records.read, complete) if r.duplicate_of is None]
    assert len(trained) == len(set(trained))


def _trials(name):
    try:
        return load(name).get_trials(deepcopy=False)
    except KeyError:  # the study is not created yet
        return []


@contextmanager
def fresh_database(prefix):
    """The URL of a new, empty database on the test server, dropped afterwards."""
    database = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(POSTGRES.replace("postgresql://", "postgresql+psycopg://"),
                                     isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {database}"))
    try:
        yield admin, database, POSTGRES.rsplit("/", 1)[0] + f"/{database}"
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true"))
            connection.execute(sqlalchemy.text(f"DROP DATABASE {database} WITH (FORCE)"))
        admin.dispose()


def test_workers_opening_a_new_database_at_once_all_open_it():
    """Six launchers on a new database: Optuna's table creation and schema stamp race without the schema lock
    (an advisory lock), and some fail on "already exists"."""
    with fresh_database("vmoe_fresh") as (_, _, url):
        assert open_at_once(url) == [""] * 6
        assert optuna.get_all_study_summaries(make_storage(url)) == []


def test_losing_the_database_mid_study_is_one_clear_error_and_keeps_finished_trials(tmp_path, monkeypatch, capsys):
    with fresh_database("vmoe_lost") as (admin, database, url):
        lose_database_during_second_trial(monkeypatch, admin, database)
        config = study_file(tmp_path, "lost", 3, steps=10)
        assert main(["search", "--config", config, "--storage", url, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "became unreachable" in err and "run the same command again to resume" in err
        assert "Traceback" not in err
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true"))
        trials = load("lost", url).get_trials()
        assert trials[0].state == TrialState.COMPLETE and records.read(trials[0]).status == "complete"


def lose_database_during_second_trial(monkeypatch, admin, database):
    real_train = nas.trainer.train
    calls = []

    def train_then_lose_database(cfg, *args, **kwargs):
        calls.append(cfg.name)
        if len(calls) == 2:  # during the second trial the database stops taking connections
            with admin.connect() as connection:
                connection.execute(sqlalchemy.text(f"ALTER DATABASE {database} ALLOW_CONNECTIONS false"))
                connection.execute(sqlalchemy.text(
                    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"))
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(nas.trainer, "train", train_then_lose_database)
