"""The latency model: features, fit, the file (round trip, refusals), calibration (set, resume), the CLI and a
study that predicts and verifies."""

import json
import warnings

import numpy as np
import pytest
import yaml

from nas.cli import main
from profilers import ProfileError, device_info, device_label
from profilers.latency_calibration import calibrate, calibration_set, kind, space_architectures
from profilers.latency_model import FEATURES, CalibrationPoint, LatencyModel, OutOfRange, features, fit, fit_ratio
from search_spaces import ArchConfig
from search_spaces.mobile_vmoe import MobileVMoESpace

DATA = {"image_size": 16, "in_channels": 1, "num_classes": 12}
SPACE = MobileVMoESpace(patch_sizes=(4,), depths=(2, 3), widths=(16, 32), head_width=8, mlp_ratios=(2.0,),
                        num_experts=(0, 4), top_k=(1, 2), placements=("last1",), routings=("per_image", "per_token"))
TRUE = np.linspace(0.5, 2.0, len(FEATURES))  # made-up costs per feature unit, scaled below


def synthetic_ratio(cfg: ArchConfig) -> float:
    """A latency ratio that is an exact linear function of the features: what the fit must recover."""
    return float(features(cfg) @ (TRUE / scale()))


def scale() -> np.ndarray:
    x = np.stack([features(cfg) for cfg in space_architectures(SPACE, **DATA)])
    top = x.max(0)
    return np.where(top > 0, top, 1.0)


def synthetic_model(key: dict | None = None) -> LatencyModel:
    archs = space_architectures(SPACE, **DATA)
    points = [CalibrationPoint(cfg, 2.0 * synthetic_ratio(cfg), 2.0) for cfg in archs]
    key = key or {"backend": "onnxruntime", "threads": 1, "batch": 1, "provider": None, "precision": "fp32",
                  "device": device_label(device_info())}
    return fit(points, key=key, anchor=SPACE.smallest_dense(**DATA), device=device_info())


def test_the_space_is_enumerated_and_the_calibration_set_covers_every_kind():
    archs = space_architectures(SPACE, **DATA)
    # 2 depths x 2 widths dense, and x 2 routings x 2 k for the MoEs (4 experts, last block).
    assert len(archs) == 4 + 4 * 4
    chosen = calibration_set(archs, 10)
    assert {kind(cfg) for cfg in chosen} == {"dense", "per_image-k1", "per_image-k2", "per_token-k1", "per_token-k2"}
    assert len({cfg.config_hash() for cfg in chosen}) == len(chosen) == 15  # at least 3 of each of 5 kinds
    biggest_dense = max((c for c in archs if not c.moe), key=lambda c: features(c).sum())
    assert biggest_dense in chosen  # the extremes come first


def test_features_add_up_the_architecture():
    dense = ArchConfig(**DATA, patch_size=4, depth=2, width=16, num_heads=2, mlp_ratio=2.0)
    moe = ArchConfig(**DATA, patch_size=4, depth=2, width=16, num_heads=2, mlp_ratio=2.0,
                     moe={"num_experts": 4, "top_k": 2, "layers": [1], "routing": "per_token"})
    assert len(features(dense)) == len(FEATURES)
    f_dense, f_moe = (dict(zip(FEATURES, features(c))) for c in (dense, moe))
    assert f_dense["linear_macs"] == 2 * 17 * 4 * 16**2
    assert f_dense["mlp_macs"] == 2 * 17 * 2 * 16 * 32 and f_dense["expert_macs"] == 0
    assert f_moe["mlp_macs"] == 17 * 2 * 16 * 32 and f_moe["expert_macs"] == 2 * 17 * 2 * 16 * 32
    assert f_moe["token_experts"] == 4 and f_moe["gathered_weights"] == 0 and f_moe["mixed_layers"] == 0
    per_image = {"num_experts": 4, "layers": [1, 2], "routing": "per_image"}
    k1, k2 = (dict(zip(FEATURES, features(ArchConfig(**DATA, patch_size=4, depth=3, width=16, num_heads=2,
                                                     mlp_ratio=2.0, moe={**per_image, "top_k": k})))) for k in (1, 2))
    assert (k1["mixed_layers"], k2["mixed_layers"]) == (0, 2)  # k = 1 exports no k axis to mix over
    assert k2["gathered_weights"] == 2 * 2 * 2 * 16 * 32 and k2["router_macs"] == 16 * 4
    assert features(dense, batch=4)[FEATURES.index("linear_macs")] == 4 * f_dense["linear_macs"]


