"""Which role failed, and how: per-rank status files and the launcher's verdict.

Each rank keeps one small JSON file, ``<status dir>/attempt<A>-rank<R>.json``:
``running`` from start-up, then ``failed`` (with the exception) when its role
raised, ``terminated`` when torchrun ended it because another rank failed, or
``finished``. After a failed torchrun world, :func:`describe_failure` turns
these into asyncopd's own last line: the role, index and rank that failed
first and its exception, or, for a rank that left no verdict, that it was
killed by a signal (SIGKILL, the kernel's OOM killer) rather than by Python.

The launcher owns the directory (a temporary one, passed to the ranks in the
environment); ranks started by ``torchrun`` directly have none and only log
their own failure line. This module never reads the environment.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

__all__ = ["RankStatus", "describe_failure", "STATUS_DIR_ENV"]

STATUS_DIR_ENV = "ASYNCOPD_STATUS_DIR"


class RankStatus:
    """This rank's status file (a no-op without a status directory)."""

    def __init__(self, status_dir: str | None, *, role: str, index: int, rank: int, attempt: int) -> None:
        self.path = None if not status_dir else Path(status_dir) / f"attempt{attempt}-rank{rank}.json"
        self.info = {"role": role, "index": index, "rank": rank, "attempt": attempt, "pid": os.getpid()}

    def _write(self, state: str, **extra: object) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({**self.info, "state": state, "time": time.time(), **extra}))
        os.replace(tmp, self.path)

    def running(self) -> None:
        self._write("running")

    def failed(self, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self._write("failed", exception=f"{type(exc).__name__}: {exc}", traceback=tb[-4000:])

    def terminated(self) -> None:
        self._write("terminated")

    def finished(self) -> None:
        self._write("finished")


def describe_failure(status_dir: Path) -> list[str]:
    """Lines naming the rank that failed first (per restart attempt, the last
    attempt's verdict last); empty when no rank left a file."""
    records = []
    for path in status_dir.glob("attempt*-rank*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    lines = []
    for attempt in sorted({r["attempt"] for r in records}):
        ranks = [r for r in records if r["attempt"] == attempt]
        failed = sorted((r for r in ranks if r["state"] == "failed"), key=lambda r: r["time"])
        vanished = [r for r in ranks if r["state"] == "running"]
        where = "restart attempt %d: " % attempt if attempt else ""
        if failed:
            first = failed[0]
            lines.append(f"{where}{first['role']} {first['index']} (rank {first['rank']}) failed first: "
                         f"{first['exception']}")
        for r in vanished:
            lines.append(f"{where}{r['role']} {r['index']} (rank {r['rank']}, pid {r['pid']}) died without a "
                         "Python error: killed by a signal (SIGKILL, the kernel's OOM killer) or crashed in native "
                         "code")
    return lines
