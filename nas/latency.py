"""A study's latency from a latency model (`profiler.latency: predicted | predicted+verify`).

    model = load_for_study(cfg)                    # None for `measured`; refuses a model of another key
    fit_for_study(cfg, out="lm.json")              # `vmoe-nas latency-model fit --config STUDY --out lm.json`
    fit_auto_model(cfg)                            # `latency_model: auto`: the study's own, fitted once
    predicted_latency(ctx, arch)                   # (ms on the study anchor's scale, ratio): the profile step's
    verify_front(study, cfg)                       # measure the fronts' trials, store both, flag the model

`predicted` scores every trial from the model; `predicted+verify` also measures, after the search, every
trial on a Pareto front (overall, dense, MoE) and stores the measured latency beside the predicted one; the
study's `latency_verify` attribute holds the errors, and `flagged` is true when their mean on the fronts
exceeds the model's stated bound (95% of its leave-one-out errors were within it).

`latency_model: auto` needs no file: the first command that builds the study's context (`vmoe-nas search`
before any trial, `supernet`, `confirm`) fits the study's model and keeps it (and a killed calibration's
progress) under results/<study>/latency_model/, one file per profiler key and space, so the study resumed on
another machine fits that machine's.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nas.config import ConfigError, first_line, json_digest
from nas.processes import file_lock, raise_if_interrupted
from nas.study import AUTO, StudyConfig
from profilers._errors import ProfileError
from profilers.latency_calibration import Measurer, fit_latency_model
from profilers.latency_model import LatencyModel, OutOfRange
from search_spaces import ArchConfig

log = logging.getLogger("vmoe_nas.latency")
VERIFY_ATTR = "latency_verify"
# The calibration's protocol: short (each point is timed once, interleaved with the anchor), so that a
# calibration takes minutes; the fit averages the noise of its ~40 points.
CALIBRATION_PROTOCOL = {"warmup": 5, "min_runs": 20, "min_time_s": 0.3}


@dataclass(frozen=True)
class Anchor:
    """The study's latency anchor: the space's smallest dense ViT, measured once when the study starts.
    Every trial is timed interleaved with it and reported as this latency times their ratio."""

    arch: ArchConfig
    latency_ms: float  # its latency (profiler.statistic) when the study started
    latency: dict  # its full LatencyStats
    device: str
    statistic: str = "median"  # what latency_ms is of its per-call times

    def to_attrs(self) -> dict:
        return {"name": self.arch.name, "arch_yaml": self.arch.to_yaml(), "latency_ms": self.latency_ms,
                "latency": self.latency, "device": self.device, "statistic": self.statistic}

    @classmethod
    def from_attrs(cls, attrs: dict) -> Anchor:
        return cls(ArchConfig.from_yaml(attrs["arch_yaml"]), attrs["latency_ms"], attrs["latency"], attrs["device"],
                   attrs.get("statistic", "median"))


def model_key_device(cfg: StudyConfig) -> str | None:
    """The label of the machine the study measures on; None for a remote agent (not asked: the search runs
    without it)."""
    from profilers import device_info, device_label

    return None if cfg.profiler.backend == "remote" else device_label(device_info())


def needs_latency(cfg: StudyConfig) -> bool:
    return "latency" in cfg.objectives or cfg.constraints.max_latency_ms is not None


def load_for_study(cfg: StudyConfig, path: str | Path | None = None) -> LatencyModel | None:
    """The study's latency model (`profiler.latency_model`, or `path`), checked against its profiler; None
    when the study measures latency and names no model, or names `auto` and does not use latency."""
    path = path or cfg.profiler.latency_model
    if not path or (path == AUTO and not needs_latency(cfg)):
        return None
    if path == AUTO:
        path = auto_model_path(cfg)
        if not path.is_file():
            raise ConfigError("profiler.latency_model", f"auto: no model is fitted yet at {path}; the study's search "
                                                        "(or `vmoe-nas supernet`, `vmoe-nas confirm`) fits it")
    model = LatencyModel.load(path)
    check(model, cfg)
    return model


def check(model: LatencyModel, cfg: StudyConfig) -> None:
    spec = cfg.profiler
    model.check(backend=spec.backend, device=model_key_device(cfg), threads=spec.threads, batch=spec.batch,
                precision=(spec.options().get("precision") or "fp32"), statistic=spec.statistic)


def auto_model_path(cfg: StudyConfig) -> Path:
    """Where `latency_model: auto` keeps the study's model: a file per profiler key (backend, device or agent,
    threads, batch, provider, precision) and space, so that another machine, agent or space gets its own."""
    spec = cfg.profiler
    key = {"backend": spec.backend, "device": model_key_device(cfg), "agent": spec.remote_url, "threads": spec.threads,
           "batch": spec.batch, "provider": spec.provider, "precision": spec.options().get("precision") or "fp32",
           "space": cfg.space.to_dict(), "data": [cfg.data.name, cfg.data.image_size], "statistic": spec.statistic}
    return cfg.study_dir / "latency_model" / f"{json_digest(key)}.json"


def fit_auto_model(cfg: StudyConfig, *, progress: bool = True) -> None:
    """`latency_model: auto`, where the study uses latency: fit and store the study's model unless a valid one is
    stored. One process fits while the others (workers, a second launcher) wait for it; a killed calibration
    resumes from what it had measured; a stored model that no longer loads (corrupted, an older format) is
    moved aside, not deleted, and fitted again."""
    if cfg.profiler.latency_model != AUTO or not needs_latency(cfg):
        return
    path = auto_model_path(cfg)
    resume = path.with_name(path.name + ".partial.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        if path.is_file():
            try:
                check(LatencyModel.load(path), cfg)
                resume.unlink(missing_ok=True)  # left by a process killed between saving the model and this
                return
            except ProfileError as error:
                aside = path.with_name(f"{path.name}.unusable-{time.strftime('%Y%m%d-%H%M%S')}")
                path.replace(aside)
                log.warning("latency model %s cannot be used (%s): moved to %s, fitting it again", path,
                            first_line(error), aside)
        others = sorted(p.name for p in path.parent.glob("*.json") if p != path)
        if others:  # the study resumed on another machine or agent, or over a changed space
            log.warning("this study's earlier trials were predicted by another latency model (%s); trials from "
                        "now on are predicted by a new one", ", ".join(others))
        log.info("fitting the study's latency model (latency_model: auto) into %s", path)
        model = fit_for_study(cfg, resume=resume, progress=progress)
        model.save(path)
        resume.unlink(missing_ok=True)
    errors = model.errors["features"]
    log.info("latency model: %d architectures in %.0f s, leave-one-out MAPE %.1f%%, bound %.1f%%",
             len(model.calibration), model.calibration_s, errors["mape"], model.bound_pct)


def fit_for_study(cfg: StudyConfig, *, size: int = 40, resume: str | Path | None = None, progress: bool = True,
                  protocol: dict | None = None) -> LatencyModel:
    """Fit a latency model on a calibration set of the study's space, on its profiler's backend."""
    from nas.data import load_dataset

    spec = cfg.profiler
    data = cfg.data
    dataset = load_dataset(data.name, data_dir=data.data_dir, val_fraction=data.val_fraction, seed=data.seed,
                           limit=data.limit, **data.folder_options())
    options = {key: value for key, value in spec.options().items() if key not in ("backend", "threads", "batch",
                                                                                   "provider", "statistic")}
    measurer = Measurer(spec.backend, spec.threads, spec.batch, spec.provider,
                        {**CALIBRATION_PROTOCOL, **(protocol or {}), **options}, statistic=spec.statistic)
    bar = _bar("calibrating") if progress else None
    return fit_latency_model(cfg.space, image_size=dataset.image_size, in_channels=dataset.in_channels,
                             num_classes=dataset.num_classes, measurer=measurer, size=size, resume=resume,
                             progress=bar)


def _bar(label: str):
    from tqdm import tqdm

    return lambda items: tqdm(items, desc=label, unit="arch", dynamic_ncols=True)


def predicted_latency(model: LatencyModel, arch: ArchConfig, anchor_ms: float | None = None) -> tuple[float, float]:
    """(milliseconds, ratio to the anchor) of `arch` from `model`; on the scale of a study anchor measured at
    `anchor_ms` where there is one. An out-of-range architecture is logged, not refused."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OutOfRange)
        ratio = model.predict_ratio(arch)
    for warning in caught:
        log.warning("%s", warning.message)
    return ratio * (anchor_ms if anchor_ms is not None else model.anchor_ms), ratio


