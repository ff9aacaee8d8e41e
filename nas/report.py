"""The report files of a study.

`write_report` writes pareto.html, report.html, trials.csv, pareto.csv, beats_dense.csv and report.md, with the
plots of `nas.plots`. beats_dense.csv holds the confirmed pairs (`nas.pareto.confirmed_frame`) where the study
was confirmed, else the single-seed, unconfirmed comparison.
"""

from __future__ import annotations

import errno
import html
from pathlib import Path

import optuna
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from nas.config import write_atomically
from nas.pairs import latency_warning
from nas.pareto import FRONT_COLUMNS, ParetoAnalysis, analyze, confirmed_at, confirmed_summary
from nas.plots import (
    accuracy_label,
    dumbbell_figure,
    fmt,
    hypervolume_figure,
    hypervolume_history,
    one_shot,
    optuna_figures,
    pareto_figure,
    pareto_plot_info,
)
from nas.storage import NoSpaceLeft

COMPARISONS_SHOWN = 10  # MoE-against-dense rows in report.md and report.html


# ---------------------------------------------------------------- files


def _write(path: Path, text: str) -> Path:
    """Write whole or not at all: a report being rewritten is never seen half-written (launchers sharing a
    study each write the report when they finish, at the same moment)."""
    try:
        write_atomically(path, text)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise NoSpaceLeft(path.parent, f"{path.name} was not written (the report's other files may be older); "
                                           "free some space and run vmoe-nas pareto again") from None
        raise
    return path


def _table_md(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)\n"
    verbatim = [c == "trial" or c.endswith("_trial") for c in frame.columns]  # trial 1200, not 1.2k
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return header + "".join("| " + " | ".join(str(v) if keep else fmt(v, 4) for v, keep in zip(row, verbatim))
                            + " |\n" for row in frame.itertuples(False))


def summary_tables(analysis: ParetoAnalysis) -> dict[str, pd.DataFrame]:
    """The report's three tables: hypervolume per front, the overall front, and the MoEs against dense
    (the best ten by gain, so a study where none beats dense still shows how close they came)."""
    ranked = analysis.ranked
    hv = pd.DataFrame([{"front": which, "trials": int((ranked["kind"] == which).sum()) if which != "overall"
                        else len(ranked), "on front": len(analysis.front(which)),
                        "hypervolume": analysis.hypervolume[which]} for which in ("overall", "dense", "moe")])
    front = analysis.front()[["trial", "name", "kind", "accuracy", "flops", "latency_ms", "params_active"]]
    if one_shot(analysis):  # inherited, never read as a standalone accuracy
        front = front.rename(columns={"accuracy": "inherited_accuracy"})
    against = analysis.comparisons.head(COMPARISONS_SHOWN)[[
        "trial", "name", "accuracy", "gain_flops", "dense_flops_name", "gain_latency", "dense_latency_name",
        "beats_dense"]]
    return {"hypervolume": hv, "front": front, "against dense": against}


def report_markdown(analysis: ParetoAnalysis, counts: dict[str, int]) -> str:
    tables = summary_tables(analysis)
    objectives = ", ".join(f"{o.name} ({'max' if o.maximize else 'min'})" for o in analysis.objectives)
    reference = ", ".join(f"{name} {fmt(value, 4)}" for name, value in analysis.reference.items())
    text = [
        f"# Pareto report: {analysis.study_name}\n",
        "Trials: " + (", ".join(f"{n} {status}" for status, n in counts.items()) or "none")
        + f". Objectives: {objectives}. Trial accuracy: {accuracy_label(analysis.trials)}.\n",
        *([f"**{analysis.no_result[0].upper()}{analysis.no_result[1:]}.**\n"] if analysis.no_result else []),
        "## Hypervolume\n",
        f"Reference point: {reference}. The hypervolume is the share of the box between the ideal point "
        "(accuracy 1, zero cost) and the reference point that a front dominates, with each cost divided by "
        "its reference value, so it lies in [0, 1].\n",
        _table_md(tables["hypervolume"]),
        "\n## Overall Pareto front\n",
        _table_md(tables["front"]),
        *confirmed_markdown(analysis),
        f"\n## MoE against dense, unconfirmed (one seed, margin {analysis.margin:g})\n",
        f"{unconfirmed_sentence(analysis)} Gains are in {accuracy_label(analysis.trials)}, one seed each; "
        f"the best {COMPARISONS_SHOWN} by gain at equal FLOPs:\n",
        _table_md(tables["against dense"]),
    ]
    if analysis.notes:
        text += ["\n## Notes\n", "".join(f"- {note}\n" for note in analysis.notes)]
    return "\n".join(text)


