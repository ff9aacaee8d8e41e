"""The plots of a study's report: what each shows, then how it is drawn.

Compute first, render second: `pareto_plot_info` and `hypervolume_history` build small info objects
(what each plot shows, as numbers) that tests check; `pareto_figure` and friends only draw them.
`optuna_figures` adds Optuna's parallel coordinates and parameter importances of the analysed trials.
"""

from __future__ import annotations

import html
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from nas.fronts import hypervolume, non_dominated_rank
from nas.pareto import ParetoAnalysis
from nas.trial_store import optuna_verbosity

KINDS = {"dense": ("dense ViT", "#1f77b4"), "moe": ("Mobile V-MoE", "#d62728")}  # kind -> (label, colour)
PANELS = (("flops", "FLOPs per image"), ("latency_ms", "latency (ms)"))  # x axes, accuracy on y
# Whole labels on every tick (a log axis otherwise labels minor ticks "2", "3"): 2M FLOPs, 0.5 ms.
TICK_FORMATS = {"flops": "~s", "latency_ms": "~g"}
LOG_SPREAD = 10  # a cost axis spanning more than this factor is drawn on a log scale


# ---------------------------------------------------------------- compute


@dataclass(frozen=True)
class Series:
    kind: str  # "dense" or "moe"
    x: list[float]
    y: list[float]
    trials: list[int]
    hover: list[str]
    on_front: list[bool]  # on the overall front of the analysis objectives


@dataclass(frozen=True)
class FrontLine:
    kind: str
    x: list[float]  # the 2-D front of this panel (accuracy up, cost down), by increasing cost
    y: list[float]


@dataclass(frozen=True)
class ConfirmedPoints:
    """The arms of confirmed pairs, drawn in place of their search point: mean accuracy over the
    confirmation's seeds, with its 95% interval (marker and bar agree). A dense arm at the same cost as a
    confirmed MoE (its FLOPs twin) is drawn a little to the left, so neither hides the other."""

    kind: str
    x: list[float]  # where drawn: the arm's cost, offset for a dense arm on an MoE's cost
    y: list[float]
    half_width: list[float]  # NaN: one seed, no interval
    hover: list[str]
    search_y: list[float] = field(default_factory=list)  # the search's one-seed accuracy (NaN: not a trial)
    cost: list[float] = field(default_factory=list)  # the arm's cost, unshifted


@dataclass(frozen=True)
class Panel:
    x_column: str
    x_label: str
    series: list[Series]
    fronts: list[FrontLine]
    log_x: bool
    note: str | None  # why the panel is empty, when it is
    confirmed: list[ConfirmedPoints] = field(default_factory=list)


@dataclass(frozen=True)
class Dumbbell:
    """One confirmed pair: dense and MoE accuracy (with intervals) at their costs, joined by a line."""

    label: str  # the MoE, its comparator and the cost they are matched on
    verdict: str
    dense: tuple[float, float]  # (mean accuracy, 95% half-width)
    moe: tuple[float, float]
    hover: str
    text: str = ""  # written on the row: verdict, paired gain and interval, the test that decided


@dataclass(frozen=True)
class ParetoPlotInfo:
    title: str
    panels: list[Panel]
    dumbbells: list[Dumbbell] = field(default_factory=list)
    accuracy_label: str = "validation accuracy (proxy training)"  # what the trials' accuracy is (y axis)


# What a trial's accuracy is, by the evaluator that scored it: never one axis for both unlabelled.
ACCURACY_LABELS = {"train": "validation accuracy (proxy training)",
                   "supernet": "inherited accuracy (supernet weights, not trained alone)"}


def accuracy_label(trials: pd.DataFrame) -> str:
    kinds = sorted(set(trials["evaluator"].dropna())) if "evaluator" in trials else ["train"]
    return " / ".join(ACCURACY_LABELS[k] for k in kinds) or ACCURACY_LABELS["train"]


def one_shot(analysis: ParetoAnalysis) -> bool:
    """Whether the study's accuracies are inherited from a supernet (a one-shot study)."""
    return "evaluator" in analysis.trials and bool((analysis.trials["evaluator"] == "supernet").any())


