"""Export: pick rules on hand-made trials; the files of an export from a tiny real study, the rebuilt model's
params and FLOPs, ONNX parity, Core ML (or its note), and an all-or-nothing output directory."""

import json
import os
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from pareto_trials import study, trial
from tiny_study import STUDY, tiny_study_results

import nas.formats
import profilers
from nas.cli import main
from nas.data import load_dataset
from nas.export import EXPORT_MARKER, export_trial, pick_trial
from nas.formats import ExportError
from nas.full_train import load_train_config
from nas.pareto import analyze
from nas.storage import load_study
from search_spaces import ArchConfig, build_model, count_params

HAND = [
    trial("dense", 0.70, 100, 1.0),  # 0
    trial("dense", 0.80, 200, 2.0),  # 1
    trial("moe", 0.78, 160, 1.5),  # 2: +0.08 over 0 at equal FLOPs and latency
    trial("moe", 0.85, 300, 3.0),  # 3: +0.05 over 1
    trial("moe", 0.85, 250, 4.0),  # 4: as accurate as 3 with fewer FLOPs; +0.05 over 1 at equal FLOPs
    trial("dense", 0.95, 900, 9.0, constraint=1.0),  # 5: never picked
]


@pytest.mark.parametrize("rule, expected", [
    ("best-accuracy", 4), ("best-moe", 4), ("best-moe-under-latency:3.5", 3), ("best-moe-under-latency:1.5", 2),
    ("best-moe-under-flops:2e2", 2), ("best-moe-under-flops:260", 4), ("largest-gain-flops", 2),
    ("largest-gain-latency", 2),
])
def test_pick_rules(rule, expected):
    assert pick_trial(analyze(study(HAND)), rule) == expected


@pytest.mark.parametrize("rule, message", [
    ("best-moe-under-latency:1", "no completed MoE trial has latency_ms <= 1 (the smallest is 1.5)"),
    ("best-moe-under-flops:lots", "not a number"),
    ("best-moe:3", "unknown rule"),
    ("fastest", "unknown rule"),
])
def test_pick_rules_refuse_clearly(rule, message):
    with pytest.raises(ExportError, match=re.escape(message)):
        pick_trial(analyze(study(HAND)), rule)


def test_largest_gain_needs_an_moe_that_beats_dense():
    with pytest.raises(ExportError, match="no MoE beats dense at equal flops"):
        pick_trial(analyze(study([trial("dense", 0.9, 100, 1.0), trial("moe", 0.8, 100, 1.0)])), "largest-gain-flops")
    with pytest.raises(ExportError, match="has a dense trial of no more latency to compare with"):
        pick_trial(analyze(study([trial("moe", 0.8, 100, 1.0)])), "largest-gain-latency")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tiny_study_results(tmp_path_factory)


@pytest.mark.slow
def test_export_of_the_moe_rebuilds_the_trial(results, tmp_path, monkeypatch, capsys):
    def broken_converter(*args, **kwargs):
        raise RuntimeError("converter broke")

    monkeypatch.setattr(profilers, "export_coreml", broken_converter)  # Core ML failing must not fail the export
    out = tmp_path / "moe"
    assert main(["export", "--study", STUDY, "--results-dir", str(results), "--pick", "best-moe", "--out", str(out),
                 "--epochs", "2", "--no-executorch"]) == 0  # tests/test_executorch.py lowers it
    assert f"vmoe-nas train {out / 'train.yaml'}" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"arch.yaml", "train.yaml", "superclasses.json", "model.onnx",
                                               "model_card.md", "trial.json", "input.json", EXPORT_MARKER}
    recorded = load_study(STUDY, results_dir=results).trials[1]
    metrics = recorded.user_attrs  # each metric is a user attribute
    cfg = ArchConfig.load(out / "arch.yaml")
    assert cfg.is_moe and cfg.config_hash() == recorded.user_attrs["config_hash"]
    assert count_params(build_model(cfg)) == (metrics["params_total"], metrics["params_active"])
    assert profilers.count_flops(cfg).total == metrics["flops"]

    onnx.checker.check_model(str(out / "model.onnx"))
    data = load_dataset("synthetic", limit=600)  # the study's data: the model's input is normalised as it was
    info = json.loads((out / "input.json").read_text())
    assert (info["mean"], info["std"], info["class_names"]) == (list(data.mean), list(data.std), list(data.class_names))
    assert (info["image_size"], info["in_channels"], info["routing"], info["num_experts"], info["top_k"]) == (
        16, 1, "per_image", cfg.moe.num_experts, cfg.moe.top_k)
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert props == {key: value if isinstance(value, str) else json.dumps(value) for key, value in info.items()}
    torch.manual_seed(0)  # the recipe's seed: the exported weights are this fresh model's
    model = build_model(cfg).eval()
    images = torch.randn(5, 1, 16, 16)
    (logits,) = ort.InferenceSession(str(out / "model.onnx")).run(None, {"images": images.numpy()})
    np.testing.assert_allclose(logits, model(images).detach().numpy(), atol=1e-4, rtol=0)

    train = load_train_config(out / "train.yaml")
    assert train.arch == cfg and train.output_dir == out / "run"
    assert (train.recipe.epochs, train.recipe.steps, train.recipe.seconds) == (2, None, None)
    assert (train.recipe.batch_size, train.recipe.lr) == (32, 1e-3)  # the study's recipe, full-length budget
    assert train.data == {"name": "synthetic", "data_dir": None, "val_fraction": 0.1, "seed": 0}  # no limit
    assert train.superclasses.class_to_group.tolist() == load_dataset("synthetic").superclasses.tolist()
    assert yaml.safe_load((out / "train.yaml").read_text())["source"] == {
        "study": STUDY, "trial": 1, "config_hash": cfg.config_hash()}

    card = (out / "model_card.md").read_text()
    assert f"{metrics['accuracy']:,.4g}" in card and "freshly initialised" in card
    assert "Core ML: not written: the Core ML conversion failed (RuntimeError: converter broke)" in card
    assert "at no more flops, one seed (the search's, unconfirmed):" in card and "torch: " in card
    assert "one multiply-add = 1 FLOP" in card and "MAC = 2" not in card  # fvcore's convention, as the tool counts


