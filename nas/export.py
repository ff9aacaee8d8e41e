"""Export of a chosen trial: everything needed to train it in full and to deploy it.

`export_trial(study, out_dir, trial=N)` or `pick="RULE"` writes into one directory: `arch.yaml`,
`train.yaml` (the full-length recipe `vmoe-nas train` runs), `superclasses.json` when the per-image
router is trained on super-classes, each of FORMATS: `model.onnx` (checked against torch), `model.mlpackage`
(or a `coreml/` trunk, tails and `routing.json` for per-image MoEs) when coremltools is there, `model.pte`
(ExecuTorch, XNNPACK, checked against torch) when executorch is there; `input.json`
(normalisation, class names, routing facts, also in each file's metadata), `trial.json` (the trial as
stored) and `model_card.md`. The study keeps no weights, so the models are freshly initialised; the
directory appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml

from nas.deploy import ModelInfo
from nas.formats import FORMATS, ExportError, write_formats
from nas.study import StudyConfig
from search_spaces import ArchConfig, build_model, count_params

if TYPE_CHECKING:  # the CLI reads PICK_RULES to build its help: no Optuna or pandas for that
    import optuna

    from nas.pareto import ParetoAnalysis
    from nas.record import Metrics, TrialRecord

PICK_RULES = {
    "best-accuracy": "the most accurate trial, dense or MoE",
    "best-moe": "the most accurate MoE",
    "best-moe-under-latency:MS": "the most accurate MoE whose latency is at most MS milliseconds",
    "best-moe-under-flops:N": "the most accurate MoE of at most N FLOPs per image (e.g. 2e6)",
    "largest-gain-flops": "the MoE with the largest accuracy gain over the best dense trial of no more FLOPs: "
                          "confirmed (a `beats` verdict) where the study was confirmed, else one seed's",
    "largest-gain-latency": "the same at no more latency",
}
INHERITED_WEIGHTS = "inherited.pt"  # a one-shot trial's weights from the supernet
DEFAULT_EPOCHS = 30  # full training: the proxy ran for seconds, the final model for this many epochs
VERSIONED = ("vmoe-nas", "torch", "onnx", "onnxruntime", "optuna", "coremltools", "executorch", "numpy")


# ---------------------------------------------------------------- picking a trial


def pick_trial(analysis: ParetoAnalysis, rule: str) -> int:
    """The trial number a pick rule (see PICK_RULES) chooses among the analysed trials. Ties go to the
    cheaper (FLOPs), then the earlier trial."""
    name, _, argument = rule.partition(":")
    budgeted = {"best-moe-under-latency": "latency_ms", "best-moe-under-flops": "flops"}
    if name in ("largest-gain-flops", "largest-gain-latency") and not argument:
        return _largest_gain(analysis, name.removeprefix("largest-gain-"))
    if not (name in budgeted and argument) and not (name in ("best-accuracy", "best-moe") and not argument):
        raise ExportError("--pick", f"unknown rule {rule!r}; rules: {', '.join(PICK_RULES)}")
    rows = analysis.trials[analysis.trials["eligible"] & analysis.trials["accuracy"].notna()]
    if name != "best-accuracy":
        rows = rows[rows["kind"] == "moe"]
    if name in budgeted:
        column = budgeted[name]
        try:
            budget = float(argument)
        except ValueError:
            raise ExportError("--pick", f"{rule!r}: the budget {argument!r} is not a number") from None
        cheapest = rows[column].min()
        rows = rows[rows[column] <= budget]
        if rows.empty:
            raise ExportError("--pick", f"no completed MoE trial has {column} <= {budget:g} "
                                        f"(the smallest is {cheapest:.4g})")
    if rows.empty:
        raise ExportError("--pick", f"{rule!r}: no completed trial with an accuracy to pick from")
    best = rows.sort_values(["accuracy", "flops", "trial"], ascending=[False, True, True]).iloc[0]
    return int(best["trial"])


def _largest_gain(analysis: ParetoAnalysis, cost: str) -> int:
    """Where the study was confirmed: the MoE whose confirmed pair at `cost` beats dense with the largest mean
    gain over seeds; else the largest single-seed gain (the model card says which)."""
    if analysis.confirm_settings:
        return _largest_confirmed_gain(analysis, cost)
    gain = f"gain_{cost}"
    table = analysis.comparisons.dropna(subset=[gain])
    if table.empty:
        raise ExportError("--pick", f"no MoE trial has a dense trial of no more {cost} to compare with")
    best = table.sort_values([gain, "flops", "trial"], ascending=[False, True, True]).iloc[0]
    if best[gain] <= analysis.margin:
        raise ExportError("--pick", f"no MoE beats dense at equal {cost} (largest gain {best[gain]:+.4f}, "
                                    f"trial {best['trial']}, one seed, unconfirmed)")
    return int(best["trial"])


def _largest_confirmed_gain(analysis: ParetoAnalysis, cost: str) -> int:
    from nas.pareto import confirmed_at

    pairs = confirmed_at(analysis.confirmed, cost)
    if pairs.empty:
        raise ExportError("--pick", f"no confirmed MoE has a dense model of no more {cost} to compare with")
    beats = pairs[pairs["verdict"] == "beats"]
    if beats.empty:
        seen = "; ".join(f"trial {r['moe_trial']} {r['verdict']} ({r['gain_mean']:+.4f} [{r['ci_low']:+.4f}, "
                         f"{r['ci_high']:+.4f}])" for _, r in pairs.iterrows())
        raise ExportError("--pick", f"no MoE beats dense at equal {cost} in the confirmation ({seen}); "
                                    "pick by --trial or another rule")
    return int(beats.iloc[0]["moe_trial"])


# ---------------------------------------------------------------- checks


def rebuilt_costs(cfg: ArchConfig, metrics: Metrics) -> dict[str, int]:
    """Params and FLOPs of the rebuilt architecture, which must be those the trial recorded."""
    from profilers import count_flops

    model = build_model(cfg)
    total, active = count_params(model)
    costs = {"params_total": total, "params_active": active, "flops": count_flops(model).total}
    for key, value in costs.items():
        recorded = getattr(metrics, key)
        if recorded is not None and recorded != value:
            raise ExportError("arch", f"the rebuilt {cfg.name} has {key}={value}, the trial recorded "
                                      f"{recorded}: the model code changed since the study")
    return costs


# ---------------------------------------------------------------- the files


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def train_config(study_cfg: StudyConfig, *, epochs: float, superclasses: bool, source: dict) -> dict:
    """train.yaml: the study's recipe with a full-length budget, on the full data set (no limit)."""
    recipe = study_cfg.recipe().to_dict()
    recipe.update(epochs=epochs, steps=None, seconds=None, eval_every="epoch", num_threads=None)
    data = study_cfg.data
    return {
        "arch": "arch.yaml",
        "data": {"name": data.name, "data_dir": data.data_dir, "val_fraction": data.val_fraction, "seed": data.seed,
                 **data.folder_options()},
        "recipe": recipe,
        "superclasses": "superclasses.json" if superclasses else None,
        "output_dir": "run",
        "source": source,
    }