def verify_front(study, cfg: StudyConfig, model: LatencyModel | None = None) -> dict | None:
    """Measure, interleaved with the study's anchor, every trial on a Pareto front (overall, dense, MoE) and
    every arm of a confirmation, and store their predicted and measured latencies side by side with the
    errors, in the study's `latency_verify` attribute (a finished trial's own attributes are frozen); None
    where the study does not verify. What an earlier call measured (with the same model and statistic) is not
    measured again."""
    from nas import record as records
    from nas.pareto import FRONT_COLUMNS, analyze, load_confirmed

    if cfg.profiler.latency != "predicted+verify":
        return None
    model = model or load_for_study(cfg)
    attrs = records.read_study(study).anchor
    anchor = Anchor.from_attrs(attrs) if attrs else None
    frame = analyze(study).trials
    front = frame[frame[list(FRONT_COLUMNS.values())].any(axis=1) & frame["latency_ms_predicted"].notna()]
    archs = {r.number: r.arch for r in records.read_all(study)}
    wanted = {archs[n].config_hash(): (archs[n], n, "front") for n in front["trial"]}
    confirmed = load_confirmed(study)
    for pair in confirmed.pairs if confirmed else []:
        for arm in ("moe", "dense"):
            arch = ArchConfig.from_yaml(pair[f"{arm}_yaml"])
            wanted.setdefault(arch.config_hash(), (arch, pair[f"{arm}_trial"], "confirmed arm"))
    earlier = study.user_attrs.get(VERIFY_ATTR) or {}
    same = (earlier.get("model"), earlier.get("statistic", "median")) == (model.name, cfg.profiler.statistic)
    done = {row["config_hash"]: row for row in earlier.get("trials", [])} if same else {}  # else stale: again
    for key, (arch, number, why) in wanted.items():
        raise_if_interrupted()  # a signal swallowed in the last measurement
        if key not in done:
            done[key] = measure_beside_prediction(cfg, model, arch, anchor) | {"trial": number, "why": why}
    summary = summarize([done[key] for key in wanted], model.bound_pct, model.name) | {
        "statistic": cfg.profiler.statistic}
    study.set_user_attr(VERIFY_ATTR, summary)
    if summary["flagged"]:
        log.warning("latency model %s: mean error %.1f%% on %d verified trials exceeds its stated bound of %.1f%%",
                    model.name, summary["mape"], len(wanted), model.bound_pct)
    return summary


