"""One job per run directory: an exclusive lock that dies with its holder.

Learner rank 0 holds ``<run dir>/.asyncopd.lock`` (``fcntl.flock``, exclusive)
for its whole life. The kernel drops the lock when the process ends, however it
ends (SIGKILL included), so nothing stale is left behind. A second job on the
same directory fails at start-up naming the holder and the fix; a restarted
attempt of the *same* job (torchrun ``--max-restarts``, same
``TORCHELASTIC_RUN_ID``) waits a little for the dying attempt to let go.
``python -m asyncopd.launch`` probes the lock before it starts torchrun, so a
clash costs no start-up.

The lock file holds who holds it (JSON: pid, host, job id, attempt, since), for
the message only. Locks on network filesystems need working ``flock`` (NFSv4 has
it); a directory shared by nodes is locked by one learner rank only.

This module does not decide what the run directory contains.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from asyncopd.config import ConfigError

__all__ = ["LOCK_FILE", "RunDirBusy", "RunDirLock", "acquire_run_dir", "probe_run_dir"]

LOCK_FILE = ".asyncopd.lock"


class RunDirBusy(ConfigError):
    """Another job holds the run directory; the message names it and the fix."""


class RunDirLock:
    """A held lock; released by :meth:`release` or when the process ends."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _busy(run_dir: Path, holder: dict) -> RunDirBusy:
    who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, job {holder.get('job', '?')}, "
           f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['since']))}"
           if holder.get("since") else "a process that did not say who it is")
    return RunDirBusy(
        f"run directory {run_dir} is in use by another job ({who}); two jobs in one directory would "
        "interleave their metrics and overwrite each other's checkpoints. Fix: give this job another "
        "run.name (or run.dir); to continue that run once it has stopped, start it again with "
        "learner.resume=auto (the default).")


def acquire_run_dir(run_dir: Path, *, job_id: str, attempt: int, same_job_wait_s: float = 60.0) -> RunDirLock:
    """Take the run directory's lock for this process, or raise :class:`RunDirBusy`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + same_job_wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(path)
            if holder.get("job") != job_id or time.monotonic() > deadline:
                os.close(fd)
                raise _busy(run_dir, holder) from None
            time.sleep(0.2)  # an earlier attempt of this job is still exiting
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job": job_id,
                              "attempt": attempt, "since": time.time()}).encode(), 0)
    return RunDirLock(path, fd)


def probe_run_dir(run_dir: Path) -> None:
    """Raise :class:`RunDirBusy` if a live job holds ``run_dir`` (takes nothing)."""
    path = run_dir / LOCK_FILE
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(run_dir, _holder(path)) from None
    finally:
        os.close(fd)
