"""Fault injection on the search and its storages: workers killed mid-trial, leases that lapse, budgets that
must hold, a lock that must not collide, resumes with an edited config. (The agent's faults are in
test_agent_faults.py, hostile input in test_bad_input.py and test_fuzz_inputs.py.)"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import optuna
import pytest
import yaml
from budget_targets import fail, hold_memory, swallow_everything
from optuna.trial import TrialState, create_trial

from nas import liveness, trial_store
from nas import record as records
from nas.budget import BudgetExceeded, run_with_budget
from nas.cli import main
from nas.record import Metrics, TrialRecord
from nas.runner import wait_for_reusable
from nas.storage import load_study
from nas.study import StudyConfig, load_study_config
from search_spaces import ArchConfig

ARCH = ArchConfig(image_size=16, in_channels=1, patch_size=4, num_classes=12, depth=2, width=16, num_heads=2)
SPACE = {"patch_sizes": [4], "depths": [2], "widths": [16, 24, 32], "head_width": 8, "mlp_ratios": [2.0],
         "num_experts": [0], "top_k": [1], "placements": ["last1"]}


def study_yaml(tmp_path, name, n_trials=4, steps=400, **extra) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "study_name": name, "data": {"name": "synthetic", "limit": 600}, "space": SPACE,
        "objectives": ["accuracy", "flops"], "n_trials": n_trials, "sampler": "random",
        "evaluator": {"steps": steps, "batch_size": 32, "eval_every": steps, "num_threads": 1},
        "heartbeat_interval": 1, "results_dir": str(tmp_path / "results"), "confirm": {"enabled": False},
        **extra,
    }))
    return str(path)


def search(config, *flags) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nas.cli", "search", "--config", config, "--no-progress",
                             "--no-report", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def running_trial_of(launcher, study_name, results, pid_other_than=None, timeout=120) -> TrialRecord:
    """A trial some worker of `launcher` is training (architecture sampled), polled from the storage."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise AssertionError(f"the search ended before running a trial:\n{launcher.communicate()[0]}")
        try:
            trials = records.read_all(load_study(study_name, results_dir=results), (TrialState.RUNNING,))
        except Exception:  # noqa: BLE001 - the storage is not written yet
            trials = []
        for trial in trials:
            pid = int((trial.worker or ":0").rpartition(":")[2])
            if trial.arch is not None and pid and pid != pid_other_than:
                return trial
        time.sleep(0.2)
    raise AssertionError("no worker ran a trial")


def assert_exactly_n_finished(study_name, results, n_trials, killed_pid: int):
    """Every slot finished once, and the trial the killed worker was running failed and was retried."""
    trials = records.read_all(load_study(study_name, results_dir=results))
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert sorted(t.slot for t in finished) == list(range(n_trials))  # none lost, none doubled
    (dead,) = [t for t in trials if t.worker and t.worker.endswith(f":{killed_pid}") and t.state == TrialState.FAIL]
    assert dead.interrupted and "died" in dead.reason
    study = load_study(study_name, results_dir=results)
    assert any(t.system_attrs.get(trial_store.RETRY_ATTR) == dead.number for t in study.trials)  # Optuna's marker


@pytest.mark.slow
def test_a_worker_killed_on_a_journal_is_replaced_and_its_trial_retried(tmp_path):
    config = study_yaml(tmp_path, "journal-kill", workers=2)
    launcher = search(config)
    victim = running_trial_of(launcher, "journal-kill", tmp_path / "results", pid_other_than=launcher.pid)
    pid = int(victim.worker.rpartition(":")[2])
    os.kill(pid, signal.SIGKILL)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output
    assert (tmp_path / "results" / "journal-kill" / "journal.log").is_file()
    assert_exactly_n_finished("journal-kill", tmp_path / "results", 4, pid)


@pytest.mark.slow
def test_a_sqlite_study_killed_mid_trial_resumes_and_retries_it(tmp_path):
    config = study_yaml(tmp_path, "sqlite-kill")
    launcher = search(config)
    running_trial_of(launcher, "sqlite-kill", tmp_path / "results")
    launcher.send_signal(signal.SIGKILL)  # one worker: the whole search dies, mid-trial (trials take seconds)
    launcher.wait()
    rerun = search(config)  # the dead pid's trial is reclaimed at once, no grace period to wait out
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert_exactly_n_finished("sqlite-kill", tmp_path / "results", 4, launcher.pid)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def local_worker(pid: int, started: str | None = None) -> str:
    """The identity worker `pid` of this host, boot and PID namespace has (`started`: its start time, for a
    process that is gone)."""
    started = liveness.start_time(pid) if started is None else started
    return f"{socket.gethostname()}:{liveness.boot_id()}:{liveness.pid_namespace()}:{started}:{pid}"


