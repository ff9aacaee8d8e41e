"""Processes and signals: what stops a run is an interruption, and a child never outlives its parent.

SIGTERM (schedulers, `docker stop`, `kubectl delete`) and SIGHUP (a closed terminal or SSH session) are
treated as Ctrl-C: they raise KeyboardInterrupt in the main thread, so an interrupted trial frees its slot
instead of counting as a crash (a process killed outright by them would use up its trial's retries). A
process that is PID 1 in a container also needs the handler: the kernel ignores SIGTERM there otherwise.
Python drops an exception raised where it cannot propagate (a weakref callback, a __del__): SQLAlchemy's
weakref callbacks, run by garbage collections mid-step, took 6 of 10 SIGTERMs sent to a training search. So
each signal is also remembered (RECEIVED), long loops call `raise_if_interrupted` (after every training step,
in a launcher's and a budget's waits, between latency measurements and calibration points, and as
`interruptible` ends), and the dropped KeyboardInterrupt's "Exception ignored" traceback is not printed.

Children (a budgeted trial's process, search workers, confirmation pool workers) get a parent-death signal
on Linux (prctl PR_SET_PDEATHSIG), and elsewhere watch their parent's pid: killed with -9, a parent takes
them with it, instead of leaving them training on (and writing to its checkpoints) for minutes.

`file_lock(path)`: one process of this machine at a time (the lock goes with its process, killed or not).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import functools
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

INTERRUPTIONS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_POLL_S = 1.0  # elsewhere than Linux: how often a child looks whether its parent is still there


RECEIVED: list[str] = []  # the interrupting signals received: an exception raised in a signal handler can
# be swallowed (a weakref callback, a native library wrapping it), so the signal is remembered too


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal (SIGINT, SIGTERM, SIGHUP) after saving a checkpoint at `step` to `path`."""

    def __init__(self, name: str, step: int, steps: int | None, path: Path):
        super().__init__(name)  # the signal's, as `signal_name` says it
        self.step, self.steps, self.path = step, steps, path

    def __reduce__(self):  # sent back from a budgeted trial's process: rebuilt with its fields
        return type(self), (str(self), self.step, self.steps, self.path)

    def saved(self) -> str:
        return f"saved step {self.step}{f' of {self.steps}' if self.steps else ''} to {self.path}"


def signal_name(signum: int) -> str:
    """'SIGTERM', 'SIGHUP', or 'Ctrl-C' for SIGINT: what a trial's reason says interrupted it."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def interrupt(signum: int, frame=None) -> None:
    """A signal handler: remember the signal, then raise KeyboardInterrupt naming it (`str(error)`: `signal_name`)."""
    RECEIVED.append(signal_name(signum))
    raise KeyboardInterrupt(RECEIVED[-1])


def interrupted() -> str | None:
    """The interrupting signal received so far, if any (see RECEIVED)."""
    return RECEIVED[0] if RECEIVED else None


def raise_if_interrupted() -> None:
    """Raise the interruption again where its KeyboardInterrupt was swallowed."""
    if RECEIVED:
        raise KeyboardInterrupt(RECEIVED[0])


def interruption_name(error: KeyboardInterrupt) -> str:
    """What interrupted: the signal's name, or Ctrl-C for a plain KeyboardInterrupt."""
    return str(error) if str(error).startswith("SIG") else "Ctrl-C"


def quiet_swallowed_interruption(unraisable, fallback=sys.__unraisablehook__) -> None:
    """`sys.unraisablehook`: an interruption's KeyboardInterrupt that Python dropped (raised in a weakref callback
    or a __del__) is in RECEIVED, and the run stops at its next check: its traceback would only alarm. Any other
    goes to `fallback`."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and RECEIVED:
        return
    fallback(unraisable)


def interrupt_once(signum: int, frame=None) -> None:
    """`interrupt`, then ignore every later interrupting signal: a worker that is recording its interrupted
    trial must not be interrupted again (Ctrl-C reaches it from the terminal, SIGTERM from its launcher)."""
    for number in INTERRUPTIONS:
        signal.signal(number, signal.SIG_IGN)
    interrupt(signum)


def take_over_interruptions(handler) -> None:
    """`handler` on SIGINT, SIGTERM and SIGHUP, but for a signal ignored (as under nohup): it stays ignored."""
    for number in INTERRUPTIONS:
        if signal.getsignal(number) != signal.SIG_IGN:
            signal.signal(number, handler)


def treat_signals_as_interruptions(*, once: bool = False) -> None:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt from now on and are remembered in RECEIVED (main thread
    only; a signal ignored, as under nohup, stays ignored); `once`: only the first of them does."""
    if threading.current_thread() is not threading.main_thread():
        return
    take_over_interruptions(interrupt_once if once else interrupt)
    if getattr(sys.unraisablehook, "func", None) is not quiet_swallowed_interruption:
        sys.unraisablehook = functools.partial(quiet_swallowed_interruption, fallback=sys.unraisablehook)


@contextmanager
def interruptible():
    """`treat_signals_as_interruptions` while the block runs; the previous handlers afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous, previous_hook = {number: signal.getsignal(number) for number in INTERRUPTIONS}, sys.unraisablehook
    RECEIVED.clear()
    treat_signals_as_interruptions()
    try:
        yield
        raise_if_interrupted()  # swallowed after the last check: the block ran on, but it was interrupted
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
        sys.unraisablehook = previous_hook
        RECEIVED.clear()  # handled: a later run in this process starts uninterrupted


@contextmanager
def deferred_interruptions(on_signal):
    """While the block runs, an interrupting signal calls `on_signal(name)` instead of raising, so that the
    block can reach a safe point first; a second one raises at once. A signal ignored (nohup) stays ignored;
    outside the main thread: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        if received:  # not remembered in RECEIVED: nothing outside `interruptible` would ever clear it
            raise KeyboardInterrupt(signal_name(signum))
        received.append(signum)
        on_signal(signal_name(signum))

    previous = {number: signal.getsignal(number) for number in INTERRUPTIONS}
    take_over_interruptions(handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def die_with_parent(parent_pid: int) -> None:
    """Make this process die when the process `parent_pid` (its parent) does: at once by SIGKILL on Linux,
    within PARENT_POLL_S elsewhere. A parent already gone: exit now."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
    if libc is not None and libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
        if os.getppid() != parent_pid:  # it died before the signal was armed
            os._exit(1)
        return

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


@contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on the file `path` (created if absent), waiting for another process that holds it.
    A folder this user cannot write to gets no lock: nor can they change what is in it."""
    try:  # read-only: flock needs no write access, so a reader may lock a file another user's process made
        descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


__all__ = ["deferred_interruptions", "die_with_parent", "file_lock", "interrupt", "interruptible", "interrupted",
           "interruption_name", "raise_if_interrupted", "treat_signals_as_interruptions"]