@pytest.mark.slow
def test_export_of_the_dense_trial_writes_core_ml(results, tmp_path):
    pytest.importorskip("coremltools")
    paths = export_trial(load_study(STUDY, results_dir=results), tmp_path / "dense", trial=0, executorch=False,
                         study_dir=results / STUDY)
    assert paths["model.mlpackage"].is_dir() and "superclasses.json" not in paths
    assert load_train_config(paths["train.yaml"]).superclasses is None
    assert "Core ML: form dense, fp16 ML programs: model.mlpackage" in paths["model_card.md"].read_text()


@pytest.mark.slow
def test_an_interrupted_export_leaves_no_directory_and_keeps_the_old_one(results, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nas.formats, "export_checked_onnx", interrupt)
    s = load_study(STUDY, results_dir=results)
    with pytest.raises(KeyboardInterrupt):
        export_trial(s, tmp_path / "new", trial=1, coreml=False, executorch=False, study_dir=results / STUDY)
    assert list(tmp_path.iterdir()) == []  # neither new/ nor a hidden partial one

    old = tmp_path / "old"
    old.mkdir()
    (old / "arch.yaml").write_text("kept")
    (old / EXPORT_MARKER).touch()  # an earlier export: --force may replace it
    with pytest.raises(ExportError, match="exists; pass --force"):
        export_trial(s, old, trial=1, coreml=False, executorch=False)
    with pytest.raises(KeyboardInterrupt):
        export_trial(s, old, trial=1, coreml=False, executorch=False, force=True, study_dir=results / STUDY)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "arch.yaml").read_text() == "kept"


@pytest.mark.slow
def test_export_force_after_an_export_killed_mid_swap_completes(results, tmp_path):
    s = load_study(STUDY, results_dir=results)
    out = tmp_path / "chosen"
    export_trial(s, out, trial=1, coreml=False, executorch=False, study_dir=results / STUDY)
    (tmp_path / ".chosen.old").mkdir()  # left by an export killed after moving the old folder aside
    (tmp_path / ".chosen.old" / "arch.yaml").write_text("stale")
    paths = export_trial(s, out, trial=0, coreml=False, executorch=False, force=True, study_dir=results / STUDY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chosen"] and paths["arch.yaml"].read_text() != "stale"

    os.replace(out, tmp_path / ".chosen.old")  # killed between the renames: only the old export is whole
    export_trial(s, out, trial=1, coreml=False, executorch=False, force=True, study_dir=results / STUDY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chosen"]


@pytest.mark.slow
def test_export_force_never_deletes_a_training_run(results, tmp_path):
    s = load_study(STUDY, results_dir=results)
    out = tmp_path / "chosen"
    export_trial(s, out, trial=1, coreml=False, executorch=False, study_dir=results / STUDY)
    (out / "run").mkdir()
    (out / "run" / "model.pt").write_text("trained for hours")
    with pytest.raises(ExportError, match="holds a training run"):
        export_trial(s, out, trial=0, coreml=False, executorch=False, force=True, study_dir=results / STUDY)
    assert (out / "run" / "model.pt").read_text() == "trained for hours"


@pytest.mark.slow
def test_export_force_never_replaces_a_study_or_a_folder_it_did_not_write(results, tmp_path, capsys):
    """`export --out results/<study> --force` deleted the study (study.db, search.log)."""
    study_dir = tmp_path / "results" / STUDY
    shutil.copytree(results / STUDY, study_dir)
    kept = {p.name: p.read_bytes() for p in study_dir.iterdir() if p.is_file()}
    base = ["export", "--study", STUDY, "--results-dir", str(tmp_path / "results"), "--trial", "1", "--no-coreml"]
    assert main([*base, "--out", str(study_dir), "--force"]) == 2
    assert "study.db holds a study storage" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in study_dir.iterdir() if p.is_file()} == kept
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    assert main([*base, "--out", str(mine), "--force"]) == 2
    assert "not an export written by vmoe-nas" in capsys.readouterr().err
    assert (mine / "todo.txt").read_text() == "mine"
    assert main([*base, "--out", str(tmp_path / "export")]) == 0  # an export: --force replaces it
    assert main([*base, "--out", str(tmp_path / "export"), "--force"]) == 0


@pytest.mark.slow
def test_export_command_refuses_a_bad_trial_and_rule(results, tmp_path, capsys):
    base = ["export", "--study", STUDY, "--results-dir", str(results), "--out", str(tmp_path / "x")]
    assert main(base + ["--trial", "7"]) == 2
    assert "has trials 0..1, not 7" in capsys.readouterr().err
    assert main(base + ["--pick", "best-moe-under-flops:10"]) == 2
    assert "no completed MoE trial has flops <= 10" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
