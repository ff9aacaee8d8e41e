import os
import signal
import subprocess
import sys
import weakref
from collections.abc import Callable

import pytest
import torch
from agents import Agent, free_port

from profilers.remote import TOKEN_ENV


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def sigterm_swallowed_at(monkeypatch) -> Callable[[type, int], list[float]]:
    """`sigterm_swallowed_at(Run, n)`: after `Run.step`'s n-th call a SIGTERM arrives as CI saw it, its handler's
    KeyboardInterrupt raised inside a weakref callback (SQLAlchemy's, at a garbage collection mid-step), which
    Python drops, leaving only `nas.processes.RECEIVED` to say it came. Returns the losses of the steps run."""
    from nas import processes

    monkeypatch.setattr(processes, "RECEIVED", [])

    def swallow() -> None:
        class Collected:
            pass

        collected = Collected()
        ref = weakref.ref(collected, lambda _: processes.interrupt(signal.SIGTERM))  # noqa: F841 - held while it dies
        del collected

    def patch(run_class: type, n: int) -> list[float]:
        losses, real_step = [], run_class.step

        def step(run) -> float:
            losses.append(real_step(run))
            if len(losses) == n:
                swallow()
            return losses[-1]

        monkeypatch.setattr(run_class, "step", step)
        return losses

    return patch


@pytest.fixture(scope="module")
def start_agent(tmp_path_factory):
    """Starts profiler agents, each in its own process with `token` in $VMOE_PROFILER_TOKEN, run as
    `python ARGS` where ARGS = `args(port)`; every agent started is stopped at the end of the module."""
    started = []

    def start(args: Callable[[int], list[str]], token: str) -> Agent:
        port, log = free_port(), tmp_path_factory.mktemp("agent") / "agent.log"
        with open(log, "w") as output:  # a file, not a pipe: a full pipe would block the agent's logging
            process = subprocess.Popen([sys.executable, *args(port)], env={**os.environ, TOKEN_ENV: token},
                                       stdout=output, stderr=subprocess.STDOUT)
        started.append(Agent(process, f"http://127.0.0.1:{port}", log, token))
        return started[-1]

    yield start
    for agent in started:
        agent.stop()
