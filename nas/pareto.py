"""Pareto analysis of a search study: trials as a table, non-dominated sorting, fronts, hypervolumes and
the paper's question, does an MoE beat the dense models of no larger cost?

Compute only: `analyze(study)` returns a `ParetoAnalysis` of plain DataFrames and numbers; `nas.report`
draws and writes it. Rows that take part in the analysis ("eligible") are trials that completed with
status `complete`, met every constraint and are not a re-run of an architecture already evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna._hypervolume import compute_hypervolume
from optuna.trial import TrialState

from nas.search import ANCHOR_ATTR, StorageError, make_storage
from nas.study import OBJECTIVES

ARCH_COLUMNS = ["image_size", "in_channels", "patch_size", "num_classes", "depth", "width", "num_heads", "mlp_ratio",
                "num_experts", "top_k", "moe_layers", "routing", "router_loss_weight"]
METRIC_COLUMNS = ["accuracy", "first_eval_accuracy", "router_accuracy", "flops", "params_total", "params_active",
                  "size_bytes_fp32", "size_mb", "latency_ms", "latency_ms_measured", "latency_ratio", "latency_cv",
                  "latency_backend", "latency_device",
                  "train_time_s", "images_per_s"]
COSTS = {"flops": "flops", "latency_ms": "latency"}  # cost column -> its short name: what MoE and dense compare at
COST_REFERENCE_FACTOR = 1.1  # a cost's reference point: 10% above the costliest trial, so it still counts
FRONT_COLUMNS = {"overall": "on_front", "dense": "on_dense_front", "moe": "on_moe_front"}  # front -> flag column


@dataclass(frozen=True)
class Objective:
    name: str  # accuracy, flops, latency or params
    column: str  # the metric column holding it
    maximize: bool


def objectives_for(names: list[str]) -> list[Objective]:
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"objectives must be distinct names among {', '.join(OBJECTIVES)}, got {names}")
    return [Objective(n, OBJECTIVES[n][1], OBJECTIVES[n][0] == "maximize") for n in names]


# ---------------------------------------------------------------- opening a study


def study_storage_url(study_name: str, results_dir: str | Path = "results") -> str:
    """The storage a search wrote under results/<study>/: its journal file or its SQLite file."""
    folder = Path(results_dir) / study_name
    journal, sqlite = folder / "journal.log", folder / "study.db"
    if journal.is_file():
        return f"journal:{journal}"
    if sqlite.is_file():
        return f"sqlite:///{sqlite}"
    raise StorageError(f"no study storage in {folder}: neither {journal} nor {sqlite} exists "
                       "(pass --storage URL or --results-dir)")


def load_study(study_name: str, *, storage: str | None = None, results_dir: str | Path = "results") -> optuna.Study:
    url = storage or study_storage_url(study_name, results_dir)
    for prefix in ("sqlite:///", "journal:"):  # opening a missing file would create an empty storage
        if url.startswith(prefix) and not Path(url.removeprefix(prefix)).is_file():
            raise StorageError(f"no study storage at {url.removeprefix(prefix)}")
    backend = make_storage(url)
    try:
        return optuna.load_study(study_name=study_name, storage=backend)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(backend))
        raise StorageError(f"no study {study_name!r} in {url} (it holds: {', '.join(names) or 'none'})") from None


# ---------------------------------------------------------------- trials as a table


def _arch_fields(arch: dict) -> dict:
    moe = arch.get("moe") or {}
    row = {name: arch.get(name) for name in ARCH_COLUMNS[:8]}
    row.update(num_experts=moe.get("num_experts", 0), top_k=moe.get("top_k"),
               moe_layers=",".join(map(str, moe["layers"])) if moe else None,
               routing=moe.get("routing"), router_loss_weight=moe.get("router_loss_weight"))
    return row


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per finished trial that got as far as an architecture: its state and status, every
    architecture field, every metric, its constraints, and whether it is `eligible` for the analysis."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        attrs = t.user_attrs
        if "arch" not in attrs:
            continue  # invalid samples and trials that failed before sampling: nothing to analyse
        feasible = all(v <= 0 for v in t.constraints.values())
        duplicate = attrs.get("duplicate_of")
        row = {"trial": t.number, "name": attrs.get("name"), "kind": "moe" if attrs["arch"].get("moe") else "dense",
               "state": t.state.name.lower(), "status": attrs.get("status"), "feasible": feasible,
               "duplicate_of": duplicate,
               "eligible": t.state == TrialState.COMPLETE and attrs.get("status") == "complete" and feasible
               and duplicate is None,
               "config_hash": attrs.get("config_hash"), **_arch_fields(attrs["arch"])}
        row.update({column: (attrs.get("metrics") or {}).get(column) for column in METRIC_COLUMNS})
        row.update({f"constraint_{name}": value for name, value in t.constraints.items()})
        row["reason"] = attrs.get("reason")
        rows.append(row)
    columns = ["trial", "name", "kind", "state", "status", "feasible", "duplicate_of", "eligible", "config_hash",
               *ARCH_COLUMNS, *METRIC_COLUMNS]
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(columns + [k for r in rows for k in r])))
    numeric = [c for c in METRIC_COLUMNS if c not in ("latency_backend", "latency_device")]
    frame[numeric] = frame[numeric].apply(pd.to_numeric)  # None -> NaN: a metric not measured
    frame["duplicate_of"] = frame["duplicate_of"].astype("Int64")
    return frame.astype({"eligible": bool, "feasible": bool})


# ---------------------------------------------------------------- non-dominated sorting and hypervolume


def _losses(values: np.ndarray, maximize: list[bool]) -> np.ndarray:
    """Every objective as one to minimise."""
    return np.where(maximize, -1.0, 1.0) * np.asarray(values, dtype=float).reshape(len(values), len(maximize))


def non_dominated_rank(values: np.ndarray, maximize: list[bool]) -> np.ndarray:
    """Rank of each row (0: the Pareto front; k: the front once ranks < k are removed). A row dominates
    another when it is no worse in every objective and better in one, so identical rows share a rank."""
    loss = _losses(values, maximize)
    no_worse = (loss[:, None, :] <= loss[None, :, :]).all(-1)
    better = (loss[:, None, :] < loss[None, :, :]).any(-1)
    dominates = no_worse & better  # [i, j]: row i dominates row j
    rank = np.full(len(loss), -1)
    remaining = np.ones(len(loss), dtype=bool)
    level = 0
    while remaining.any():
        front = remaining & ~dominates[remaining].any(0)
        rank[front] = level
        remaining &= ~front
        level += 1
    return rank


def reference_point(values: np.ndarray, objectives: list[Objective]) -> np.ndarray:
    """Accuracy's reference is 0 (no accuracy); a cost's is 10% above the largest cost in `values`."""
    values = np.asarray(values, dtype=float).reshape(-1, len(objectives))
    reference = []
    for i, objective in enumerate(objectives):
        if objective.maximize:
            reference.append(0.0)
            continue
        worst = np.nanmax(values[:, i]) if np.isfinite(values[:, i]).any() else np.nan  # NaN: nothing to refer to
        reference.append(COST_REFERENCE_FACTOR * worst if not worst <= 0 else 1.0)  # all-zero costs: any scale
    return np.asarray(reference)


def hypervolume(values: np.ndarray, objectives: list[Objective], reference: np.ndarray) -> float:
    """The share of the box between the ideal point (accuracy 1, cost 0) and `reference` that the rows
    dominate: costs are divided by their reference, so the result lies in [0, 1] for any units."""
    values = np.asarray(values, dtype=float).reshape(-1, len(objectives))
    if not len(values):
        return 0.0
    maximize = [o.maximize for o in objectives]
    scale = np.where(maximize, 1.0, np.asarray(reference, dtype=float))
    loss = _losses(values / scale, maximize)
    ref = _losses(np.asarray(reference, dtype=float)[None] / scale, maximize)[0]
    inside = (loss <= ref).all(1)  # rows worse than the reference in some objective add nothing
    return float(compute_hypervolume(loss[inside], ref)) if inside.any() else 0.0


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
        for cost, short in COSTS.items():
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
    for short in COSTS.values():
        columns += [f"dense_{short}_trial", f"dense_{short}_name", f"dense_{short}_accuracy", f"dense_{short}_cost",
                    f"gain_{short}", f"beats_{short}"]
    table = pd.DataFrame(out, columns=columns)
    table["beats_dense"] = table["beats_flops"] | table["beats_latency"]
    table = table.sort_values(["gain_flops", "gain_latency", "trial"], ascending=[False, False, True],
                              na_position="last").reset_index(drop=True)
    return table.astype({"trial": int, "beats_flops": bool, "beats_latency": bool, "beats_dense": bool,
                         "dense_flops_trial": "Int64", "dense_latency_trial": "Int64"})


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

    def front(self, which: str = "overall") -> pd.DataFrame:
        first = self.objectives[0]
        return self.trials[self.trials[FRONT_COLUMNS[which]]].sort_values([first.column, "trial"],
                                                            ascending=[not first.maximize, True])

    @property
    def ranked(self) -> pd.DataFrame:
        """The eligible rows that have every objective: the ones sorted into fronts."""
        return self.trials[self.trials["rank"].notna()]


def analyze(study: optuna.Study, *, objectives: list[str] | None = None, margin: float = 0.0) -> ParetoAnalysis:
    """Fronts, hypervolumes and the beats-dense table of `study`, on its own objectives by default."""
    objectives = objectives_for(objectives or study.user_attrs.get("objectives") or ["accuracy", "flops"])
    frame = trials_frame(study)
    analysis = analyze_frame(frame, objectives, study_name=study.study_name, margin=margin)
    anchor = study.user_attrs.get(ANCHOR_ATTR)
    if anchor and frame["latency_ratio"].notna().any():
        analysis.notes.append(
            f"latency_ms is on one scale for the whole study: each trial was timed interleaved with the anchor "
            f"{anchor['name']} and its latency is their ratio (latency_ratio) times the anchor's "
            f"{anchor['latency_ms']:.4g} ms, measured when the study started on {anchor['device']}; "
            "latency_ms_measured is the trial's own median"
        )
    return analysis


def analyze_frame(frame: pd.DataFrame, objectives: list[Objective], *, study_name: str = "",
                  margin: float = 0.0) -> ParetoAnalysis:
    columns = [o.column for o in objectives]
    maximize = [o.maximize for o in objectives]
    frame = frame.copy()
    notes = []
    complete = frame["eligible"] & frame[columns].notna().all(1)
    for o in objectives:
        missing = frame["eligible"] & frame[o.column].isna()
        if missing.any():
            notes.append(f"{int(missing.sum())} eligible trials have no {o.column} and are left out of the fronts")
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


__all__ = ["FRONT_COLUMNS", "Objective", "ParetoAnalysis", "analyze", "analyze_frame", "beats_dense", "hypervolume",
           "load_study", "non_dominated_rank", "objectives_for", "reference_point", "study_storage_url", "trials_frame"]
