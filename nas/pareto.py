"""Pareto analysis of a search study: trials as a table, non-dominated sorting, fronts, hypervolumes and
the paper's question, does an MoE beat the dense models of no larger cost? With multi-fidelity rungs, only
trials that reached the top rung are compared (their accuracies are at the same number of steps); trials
stopped at a lower rung are rows of their own, marked with their rung, and counted.

Where the study was confirmed (`nas.confirm`: paired seeds, intervals, Holm-adjusted tests), its verdicts
are the answer and the single-seed table above is kept as "unconfirmed"; FLOPs and latency are separate
questions with separate verdicts, never OR-ed.

Compute only: `analyze(study)` returns a `ParetoAnalysis` of plain DataFrames and numbers; `nas.report`
draws and writes it. Rows that take part in the analysis ("eligible") are trials that completed with
status `complete`, met every constraint and are not a re-run of an architecture already evaluated.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from nas import record as records
from nas.fronts import hypervolume, non_dominated_rank, reference_point
from nas.objectives import Objective, objectives_for
from nas.record import METRIC_COLUMNS, TEXT_METRICS
from nas.stats import arm_interval, decided_by
from nas.trial_store import storage_of

ARCH_COLUMNS = ["image_size", "in_channels", "patch_size", "num_classes", "depth", "width", "num_heads", "mlp_ratio",
                "num_experts", "top_k", "moe_layers", "routing", "router_loss_weight"]
COST_COLUMNS = {"flops": "flops", "latency_ms": "latency"}  # cost column -> short name: MoE and dense compare at each
FRONT_COLUMNS = {"overall": "on_front", "dense": "on_dense_front", "moe": "on_moe_front"}  # front -> flag column


# ---------------------------------------------------------------- trials as a table


def _arch_fields(arch) -> dict:
    moe = arch.moe
    row = {name: getattr(arch, name) for name in ARCH_COLUMNS[:8]}
    row.update(num_experts=moe.num_experts if moe else 0, top_k=moe.top_k if moe else None,
               moe_layers=",".join(map(str, moe.layers)) if moe else None,
               routing=moe.routing if moe else None, router_loss_weight=moe.router_loss_weight if moe else None)
    return row


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per finished trial that got as far as an architecture: its state and status, every
    architecture field, every metric, its constraints, and whether it is `eligible` for the analysis."""
    rows = []
    for r in records.read_all(study, (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if r.arch is None:
            continue  # invalid samples and trials that failed before sampling: nothing to analyse
        row = {"trial": r.number, "name": r.name, "kind": r.kind, "state": r.state.name.lower(), "status": r.status,
               "feasible": r.feasible, "duplicate_of": r.duplicate_of,
               "eligible": r.status == "complete" and r.duplicate_of is None, "evaluator": r.evaluator or "train",
               "config_hash": r.arch.config_hash(), **_arch_fields(r.arch), **dataclasses.asdict(r.metrics)}
        row.update({f"constraint_{name}": value for name, value in r.constraints.items()})
        row.update(rung=r.rung, rung_accuracy=", ".join(f"{step}: {acc:.4f}" for step, acc in
                                                        sorted(r.rung_accuracy.items())) or None, reason=r.reason)
        rows.append(row)
    columns = ["trial", "name", "kind", "state", "status", "rung", "feasible", "duplicate_of", "eligible",
               "config_hash", *ARCH_COLUMNS, *METRIC_COLUMNS]
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(columns + [k for r in rows for k in r])))
    numeric = [c for c in METRIC_COLUMNS if c not in TEXT_METRICS]
    frame[numeric] = frame[numeric].apply(pd.to_numeric)  # None -> NaN: a metric not measured
    frame["duplicate_of"] = frame["duplicate_of"].astype("Int64")
    frame["rung"] = frame["rung"].astype("Int64")
    return frame.astype({"eligible": bool, "feasible": bool})


# ---------------------------------------------------------------- beats dense


