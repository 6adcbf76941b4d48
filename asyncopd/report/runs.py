"""The runs of a sweep directory and what a report reads from each.

A sweep (``python -m asyncopd.launch -m ...``) leaves ``<base>/sweep.json`` (every
job: combination tag, replicate seed, run directory, exit code). Without it, any
directory holding run directories (``summary.json`` / ``metrics.jsonl``) works: a
run's combination is its path under ``<base>`` without a trailing ``seed=<k>``.

From each run: the final value of every ``eval/*`` metric (the last evaluation in
``metrics.jsonl``; whatever keys the evaluation writes, read generically), seconds
per step, samples dropped and wall time (``summary.json``), and each ``eval/*``
metric's curve against policy version and against seconds since the run's first
metrics record. Reads files only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Run", "load_runs", "split_tag", "SPEED_KEYS"]

SPEED_KEYS = ("s/step", "samples dropped", "wall s")
"""Per-run measures from summary.json, shown after the eval/* metrics."""

_SEED_DIR = re.compile(r"^seed=(-?\d+)$")
_NOT_A_METRIC = {"eval/policy_version"}


def split_tag(tag: str) -> dict[str, str]:
    """``"a=1,b.c=x"`` -> ``{"a": "1", "b.c": "x"}`` (a value may hold commas, e.g. a list)."""
    if tag in ("", "job"):
        return {}
    parts = re.split(r",(?=[A-Za-z_+~][\w.+~]*=)", tag)
    return dict(part.split("=", 1) for part in parts)


@dataclass(slots=True)
class Run:
    """One job of a sweep."""

    combination: str
    seed: int | None
    run_dir: Path
    ok: bool
    summary: dict[str, Any] | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)
    """The evaluation records of metrics.jsonl, by policy version (the last record of each)."""
    start_time: float | None = None

    def final(self) -> dict[str, float]:
        """The run's scalar measures (missing ones absent)."""
        out: dict[str, float] = {}
        if self.evals:
            last = self.evals[-1]
            out.update({k: float(v) for k, v in last.items()
                        if k.startswith("eval/") and k not in _NOT_A_METRIC and _is_number(v)})
        s = self.summary or {}
        for key, summary_key in (("eval/accuracy", "eval/accuracy_after"), ("eval/rkl", "eval/rkl_after")):
            if key not in out and _is_number(s.get(summary_key)):
                out[key] = float(s[summary_key])
        steps = (s.get("policy_version") or 0) - (s.get("start_policy_version") or 0)
        if steps and _is_number(s.get("train_wall_s")):
            out["s/step"] = s["train_wall_s"] / steps
        if _is_number(s.get("samples_dropped_stale")):
            out["samples dropped"] = float(s["samples_dropped_stale"] + (s.get("samples_dropped_other") or 0))
        if _is_number(s.get("wall_s")):
            out["wall s"] = float(s["wall_s"])
        return out

    def curve(self, key: str) -> tuple[list[float], list[float], list[float]]:
        """(policy versions, seconds since the run's first record, values) of ``key``."""
        points = [(r["eval/policy_version"], r["time"] - (self.start_time or r["time"]), float(r[key]))
                  for r in self.evals if _is_number(r.get(key))]
        return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_run(run: Run) -> Run:
    summary_path, metrics_path = run.run_dir / "summary.json", run.run_dir / "metrics.jsonl"
    if summary_path.is_file():
        run.summary = json.loads(summary_path.read_text())
    if metrics_path.is_file():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        times = [r["time"] for r in records if _is_number(r.get("time"))]
        run.start_time = min(times) if times else None
        by_version = {int(r["eval/policy_version"]): r for r in records if _is_number(r.get("eval/policy_version"))}
        run.evals = [by_version[v] for v in sorted(by_version)]
    return run


def _locate(base: Path, job: dict[str, Any]) -> Path:
    """The job's run directory; found under ``base`` by its tag when the sweep was moved."""
    recorded = Path(job["run_dir"])
    if recorded.is_dir():
        return recorded
    where = [] if job["job"] == "job" and job.get("seed") is not None else [job["job"]]
    multi = len(recorded.parts) >= 1 and _SEED_DIR.match(recorded.name)
    return base.joinpath(*where, *([recorded.name] if multi else []))


def load_runs(base: Path) -> list[Run]:
    """Every run under ``base``, in sweep order (failed jobs included, ``ok=False``)."""
    base = Path(base)
    sweep = base / "sweep.json"
    if sweep.is_file():
        runs = [Run(combination=j["job"], seed=j.get("seed"), run_dir=_locate(base, j),
                    ok=j["returncode"] == 0) for j in json.loads(sweep.read_text())]
        return [_read_run(r) for r in runs]
    found = sorted({p.parent for name in ("summary.json", "metrics.jsonl") for p in base.rglob(name)})
    if not found:
        raise FileNotFoundError(f"{base}: no sweep.json and no run directory (summary.json or metrics.jsonl) "
                                "below it. Fix: pass the directory a sweep wrote (runs/<run.name>).")
    runs = []
    for run_dir in found:
        parts = run_dir.relative_to(base).parts
        seed = None
        if parts and (match := _SEED_DIR.match(parts[-1])):
            seed, parts = int(match.group(1)), parts[:-1]
        runs.append(_read_run(Run(combination="/".join(parts) or "job", seed=seed, run_dir=run_dir,
                                  ok=(run_dir / "summary.json").is_file())))
    return runs
