"""Property-based: any config, however wrong, is accepted or refused with one ConfigError naming a field;
no traceback from inside torch, Optuna or YAML reaches the user."""

from dataclasses import fields

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nas.cli import main
from nas.config import ConfigError
from nas.study import StudyConfig, load_study_config
from search_spaces import ArchConfig, MoEConfig

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
    "profiler": ["backend", "threads", "batch", "remote_url"],
    "evaluator": ["epochs", "steps", "seconds", "batch_size", "lr", "eval_every", "min_steps", "max_steps",
                  "reduction_factor"],
}
TOP = ["study_name", "objectives", "sampler", "seed", "n_trials", "timeout", "workers", "storage", "enqueue",
       "heartbeat_interval", "trial_timeout"]


@pytest.mark.slow
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


# --- Hardening: each input below once crashed with a traceback or was silently accepted -----------------

ARCH = {"image_size": 28, "in_channels": 1, "patch_size": 7, "num_classes": 10, "depth": 2, "width": 32,
        "num_heads": 2, "mlp_ratio": 4.0}


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """A refused input must be refused before any search or profile starts."""
    def started(*args, **kwargs):
        raise AssertionError("the input was accepted: work started")

    monkeypatch.setattr("nas.search.run_search", started)
    monkeypatch.setattr("profilers.profile", started)


def refused(argv: list[str], capsys) -> str:
    """The CLI refuses: exit status 2 and one `error:` line, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("ratio", [".inf", ".nan", "-.inf", "0.001"])
def test_describe_refuses_an_mlp_ratio_that_builds_no_mlp(ratio, tmp_path, capsys):
    path = tmp_path / "arch.yaml"
    path.write_text(yaml.safe_dump(ARCH).replace("mlp_ratio: 4.0", f"mlp_ratio: {ratio}"))
    assert "mlp_ratio: " in refused(["describe", str(path)], capsys)


def test_non_utf8_yaml_is_refused_naming_the_file(tmp_path, capsys):
    arch, study = tmp_path / "arch.yaml", tmp_path / "study.yaml"
    arch.write_bytes(yaml.safe_dump(ARCH).encode() + b"# caf\xe9\n")
    study.write_bytes(b"study_name: caf\xe9\n")
    assert f"{arch}: not UTF-8" in refused(["describe", str(arch)], capsys)
    assert f"{study}: not UTF-8" in refused(["search", "--config", str(study), "--no-progress"], capsys)


def write_study(path, **fields) -> str:
    path.write_text(yaml.safe_dump({"data": {"name": "synthetic"}, "objectives": ["accuracy", "flops"], **fields}))
    return str(path)


@pytest.mark.parametrize("entry, name", [({"head_width": 16}, "head_width"), ({"validate": 1}, "validate"),
                                         ({"num_heads": 2}, "num_heads")])  # the default space derives heads
def test_enqueue_entry_naming_no_parameter_is_refused(entry, name, tmp_path, capsys):
    study = write_study(tmp_path / "study.yaml", enqueue=[entry])
    assert f"enqueue: unknown parameter '{name}'" in refused(["search", "--config", study], capsys)


@pytest.mark.parametrize("flag", ["--threads", "--batch"])
@pytest.mark.parametrize("value", ["-1", "0"])
def test_profile_refuses_counts_below_one(flag, value, capsys):
    err = refused(["profile", "fmnist-vit-4x32", flag, value], capsys)
    assert f"{flag}: must be >= 1, got {value}" in err


@pytest.mark.parametrize(
    "space, fields",
    [({"placements": ["last0"]}, "top_k, placements, depths and routings"),
     ({"widths": [48], "head_width": 5}, "widths, head_width and mlp_ratios"),
     ({"widths": [32], "head_width": None, "num_heads": [3, 5]}, "widths, num_heads and mlp_ratios"),
     ({"widths": [32], "mlp_ratios": [0.01]}, "widths, head_width and mlp_ratios"),
     ({"num_experts": [1], "top_k": [2]}, "top_k, placements, depths and routings"),
     ({"depths": [1], "placements": ["last1"]}, "top_k, placements, depths and routings")],
)
def test_space_with_no_buildable_architecture_is_refused(space, fields, tmp_path, capsys):
    study = write_study(tmp_path / "study.yaml", space=space)
    err = refused(["search", "--config", study], capsys)
    assert "space: " in err and fields in err


def alias_bomb(levels: int = 7) -> str:
    """A few hundred bytes that expand 9**levels-fold."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nwidth: *l{levels - 1}\n"


def test_yaml_alias_bombs_are_refused_with_a_short_message(tmp_path, capsys):
    bomb = alias_bomb()
    assert len(bomb) < 500
    for argv in (["describe", "ARCH"], ["search", "--config", "ARCH"], ["train", "ARCH"]):
        path = tmp_path / "bomb.yaml"
        path.write_text(bomb)
        err = refused([str(path) if a == "ARCH" else a for a in argv], capsys)
        assert "more than 100,000 values once its aliases (*) are expanded" in err and len(err) < 300


def test_config_errors_show_values_briefly():
    with pytest.raises(ConfigError) as error:
        ArchConfig.from_dict({**ARCH, "width": "w" * 10_000})
    assert len(str(error.value)) < 200 and "..." in str(error.value)