def fmt(value, digits: int = 3) -> str:
    """Numbers a person reads: 1.23M, 45.6k, 0.871; '-' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if not isinstance(value, (int, float, np.number)):
        return str(value)
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def hover_text(row: pd.Series) -> str:
    """The full architecture and metrics of one trial, for a plot's hover box."""
    rung = "" if pd.isna(row.get("rung", pd.NA)) else f" at rung {row['rung']} steps"
    lines = [f"<b>{html.escape(str(row['name']))}</b>", f"trial {row['trial']} ({row['kind']})",
             f"accuracy {fmt(row['accuracy'], 4)}{rung}", f"FLOPs {fmt(row['flops'])}",
             f"latency {fmt(row['latency_ms'])} ms (cv {fmt(row['latency_cv'], 2)}, "
             f"{html.escape(str(row['latency_backend'] or '-'))})",
             f"params {fmt(row['params_active'])} active / {fmt(row['params_total'])} total",
             f"size {fmt(row['size_mb'])} MB fp32",
             f"depth {row['depth']}, width {row['width']}, heads {row['num_heads']}, patch {row['patch_size']}, "
             f"mlp_ratio {fmt(row['mlp_ratio'])}"]
    if row["kind"] == "moe":
        lines.append(f"experts {row['num_experts']}, top-{row['top_k']}, blocks [{row['moe_layers']}], "
                     f"{row['routing']}, router loss {fmt(row['router_loss_weight'])}")
    return "<br>".join(lines)