def measure_beside_prediction(cfg: StudyConfig, model: LatencyModel, arch: ArchConfig, anchor) -> dict:
    """`arch`'s predicted and measured latency on the study anchor's scale, and the prediction's error."""
    from profilers import profile

    predicted, _ = predicted_latency(model, arch, anchor.latency_ms if anchor else None)
    result = profile(arch, anchor=anchor.arch if anchor else None, **cfg.profiler.options())
    timed = result.latency.value(cfg.profiler.statistic)
    measured = result.anchor.ratio * anchor.latency_ms if anchor else timed
    return {"config_hash": arch.config_hash(), "name": arch.name, "predicted_ms": predicted, "measured_ms": measured,
            "measured_unanchored_ms": timed, "error_pct": 100 * (predicted - measured) / measured}


def summarize(rows: list[dict], bound_pct: float, model: str) -> dict:
    """The fronts' prediction errors and whether they exceed the model's bound."""
    errors = [abs(row["error_pct"]) for row in rows]
    mape = sum(errors) / len(errors) if errors else None
    return {"model": model, "trials": rows, "mape": mape, "max_abs_pct": max(errors, default=None),
            "bound_pct": bound_pct, "flagged": bool(mape is not None and mape > bound_pct)}


# ---------------------------------------------------------------- the report's section


def verify_frame(summary: dict):
    import pandas as pd

    columns = ["trial", "why", "name", "predicted_ms", "measured_ms", "error_pct"]
    frame = pd.DataFrame(summary["trials"], columns=columns)
    return frame.astype({"trial": "Int64"})  # a confirmed arm of no search trial: <NA>, the others not floats


def verify_markdown(summary: dict, table: Callable) -> str:
    """The report's section: the verified trials' predicted and measured latency, and the verdict."""
    frame = verify_frame(summary)
    verdict = ("**flagged**: the mean error exceeds the model's stated bound" if summary["flagged"]
               else "within the model's stated bound")
    mape = "-" if summary["mape"] is None else f"{summary['mape']:.1f}%"
    return "\n".join([
        "\n## Latency: predicted against measured\n",
        f"Latency model {summary['model']} (95% of its leave-one-out predictions within "
        f"+-{summary['bound_pct']:.1f}%). "
        f"Every trial on a Pareto front and every confirmed arm, measured interleaved with the anchor after the "
        f"search: mean absolute error {mape}, {verdict}.\n",
        table(frame),
    ])


def verify_figure(summary: dict):
    """Predicted against measured latency of the verified trials, with the line of perfect prediction."""
    import plotly.graph_objects as go

    frame = verify_frame(summary)
    top = max([*frame["predicted_ms"], *frame["measured_ms"], 0]) * 1.05
    figure = go.Figure([
        go.Scatter(x=frame["measured_ms"], y=frame["predicted_ms"], mode="markers", name="verified trials",
                   text=[f"trial {t} ({w}): {n}<br>error {e:+.1f}%" for t, w, n, e in
                         zip(frame["trial"], frame["why"], frame["name"], frame["error_pct"])], hoverinfo="text"),
        go.Scatter(x=[0, top], y=[0, top], mode="lines", name="predicted = measured", line={"dash": "dot"}),
    ])
    figure.update_layout(xaxis_title="measured latency (ms)", yaxis_title="predicted latency (ms)", height=450)
    return figure
