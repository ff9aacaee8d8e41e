"""`profilers.ProfileResult`: its JSON form (what `vmoe-nas profile --json` prints), its readable table, and
how a trial record stores it: a record written before the result was typed (the full dict) still reads."""

import dataclasses
import json
import shutil
from pathlib import Path

import optuna
import pytest

from nas import record as records
from nas.storage import load_study
from nas.trial_store import write
from profilers import AnchorTiming, LatencyStats, Prediction, ProfileResult, format_profile
from search_spaces import ArchConfig

FIXTURES = Path(__file__).parent / "fixtures"
# The keys `vmoe-nas profile --json` prints, in its order, for a measured profile with an anchor and a prediction.
PRINTED = ["name", "config_hash", "arch", "params_total", "params_active", "flops", "flops_by_module", "uncounted_ops",
           "size_bytes_fp32", "size_bytes_fp16", "size_bytes_fp32_active", "size_bytes_fp16_active", "latency_ms",
           "latency_note", "backend", "provider", "threads", "batch", "export_form", "artifact", "device", "anchor",
           "latency_unit", "latency_ms_per_image", "warnings", "latency_model"]


def stored_profile(trial_id: int) -> dict:
    """A profile as the search stored it before records were versioned (the v1 fixture study's journal)."""
    for line in (FIXTURES / "v1-journal.log").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("trial_id") == trial_id and "profile" in entry.get("user_attr", {}):
            return entry["user_attr"]["profile"]
    raise AssertionError(f"no profile of trial {trial_id} in the fixture")


def full_result() -> ProfileResult:
    """The fixture's MoE profile, with a batch of 2, a prediction and a warning beside its latency and anchor."""
    old = ProfileResult.from_dict(stored_profile(1))
    return dataclasses.replace(old, batch=2, warnings=["w"], prediction=Prediction(0.05, "lm.json", 7.5, 1e-5, []))


def old_record(profile: dict, version: int) -> optuna.trial.FrozenTrial:
    arch = ArchConfig.from_dict(profile["arch"])
    attrs = {"record_version": version, "arch_yaml": arch.to_yaml(), "profile": profile}
    return optuna.trial.create_trial(values=[0.7, 123.0], user_attrs=attrs)


def test_a_record_of_version_4_with_the_full_profile_dict_still_reads():
    stored = stored_profile(1)
    back = records.read(old_record(stored, 4)).profile
    assert isinstance(back, ProfileResult) and back.name == stored["name"] == back.arch.name
    assert back.latency == LatencyStats(**stored["latency_ms"]) and back.anchor.ratio == stored["anchor"]["ratio"]
    anchor = stored["anchor"]
    assert back.anchor == AnchorTiming(anchor["name"], anchor["config_hash"], LatencyStats(**anchor["latency_ms"]),
                                       anchor["ratio"])
    again = back.to_dict()
    assert {key: again[key] for key in stored} == stored  # not one figure lost or changed
    assert again["latency_unit"] == "ms per call, one batch of 1 image"  # what a later vmoe-nas prints too
    assert back.config_hash == stored["config_hash"] and back.size_bytes()["size_bytes_fp32_active"] == 21232


def test_a_version_4_record_of_a_predicted_latency_reads_its_prediction():
    stored = {key: value for key, value in stored_profile(0).items() if key != "anchor"}
    stored.update(latency_ms={"predicted": 0.04}, latency_note="not measured (measure=False)",
                  latency_model={"path": "lm.json", "bound_pct": 9.0})
    for key in ("latency_unit", "latency_ms_per_image"):
        stored.pop(key, None)
    back = records.read(old_record(stored, 4)).profile
    assert back.latency is None and back.prediction == Prediction(0.04, "lm.json", 9.0)
    assert back.to_dict() == stored
    table = format_profile(back)
    assert "predicted   0.040 ms  (latency model lm.json, 95% within +-9.0%)" in table and "unavailable" not in table