def study_dataset(study_cfg: StudyConfig):
    """The data set the study trained on: its normalisation and class names are the exported model's input."""
    from nas.data import load_dataset

    spec = study_cfg.data
    return load_dataset(spec.name, data_dir=spec.data_dir, val_fraction=spec.val_fraction, seed=spec.seed,
                        limit=spec.limit, **spec.folder_options())


def superclass_map(cfg: ArchConfig, dataset, study_dir: Path):
    """The super-class map the trial was trained with: the study's data set and cache, so a map the
    search discovered is read back, not discovered again. None when the router needs none."""
    moe = cfg.moe
    if not moe or moe.routing != "per_image" or moe.router_loss_weight == 0:
        return None
    from nas.superclasses import superclasses_for

    return superclasses_for(dataset, moe.num_experts, cache_dir=Path(study_dir) / "superclasses")


def _fmt_metric(value, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "not measured"
    return f"{value:,.4g}{unit}" if isinstance(value, float) else f"{value:,}{unit}"


def model_card(cfg: ArchConfig, trial: TrialRecord, study_name: str, study_cfg: StudyConfig,
               analysis: ParetoAnalysis, *, formats: dict[str, str], source: str | None,
               seed: int, epochs: float, superclasses: bool, pick: str | None = None) -> str:
    metrics, profile, train = trial.metrics, trial.profile, trial.train or {}
    recipe = study_cfg.recipe()
    budget = ", ".join(f"{k} {getattr(recipe, k):g}" for k in ("epochs", "steps", "seconds") if getattr(recipe, k))
    limit = f"{study_cfg.data.limit:,} training images" if study_cfg.data.limit else "the full training split"
    latency, anchor = (profile.latency, profile.anchor) if profile else (None, None)
    statistic = anchor.statistic if anchor else study_cfg.profiler.statistic  # what this trial was timed by
    anchored = (f"; {anchor.ratio:.3g}x the study's latency anchor {anchor.name}, timed interleaved with it "
                f"(this run's own: {_fmt_metric(metrics.latency_ms_measured, ' ms')})" if anchor else "")
    rows = [
        ("validation accuracy", _fmt_metric(metrics.accuracy),
         f"proxy training ({budget}, batch {recipe.batch_size}) on {limit} of {study_cfg.data.name}; "
         f"{train.get('steps', '?')} steps"),
        ("router super-class accuracy", _fmt_metric(metrics.router_accuracy), "same run"),
        ("FLOPs per image", _fmt_metric(metrics.flops), "profilers.count_flops (fvcore: one multiply-add = 1 FLOP)"),
        ("params total / active", f"{_fmt_metric(metrics.params_total)} / "
         f"{_fmt_metric(metrics.params_active)}", "search_spaces.count_params; active: k of E experts"),
        ("size (fp32)", _fmt_metric(metrics.size_mb, " MB"), "4 bytes per parameter"),
        ("latency", _fmt_metric(metrics.latency_ms, " ms"),
         f"{statistic}, {profile and profile.backend}, batch {profile and profile.batch}, "
         f"{profile and profile.threads} thread(s), cv {_fmt_metric(latency and latency.cv)}, "
         f"on {metrics.latency_device or 'an unrecorded device'}{anchored}"),
    ]
    table = "| metric | value | how |\n|---|---|---|\n" + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)
    against = against_dense(analysis, trial.number, pick)
    lines = [
        f"# {cfg.name}\n",
        f"Exported {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from trial {trial.number} of study "
        f"`{study_name}`" + (f" ({source})" if source else "") + f"; trial status: {trial.status}, "
        f"config hash `{cfg.config_hash()}`.\n",
        "## Architecture\n", f"```yaml\n{cfg.to_yaml()}```\n",
        "## Measured in the study\n", table,
        "The accuracy ranks architectures; it is not a final score. `vmoe-nas train train.yaml` trains for "
        f"{epochs:g} epochs on the full data set and reports the test accuracy.\n",
    ]
    if cfg.is_moe:
        lines += ["## Against dense\n", against or "Not analysed (the trial is not among the completed ones).\n"]
    lines += [
        "## Files\n",
        f"The weights are freshly initialised (torch seed {seed}): the study trains with a short proxy budget and "
        "keeps no weights, so these files fix the graph, shapes and cost, not the accuracy. `vmoe-nas train` writes "
        "each format below into `run/` with the trained weights. Input `images` "
        f"(N, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), normalised per channel; output `logits`; "
        "`input.json` (and each file's metadata) holds the mean, std, class names and routing facts.\n",
        *(f"- {name}: {line}" for name, line in formats.items()),
        "- `train.yaml`, `arch.yaml`" + (", `superclasses.json` (the map the trial's router was trained on)"
                                         if superclasses else "")
        + ": what `vmoe-nas train` reads; `trial.json`: the trial as the study stored it.\n",
        "## Versions\n", "".join(f"- {k}: {v or 'not installed'}\n" for k, v in versions().items()),
    ]
    return "\n".join(lines)


