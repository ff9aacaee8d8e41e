"""End-to-end search studies on synthetic data with a tiny space and budget."""

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import nas.trainer
from nas import record as records
from nas.cli import main
from nas.storage import make_storage
from search_spaces import ArchConfig, build_model, count_params

D16 = {"depth": 2, "width": 16, "patch_size": 4, "mlp_ratio": 2.0, "num_experts": 0}
D24 = {**D16, "width": 24}
M16 = {**D16, "num_experts": 4, "top_k": 1, "moe_placement": "last1", "routing": "per_image",
       "router_loss_weight": 0.3}
SPACE = {"patch_sizes": [4], "depths": [2], "widths": [16, 24], "head_width": 8, "mlp_ratios": [2.0],
         "num_experts": [0, 4], "top_k": [1], "placements": ["last1"]}


def active_params(params: dict) -> int:
    arch = ArchConfig(image_size=16, in_channels=1, patch_size=4, num_classes=12, depth=2, width=params["width"],
                      num_heads=params["width"] // 8, mlp_ratio=2.0,
                      moe={"num_experts": 4, "layers": [1]} if params["num_experts"] else None)
    return count_params(build_model(arch))[1]


def write_study(tmp_path, name, enqueue, n_trials, **extra) -> str:
    study = {
        "study_name": name,
        "data": {"name": "synthetic", "limit": 600},
        "space": SPACE,
        "objectives": ["accuracy", "flops"],
        "n_trials": n_trials,
        "evaluator": {"steps": 12, "batch_size": 32, "eval_every": 6},
        "results_dir": str(tmp_path / "results"),
        "confirm": {"enabled": False},  # the search alone: confirmation has tests of its own
        "enqueue": enqueue,
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return str(path)


def load(tmp_path, name) -> optuna.Study:
    storage = make_storage(f"sqlite:///{tmp_path / 'results' / name / 'study.db'}")
    return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture
def failing_moe(monkeypatch):
    """Training raises for MoE models: a trial that fails for a reason of its own."""
    real_train = nas.trainer.train

    def train(cfg, *args, **kwargs):
        if cfg.is_moe:
            raise RuntimeError("forced failure of an MoE")
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(nas.trainer, "train", train)


@pytest.mark.slow
def test_study_end_to_end(tmp_path, failing_moe, capsys):
    limit = (active_params(D16) + active_params(D24)) / 2  # width 24 breaks it; width 16, MoE or not, does not
    config = write_study(tmp_path, "e2e", [D16, M16, D24, D16], 4, constraints={"max_params": limit})
    assert main(["search", "--config", config, "--no-progress"]) == 0
    study = load(tmp_path, "e2e")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]

    dense, failed, infeasible, duplicate = (records.read(t) for t in trials)
    arch = ArchConfig.from_yaml(trials[0].user_attrs["arch_yaml"])  # the stored YAML alone rebuilds it
    assert arch.config_hash() == dense.arch.config_hash() == trials[0].user_attrs["config_hash"] and arch.moe is None
    metrics = dense.metrics
    assert metrics.params_active == count_params(build_model(arch))[1]
    assert 0 < metrics.accuracy <= 1 and metrics.flops > 0
    assert dense.values == [metrics.accuracy, metrics.flops]
    assert dense.train["steps"] == 12 and dense.status == "complete"
    assert dense.rung == 12 and dense.seeds == [0]
    assert dense.constraints == {"max_params": pytest.approx(metrics.params_active / limit - 1)}

    assert infeasible.status == "infeasible" and infeasible.constraints["max_params"] > 0
    assert infeasible.train is None and infeasible.values[0] == 0.0
    assert "max_params" in infeasible.reason

    assert failed.reason == "RuntimeError: forced failure of an MoE"
    assert failed.status == "failed" and failed.arch.moe.num_experts == 4

    assert duplicate.duplicate_of == dense.number  # same architecture: not trained again
    assert duplicate.values == dense.values
    assert "finished: 3 complete, 1 fail" in capsys.readouterr().out

    # Rerunning resumes: nothing is redone; a larger n_trials only adds the missing trials.
    assert main(["search", "--config", config, "--no-progress"]) == 0
    assert len(load(tmp_path, "e2e").get_trials()) == 4
    assert main(["search", "--config", config, "--no-progress", "--n-trials", "5"]) == 0
    resumed = load(tmp_path, "e2e").get_trials()
    assert len(resumed) == 5 and [t.datetime_start for t in resumed[:4]] == [t.datetime_start for t in trials]


