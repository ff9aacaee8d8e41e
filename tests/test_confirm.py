"""The confirmation stage: which pairs, common random numbers across a pair, resuming after a kill, and the
smoke study confirmed end to end from the command line."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from pareto_trials import arch, study, trial

from nas import confirm as stage
from nas import record as records
from nas import trainer
from nas.cli import main
from nas.data import load_dataset
from nas.pairs import INTERDECILE_SDS, latency_band, select_pairs, top_moes
from nas.study import load_study_config
from nas.trial import StudyContext
from profilers import LatencyStats, Prediction, profile


def hand_records(spread=0.1):
    """An MoE (0.80, 100 FLOPs, 1.0 ms), its twin (0.70, 100, 0.95), a cheaper and slightly slower dense
    (0.75, 90, 1.08) and a costlier, better dense (0.90, 200, 2.0); every timing's robust spread `spread`."""
    s = study([trial("moe", 0.80, 100, 1.0), trial("dense", 0.70, 100, 0.95), trial("dense", 0.75, 90, 1.08, width=24),
               trial("dense", 0.90, 200, 2.0, width=32)])
    rs = records.read_all(s)
    for r in rs:
        median = r.metrics.latency_ms
        half = spread * INTERDECILE_SDS * median / 2
        timing = LatencyStats(median=median, p10=median - half, p90=median + half, mean=median, std=0.0, cv=5.0, runs=9)
        r.profile = dataclasses.replace(profile(r.arch, measure=False), latency=timing)
    return rs


def test_predicted_latencies_tie_within_their_models_bound():
    """A study of predicted latencies had a tie band of 0 (nothing measured): 1.08 ms was then more than 1.0 ms
    however wrong the model could be. Its band is the model's 95% bound as an sd: 9.8% / 1.96 = 5%."""
    rs = hand_records()
    for r in rs:
        r.profile = dataclasses.replace(r.profile, latency=None,
                                        prediction=Prediction(r.metrics.latency_ms, "lm.json", bound_pct=9.8))
    assert latency_band(rs) == pytest.approx(0.05)
    # 1.08 > 1.0 x 1.05: not a tie; at a bound of 19.6% (band 10%) it is the MoE's latency comparator
    assert [p.also for p in select_pairs(rs, 2, ["accuracy", "flops", "latency"])][1] == ()
    for r in rs:
        r.profile = dataclasses.replace(r.profile, prediction=Prediction(r.metrics.latency_ms, "lm.json", 19.6))
    assert [p.also for p in select_pairs(rs, 2, ["accuracy", "flops", "latency"])][1] == ("latency",)


def test_pairs_are_the_twin_and_the_best_dense_of_no_more_flops_and_of_no_more_latency_within_the_band():
    rs = hand_records(spread=0.1)
    assert latency_band(rs) == pytest.approx(0.1)
    pairs = select_pairs(rs, 2, ["accuracy", "flops", "latency"])
    # 1.08 <= 1.0 * 1.1: the best dense of no more FLOPs is also that of no more latency, one test for both
    assert [(p.comparator, p.cost, p.dense_trial, p.also) for p in pairs] == [("twin", "flops", 1, ()),
                                                                             ("flops", "flops", 2, ("latency",))]
    assert pairs[0].dense == arch("moe").dense() and pairs[0].moe == arch("moe")
    tight = select_pairs(rs, 2, ["accuracy", "flops", "latency"], band=0.0)
    assert [(p.comparator, p.dense_trial, p.also) for p in tight][0] == ("twin", 1, ("latency",))  # only it is as fast


def test_the_top_moes_come_from_the_next_front_when_the_first_is_short():
    rs = records.read_all(study([trial("moe", 0.80, 100, 1.0), trial("moe", 0.70, 200, 2.0, width=24),
                                 trial("moe", 0.75, 300, 3.0, width=32), trial("dense", 0.7, 100, 1.0)]))
    # the 16-wide MoE dominates both others; of those, the 32-wide is more accurate
    assert [r.arch.width for r in top_moes(rs, 2, ["accuracy", "flops"])] == [16, 32]
    assert [r.arch.width for r in top_moes(rs, 5, ["accuracy", "flops"])] == [16, 32, 24]


def test_the_best_dense_of_no_more_flops_is_left_out_when_it_is_the_twin():
    s = study([trial("moe", 0.80, 100, 1.0), trial("dense", 0.70, 100, 0.95)])
    pairs = select_pairs(records.read_all(s), 2, ["accuracy", "flops", "latency"])
    assert [(p.comparator, p.also) for p in pairs] == [("twin", ("latency",))]


@pytest.fixture(scope="module")
def tiny_ctx():
    cfg = load_study_config("smoke", data={"name": "synthetic", "limit": 256},
                            evaluator={"steps": 4, "batch_size": 32})
    data = load_dataset("synthetic", limit=256)
    return StudyContext(cfg, data, cfg.recipe(), {4: np.asarray(data.superclasses)})