def _front_2d(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the (accuracy up, cost down) front, by increasing cost."""
    on_front = non_dominated_rank(np.column_stack([y, x]), [True, False]) == 0
    index = np.flatnonzero(on_front)
    return index[np.lexsort((y[index], x[index]))]


def pareto_plot_info(analysis: ParetoAnalysis) -> ParetoPlotInfo:
    """Accuracy against each cost: a scatter per kind, each kind's front in that plane as a line, and the
    points on the overall front of the analysis objectives marked."""
    rows = analysis.trials[analysis.trials["eligible"]]
    confirmed = analysis.confirmed
    arms = set(confirmed["moe_trial"].astype(int)) | set(confirmed["dense_trial"].dropna().astype(int))
    panels = []
    for column, label in PANELS:
        shown = rows[rows["accuracy"].notna() & rows[column].notna()]
        series, fronts = [], []
        for kind in KINDS:
            part = shown[shown["kind"] == kind].sort_values(column)
            if part.empty:
                continue
            x, y = part[column].to_numpy(float), part["accuracy"].to_numpy(float)
            alone = part[~part["trial"].isin(arms)]  # a confirmed arm is drawn at its confirmed mean instead
            series.append(Series(kind, alone[column].tolist(), alone["accuracy"].tolist(),
                                 alone["trial"].astype(int).tolist(), [hover_text(r) for _, r in alone.iterrows()],
                                 alone["on_front"].astype(bool).tolist()))
            front = _front_2d(x, y)
            fronts.append(FrontLine(kind, x[front].tolist(), y[front].tolist()))
        costs = shown[column].to_numpy(float)
        log_x = bool(len(costs) and costs.min() > 0 and costs.max() / costs.min() > LOG_SPREAD)
        note = None if series else f"no completed trial has both accuracy and {label}"
        confirmed = _confirmed_points(analysis, column, log_x, costs)
        panels.append(Panel(column, label, series, fronts, log_x, note, confirmed))
    counts = rows["kind"].value_counts()
    names = ", ".join(o.name for o in analysis.objectives)
    title = (f"{analysis.study_name}: accuracy against cost, {counts.get('dense', 0)} dense and "
             f"{counts.get('moe', 0)} MoE trials (outlined: on the front of {names})")
    return ParetoPlotInfo(title, panels, _dumbbells(analysis), accuracy_label(rows))


TWIN_OFFSET = 0.015  # a dense arm on an MoE's cost is drawn this share of the axis span to its left


def _confirmed_points(analysis: ParetoAnalysis, column: str, log_x: bool, costs: np.ndarray) -> list[ConfirmedPoints]:
    """Each confirmed arm once, at its cost in `column`, with its mean accuracy over seeds and interval."""
    seeds = (analysis.confirm_settings or {}).get("seeds", [])
    accuracy = analysis.trials.set_index("trial")["accuracy"]
    arms = {kind: {} for kind in KINDS}
    for _, row in analysis.confirmed.iterrows():
        for kind in KINDS:
            x, trial = row[f"{kind}_{column}"], row[f"{kind}_trial"]
            if x is not None and not pd.isna(x):
                search = float(accuracy.get(int(trial), math.nan)) if not pd.isna(trial) else math.nan
                arms[kind][row[f"{kind}_name"]] = (float(x), row[f"{kind}_accuracy"], row[f"{kind}_half_width"], search)
    moe_costs = {x for x, *_ in arms["moe"].values()}
    everything = np.concatenate([costs, [x for kind in arms.values() for x, *_ in kind.values()]])
    points = []
    for kind, found in arms.items():
        if not found:
            continue
        cost, y, half, search = (list(v) for v in zip(*found.values()))
        x = [_left_of(c, everything, log_x) if kind == "dense" and c in moe_costs else c for c in cost]
        hover = [f"<b>{html.escape(name)}</b><br>confirmed: {fmt(acc, 4)} ± {fmt(hw, 2)} over {len(seeds)} seeds"
                 f"<br>search (one seed): {fmt(one, 4)}<br>{column} {fmt(c)}"
                 + (" (drawn left of the MoE of the same cost)" if kind == "dense" and c in moe_costs else "")
                 for name, (c, acc, hw, one) in found.items()]
        points.append(ConfirmedPoints(kind, x, y, half, hover, search, cost))
    return points


def _left_of(x: float, costs: np.ndarray, log_x: bool) -> float:
    """`x` moved left by TWIN_OFFSET of the axis span (on a log axis, of its span in decades)."""
    low, high = float(np.nanmin(costs)), float(np.nanmax(costs))
    if log_x:
        return x * (high / low) ** -TWIN_OFFSET
    return x - TWIN_OFFSET * (high - low) if high > low else x * (1 - TWIN_OFFSET)


def _dumbbells(analysis: ParetoAnalysis) -> list[Dumbbell]:
    out = []
    for _, row in analysis.confirmed.iterrows():
        label = f"{row['moe_name']} vs {row['comparator']} ({row['cost']}{'+' + row['also'] if row['also'] else ''})"
        hover = (f"<b>{html.escape(label)}</b><br>{row['verdict']}: gain {row['gain_mean']:+.4f} "
                 f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}], p_holm {row['p_holm']:.3g}<br>dense "
                 f"{html.escape(str(row['dense_name']))}: FLOPs {fmt(row['dense_flops'])}, latency "
                 f"{fmt(row['dense_latency_ms'])} ms<br>MoE: FLOPs {fmt(row['moe_flops'])}, latency "
                 f"{fmt(row['moe_latency_ms'])} ms")
        text = (f"<b>{row['verdict']}</b> {row['gain_mean']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}] "
                f"(decided by {row['decided_by']})")
        out.append(Dumbbell(label, row["verdict"], (row["dense_accuracy"], row["dense_half_width"]),
                            (row["moe_accuracy"], row["moe_half_width"]), hover, text))
    return out


@dataclass(frozen=True)
class HypervolumeHistory:
    trials: list[int]  # every analysed trial number, in order
    values: list[float]  # hypervolume of the overall front of the trials up to and including it


def hypervolume_history(analysis: ParetoAnalysis) -> HypervolumeHistory:
    """How the overall front's hypervolume grew, on the analysis's reference point (so it ends at the
    report's number)."""
    frame = analysis.trials.sort_values("trial")
    columns = [o.metric for o in analysis.objectives]
    reference = np.array([analysis.reference[o.name] for o in analysis.objectives])
    ranked = frame["rank"].notna().to_numpy()
    values = frame[columns].to_numpy(float)
    history = [hypervolume(values[: i + 1][ranked[: i + 1]], analysis.objectives, reference) for i in range(len(frame))]
    return HypervolumeHistory(frame["trial"].astype(int).tolist(), history)


# ---------------------------------------------------------------- render


def pareto_figure(info: ParetoPlotInfo) -> go.Figure:
    figure = make_subplots(rows=1, cols=len(info.panels), shared_yaxes=True, horizontal_spacing=0.06,
                           subplot_titles=[f"accuracy vs {p.x_label}" for p in info.panels])
    for col, panel in enumerate(info.panels, start=1):
        first = col == 1
        for line in panel.fronts:
            label, colour = KINDS[line.kind]
            figure.add_trace(go.Scatter(
                x=line.x, y=line.y, mode="lines", line={"color": colour, "shape": "hv", "width": 2}, opacity=0.6,
                name=f"{label} front", legendgroup=f"{line.kind}-front", showlegend=first, hoverinfo="skip",
            ), row=1, col=col)
        for s in panel.series:
            label, colour = KINDS[s.kind]
            figure.add_trace(go.Scatter(
                x=s.x, y=s.y, mode="markers", name=label, legendgroup=s.kind, showlegend=first,
                marker={"color": colour, "size": [13 if f else 9 for f in s.on_front],
                        "symbol": "circle" if s.kind == "dense" else "diamond",
                        "line": {"color": "black", "width": [2 if f else 0 for f in s.on_front]}},
                hovertext=s.hover, hoverinfo="text"), row=1, col=col)
        for c in panel.confirmed:
            label, colour = KINDS[c.kind]
            figure.add_trace(go.Scatter(  # where the search's one seed put it: faint, so the fronts still read
                x=c.x, y=c.search_y, mode="markers", name="search accuracy of a confirmed arm (one seed)",
                legendgroup="search-of-confirmed", showlegend=first and c.kind == "moe", hoverinfo="skip",
                marker={"color": colour, "size": 7, "symbol": "circle-open" if c.kind == "dense" else "diamond-open",
                        "opacity": 0.45}), row=1, col=col)
            figure.add_trace(go.Scatter(
                x=c.x, y=c.y, mode="markers", name=f"{label}, confirmed mean (95% interval)",
                legendgroup=f"{c.kind}-confirmed", showlegend=first,
                marker={"color": colour, "size": 11, "symbol": "circle" if c.kind == "dense" else "diamond",
                        "line": {"color": "white", "width": 1}},
                error_y={"type": "data", "array": [0 if math.isnan(h) else h for h in c.half_width],
                         "color": colour, "thickness": 1.5, "width": 5}, hovertext=c.hover, hoverinfo="text"),
                row=1, col=col)
        figure.update_xaxes(title_text=panel.x_label, type="log" if panel.log_x else "linear", row=1, col=col,
                            tickformat=TICK_FORMATS[panel.x_column], dtick="D2" if panel.log_x else None)
        if panel.note:
            left, right = figure.layout[f"xaxis{col if col > 1 else ''}"].domain  # an empty subplot has no axes:
            figure.add_annotation(text=panel.note, showarrow=False, xref="paper", yref="paper",  # place by paper
                                  x=(left + right) / 2, y=0.5, xanchor="center")
            figure.update_xaxes(visible=False, row=1, col=col)
    confirmed = any(panel.confirmed for panel in info.panels)
    figure.update_yaxes(title_text=info.accuracy_label + ("; confirmed: standalone" if confirmed else ""), row=1, col=1)
    if not any(panel.series for panel in info.panels):
        figure.update_yaxes(visible=False)
    figure.update_layout(title={"text": info.title, "font": {"size": 15}}, template="plotly_white",
                         height=560, hoverlabel={"align": "left"}, legend={"orientation": "h", "y": -0.15})
    return figure


VERDICT_COLOURS = {"beats": "#2ca02c", "ties": "#7f7f7f", "loses": "#d62728"}


ARM_ROWS = {"dense": -0.2, "moe": 0.2}  # each arm's interval a little above or below its pair's row


def dumbbell_figure(dumbbells: list[Dumbbell]) -> go.Figure:
    """Each confirmed pair on a row: dense and MoE accuracy with their intervals, a line from one to the
    other coloured by the verdict, and the verdict written at the row's end. The two intervals sit just
    below and above the row, so the line crosses them instead of running under them."""
    figure = go.Figure()
    for i, d in enumerate(dumbbells):
        figure.add_trace(go.Scatter(x=[d.dense[0], d.moe[0]], y=[i + ARM_ROWS["dense"], i + ARM_ROWS["moe"]],
                                    mode="lines", line={"color": VERDICT_COLOURS[d.verdict], "width": 4},
                                    showlegend=False, hovertext=d.hover, hoverinfo="text"))
        figure.add_annotation(x=1.0, xref="paper", xanchor="left", y=i, yref="y", text=d.text, showarrow=False,
                              font={"color": VERDICT_COLOURS[d.verdict]})
    for kind, index in (("dense", 0), ("moe", 1)):
        label, colour = KINDS[kind]
        arms = [(d.dense, d.moe)[index] for d in dumbbells]
        figure.add_trace(go.Scatter(
            x=[a[0] for a in arms], y=[i + ARM_ROWS[kind] for i in range(len(arms))], mode="markers", name=label,
            marker={"color": colour, "size": 10},
            error_x={"type": "data", "array": [0 if math.isnan(a[1]) else a[1] for a in arms], "thickness": 1.5},
            hovertext=[d.hover for d in dumbbells], hoverinfo="text"))
    figure.update_layout(title="confirmed pairs: dense and MoE accuracy over seeds (95% intervals); line colour: "
                         "beats green, ties grey, loses red", template="plotly_white",
                         height=220 + 60 * len(dumbbells), xaxis_title="validation accuracy (mean over seeds)",
                         hoverlabel={"align": "left"}, margin={"r": 330}, legend={"orientation": "h", "y": -0.25},
                         yaxis={"automargin": True, "tickvals": list(range(len(dumbbells))),
                                "ticktext": [d.label for d in dumbbells], "range": [-0.6, len(dumbbells) - 0.4]})
    return figure


def hypervolume_figure(history: HypervolumeHistory) -> go.Figure:
    figure = go.Figure(go.Scatter(x=history.trials, y=history.values, mode="lines+markers", line={"shape": "hv"}))
    figure.update_layout(title="hypervolume of the overall front, trial by trial", template="plotly_white",
                         xaxis_title="trial", yaxis_title="hypervolume (share of the reference box)", height=420)
    figure.update_xaxes(tick0=0, dtick=max(1, math.ceil(len(history.trials) / 12)))  # whole trial numbers
    return figure


@contextmanager
def _quiet_optuna():
    """Optuna's in-memory view of the analysis: neither its "study created" logs nor its experimental-feature
    warnings (metric names) belong on the console of a report."""
    with optuna_verbosity(), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _analysed_study(study: optuna.Study, analysis: ParetoAnalysis) -> optuna.Study:
    """An in-memory copy of the analysed trials, valued on the analysis objectives: Optuna's plots then
    leave out infeasible, early-stopped and duplicate trials as the fronts do."""
    keep = set(analysis.ranked["trial"].astype(int))
    values = analysis.trials.set_index("trial")[[o.metric for o in analysis.objectives]]
    with _quiet_optuna():
        view = optuna.create_study(directions=["maximize" if o.maximize else "minimize" for o in analysis.objectives])
        view.set_metric_names([o.metric for o in analysis.objectives])  # plots label objectives by metric
        for t in study.get_trials(deepcopy=False):
            if t.number in keep:
                view.add_trial(optuna.trial.create_trial(values=values.loc[t.number].tolist(), params=t.params,
                                                         distributions=t.distributions))
    return view


def optuna_figures(study: optuna.Study, analysis: ParetoAnalysis) -> tuple[dict[str, go.Figure], list[str]]:
    """Optuna's parallel coordinates and parameter importances of the analysed trials, and a note for each
    plot a small or parameterless study cannot have."""
    view = _analysed_study(study, analysis)
    figures, notes = {}, []
    if len(view.trials) < 2 or not any(t.params for t in view.trials):
        return figures, ["parallel coordinates and parameter importances need two analysed trials with parameters"]
    first = analysis.objectives[0]
    plots = {
        "parallel coordinates": lambda: optuna.visualization.plot_parallel_coordinate(
            view, target=lambda t: t.values[0], target_name=first.metric),
        # fANOVA: variance explained, whatever the direction (PED-ANOVA assumes a target to minimise)
        "parameter importances": lambda: optuna.visualization.plot_param_importances(
            view, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)),
    }
    for title, plot in plots.items():
        try:
            with _quiet_optuna(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's caveats on small studies: the notes say what matters
                figures[title] = plot()
        except (ValueError, RuntimeError) as error:  # e.g. fANOVA when neither parameters nor values vary
            notes.append(f"no {title}: {error}")
    return figures, notes


__all__ = ["ConfirmedPoints", "Dumbbell", "FrontLine", "HypervolumeHistory", "KINDS", "Panel", "ParetoPlotInfo",
           "Series", "accuracy_label", "dumbbell_figure", "fmt", "hover_text", "hypervolume_figure",
           "hypervolume_history", "one_shot", "optuna_figures", "pareto_figure", "pareto_plot_info"]
