"""Multi-fidelity search: who goes on at each rung (per kind), exact decisions with two workers, the last
evaluation never stops a trial, and a trial interrupted between rungs resumes from its checkpoint."""

import threading

import pytest
import yaml
from optuna.trial import TrialState

import nas.trainer
from nas import record as records
from nas.cli import main
from nas.opening import open_study
from nas.rung_policy import MOASHA, Continue
from nas.search import run_worker
from nas.storage import load_study
from nas.study import load_study_config
from nas.trainer import TrainResult
from nas.trial import build_context
from nas.trial_store import fill_slots, storage_url
from search_spaces import build_model

SPACE = {"patch_sizes": [4], "depths": [2], "widths": [16, 24, 32], "head_width": 8, "mlp_ratios": [2.0],
         "num_experts": [0, 4], "top_k": [1], "placements": ["last1"]}
# Accuracy after 10 steps by (width, MoE); each rung adds rung / 1000 (learning goes on).
BASE = {(16, False): 0.70, (24, False): 0.60, (32, False): 0.80, (16, True): 0.75, (24, True): 0.85, (32, True): 0.65}
ORDER = [(16, False), (16, True), (24, False), (24, True), (32, False), (32, True)]


def arch_params(width, moe):
    params = {"depth": 2, "width": width, "patch_size": 4, "mlp_ratio": 2.0, "num_experts": 4 if moe else 0}
    if moe:
        params.update(top_k=1, moe_placement="last1", routing="per_image", router_loss_weight=0.3)
    return params


def curve(cfg, steps: int) -> float:
    return BASE[cfg.width, cfg.is_moe] + steps / 1000


@pytest.fixture
def fake_trainer(monkeypatch):
    """Training replaced by fixed learning curves; records each call's (width, moe, stop_at_step)."""
    calls = []

    def train(cfg, dataset, recipe, *, stop_at_step=None, **kwargs):
        calls.append((cfg.width, cfg.is_moe, stop_at_step))
        steps = stop_at_step or recipe.steps
        accuracy = curve(cfg, steps)
        return TrainResult(val_accuracy=accuracy, router_accuracy=None, expert_load=None, loss_curve=[],
                           steps=steps, epochs=0.0, wall_time_s=0.0, images_per_s=0.0,
                           evals=[(steps, accuracy)], model=build_model(cfg))  # untrained: scored per image

    monkeypatch.setattr(nas.trainer, "train", train)
    return calls


def write_study(tmp_path, name, objectives, evaluator, order=ORDER) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "study_name": name, "data": {"name": "synthetic", "limit": 300}, "space": SPACE, "objectives": objectives,
        "n_trials": len(order), "evaluator": {**evaluator, "batch_size": 32}, "results_dir": str(tmp_path / "r"),
        "confirm": {"enabled": False},
        "enqueue": [arch_params(*a) for a in order],
    }))
    return str(path)


def outcome(tmp_path, name) -> dict:
    """(width, moe) -> the rung it stopped at, or "complete"."""
    got = {}
    for r in records.read_all(load_study(name, results_dir=tmp_path / "r")):
        got[r.arch.width, r.arch.is_moe] = "complete" if r.status == "complete" else r.rung
    return got


RUNGS = {"min_steps": 10, "max_steps": 90, "reduction_factor": 3}  # rungs 10, 30, 90


@pytest.mark.slow
def test_on_accuracy_alone_the_best_third_of_each_kind_goes_on(tmp_path, fake_trainer):
    assert main(["search", "--config", write_study(tmp_path, "acc", ["accuracy"], RUNGS), "--no-progress",
                 "--no-report"]) == 0
    # Dense: 16 alone goes on; 24 (0.61 < 0.71) stops; 32 is the best of three at 10, and of two at 30.
    # MoE, ranked apart: 24 beats 16 at 10 and 30; 32 is the worst of three at 10. One in three goes on, the
    # first trial of a rung always (async successive halving's bootstrap).
    assert outcome(tmp_path, "acc") == {(16, False): "complete", (24, False): 10, (32, False): "complete",
                                        (16, True): "complete", (24, True): "complete", (32, True): 10}
    assert [c for c in fake_trainer if c[:2] == (32, False)] == [(32, False, 10), (32, False, 30), (32, False, None)]
    stopped = records.read(load_study("acc", results_dir=tmp_path / "r").trials[2])
    assert stopped.state == TrialState.PRUNED and stopped.rung_accuracy == {10: pytest.approx(0.61)}
    assert stopped.metrics.accuracy == pytest.approx(0.61) and "ranked 2 of 2 dense trials" in stopped.reason
    complete = records.read(load_study("acc", results_dir=tmp_path / "r").trials[0])
    assert complete.rung == 90 and sorted(complete.rung_accuracy) == [10, 30, 90]


