import optuna
import pytest
import yaml

from nas.config import ConfigError
from nas.study import Rungs, StudyConfig, load_study_config, study_preset_names


def test_presets_load_and_round_trip(tmp_path):
    assert {"smoke", "fashion-quick", "positive-control"} <= set(study_preset_names())
    for name in study_preset_names():
        cfg = load_study_config(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(cfg.to_yaml())
        assert load_study_config(path) == cfg


def test_the_positive_control_enqueues_an_moe_and_its_flops_twin():
    cfg = load_study_config("positive-control")
    dense, moe = (cfg.space.sample(optuna.trial.FixedTrial(params), image_size=8, in_channels=1, num_classes=32)
                  for params in cfg.enqueued_params())
    assert (dense.is_moe, moe.moe.num_experts, moe.moe.top_k, moe.moe.routing) == (False, 8, 1, "per_image")
    assert moe.dense() == dense  # the pair the confirmation compares: the same architecture with E=0
    assert cfg.data.name.startswith("synthetic:mode=lookup") and "groups=8" in cfg.data.name


def test_flags_override_the_config():
    cfg = load_study_config("smoke", n_trials=3, data_name="npz:/x.npz", storage="sqlite:///x.db", workers=None)
    assert (cfg.n_trials, cfg.data.name, cfg.storage, cfg.workers) == (3, "npz:/x.npz", "sqlite:///x.db", 1)
    assert cfg.directions == ["maximize", "minimize", "minimize"]


BAD = [
    ({"objectives": ["accuracy", "speed"]}, "objectives", "unknown objective"),
    ({"objectives": []}, "objectives", "must list"),
    ({"sampler": "cmaes"}, "sampler", "tpe"),
    ({"n_trials": 0}, "n_trials", ">= 1"),
    ({"n_trials": None, "timeout": None}, "n_trials", "never ends"),
    ({"workers": 0}, "workers", ">= 1"),
    ({"study_name": "a b"}, "study_name", "letters"),
    ({"constraints": {"max_latency_ms": -1}}, "constraints.max_latency_ms", ">= "),
    ({"constraints": {"max_power": 1}}, "constraints.max_power", "unknown field"),
    ({"profiler": {"backend": "tflite"}}, "profiler.backend", "onnxruntime"),
    ({"profiler": {"backend": "remote"}}, "profiler.remote_url", "URL"),
    ({"space": {"depths": []}}, "space.depths", "at least one"),
    ({"space": {"name": "resnet"}}, "space.name", "unknown search space"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction", "(0, 1)"),
    ({"evaluator": {"min_steps": 10, "max_steps": 5}}, "evaluator.max_steps", ">= min_steps"),
    ({"evaluator": {"min_steps": 10, "max_steps": 90, "reduction_factor": 1}}, "evaluator.reduction_factor", ">= 2"),
    ({"evaluator": {"min_steps": 10, "max_steps": 90, "steps": 90}}, "evaluator.steps", "not both"),
    ({"enqueue": ["no-such-preset"]}, "enqueue", "neither a file nor a preset"),
    ({"colour": "red"}, "colour", "unknown field"),
]


@pytest.mark.parametrize("change, field, message", BAD, ids=[b[1] for b in BAD])
def test_bad_study_config_names_the_field(change, field, message, tmp_path):
    data = {**yaml.safe_load(load_study_config("smoke").to_yaml()), **change}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as error:
        cfg = load_study_config(path)
        cfg.enqueued_params()
    assert error.value.field == field
    assert message in str(error.value)


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a study preset"):
        load_study_config("no-such-study")
    path = tmp_path / "s.yaml"
    path.write_text("objectives: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study_config(path)


def test_enqueued_presets_become_space_parameters():
    cfg = StudyConfig.from_dict({
        "data": {"name": "fashion-mnist"},
        "space": {"depths": [6], "widths": [64], "head_width": 32, "num_experts": [0, 4], "placements": ["last2"]},
        "enqueue": ["fmnist-vit-6x64", "fmnist-vmoe-6x64"],
    })
    dense, moe = cfg.enqueued_params()
    assert dense == {"depth": 6, "width": 64, "patch_size": 4, "mlp_ratio": 4.0, "num_experts": 0}
    assert moe["num_experts"] == 4 and moe["moe_placement"] == "last2" and moe["top_k"] == 1


def test_rungs_multiply_by_the_reduction_factor_up_to_the_full_budget():
    assert Rungs.of({"min_steps": 150, "max_steps": 1350, "reduction_factor": 3}) == Rungs((150, 450, 1350), 3)
    assert Rungs.of({"min_steps": 100, "max_steps": 1000, "reduction_factor": 3}).steps == (100, 300, 900, 1000)
    assert Rungs.of({"min_steps": 50, "max_steps": 50}).steps == (50,)
    assert Rungs.of({"steps": 300}).steps == (300,) and Rungs.of({"epochs": 1}) is None
    cfg = StudyConfig.from_dict({"evaluator": {"min_steps": 150, "max_steps": 1350, "batch_size": 32}})
    assert cfg.recipe().steps == 1350 and cfg.rungs.steps == (150, 450, 1350)  # one schedule across the rungs


def test_a_study_stored_with_the_early_stopping_rule_still_loads():
    data = {**yaml.safe_load(load_study_config("smoke").to_yaml()), "early_stopping": {"enabled": True}}
    assert StudyConfig.from_dict(data).study_name == "smoke"
