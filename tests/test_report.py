"""Plot info and report files: what each plot shows (not its pixels), on tiny and lopsided studies."""

import re

import optuna
import pandas as pd
import pytest
from pareto_trials import study, trial

from nas.cli import main
from nas.pareto import analyze
from nas.plots import hover_text, hypervolume_history, pareto_figure, pareto_plot_info
from nas.report import report_markdown, write_report

REPORT_FILES = {"trials.csv", "pareto.csv", "beats_dense.csv", "pareto.html", "report.html", "report.md"}


def test_plot_info_draws_each_kind_its_fronts_and_marks_the_overall_front():
    s = study([trial("dense", 0.70, 100, 1.0), trial("dense", 0.80, 200, 3.0), trial("dense", 0.65, 150, 0.9),
               trial("moe", 0.78, 120, 2.0), trial("moe", 0.60, 300, 4.0)])
    info = pareto_plot_info(analyze(s))
    flops, latency = info.panels
    assert (flops.x_column, latency.x_column) == ("flops", "latency_ms")
    dense, moe = flops.series
    assert (dense.kind, dense.x, dense.trials) == ("dense", [100, 150, 200], [0, 2, 1])  # by cost
    assert moe.trials == [3, 4] and moe.on_front == [True, False]
    fronts = {f.kind: f for f in flops.fronts}
    assert (fronts["dense"].x, fronts["dense"].y) == ([100, 200], [0.70, 0.80])  # 150 FLOPs at 0.65: dominated
    assert fronts["moe"].x == [120]
    assert {f.kind: f.x for f in latency.fronts}["dense"] == [0.9, 1.0, 3.0]  # in latency, trial 2 is fastest
    assert not flops.log_x and flops.note is None
    assert pareto_figure(info).layout.xaxis.title.text == "FLOPs per image"


def test_hover_shows_architecture_and_metrics():
    row = analyze(study([trial("moe", 0.78, 120, 2.0)])).trials.iloc[0]
    text = hover_text(row)
    for piece in ("vmoe-2x16h2-p4-16-r2-e4k1-pi-L1", "trial 0", "accuracy 0.78", "FLOPs 120", "latency 2 ms",
                  "depth 2, width 16", "experts 4, top-1, blocks [1], per_image"):
        assert piece in text


def test_wide_cost_ranges_go_on_a_log_axis():
    info = pareto_plot_info(analyze(study([trial("dense", 0.7, 1e5, 1.0), trial("dense", 0.8, 1e7, 1.5)])))
    assert info.panels[0].log_x and not info.panels[1].log_x


def test_missing_latency_leaves_an_empty_panel_with_a_note():
    s = study([trial("dense", 0.7, 100), trial("moe", 0.8, 100)], objectives=("accuracy", "flops"))
    flops, latency = pareto_plot_info(analyze(s)).panels
    assert len(flops.series) == 2 and latency.series == [] and "latency" in latency.note


def test_hypervolume_history_grows_to_the_reported_value_and_stays_flat_on_infeasible_trials():
    s = study([trial("dense", 0.5, 100), trial("dense", 0.9, 500, constraint=1.0),
               trial("moe", 0.8, 100), trial("dense", 0.4, 110)], objectives=("accuracy", "flops"))
    a = analyze(s)
    history = hypervolume_history(a)
    assert history.trials == [0, 1, 2, 3]
    assert history.values[0] == history.values[1] < history.values[2] == history.values[3]
    assert history.values[-1] == pytest.approx(a.hypervolume["overall"])


ACC_FLOPS = ("accuracy", "flops")


@pytest.mark.parametrize("trials, objectives", [
    ([trial("dense", 0.7, 100, 1.0)], None),  # one trial
    ([trial("moe", 0.7, 100, 1.0), trial("moe", 0.8, 200, 2.0)], None),  # no dense
    ([trial("dense", 0.7, 100), trial("dense", 0.8, 200)], ACC_FLOPS),  # no MoE, no latency measured
    ([trial("dense", 0.0, 100, 1.0, constraint=1.0)], None),  # nothing to analyse
    ([], None),  # no trials at all
], ids=["one-trial", "no-dense", "no-moe-no-latency", "none-feasible", "empty"])
def test_write_report_handles_tiny_and_lopsided_studies(tmp_path, trials, objectives):
    paths = write_report(study(trials, objectives or ("accuracy", "flops", "latency")), tmp_path / "out")
    assert set(paths) == REPORT_FILES and all(p.is_file() and p.stat().st_size for p in paths.values())
    assert len(pd.read_csv(paths["trials.csv"])) == len(trials)


def test_report_files_hold_the_analysis(tmp_path):
    s = study([trial("dense", 0.70, 100, 1.0), trial("moe", 0.78, 100, 1.2), trial("moe", 0.60, 300, 4.0),
               trial("moe", 0.78, 100, 1.2, duplicate_of=1)])
    paths = write_report(s, tmp_path)
    trials = pd.read_csv(paths["trials.csv"])
    assert trials["trial"].tolist() == [0, 1, 2, 3] and trials["eligible"].tolist() == [True, True, True, False]
    assert {"depth", "num_experts", "moe_layers", "accuracy", "flops", "latency_ms", "rank", "gain_flops"} <= set(
        trials.columns)
    assert set(pd.read_csv(paths["pareto.csv"])["trial"]) == {0, 1}
    beats = pd.read_csv(paths["beats_dense.csv"])
    assert beats["trial"].tolist() == [1] and beats["gain_flops"].tolist() == pytest.approx([0.08])
    md = paths["report.md"].read_text()
    assert "Reference point: accuracy 0, flops 330, latency 4.4" in md
    assert "1 of 2 MoE configurations beat" in md and "1 duplicate" in md
    page = paths["pareto.html"].read_text()
    assert "<script src=" not in page and "Plotly.newPlot" in page  # plotly.js inline: opens offline
    assert len(re.findall(r"Plotly\.newPlot", paths["report.html"].read_text())) == 2  # no parameters: 2 plots


