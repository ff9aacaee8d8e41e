"""The steps of one trial, called without Optuna, and the trial record they fill."""

import dataclasses

import pytest
from optuna.trial import FixedTrial, TrialState

import profilers
from nas import record as records
from nas import trial_store
from nas.config import ConfigError
from nas.objectives import OBJECTIVES
from nas.record import Metrics, TrialRecord
from nas.study import Constraints, StudyConfig, load_study_config
from nas.trial import (
    build_context,
    check_constraints,
    find_reusable,
    profile_arch,
    reuse,
    running_earlier,
    sample,
    train_to_rungs,
    validate,
)
from search_spaces import ArchConfig, build_model, count_params
from search_spaces.mobile_vmoe import InvalidArchitecture

SPACE = {"patch_sizes": [4], "depths": [2], "widths": [16, 24], "head_width": 8, "mlp_ratios": [2.0],
         "num_experts": [0, 4, 16], "top_k": [1], "placements": ["last1"]}
DENSE = {"depth": 2, "width": 16, "patch_size": 4, "mlp_ratio": 2.0, "num_experts": 0}
MOE = {**DENSE, "num_experts": 4, "top_k": 1, "moe_placement": "last1", "routing": "per_image",
       "router_loss_weight": 0.3}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    cfg = StudyConfig.from_dict({
        "study_name": "steps", "data": {"name": "synthetic", "limit": 300}, "space": SPACE, "n_trials": 1,
        "evaluator": {"steps": 6, "batch_size": 32, "eval_every": 3, "num_threads": 1},
        "results_dir": str(tmp_path_factory.mktemp("results")),
    })
    return build_context(cfg)


def test_the_steps_run_without_optuna(ctx):
    arch = sample(ctx, FixedTrial(MOE))
    validate(ctx, arch)
    assert arch.moe.num_experts == 4 and (arch.image_size, arch.num_classes) == (16, 12)  # from the data set
    assert set(ctx.superclasses) == {4}  # the space's only router size the 12 classes allow
    profile, metrics = profile_arch(ctx, arch)
    assert metrics.params_active == count_params(build_model(arch))[1]
    assert metrics.flops == profile.flops and metrics.latency_ms is None  # no latency objective: not measured
    values, broken = check_constraints(Constraints(max_flops=metrics.flops / 2), metrics)
    assert values == {"max_flops": pytest.approx(1.0)} and broken == [f"flops={metrics.flops:.4g} > max_flops="
                                                                      f"{metrics.flops / 2:g}"]
    seen = []
    result, stopped = train_to_rungs(ctx, arch, decide=lambda rung, result: seen.append((rung, result)) or None)
    assert result.steps == 6 and stopped is None and seen == [(6, result)]  # one rung: the budget


def test_validate_refuses_more_super_classes_than_classes(ctx):
    with pytest.raises(InvalidArchitecture, match="super-classes cannot be formed from 12 classes"):
        validate(ctx, sample(ctx, FixedTrial({**MOE, "num_experts": 16})))


def record(number, arch, state=TrialState.COMPLETE, **kw) -> TrialRecord:
    return TrialRecord(number=number, state=state, arch=arch, **kw)


def test_reuse_takes_the_earliest_finished_run_of_the_same_architecture(ctx):
    arch, other = sample(ctx, FixedTrial(DENSE)), sample(ctx, FixedTrial({**DENSE, "width": 24}))
    stored = [record(0, other), record(1, arch, TrialState.FAIL), record(2, arch, metrics=Metrics(accuracy=0.5)),
              record(3, arch, metrics=Metrics(accuracy=0.6)), record(4, arch, TrialState.RUNNING)]
    assert find_reusable(arch, 5, stored).number == 2  # not the failed one, not the running one
    assert find_reusable(arch, 2, stored).number == 3  # never itself
    assert find_reusable(arch, 1, stored[:2]) is None
    assert running_earlier(arch, 5, stored) and not running_earlier(arch, 4, stored)  # only earlier trials
    copy = reuse(TrialRecord(number=5, slot=5), stored[2])
    assert (copy.duplicate_of, copy.metrics.accuracy, copy.slot) == (2, 0.5, 5)
    copy.metrics.accuracy = 0.0
    assert stored[2].metrics.accuracy == 0.5  # a copy, not the original's metrics


