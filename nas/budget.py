"""Hard trial budgets: a trial with a time or memory budget runs in a child process, killed when it passes.

Signals and exceptions inside the trial cannot do this: a long native call does not see a signal, and any
`except Exception` on the way swallows the exception. A child process is stopped from outside whatever it
is doing, and its memory is its own (with its own children, e.g. data-loading workers), not the worker's.
It dies with the worker (`nas.processes.die_with_parent`).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

from nas.processes import die_with_parent, raise_if_interrupted

POLL_S = 0.2  # how often the parent looks at the child's time and memory


class BudgetExceeded(RuntimeError):
    """A trial ran past its time or memory budget."""


def tree_resident_mb(pid: int) -> float:
    """Resident memory of process `pid` and all its descendants, from `ps` (Linux and macOS alike)."""
    table = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,rss="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            child, parent, kib = map(int, fields)
            children.setdefault(parent, []).append(child)
            rss[child] = kib
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += rss.get(current, 0)
        stack.extend(children.get(current, []))
    return total / 1024


def _child(target: Callable, args: tuple, connection, parent_pid: int) -> None:
    die_with_parent(parent_pid)  # a worker killed with -9 must not leave its trial training on
    try:
        outcome = ("return", target(*args))
    except BaseException as error:  # noqa: BLE001 - everything goes back to the parent, which re-raises it
        outcome = ("raise", error)
    try:
        connection.send(outcome)
    except Exception as error:  # an unpicklable result or exception: its description still goes back
        connection.send(("raise", RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]} ({error})")))
    connection.close()


def run_with_budget(target: Callable, args: tuple, *, seconds: float | None, memory_mb: float | None) -> Any:
    """`target(*args)` in a fresh (spawned) process; its return value, or its exception re-raised here.
    Past `seconds` of wall time, or `memory_mb` of resident memory, the process is killed and
    BudgetExceeded raised. `target` and `args` must be picklable."""
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(target, args, send, os.getpid()), name="trial")
    start = time.monotonic()
    process.start()
    send.close()
    try:
        while True:
            raise_if_interrupted()  # a signal swallowed here: the child is killed below, the trial interrupted
            if receive.poll(POLL_S):
                kind, value = receive.recv()
                process.join()
                if kind == "raise":
                    raise value
                return value
            if not process.is_alive():
                raise RuntimeError(f"the trial's process died without a result (exit code {process.exitcode})")
            if seconds and time.monotonic() - start > seconds:
                raise BudgetExceeded(f"stopped: exceeded its time budget of {seconds:g} s")
            if memory_mb:
                resident = tree_resident_mb(process.pid)
                if resident > memory_mb:
                    raise BudgetExceeded(f"stopped: exceeded its memory budget of {memory_mb:g} MB "
                                         f"(resident {resident:.0f} MB)")
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receive.close()


__all__ = ["BudgetExceeded", "run_with_budget", "tree_resident_mb"]