def test_a_pair_starts_from_the_same_shared_weights_and_sees_the_same_batches(tiny_ctx, monkeypatch):
    built, initial, batches = [], [], []
    real_build, real_at = trainer.build_model, trainer.Batches.at

    def build(cfg):
        built.append(real_build(cfg))
        return built[-1]

    def at(self, step):
        if step == 0:  # before the first optimizer step: the weights the run starts from
            initial.append({k: v.clone() for k, v in built[-1].state_dict().items()})
        images, labels = real_at(self, step)
        batches[-1].append((images.clone(), labels.clone()))
        return images, labels

    monkeypatch.setattr(trainer, "build_model", build)
    monkeypatch.setattr(trainer.Batches, "at", at)
    moe = arch("moe")
    for a, seed in ((moe, 3), (moe.dense(), 3), (moe, 4)):
        batches.append([])
        run = stage.train_arm(tiny_ctx, a, seed, 3)
        assert run.correct.shape == (len(tiny_ctx.dataset.val),) and run.accuracy == pytest.approx(run.correct.mean())
    (moe_w, dense_w, other_w), (moe_b, dense_b, other_b) = initial, batches
    shared = [k for k in moe_w if k in dense_w and moe_w[k].shape == dense_w[k].shape]
    assert "blocks.1.mlp.fc1_weight" in moe_w and "router.linear.weight" in moe_w  # experts, router: MoE's own
    assert len(shared) == len(dense_w) - 4  # all but the replaced MLP's weights and biases
    assert all(torch.equal(moe_w[k], dense_w[k]) for k in shared)
    assert not torch.equal(moe_w["head.weight"], other_w["head.weight"])  # another seed, other weights
    assert len(moe_b) == len(dense_b) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(moe_b, dense_b))
    assert not torch.equal(moe_b[0][1], other_b[0][1])


def fake_run(correct_rate: dict):
    """A stand-in for training: per-image correctness drawn from the arm's rate, seeded by (arm, seed)."""
    calls = []

    def train_arm(ctx, a, seed, steps):
        calls.append((a.name, seed))
        rng = np.random.default_rng([seed, a.width, a.is_moe])
        correct = rng.random(400) < correct_rate[a.is_moe]
        return records.ConfirmRun(a, seed, steps, float(correct.mean()), correct, 0.1)

    return train_arm, calls


@pytest.mark.slow
def test_confirm_resumes_after_a_kill_and_reruns_only_the_missing_runs(tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    s = study([trial("moe", 0.80, 100, 1.0), trial("dense", 0.70, 100, 0.95), trial("dense", 0.75, 90, 1.08, width=24)],
              storage=storage)
    cfg = load_study_config("smoke", results_dir=str(tmp_path))
    monkeypatch.setattr("nas.trial.build_context", lambda cfg: None)
    train_arm, calls = fake_run({True: 0.8, False: 0.6})

    def killed_after_four(ctx, a, seed, steps):
        if len(calls) == 4:
            raise KeyboardInterrupt
        return train_arm(ctx, a, seed, steps)

    monkeypatch.setattr(stage, "train_arm", killed_after_four)
    with pytest.raises(KeyboardInterrupt):
        stage.confirm(s, cfg, seeds=3)
    assert len(stage.stored_runs(stage.companion(s))) == 4
    monkeypatch.setattr(stage, "train_arm", train_arm)
    record = stage.confirm(s, cfg, seeds=3)
    assert len(calls) == 9  # 3 arms x 3 seeds, each trained once: 4 before the kill, 5 after
    assert len(set(calls)) == 9
    assert [(p["comparator"], p["also"]) for p in record.pairs] == [("twin", ["latency"]), ("flops", [])]
    assert all(r["n_seeds"] == 3 and r["verdict"] == "beats" for r in record.results)  # 0.8 against 0.6
    again = stage.confirm(s, cfg, seeds=3)
    assert len(calls) == 9 and again.results == record.results  # nothing missing: nothing retrained
    # The report reads it all from storage: one row per pair, its verdict beside its interval.
    from nas.pareto import analyze

    confirmed = analyze(s).confirmed
    assert confirmed["verdict"].tolist() == ["beats"] * 2
    assert ((confirmed["ci_low"] <= confirmed["gain_mean"]) & (confirmed["gain_mean"] <= confirmed["ci_high"])).all()


@pytest.mark.slow
def test_smoke_search_then_confirm_from_an_empty_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--config", "smoke", "--n-trials", "3", "--no-progress"]) == 0  # confirms at the end
    assert "pairs with 3 seeds at 60 steps" in capsys.readouterr().out
    assert main(["confirm", "--study", "smoke", "--seeds", "3", "--no-progress"]) == 0  # all stored: trains nothing
    assert "pairs with 3 seeds at 60 steps" in capsys.readouterr().out
    beats = pd.read_csv(tmp_path / "results" / "smoke" / "beats_dense.csv")
    assert {"gain_mean", "ci_low", "ci_high", "p_holm", "n_seeds", "steps", "verdict", "comparator", "cost"} <= set(
        beats.columns)
    assert len(beats) >= 1 and (beats["n_seeds"] == 3).all() and (beats["steps"] == 60).all()
    assert ((beats["ci_low"] <= beats["gain_mean"]) & (beats["gain_mean"] <= beats["ci_high"])).all()
    assert (beats.loc[beats["verdict"] == "beats", "ci_low"] > 0).all()
    md = (tmp_path / "results" / "smoke" / "report.md").read_text()
    assert "MoE against dense, confirmed (3 seeds, 60 steps" in md
    assert "confirmed pairs" in (tmp_path / "results" / "smoke" / "pareto.html").read_text()


@pytest.mark.parametrize("enabled, flags, runs", [(True, [], 1), (False, [], 0), (True, ["--no-confirm"], 0)])
def test_search_confirms_at_the_end_unless_the_study_or_the_flag_says_not(tmp_path, monkeypatch, enabled, flags, runs):
    import yaml

    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(load_study_config("smoke").to_yaml()),
                                      "confirm": {"enabled": enabled, "seeds": 2}}))
    calls = []
    monkeypatch.setattr("nas.search.run_search", lambda cfg, **kw: study([trial("dense", 0.7, 100, 1.0)]))
    monkeypatch.setattr(stage, "confirm", lambda s, cfg, **kw: calls.append(cfg.confirm.seeds) or records.ConfirmRecord(
        {"seeds": [0, 1], "steps": 60, "margin": 0.0, "latency_band": 0.1}))
    assert main(["search", "--config", str(config), "--no-progress", "--no-report", *flags]) == 0
    assert calls == [2] * runs


