"""Hardening, round 2 (issue 22): workers in other PID namespaces, SIGTERM as an interruption, children that
die with their parent, leases stopped before a trial finishes, confirmation runs claimed across launchers."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_faults import add_running, dead_pid, study_yaml

from nas import liveness
from nas import record as records
from nas.storage import load_study, make_storage

POSTGRES = os.environ.get("VMOE_NAS_POSTGRES_URL")
TESTS = Path(__file__).parent
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


def local_worker(pid: int, started: str | None = None) -> str:
    """The identity a worker `pid` of this host, boot and PID namespace writes (`started`: its start time)."""
    started = liveness.start_time(pid) if started is None else started
    return f"{socket.gethostname()}:{liveness.boot_id()}:{liveness.pid_namespace()}:{started}:{pid}"


# ---------------------------------------------------------------- 1: identity across PID namespaces


@pytest.mark.skipif(not liveness.pid_namespace(), reason="PID namespaces are Linux's")
def test_only_a_worker_of_this_boot_and_pid_namespace_is_judged_by_its_pid():
    study = optuna.create_study()
    me = liveness.worker_id()
    other_namespace = me.replace(f":{liveness.pid_namespace()}:", ":1:")
    alive_elsewhere = add_running(study, other_namespace, lease_until=time.time() + 60)  # same pid, other namespace
    dead_elsewhere = add_running(study, other_namespace, lease_until=time.time() - 1)  # its pid runs here: no matter
    pid_reused = add_running(study, local_worker(os.getpid(), started="1"), lease_until=time.time() + 60)
    dead = add_running(study, local_worker(dead_pid(), started="1"), lease_until=time.time() + 60)
    old_style = add_running(study, f"{socket.gethostname()}:{os.getpid()}", lease_until=time.time() - 1)
    alive = add_running(study, me, lease_until=time.time() - 60)  # its lease is late, its process runs
    reclaimed = liveness.reclaim_dead_trials(study, max_retries=1, grace_s=30)
    assert sorted(reclaimed) == sorted([dead_elsewhere, pid_reused, dead, old_style])
    assert {t.number for t in study.trials if t.state == TrialState.RUNNING} == {alive_elsewhere, alive}


def namespaced_search(config, storage) -> subprocess.Popen:
    """A search in a PID namespace of its own, where it is pid 1 (killing the `unshare` kills it)."""
    return subprocess.Popen([*UNSHARE, sys.executable, "-m", "nas.cli", "search", "--config", config, "--storage",
                             storage, "--no-progress", "--no-report"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def running_trials(name, storage, launcher, timeout=180, count=1) -> list:
    """The running trials (architecture sampled) once there are `count`, polled from the storage."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise AssertionError(f"the search ended before running a trial:\n{launcher.communicate()[0]}")
        try:
            study = optuna.load_study(study_name=name, storage=make_storage(storage))
            running = [r for r in records.read_all(study, (TrialState.RUNNING,)) if r.arch is not None and r.worker]
        except Exception:  # noqa: BLE001 - the study is not created yet
            running = []
        if len(running) >= count:
            return running
        time.sleep(0.2)
    raise AssertionError("no worker ran a trial")


def unshare_works() -> bool:
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


STORAGES = ["journal", pytest.param("postgresql", marks=pytest.mark.skipif(
    not POSTGRES, reason="set VMOE_NAS_POSTGRES_URL (.ci/postgres.sh prints one)"))]


def storage_for(kind, tmp_path, name) -> str:
    return {"journal": f"journal:{tmp_path / 'journal.log'}", "sqlite": f"sqlite:///{tmp_path / 'study.db'}",
            "postgresql": POSTGRES}[kind]


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORAGES)
def test_a_worker_killed_in_another_pid_namespace_is_reclaimed_and_the_study_ends_with_n_trials(tmp_path, kind):
    """Two searches as pid 1 of two PID namespaces, same hostname: with `host:pid` identities each took the
    other's trials for its own (pid 1 runs), and the killed one's trial stayed RUNNING for ever."""
    if not unshare_works():
        pytest.skip("unshare --pid --fork --mount-proc is unavailable (needs root or user namespaces)")
    name, n_trials = f"pidns-{uuid.uuid4().hex[:8]}", 3
    config = study_yaml(tmp_path, name, n_trials=n_trials, steps=400, max_retries=1)
    storage = storage_for(kind, tmp_path, name)
    first = namespaced_search(config, storage)
    (victim,) = running_trials(name, storage, first)
    second = namespaced_search(config, storage)
    try:
        running_trials(name, storage, second, count=2)  # both train: neither failed the other's live trial
        first.send_signal(signal.SIGKILL)  # kills pid 1 of its namespace, mid-trial
        first.wait()
        output, _ = second.communicate(timeout=240)
    finally:
        second.kill()
    assert second.returncode == 0, output
    trials = records.read_all(optuna.load_study(study_name=name, storage=make_storage(storage)))
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert sorted(t.slot for t in finished) == list(range(n_trials))  # none lost, none doubled
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    assert dead.number == victim.number and dead.interrupted and "died" in dead.reason
    assert victim.worker.endswith(":1")  # it was pid 1