def moe_counts(analysis: ParetoAnalysis) -> tuple[int, int]:
    """(MoE trials evaluated, of which stopped at a lower rung): the denominator of every summary sentence
    counts the stopped ones, so a study that stops most MoEs early cannot claim most MoEs win."""
    trials = analysis.trials
    moe = (trials["kind"] == "moe") & trials["duplicate_of"].isna()
    stopped = int((moe & (trials["status"] == "early_stopped")).sum())
    return int((moe & (trials["status"] == "complete")).sum()) + stopped, stopped


def unconfirmed_sentence(analysis: ParetoAnalysis) -> str:
    total, stopped = moe_counts(analysis)
    table = analysis.comparisons
    return (f"{int(table['beats_flops'].sum())} of {total} MoE configurations beat the best dense model of no more "
            f"FLOPs; {int(table['beats_latency'].sum())} of {total} that of no more latency"
            + (f" ({stopped} of the {total} were stopped at a lower rung and are not compared)." if stopped else "."))


def confirmed_markdown(analysis: ParetoAnalysis) -> list[str]:
    """The confirmed verdicts: one sentence per comparator, each MoE's verdicts side by side, every pair."""
    settings, confirmed = analysis.confirm_settings, analysis.confirmed
    if not settings:
        return ["\n## MoE against dense, confirmed\n", "Not confirmed yet: run `vmoe-nas confirm --study "
                f"{analysis.study_name}` to retrain the top MoEs and their dense comparators with paired seeds.\n"]
    warning = latency_warning(settings)
    return [
        f"\n## MoE against dense, confirmed ({len(settings['seeds'])} seeds, {settings['steps']} steps, "
        f"margin {settings['margin']:g})\n",
        f"{confirmed_sentence(analysis)} `beats`: the 95% t-interval of the paired gain over seeds lies above the "
        "margin and the McNemar test over validation images, Holm-adjusted over the distinct (MoE, dense) pairs, "
        "is below 0.05; `decided_by` names the test that made a `ties`."
        + (f" **Warning: {warning}.**" if warning else "") + "\n",
        _table_md(confirmed_summary(confirmed)),
        "\nEvery pair (beats_dense.csv; `also`: the other comparators the same test answers):\n",
        _table_md(with_inherited(analysis, confirmed[PAIR_COLUMNS])),
    ]


PAIR_COLUMNS = ["moe_trial", "moe_name", "comparator", "also", "dense_name", "moe_accuracy", "dense_accuracy",
                "gain_mean", "ci_low", "ci_high", "p_holm", "n_seeds", "verdict", "decided_by"]


def with_inherited(analysis: ParetoAnalysis, table: pd.DataFrame) -> pd.DataFrame:
    """In a one-shot study, each confirmed arm's inherited accuracy (its search trial's; '-' for a twin that
    was no trial) beside its standalone one, both named so."""
    if not one_shot(analysis):
        return table
    inherited = analysis.trials.set_index("trial")["accuracy"]
    table = table.rename(columns={"moe_accuracy": "moe_standalone", "dense_accuracy": "dense_standalone"})
    table.insert(table.columns.get_loc("moe_standalone"), "moe_inherited",
                 analysis.confirmed["moe_trial"].map(inherited))
    trials = analysis.confirmed["dense_trial"].astype("Int64")
    table.insert(table.columns.get_loc("dense_standalone"), "dense_inherited",
                 [inherited.get(t) if not pd.isna(t) else None for t in trials])
    return table