def test_the_fit_recovers_an_exact_linear_cost_and_stays_non_negative():
    archs = space_architectures(SPACE, **DATA)
    x = np.stack([features(c) for c in archs])
    y = np.array([synthetic_ratio(c) for c in archs])
    coef = fit_ratio(x, y)
    assert np.all(coef >= 0)
    np.testing.assert_allclose(x @ coef, y, rtol=1e-6)
    model = synthetic_model()
    assert model.errors["features"]["max_abs"] < 1e-3  # leave-one-out on exact data: no error
    assert model.errors["flops"]["mape"] > model.errors["features"]["mape"]
    cfg = archs[5]
    assert model.predict(cfg) == pytest.approx(2.0 * synthetic_ratio(cfg), rel=1e-6)
    assert model.predict(cfg, anchor_ms=3.0) == pytest.approx(3.0 * synthetic_ratio(cfg), rel=1e-6)


def test_the_file_round_trips_and_a_hand_edit_is_refused(tmp_path):
    model = synthetic_model()
    path = model.save(tmp_path / "lm.json")
    loaded = LatencyModel.load(path)
    cfg = space_architectures(SPACE, **DATA)[7]
    assert loaded.predict(cfg) == model.predict(cfg)
    assert len(loaded.calibration) == len(model.calibration) and loaded.errors == model.errors

    data = json.loads(path.read_text())
    data["coefficients"][3] += 1.0
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="corrupted or edited by hand"):
        LatencyModel.load(path)
    path.write_text(path.read_text()[:-40])  # truncated
    with pytest.raises(ProfileError, match="not JSON"):
        LatencyModel.load(path)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ProfileError, match="not a latency model file"):
        LatencyModel.load(path)


@pytest.mark.parametrize("field, value", [("backend", "torch"), ("batch", 8), ("threads", 4),
                                          ("device", "another cpu, 2 cores, Linux"), ("precision", "fp16"),
                                          ("statistic", "p5")])
def test_a_model_for_another_key_is_refused_by_name(field, value):
    model = synthetic_model()  # its key names no statistic, as files fitted before the choice existed: medians
    fitted = {**{name: model.key[name] for name in ("backend", "device", "threads", "batch", "precision")},
              "statistic": "median"}
    with pytest.raises(ProfileError, match=f"is for {field} "):
        model.check(**{**fitted, field: value})
    model.check(**fitted)  # the right key passes
    p5 = synthetic_model({**model.key, "statistic": "p5"})
    with pytest.raises(ProfileError, match="is for statistic 'p5', not 'median'"):
        p5.check(**fitted)


def test_an_architecture_outside_the_calibrated_range_is_predicted_with_a_warning_naming_the_feature():
    model = synthetic_model()
    inside = space_architectures(SPACE, **DATA)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict(inside)
    deeper = ArchConfig(**DATA, patch_size=4, depth=6, width=16, num_heads=2, mlp_ratio=2.0)
    with pytest.warns(OutOfRange, match=r"blocks=6 not in \[2, 3\]"):
        assert model.predict(deeper) > model.predict(inside)


class CountingMeasurer:
    """A measurer that makes up latencies and counts what it was asked to time."""

    backend, threads, batch, provider, precision, statistic = "onnxruntime", 1, 1, None, "fp32", "median"

    def __init__(self, fail_after: int | None = None):
        self.measured, self.fail_after = [], fail_after

    def measure(self, cfg, anchor):
        if self.fail_after is not None and len(self.measured) == self.fail_after:
            raise KeyboardInterrupt  # the calibration is interrupted here
        self.measured.append(cfg.config_hash())
        return CalibrationPoint(cfg, 2.0 * synthetic_ratio(cfg), 2.0), {"cpu": "test"}