@pytest.mark.slow
def test_superclasses_are_discovered_once_before_the_trials(tmp_path, monkeypatch, capsys):
    import nas.trial

    calls = []
    discover = nas.trial.superclasses_for
    monkeypatch.setattr(nas.trial, "superclasses_for",
                        lambda data, groups, **kw: calls.append(groups) or discover(data, groups, **kw))
    m3 = {**M16, "num_experts": 3}  # synthetic data has 4 super-classes of its own, not 3: discovered
    config = write_study(tmp_path, "groups", [m3, D16, {**m3, "width": 24}], 3, space={**SPACE, "num_experts": [0, 3]})

    assert main(["search", "--config", config]) == 0
    assert calls == [3]  # once, before the first trial, for both MoE trials
    assert "super-classes for 3 experts: " in capsys.readouterr().err
    assert (tmp_path / "results" / "groups" / "superclasses" / "synthetic-g3-s0.json").is_file()
    moe = [r for r in records.read_all(load(tmp_path, "groups")) if r.kind == "moe"]
    assert len(moe) == 2 and all(r.metrics.router_accuracy is not None for r in moe)


@pytest.mark.slow
def test_latency_is_reported_on_the_scale_of_the_study_anchor(tmp_path):
    config = write_study(tmp_path, "anchor", [D16, M16], 2, objectives=["accuracy", "latency"])
    assert main(["search", "--config", config, "--no-progress"]) == 0
    study = load(tmp_path, "anchor")
    anchor = records.read_study(study).anchor
    arch = ArchConfig.from_yaml(anchor["arch_yaml"])
    assert (arch.depth, arch.width, arch.patch_size, arch.moe) == (2, 16, 4, None)  # SPACE's smallest dense
    for trial in records.read_all(study):
        metrics = trial.metrics
        assert trial.profile.anchor.config_hash == arch.config_hash()
        assert metrics.latency_ms == pytest.approx(metrics.latency_ratio * anchor["latency_ms"])
        assert trial.values[1] == metrics.latency_ms and metrics.latency_ms_measured > 0
    report = (tmp_path / "results" / "anchor" / "report.md").read_text()
    assert f"timed interleaved with the anchor {arch.name}" in report

    assert main(["search", "--config", config, "--no-progress", "--no-report", "--n-trials", "3"]) == 0
    assert records.read_study(load(tmp_path, "anchor")).anchor == anchor  # a resumed study keeps its scale


def test_the_study_names_its_objectives_for_optuna_dashboard(tmp_path):
    from nas.opening import open_study
    from nas.study import load_study_config
    from nas.trial_store import storage_url

    cfg = load_study_config(write_study(tmp_path, "named", [], 1))
    assert open_study(cfg, storage_url(cfg)).metric_names == ["accuracy", "flops"]  # not "Objective 0, 1"


def test_the_summary_counts_an_interrupted_trial_as_interrupted_not_failed(tmp_path, monkeypatch, capsys):
    import nas.search

    study = optuna.create_study(directions=["maximize", "minimize"])
    arch = ArchConfig(image_size=16, in_channels=1, patch_size=4, num_classes=12, depth=2, width=16, num_heads=2)
    for state, interrupted in ((TrialState.COMPLETE, False), (TrialState.FAIL, True), (TrialState.FAIL, False)):
        attrs = records.user_attrs(records.TrialRecord(arch=arch, interrupted=interrupted))
        study.add_trial(optuna.trial.create_trial(state=state, values=[0.5, 1.0] if state == TrialState.COMPLETE
                                                  else None, user_attrs=attrs))
    monkeypatch.setattr(nas.search, "run_search", lambda cfg, **kwargs: study)
    config = write_study(tmp_path, "summary", [], 3)
    assert main(["search", "--config", config, "--no-progress", "--no-report"]) == 0
    assert "finished: 1 complete, 1 fail, 1 interrupted" in capsys.readouterr().out


