import pytest
import yaml

from nas.study import EarlyStopping, StudyConfig, load_study_config, study_preset_names
from nas.trial import early_stop_reason
from search_spaces import ConfigError


def test_presets_load_and_round_trip(tmp_path):
    assert {"smoke", "fashion-quick"} <= set(study_preset_names())
    for name in study_preset_names():
        cfg = load_study_config(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(cfg.to_yaml())
        assert load_study_config(path) == cfg


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
    ({"early_stopping": {"quantile": 2}}, "early_stopping.quantile", "(0, 1)"),
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


RULE = EarlyStopping(min_peers=3, quantile=0.25, flops_ratio=2.0)


def test_early_stopping_needs_enough_peers_of_similar_cost():
    peers = [(100, 0.8), (110, 0.82), (1000, 0.9), (1100, 0.95)]
    assert early_stop_reason(0.1, 100, peers, RULE) is None  # only 2 peers within 2x FLOPs


def test_early_stopping_stops_a_trial_that_trails_its_peers():
    peers = [(100, 0.60), (150, 0.70), (190, 0.80), (60, 0.75), (5000, 0.99)]
    reason = early_stop_reason(0.50, 100, peers, RULE)
    assert "below the 0.25 quantile" in reason and "4 finished trials" in reason
    assert early_stop_reason(0.70, 100, peers, RULE) is None  # above the first quartile of its peers


def test_early_stopping_compares_like_with_like():
    """A cheap model is not stopped for trailing expensive ones."""
    expensive = [(1000, 0.9), (1200, 0.92), (900, 0.91)]
    assert early_stop_reason(0.5, 100, expensive, RULE) is None