def test_status_is_derived_from_the_state_never_stored():
    arch = ArchConfig(image_size=16, in_channels=1, patch_size=4, num_classes=12, depth=2, width=16, num_heads=2)
    assert record(0, arch).status == "complete"
    assert record(0, arch, constraints={"max_flops": 0.5}).status == "infeasible"
    assert record(0, arch, TrialState.PRUNED).status == "early_stopped"
    assert record(0, None, TrialState.PRUNED).status == "invalid"
    assert record(0, arch, TrialState.FAIL).status == "failed"
    assert record(0, arch, TrialState.FAIL, interrupted=True).status == "interrupted"  # its slot runs again
    assert "status" not in records.user_attrs(record(0, arch))


def test_a_record_round_trips_through_optuna():
    import optuna

    arch = ArchConfig(image_size=16, in_channels=1, patch_size=4, num_classes=12, depth=2, width=16, num_heads=2,
                      moe={"num_experts": 4, "layers": [1]})
    original = TrialRecord(arch=arch, metrics=Metrics(accuracy=0.7, flops=123), train={"steps": 9}, rung=9, seeds=[0],
                           reason="why", duplicate_of=None, slot=3, worker="host:1",
                           profile=profilers.profile(arch, measure=False))
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    trial_store.write(trial, dataclasses.replace(original, constraints={"max_flops": -0.5}))
    study.tell(trial, original.objective_values([OBJECTIVES["accuracy"], OBJECTIVES["flops"]]))
    back = records.read(study.trials[0])
    assert back.arch == arch and back.metrics == original.metrics and back.train == original.train
    assert (back.rung, back.seeds, back.reason, back.slot, back.worker) == (9, [0], "why", 3, "host:1")
    assert back.constraints == {"max_flops": -0.5} and back.values == [0.7, 123] and back.status == "complete"
    assert back.to_json()["arch"]["moe"]["num_experts"] == 4


def test_metrics_are_flat_attributes_and_rung_accuracies_one_attribute():
    """What optuna-dashboard sorts its trial table by (record version 4); the rung accuracies are one attribute
    (version 6), not intermediate values, which Optuna's samplers read as a single objective's."""
    import optuna

    arch = ArchConfig(image_size=16, in_channels=1, patch_size=4, num_classes=12, depth=2, width=16, num_heads=2)
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    record = TrialRecord(arch=arch, metrics=Metrics(accuracy=0.7, flops=123), rung_accuracy={3: 0.5})
    trial_store.write(trial, record)
    record.rung_accuracy[9] = 0.7
    trial_store.write(trial, record)
    stored = study.trials[0]
    assert stored.intermediate_values == {} and stored.user_attrs["rung_accuracy"] == [[3, 0.5], [9, 0.7]]
    assert (stored.user_attrs["accuracy"], stored.user_attrs["flops"]) == (0.7, 123)
    assert "metrics" not in stored.user_attrs and "latency_ms" not in stored.user_attrs  # not measured: none
    back = records.read(stored)
    assert back.metrics == record.metrics and back.rung_accuracy == {3: 0.5, 9: 0.7}


def test_tpe_samples_a_multi_objective_study_with_trials_stopped_at_a_rung():
    """fashion-quick's trials 11 and 12 failed with "A single direction cannot be retrieved from a multi-objective
    study": TPE, past its 10 start-up trials, sorted the stopped (pruned) trials by their intermediate values, a
    single objective's, and record versions 4-5 stored the rung accuracies there."""
    import optuna

    from nas.opening import make_sampler

    cfg = load_study_config("smoke", sampler="tpe")
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(cfg))
    arch = ArchConfig(image_size=16, in_channels=1, patch_size=4, num_classes=12, depth=2, width=16, num_heads=2)
    for number in range(12):
        trial = study.ask()
        width = trial.suggest_categorical("width", [16, 32, 48])
        trial_store.write(trial, TrialRecord(arch=arch, rung_accuracy={100: 0.5 + number / 100}))
        if number % 2:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, [0.5 + number / 100, float(width)])
    assert study.ask().suggest_categorical("width", [16, 32, 48]) in (16, 32, 48)


def test_a_version_5_record_reads_its_rung_accuracies_from_intermediate_values():
    import optuna

    arch = ArchConfig(image_size=16, in_channels=1, patch_size=4, num_classes=12, depth=2, width=16, num_heads=2)
    stored = optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={100: 0.6},
                                       user_attrs={records.VERSION_ATTR: 5, "arch_yaml": arch.to_yaml()})
    assert records.read(stored).rung_accuracy == {100: 0.6}