def test_confirm_command_refuses_bad_flags_and_names_a_missing_study(tmp_path, capsys):
    assert main(["confirm", "--study", "gone", "--results-dir", str(tmp_path), "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["confirm", "--study", "gone", "--results-dir", str(tmp_path)]) == 2
    assert str(tmp_path / "gone" / "study.db") in capsys.readouterr().err
    folder = tmp_path / "hand"
    folder.mkdir()
    study([trial("moe", 0.8, 100, 1.0)], storage=f"sqlite:///{folder / 'study.db'}")
    assert main(["confirm", "--study", "hand", "--results-dir", str(tmp_path)]) == 2
    assert "stores no config" in capsys.readouterr().err


@pytest.mark.slow
def test_a_dense_trials_search_run_is_its_seed_0_and_is_not_trained_again(tmp_path, monkeypatch):
    import yaml

    from nas.storage import load_study
    from nas.study import StudyConfig
    from nas.trial import build_context

    dense = {"depth": 2, "width": 16, "patch_size": 4, "mlp_ratio": 2.0, "num_experts": 0}
    moe = {**dense, "num_experts": 4, "top_k": 1, "moe_placement": "last1", "routing": "per_image",
           "router_loss_weight": 0.3}
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({
        "study_name": "reuse", "data": {"name": "synthetic", "limit": 300}, "objectives": ["accuracy", "flops"],
        "space": {"patch_sizes": [4], "depths": [2], "widths": [16], "head_width": 8, "mlp_ratios": [2.0],
                  "num_experts": [0, 4], "top_k": [1], "placements": ["last1"]},
        "n_trials": 2, "enqueue": [dense, moe], "results_dir": str(tmp_path / "r"), "confirm": {"enabled": False},
        "evaluator": {"min_steps": 6, "max_steps": 18, "batch_size": 32, "num_threads": 1},
    }))
    assert main(["search", "--config", str(config), "--no-progress", "--no-report"]) == 0
    s = load_study("reuse", results_dir=tmp_path / "r")
    searched = next(r for r in records.read_all(s) if r.kind == "dense")
    cfg = StudyConfig.from_dict(records.read_study(s).config)
    retrained = stage.train_arm(build_context(cfg), searched.arch, cfg.recipe().seed, 18)
    assert (retrained.correct == searched.val_correct).all()  # the same run, image for image
    assert retrained.accuracy == searched.metrics.accuracy

    calls = []
    monkeypatch.setattr(stage, "train_arm", lambda ctx, a, seed, steps: calls.append((a.is_moe, seed)) or
                        records.ConfirmRun(a, seed, steps, 0.5, np.ones(len(searched.val_correct), bool)))
    stage.confirm(s, cfg, seeds=2)
    assert sorted(calls) == [(False, 1), (True, 0), (True, 1)]  # the twin's seed 0 came from the search