def dead_worker() -> str:
    return local_worker(dead_pid(), started="1")


def add_running(study, worker: str, lease_until=None, arch=ARCH) -> int:
    record = TrialRecord(arch=arch, metrics=Metrics(), slot=len(study.trials), worker=worker, lease_until=lease_until)
    study.add_trial(create_trial(state=TrialState.WAITING, user_attrs=records.user_attrs(record)))
    trial = study.ask()  # takes the waiting trial, RUNNING now
    return trial.number


@pytest.mark.slow
def test_reclaiming_fails_dead_workers_trials_and_queues_one_retry_each():
    study = optuna.create_study()
    dead = add_running(study, dead_worker())  # same host, process gone
    lapsed = add_running(study, "elsewhere:1", lease_until=time.time() - 1)  # another host, lease over
    # Same host, process alive, lease late (a loaded machine starved its renewing thread): alive.
    alive = add_running(study, liveness.worker_id(), lease_until=time.time() - 60)
    remote = add_running(study, "elsewhere:2", lease_until=time.time() + 60)
    assert sorted(trial_store.reclaim_dead_trials(study, max_retries=1, grace_s=30)) == [dead, lapsed]
    assert trial_store.reclaim_dead_trials(study, max_retries=1, grace_s=30) == []  # once only
    states = {t.number: t.state for t in study.trials}
    assert (states[dead], states[lapsed], states[alive], states[remote]) == (TrialState.FAIL, TrialState.FAIL,
                                                                            TrialState.RUNNING, TrialState.RUNNING)
    retries = [t for t in study.trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs[trial_store.RETRY_ATTR] for t in retries) == [dead, lapsed]
    assert sorted(records.read(t).slot for t in retries) == [dead, lapsed]  # each retry takes its slot


@pytest.mark.slow
def test_a_trial_that_keeps_killing_its_worker_is_retried_max_retries_times():
    study = optuna.create_study()
    first = add_running(study, dead_worker())
    trial_store.reclaim_dead_trials(study, max_retries=1, grace_s=30)
    retry = study.ask()  # the retry, claimed by a worker that dies too
    retry.set_user_attr("worker", dead_worker())
    trial_store.reclaim_dead_trials(study, max_retries=1, grace_s=30)
    assert trial_store.retry_count(study, retry.number) == 1
    final = records.read(study.trials[retry.number])
    assert final.state == TrialState.FAIL and not final.interrupted and "retries exhausted" in final.reason
    assert not [t for t in study.trials if t.state == TrialState.WAITING] and first == 0


@pytest.mark.slow
def test_waiting_on_a_dead_workers_run_of_the_same_architecture_ends(tmp_path):
    study = optuna.create_study()
    add_running(study, dead_worker())
    later = TrialRecord(number=5, arch=ARCH)
    cfg = StudyConfig.from_dict({"study_name": "w", "results_dir": str(tmp_path), "heartbeat_interval": 1})
    found = []
    waiter = threading.Thread(target=lambda: found.append(wait_for_reusable(study, later, cfg)), daemon=True)
    waiter.start()
    waiter.join(timeout=20)
    assert not waiter.is_alive() and found == [None]  # the dead run was reclaimed: nothing to wait for


def test_a_lease_keeps_renewing_through_storage_errors():
    class FlakyTrial:
        number, calls = 0, []

        def set_user_attr(self, key, value):
            self.calls.append(value)
            if len(self.calls) == 2:
                raise RuntimeError("database went away for a moment")

    trial = FlakyTrial()
    with trial_store.lease(trial, 0.05):
        time.sleep(0.5)
    assert len(trial.calls) >= 4  # renewed after the failed renewal, not stopped by it


@pytest.mark.slow
def test_a_budget_stops_code_that_swallows_exceptions():
    assert run_with_budget(swallow_everything, (0.1,), seconds=20, memory_mb=None) == "finished"
    started = time.monotonic()
    with pytest.raises(BudgetExceeded, match="time budget of 0.5 s"):
        run_with_budget(swallow_everything, (60,), seconds=0.5, memory_mb=None)
    assert time.monotonic() - started < 30  # stopped, not run to its end (60 s)


@pytest.mark.slow
def test_a_signal_swallowed_while_a_budget_waits_stops_its_trial(monkeypatch):
    """A signal swallowed in the waiting parent (its child has every signal ignored) let the trial run to its end."""
    from nas import processes

    monkeypatch.setattr(processes, "RECEIVED", ["SIGTERM"])
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        run_with_budget(swallow_everything, (60,), seconds=None, memory_mb=None)
    assert time.monotonic() - started < 30  # the child killed, not run to its end (60 s)


