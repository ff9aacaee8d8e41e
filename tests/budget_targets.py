"""Targets for `nas.budget.run_with_budget` tests: a module without heavy imports, so the spawned child that
unpickles them starts small."""

import time


def swallow_everything(seconds: float) -> str:
    """Runs for `seconds`, swallowing every exception on the way (as careless trial code does)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(0.01)
        except Exception:  # noqa: BLE001 - the point of the test
            pass
    return "finished"


def hold_memory(megabytes: int, seconds: float) -> int:
    block = bytearray(megabytes * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not just reserved
    time.sleep(seconds)
    return len(block)


def fail(message: str) -> None:
    raise ValueError(message)


def write_pid_then_sleep(path: str, seconds: float) -> None:
    """Writes its pid to `path`, then sleeps: a trial that is still running when its worker dies."""
    import os

    with open(path, "w") as file:
        file.write(str(os.getpid()))
    time.sleep(seconds)
