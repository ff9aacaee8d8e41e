"""The README's way to watch a study: the optuna-dashboard installed with the project starts on a study's
storage and lists its trials."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import optuna
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_optuna_dashboard_starts_and_lists_a_studys_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="watched", directions=["maximize", "minimize"])
    for accuracy, flops in ((0.7, 2e6), (0.8, 3e6)):
        study.add_trial(optuna.trial.create_trial(values=[accuracy, flops]))
    executable = Path(sys.executable).parent / "optuna-dashboard"
    assert executable.is_file(), "optuna-dashboard is not installed with the project"
    port = free_port()
    server = subprocess.Popen([str(executable), storage, "--port", str(port), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = httpx.get(f"http://127.0.0.1:{port}/api/studies", timeout=2).json()
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"optuna-dashboard did not start: {server.stderr.read().decode()[-500:]}")
                time.sleep(0.2)
        (summary,) = studies["study_summaries"]
        assert summary["study_name"] == "watched"
        detail = httpx.get(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=5).json()
        assert [t["values"] for t in detail["trials"]] == [[0.7, 2e6], [0.8, 3e6]]
    finally:
        server.terminate()
        server.wait(timeout=10)