# ---------------------------------------------------------------- 2: SIGTERM is an interruption


def plain_search(config, storage) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nas.cli", "search", "--config", config, "--storage", storage,
                             "--no-progress", "--no-report"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", *STORAGES])
def test_two_sigterms_on_one_slot_are_interruptions_not_crashes(tmp_path, kind):
    """SIGTERM killed the search outright: its trial was then reclaimed as a dead worker's, and two SIGTERMs
    on one slot used up its retries (max_retries 1): 2 failed, 0 complete."""
    name = f"term-{uuid.uuid4().hex[:8]}"
    config = study_yaml(tmp_path, name, n_trials=1, steps=400, max_retries=1)
    storage = storage_for(kind, tmp_path, name)
    for _ in range(2):
        launcher = plain_search(config, storage)
        running_trials(name, storage, launcher)
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=120)
        assert launcher.returncode == 130 and "interrupted" in output, output
    output, _ = plain_search(config, storage).communicate(timeout=300)
    trials = records.read_all(optuna.load_study(study_name=name, storage=make_storage(storage)))
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE], output
    assert all(t.interrupted and "interrupted (SIGTERM)" in t.reason for t in trials[:2])


# ---------------------------------------------------------------- 7: children die with their parent


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return found


def gone_within(pids, seconds) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(liveness.pid_alive(pid) for pid in pids):
            return True
        time.sleep(0.2)
    return False


def parent_script(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code], env=env)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds child processes through /proc")
def test_a_budgeted_trials_process_dies_with_its_worker(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = parent_script("from budget_targets import write_pid_then_sleep\nfrom nas.budget import run_with_budget\n"
                           f"run_with_budget(write_pid_then_sleep, ({str(pid_file)!r}, 120), seconds=300, "
                           "memory_mb=None)")
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    try:
        assert gone_within([child], 10), "the trial's process outlived its worker"
    finally:
        if liveness.pid_alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds child processes through /proc")
def test_confirm_pool_workers_die_with_confirm(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    parent = parent_script(
        "from pareto_trials import study, trial\nfrom nas.confirm import confirm\n"
        "from nas.study import load_study_config\n"
        f"s = study([trial('moe', 0.8, 100, 1.0), trial('dense', 0.7, 100, 0.95)], storage={storage!r})\n"
        f"cfg = load_study_config('smoke', results_dir={str(tmp_path)!r}, data={{'name': 'synthetic', 'limit': 256}})\n"
        "confirm(s, cfg, seeds=2, steps=100000, workers=2)\n")
    deadline = time.monotonic() + 120
    pool = []
    while len(pool) < 2 and time.monotonic() < deadline:  # spawn's resource tracker is a child too
        pool = [pid for pid in children_of(parent.pid) if "resource_tracker" not in Path(f"/proc/{pid}/cmdline")
                .read_text(errors="replace")]
        time.sleep(0.2)
    assert len(pool) == 2, "confirm started no pool"
    time.sleep(3)  # the pool workers start training
    parent.kill()
    parent.wait()
    try:
        assert gone_within(pool, 10), "confirm's pool workers outlived it"
    finally:
        for pid in pool:
            if liveness.pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- 22: the lease stops before the trial ends


def test_a_finished_trial_logs_no_lease_renewal_failure(tmp_path, monkeypatch, caplog):
    from nas.search import run_worker
    from nas.study import load_study_config

    cfg = load_study_config(study_yaml(tmp_path, "lease-end", n_trials=1, steps=5))
    real_tell = optuna.Study.tell

    def slow_tell(self, *args, **kwargs):  # a loaded machine: the lease's thread wakes after the trial ended
        result = real_tell(self, *args, **kwargs)
        time.sleep(1.5 * cfg.heartbeat_interval)
        return result

    monkeypatch.setattr(optuna.Study, "tell", slow_tell)
    with caplog.at_level("WARNING", logger="vmoe_nas"):
        assert run_worker(cfg) == 1
    assert "lease renewal failed" not in caplog.text
    assert load_study("lease-end", results_dir=tmp_path / "results").trials[0].state == TrialState.COMPLETE
