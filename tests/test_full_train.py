"""`vmoe-nas train` on an exported configuration: resume after an interruption, refuse what it cannot or must
not train. The budget in train.yaml is cut to 16 steps (evaluating, so checkpointing, every 8)."""

import json
import shutil

import pytest
import torch
import yaml
from tiny_study import STUDY, tiny_study_results

import nas.full_train
import nas.trainer
from nas.cli import main
from nas.export import export_trial
from nas.full_train import run_training
from nas.storage import load_study
from nas.trainer import CHECKPOINT_NAME
from search_spaces import ArchConfig, build_model

STEPS, EVAL_EVERY, STOP_AT = 16, 8, 12


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The study's MoE exported as `vmoe-nas export` does, with a 16-step budget in its train.yaml."""
    results = tiny_study_results(tmp_path_factory)
    out = tmp_path_factory.mktemp("export") / "moe"
    export_trial(load_study(STUDY, results_dir=results), out, trial=1, coreml=False, executorch=False,
                 study_dir=results / STUDY)
    config = yaml.safe_load((out / "train.yaml").read_text())
    config["recipe"].update(epochs=None, steps=STEPS, eval_every=EVAL_EVERY)
    (out / "train.yaml").write_text(yaml.safe_dump(config))
    return out


def copy_of(exported, tmp_path, name="run"):
    return shutil.copytree(exported, tmp_path / name) / "train.yaml"


def stop_at(monkeypatch, step: int):
    """Interrupt training (as Ctrl-C would) just before `step`."""
    real_step = nas.trainer._Run.step

    def step_or_stop(run):
        if run.state.step == step:
            raise KeyboardInterrupt
        return real_step(run)

    monkeypatch.setattr(nas.trainer._Run, "step", step_or_stop)


def test_training_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_run(exported, tmp_path, monkeypatch,
                                                                                    capsys):
    with monkeypatch.context() as patch:  # the reference run: its ONNX export is not what is compared
        patch.setattr(nas.full_train, "export_checked_onnx", lambda model, path: 0.0)
        reference = run_training(copy_of(exported, tmp_path, "reference"), progress=False)

    config = copy_of(exported, tmp_path)
    with monkeypatch.context() as patch:
        stop_at(patch, STOP_AT)
        assert main(["train", str(config), "--no-progress"]) == 130
    run = config.parent / "run"
    assert torch.load(run / CHECKPOINT_NAME, weights_only=True)["state"]["step"] == EVAL_EVERY
    assert not (run / "metrics.json").exists()

    assert main(["train", str(config), "--no-progress"]) == 0
    assert f"resuming from {run / CHECKPOINT_NAME}" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == reference["steps"] == STEPS
    assert metrics["result"]["evals"] == reference["result"]["evals"]  # same steps, so the same accuracies
    assert metrics["test_accuracy"] == reference["test_accuracy"] is not None
    assert metrics["source"] == {"study": STUDY, "trial": 1, "config_hash": ArchConfig.load(
        config.parent / "arch.yaml").config_hash()}
    assert metrics["onnx_max_difference"] <= 1e-4 and (run / "model.onnx").is_file()
    saved = torch.load(run / "model.pt", weights_only=True)
    build_model(ArchConfig.from_dict(saved["arch"])).load_state_dict(saved["model"])


def test_a_finished_run_is_kept_unless_forced(exported, tmp_path, monkeypatch, capsys):
    config = copy_of(exported, tmp_path)
    run = config.parent / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    assert main(["train", str(config)]) == 2
    assert f"{run} holds a finished run" in capsys.readouterr().err
    stop_at(monkeypatch, 0)  # --force starts from scratch: the old metrics go before the first step
    assert main(["train", str(config), "--force", "--no-progress"]) == 130
    assert not (run / "metrics.json").exists()


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "train.yaml").unlink(), "train.yaml"),
    (lambda d: (d / "train.yaml").write_text("arch: [unclosed"), "train.yaml"),
    (lambda d: (d / "train.yaml").write_text("arch: arch.yaml\n"), "data"),
    (lambda d: (d / "arch.yaml").unlink(), "arch.yaml"),
    (lambda d: (d / "arch.yaml").write_text("depth: -1\n"), "arch.yaml"),
    (lambda d: (d / "superclasses.json").write_text("{not json"), "superclasses.json"),
], ids=["no-train-yaml", "corrupt-train-yaml", "incomplete-train-yaml", "no-arch", "corrupt-arch",
        "corrupt-superclasses"])
def test_missing_or_corrupt_files_are_refused_by_name(exported, tmp_path, capsys, damage, named):
    config = copy_of(exported, tmp_path)
    damage(config.parent)
    assert main(["train", str(config)]) == 2
    error = capsys.readouterr().err
    assert named in error and "Traceback" not in error
    assert not (config.parent / "run").exists()
