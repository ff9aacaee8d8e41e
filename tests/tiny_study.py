"""A tiny real study (the smoke preset cut to its two enqueued trials, a dense ViT and its Mobile V-MoE,
with a 12-step proxy), run once per test session and shared by the export and training tests."""

from pathlib import Path

from nas.search import run_search
from nas.study import load_study_config

STUDY = "smoke"


def tiny_study_results(tmp_path_factory) -> Path:
    """The results folder holding results/smoke/study.db; built on first use in this session."""
    root = tmp_path_factory.getbasetemp() / "tiny-study"
    done = root / "done"
    if not done.exists():
        cfg = load_study_config(STUDY, n_trials=2, results_dir=str(root / "results"),
                                data={"name": "synthetic", "limit": 600},
                                evaluator={"steps": 12, "batch_size": 32, "eval_every": 6})
        run_search(cfg, progress=False)
        done.touch()
    return root / "results"