EXPORT_MARKER = ".vmoe-nas-export"  # in every folder an export writes: --force replaces only those
NOT_EXPORTS = {"journal.log": "a study storage", "study.db": "a study storage", "search.log": "a study's log",
               "run": "a training run (vmoe-nas train)"}  # never replaced, whatever marks the folder


def check_replaceable(out: Path) -> None:
    """Refuse to replace `out` unless it is an export this tool wrote, holding no study and no training run:
    `--force` over results/<study>/ deleted the study."""
    held = [f"{out / name} holds {what}" for name, what in NOT_EXPORTS.items() if (out / name).exists()]
    if held:
        raise ExportError("--force", f"{held[0]}: --force replaces an export folder whole, and never this; "
                                     "choose another --out, or move it out of the folder first")
    if not (out / EXPORT_MARKER).is_file():
        raise ExportError("--force", f"{out} is not an export written by vmoe-nas (no {EXPORT_MARKER} in it); "
                                     "--force replaces only those: choose another --out or delete it yourself")


def against_dense(analysis: ParetoAnalysis, number: int, pick: str | None = None) -> str:
    """The model card's verdict lines: how `pick` chose the trial, the confirmed verdicts and intervals of
    trial `number` where the study confirmed it (as beats_dense.csv), then the search's single-seed gains,
    labelled as such."""
    from nas.pareto import confirmed_at

    lines = []
    if pick and pick.startswith("largest-gain"):
        basis = "the confirmed verdicts" if analysis.confirm_settings else (
            "one seed's gains, unconfirmed: the study has no confirmation (`vmoe-nas confirm`)")
        lines.append(f"Picked by `{pick}` on {basis}.\n")
    if analysis.confirm_settings:
        from nas.pairs import latency_warning

        settings, confirmed = analysis.confirm_settings, analysis.confirmed
        unreliable = " (unreliable: the study's timings were too noisy, see its report)" if latency_warning(
            settings) else ""
        verdicts = []
        for cost in ("flops", "latency"):
            row = confirmed_at(confirmed[confirmed["moe_trial"] == number], cost)
            if row.empty:
                continue
            r = row.iloc[0]
            verdicts.append(f"- at no more {cost}, confirmed: **{r['verdict']}** (decided by {r['decided_by']}) "
                            f"against {r['dense_name']} ({r['comparator']}): gain {r['gain_mean']:+.4f} "
                            f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] over {len(settings['seeds'])} seeds at "
                            f"{settings['steps']} steps, p_holm {r['p_holm']:.3g}" + unreliable * (cost == "latency"))
        lines += verdicts
        if not verdicts:
            lines.append("- not confirmed: the confirmation covered the top of the MoE front "
                         f"(trials {', '.join(map(str, analysis.confirmed['moe_trial'].unique()))}), not this trial")
    for _, row in analysis.comparisons[analysis.comparisons["trial"] == number].iterrows():
        for cost in ("flops", "latency"):
            if np.isnan(row[f"gain_{cost}"]):
                lines.append(f"- at no more {cost}, one seed: no dense trial to compare with")
                continue
            lines.append(f"- at no more {cost}, one seed (the search's, unconfirmed): {row[f'gain_{cost}']:+.4f} "
                         f"accuracy over dense trial {row[f'dense_{cost}_trial']} ({row[f'dense_{cost}_name']})")
    return "".join(f"{line}\n" for line in lines)