@pytest.mark.slow
def test_interrupted_study_resumes_where_it_stopped(tmp_path, monkeypatch):
    config = write_study(tmp_path, "ctrlc", [D16, M16, D24], 3)
    real_train = nas.trainer.train
    calls = []

    def interrupt_second(cfg, *args, **kwargs):
        calls.append(cfg.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(nas.trainer, "train", interrupt_second)
    assert main(["search", "--config", config, "--no-progress"]) == 130
    first = records.read_all(load(tmp_path, "ctrlc"))
    assert [t.state for t in first] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert first[1].interrupted is True

    assert main(["search", "--config", config, "--no-progress"]) == 0
    trials = records.read_all(load(tmp_path, "ctrlc"))
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 3  # the interrupted slot ran again; the finished one did not
    assert sorted(t.slot for t in finished) == [0, 1, 2]
    assert sum(1 for name in calls if name == first[0].name) == 1


@pytest.mark.slow
def test_two_workers_on_a_journal_complete_exactly_n_trials(tmp_path):
    config = write_study(tmp_path, "workers", [], 5)
    assert main(["search", "--config", config, "--no-progress", "--workers", "2"]) == 0
    journal = tmp_path / "results" / "workers" / "journal.log"
    assert journal.exists()
    study = optuna.load_study(study_name="workers", storage=make_storage(f"journal:{journal}"))
    trials = records.read_all(study)
    assert len(trials) == 5
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert sorted(t.slot for t in trials) == list(range(5))
    trained = [t.arch.config_hash() for t in trials if t.train is not None and t.duplicate_of is None]
    assert len(trained) == len(set(trained))  # no architecture trained twice


@pytest.mark.slow
@pytest.mark.parametrize(
    "budget, reason",
    [
        ({"trial_timeout": 1.5}, "exceeded its time budget of 1.5 s"),
        ({"trial_memory_mb": 64}, "memory budget of 64 MB"),
    ],
)
def test_a_trial_over_its_budget_is_stopped_and_recorded(tmp_path, budget, reason):
    config = write_study(tmp_path, "budget", [D16], 1, **budget)
    data = yaml.safe_load(open(config))
    data["evaluator"] = {"steps": 100_000, "batch_size": 32, "eval_every": 50_000}  # far longer than the budget
    open(config, "w").write(yaml.safe_dump(data))
    assert main(["search", "--config", config, "--no-progress"]) == 0
    (trial,) = records.read_all(load(tmp_path, "budget"))
    assert trial.state == TrialState.FAIL
    assert trial.reason.startswith("BudgetExceeded: stopped: ") and reason in trial.reason


def test_unreachable_storage_is_one_clear_error(tmp_path, capsys):
    config = write_study(tmp_path, "nowhere", [D16], 1)
    url = "postgresql://vmoe:secret@127.0.0.1:9/none"
    assert main(["search", "--config", config, "--no-progress", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "cannot open storage postgresql://***@127.0.0.1:9/none" in err
    assert "secret" not in err and "Traceback" not in err


@pytest.mark.slow
def test_a_trial_within_its_memory_budget_completes(tmp_path):
    config = write_study(tmp_path, "roomy", [D16], 1, trial_memory_mb=10**6)  # far above any worker's memory
    assert main(["search", "--config", config, "--no-progress"]) == 0
    (trial,) = records.read_all(load(tmp_path, "roomy"))
    assert trial.status == "complete" and trial.reason is None


@pytest.mark.slow
def test_two_studies_in_one_process_log_only_into_their_own_files(tmp_path):
    import logging

    handlers = {name: set(logging.getLogger(name).handlers) for name in ("vmoe_nas", "optuna")}
    for name in ("first", "second"):
        assert main(["search", "--config", write_study(tmp_path, name, [D16], 1), "--no-progress", "--no-report"]) == 0
    first, second = ((tmp_path / "results" / n / "search.log").read_text() for n in ("first", "second"))
    assert "study first:" in first and "study second:" in second
    assert "study second:" not in first and "study first:" not in second
    assert {name: set(logging.getLogger(name).handlers) for name in handlers} == handlers  # all removed


@pytest.mark.slow
def test_describe_imports_no_search_analysis_or_export_library():
    import subprocess
    import sys

    script = ("import sys; from nas.cli import main; main(['describe', 'vit-6x64']); "
              "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    loaded = set(out.splitlines()[-1].split())
    assert not loaded & {"optuna", "pandas", "sqlalchemy", "plotly", "fvcore", "onnx", "onnxruntime", "httpx"}


@pytest.mark.slow
def test_importing_the_search_changes_no_process_wide_state():
    import subprocess
    import sys

    libraries = "torch, numpy, optuna, pandas, plotly.offline, plotly.subplots, sqlalchemy, fvcore.nn, onnx, tqdm"
    script = (f"import logging, warnings, {libraries}; "  # their own filters are theirs
              "before = (list(warnings.filters), logging.getLogger('optuna').handlers[:]); "
              "import nas.search, nas.report, nas.export, profilers; "
              "print(before == (list(warnings.filters), logging.getLogger('optuna').handlers[:]))")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "True"