@pytest.mark.slow
def test_with_a_cost_objective_a_dominated_trial_stops(tmp_path, fake_trainer):
    assert main(["search", "--config", write_study(tmp_path, "cost", ["accuracy", "flops"], RUNGS), "--no-progress",
                 "--no-report"]) == 0
    # Dense 24 is dominated by 16 (less accurate, more FLOPs). 32 is on the front with 16, but three at rung
    # 10 keep one: the front's tie goes to the earlier trial. MoE 24 arrives second, more accurate and costlier
    # than 16: with fewer than 3 at a rung, every trial no other dominates goes on. MoE 32 is dominated by 16.
    assert outcome(tmp_path, "cost") == {(16, False): "complete", (24, False): 10, (32, False): 10,
                                         (16, True): "complete", (24, True): "complete", (32, True): 10}


@pytest.mark.slow
@pytest.mark.parametrize("evaluator", [{"steps": 30}, {"min_steps": 30, "max_steps": 30}])
def test_a_trial_whose_first_evaluation_is_its_last_is_never_stopped(tmp_path, fake_trainer, evaluator):
    worse_and_worse = [(32, False), (16, False), (24, False), (32, True), (16, True), (24, True)]
    config = write_study(tmp_path, "single", ["accuracy"], evaluator, order=worse_and_worse)
    assert main(["search", "--config", config, "--no-progress", "--no-report"]) == 0
    assert set(outcome(tmp_path, "single").values()) == {"complete"}


@pytest.mark.slow
def test_two_workers_decide_exactly(tmp_path, fake_trainer, monkeypatch):
    """Two workers (threads) on a journal: each decision sees every earlier arrival at its rung. Replaying the
    logged decisions in the order they were made gives the same answers."""
    decisions, lock = [], threading.Lock()
    real_decide = MOASHA.decide

    def logged(policy, record, reached):
        verdict = real_decide(policy, record, reached)
        with lock:
            reason = None if isinstance(verdict, Continue) else verdict.reason
            decisions.append((record.number, record.kind, record.rung, record.rung_accuracy[record.rung], reason))
        return verdict

    monkeypatch.setattr(MOASHA, "decide", logged)
    cfg = load_study_config(write_study(tmp_path, "two", ["accuracy"], RUNGS), workers=2,
                            storage=f"journal:{tmp_path / 'two.log'}")
    study = open_study(cfg, storage_url(cfg))
    fill_slots(study, cfg)
    ctx = build_context(cfg)
    workers = [threading.Thread(target=run_worker, args=(cfg, index), kwargs={"ctx": ctx}) for index in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    final = records.read_all(load_study("two", storage=f"journal:{tmp_path / 'two.log'}"))
    assert len(final) == len(ORDER) and all(r.state in (TrialState.COMPLETE, TrialState.PRUNED) for r in final)
    assert {r.worker for r in final} and len(decisions) >= len(ORDER)
    for index, (_number, kind, rung, accuracy, verdict) in enumerate(decisions):
        earlier = [d for d in decisions[:index] if d[1] == kind and d[2] == rung]
        if rung == 90:
            assert verdict is None
            continue
        ranked = sorted([accuracy] + [d[3] for d in earlier], reverse=True)
        keep = max(1, len(ranked) // 3)
        assert (verdict is None) == (ranked.index(accuracy) < keep), decisions[: index + 1]
    per_rung = [(d[0], d[2]) for d in decisions]
    assert len(per_rung) == len(set(per_rung))  # no trial decided twice at a rung


@pytest.mark.slow
def test_a_trial_interrupted_between_rungs_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    config = write_study(tmp_path, "resume", ["accuracy"], {"min_steps": 6, "max_steps": 18, "reduction_factor": 3,
                                                            "eval_every": 6}, order=[(16, False)])
    real_train = nas.trainer.train
    calls = []

    def interrupt_at_second_rung(cfg, *args, stop_at_step=None, **kwargs):
        calls.append(stop_at_step)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(cfg, *args, stop_at_step=stop_at_step, **kwargs)

    monkeypatch.setattr(nas.trainer, "train", interrupt_at_second_rung)
    assert main(["search", "--config", config, "--no-progress", "--no-report"]) == 130
    checkpoints = list((tmp_path / "r" / "resume" / "checkpoints").iterdir())
    assert len(checkpoints) == 1  # the first rung's run, kept for the retry
    monkeypatch.setattr(nas.trainer, "train", real_train)
    assert main(["search", "--config", config, "--no-progress", "--no-report"]) == 0
    done = [r for r in records.read_all(load_study("resume", results_dir=tmp_path / "r")) if r.status == "complete"]
    assert len(done) == 1 and done[0].train["steps"] == 18 and sorted(done[0].rung_accuracy) == [6, 18]
    assert not (tmp_path / "r" / "resume" / "checkpoints" / checkpoints[0].name).exists()  # removed when done

    uninterrupted = write_study(tmp_path, "straight", ["accuracy"], {"min_steps": 6, "max_steps": 18,
                                                                    "reduction_factor": 3, "eval_every": 6},
                                order=[(16, False)])
    assert main(["search", "--config", uninterrupted, "--no-progress", "--no-report"]) == 0
    (straight,) = records.read_all(load_study("straight", results_dir=tmp_path / "r"))
    assert straight.rung_accuracy == done[0].rung_accuracy  # resuming changed nothing
