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
from test_faults import ARCH, add_running, dead_pid, local_worker, study_yaml

from nas import liveness, trial_store
from nas import record as records
from nas.storage import load_study, make_storage

POSTGRES = os.environ.get("VMOE_NAS_POSTGRES_URL")
TESTS = Path(__file__).parent
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


# ---------------------------------------------------------------- 1: identity across PID namespaces


@pytest.mark.slow
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
    reclaimed = trial_store.reclaim_dead_trials(study, max_retries=1, grace_s=30)
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
    # 2,000 steps: at 400 a trial could end (3.5 s) before the second search started one beside it
    config = study_yaml(tmp_path, name, n_trials=n_trials, steps=2000, max_retries=1)
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
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # all of it, even if killed


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", *STORAGES])
def test_two_sigterms_on_one_slot_are_interruptions_not_crashes(tmp_path, kind):
    """SIGTERM killed the search outright: its trial was then reclaimed as a dead worker's, and two SIGTERMs
    on one slot used up its retries (max_retries 1): 2 failed, 0 complete."""
    name = f"term-{uuid.uuid4().hex[:8]}"
    # 2,000 steps: a trial lasts seconds on an idle machine, so the poller sees it running before it ends
    config = study_yaml(tmp_path, name, n_trials=2, steps=2000, max_retries=1)
    storage = storage_for(kind, tmp_path, name)
    for _ in range(2):
        launcher = plain_search(config, storage)
        running_trials(name, storage, launcher)
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=120)
        # 130 as main() returns it; -2 (the interpreter ending on a KeyboardInterrupt after main had returned) was
        # seen in 1 of ~6 runs on an idle machine, cause not found: what this test guards is the trials below
        assert launcher.returncode in (130, -2) and "interrupted" in output, output
    output, _ = plain_search(config, storage).communicate(timeout=300)
    trials = records.read_all(optuna.load_study(study_name=name, storage=make_storage(storage)))
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.slot for t in finished) == [0, 1], output  # each slot once: no retries used up
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.interrupted and "interrupted (SIGTERM)" in t.reason for t in failed), [t.reason for t in failed]
    assert not any(trial_store.RETRY_ATTR in t.system_attrs
                   for t in optuna.load_study(study_name=name, storage=make_storage(storage)).trials)


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


