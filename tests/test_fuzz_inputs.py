"""Fuzzing what users type: study YAML (enqueue entries, spaces), architecture YAML, raw YAML text and the
CLI's numeric flags. Each input is refused with one `error:` line and exit status 2, or accepted; no other
exception. Nothing runs for real: a search or profile that validation lets through stops at its start."""

import contextlib
import io
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nas.cli import main
from nas.config import ConfigError, safe_yaml_load
from search_spaces import ArchConfig
from search_spaces.mobile_vmoe import PARAMS

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

hostile_numbers = st.one_of(  # large ones past every limit: a valid 40 GB model would be built for real
    st.integers(-3, 70), st.sampled_from([0, -1, 10**30, 2**63]),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, 1e-9, 0.001, 0.5, 2.0, 4.0, 1e300]),
)
hostile = st.one_of(
    st.none(), st.booleans(), hostile_numbers, st.text(max_size=8),
    st.sampled_from(["last0", "last2", "alternate", "4,5", "-1", "per_image", "per_token", "x" * 500]),
    st.lists(hostile_numbers, max_size=3), st.dictionaries(st.text(max_size=3), hostile_numbers, max_size=2),
)
choices = st.one_of(hostile, st.lists(hostile, max_size=4))
SPACE_FIELDS = ["patch_sizes", "depths", "widths", "head_width", "num_heads", "mlp_ratios", "num_experts", "top_k",
                "placements", "routings", "router_loss_weights", "name"]
ENQUEUE_KEYS = list(PARAMS) + ["head_width", "validate", "to_dict", "__class__", "sample", "widths", ""]


class Started(Exception):
    """Raised where a search or a profile would start its work: the input passed validation."""


def start(*args, **kwargs):
    raise Started


def run_cli(argv: list[str]) -> None:
    """Run the CLI; it must succeed (reach its work) or refuse with exit 2 and one error line."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with (mock.patch("nas.search.run_search", start), mock.patch("profilers.profile", start),
          contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr)):
        try:
            status = main(argv)
        except Started:
            return
        except SystemExit as exit:  # argparse's refusal of a value that is not a number: its usage, then the error
            status = exit.code
    err = stderr.getvalue()
    assert "Traceback" not in err, err
    if status == 0:
        return
    assert status == 2 and err.strip().splitlines()[-1].startswith("vmoe-nas"), err
    assert ": error: " in err.strip().splitlines()[-1] and len(err) < 3000, err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def written(folder, data) -> str:
    path = folder / "input.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@FUZZ
@given(
    space=st.dictionaries(st.sampled_from(SPACE_FIELDS), choices, max_size=4),
    enqueue=st.one_of(hostile, st.lists(st.one_of(st.text(max_size=12), st.dictionaries(
        st.sampled_from(ENQUEUE_KEYS), hostile, max_size=4)), max_size=3)),
)
def test_any_study_space_and_enqueue_is_refused_cleanly_or_accepted(folder, space, enqueue):
    study = {"data": {"name": "synthetic"}, "objectives": ["accuracy", "flops"], "space": space, "enqueue": enqueue}
    run_cli(["search", "--config", written(folder, study), "--results-dir", str(folder / "results")])


numbers = st.one_of(hostile_numbers.map(str), st.text(max_size=6), st.sampled_from(["nan", "inf", "1e400", "0x10"]))


@FUZZ
@given(threads=numbers, batch=numbers)
def test_any_profile_threads_and_batch_are_refused_cleanly_or_accepted(threads, batch):
    run_cli(["profile", "fmnist-vit-4x32", f"--threads={threads}", f"--batch={batch}"])


@FUZZ
@given(n_trials=numbers, workers=numbers, timeout=numbers)
def test_any_search_counts_are_refused_cleanly_or_accepted(folder, n_trials, workers, timeout):
    run_cli(["search", "--config", "smoke", f"--n-trials={n_trials}", f"--workers={workers}", f"--timeout={timeout}",
             "--results-dir", str(folder / "results")])


ARCH = {"image_size": 28, "in_channels": 1, "patch_size": 7, "num_classes": 10, "depth": 2, "width": 32,
        "num_heads": 2, "mlp_ratio": 4.0}
MOE = {"num_experts": 4, "top_k": 1, "layers": [1], "routing": "per_image", "router_loss_weight": 0.3}


@FUZZ
@given(arch=st.dictionaries(st.sampled_from(list(ARCH) + ["moe", "bogus"]), hostile, max_size=3),
       moe=st.one_of(st.none(), st.dictionaries(st.sampled_from(list(MOE) + ["bogus"]), hostile, max_size=3)))
def test_describe_any_architecture_file(folder, arch, moe):
    data = {**ARCH, **arch} if moe is None else {**ARCH, **arch, "moe": {**MOE, **moe}}
    run_cli(["describe", written(folder, data)])


@FUZZ
@given(text=st.one_of(st.binary(max_size=80), st.text(alphabet=st.sampled_from("ab:-[]{}&*!|>'\"#%@ \n\t0.,"),
                                                      max_size=80)))
def test_any_yaml_text_parses_or_gives_one_config_error(text):
    try:
        data = safe_yaml_load(text)
    except ConfigError as error:
        assert error.field == "config" and "\n" not in str(error)
        return
    try:
        ArchConfig.from_dict(data)
    except ConfigError:
        pass