def test_a_version_3_record_still_reads():
    import optuna

    arch = ArchConfig(image_size=16, in_channels=1, patch_size=4, num_classes=12, depth=2, width=16, num_heads=2)
    attrs = {"record_version": 3, "arch_yaml": arch.to_yaml(), "metrics": {"accuracy": 0.7, "flops": 123},
             "rung_accuracy": [[3, 0.5], [9, 0.7]], "rung": 9}
    back = records.read(optuna.trial.create_trial(values=[0.7, 123.0], user_attrs=attrs))
    assert back.metrics == Metrics(accuracy=0.7, flops=123) and back.rung_accuracy == {3: 0.5, 9: 0.7}


def test_the_runner_stores_the_record_once_per_step_as_it_grows(ctx, monkeypatch):
    import optuna

    from nas.runner import TrialRunner

    study = optuna.create_study(directions=ctx.cfg.directions)
    study.enqueue_trial(DENSE)
    trial = study.ask()
    stored = []
    write = trial_store.write
    monkeypatch.setattr(trial_store, "write", lambda t, r: stored.append(dataclasses.replace(r)) or write(t, r))
    runner = TrialRunner(ctx, trial)
    values = runner.run_steps()
    # sample, profile (and constraints), the one rung (stored before its decision), the end of training
    assert len(stored) == 4
    assert stored[0].arch is not None and stored[0].profile is None
    assert stored[1].metrics.flops is not None and stored[1].metrics.accuracy is None
    assert stored[2].rung == 6 and stored[2].rung_accuracy == {6: stored[2].metrics.accuracy}
    back = records.read(study.get_trials(deepcopy=False)[0])
    assert back.arch == runner.record.arch and back.metrics == runner.record.metrics and back.rung == 6
    assert values == [runner.record.metrics.accuracy, runner.record.metrics.flops]


@pytest.mark.parametrize("written, sampler, kind, field", [
    ({"intermediate_values": {100: 0.6}}, "tpe", "train", "sampler"),
    ({"user_attrs": {records.VERSION_ATTR: 5, "evaluator": "supernet"}}, "nsga2", "supernet", "evaluator")],
    ids=["tpe-over-intermediate-values", "shared-block-supernet"])
def test_a_study_of_record_version_5_that_cannot_go_on_is_refused_with_what_to_do(tmp_path, written, sampler, kind,
                                                                                 field):
    """Record version 6 fixed TPE and the supernet, but a version-5 study keeps what it stored: TPE would fail
    its trials again, and a one-shot study would rank shared-block scores beside trunk scores."""
    import optuna

    from nas.opening import open_study
    from nas.trial_store import storage_url

    evaluator = {"kind": "supernet", "steps": 2} if kind == "supernet" else {"steps": 2}
    cfg = load_study_config("smoke", sampler=sampler, evaluator=evaluator, results_dir=str(tmp_path),
                            confirm={"enabled": False})
    study = open_study(cfg, storage_url(cfg))
    stopped = kind == "train"
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED if stopped else TrialState.COMPLETE,
                                              values=None if stopped else [0.5] * len(cfg.directions), **written))
    with pytest.raises(ConfigError) as error:
        open_study(cfg, storage_url(cfg))
    assert error.value.field == field and "--study-name" in str(error.value)
    if field == "sampler":
        open_study(dataclasses.replace(cfg, sampler="nsga2"), storage_url(cfg))  # what the message says to do


def test_a_trials_latency_is_the_statistic_its_study_asks_for(ctx, monkeypatch):
    """`profiler.statistic: p5`: the trial's own timing is its p5, and on the anchor's scale the p5 ratio times the
    anchor's p5; with the median (the default) both would be 4.0 and 2 x 1.6."""
    from nas.latency import Anchor

    dense = sample(ctx, FixedTrial(DENSE))
    timed = profilers.LatencyStats(median=4.0, p10=2.5, p90=6.0, mean=4.0, std=1.0, cv=0.25, runs=30, p5=2.0)
    counted = profilers.profile  # the costs counted, the latency and anchor timing made up
    monkeypatch.setattr(profilers, "profile", lambda arch, **kw: dataclasses.replace(
        counted(arch, measure=False), latency=timed, anchor=profilers.AnchorTiming(
            dense.name, dense.config_hash(), timed, 1.25 if kw["statistic"] == "p5" else 2.0, kw["statistic"])))
    cfg = dataclasses.replace(ctx.cfg, objectives=["accuracy", "latency"],
                              profiler=dataclasses.replace(ctx.cfg.profiler, statistic="p5"))
    p5 = dataclasses.replace(ctx, cfg=cfg, anchor=Anchor(dense, 1.6, timed.to_dict(), "cpu", "p5"))
    _, metrics = profile_arch(p5, sample(ctx, FixedTrial(MOE)))
    assert metrics.latency_ms_measured == 2.0 and metrics.latency_ms == pytest.approx(1.25 * 1.6)