@pytest.mark.slow
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
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_confirm_pool_workers_die_with_confirm(tmp_path, stop):
    """SIGTERM (`docker stop`) to a confirm of 2 pool workers: the pool's exit waited for the arms under way (here
    100,000 steps), so only the SIGKILL after the grace period ended it."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    parent = parent_script(
        "from pareto_trials import study, trial\nfrom nas.confirm import confirm\n"
        "from nas.processes import interruptible\nfrom nas.study import load_study_config\n"
        f"s = study([trial('moe', 0.8, 100, 1.0), trial('dense', 0.7, 100, 0.95)], storage={storage!r})\n"
        f"cfg = load_study_config('smoke', results_dir={str(tmp_path)!r}, data={{'name': 'synthetic', 'limit': 256}})\n"
        "with interruptible():  # as the CLI runs it\n"
        "    confirm(s, cfg, seeds=2, steps=100000, workers=2)\n")
    deadline = time.monotonic() + 120
    pool = []
    while len(pool) < 2 and time.monotonic() < deadline:  # spawn's resource tracker is a child too
        pool = [pid for pid in children_of(parent.pid) if "resource_tracker" not in Path(f"/proc/{pid}/cmdline")
                .read_text(errors="replace")]
        time.sleep(0.2)
    assert len(pool) == 2, "confirm started no pool"
    time.sleep(3)  # the pool workers start training
    parent.send_signal(stop)
    try:
        parent.wait(timeout=120)  # a loaded machine: slow imports; the arms would take hours
        assert gone_within(pool, 90), "confirm's pool workers outlived it"
    finally:
        parent.kill()
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


# ---------------------------------------------------------------- 4, 5, 6: checkpoints


def tiny_run(tmp_path, **recipe):
    from nas.data import load_dataset
    from nas.recipe import TrainRecipe

    data = load_dataset("synthetic", limit=256)
    fields = {"steps": 12, "batch_size": 32, "eval_every": 12, "num_threads": 1, **recipe}
    return ARCH, data, TrainRecipe(**fields)


def test_a_corrupt_checkpoint_between_rungs_is_discarded_and_the_trial_retrains(tmp_path, caplog):
    """A torn checkpoint failed the trial, and stayed: every later trial of the architecture failed on it."""
    from nas.study import load_study_config
    from nas.trial import StudyContext, train_to_rungs

    arch, data, _ = tiny_run(tmp_path)
    cfg = load_study_config("smoke", results_dir=str(tmp_path), data={"name": "synthetic", "limit": 256},
                            evaluator={"min_steps": 4, "max_steps": 12, "reduction_factor": 3, "batch_size": 32,
                                       "num_threads": 1})
    ctx = StudyContext(cfg, data, cfg.recipe(), {})

    def tear_checkpoint(rung, result):
        if rung == cfg.rungs.steps[0]:
            (checkpoint,) = (tmp_path / "smoke" / "checkpoints").glob("*/checkpoint.pt")
            checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # a torn write, a full disk
        return None

    reference, _ = train_to_rungs(ctx, arch, lambda rung, result: None)
    with caplog.at_level("WARNING", logger="vmoe_nas"):
        result, stopped = train_to_rungs(ctx, arch, tear_checkpoint)
    assert stopped is None and result.steps == 12 and result.val_accuracy == reference.val_accuracy
    assert "discarded, the run starts over" in caplog.text
    assert not (tmp_path / "smoke" / "checkpoints").exists() or not any((tmp_path / "smoke" / "checkpoints").iterdir())


def test_two_writers_of_one_checkpoint_do_not_collide_on_a_temp_name(tmp_path, monkeypatch):
    """Two `vmoe-nas train` on one folder: the second crashed on the fixed temp name checkpoint.tmp."""
    import torch

    import nas.trainer
    from nas.trainer import Checkpoint, RunState

    arch, _, recipe = tiny_run(tmp_path)
    model = nas.trainer.build_model(arch)
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / "checkpoint.pt"
    first, second = Checkpoint(path, arch, recipe, "synthetic"), Checkpoint(path, arch, recipe, "synthetic")
    real_save, calls = torch.save, []

    def save_while_the_other_saves(payload, file):
        real_save(payload, file)
        calls.append(file)
        if len(calls) == 1:  # the other writer saves between this one's write and its rename
            second.save(model, optimizer, RunState(step=2))

    monkeypatch.setattr(torch, "save", save_while_the_other_saves)
    first.save(model, optimizer, RunState(step=1))
    assert len({str(c) for c in calls}) == 2 and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_signal_during_training_saves_the_step_it_stopped_at_and_the_run_resumes_there(tmp_path, monkeypatch):
    """Ctrl-C lost every step since the last evaluation (all of them at a large eval_every)."""
    import torch

    import nas.trainer
    from nas.trainer import CHECKPOINT_NAME, train

    arch, data, recipe = tiny_run(tmp_path)
    real_step = nas.trainer._Run.step

    def step_then_signal(run):
        if run.state.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the step: the step ends, then it is saved
        return real_step(run)

    monkeypatch.setattr(nas.trainer._Run, "step", step_then_signal)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(arch, data, recipe, checkpoint_dir=tmp_path)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["state"]["step"] == 6 and (stopped.value.step, stopped.value.steps) == (6, 12)
    assert str(stopped.value) == "SIGTERM" and signal.getsignal(signal.SIGTERM) == handler  # restored
    steps = []
    monkeypatch.setattr(nas.trainer._Run, "step", lambda run: steps.append(run.state.step) or real_step(run))
    assert train(arch, data, recipe, checkpoint_dir=tmp_path).steps == 12 and steps[0] == 6


def test_training_checkpoints_by_time_between_evaluations(tmp_path, monkeypatch):
    import nas.trainer
    from nas.trainer import train

    arch, data, recipe = tiny_run(tmp_path, checkpoint_every_s=1e-6)
    saved = []
    real_save = nas.trainer.Checkpoint.save
    monkeypatch.setattr(nas.trainer.Checkpoint, "save",
                        lambda self, model, optimizer, state, scaler=None: saved.append(state.step)
                        or real_save(self, model, optimizer, state, scaler))
    train(arch, data, recipe, checkpoint_dir=tmp_path)
    assert saved == list(range(1, 13))  # every step here; only at step 12, the one evaluation, before


# ---------------------------------------------------------------- 8: confirmation runs claimed across launchers


def hand_study(tmp_path):
    from pareto_trials import study, trial

    from nas.storage import parse_storage

    url = parse_storage(f"journal:{tmp_path / 'journal.log'}")
    study([trial("moe", 0.80, 100, 1.0), trial("dense", 0.70, 100, 0.95), trial("dense", 0.75, 90, 1.08, width=24)],
          storage=make_storage(url))
    return url


def test_two_launchers_confirming_one_study_train_each_run_once(tmp_path, monkeypatch):
    """Two launchers on one storage both ran the whole confirmation (7 runs stored for 4 keys)."""
    import threading

    from test_confirm import fake_run

    from nas import confirm as stage
    from nas.study import load_study_config

    url = hand_study(tmp_path)
    cfg = load_study_config("smoke", results_dir=str(tmp_path))
    monkeypatch.setattr("nas.trial.build_context", lambda cfg: None)
    train_arm, calls = fake_run({True: 0.8, False: 0.6})
    monkeypatch.setattr(stage, "train_arm", lambda *args: time.sleep(0.3) or train_arm(*args))
    results = []

    def launcher():
        s = optuna.load_study(study_name="hand", storage=make_storage(url))
        results.append(stage.confirm(s, cfg, seeds=3, storage=url).results)

    threads = [threading.Thread(target=launcher) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 2 and results[0] == results[1]
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 9  # 3 arms x 3 seeds, each trained once
    companion = stage.companion(optuna.load_study(study_name="hand", storage=make_storage(url)))
    assert len(companion.get_trials(states=(TrialState.COMPLETE,))) == 9


@pytest.mark.slow
def test_a_confirmation_run_claimed_by_a_dead_launcher_is_claimed_again(tmp_path, monkeypatch):
    from test_confirm import fake_run

    from nas import confirm as stage
    from nas.pairs import select_pairs
    from nas.study import load_study_config

    url = hand_study(tmp_path)
    s = optuna.load_study(study_name="hand", storage=make_storage(url))
    cfg = load_study_config("smoke", results_dir=str(tmp_path))
    monkeypatch.setattr("nas.trial.build_context", lambda cfg: None)
    train_arm, calls = fake_run({True: 0.8, False: 0.6})
    monkeypatch.setattr(stage, "train_arm", train_arm)
    pairs = select_pairs(records.read_all(s), 1, cfg.objectives)
    first_key = records.run_key(pairs[0].moe, 0, 60)
    orphan = stage.companion(s).ask()  # claimed by a launcher killed with -9
    orphan.set_user_attr(stage.CLAIM_ATTR, first_key)
    orphan.set_user_attr("worker", local_worker(dead_pid(), started="1"))
    stage.confirm(s, cfg, seeds=1, steps=60, storage=url)
    assert (pairs[0].moe.name, 0) in calls
    states = {t.number: t.state for t in stage.companion(s).get_trials()}
    assert states[orphan.number] == TrialState.FAIL


def test_sigterm_and_sighup_interrupt_like_ctrl_c_but_an_ignored_signal_stays_ignored():
    from nas.processes import interruptible

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            with interruptible():
                assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler runs at the next bytecode
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_ctrl_c_is_remembered_and_a_swallowed_interruption_prints_no_traceback():
    """Ctrl-C kept Python's handler, which remembers nothing: swallowed in a weakref callback it was lost, and the
    trial trained on. And each swallowed SIGTERM printed SQLAlchemy's "Exception ignored" traceback."""
    from nas.processes import interrupted, interruptible, interruption_name

    hook = sys.unraisablehook
    # caught inside (as a swallowing callback would), it is raised again as the block ends: the command exits 130
    with pytest.raises(KeyboardInterrupt, match="Ctrl-C"):
        with interruptible():
            with pytest.raises(KeyboardInterrupt) as caught:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler runs at the next bytecode
            assert interrupted() == "Ctrl-C" and interruption_name(caught.value) == "Ctrl-C"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and interrupted() is None
    assert sys.unraisablehook is hook
    # Out of pytest, which hooks unraisable exceptions itself: a swallowed SIGTERM is quiet, other ones are not
    swallowed = """if True:
        import signal, weakref
        from nas import processes
        class Collected: pass
        try:
            with processes.interruptible():
                for raised in (lambda: processes.interrupt(signal.SIGTERM), lambda: 1 / 0):
                    collected = Collected()
                    ref = weakref.ref(collected, lambda _: raised())
                    del collected
                assert processes.interrupted() == "SIGTERM"
        except KeyboardInterrupt as error:
            print("raised again as the block ended:", error)
    """
    run = subprocess.run([sys.executable, "-c", swallowed], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "raised again as the block ended: SIGTERM" in run.stdout, run.stderr
    assert "ZeroDivisionError" in run.stderr and "KeyboardInterrupt" not in run.stderr, run.stderr


def test_a_signal_ignored_under_nohup_stays_ignored_while_interruptions_are_deferred():
    """Training defers signals to save first; it took SIGHUP over from nohup, so logging out stopped it."""
    from nas.processes import deferred_interruptions

    deferred, previous = [], signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with deferred_interruptions(deferred.append):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
        assert deferred == [] and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_training_interruption_survives_pickling_with_what_it_saved():
    """A budgeted trial's process sends its exception back pickled: TrainingInterrupted could not be rebuilt."""
    import pickle

    from nas.trainer import TrainingInterrupted

    stopped = pickle.loads(pickle.dumps(TrainingInterrupted("SIGTERM", 3, 8, Path("run/checkpoint.pt"))))
    assert (str(stopped), stopped.saved()) == ("SIGTERM", "saved step 3 of 8 to run/checkpoint.pt")


def test_a_second_signal_during_deferred_interruptions_is_not_remembered():
    """`vmoe-nas train`'s second Ctrl-C was remembered in RECEIVED, which only the CLI's `interruptible` clears: a
    later `train()` of the same Python process (a notebook, a script) stopped after its first step."""
    from nas.processes import deferred_interruptions, interrupted

    deferred = []
    with pytest.raises(KeyboardInterrupt, match="Ctrl-C"):
        with deferred_interruptions(deferred.append):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the first is deferred: the block goes on
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert deferred == ["Ctrl-C"] and interrupted() is None


@pytest.mark.parametrize("where", ["claim", "trial"])
def test_a_signal_inside_a_storage_call_is_an_interruption_not_a_lost_storage(tmp_path, monkeypatch, where):
    """CI saw SIGTERM land inside SQLite's commit: the storage wrapped its KeyboardInterrupt in its own error, and
    the search said the storage "became unreachable" (exit 2) instead of interrupted (130)."""
    from nas import processes, runner, search
    from nas.study import load_study_config

    def commit_hit_by_sigterm(*args, **kwargs):
        processes.RECEIVED.append("SIGTERM")
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.")

    monkeypatch.setattr(processes, "RECEIVED", [])
    if where == "claim":
        monkeypatch.setattr(search, "claim_trial", commit_hit_by_sigterm)
    else:
        monkeypatch.setattr(runner.TrialRunner, "run_steps", commit_hit_by_sigterm)
    cfg = load_study_config(study_yaml(tmp_path, f"sig-{where}", n_trials=1, steps=2))
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        search.run_worker(cfg)
    if where == "trial":
        (stopped,) = records.read_all(load_study(cfg.study_name, results_dir=cfg.results_dir))
        assert stopped.state == TrialState.FAIL and stopped.interrupted  # its slot runs again, no retry used
