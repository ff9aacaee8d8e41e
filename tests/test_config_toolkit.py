"""nas.config: the one number validator, `first_line`, and the open_study path that used to raise IndexError."""

import math

import optuna
import pytest

from nas.config import ConfigError, check_int, check_number, first_line
from nas.search import open_study
from nas.storage import StorageError, parse_storage
from nas.study import StudyConfig


@pytest.mark.parametrize("value, kwargs, message", [
    ("3", {}, "x: must be a number, got '3'"),
    (True, {}, "x: must be a number, got True"),
    (math.inf, {}, "x: must be a number, got inf"),
    (1.5, {"integer": True}, "x: must be an integer, got 1.5"),
    (None, {}, "x: must be a number, got None"),
    ("a", {"optional": True}, "x: must be a number or null, got 'a'"),
    (0, {"minimum": 1}, "x: must be >= 1, got 0"),
    (0.0, {"positive": True}, "x: must be > 0, got 0.0"),
    (11, {"maximum": 10}, "x: must be <= 10, got 11"),
    (2**63, {}, "x: must be <= 9,223,372,036,854,775,807, got 9223372036854775808"),
])
def test_check_number_refuses_with_one_message(value, kwargs, message):
    with pytest.raises(ConfigError) as caught:
        check_number("x", value, **kwargs)
    assert str(caught.value) == message
    assert caught.value.field == "x"


@pytest.mark.parametrize("value, kwargs", [
    (0, {}), (2.5, {}), (None, {"optional": True}), (1e-12, {"positive": True}), (10, {"maximum": 10}),
    (10**30, {"maximum": None}), (-3, {"minimum": -3, "integer": True}),
])
def test_check_number_accepts_in_range(value, kwargs):
    check_number("x", value, **kwargs)


def test_check_int_is_the_integer_validator():
    check_int("depth", 12, 1)
    with pytest.raises(ConfigError, match="depth: must be >= 1, got 0"):
        check_int("depth", 0, 1)
    with pytest.raises(ConfigError, match="depth: must be an integer, got 1.0"):
        check_int("depth", 1.0, 1)


@pytest.mark.parametrize("error, typed, expected", [
    (ValueError("first\nsecond"), False, "first"),
    (ValueError("  \n first \nsecond"), False, "first"),
    (ValueError("first\nsecond"), True, "ValueError: first"),
    (ValueError(""), False, "ValueError"),
    (RuntimeError(), True, "RuntimeError"),
])
def test_first_line(error, typed, expected):
    assert first_line(error, typed=typed) == expected


def test_open_study_reports_an_error_without_a_message(tmp_path, monkeypatch):
    """An exception with an empty message from Optuna is one StorageError line (it was an IndexError)."""
    def fail(**kwargs):
        raise RuntimeError()

    monkeypatch.setattr(optuna, "create_study", fail)
    cfg = StudyConfig.from_dict({"study_name": "s", "n_trials": 1})
    with pytest.raises(StorageError, match="cannot open study 's': RuntimeError"):
        open_study(cfg, parse_storage(f"sqlite:///{tmp_path}/s.db"))