def confirmed_sentence(analysis: ParetoAnalysis) -> str:
    """How many MoEs beat their twin, the best dense of no more FLOPs and of no more latency, confirmed: the
    counts `vmoe-nas pareto` prints and the report writes."""
    settings, confirmed = analysis.confirm_settings, analysis.confirmed
    total, stopped = moe_counts(analysis)
    wins = {"twin": int(((confirmed["comparator"] == "twin") & (confirmed["verdict"] == "beats")).sum()),
            **{cost: int((confirmed_at(confirmed, cost)["verdict"] == "beats").sum()) for cost in ("flops", "latency")}}
    return (f"{wins['twin']} of {total} MoE trials beat their FLOPs twin (E=0), {wins['flops']} of {total} the best "
            f"dense trial of no more FLOPs, {wins['latency']} of {total} the best dense trial of no more latency "
            f"(tie band {settings['latency_band']:.1%}, a timing's median relative spread in the study). Of the "
            f"{total}, {confirmed['moe_trial'].nunique()} were confirmed (the top of the MoE front), {stopped} stopped "
            "at a lower rung.")


def _status_counts(analysis: ParetoAnalysis) -> dict[str, int]:
    """Trials by status; re-runs of an architecture already evaluated count as "duplicate", and trials that
    failed before they had an architecture (not rows of the table) as "failed" too."""
    frame = analysis.trials
    status = frame["status"].fillna(frame["state"]).where(frame["duplicate_of"].isna(), "duplicate")
    counts = {str(k): int(v) for k, v in status.value_counts().items()}
    failed_rows = int((frame["state"] == "fail").sum())
    if sum(analysis.failures.values()) > failed_rows:
        counts["failed before sampling"] = sum(analysis.failures.values()) - failed_rows
    return counts


def pairs_table(confirmed: pd.DataFrame) -> pd.DataFrame:
    """The per-pair table of report.html, narrow enough for a 1400 px window: who against whom, the gain,
    its interval, p_holm, the verdict and the test that decided it (every column is in beats_dense.csv)."""
    return pd.DataFrame({
        "MoE": confirmed["moe_trial"].astype(str) + ": " + confirmed["moe_name"],
        "against": confirmed["comparator"] + confirmed["also"].map(lambda a: f" (also {a})" if a else ""),
        "dense": confirmed["dense_name"],
        "gain": confirmed["gain_mean"].map(lambda v: f"{v:+.4f}"),
        "95% interval": [f"[{low:+.4f}, {high:+.4f}]" for low, high in zip(confirmed["ci_low"], confirmed["ci_high"])],
        "p_holm": confirmed["p_holm"].map(lambda v: f"{v:.3g}"),
        "seeds": confirmed["n_seeds"],
        "verdict": confirmed["verdict"],
        "decided by": confirmed["decided_by"],
    })


def _pairs_html_table(analysis: ParetoAnalysis) -> pd.DataFrame:
    """pairs_table, with each arm's inherited and standalone accuracies in a one-shot study."""
    table = pairs_table(analysis.confirmed)
    if one_shot(analysis):
        accuracies = with_inherited(analysis, analysis.confirmed[["moe_accuracy", "dense_accuracy"]])
        for column in reversed(accuracies.columns):
            table.insert(3, column.replace("_", " "), accuracies[column].map(
                lambda v: "-" if v is None or pd.isna(v) else f"{v:.4f}"))
    return table


def _confirmed_html(analysis: ParetoAnalysis) -> list[str]:
    text = confirmed_markdown(analysis)
    body = [f"<h2>{html.escape(text[0].strip().lstrip('# '))}</h2>",
            f"<p>{html.escape(text[1].strip()).replace('**', '')}</p>"]
    if analysis.confirm_settings:
        body += [confirmed_summary(analysis.confirmed).to_html(index=False),
                 "<p>Every pair (all columns in beats_dense.csv):</p>", _pairs_html_table(analysis).to_html(
                     index=False, na_rep="-")]
    return body