@contextlib.contextmanager
def _staging(out: Path, force: bool):
    """A hidden sibling of `out` to write into; renamed to `out` when the block succeeds, removed when it
    does not. So an interrupted export leaves no half-written directory behind. Only an earlier export is
    ever replaced (`check_replaceable`)."""
    old = out.with_name(f".{out.name}.old")
    if old.exists():  # an export killed between its two renames below
        if out.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, out)  # the previous export is whole: put it back first
    if out.exists() and not force:
        raise ExportError("--out", f"{out} exists; pass --force to replace it")
    if out.exists():
        check_replaceable(out)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by an export killed outright
    staging.mkdir(parents=True)
    (staging / EXPORT_MARKER).write_text("written by vmoe-nas export; export --force may replace this folder\n")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)


def export_trial(study: optuna.Study, out_dir, *, trial: int | None = None, pick: str | None = None,
                 epochs: float = DEFAULT_EPOCHS, coreml: bool = True, executorch: bool = True, force: bool = False,
                 study_dir=None,
                 margin: float = 0.0, source: str | None = None) -> dict[str, Path]:
    """Export trial `trial`, or the one `pick` chooses (see PICK_RULES), into `out_dir`; returns file kind
    -> path. `study_dir` holds the study's super-class cache (default results/<study>/); `source` says
    where the study is stored, for the model card."""
    from nas import record as records
    from nas.pareto import analyze

    if (trial is None) == (pick is None):
        raise ExportError("--trial", "give either a trial number or a pick rule")
    stored_config = records.read_study(study).config
    if stored_config is None:
        raise ExportError("--study", f"study {study.study_name!r} has no study_config: not written by vmoe-nas search")
    study_cfg = StudyConfig.from_dict(stored_config)
    analysis = analyze(study, margin=margin)
    number = trial if trial is not None else pick_trial(analysis, pick)
    chosen = _stored_trial(study, number)
    cfg = chosen.arch
    rebuilt_costs(cfg, chosen.metrics)
    dataset = study_dataset(study_cfg)
    mapping = superclass_map(cfg, dataset, Path(study_dir) if study_dir else study_cfg.study_dir)
    seed = study_cfg.recipe().seed
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _staging(out, force) as stage:
        cfg.save(stage / "arch.yaml")
        if mapping is not None:
            mapping.save(stage / "superclasses.json")
        origin = {"study": study.study_name, "trial": number, "config_hash": cfg.config_hash()}
        config = train_config(study_cfg, epochs=epochs, superclasses=mapping is not None, source=origin)
        inherited = chosen.evaluator == "supernet"
        if inherited:  # the weights it was scored with: full training starts from them
            from nas.supernet import inherited_model

            model = inherited_model(study_cfg, cfg, Path(study_dir) if study_dir else study_cfg.study_dir)
            torch.save({"arch": cfg.to_dict(), "model": model.state_dict()}, stage / INHERITED_WEIGHTS)
            config["init"] = INHERITED_WEIGHTS
        (stage / "train.yaml").write_text(f"# Full training of {cfg.name}: vmoe-nas train {out / 'train.yaml'}\n"
                                          + yaml.safe_dump(config, sort_keys=False))
        if not inherited:
            with torch.random.fork_rng(devices=[]):  # initial weights from the recipe's seed, not the caller's RNG
                torch.manual_seed(seed)
                model = build_model(cfg).eval()
        skipped = {"Core ML": None if coreml else "coreml", "ExecuTorch": None if executorch else "executorch"}
        formats = write_formats(model, stage, ModelInfo.of(cfg, dataset),
                                [f for f in FORMATS if skipped.get(f.name) is None])
        formats.update((name, "not written (--no-" + flag + ")") for name, flag in skipped.items() if flag)
        stored = {"study": study.study_name, **chosen.to_json()}
        (stage / "trial.json").write_text(json.dumps(stored, indent=1, default=str))
        card = model_card(cfg, chosen, study.study_name, study_cfg, analysis, formats=formats, source=source,
                          seed=seed, epochs=epochs, superclasses=mapping is not None, pick=pick)
        if inherited:
            card += (f"\n- `{INHERITED_WEIGHTS}`: the weights it inherited from the study's supernet (its accuracy "
                     "above is theirs, not a standalone training's); the exported formats hold them too, and "
                     "`vmoe-nas train` starts from them (`init` in train.yaml).\n")
        (stage / "model_card.md").write_text(card)
        written = sorted(p.name for p in stage.iterdir() if p.name != EXPORT_MARKER)
    return {name: out / name for name in written}


def _stored_trial(study: optuna.Study, number: int) -> TrialRecord:
    from nas import record as records

    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise ExportError("--trial", f"study {study.study_name!r} has trials 0..{len(trials) - 1}, not {number}")
    chosen = records.read(trials[number])
    if chosen.arch is None:
        raise ExportError("--trial", f"trial {number} has no architecture (status {chosen.status})")
    return chosen


__all__ = ["DEFAULT_EPOCHS", "PICK_RULES", "export_trial", "pick_trial", "rebuilt_costs", "train_config"]
