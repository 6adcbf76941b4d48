"""A timeline of what every process of a job spends its time on (``run.trace=true``).

Each process appends spans to ``<run dir>/trace/<role>-<index>.json`` in Chrome's
trace event format (one event per line, flushed, so a crashed run keeps its
timeline; the format allows the closing bracket to be missing). At the end of
the job learner rank 0 merges the files into ``<run dir>/trace.json``, which
https://ui.perfetto.dev or chrome://tracing shows as one row per role: engine
steps, weight loads, teacher forwards, batch waits, train steps and weight
broadcasts side by side. ``python -m asyncopd.trace <run dir>`` merges again and
prints each role's busy fraction.

Disabled (the default), :func:`span` costs one attribute read.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["configure", "span", "merge", "span_seconds", "busy_fractions"]

_ROLE_ORDER = {"learner": 0, "actor": 1000, "teacher": 2000}


class _Tracer:
    def __init__(self, path: Path, role: str, index: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pid = _ROLE_ORDER.get(role, 3000) + index
        self.file: IO[str] = path.open("w", buffering=1)
        self.lock = threading.Lock()
        self.file.write("[\n")
        self._write({"name": "process_name", "ph": "M", "pid": self.pid, "tid": 0,
                     "args": {"name": f"{role} {index}", "os_pid": os.getpid()}})
        self._write({"name": "process_sort_index", "ph": "M", "pid": self.pid, "tid": 0,
                     "args": {"sort_index": self.pid}})

    def _write(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.file.write(json.dumps(event, separators=(",", ":")) + ",\n")

    def complete(self, name: str, start_us: float, end_us: float, args: dict[str, Any]) -> None:
        event = {"name": name, "ph": "X", "ts": round(start_us, 1), "dur": round(end_us - start_us, 1),
                 "pid": self.pid, "tid": 0}
        if args:
            event["args"] = args
        self._write(event)


_tracer: _Tracer | None = None


def configure(run_dir: Path | None, role: str, index: int) -> None:
    """Start this process's trace file under ``run_dir`` (None: tracing off)."""
    global _tracer
    _tracer = None if run_dir is None else _Tracer(Path(run_dir) / "trace" / f"{role}-{index}.json", role, index)


def _now_us() -> float:
    return time.time_ns() / 1000  # wall clock: comparable across the processes of a node


@contextmanager
def span(name: str, **args: Any) -> Iterator[None]:
    """Record the enclosed block as one span of this process's row."""
    tracer = _tracer
    if tracer is None:
        yield
        return
    start = _now_us()
    try:
        yield
    finally:
        tracer.complete(name, start, _now_us(), args)


def _read(path: Path) -> list[dict[str, Any]]:
    text = path.read_text().strip()
    if text.endswith(","):
        text = text[:-1]
    if not text.endswith("]"):
        text += "]"
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # a line cut short by a crash: keep the whole lines
        events = []
        for line in text.splitlines()[1:]:
            try:
                events.append(json.loads(line.rstrip(",]")))
            except json.JSONDecodeError:
                pass
        return events


def _events(run_dir: Path) -> list[dict[str, Any]]:
    """Every event of every process file under ``run_dir/trace``."""
    return [event for part in sorted((Path(run_dir) / "trace").glob("*.json")) for event in _read(part)]


def merge(run_dir: Path) -> Path | None:
    """Merge ``run_dir/trace/*.json`` into ``run_dir/trace.json``; None when there is no trace."""
    events = _events(run_dir)
    if not events:
        return None
    out = Path(run_dir) / "trace.json"
    out.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return out


def span_seconds(run_dir: Path, start: float | None = None, end: float | None = None) -> dict[str, dict[str, float]]:
    """Seconds spent in each span name, per process ("learner 0", "actor 0", ...),
    counting only what falls within [start, end] (wall-clock seconds, as
    ``time.time()``; None: from the first span / to the last)."""
    return _span_seconds(_events(run_dir), start, end)


def _span_seconds(events: list[dict[str, Any]], start: float | None,
                  end: float | None) -> dict[str, dict[str, float]]:
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    spans = [e for e in events if e.get("ph") == "X"]
    lo = start * 1e6 if start is not None else min((e["ts"] for e in spans), default=0.0)
    hi = end * 1e6 if end is not None else max((e["ts"] + e["dur"] for e in spans), default=0.0)
    seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in spans:
        overlap = min(e["ts"] + e["dur"], hi) - max(e["ts"], lo)
        if overlap > 0:
            seconds[names.get(e["pid"], str(e["pid"]))][e["name"]] += overlap / 1e6
    return {row: dict(parts) for row, parts in sorted(seconds.items())}


def busy_fractions(run_dir: Path, *, skip_s: float = 0.0) -> dict[str, dict[str, float]]:
    """:func:`span_seconds` as fractions of the traced window, leaving out its first ``skip_s``."""
    events = _events(run_dir)
    spans = [e for e in events if e.get("ph") == "X"]
    if not spans:
        return {}
    start = min(e["ts"] for e in spans) / 1e6 + skip_s
    end = max(e["ts"] + e["dur"] for e in spans) / 1e6
    return {row: {name: s / (end - start) for name, s in parts.items()}
            for row, parts in _span_seconds(events, start, end).items()}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Merge a run's trace and print each role's busy fractions.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--skip-s", type=float, default=0.0, help="leave out the first seconds (start-up)")
    args = parser.parse_args()
    out = merge(args.run_dir)
    if out is None:
        raise SystemExit(f"{args.run_dir}/trace holds no trace files. Fix: run the job with run.trace=true.")
    print(f"merged: {out} (open in https://ui.perfetto.dev)")
    for row, parts in busy_fractions(args.run_dir, skip_s=args.skip_s).items():
        detail = ", ".join(f"{name} {fraction:.2f}" for name, fraction in sorted(parts.items(), key=lambda x: -x[1]))
        print(f"{row}: busy {sum(parts.values()):.2f} ({detail})")


if __name__ == "__main__":
    main()