def report_html(analysis: ParetoAnalysis, figures: dict[str, go.Figure], notes: list[str], counts) -> str:
    tables = summary_tables(analysis)
    style = ("body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}")
    reference = ", ".join(f"{name} = {fmt(value, 4)}" for name, value in analysis.reference.items())
    body = [f"<h1>Pareto report: {html.escape(analysis.study_name)}</h1>",
            "<p>Trials: " + (", ".join(f"{n} {html.escape(s)}" for s, n in counts.items()) or "none") + "</p>",
            *([f"<p><b>{html.escape(analysis.no_result.capitalize())}.</b></p>"] if analysis.no_result else []),
            f"<h2>Hypervolume</h2><p>Reference point: {html.escape(reference)} (costs normalised by it; "
            "the hypervolume is a share of the box, in [0, 1]).</p>",
            tables["hypervolume"].to_html(index=False, float_format=lambda v: f"{v:.4g}"),
            *_confirmed_html(analysis),
            f"<h2>MoE against dense, unconfirmed (one seed, margin {analysis.margin:g})</h2><p>"
            f"{html.escape(unconfirmed_sentence(analysis))} The best {COMPARISONS_SHOWN} by gain at equal FLOPs:</p>",
            tables["against dense"].to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-", formatters={
                gain: lambda v: "-" if pd.isna(v) else f"{v:+.4f}" for gain in ("gain_flops", "gain_latency")}),
            "<h2>Overall Pareto front</h2>",
            tables["front"].to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")]
    for title, figure in figures.items():
        body.append(f"<h2>{html.escape(title.capitalize())}</h2>")
        body.append(figure.to_html(full_html=False, include_plotlyjs=False))
    if notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(analysis.study_name)} report"
            f"</title><style>{style}</style><script>{get_plotlyjs()}</script></head><body>{''.join(body)}</body></html>")


def write_report(study: optuna.Study, out_dir, *, objectives: list[str] | None = None, margin: float = 0.0,
                 analysis: ParetoAnalysis | None = None) -> dict[str, Path]:
    """Analyse `study` (unless `analysis` is given) and write its report files into `out_dir`; returns
    file kind -> path."""
    analysis = analysis or analyze(study, objectives=objectives, margin=margin)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = _status_counts(analysis)
    info = pareto_plot_info(analysis)
    pareto = pareto_figure(info)
    extra, notes = optuna_figures(study, analysis)
    figures = {"accuracy against cost": pareto,
               "hypervolume history": hypervolume_figure(hypervolume_history(analysis)), **extra}
    on_any = analysis.trials[list(FRONT_COLUMNS.values())].any(axis=1)
    beats = analysis.confirmed if analysis.confirm_settings else analysis.beats_dense
    page = pareto.to_html(include_plotlyjs=True, full_html=True).replace(
        "<head>", f"<head><title>{html.escape(analysis.study_name)}: Pareto fronts</title>", 1)
    markdown = report_markdown(analysis, counts)
    verified = study.user_attrs.get("latency_verify")  # profiler.latency: predicted+verify (nas.latency)
    if verified:
        from nas.latency import verify_figure, verify_frame, verify_markdown

        figures["latency: predicted against measured"] = verify_figure(verified)
        markdown += verify_markdown(verified, _table_md)
        _write(out / "latency_verify.csv", verify_frame(verified).to_csv(index=False))
    if info.dumbbells:  # the confirmed pairs, below the fronts
        page = page.replace("</body>", dumbbell_figure(info.dumbbells).to_html(full_html=False,
                                                                              include_plotlyjs=False) + "</body>", 1)
    return {
        "trials.csv": _write(out / "trials.csv", analysis.trials.to_csv(index=False)),
        "pareto.csv": _write(out / "pareto.csv", analysis.trials[on_any].to_csv(index=False)),
        "beats_dense.csv": _write(out / "beats_dense.csv", beats.to_csv(index=False)),
        "pareto.html": _write(out / "pareto.html", page),
        "report.html": _write(out / "report.html", report_html(analysis, figures, analysis.notes + notes, counts)),
        "report.md": _write(out / "report.md", markdown),
    }


__all__ = ["confirmed_markdown", "moe_counts", "pairs_table", "report_html", "report_markdown", "summary_tables",
           "unconfirmed_sentence", "write_report"]