def test_an_interrupted_calibration_resumes_without_measuring_again(tmp_path):
    archs = calibration_set(space_architectures(SPACE, **DATA), 10)
    anchor = SPACE.smallest_dense(**DATA)
    log = tmp_path / "lm.json.partial.jsonl"
    first = CountingMeasurer(fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        calibrate(archs, anchor, first, resume=log)
    again = CountingMeasurer()
    points, device = calibrate(archs, anchor, again, resume=log)
    assert len(first.measured) == 4 and len(again.measured) == len(archs) - 4
    assert not set(first.measured) & set(again.measured)
    assert [p.arch for p in points] == archs and device == {"cpu": "test"}


def test_a_signal_swallowed_in_a_measurement_stops_the_calibration_before_the_next(tmp_path, monkeypatch):
    from nas import processes

    archs = calibration_set(space_architectures(SPACE, **DATA), 6)
    measurer = CountingMeasurer()
    real_measure = measurer.measure

    def measure_hit_by_sigterm(cfg, anchor):  # its KeyboardInterrupt dropped, as in a weakref callback
        processes.RECEIVED.append("SIGTERM")
        return real_measure(cfg, anchor)

    monkeypatch.setattr(processes, "RECEIVED", [])
    monkeypatch.setattr(measurer, "measure", measure_hit_by_sigterm)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        calibrate(archs, SPACE.smallest_dense(**DATA), measurer, resume=tmp_path / "lm.jsonl")
    assert len(measurer.measured) == 1


def test_a_calibration_of_another_statistic_measures_again(tmp_path):
    """Medians measured for one model are not p5s for another: the resume file is keyed by the statistic."""
    archs = calibration_set(space_architectures(SPACE, **DATA), 6)
    anchor = SPACE.smallest_dense(**DATA)
    log = tmp_path / "lm.json.partial.jsonl"
    calibrate(archs, anchor, CountingMeasurer(), resume=log)  # every point measured, as medians
    p5 = CountingMeasurer()
    p5.statistic = "p5"
    calibrate(archs, anchor, p5, resume=log)
    assert len(p5.measured) == len(archs)


def test_a_latency_is_the_statistic_asked_for_in_the_ratio_and_refused_where_the_agent_lacks_it(monkeypatch):
    from profilers import BackendResult, LatencyStats, _profile, profile

    times = [0.001 * (1 + i % 7) + 0.0001 * i for i in range(40)]
    stats = LatencyStats.from_times(times)
    assert stats.p5 == pytest.approx(1e3 * np.percentile(times, 5)) and stats.value("median") == stats.median

    def timed(model_ms: LatencyStats, anchor_ms: LatencyStats):
        class Runner:
            def form(self, model):
                return "onnx"

            def run(self, model, **kwargs):
                return BackendResult(model_ms, None, "onnx", anchor=anchor_ms)
        monkeypatch.setattr(_profile, "get_backend", lambda name, **options: Runner())

    model_ms = LatencyStats(median=4.0, p10=2.5, p90=6.0, mean=4.0, std=1.0, cv=0.25, runs=30, p5=2.0)
    anchor_ms = LatencyStats(median=2.0, p10=1.8, p90=2.2, mean=2.0, std=0.1, cv=0.05, runs=30, p5=1.6)
    timed(model_ms, anchor_ms)
    arch, anchor = space_architectures(SPACE, **DATA)[-1], SPACE.smallest_dense(**DATA)
    assert profile(arch, anchor=anchor).anchor.ratio == pytest.approx(2.0)  # 4.0 / 2.0: medians
    result = profile(arch, anchor=anchor, statistic="p5")
    assert result.anchor.ratio == pytest.approx(1.25) and result.anchor.statistic == "p5"  # 2.0 / 1.6
    assert type(result).from_dict(result.to_dict()).anchor == result.anchor
    from nas.config import ConfigError

    with pytest.raises(ConfigError, match="statistic: must be one of median, p5, got 'mean'"):
        profile(arch, anchor=anchor, statistic="mean")
    older_agent = LatencyStats(**{**model_ms.to_dict(), "p5": None})  # an agent of an older vmoe-nas
    timed(older_agent, anchor_ms)
    with pytest.raises(ProfileError, match="'p5' is not in this measurement .* update the profiler agent"):
        profile(arch, anchor=anchor, statistic="p5")


def test_profile_adds_the_prediction_and_refuses_a_bad_model_file(tmp_path, capsys):
    path = synthetic_model().save(tmp_path / "lm.json")
    arch = tmp_path / "arch.yaml"
    arch.write_text(yaml.safe_dump({**DATA, "patch_size": 4, "depth": 2, "width": 16, "num_heads": 2,
                                    "mlp_ratio": 2.0}))
    assert main(["profile", str(arch), "--latency-model", str(path), "--no-measure", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = synthetic_model().predict(ArchConfig.load(arch))
    assert result["latency_ms"] == {"predicted": pytest.approx(expected)}
    assert result["latency_model"]["out_of_range"] == [] and result["latency_model"]["path"] == str(path)

    assert main(["profile", str(arch), "--latency-model", str(path), "--no-measure", "--batch", "4"]) == 2
    assert "is for batch 1, not 4" in capsys.readouterr().err
    path.write_text(path.read_text().replace('"threads": 1', '"threads": 2', 1))
    assert main(["profile", str(arch), "--latency-model", str(path), "--no-measure"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "corrupted or edited by hand" in err
    assert main(["profile", str(arch), "--no-measure"]) == 2
    assert "--no-measure: needs --latency-model" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_on_the_smoke_study_then_profile_with_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VMOE_NAS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "lm.json"
    assert main(["latency-model", "fit", "--config", "smoke", "--size", "6", "--statistic", "p5", "--out", str(out),
                 "--no-progress"]) == 0
    assert "written to" in capsys.readouterr().out and not out.with_name("lm.json.partial.jsonl").exists()
    model = LatencyModel.load(out)
    assert model.key["backend"] == "onnxruntime" and model.key["device"] == device_label(device_info())
    assert model.statistic == "p5"  # each point is its p5 over the anchor's p5, timed together
    assert len(model.calibration) >= 6 and model.errors["features"]["count"] == len(model.calibration)
    arch = tmp_path / "arch.yaml"
    model.calibration[-1].arch.save(arch)
    assert main(["profile", str(arch), "--latency-model", str(out), "--json"]) == 0  # the model's statistic: p5
    latency = json.loads(capsys.readouterr().out)["latency_ms"]
    assert 0 < latency["p5"] <= latency["median"] and latency["predicted"] > 0
    assert main(["profile", str(arch), "--latency-model", str(out), "--statistic", "median", "--no-measure"]) == 2
    assert "is for statistic 'p5', not 'median'" in capsys.readouterr().err


def test_study_config_latency_keys_are_checked(tmp_path):
    from nas.config import ConfigError
    from nas.study import load_study_config

    with pytest.raises(ConfigError, match="profiler.latency: must be one of measured, predicted, predicted"):
        load_study_config("smoke", profiler={"latency": "guessed"})
    with pytest.raises(ConfigError, match="profiler.latency_model: latency: predicted needs a latency model"):
        load_study_config("smoke", profiler={"latency": "predicted"})
    with pytest.raises(ConfigError, match="profiler.statistic: must be one of median, p5, got 'p50'"):
        load_study_config("smoke", profiler={"statistic": "p50"})
    cfg = load_study_config("smoke", profiler={"latency": "predicted+verify", "latency_model": "lm.json"})
    assert "latency" not in cfg.profiler.options()  # what profile() takes is unchanged


@pytest.mark.slow
def test_a_predicted_and_verified_study_reports_both_for_its_front(tmp_path, capsys, monkeypatch):
    from tests.test_search import D16, M16, load, write_study

    path = synthetic_model().save(tmp_path / "lm.json")
    config = write_study(tmp_path, "predicted", [D16, M16], 2, objectives=["accuracy", "latency"],
                         profiler={"latency": "predicted+verify", "latency_model": str(path)})
    assert main(["search", "--config", config, "--no-progress"]) == 0
    study = load(tmp_path, "predicted")
    from nas import record as records

    anchor = records.read_study(study).anchor
    for trial in records.read_all(study):
        assert trial.metrics.latency_ms == trial.metrics.latency_ms_predicted > 0
        assert trial.metrics.latency_ms_measured is None  # the trial itself was not timed
    verified = study.user_attrs["latency_verify"]
    assert {row["trial"] for row in verified["trials"]} >= {0} and verified["bound_pct"] >= 0
    model = LatencyModel.load(path)
    for row in verified["trials"]:
        arch = records.read(study.trials[row["trial"]]).arch
        assert row["measured_ms"] > 0 and row["predicted_ms"] == pytest.approx(
            model.predict(arch, anchor_ms=anchor["latency_ms"]))
    # The made-up model claims a 0% bound: the real measurements flag it.
    assert verified["flagged"] and verified["mape"] > verified["bound_pct"]
    report = (tmp_path / "results" / "predicted" / "report.md").read_text()
    assert "## Latency: predicted against measured" in report and "**flagged**" in report
    assert "Latency: predicted against measured" in (tmp_path / "results" / "predicted" / "report.html").read_text()
    assert (tmp_path / "results" / "predicted" / "latency_verify.csv").read_text().startswith("trial,why,name")
    # Verified again: what was measured is kept, unless the statistic (or the model) changed: then it is stale
    from nas.latency import verify_front
    from nas.study import load_study_config

    again = verify_front(study, load_study_config(config), model)
    assert [r["measured_ms"] for r in again["trials"]] == [r["measured_ms"] for r in verified["trials"]]
    p5 = verify_front(study, load_study_config(config, statistic="p5"), model)  # the same model file
    assert p5["statistic"] == "p5" and all(
        new["measured_ms"] != old["measured_ms"] for new, old in zip(p5["trials"], verified["trials"]))
    # A signal swallowed in a measurement: verification stops before the next one, and what is stored stays.
    from nas import processes

    monkeypatch.setattr(processes, "RECEIVED", ["SIGTERM"])
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        verify_front(study, load_study_config(config), model)  # the median again: every trial stale
    assert load(tmp_path, "predicted").user_attrs["latency_verify"] == p5


@pytest.mark.slow
def test_latency_model_auto_is_fitted_once_by_the_search_and_kept_in_the_study(tmp_path, monkeypatch):
    from nas import latency
    from nas.config import ConfigError
    from nas.study import load_study_config
    from tests.test_search import D16, M16, load, write_study

    monkeypatch.setenv("VMOE_NAS_CACHE", str(tmp_path / "cache"))
    config = write_study(tmp_path, "auto", [D16, M16], 2, objectives=["accuracy", "latency"],
                         profiler={"latency": "predicted", "latency_model": "auto"})
    cfg = load_study_config(config)
    with pytest.raises(ConfigError, match="profiler.latency_model: auto: no model is fitted yet at .*latency_model"):
        latency.load_for_study(cfg)  # a worker never fits: the search's launcher does, before any trial
    assert main(["search", "--config", config, "--no-progress"]) == 0
    folder = tmp_path / "results" / "auto" / "latency_model"
    (path,) = folder.glob("*.json")
    assert not list(folder.glob("*.partial.jsonl"))  # the calibration's progress, gone once the model is stored
    assert path == latency.auto_model_path(cfg)
    model = latency.load_for_study(cfg)
    assert model.key["device"] == device_label(device_info()) and len(model.calibration) >= 2
    from nas import record as records

    anchor = records.read_study(load(tmp_path, "auto")).anchor
    for trial in records.read_all(load(tmp_path, "auto")):
        assert trial.metrics.latency_ms == pytest.approx(model.predict(trial.arch, anchor_ms=anchor["latency_ms"]))
    # A stored model that no longer loads is moved aside, not deleted, and fitted again (by any entry point
    # that builds the study's context: search, supernet, confirm).
    path.write_text(path.read_text().replace('"threads": 1', '"threads": 2', 1))  # a hand edit: checksum fails
    from nas.trial import build_context

    assert build_context(cfg).latency_model.calibration  # fitted again here
    (aside,) = path.parent.glob(f"{path.name}.unusable-*")
    assert '"threads": 2' in aside.read_text() and LatencyModel.load(path).key["threads"] == 1
    # Resumed, the study predicts from the stored model: nothing is calibrated again.
    monkeypatch.setattr(latency, "fit_for_study", lambda *a, **k: pytest.fail("calibrated again"))
    config = write_study(tmp_path, "auto", [D16, M16], 3, objectives=["accuracy", "latency"],
                         profiler={"latency": "predicted", "latency_model": "auto"})
    assert main(["search", "--config", config, "--no-progress"]) == 0
    assert len(load(tmp_path, "auto").trials) == 3


def test_latency_model_auto_is_keyed_by_machine_agent_and_space_and_unused_without_latency(tmp_path):
    from nas import latency
    from nas.study import load_study_config

    auto = {"latency": "predicted", "latency_model": "auto"}
    cfg = load_study_config("smoke", results_dir=str(tmp_path), profiler=auto)
    paths = {latency.auto_model_path(cfg)}
    for profiler in ({"backend": "remote", "remote_url": "http://phone-a:8765"},
                     {"backend": "remote", "remote_url": "http://phone-b:8765"}, {"threads": 2}, {"statistic": "p5"}):
        paths.add(latency.auto_model_path(load_study_config("smoke", results_dir=str(tmp_path), profiler={
            "latency": "predicted", "latency_model": "auto", **profiler})))
    narrower = {**cfg.space.to_dict(), "widths": cfg.space.widths[:1]}
    paths.add(latency.auto_model_path(load_study_config("smoke", results_dir=str(tmp_path), space=narrower,
                                                        profiler={"latency": "predicted", "latency_model": "auto"})))
    assert len(paths) == 6 and all(p.parent == tmp_path / "smoke" / "latency_model" for p in paths)
    unused = load_study_config("smoke", results_dir=str(tmp_path), objectives=["accuracy", "flops"],
                               profiler={"latency": "predicted", "latency_model": "auto"})
    latency.fit_auto_model(unused)  # latency is not an objective nor a constraint: nothing to fit
    assert latency.load_for_study(unused) is None and not (tmp_path / "smoke" / "latency_model").exists()
