"""`vmoe-nas train` on an exported configuration: resume after an interruption, refuse what it cannot or must
not train. The budget in train.yaml is cut to 16 steps (evaluating, so checkpointing, every 8)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

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


@pytest.mark.slow
def test_training_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_run(exported, tmp_path, monkeypatch,
                                                                                    capsys):
    with monkeypatch.context() as patch:  # the reference run: its ONNX export is not what is compared
        patch.setattr(nas.full_train, "formats_in", lambda folder: [])
        reference = run_training(copy_of(exported, tmp_path, "reference"), progress=False)

    config = copy_of(exported, tmp_path)
    with monkeypatch.context() as patch:
        stop_at(patch, STOP_AT)
        assert main(["train", str(config), "--no-progress"]) == 130
    run = config.parent / "run"
    assert torch.load(run / CHECKPOINT_NAME, weights_only=True)["state"]["step"] == EVAL_EVERY
    assert not (run / "metrics.json").exists()

    assert main(["train", str(config)]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"resuming from {run / CHECKPOINT_NAME}" in out
    assert f"(step {STEPS}): val accuracy {metrics['val_accuracy']:.4f}" in out  # each evaluation, on its own line
    assert f"train {metrics['name']}: 100%" in err and "val_accuracy=" in err  # the labelled progress bar
    assert metrics["steps"] == reference["steps"] == STEPS
    assert metrics["result"]["evals"] == reference["result"]["evals"]  # same steps, so the same accuracies
    assert metrics["test_accuracy"] == reference["test_accuracy"] is not None
    assert metrics["source"] == {"study": STUDY, "trial": 1, "config_hash": ArchConfig.load(
        config.parent / "arch.yaml").config_hash()}
    assert metrics["exports"]["ONNX"].startswith("`model.onnx`") and (run / "model.onnx").is_file()
    assert metrics["exports"].keys() == {"ONNX"}  # the export wrote no Core ML: nor does training
    saved = torch.load(run / "model.pt", weights_only=True)
    build_model(ArchConfig.from_dict(saved["arch"])).load_state_dict(saved["model"])


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_signal_saves_the_steps_since_the_last_evaluation_and_says_so(exported, tmp_path, monkeypatch, capsys):
    """Ctrl-C before the first evaluation saved nothing and said "resume from run/checkpoint.pt"."""
    config = copy_of(exported, tmp_path)
    real_step = nas.trainer._Run.step

    def step_then_interrupt(run):
        if run.state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # during step 4 of 16, before the first evaluation (step 8)
        return real_step(run)

    monkeypatch.setattr(nas.trainer._Run, "step", step_then_interrupt)
    assert main(["train", str(config), "--no-progress"]) == 130
    run = config.parent / "run"
    assert f"interrupted (Ctrl-C): saved step 4 of {STEPS} to {run / CHECKPOINT_NAME}" in capsys.readouterr().err
    assert torch.load(run / CHECKPOINT_NAME, weights_only=True)["state"]["step"] == 4


@pytest.mark.slow
def test_a_second_train_on_one_run_folder_is_one_clear_error(exported, tmp_path, capsys):
    config = copy_of(exported, tmp_path)
    data = yaml.safe_load(config.read_text())
    data["recipe"].update(steps=1_000_000, eval_every=1)  # runs until killed, checkpointing at every step
    config.write_text(yaml.safe_dump(data))
    first = subprocess.Popen([sys.executable, "-m", "nas.cli", "train", str(config), "--no-progress"])
    try:
        deadline = time.monotonic() + 120
        while not (config.parent / "run" / CHECKPOINT_NAME).is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended"
        assert main(["train", str(config), "--no-progress"]) == 2
        assert "is in use by another vmoe-nas train" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_training_writes_every_format_the_export_wrote_from_the_trained_weights(tmp_path, tmp_path_factory):
    coremltools = pytest.importorskip("coremltools")
    results = tiny_study_results(tmp_path_factory)
    out = tmp_path / "dense"
    export_trial(load_study(STUDY, results_dir=results), out, trial=0, study_dir=results / STUDY, executorch=False)
    assert (out / "model.mlpackage").is_dir()
    config = yaml.safe_load((out / "train.yaml").read_text())
    config["recipe"].update(epochs=None, steps=4, eval_every=4)
    (out / "train.yaml").write_text(yaml.safe_dump(config))
    metrics = run_training(out / "train.yaml", progress=False)
    assert metrics["exports"].keys() == {"ONNX", "Core ML"} and "not written" not in metrics["exports"]["Core ML"]
    trained = torch.load(out / "run" / "model.pt", weights_only=True)["model"]["head.weight"]
    weights = next((out / "run" / "model.mlpackage").rglob("weight.bin")).read_bytes()
    assert trained.half().numpy().tobytes() in weights  # the trained head, as the fp16 program holds it
    fresh = next((out / "model.mlpackage").rglob("weight.bin")).read_bytes()
    assert trained.half().numpy().tobytes() not in fresh
    spec = coremltools.utils.load_spec(str(out / "run" / "model.mlpackage"))
    info = json.loads((out / "run" / "input.json").read_text())
    assert spec.description.metadata.userDefined["mean"] == json.dumps(info["mean"]) == json.dumps(metrics[
        "normalisation"]["mean"])