def test_a_record_stores_the_profile_without_what_its_architecture_gives_again():
    result = full_result()
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    write(trial, records.TrialRecord(number=trial.number, arch=result.arch, profile=result))
    stored = study.trials[0].user_attrs
    assert stored["record_version"] == records.VERSION == 6
    assert set(stored["profile"]) == set(PRINTED) - {"name", "config_hash", "arch", "size_bytes_fp32",
                                                     "size_bytes_fp16", "size_bytes_fp32_active",
                                                     "size_bytes_fp16_active", "latency_unit", "latency_ms_per_image"}
    back = records.read(study.trials[0])
    assert back.profile == result and back.to_json()["profile"] == result.to_dict()


def test_the_json_form_keeps_the_printed_keys_and_order_and_round_trips():
    result = full_result()
    data = json.loads(json.dumps(result.to_dict()))
    assert list(data) == PRINTED
    assert data["latency_ms"]["predicted"] == 0.05 and data["latency_ms"]["median"] == result.latency.median
    assert data["latency_unit"] == "ms per call, one batch of 2 images"
    assert data["latency_ms_per_image"]["p90"] == result.latency.p90 / 2
    assert data["latency_model"] == {"path": "lm.json", "bound_pct": 7.5, "prediction_s": 1e-5, "out_of_range": []}
    assert ProfileResult.from_dict(data) == result


def test_the_table_of_an_unmeasured_profile_says_why_it_has_no_latency():
    counted = dataclasses.replace(ProfileResult.from_dict(stored_profile(0)), latency=None, anchor=None,
                                  latency_note="not measured (measure=False)")
    table = format_profile(counted)
    assert "latency     unavailable: not measured (measure=False)" in table and "anchor" not in table
    assert "fp32 21 kB (21 kB active)" in table and "params      5,244 total, 5,244 active per image" in table


@pytest.mark.parametrize("stored", ["v1-sqlite.db", "v1-journal.log"])
def test_the_profiles_of_a_study_written_before_versioning_read_as_typed_results(tmp_path, stored):
    shutil.copy(FIXTURES / stored, tmp_path / stored)
    url = f"sqlite:///{tmp_path / stored}" if stored.endswith(".db") else f"journal:{tmp_path / stored}"
    got = records.read_all(load_study(stored.split(".")[0], storage=url))
    profiled = [r for r in got if r.profile is not None]
    assert profiled and all(r.profile.arch == r.arch for r in profiled)
    assert got[0].profile.anchor.name == "vit-2x16h2-p4-16-r2" and got[0].profile.latency.runs > 0


def test_a_latency_with_a_statistic_a_newer_vmoe_nas_adds_still_reads():
    """A stored profile and an agent's reply written by a newer vmoe-nas: its extra statistic is left out, every
    known one kept; a latency that lacks a statistic this one needs is one error naming it."""
    from profilers._backends import BackendResult
    from profilers._errors import ProfileError

    stored = stored_profile(1)
    newer = {**stored, "latency_ms": {**stored["latency_ms"], "p1": 0.01},
             "anchor": {**stored["anchor"], "latency_ms": {**stored["anchor"]["latency_ms"], "p1": 0.01}}}
    back = ProfileResult.from_dict(newer)
    assert back.latency == LatencyStats(**stored["latency_ms"])
    assert back.anchor.latency == LatencyStats(**stored["anchor"]["latency_ms"])
    reply = {"latency_ms": {**stored["latency_ms"], "p1": 0.01}, "provider": "CPUExecutionProvider",
             "anchor_ms": {**stored["anchor"]["latency_ms"], "p1": 0.01}}
    assert BackendResult.from_json(reply).latency == back.latency
    lacking = {key: value for key, value in stored["latency_ms"].items() if key not in ("median", "runs")}
    with pytest.raises(ProfileError, match="a latency without median, runs"):
        LatencyStats.from_dict(lacking)