def beats_dense(frame: pd.DataFrame, *, margin: float = 0.0) -> pd.DataFrame:
    """For each eligible MoE row, per cost (FLOPs, latency): the most accurate eligible dense row whose
    cost is no larger, and the accuracy gain over it. It beats dense at that cost when gain > margin.
    Ranked by the gain at equal FLOPs, then at equal latency; MoEs without a dense row to compare get NaN."""
    rows = frame[frame["eligible"] & frame["accuracy"].notna()]
    moe, dense = rows[rows["kind"] == "moe"], rows[rows["kind"] == "dense"]
    out = []
    for _, m in moe.iterrows():
        record = {"trial": m["trial"], "name": m["name"], "accuracy": m["accuracy"], "flops": m["flops"],
                  "latency_ms": m["latency_ms"], "params_active": m["params_active"]}
        for cost, short in COST_COLUMNS.items():
            cheaper = dense[dense[cost] <= m[cost]]  # NaN costs compare False: no baseline without a number
            best = cheaper.sort_values(["accuracy", cost, "trial"], ascending=[False, True, True]).head(1)
            found = len(best) == 1
            gain = m["accuracy"] - best["accuracy"].iloc[0] if found else np.nan
            record.update({f"dense_{short}_trial": best["trial"].iloc[0] if found else pd.NA,
                           f"dense_{short}_name": best["name"].iloc[0] if found else None,
                           f"dense_{short}_accuracy": best["accuracy"].iloc[0] if found else np.nan,
                           f"dense_{short}_cost": best[cost].iloc[0] if found else np.nan,
                           f"gain_{short}": gain, f"beats_{short}": bool(gain > margin)})  # NaN > x is False
        out.append(record)
    columns = ["trial", "name", "accuracy", "flops", "latency_ms", "params_active"]
    for short in COST_COLUMNS.values():
        columns += [f"dense_{short}_trial", f"dense_{short}_name", f"dense_{short}_accuracy", f"dense_{short}_cost",
                    f"gain_{short}", f"beats_{short}"]
    table = pd.DataFrame(out, columns=columns)
    table["beats_dense"] = table["beats_flops"] | table["beats_latency"]
    table = table.sort_values(["gain_flops", "gain_latency", "trial"], ascending=[False, False, True],
                              na_position="last").reset_index(drop=True)
    return table.astype({"trial": int, "beats_flops": bool, "beats_latency": bool, "beats_dense": bool,
                         "dense_flops_trial": "Int64", "dense_latency_trial": "Int64"})


# ---------------------------------------------------------------- confirmed pairs

CONFIRMED_COLUMNS = ["moe_trial", "moe_name", "comparator", "cost", "also", "dense_trial", "dense_name", "moe_flops",
                     "moe_latency_ms", "dense_flops", "dense_latency_ms", "moe_accuracy", "moe_half_width",
                     "dense_accuracy", "dense_half_width", "gain_mean", "ci_low", "ci_high", "p_value", "p_holm",
                     "n_seeds", "steps", "verdict", "decided_by"]


def confirmed_frame(confirmed: records.ConfirmRecord | None) -> pd.DataFrame:
    """One row per confirmed (MoE, dense) pair: its comparator and cost, the other comparators the same test
    answers (`also`, e.g. "latency" where the twin is also the best dense of no more latency), each arm's mean
    accuracy over seeds and the half width of its 95% interval, the paired gain with its interval, the
    Holm-adjusted p, the verdict and the test that decided it (`nas.stats.decided_by`)."""
    rows = []
    for pair, result in zip(confirmed.pairs if confirmed else [], confirmed.results if confirmed else []):
        (moe_acc, moe_hw), (dense_acc, dense_hw) = (arm_interval(pair[f"{arm}_accuracies"]) for arm in ("moe", "dense"))
        rows.append({
            "moe_trial": pair["moe_trial"], "moe_name": pair["moe_name"], "comparator": pair["comparator"],
            "cost": pair["cost"], "also": ",".join(pair.get("also", [])), "dense_trial": pair["dense_trial"],
            "dense_name": pair["dense_name"],
            "decided_by": decided_by(result["ci_low"], result["ci_high"], result["p_holm"], margin=result["margin"],
                                     alpha=result["alpha"]),
            **{f"{arm}_{c}": pair[f"{arm}_costs"][c] for arm in ("moe", "dense") for c in ("flops", "latency_ms")},
            "moe_accuracy": moe_acc, "moe_half_width": moe_hw, "dense_accuracy": dense_acc,
            "dense_half_width": dense_hw, "steps": confirmed.settings["steps"],
            **{k: result[k] for k in ("gain_mean", "ci_low", "ci_high", "p_value", "p_holm", "n_seeds", "verdict")},
        })
    frame = pd.DataFrame(rows, columns=CONFIRMED_COLUMNS)
    for column in ("ci_low", "ci_high"):  # one seed: stored as None (JSON has no infinity), an unbounded interval
        frame[column] = pd.to_numeric(frame[column]).fillna(-np.inf if column == "ci_low" else np.inf)
    return frame.astype({"moe_trial": int, "dense_trial": "Int64"})


