"""Property-based: any config, however wrong, is accepted or refused with one ConfigError naming a field;
no traceback from inside torch, Optuna or YAML reaches the user."""

from dataclasses import fields

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nas.cli import main
from nas.study import StudyConfig, load_study_config
from search_spaces import ArchConfig, ConfigError, MoEConfig

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True), st.text(max_size=6),
    st.lists(st.integers(-2, 14), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
ARCH_FIELDS = [f.name for f in fields(ArchConfig) if f.name != "moe"]
MOE_FIELDS = [f.name for f in fields(MoEConfig)]


@settings(max_examples=300, deadline=None)
@given(
    arch=st.dictionaries(st.sampled_from(ARCH_FIELDS + ["bogus"]), junk, max_size=4),
    moe=st.one_of(st.none(), junk, st.dictionaries(st.sampled_from(MOE_FIELDS + ["bogus"]), junk, max_size=4)),
)
def test_any_arch_config_is_valid_or_names_its_bad_field(arch, moe):
    data = {**arch, "moe": moe} if moe is not None else arch
    try:
        cfg = ArchConfig.from_dict(data)
    except ConfigError as error:  # the field is a real one, or the unknown key the input gave
        given_keys = set(data) | ({f"moe.{k}" for k in moe} if isinstance(moe, dict) else set())
        assert error.field in set(ARCH_FIELDS) | {"moe"} | {f"moe.{f}" for f in MOE_FIELDS} | given_keys
        assert str(error).startswith(f"{error.field}: ")
        return
    assert ArchConfig.from_yaml(cfg.to_yaml()) == cfg


SECTIONS = {
    "data": ["name", "limit", "val_fraction", "seed"],
    "space": ["depths", "widths", "head_width", "num_heads", "num_experts", "top_k", "placements", "routings",
              "mlp_ratios", "patch_sizes", "router_loss_weights"],
    "constraints": ["max_latency_ms", "max_flops", "max_params", "max_size_mb"],
    "early_stopping": ["enabled", "min_peers", "quantile", "flops_ratio"],
    "profiler": ["backend", "threads", "batch", "remote_url"],
    "evaluator": ["epochs", "steps", "seconds", "batch_size", "lr", "eval_every"],
}
TOP = ["study_name", "objectives", "sampler", "seed", "n_trials", "timeout", "workers", "storage", "enqueue",
       "heartbeat_interval", "trial_timeout"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    section=st.sampled_from(sorted(SECTIONS)),
    changes=st.data(),
    top=st.dictionaries(st.sampled_from(TOP), junk, max_size=2),
)
def test_any_study_config_is_valid_or_names_its_bad_field(section, changes, top):
    base = yaml.safe_load(load_study_config("smoke").to_yaml())
    keys = st.sampled_from(SECTIONS[section] + ["bogus"])
    base[section] = {**(base.get(section) or {}), **changes.draw(st.dictionaries(keys, junk, max_size=3))}
    base.update(top)
    try:
        StudyConfig.from_dict(base)
    except ConfigError as error:
        assert str(error).startswith(f"{error.field}: ")
        assert error.field.split(".")[0] in set(SECTIONS) | set(TOP)


def test_cli_reports_bad_study_file_without_traceback(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"objectives": ["accuracy"], "space": {"widths": ["wide"]}}))
    assert main(["search", "--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "space.widths: choices must be positive integers, got 'wide'" in err and "Traceback" not in err
