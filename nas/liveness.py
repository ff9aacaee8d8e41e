"""Workers that die: who runs a trial, and when its worker counts as gone (the rule; `nas.trial_store` holds
the lease and does the reclaiming in the storage).

Optuna's heartbeats exist on RDB storages only; a journal file has none, so a trial whose worker was killed
(kill -9, the OOM killer, a lost machine) would stay RUNNING for ever, holding its slot. Instead, on every
storage, the worker that runs a trial renews a lease on it (`heartbeat_interval` seconds, held for 3
intervals). Any worker reclaims a running trial when its worker process is gone (same host: the pid no
longer exists) or its lease has expired (any host): the trial fails, marked interrupted, and a retry of the
same architecture is queued in its slot, at most `max_retries` times (after that the failure is final, so a
trial that kills its worker every time cannot loop). Exactly one worker wins a reclaim: the storage moves a
trial out of RUNNING once (`nas.trial_store.reclaim_dead_trials`). The retry carries Optuna's `failed_trial`
system attribute, as Optuna's own retry callbacks do (`optuna.storages.RetryFailedTrialCallback.retried_trial_number`).

A worker's identity is `host:boot id:pid namespace:start time:pid`. A hostname and a pid do not name a
process: containers with host networking, Kubernetes `hostNetwork` pods and cloned machines share hostnames,
and each PID namespace has its own pid 1. A worker is judged by its pid only where the other three parts
match this process's (same kernel boot, same PID namespace, and the pid's process started when the worker
did); anywhere else, and for a worker named the old way (`host:pid`), its lease decides.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from optuna.trial import TrialState

from nas.record import TrialRecord

log = logging.getLogger("vmoe_nas.liveness")
LEASE_INTERVALS = 3  # a lease lasts this many renewal intervals: two missed renewals are tolerated
UNNAMED_GRACE_S = 60.0  # a claimed trial without its worker's name yet: how long before it counts as dead


def boot_id() -> str:
    """This kernel boot's random id (Linux); empty elsewhere, where no pid is then judged locally."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    """The inode of this process's PID namespace (Linux); empty elsewhere."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def start_time(pid: int) -> str:
    """When process `pid` started, in clock ticks since boot (Linux /proc); empty when unknown or gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def worker_id() -> str:
    """This process's identity as a trial's worker (see the module docstring); the pid comes last."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{boot_id()}:{pid_namespace()}:{start_time(pid)}:{pid}"


def local_pid(worker: str | None) -> int | None:
    """The pid of `worker` where it is provably a process of this kernel boot and PID namespace, else None."""
    parts = (worker or "").split(":")
    if len(parts) != 5 or not parts[4].isdigit() or not all(parts[1:4]):
        return None
    host, boot, namespace, _, pid = parts
    return int(pid) if (host, boot, namespace) == (socket.gethostname(), boot_id(), pid_namespace()) else None


def lease_until(interval: float) -> float:
    return time.time() + LEASE_INTERVALS * interval


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs: it exists and is not a zombie (killed, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():  # Linux
        return stat.read_text().rpartition(")")[2].split()[0] != "Z"
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout
    return not state.strip().startswith("Z")


def is_dead(record: TrialRecord, *, now: float, grace_s: float) -> bool:
    """A running trial whose worker is gone: provably local (see `local_pid`), its pid does not run the
    process that claimed it (and a live worker is never dead, however late its lease: a loaded machine can
    starve the renewing thread); anywhere else, its lease has passed, or, where no worker has put its name on
    the trial yet, a minute since it was claimed (claiming and naming are two storage writes, which a loaded
    machine can space out)."""
    if record.state != TrialState.RUNNING:
        return False
    pid = local_pid(record.worker)
    if pid is not None:
        return not pid_alive(pid) or start_time(pid) != record.worker.split(":")[3]
    if record.lease_until is None:
        return now > (record.started or now) + max(grace_s, UNNAMED_GRACE_S)
    return now > record.lease_until


__all__ = ["LEASE_INTERVALS", "is_dead", "lease_until", "local_pid", "pid_alive", "worker_id"]