def confirmed_summary(confirmed: pd.DataFrame) -> pd.DataFrame:
    """Per confirmed MoE, its verdict against each comparator in a column of its own: twin (equal FLOPs),
    best dense of no more FLOPs, best dense of no more latency ('-': no such comparator)."""
    out = []
    for (trial, name), rows in confirmed.groupby(["moe_trial", "moe_name"], sort=False):
        verdicts = {c: row["verdict"] for _, row in rows.iterrows() for c in answered(row)}
        out.append({"moe_trial": trial, "moe_name": name,
                    **{f"vs_{c}": verdicts.get(c, "-") for c in ("twin", "flops", "latency")}})
    return pd.DataFrame(out, columns=["moe_trial", "moe_name", "vs_twin", "vs_flops", "vs_latency"])


def answered(row: pd.Series) -> list[str]:
    """The comparators one confirmed pair's test answers: its own and those in `also`."""
    also = row.get("also")
    return [row["comparator"], *(also.split(",") if isinstance(also, str) and also else [])]


def confirmed_at(confirmed: pd.DataFrame, cost: str) -> pd.DataFrame:
    """Per confirmed MoE, the pair that answers "does it beat the best dense of no more `cost`" ("flops" or
    "latency"): the pair of that comparator, or whose test also answers it; at FLOPs the twin where the best
    dense of no more FLOPs is the twin (or there is none: the twin has the MoE's FLOPs). Ranked by gain."""
    rows = []
    for _, pairs in confirmed.groupby("moe_trial", sort=False):
        found = [row for _, row in pairs.iterrows() if cost in answered(row)]
        found = found or [row for _, row in pairs.iterrows() if cost == "flops" and row["comparator"] == "twin"]
        rows += found[:1]
    frame = pd.DataFrame(rows, columns=confirmed.columns)
    return frame.sort_values(["gain_mean", "moe_trial"], ascending=[False, True]).reset_index(drop=True)


def load_confirmed(study: optuna.Study) -> records.ConfirmRecord | None:
    """The confirmation stored beside `study` (its companion study in the same storage), if any."""
    try:
        companion = optuna.load_study(study_name=records.confirm_study_name(study.study_name),
                                      storage=storage_of(study))
    except KeyError:
        return None
    confirmed = records.read_confirm(companion)
    return confirmed if confirmed.settings else None


# ---------------------------------------------------------------- the whole analysis


@dataclass
class ParetoAnalysis:
    study_name: str
    objectives: list[Objective]
    trials: pd.DataFrame  # trials_frame + rank, on_front, on_dense_front, on_moe_front, gain_flops, gain_latency
    reference: dict[str, float]  # objective name -> reference point, in the metric's units
    hypervolume: dict[str, float]  # "overall" | "dense" | "moe" -> normalised hypervolume of that front
    beats_dense: pd.DataFrame  # the MoEs that beat dense, ranked (see `beats_dense`)
    comparisons: pd.DataFrame  # every eligible MoE against dense, beating or not
    margin: float = 0.0
    notes: list[str] = field(default_factory=list)
    confirmed: pd.DataFrame = field(default_factory=lambda: confirmed_frame(None))  # see `confirmed_frame`
    confirm_settings: dict | None = None  # seeds, steps, margin and latency band of the confirmation
    failures: dict[str, int] = field(default_factory=dict)  # failed trials by reason, most common first

    @property
    def no_result(self) -> str | None:
        """Why there is no front, when no trial has every objective; None when some have."""
        if len(self.ranked):
            return None
        failed = sum(self.failures.values())
        reasons = "; ".join(f"{n} x {reason}" for reason, n in list(self.failures.items())[:3])
        more = f"; {len(self.failures) - 3} other reasons in trials.csv" if len(self.failures) > 3 else ""
        return (f"no trial completed with every objective, so there is no front: {failed} failed"
                + (f" ({reasons}{more})" if failed else ""))

    def front(self, which: str = "overall") -> pd.DataFrame:
        first = self.objectives[0]
        return self.trials[self.trials[FRONT_COLUMNS[which]]].sort_values([first.metric, "trial"],
                                                            ascending=[not first.maximize, True])

    @property
    def ranked(self) -> pd.DataFrame:
        """The eligible rows that have every objective: the ones sorted into fronts."""
        return self.trials[self.trials["rank"].notna()]