def test_report_of_a_sampled_study_adds_optuna_plots(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(directions=["maximize", "minimize"])
    s.set_user_attr("objectives", ["accuracy", "flops"])
    for width in (16, 24, 32, 16, 24, 32):  # enqueued: a sampled width could be one value six times (no variance)
        s.enqueue_trial({"width": width})
        t = s.ask({"width": optuna.distributions.IntDistribution(16, 32, step=8)})
        assert t.params["width"] == width
        spec = trial("dense" if t.number % 2 else "moe", 0.5 + width / 100 - t.number / 50, 1000 * width)
        for key, value in spec["user_attrs"].items():
            t.set_user_attr(key, value)
        s.tell(t, [spec["user_attrs"]["accuracy"], 1000.0 * width])
    page = write_report(s, tmp_path)["report.html"].read_text()
    assert len(re.findall(r"Plotly\.newPlot", page)) == 4  # fronts, hypervolume, parallel coordinates, importances
    assert "Parameter importances" in page and "Parallel coordinates" in page


def test_pareto_command_writes_the_report_beside_the_study(tmp_path, capsys):
    folder = tmp_path / "results" / "hand"
    folder.mkdir(parents=True)
    study([trial("dense", 0.70, 100, 1.0), trial("moe", 0.78, 100, 1.2)], storage=f"sqlite:///{folder / 'study.db'}")
    assert main(["pareto", "--study", "hand", "--results-dir", str(tmp_path / "results"), "--margin", "0.01"]) == 0
    out = capsys.readouterr().out
    assert ("unconfirmed, one seed (margin 0.01): 1 of 1 MoE configurations beat the best dense model of no more "
            "FLOPs; 1 of 1 that of no more latency" in out)
    assert "+0.0800 at equal FLOPs" in out and "not confirmed" in out
    assert REPORT_FILES <= {p.name for p in folder.iterdir()}
    assert main(["pareto", "--study", "hand", "--results-dir", str(tmp_path / "results"), "--objectives",
                 "accuracy", "params", "--out", str(tmp_path / "by-params")]) == 0
    assert "params 1.76e+04" in capsys.readouterr().out  # reference: 1.1 x 16,000 active params


def test_pareto_command_names_the_missing_storage(tmp_path, capsys):
    assert main(["pareto", "--study", "gone", "--results-dir", str(tmp_path)]) == 2
    assert str(tmp_path / "gone" / "study.db") in capsys.readouterr().err


def test_hover_shows_the_rung_a_trial_reached():
    row = analyze(study([trial("moe", 0.78, 120, 2.0)])).trials.iloc[0].copy()
    row["rung"] = 300
    assert "accuracy 0.78 at rung 300 steps" in hover_text(row)


def test_summary_denominators_count_moes_stopped_at_a_lower_rung():
    s = study([trial("dense", 0.70, 100, 1.0), trial("moe", 0.78, 100, 1.2), trial("moe", 0.60, 300, 4.0)])
    stopped = trial("moe", 0.65, 100, 1.0, width=24)
    s.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs=stopped["user_attrs"]))
    md = report_markdown(analyze(s), {})
    assert ("1 of 3 MoE configurations beat the best dense model of no more FLOPs; 1 of 3 that of no more latency (1 "
            "of the 3 were stopped at a lower rung") in md
    assert "Not confirmed yet" in md


def test_confirmed_pairs_replace_the_single_seed_table_with_intervals_and_dumbbells(tmp_path, monkeypatch):
    from test_confirm import fake_run

    from nas import confirm as stage
    from nas.study import load_study_config

    s = study([trial("moe", 0.80, 100, 1.0), trial("dense", 0.70, 100, 0.95), trial("dense", 0.75, 90, 1.08, width=24)])
    monkeypatch.setattr("nas.trial.build_context", lambda cfg: None)
    monkeypatch.setattr(stage, "train_arm", fake_run({True: 0.7, False: 0.7})[0])
    stage.confirm(s, load_study_config("smoke"), seeds=3)
    analysis = analyze(s)
    info = pareto_plot_info(analysis)
    assert [d.label.split(" vs ")[1] for d in info.dumbbells] == ["twin (flops+latency)", "flops (flops)"]
    flops = info.panels[0].confirmed
    assert [c.kind for c in flops] == ["dense", "moe"] and len(flops[0].x) == 2 and len(flops[1].x) == 1
    assert all(h > 0 for c in flops for h in c.half_width)  # 3 seeds: a finite 95% interval on every arm
    paths = write_report(s, tmp_path)
    beats = pd.read_csv(paths["beats_dense.csv"])
    assert beats["comparator"].tolist() == ["twin", "flops"] and set(beats["verdict"]) <= {"ties", "loses"}
    md = paths["report.md"].read_text()
    assert "| moe_trial | moe_name | vs_twin | vs_flops | vs_latency |" in md  # verdicts per cost, never OR-ed
    assert "0 of 1 MoE trials beat their FLOPs twin" in md and "MoE against dense, unconfirmed (one seed" in md
    assert "confirmed pairs" in paths["pareto.html"].read_text()