@pytest.mark.slow
def test_a_budget_measures_the_trials_own_memory():
    assert run_with_budget(hold_memory, (20, 0.5), seconds=None, memory_mb=2000) == 20 * 2**20
    with pytest.raises(BudgetExceeded, match="memory budget of 150 MB"):
        run_with_budget(hold_memory, (400, 30), seconds=None, memory_mb=150)
    with pytest.raises(ValueError, match="boom"):  # the trial's own errors come back as they are
        run_with_budget(fail, ("boom",), seconds=10, memory_mb=None)


@pytest.mark.slow
def test_resuming_with_an_edited_config_is_refused_naming_the_fields(tmp_path, capsys):
    config = study_yaml(tmp_path, "edited", n_trials=1, steps=6)
    assert main(["search", "--config", config, "--no-progress", "--no-report"]) == 0
    edited = yaml.safe_load(open(config))
    edited["evaluator"]["steps"] = 12
    edited["constraints"] = {"max_flops": 1e9}
    open(config, "w").write(yaml.safe_dump(edited))
    assert main(["search", "--config", config, "--no-progress", "--no-report", "--n-trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "constraints.max_flops, evaluator.steps" in err and "--allow-changes" in err
    assert len(load_study("edited", results_dir=tmp_path / "results").trials) == 1  # nothing queued or run
    assert main(["search", "--config", config, "--no-progress", "--no-report", "--n-trials", "2",
                 "--allow-changes"]) == 0
    stored = records.read_study(load_study("edited", results_dir=tmp_path / "results")).config
    assert stored["evaluator"]["steps"] == 12  # export and the report now read the settings that ran


def test_several_workers_on_a_sqlite_study_are_refused(tmp_path, capsys):
    config = study_yaml(tmp_path, "one-writer", n_trials=1, steps=6)
    assert main(["search", "--config", config, "--no-progress", "--no-report"]) == 0
    assert main(["search", "--config", config, "--no-progress", "--no-report", "--workers", "2"]) == 2
    assert "SQLite file, which takes one writer at a time" in capsys.readouterr().err


@pytest.mark.slow
def test_filling_slots_while_a_trial_is_reclaimed_queues_no_second_trial_for_its_slot(tmp_path):
    """The race CI met on PostgreSQL (7 trials for 6 slots): a launcher filled the slots in the moment between
    a reclaimed trial's failure and its retry. Reclaiming takes the study lock, as filling slots does."""
    from nas.opening import open_study
    from nas.storage import study_lock
    from nas.trial_store import fill_slots, reclaim, storage_url

    cfg = StudyConfig.from_dict({"study_name": "race", "results_dir": str(tmp_path), "n_trials": 2, "workers": 2,
                                 "data": {"name": "synthetic"}, "heartbeat_interval": 1})
    url = storage_url(cfg)
    study = open_study(cfg, url)
    fill_slots(study, cfg)
    trial = study.ask()  # slot 0, claimed by a worker that then dies
    trial.set_user_attr("worker", dead_worker())
    failed = threading.Event()
    real_add = study.add_trial

    def slow_retry(frozen):  # the retry is queued a moment after the dead trial failed
        failed.set()
        time.sleep(1.0)
        real_add(frozen)

    study.add_trial = slow_retry
    reclaimer = threading.Thread(target=reclaim, args=(study, cfg))
    reclaimer.start()
    assert failed.wait(10)
    other = open_study(cfg, url)  # another launcher, joining the study
    with study_lock(url, cfg.study_name):
        fill_slots(other, cfg)
    reclaimer.join()
    slots = [records.read(t).slot for t in other.get_trials() if t.state != TrialState.FAIL]
    assert sorted(slots) == [0, 1]  # the retry holds slot 0, and nothing else does


@pytest.mark.slow
def test_a_slot_left_free_by_a_worker_killed_mid_reclaim_is_run_before_the_study_ends(tmp_path):
    """A worker killed after failing a dead worker's trial but before queueing its retry leaves that slot with
    no trial: the workers still running queue it before they leave, so the study runs all n_trials."""
    from nas.opening import open_study
    from nas.search import run_worker
    from nas.trial_store import fill_slots, storage_url

    cfg = load_study_config(study_yaml(tmp_path, "lost-slot", n_trials=2, steps=5))
    study = open_study(cfg, storage_url(cfg))
    fill_slots(study, cfg)
    dead = study.ask()  # slot 0: failed by a reclaim that was killed before queueing the retry
    trial_store.write(dead, TrialRecord(number=dead.number, slot=0, interrupted=True, reason="its worker died"))
    study.tell(dead, state=TrialState.FAIL)
    assert run_worker(cfg) == 2
    finished = [r for r in records.read_all(study) if r.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert sorted(r.slot for r in finished) == [0, 1]