def analyze(study: optuna.Study, *, objectives: list[str] | None = None, margin: float = 0.0) -> ParetoAnalysis:
    """Fronts, hypervolumes and the beats-dense table of `study`, on its own objectives by default."""
    stored = records.read_study(study)
    objectives = objectives_for(objectives or stored.objectives or ["accuracy", "flops"])
    frame = trials_frame(study)
    analysis = analyze_frame(frame, objectives, study_name=study.study_name, margin=margin)
    analysis.failures = failure_reasons(study)
    confirmed = load_confirmed(study)
    if confirmed is not None:
        from nas.pairs import latency_warning

        analysis.confirmed, analysis.confirm_settings = confirmed_frame(confirmed), confirmed.settings
        analysis.notes += [w for w in [latency_warning(confirmed.settings)] if w]
    anchor = stored.anchor
    if anchor and frame["latency_ratio"].notna().any():
        analysis.notes.append(
            f"latency_ms is on one scale for the whole study: each trial was timed interleaved with the anchor "
            f"{anchor['name']} and its latency is their ratio (latency_ratio) times the anchor's "
            f"{anchor['latency_ms']:.4g} ms, measured when the study started on {anchor['device']}; "
            f"latency_ms_measured is the trial's own {anchor.get('statistic', 'median')}"
        )
    return analysis


def failure_reasons(study: optuna.Study) -> dict[str, int]:
    """Failed trials by reason (the first line of each), most common first; trials that failed before they had an
    architecture (a data set that does not load, a dead worker) count too."""
    reasons = Counter(((r.reason or "no reason recorded").strip().splitlines() or ["?"])[0][:200]
                      for r in records.read_all(study, (TrialState.FAIL,)))
    return dict(reasons.most_common())


def analyze_frame(frame: pd.DataFrame, objectives: list[Objective], *, study_name: str = "",
                  margin: float = 0.0) -> ParetoAnalysis:
    columns = [o.metric for o in objectives]
    maximize = [o.maximize for o in objectives]
    frame = frame.copy()
    notes = []
    complete = frame["eligible"] & frame[columns].notna().all(1)
    for o in objectives:
        missing = frame["eligible"] & frame[o.metric].isna()
        if missing.any():
            notes.append(f"{int(missing.sum())} eligible trials have no {o.metric} and are left out of the fronts")
    values = frame.loc[complete, columns].to_numpy(float)
    reference = reference_point(values, objectives)
    frame["rank"] = pd.Series(non_dominated_rank(values, maximize), index=frame.index[complete]).astype("Int64")
    hypervolumes = {}
    for which, subset in (("overall", complete), ("dense", complete & (frame["kind"] == "dense")),
                          ("moe", complete & (frame["kind"] == "moe"))):
        sub_values = frame.loc[subset, columns].to_numpy(float)
        on_front = pd.Series(non_dominated_rank(sub_values, maximize) == 0, index=frame.index[subset])
        frame[FRONT_COLUMNS[which]] = on_front.reindex(frame.index, fill_value=False).astype(bool)
        hypervolumes[which] = hypervolume(sub_values, objectives, reference) if len(sub_values) else float("nan")
    comparisons = beats_dense(frame, margin=margin)
    gains = comparisons.set_index("trial")[["gain_flops", "gain_latency"]]
    frame = frame.join(gains, on="trial")
    return ParetoAnalysis(
        study_name=study_name, objectives=objectives, trials=frame,
        reference={o.name: float(r) for o, r in zip(objectives, reference)}, hypervolume=hypervolumes,
        beats_dense=comparisons[comparisons["beats_dense"]].reset_index(drop=True), comparisons=comparisons,
        margin=margin, notes=notes,
    )


__all__ = ["CONFIRMED_COLUMNS", "COST_COLUMNS", "FRONT_COLUMNS", "ParetoAnalysis", "analyze", "analyze_frame",
           "answered", "beats_dense", "confirmed_at", "confirmed_frame", "confirmed_summary", "failure_reasons",
           "load_confirmed", "trials_frame"]
