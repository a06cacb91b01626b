"""One writer per run folder: a lock file that names who holds it.

Two trainings of one run at once would delete each other's temporary checkpoint folders and write
the same log rows twice. `run_lock(run_dir, "training")` creates `<run_dir>/run.lock` with O_EXCL
(atomic on local filesystems and NFSv3+), holding the pid, host, purpose and start time of its owner.
A second writer is refused with those facts. A lock left by a process that died (same host, pid gone
or reused) is taken over, with a message; a lock from another host cannot be checked from here and is
never taken over.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

LOCK_NAME = "run.lock"
RESULTS_LOCK = "results.lock"  # selection/ and results/ (04_sample, 05_eval): sampling may overlap training


class RunLockedError(RuntimeError):
    """Another live process holds the run's lock; the message names its pid, host and purpose."""


@contextlib.contextmanager
def run_lock(run_dir: str | Path, what: str, name: str = LOCK_NAME):
    """Hold `<run_dir>/<name>` (run.lock: training) for the duration of the block (`what` says why, e.g.
    "training"). The run folder must exist: a lock never creates a run."""
    path = Path(run_dir) / name
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: run folder not found")
    mine = dict(pid=os.getpid(), host=socket.gethostname(), what=what, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                pid_started=_process_start(os.getpid()), token=uuid.uuid4().hex)
    _acquire(path, mine)
    try:
        yield path
    finally:
        if _read(path).get("token") == mine["token"]:  # never remove a lock someone else took over
            path.unlink(missing_ok=True)


def _acquire(path: Path, mine: dict) -> None:
    for _ in range(3):  # a stale lock is removed, then the create is tried again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if not _is_stale(holder):
                raise RunLockedError(_describe(path, holder)) from None
            print(f"{path}: taking over a stale lock of pid {holder['pid']} on {holder['host']} "
                  f"({holder.get('what', '?')} since {holder.get('started', '?')}; that process is gone)")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(mine, f)
            f.flush()
            os.fsync(f.fileno())
        return
    raise RunLockedError(f"{path}: could not take the lock (other processes keep taking it)")


def _describe(path: Path, holder: dict) -> str:
    if not holder:
        return (f"{path.parent} is locked ({path} exists but cannot be read); if no other process uses this run, "
                f"delete {path}")
    return (f"{path.parent} is locked by pid {holder.get('pid')} on host {holder.get('host')} "
            f"({holder.get('what', '?')} since {holder.get('started', '?')}); wait for it to finish or stop it. "
            f"If that process is gone (e.g. on another machine), delete {path}")


def _read(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict) -> bool:
    """True only when certain: the holder ran on this host and its process no longer exists."""
    if not holder or holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    started = _process_start(pid)  # the pid may have been reused by an unrelated process since
    return started is not None and holder.get("pid_started") is not None and started != holder["pid_started"]


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from its first owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])
